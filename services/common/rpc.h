// gRPC plumbing shared by qcal-coordinator, qcal-worker and the qcal CLI: message-size limits and
// the chunk size of bulk transfers, client keepalive and servers' connection limits, channel and
// server credentials (plaintext, TLS, mTLS), per-call metadata (bearer token, client id) and
// deadlines, and the mapping between absl::Status and grpc::Status (the same canonical codes both
// ways).
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "grpcpp/support/channel_arguments.h"
#include "grpcpp/support/status.h"

namespace qcal::rpc {

// Largest message either side sends or accepts (set explicitly on channels and servers). A larger
// one fails with RESOURCE_EXHAUSTED.
inline constexpr int kMaxMessageBytes = 4 << 20;
// Bulk data (artifacts, activation checkpoints) travels in chunks of at most this many bytes.
inline constexpr size_t kChunkBytes = 3584 * 1024;
// Metadata keys: the client's self-declared identity, and the bearer token.
inline constexpr char kClientIdMetadata[] = "x-qcal-client";
inline constexpr char kAuthorizationMetadata[] = "authorization";

// How a client (CLI, worker, test) reaches the coordinator.
struct ClientOptions {
  // host:port of the coordinator. Required.
  std::string address;
  // PEM file with the CA certificate(s) that signed the server's certificate; setting it turns
  // TLS on. Default: "" (plaintext).
  std::string tls_ca;
  // PEM files of the client's certificate chain and private key, for mTLS. Default: none.
  std::string tls_cert;
  std::string tls_key;
  // Expected name in the server's certificate when it differs from the address's host.
  // Default: "" (the host of `address`).
  std::string tls_server_name;
  // File whose first line is the bearer token. Default: "" (no token).
  std::string token_file;
  // Sent as x-qcal-client (identifies the client when auth is off). Default: "" (not sent).
  std::string client_id;
  // Deadline of each unary call. Default: 30 s.
  absl::Duration timeout = absl::Seconds(30);

  absl::Status Validate() const;
};

// A channel to the coordinator plus what every call carries. Thread-safe.
class Connection {
 public:
  // Reads the TLS and token files; errors name the file. Does not connect yet.
  static absl::StatusOr<std::unique_ptr<Connection>> Open(const ClientOptions& options);

  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  const ClientOptions& options() const { return options_; }
  // Adds the token and client id metadata and sets the deadline to now + `timeout`.
  void Prepare(grpc::ClientContext* context, absl::Duration timeout) const;
  // The same with options().timeout.
  void Prepare(grpc::ClientContext* context) const { Prepare(context, options_.timeout); }

 private:
  Connection() = default;
  ClientOptions options_;
  std::string token_;
  std::shared_ptr<grpc::Channel> channel_;
};

// Client keepalive (every channel this code opens: the CLI's, the workers' to the coordinator and
// to their peers): while a call is open, a connection quiet for kClientKeepaliveTime is pinged and
// dropped when the ping is not answered within kClientKeepaliveTimeout; a connection with no call
// open is never pinged (so that a server's idle limit can close it). Pings are allowed on
// streams that carry no data (a quiet WatchJob, a long block). Servers must accept pings this
// often: ServerLimits::min_ping_interval <= kClientKeepaliveTime.
inline constexpr absl::Duration kClientKeepaliveTime = absl::Seconds(30);
inline constexpr absl::Duration kClientKeepaliveTimeout = absl::Seconds(10);
// Sets the keepalive above on `args`.
void SetClientKeepalive(grpc::ChannelArguments& args);

// Connection limits of a gRPC server, set explicitly on qcal-coordinator and on each worker's
// peer server (docs/OPERATIONS.md, "gRPC connections"). Durations: InfiniteDuration() turns a
// limit off.
struct ServerLimits {
  // The server pings a connection that has been quiet this long and closes it when the ping is
  // not answered within keepalive_timeout: dead clients and half-open connections go away.
  // Default: 60 s and 20 s.
  absl::Duration keepalive_time = absl::Seconds(60);
  absl::Duration keepalive_timeout = absl::Seconds(20);
  // Keepalive enforcement: pings from a client closer together than this on a connection that
  // sends no data are strikes, and after two strikes the connection gets GOAWAY
  // (too_many_pings). At most kClientKeepaliveTime. Default: 10 s.
  absl::Duration min_ping_interval = absl::Seconds(10);
  // Whether a client may ping a connection with no call open (else such pings are strikes).
  // Default: false.
  bool permit_keepalive_without_calls = false;
  // A connection with no call open for this long is sent GOAWAY and closed; the client
  // reconnects on its next call. Default: 5 min.
  absl::Duration max_connection_idle = absl::Minutes(5);
  // A connection this old (gRPC adds up to ±10% jitter) is sent GOAWAY: new calls go to a new
  // connection, calls in flight may finish within max_connection_age_grace, after which they
  // are cut (UNAVAILABLE at the client). Default: 30 min and 10 min (longer than any WatchJob
  // stream, whose client deadline is 60 s).
  absl::Duration max_connection_age = absl::Minutes(30);
  absl::Duration max_connection_age_grace = absl::Minutes(10);
  // Calls open at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); a client
  // holds further calls until one ends. Default: 100.
  int max_concurrent_streams = 100;

  // INVALID_ARGUMENT naming the field: a duration <= 0, min_ping_interval above
  // kClientKeepaliveTime, max_concurrent_streams < 1.
  absl::Status Validate() const;
  // The channel arguments of these limits on `builder`.
  void Apply(grpc::ServerBuilder& builder) const;
};

// TLS of a server. Both files set: TLS; client_ca also set: mTLS (clients must present a
// certificate signed by it).
struct ServerTlsOptions {
  std::string cert;       // PEM certificate chain. Default: "" (plaintext).
  std::string key;        // PEM private key. Default: "".
  std::string client_ca;  // PEM CA for client certificates. Default: "" (no client certificates).

  absl::Status Validate() const;
};

// Plaintext (no files) or TLS/mTLS credentials; errors name the unreadable file.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> CreateServerCredentials(
    const ServerTlsOptions& tls);

// The same canonical code and message both ways.
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// "host:port" split at the last ':' ("[::1]:50051" keeps its brackets in the host); errors name
// the address.
absl::Status ParseHostPort(const std::string& address, std::string* host, int* port);

}  // namespace qcal::rpc
