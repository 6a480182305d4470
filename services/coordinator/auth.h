// Who is calling (DESIGN section 7): with auth on, the subject of the bearer token (token file
// lines "subject token"; a missing or unknown token is UNAUTHENTICATED); otherwise the
// x-qcal-client metadata value, else the peer's address without its port. Idempotency keys and
// job quotas are per identity.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/server_context.h"

namespace qcal::coordinator {

// Longest accepted x-qcal-client value, bytes.
inline constexpr size_t kMaxClientIdBytes = 128;

class Authenticator {
 public:
  // Auth off.
  Authenticator() = default;
  // Auth on, with tokens from `path`: one "subject token" pair per line; blank lines and lines
  // starting with '#' are skipped. Errors name the file and line.
  static absl::StatusOr<std::unique_ptr<Authenticator>> FromTokenFile(const std::string& path);

  bool enabled() const { return enabled_; }
  // The caller's identity (see the file comment).
  absl::StatusOr<std::string> Identify(const grpc::ServerContext& context) const;

 private:
  bool enabled_ = false;
  std::map<std::string, std::string> subject_by_token_sha256_;
};

}  // namespace qcal::coordinator
