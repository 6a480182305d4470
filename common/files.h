// File helpers: whole-file reads and durable whole-file writes, with errors naming the path.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace qcal {

absl::StatusOr<std::string> ReadFileToString(const std::string& path);
// Writes `contents` to `path` (truncating), then fsyncs it.
absl::Status WriteStringToFile(const std::string& path, const std::string& contents);
// Lower-case hex SHA-256 of a byte string and of a file.
std::string Sha256Hex(const std::string& bytes);
absl::StatusOr<std::string> Sha256File(const std::string& path);

}  // namespace qcal
