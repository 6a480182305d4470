#include "services/common/rpc.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/files.h"
#include "common/status.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace qcal::rpc {

absl::Status ClientOptions::Validate() const {
  if (address.empty()) return absl::InvalidArgumentError("the coordinator address is required");
  std::string host;
  int port = 0;
  QCAL_RETURN_IF_ERROR(ParseHostPort(address, &host, &port));
  if (tls_cert.empty() != tls_key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (!tls_cert.empty() && tls_ca.empty()) {
    return absl::InvalidArgumentError("--tls-cert needs --tls-ca (mTLS runs over TLS)");
  }
  if (timeout <= absl::ZeroDuration()) return absl::InvalidArgumentError("the timeout must be > 0");
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Connection>> Connection::Open(const ClientOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  auto c = std::unique_ptr<Connection>(new Connection());
  c->options_ = options;
  if (!options.token_file.empty()) {
    QCAL_ASSIGN_OR_RETURN(std::string text, ReadFileToString(options.token_file));
    const size_t eol = text.find_first_of("\r\n");
    c->token_ = text.substr(0, eol);
    if (c->token_.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(options.token_file, ": the token file is empty"));
    }
  }
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (options.tls_ca.empty()) {
    creds = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions ssl;
    QCAL_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadFileToString(options.tls_ca));
    if (!options.tls_cert.empty()) {
      QCAL_ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadFileToString(options.tls_cert));
      QCAL_ASSIGN_OR_RETURN(ssl.pem_private_key, ReadFileToString(options.tls_key));
    }
    creds = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  // Fail fast on a dead coordinator instead of queueing calls until their deadline, and reconnect
  // quickly after a coordinator restart.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  SetClientKeepalive(args);
  if (!options.tls_server_name.empty()) args.SetSslTargetNameOverride(options.tls_server_name);
  c->channel_ = grpc::CreateCustomChannel(options.address, creds, args);
  return c;
}

void Connection::Prepare(grpc::ClientContext* context, absl::Duration timeout) const {
  if (!token_.empty())
    context->AddMetadata(kAuthorizationMetadata, absl::StrCat("Bearer ", token_));
  if (!options_.client_id.empty()) context->AddMetadata(kClientIdMetadata, options_.client_id);
  context->set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout));
}

namespace {

// gRPC's millisecond arguments: InfiniteDuration is INT_MAX (gRPC's "off").
int Millis(absl::Duration d) {
  if (d == absl::InfiniteDuration()) return std::numeric_limits<int>::max();
  return static_cast<int>(
      std::min<int64_t>(absl::ToInt64Milliseconds(d), std::numeric_limits<int>::max() - 1));
}

}  // namespace

void SetClientKeepalive(grpc::ChannelArguments& args) {
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, Millis(kClientKeepaliveTime));
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, Millis(kClientKeepaliveTimeout));
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 0);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
}

absl::Status ServerLimits::Validate() const {
  const std::pair<const char*, absl::Duration> durations[] = {
      {"keepalive_time", keepalive_time},
      {"keepalive_timeout", keepalive_timeout},
      {"min_ping_interval", min_ping_interval},
      {"max_connection_idle", max_connection_idle},
      {"max_connection_age", max_connection_age},
      {"max_connection_age_grace", max_connection_age_grace}};
  for (const auto& [name, d] : durations) {
    if (d <= absl::ZeroDuration()) {
      return absl::InvalidArgumentError(
          absl::StrCat("server limit ", name, " must be > 0, got ", absl::FormatDuration(d)));
    }
  }
  if (min_ping_interval > kClientKeepaliveTime) {
    return absl::InvalidArgumentError(absl::StrCat(
        "server limit min_ping_interval (", absl::FormatDuration(min_ping_interval),
        ") must be at most the clients' keepalive interval (",
        absl::FormatDuration(kClientKeepaliveTime), "), or their pings would close connections"));
  }
  if (max_concurrent_streams < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "server limit max_concurrent_streams must be >= 1, got ", max_concurrent_streams));
  }
  return absl::OkStatus();
}

void ServerLimits::Apply(grpc::ServerBuilder& builder) const {
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, Millis(keepalive_time));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, Millis(keepalive_timeout));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             Millis(min_ping_interval));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS,
                             permit_keepalive_without_calls ? 1 : 0);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS, Millis(max_connection_idle));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, Millis(max_connection_age));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                             Millis(max_connection_age_grace));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, max_concurrent_streams);
}

absl::Status ServerTlsOptions::Validate() const {
  if (cert.empty() != key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (!client_ca.empty() && cert.empty()) {
    return absl::InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> CreateServerCredentials(
    const ServerTlsOptions& tls) {
  QCAL_RETURN_IF_ERROR(tls.Validate());
  if (tls.cert.empty()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions ssl(
      tls.client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                            : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  QCAL_ASSIGN_OR_RETURN(pair.private_key, ReadFileToString(tls.key));
  QCAL_ASSIGN_OR_RETURN(pair.cert_chain, ReadFileToString(tls.cert));
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  if (!tls.client_ca.empty()) {
    QCAL_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadFileToString(tls.client_ca));
  }
  return grpc::SslServerCredentials(ssl);
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

absl::Status ParseHostPort(const std::string& address, std::string* host, int* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(absl::StrCat("address \"", address, "\" is not host:port"));
  }
  int p = -1;
  if (!absl::SimpleAtoi(absl::string_view(address).substr(colon + 1), &p) || p < 0 || p > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("address \"", address, "\" has a bad port"));
  }
  *host = address.substr(0, colon);
  *port = p;
  return absl::OkStatus();
}

}  // namespace qcal::rpc
