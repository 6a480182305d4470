// The command-line flags of rpc::ServerLimits, for the mains that serve gRPC: qcal-coordinator
// (prefix "grpc-") and qcal-worker's peer server (prefix "peer-grpc-"). Times are seconds; 0 turns
// the idle limit, the age limit or the age grace off. The flags write into `limits`, whose values
// before the call are the defaults shown; main() validates the result (ServerLimits::Validate).
#pragma once

#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "services/common/rpc.h"

namespace qcal::rpc {

inline void AddServerLimitFlags(CLI::App& app, const std::string& prefix, ServerLimits* limits) {
  auto seconds = [](absl::Duration d) {
    return d == absl::InfiniteDuration() ? std::string("0: off")
                                         : absl::StrCat(absl::ToDoubleSeconds(d));
  };
  auto add = [&](const std::string& name, absl::Duration* field, bool zero_is_off,
                 const std::string& what) {
    app.add_option_function<double>(
           absl::StrCat("--", prefix, name),
           [field, zero_is_off](double s) {
             *field = zero_is_off && s == 0 ? absl::InfiniteDuration() : absl::Seconds(s);
           },
           absl::StrCat(what, " (default ", seconds(*field), ")"))
        ->check(zero_is_off ? CLI::Validator(CLI::NonNegativeNumber)
                            : CLI::Validator(CLI::PositiveNumber));
  };
  add("keepalive-seconds", &limits->keepalive_time, false,
      "Ping a connection quiet this long (seconds)");
  add("keepalive-timeout-seconds", &limits->keepalive_timeout, false,
      "Close a connection whose ping is not answered within this");
  add("min-ping-interval-seconds", &limits->min_ping_interval, false,
      "Clients' pings closer than this without data are strikes; two close the connection "
      "(at most 30, the clients' keepalive)");
  add("max-connection-idle-seconds", &limits->max_connection_idle, true,
      "Close a connection with no call open for this long (0: never)");
  add("max-connection-age-seconds", &limits->max_connection_age, true,
      "Send GOAWAY to a connection this old; new calls reconnect (0: never)");
  add("max-connection-age-grace-seconds", &limits->max_connection_age_grace, true,
      "Calls in flight on a connection past its age may take this long, then are cut "
      "(0: as long as they take)");
  app.add_option(absl::StrCat("--", prefix, "max-concurrent-streams"),
                 limits->max_concurrent_streams,
                 absl::StrCat("Calls open at once per connection; more wait in the client "
                              "(default ",
                              limits->max_concurrent_streams, ")"))
      ->check(CLI::PositiveNumber);
}

}  // namespace qcal::rpc
