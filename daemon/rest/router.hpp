// SPDX-License-Identifier: GPL-2.0-or-later
// REST routing as pure functions: the route table of proto/openapi.yaml, a request target to a
// route (404 and 405 decided here), percent-decoding and query strings. No I/O; table-tested.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "libmachine/expected.hpp"

namespace qm::rest {

enum class Route {
    version,
    health,
    metrics,
    machines_list,
    machines_create,
    machine_get,
    machine_delete,
    spec_put,
    start,
    stop,
    kill,
    pause,
    resume,
    restart,
    qmp,
    log,
    console,
    console_log,
    console_wait,
    events_wait,
    events,
    stop_all,
};

struct RouteInfo
{
    Route route;
    std::string_view method;  // "GET", "POST", "PUT", "DELETE"
    std::string_view pattern; // "/v1/machines/{name}/start" (or "/metrics", outside /v1)
    std::string_view name;    // the metrics and log label: "machine.start"
};

// Every route, in the order of proto/openapi.yaml.
std::span<const RouteInfo> routes() noexcept;
const RouteInfo& route_info(Route route) noexcept;

// The query string as name/value pairs, decoded, in order.
using Query = std::vector<std::pair<std::string, std::string>>;

struct RouteMatch
{
    Route route;
    std::string name; // the {name} segment, percent-decoded (not yet validated)
    Query query;
};

// Why a target matched no route.
struct NoRoute
{
    int status = 404;  // 404: no such path; 405: the path exists, the method does not; 400: bad target
    std::string allow; // with 405: the path's methods, "GET, DELETE"
    std::string detail;
};

// Matches `method` and `target` (origin-form: path and optional query) against the table.
// Segments are percent-decoded after splitting, so "%2F" in a name stays in the name (and the
// name check refuses it). Empty segments ("//") and a missing leading '/' match nothing.
std::variant<RouteMatch, NoRoute> match_route(std::string_view method, std::string_view target);

// Percent-decoding (RFC 3986 2.1); '+' is a space only in queries (`plus_is_space`). nullopt for
// a malformed escape ("%4", "%zz").
std::optional<std::string> percent_decode(std::string_view s, bool plus_is_space = false);
// "a=1&b=&c" → {a,1},{b,""},{c,""}. errc::invalid_argument for a malformed escape.
expected<Query> parse_query(std::string_view query);

} // namespace qm::rest
