#include "services/coordinator/auth.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/files.h"
#include "common/status.h"
#include "services/common/rpc.h"

namespace qcal::coordinator {

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::FromTokenFile(
    const std::string& path) {
  QCAL_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  auto auth = std::make_unique<Authenticator>();
  auth->enabled_ = true;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<std::string> parts =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (parts.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", line_no, ": expected \"subject token\""));
    }
    // Tokens are kept hashed: a lookup compares digests, not the secret itself.
    auth->subject_by_token_sha256_[Sha256Hex(parts[1])] = parts[0];
  }
  if (auth->subject_by_token_sha256_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no tokens"));
  }
  return auth;
}

absl::StatusOr<std::string> Authenticator::Identify(const grpc::ServerContext& context) const {
  const auto& md = context.client_metadata();
  if (enabled_) {
    auto it = md.find(rpc::kAuthorizationMetadata);
    if (it == md.end()) return absl::UnauthenticatedError("missing bearer token");
    const std::string value(it->second.data(), it->second.size());
    const std::string prefix = "Bearer ";
    if (value.rfind(prefix, 0) != 0) {
      return absl::UnauthenticatedError("authorization metadata is not \"Bearer TOKEN\"");
    }
    auto subject = subject_by_token_sha256_.find(Sha256Hex(value.substr(prefix.size())));
    if (subject == subject_by_token_sha256_.end()) {
      return absl::UnauthenticatedError("unknown bearer token");
    }
    return subject->second;
  }
  auto it = md.find(rpc::kClientIdMetadata);
  if (it != md.end()) {
    if (it->second.size() > kMaxClientIdBytes || it->second.size() == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(rpc::kClientIdMetadata, " must be 1..", kMaxClientIdBytes, " bytes"));
    }
    return std::string(it->second.data(), it->second.size());
  }
  // "ipv4:127.0.0.1:5555" -> "ipv4:127.0.0.1": the port changes with every connection.
  const std::string peer = context.peer();
  const size_t colon = peer.rfind(':');
  return colon == std::string::npos || colon < peer.find(':') + 1 ? peer : peer.substr(0, colon);
}

}  // namespace qcal::coordinator
