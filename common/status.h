// Status helpers. Abseil 20220623 has no status macros, so qcal keeps its own here, in one header.
//
// Everything that can fail across a module boundary returns absl::Status or absl::StatusOr<T>.
// Invariants (programming errors) use QCAL_CHECK, which aborts with the condition and location.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define QCAL_STATUS_CONCAT_INNER(a, b) a##b
#define QCAL_STATUS_CONCAT(a, b) QCAL_STATUS_CONCAT_INNER(a, b)

// Returns from the current function with `expr`'s status when it is not OK.
#define QCAL_RETURN_IF_ERROR(expr)               \
  do {                                           \
    ::absl::Status qcal_status_ = (expr);        \
    if (!qcal_status_.ok()) return qcal_status_; \
  } while (0)

// `lhs = value of rexpr` when rexpr (a StatusOr) is OK; otherwise returns its status.
#define QCAL_ASSIGN_OR_RETURN(lhs, rexpr) \
  QCAL_ASSIGN_OR_RETURN_IMPL(QCAL_STATUS_CONCAT(qcal_statusor_, __LINE__), lhs, rexpr)
#define QCAL_ASSIGN_OR_RETURN_IMPL(statusor, lhs, rexpr)   \
  auto statusor = (rexpr);                                 \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

// Aborts the process when an internal invariant does not hold. Never use for input validation.
#define QCAL_CHECK(cond)                                                                    \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      std::fprintf(stderr, "qcal: CHECK failed at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                         \
    }                                                                                       \
  } while (0)

namespace qcal {

// Prefixes a status's message with context ("reading model/config.json: ..."), keeping its code.
inline absl::Status Annotate(const absl::Status& status, const std::string& context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

}  // namespace qcal
