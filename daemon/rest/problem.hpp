// SPDX-License-Identifier: GPL-2.0-or-later
// RFC 9457 problem details: every REST error body. The rows come from the front ends' error table
// (daemon/supervisor/errors.hpp) plus the HTTP-only problems below; both are in proto/errors.json.
#pragma once

#include <span>
#include <string>
#include <string_view>

#include "libmachine/error.hpp"

namespace qm::rest {

// Problems that only HTTP has (no errc: the supervisor never returns them).
enum class HttpProblem {
    unauthorized,           // 401: TCP without the right bearer token
    not_found,              // 404: no such route
    method_not_allowed,     // 405: the route exists, the method does not
    request_timeout,        // 408: the request did not arrive in time
    payload_too_large,      // 413: the body is over the limit
    unsupported_media_type, // 415: a body that is not JSON
    upgrade_required,       // 426: a WebSocket route asked without the upgrade
    header_fields_too_large // 431: the header is over the limit
};

struct HttpProblemInfo
{
    HttpProblem problem;
    std::string_view name; // "NotFound"
    int http_status;
    std::string_view title;
};
std::span<const HttpProblemInfo> http_problem_table() noexcept;

struct Problem
{
    int status = 500;
    std::string name;   // "NoSuchMachine": type is urn:qmachined:error:<name>
    std::string title;  // the row's title
    std::string detail; // what happened, for this request
    std::string field;  // for validation errors: "name", "spec.cpus", "tail"; empty otherwise
    std::string qmp_class; // for QmpError
    std::string qmp_desc;
};

// The problem of a supervisor error. The field of a spec error comes from its message
// ("spec.cpus: must be ..." → "spec.cpus").
Problem make_problem(const Error& error);
Problem make_problem(errc code, std::string detail, std::string field = {});
Problem make_problem(HttpProblem problem, std::string detail);

// The application/problem+json body.
std::string problem_body(const Problem& p);

inline constexpr std::string_view problem_media_type = "application/problem+json";
inline constexpr std::string_view problem_type_prefix = "urn:qmachined:error:";

} // namespace qm::rest
