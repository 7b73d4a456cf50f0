// SPDX-License-Identifier: GPL-2.0-or-later
// The REST API's request handling, apart from I/O: a parsed request in, a response out, every
// route of proto/openapi.yaml translated to one Supervisor operation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "daemon/audit.hpp"
#include "daemon/log_tail.hpp"
#include "daemon/rest/console_stream.hpp"
#include "daemon/rest/problem.hpp"
#include "daemon/rest/router.hpp"
#include "daemon/rest/stream.hpp"
#include "libmachine/asio.hpp"

namespace qm::daemon {
class Supervisor;
}

namespace qm::rest {

// What the handlers need of an HTTP request (the session fills it from Beast's message).
struct Request
{
    std::string method; // "GET"
    std::string target; // "/v1/machines/a?force=true"
    std::string content_type;
    std::optional<std::string> if_match;
    std::string body;
    // Last-Event-ID (an event stream's client reconnecting).
    std::optional<std::string> last_event_id;
    // A WebSocket handshake (Upgrade: websocket, RFC 6455 4.1).
    bool websocket = false;
    // Who sent it (the session describes its peer once, at accept): for the audit line.
    daemon::Caller caller;
};


struct Response
{
    int status = 200;
    std::string content_type; // empty: no body
    std::string body;
    std::vector<std::pair<std::string, std::string>> headers; // Location, ETag, Allow, ...
    // The route's label for logs and metrics ("machine.start"; "unmatched" for 404/405).
    std::string_view route = "unmatched";
    // The problem's name ("NoSuchMachine"); empty for a success.
    std::string problem;
    // For the audit line, what only the body says, once a handler read it: the machine a create
    // names, the QMP command sent. Empty when the request failed before.
    std::string machine;
    std::string qmp_command;
    // A streaming answer (events, the console): the session hands it the connection and it
    // writes everything from the status line on; the fields above are then only for the log.
    std::function<awaitable<void>(StreamConnection&)> stream;
};

// The response of a problem (with Allow for 405, WWW-Authenticate for 401).
Response problem_response(const Problem& p);

// The QEMU binary's version, learnt once at start (`--version`).
struct QemuVersion
{
    std::string binary;
    std::string version; // "7.2.22"
    std::string text;    // the first line of its output
};

struct ApiOptions
{
    std::string daemon_version;
    // Bytes read from the end of a log file at most.
    std::size_t log_read_limit = 1024 * 1024;
    // Event streams open at once (GET /v1/events); more are refused with 429.
    std::size_t max_subscribers = 1024;
    EventStreamOptions event_stream{};
    ConsoleStreamOptions console_stream{};
};

// Owned by the daemon; loop thread only; holds the supervisor by reference (it outlives the Api).
// Every failure is a response (a problem), never an exception; an exception that escapes a handler
// is a bug, answered 500 Internal by the session. Every request on a mutating route (create,
// update, delete, the actions, qmp) is audited once it completed (daemon/audit.hpp), failures and
// exceptions included; GETs are not, but for a console WebSocket that asks to write
// (console-write, audited when it is granted or refused).
class Api
{
public:
    Api(daemon::Supervisor& supervisor, ApiOptions options);

    awaitable<Response> handle(Request request);

    void set_qemu_version(QemuVersion v) { qemu_ = std::move(v); }

private:
    Response version() const;
    Response health() const;
    // The registry's text (it runs the collectors, hence not const).
    Response metrics();
    Response list() const;
    Response get(const std::string& name) const;
    awaitable<Response> log(std::string name, Query query, bool console) const;
    // The route's handler, after the name and query checks.
    awaitable<Response> dispatch(RouteMatch m, Request req);
    awaitable<Response> create(Request req);
    awaitable<Response> remove(std::string name, Query query);
    awaitable<Response> put_spec(std::string name, Request req);
    awaitable<Response> qmp(std::string name, Request req);
    awaitable<Response> action(Route route, std::string name, Request req);
    awaitable<Response> stop_all(Request req);
    Response events(const Query& query, const Request& req);
    awaitable<Response> events_wait(std::string name, Request req);
    awaitable<Response> console_wait(std::string name, Request req);
    awaitable<Response> console(std::string name, Query query, Request req);

    daemon::Supervisor& supervisor_;
    ApiOptions options_;
    std::optional<QemuVersion> qemu_;
};

// RFC 3339 in UTC with microseconds: "2026-11-25T22:01:02.123456Z".
std::string rfc3339_us(std::int64_t us_since_epoch);
// (Also used by the tests under this name.)
using daemon::read_log_tail;

} // namespace qm::rest
