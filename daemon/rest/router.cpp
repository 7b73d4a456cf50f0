// SPDX-License-Identifier: GPL-2.0-or-later
// REST routing: the route table and target matching.
#include "daemon/rest/router.hpp"

#include <array>

#include <fmt/format.h>

namespace qm::rest {

namespace {

constexpr std::array route_table{
    RouteInfo{Route::version, "GET", "/v1/version", "version"},
    RouteInfo{Route::health, "GET", "/v1/health", "health"},
    // Where Prometheus scrapes by default; the text format versions itself (version=0.0.4).
    RouteInfo{Route::metrics, "GET", "/metrics", "metrics"},
    RouteInfo{Route::machines_list, "GET", "/v1/machines", "machines.list"},
    RouteInfo{Route::machines_create, "POST", "/v1/machines", "machines.create"},
    RouteInfo{Route::machine_get, "GET", "/v1/machines/{name}", "machine.get"},
    RouteInfo{Route::machine_delete, "DELETE", "/v1/machines/{name}", "machine.delete"},
    RouteInfo{Route::spec_put, "PUT", "/v1/machines/{name}/spec", "machine.spec.put"},
    RouteInfo{Route::start, "POST", "/v1/machines/{name}/start", "machine.start"},
    RouteInfo{Route::stop, "POST", "/v1/machines/{name}/stop", "machine.stop"},
    RouteInfo{Route::kill, "POST", "/v1/machines/{name}/kill", "machine.kill"},
    RouteInfo{Route::pause, "POST", "/v1/machines/{name}/pause", "machine.pause"},
    RouteInfo{Route::resume, "POST", "/v1/machines/{name}/resume", "machine.resume"},
    RouteInfo{Route::restart, "POST", "/v1/machines/{name}/restart", "machine.restart"},
    RouteInfo{Route::qmp, "POST", "/v1/machines/{name}/qmp", "machine.qmp"},
    RouteInfo{Route::log, "GET", "/v1/machines/{name}/log", "machine.log"},
    RouteInfo{Route::console, "GET", "/v1/machines/{name}/console", "machine.console"},
    RouteInfo{Route::console_log, "GET", "/v1/machines/{name}/console/log", "machine.console.log"},
    RouteInfo{Route::console_wait, "POST", "/v1/machines/{name}/console/wait",
              "machine.console.wait"},
    RouteInfo{Route::events_wait, "POST", "/v1/machines/{name}/events/wait", "machine.events.wait"},
    RouteInfo{Route::events, "GET", "/v1/events", "events"},
    RouteInfo{Route::stop_all, "POST", "/v1/stop-all", "stop-all"},
};

// Splits "/a/b/c" into {"a", "b", "c"}; "/" into {""}.
std::vector<std::string_view> split_path(std::string_view path)
{
    std::vector<std::string_view> out;
    std::size_t pos = 1;
    while (true) {
        const std::size_t slash = path.find('/', pos);
        out.push_back(path.substr(pos, slash == std::string_view::npos ? slash : slash - pos));
        if (slash == std::string_view::npos) {
            return out;
        }
        pos = slash + 1;
    }
}

int hex_value(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

// Whether the decoded `segments` fit `pattern`; the {name} segment goes to `name`.
bool fits(std::string_view pattern, const std::vector<std::string>& segments, std::string& name)
{
    const auto parts = split_path(pattern);
    if (parts.size() != segments.size()) {
        return false;
    }
    std::string found;
    for (std::size_t i = 0; i < parts.size(); ++i) {
        if (parts[i] == "{name}") {
            if (segments[i].empty()) {
                return false; // "/v1/machines/" names no machine: 404, not a bad name
            }
            found = segments[i];
        } else if (parts[i] != segments[i]) {
            return false;
        }
    }
    name = std::move(found);
    return true;
}

} // namespace

std::span<const RouteInfo> routes() noexcept
{
    return route_table;
}

const RouteInfo& route_info(Route route) noexcept
{
    return route_table[static_cast<std::size_t>(route)];
}

std::optional<std::string> percent_decode(std::string_view s, bool plus_is_space)
{
    std::string out;
    out.reserve(s.size());
    for (std::size_t i = 0; i < s.size(); ++i) {
        const char c = s[i];
        if (c == '%') {
            if (i + 2 >= s.size()) {
                return std::nullopt;
            }
            const int hi = hex_value(s[i + 1]);
            const int lo = hex_value(s[i + 2]);
            if (hi < 0 || lo < 0) {
                return std::nullopt;
            }
            out.push_back(static_cast<char>(hi * 16 + lo));
            i += 2;
        } else if (c == '+' && plus_is_space) {
            out.push_back(' ');
        } else {
            out.push_back(c);
        }
    }
    return out;
}

expected<Query> parse_query(std::string_view query)
{
    Query out;
    std::size_t pos = 0;
    while (pos <= query.size()) {
        std::size_t amp = query.find('&', pos);
        if (amp == std::string_view::npos) {
            amp = query.size();
        }
        const std::string_view pair = query.substr(pos, amp - pos);
        if (!pair.empty()) {
            const std::size_t eq = pair.find('=');
            auto key = percent_decode(pair.substr(0, eq), true);
            auto value = percent_decode(
                eq == std::string_view::npos ? std::string_view() : pair.substr(eq + 1), true);
            if (!key || !value) {
                return fail(errc::invalid_argument,
                            "the query string has a malformed percent-escape");
            }
            out.emplace_back(std::move(*key), std::move(*value));
        }
        pos = amp + 1;
    }
    return out;
}

std::variant<RouteMatch, NoRoute> match_route(std::string_view method, std::string_view target)
{
    const std::size_t qmark = target.find('?');
    const std::string_view path = target.substr(0, qmark);
    if (path.empty() || path.front() != '/') {
        return NoRoute{400, {}, "the request target must be a path starting with '/'"};
    }
    std::vector<std::string> segments;
    for (std::string_view raw : split_path(path)) {
        auto decoded = percent_decode(raw);
        if (!decoded) {
            return NoRoute{400, {}, "the path has a malformed percent-escape"};
        }
        segments.push_back(std::move(*decoded));
    }
    std::string allow;
    for (const RouteInfo& r : route_table) {
        std::string name;
        if (!fits(r.pattern, segments, name)) {
            continue;
        }
        if (r.method == method) {
            Query query;
            if (qmark != std::string_view::npos) {
                auto parsed = parse_query(target.substr(qmark + 1));
                if (!parsed) {
                    return NoRoute{400, {}, parsed.error().message};
                }
                query = std::move(*parsed);
            }
            return RouteMatch{r.route, std::move(name), std::move(query)};
        }
        if (allow.find(r.method) == std::string::npos) {
            allow += allow.empty() ? "" : ", ";
            allow += r.method;
        }
    }
    // A hostile 16 KiB target is not echoed whole.
    const std::string_view shown = path.substr(0, 200);
    const char* more = path.size() > shown.size() ? "..." : "";
    if (!allow.empty()) {
        return NoRoute{405, allow, fmt::format("{} is not allowed on {}{} (allowed: {})",
                                               method.substr(0, 20), shown, more, allow)};
    }
    return NoRoute{404, {}, fmt::format("no route for {} {}{}", method.substr(0, 20), shown, more)};
}

} // namespace qm::rest
