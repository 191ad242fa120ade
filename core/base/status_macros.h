// Status plumbing shared by every module: early-return helpers for absl::Status / absl::StatusOr.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define QF_CONCAT_INNER(a, b) a##b
#define QF_CONCAT(a, b) QF_CONCAT_INNER(a, b)

// Returns the status from the enclosing function when `expr` is not OK.
#define QF_RETURN_IF_ERROR(expr)                 \
  do {                                           \
    ::absl::Status qf_status_ = (expr);          \
    if (!qf_status_.ok()) return qf_status_;     \
  } while (0)

// `QF_ASSIGN_OR_RETURN(auto x, MakeX());` binds the value or returns the error.
#define QF_ASSIGN_OR_RETURN(lhs, expr) QF_ASSIGN_OR_RETURN_IMPL(QF_CONCAT(qf_statusor_, __LINE__), lhs, expr)
#define QF_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return tmp.status();            \
  lhs = std::move(tmp).value()
