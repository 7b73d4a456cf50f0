// SPDX-License-Identifier: GPL-2.0-or-later
// The REST API's handlers: request → Supervisor operation → response.
#include "daemon/rest/api.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <ctime>
#include <variant>

#include <fmt/format.h>

#include "daemon/rest/stream.hpp"
#include "daemon/supervisor/errors.hpp"
#include "daemon/supervisor/spec.hpp"
#include "daemon/supervisor/supervisor.hpp"
#include "libmachine/json.hpp"

namespace qm::rest {

namespace {

using daemon::MachineInfo;
using daemon::OpResult;

constexpr std::string_view json_media_type = "application/json";
constexpr std::string_view text_media_type = "text/plain; charset=utf-8";
// The waits (events, console): at most an hour, 30 s unless the request says otherwise.
constexpr double max_wait_s = 3600;
constexpr std::chrono::milliseconds default_wait = std::chrono::seconds(30);
// The Prometheus text exposition format, version 0.0.4 (what a scraper asks for in Accept).
constexpr std::string_view metrics_media_type = "text/plain; version=0.0.4; charset=utf-8";

Response json_response(int status, std::string body)
{
    Response r;
    r.status = status;
    r.content_type = json_media_type;
    r.body = std::move(body);
    return r;
}

Response bad_request(std::string detail, std::string field = {})
{
    return problem_response(make_problem(errc::invalid_argument, std::move(detail), std::move(field)));
}

std::string etag(std::uint64_t generation)
{
    return fmt::format("\"{}\"", generation);
}

Response machine_response(int status, const MachineInfo& m, std::uint64_t seq)
{
    json::Document d = daemon::machine_to_json(m);
    auto& a = d.GetAllocator();
    const std::string since = rfc3339_us(m.state_since_us);
    d.AddMember("state_since", json::Value(since.c_str(), a), a);
    d.AddMember("event_seq", seq, a);
    Response r = json_response(status, json::to_string(d));
    r.headers.emplace_back("ETag", etag(m.generation));
    return r;
}

Response op_response(const expected<OpResult>& result)
{
    if (!result) {
        return problem_response(make_problem(result.error()));
    }
    return machine_response(200, result->machine, result->seq);
}

// The media type of a Content-Type value, lower case, without parameters.
std::string media_type(std::string_view content_type)
{
    const std::string_view type = content_type.substr(0, content_type.find(';'));
    std::string out;
    for (char c : type) {
        if (c != ' ' && c != '\t') {
            out.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
        }
    }
    return out;
}

bool is_json_media_type(std::string_view content_type)
{
    const std::string type = media_type(content_type);
    return type == "application/json" || (type.starts_with("application/") && type.ends_with("+json"));
}

// The body as a JSON object whose members are all in `allowed`; {} for an empty body (every body
// of this API is optional or an object). 415 for a body that is not declared JSON, 400 otherwise.
std::variant<json::Document, Response> body_object(const Request& req,
                                                   std::initializer_list<std::string_view> allowed)
{
    if (req.body.empty()) {
        return json::Document(rapidjson::kObjectType);
    }
    if (!is_json_media_type(req.content_type)) {
        const std::string got = req.content_type.empty() ? "no Content-Type" : req.content_type;
        return problem_response(make_problem(
            HttpProblem::unsupported_media_type,
            fmt::format("the body must be application/json (got {})", got.substr(0, 100))));
    }
    auto parsed = json::parse(req.body);
    if (!parsed) {
        return bad_request("the body is not valid JSON: " + parsed.error().message);
    }
    if (!parsed->IsObject()) {
        return bad_request("the body must be a JSON object");
    }
    for (const auto& m : parsed->GetObject()) {
        const std::string_view key(m.name.GetString(), m.name.GetStringLength());
        if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
            std::string shown = json::quote(key.substr(0, 64));
            return bad_request(fmt::format("unknown field {}", shown), std::string(key.substr(0, 64)));
        }
    }
    return std::move(*parsed);
}

// A problem when the query has a parameter not in `allowed`, or one twice.
std::optional<Response> check_query(const Query& query, std::initializer_list<std::string_view> allowed)
{
    for (std::size_t i = 0; i < query.size(); ++i) {
        const std::string& key = query[i].first;
        const std::string shown = json::quote(std::string_view(key).substr(0, 64));
        if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
            return bad_request(fmt::format("unknown query parameter {}", shown), key.substr(0, 64));
        }
        for (std::size_t j = 0; j < i; ++j) {
            if (query[j].first == key) {
                return bad_request(fmt::format("query parameter {} is given twice", shown), key);
            }
        }
    }
    return std::nullopt;
}

const std::string* query_value(const Query& query, std::string_view key)
{
    for (const auto& [k, v] : query) {
        if (k == key) {
            return &v;
        }
    }
    return nullptr;
}

std::optional<std::uint64_t> parse_uint(std::string_view s)
{
    std::uint64_t v = 0;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (s.empty() || ec != std::errc() || end != s.data() + s.size()) {
        return std::nullopt;
    }
    return v;
}

// A body member that must be a number in (min, max] seconds: the milliseconds.
// `whole`: whole seconds only (0 allowed), as the stop's timeout in the spec.
std::variant<std::optional<std::chrono::milliseconds>, Response> seconds_member(
    const json::Value& body, std::string_view key, double max, bool whole)
{
    const json::Value* v = json::find(body, key);
    if (v == nullptr) {
        return std::optional<std::chrono::milliseconds>{};
    }
    const bool ok = whole ? (v->IsUint64() && v->GetUint64() <= static_cast<std::uint64_t>(max))
                          : (v->IsNumber() && std::isfinite(v->GetDouble()) && v->GetDouble() > 0 &&
                             v->GetDouble() <= max);
    if (!ok) {
        return bad_request(whole ? fmt::format("{} must be a whole number of seconds, 0 to {}", key, max)
                                 : fmt::format("{} must be a number of seconds, more than 0 and "
                                               "at most {}", key, max),
                           std::string(key));
    }
    return std::optional<std::chrono::milliseconds>{
        std::chrono::milliseconds(static_cast<std::int64_t>(std::llround(v->GetDouble() * 1000)))};
}

// The operation a route stands for in the audit line; empty for routes that change nothing.
std::string_view audited_op(Route route)
{
    switch (route) {
    case Route::machines_create:
        return "create";
    case Route::spec_put:
        return "update";
    case Route::machine_delete:
        return "delete";
    case Route::start:
        return "start";
    case Route::stop:
        return "stop";
    case Route::kill:
        return "kill";
    case Route::pause:
        return "pause";
    case Route::resume:
        return "resume";
    case Route::restart:
        return "restart";
    case Route::qmp:
        return "qmp";
    case Route::stop_all:
        return "stop-all";
    case Route::version:
    case Route::health:
    case Route::metrics:
    case Route::machines_list:
    case Route::machine_get:
    case Route::log:
    case Route::console:
    case Route::console_log:
    case Route::console_wait:
    case Route::events_wait:
    case Route::events:
        break;
    }
    return {};
}

// `r` for the machine a create names (for the audit line).
Response for_machine(Response r, const std::string& name)
{
    r.machine = name;
    return r;
}

// `r` for the QMP command sent (for the audit line).
Response for_command(Response r, const std::string& command)
{
    r.qmp_command = command;
    return r;
}

} // namespace

Response problem_response(const Problem& p)
{
    Response r;
    r.status = p.status;
    r.content_type = problem_media_type;
    r.body = problem_body(p);
    r.problem = p.name;
    if (p.status == 401) {
        r.headers.emplace_back("WWW-Authenticate", "Bearer realm=\"qmachined\"");
    }
    if (p.status == 426) {
        // RFC 9110 15.5.22: a 426 names the protocol to upgrade to (our only one: RFC 6455);
        // 7.8: whoever sends Upgrade lists it in Connection too (the session keeps the token).
        r.headers.emplace_back("Upgrade", "websocket");
        r.headers.emplace_back("Connection", "Upgrade");
    }
    return r;
}

std::string rfc3339_us(std::int64_t us)
{
    const std::time_t secs = static_cast<std::time_t>(us / 1000000);
    const auto frac = static_cast<int>(us % 1000000);
    std::tm tm{};
    ::gmtime_r(&secs, &tm);
    return fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z", tm.tm_year + 1900, tm.tm_mon + 1,
                       tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, frac);
}

Api::Api(daemon::Supervisor& supervisor, ApiOptions options)
    : supervisor_(supervisor), options_(std::move(options))
{}

awaitable<Response> Api::handle(Request req)
{
    // RFC 9112 3.2.2: a server accepts the absolute form ("http://host/v1/health") too.
    if (req.target.starts_with("http://") || req.target.starts_with("https://")) {
        const std::size_t authority = req.target.find("//") + 2;
        const std::size_t path = req.target.find_first_of("/?", authority);
        req.target = path == std::string::npos ? "/" : req.target.substr(path);
        if (req.target.front() == '?') {
            req.target.insert(0, "/");
        }
    }
    auto matched = match_route(req.method, req.target);
    if (const auto* no = std::get_if<NoRoute>(&matched)) {
        if (no->status == 405) {
            Response r = problem_response(make_problem(HttpProblem::method_not_allowed, no->detail));
            r.headers.emplace_back("Allow", no->allow);
            co_return r;
        }
        if (no->status == 404) {
            co_return problem_response(make_problem(HttpProblem::not_found, no->detail));
        }
        co_return bad_request(no->detail);
    }
    RouteMatch m = std::move(std::get<RouteMatch>(matched));
    const Route route = m.route;
    const std::string_view label = route_info(route).name;
    const std::string_view op = audited_op(route);
    if (op.empty()) {
        Response r = co_await dispatch(std::move(m), std::move(req));
        r.route = label;
        co_return r;
    }

    // A mutating route: one audit line once it completed, whatever the outcome.
    const daemon::Caller caller = std::move(req.caller);
    const std::string name = m.name;
    Response r;
    try {
        r = co_await dispatch(std::move(m), std::move(req));
    } catch (...) {
        // A bug (the session answers 500 Internal); the call is audited all the same.
        daemon::audit(caller, op, name, daemon::error_info(errc::internal).name);
        throw;
    }
    r.route = label;
    std::string full_op(op);
    if (route == Route::qmp && !r.qmp_command.empty()) {
        full_op += ":" + r.qmp_command;
    }
    const std::string& machine = route == Route::machines_create ? r.machine : name;
    daemon::audit(caller, full_op, machine, r.problem.empty() ? std::string_view("ok") : r.problem);
    co_return r;
}

awaitable<Response> Api::dispatch(RouteMatch m, Request req)
{
    const Route route = m.route;
    // Every route with a {name}: the name first (400 naming the field), then the route.
    if (route_info(route).pattern.find("{name}") != std::string_view::npos) {
        auto valid = daemon::validate_name(m.name);
        if (!valid) {
            co_return bad_request(valid.error().message, "name");
        }
    }
    std::optional<Response> bad_query;
    switch (route) {
    case Route::machine_delete:
        bad_query = check_query(m.query, {"force"});
        break;
    case Route::log:
    case Route::console_log:
        bad_query = check_query(m.query, {"tail"});
        break;
    case Route::console:
        bad_query = check_query(m.query, {"mode"});
        break;
    case Route::events:
        break; // `event` is repeatable: events() checks its own query
    default:
        bad_query = check_query(m.query, {});
        break;
    }
    if (bad_query) {
        co_return std::move(*bad_query);
    }

    Response r;
    switch (route) {
    case Route::version:
        r = version();
        break;
    case Route::health:
        r = health();
        break;
    case Route::metrics:
        r = metrics();
        break;
    case Route::machines_list:
        r = list();
        break;
    case Route::machine_get:
        r = get(m.name);
        break;
    case Route::log:
    case Route::console_log:
        r = co_await log(m.name, m.query, route == Route::console_log);
        break;
    case Route::machines_create:
        r = co_await create(std::move(req));
        break;
    case Route::machine_delete:
        r = co_await remove(m.name, m.query);
        break;
    case Route::spec_put:
        r = co_await put_spec(m.name, std::move(req));
        break;
    case Route::qmp:
        r = co_await qmp(m.name, std::move(req));
        break;
    case Route::events:
        r = events(m.query, req);
        break;
    case Route::events_wait:
        r = co_await events_wait(m.name, std::move(req));
        break;
    case Route::console_wait:
        r = co_await console_wait(m.name, std::move(req));
        break;
    case Route::console:
        r = co_await console(m.name, std::move(m.query), std::move(req));
        break;
    case Route::start:
    case Route::stop:
    case Route::kill:
    case Route::pause:
    case Route::resume:
    case Route::restart:
        r = co_await action(route, m.name, std::move(req));
        break;
    case Route::stop_all:
        r = co_await stop_all(std::move(req));
        break;
    }
    co_return r;
}

Response Api::version() const
{
    json::Document d(rapidjson::kObjectType);
    auto& a = d.GetAllocator();
    d.AddMember("qmachined", json::Value(options_.daemon_version.c_str(), a), a);
    d.AddMember("api", "v1", a);
    if (qemu_) {
        json::Value q(rapidjson::kObjectType);
        q.AddMember("binary", json::Value(qemu_->binary.c_str(), a), a);
        q.AddMember("version", json::Value(qemu_->version.c_str(), a), a);
        q.AddMember("text", json::Value(qemu_->text.c_str(), a), a);
        d.AddMember("qemu", q, a);
    } else {
        d.AddMember("qemu", json::Value(), a);
    }
    return json_response(200, json::to_string(d));
}

Response Api::health() const
{
    if (supervisor_.shutting_down()) {
        return problem_response(make_problem(errc::shutting_down, "qmachined is shutting down"));
    }
    json::Document d(rapidjson::kObjectType);
    auto& a = d.GetAllocator();
    d.AddMember("status", "ok", a);
    d.AddMember("machines", static_cast<std::uint64_t>(supervisor_.size()), a);
    json::Value states(rapidjson::kObjectType);
    for (const auto& [state, count] : supervisor_.count_by_state()) {
        json::Value key(state.c_str(), a);
        json::Value n(static_cast<std::uint64_t>(count));
        states.AddMember(key, n, a);
    }
    d.AddMember("states", states, a);
    d.AddMember("event_seq", supervisor_.events().last_seq(), a);
    return json_response(200, json::to_string(d));
}

Response Api::metrics()
{
    // Served while shutting down too: a last scrape sees the machines being stopped.
    Response r;
    r.status = 200;
    r.content_type = metrics_media_type;
    r.body = supervisor_.metrics().render();
    return r;
}

Response Api::list() const
{
    const std::uint64_t seq = supervisor_.events().last_seq();
    json::Document d(rapidjson::kObjectType);
    auto& a = d.GetAllocator();
    json::Value machines(rapidjson::kArrayType);
    for (const MachineInfo& m : supervisor_.list()) {
        json::Document one = daemon::machine_to_json(m);
        const std::string since = rfc3339_us(m.state_since_us);
        one.AddMember("state_since", json::Value(since.c_str(), one.GetAllocator()), one.GetAllocator());
        one.AddMember("event_seq", seq, one.GetAllocator());
        machines.PushBack(json::Value(one, a), a);
    }
    d.AddMember("machines", machines, a);
    return json_response(200, json::to_string(d));
}

Response Api::get(const std::string& name) const
{
    auto info = supervisor_.inspect(name);
    if (!info) {
        return problem_response(make_problem(info.error()));
    }
    return machine_response(200, *info, supervisor_.events().last_seq());
}

awaitable<Response> Api::log(std::string name, Query query, bool console) const
{
    std::optional<std::size_t> tail;
    if (const std::string* t = query_value(query, "tail")) {
        auto n = parse_uint(*t);
        if (!n || *n > 1000000) {
            co_return bad_request("tail must be a whole number of lines, 0 to 1000000", "tail");
        }
        tail = static_cast<std::size_t>(*n);
    }
    auto info = supervisor_.inspect(name);
    if (!info) {
        co_return problem_response(make_problem(info.error()));
    }
    std::string path = info->log_path;
    if (console) {
        path = info->console_log_path;
    }
    std::string text;
    if (!path.empty()) {
        // Off the loop: up to log_read_limit bytes.
        auto read = co_await supervisor_.read_log(std::move(path), tail, options_.log_read_limit);
        if (!read) {
            co_return problem_response(make_problem(read.error()));
        }
        text = std::move(*read);
    }
    Response r;
    r.status = 200;
    r.content_type = text_media_type;
    r.body = std::move(text);
    co_return r;
}

awaitable<Response> Api::create(Request req)
{
    auto body = body_object(req, {"name", "spec"});
    if (auto* problem = std::get_if<Response>(&body)) {
        co_return std::move(*problem);
    }
    json::Document& doc = std::get<json::Document>(body);
    const json::Value* name = json::find(doc, "name");
    if (name == nullptr) {
        co_return bad_request("missing required field \"name\"", "name");
    }
    if (!name->IsString()) {
        co_return bad_request("name must be a string", "name");
    }
    std::string name_str(name->GetString(), name->GetStringLength());
    auto valid = daemon::validate_name(name_str);
    if (!valid) {
        co_return for_machine(bad_request(valid.error().message, "name"), name_str);
    }
    json::Document spec(rapidjson::kObjectType);
    if (const json::Value* s = json::find(doc, "spec")) {
        if (!s->IsObject()) {
            co_return for_machine(bad_request("spec must be a JSON object", "spec"), name_str);
        }
        spec.CopyFrom(*s, spec.GetAllocator());
    }
    auto created = co_await supervisor_.create(name_str, std::move(spec));
    if (!created) {
        co_return for_machine(problem_response(make_problem(created.error())), name_str);
    }
    Response r = machine_response(201, created->machine, created->seq);
    r.headers.emplace_back("Location", "/v1/machines/" + name_str);
    r.machine = name_str;
    co_return r;
}

awaitable<Response> Api::remove(std::string name, Query query)
{
    bool force = false;
    if (const std::string* f = query_value(query, "force")) {
        if (*f == "true" || *f == "1") {
            force = true;
        } else if (*f != "false" && *f != "0") {
            co_return bad_request("force must be true or false", "force");
        }
    }
    auto removed = co_await supervisor_.remove(name, force);
    if (!removed) {
        co_return problem_response(make_problem(removed.error()));
    }
    Response r;
    r.status = 204;
    co_return r;
}

awaitable<Response> Api::put_spec(std::string name, Request req)
{
    if (req.body.empty()) {
        co_return bad_request("the body must be the machine's spec (a JSON object)", "spec");
    }
    if (!is_json_media_type(req.content_type)) {
        co_return problem_response(make_problem(HttpProblem::unsupported_media_type,
                                                "the body must be application/json"));
    }
    auto parsed = json::parse(req.body);
    if (!parsed) {
        co_return bad_request("the body is not valid JSON: " + parsed.error().message);
    }
    if (!parsed->IsObject()) {
        co_return bad_request("the body must be the machine's spec (a JSON object)", "spec");
    }
    std::uint64_t generation = 0;
    // RFC 9110 13.1.1: If-Match holds entity tags; ours are the generation in quotes. A bare
    // number is accepted too (curl users type it), and "*" or no header means "whatever it is".
    std::string tag = req.if_match.value_or("*");
    if (auto known = supervisor_.inspect(name); !known) {
        co_return problem_response(make_problem(known.error()));
    }
    if (tag.starts_with("W/")) {
        // Strong comparison: a weak tag never matches (RFC 9110 13.1.1); ours are all strong.
        co_return problem_response(make_problem(
            errc::stale_generation, "If-Match: a weak entity tag never matches (use \"N\")"));
    }
    if (tag.size() >= 2 && tag.front() == '"' && tag.back() == '"') {
        tag = tag.substr(1, tag.size() - 2);
    }
    if (tag == "*") {
        auto info = supervisor_.inspect(name);
        if (!info) {
            co_return problem_response(make_problem(info.error()));
        }
        generation = info->generation;
    } else {
        auto n = parse_uint(tag);
        if (!n) {
            co_return bad_request("If-Match must be the machine's generation as an entity tag "
                                  "(\"3\") or *", "If-Match");
        }
        generation = *n;
    }
    auto updated = co_await supervisor_.update(name, std::move(*parsed), generation);
    co_return op_response(updated);
}

awaitable<Response> Api::qmp(std::string name, Request req)
{
    auto body = body_object(req, {"execute", "arguments", "timeout_s"});
    if (auto* problem = std::get_if<Response>(&body)) {
        co_return std::move(*problem);
    }
    json::Document& doc = std::get<json::Document>(body);
    const json::Value* execute = json::find(doc, "execute");
    if (execute == nullptr || !execute->IsString() || execute->GetStringLength() == 0 ||
        execute->GetStringLength() > 128) {
        co_return bad_request("execute must be a QMP command name (1 to 128 characters)", "execute");
    }
    const std::string command(execute->GetString(), execute->GetStringLength());
    json::Document arguments;
    if (const json::Value* args = json::find(doc, "arguments")) {
        if (!args->IsObject()) {
            co_return for_command(bad_request("arguments must be a JSON object", "arguments"),
                                  command);
        }
        arguments.CopyFrom(*args, arguments.GetAllocator());
    }
    auto timeout = seconds_member(doc, "timeout_s", 3600, false);
    if (auto* problem = std::get_if<Response>(&timeout)) {
        co_return for_command(std::move(*problem), command);
    }
    auto deadline = std::get<std::optional<std::chrono::milliseconds>>(timeout);
    auto result = co_await supervisor_.qmp(name, command, std::move(arguments), deadline);
    if (!result) {
        co_return for_command(problem_response(make_problem(result.error())), command);
    }
    json::Document d(rapidjson::kObjectType);
    auto& a = d.GetAllocator();
    d.AddMember("return", json::Value(result->value, a), a);
    d.AddMember("event_seq", result->seq, a);
    co_return for_command(json_response(200, json::to_string(d)), command);
}

awaitable<Response> Api::action(Route route, std::string name, Request req)
{
    if (route == Route::stop) {
        auto body = body_object(req, {"mode", "timeout_s"});
        if (auto* problem = std::get_if<Response>(&body)) {
            co_return std::move(*problem);
        }
        json::Document& doc = std::get<json::Document>(body);
        daemon::StopOptions options;
        if (const json::Value* mode = json::find(doc, "mode")) {
            const std::string_view m = mode->IsString()
                                           ? std::string_view(mode->GetString(), mode->GetStringLength())
                                           : std::string_view();
            if (m == "powerdown") {
                options.mode = daemon::ShutdownModeSpec::powerdown;
            } else if (m == "quit") {
                options.mode = daemon::ShutdownModeSpec::quit;
            } else {
                co_return bad_request("mode must be \"powerdown\" or \"quit\"", "mode");
            }
        }
        auto timeout = seconds_member(doc, "timeout_s", 86400, true);
        if (auto* problem = std::get_if<Response>(&timeout)) {
            co_return std::move(*problem);
        }
        options.timeout = std::get<std::optional<std::chrono::milliseconds>>(timeout);
        auto stopped = co_await supervisor_.stop(name, options);
        co_return op_response(stopped);
    }
    auto body = body_object(req, {});
    if (auto* problem = std::get_if<Response>(&body)) {
        co_return std::move(*problem);
    }
    expected<OpResult> result = fail(errc::internal, "no such action");
    switch (route) {
    case Route::start:
        result = co_await supervisor_.start(name);
        break;
    case Route::kill:
        result = co_await supervisor_.kill(name);
        break;
    case Route::pause:
        result = co_await supervisor_.pause(name);
        break;
    case Route::resume:
        result = co_await supervisor_.resume(name);
        break;
    case Route::restart:
        result = co_await supervisor_.restart(name);
        break;
    default:
        break;
    }
    co_return op_response(result);
}

// Every machine with a process stopped gracefully, `concurrency` at a time (the host's shutdown:
// qmachined-guests.service). 200 once all are done, with what stopped and what failed.
awaitable<Response> Api::stop_all(Request req)
{
    auto body = body_object(req, {"concurrency"});
    if (auto* problem = std::get_if<Response>(&body)) {
        co_return std::move(*problem);
    }
    const json::Document& doc = std::get<json::Document>(body);
    std::size_t concurrency = 0;
    if (const json::Value* c = json::find(doc, "concurrency")) {
        if (!c->IsUint64() || c->GetUint64() < 1 || c->GetUint64() > 256) {
            co_return bad_request("concurrency must be a whole number from 1 to 256", "concurrency");
        }
        concurrency = static_cast<std::size_t>(c->GetUint64());
    }
    if (supervisor_.shutting_down()) {
        co_return problem_response(make_problem(errc::shutting_down, "qmachined is shutting down"));
    }
    const daemon::StopAllResult result = co_await supervisor_.stop_all(concurrency);
    json::Document d(rapidjson::kObjectType);
    auto& a = d.GetAllocator();
    json::Value stopped(rapidjson::kArrayType);
    for (const std::string& name : result.stopped) {
        stopped.PushBack(json::Value(name.c_str(), a), a);
    }
    json::Value failed(rapidjson::kArrayType);
    for (const auto& [name, why] : result.failed) {
        json::Value f(rapidjson::kObjectType);
        f.AddMember("name", json::Value(name.c_str(), a), a);
        f.AddMember("detail", json::Value(why.c_str(), a), a);
        failed.PushBack(f, a);
    }
    d.AddMember("stopped", stopped, a);
    d.AddMember("failed", failed, a);
    d.AddMember("event_seq", result.seq, a);
    co_return json_response(200, json::to_string(d));
}

//---- streams and waits ------------------------------------------------------------------------

namespace {

// `{"event": NAME}` or "NAME" in a query: what an event name may be (QMP's and the daemon's are
// upper case with underscores; anything printable is allowed, bounded).
bool valid_event_name(std::string_view name)
{
    if (name.empty() || name.size() > 128) {
        return false;
    }
    return std::all_of(name.begin(), name.end(), [](char c) {
        return static_cast<unsigned char>(c) > 0x20 && static_cast<unsigned char>(c) < 0x7f;
    });
}

// The JSON object of a `match` (the seed's event_match criteria).
std::variant<json::Document, Response> match_object(std::string_view text)
{
    auto parsed = json::parse(text);
    if (!parsed || !parsed->IsObject()) {
        return bad_request("match must be a JSON object (the event_match criteria)", "match");
    }
    return std::move(*parsed);
}

} // namespace

Response Api::events(const Query& query, const Request& req)
{
    if (supervisor_.shutting_down()) {
        return problem_response(make_problem(errc::shutting_down, "qmachined is shutting down"));
    }
    daemon::EventSelector selector;
    selector.match.SetNull();
    std::optional<std::uint64_t> since;
    bool seen_machine = false;
    bool seen_match = false;
    bool seen_since = false;
    for (const auto& [key, value] : query) {
        const std::string shown = json::quote(std::string_view(key).substr(0, 64));
        bool* seen = key == "machine" ? &seen_machine
                     : key == "match" ? &seen_match
                     : key == "since" ? &seen_since
                                      : nullptr;
        if (seen != nullptr) {
            if (*seen) {
                return bad_request(fmt::format("query parameter {} is given twice", shown), key);
            }
            *seen = true;
        }
        if (key == "machine") {
            auto valid = daemon::validate_name(value);
            if (!valid) {
                return bad_request(valid.error().message, "machine");
            }
            selector.machine = value;
        } else if (key == "event") {
            if (!valid_event_name(value)) {
                return bad_request("event must be an event name (printable, 1 to 128 bytes)",
                                   "event");
            }
            selector.names.push_back(value);
        } else if (key == "match") {
            auto match = match_object(value);
            if (auto* problem = std::get_if<Response>(&match)) {
                return std::move(*problem);
            }
            selector.match = std::move(std::get<json::Document>(match));
        } else if (key == "since") {
            since = parse_uint(value);
            if (!since) {
                return bad_request("since must be an event sequence number", "since");
            }
        } else {
            return bad_request(fmt::format("unknown query parameter {}", shown), key.substr(0, 64));
        }
    }
    // An EventSource reconnecting sends the last id it got with the URL it first used: the id
    // wins over the URL's `since`.
    if (req.last_event_id) {
        since = parse_uint(*req.last_event_id);
        if (!since) {
            return bad_request("Last-Event-ID must be an event sequence number", "Last-Event-ID");
        }
    }
    auto& bus = supervisor_.events();
    if (bus.subscriber_count() >= options_.max_subscribers) {
        return problem_response(make_problem(
            errc::limit_exceeded,
            fmt::format("too many event subscribers (limit {})", options_.max_subscribers)));
    }
    // Subscribed now, before the answer is written: nothing published from here on is missed.
    auto subscription = bus.subscribe(std::move(selector), since);
    Response r;
    r.status = 200;
    r.stream = [subscription, stream_options = options_.event_stream](StreamConnection& c) {
        return serve_events(c, subscription, stream_options);
    };
    return r;
}

awaitable<Response> Api::events_wait(std::string name, Request req)
{
    auto body = body_object(req, {"event", "match", "since", "timeout_s"});
    if (auto* problem = std::get_if<Response>(&body)) {
        co_return std::move(*problem);
    }
    const json::Document& doc = std::get<json::Document>(body);
    daemon::EventSelector selector;
    selector.match.SetNull();
    if (const json::Value* event = json::find(doc, "event")) {
        if (!event->IsString() ||
            !valid_event_name(std::string_view(event->GetString(), event->GetStringLength()))) {
            co_return bad_request("event must be an event name (printable, 1 to 128 bytes)",
                                  "event");
        }
        selector.names.emplace_back(event->GetString(), event->GetStringLength());
    }
    if (const json::Value* match = json::find(doc, "match")) {
        if (!match->IsObject()) {
            co_return bad_request("match must be a JSON object (the event_match criteria)", "match");
        }
        selector.match.CopyFrom(*match, selector.match.GetAllocator());
    }
    std::optional<std::uint64_t> since;
    if (const json::Value* s = json::find(doc, "since")) {
        if (!s->IsUint64()) {
            co_return bad_request("since must be an event sequence number", "since");
        }
        since = s->GetUint64();
    }
    auto timeout = seconds_member(doc, "timeout_s", max_wait_s, false);
    if (auto* problem = std::get_if<Response>(&timeout)) {
        co_return std::move(*problem);
    }
    const auto wait_for = std::get<0>(timeout).value_or(default_wait);
    auto event = co_await supervisor_.wait_event(name, std::move(selector), since, wait_for);
    json::Document d(rapidjson::kObjectType);
    auto& a = d.GetAllocator();
    if (!event) {
        if (!event.error().is(errc::timeout)) {
            co_return problem_response(make_problem(event.error()));
        }
        d.AddMember("timed_out", true, a);
    } else {
        d.AddMember("timed_out", false, a);
        json::Value e;
        e.CopyFrom(event->json(), a);
        d.AddMember("event", e, a);
    }
    d.AddMember("event_seq", supervisor_.events().last_seq(), a);
    co_return json_response(200, json::to_string(d));
}

awaitable<Response> Api::console_wait(std::string name, Request req)
{
    auto body = body_object(req, {"pattern", "from", "timeout_s"});
    if (auto* problem = std::get_if<Response>(&body)) {
        co_return std::move(*problem);
    }
    const json::Document& doc = std::get<json::Document>(body);
    const json::Value* pattern = json::find(doc, "pattern");
    if (pattern == nullptr) {
        co_return bad_request("missing required field \"pattern\"", "pattern");
    }
    if (!pattern->IsString() || pattern->GetStringLength() == 0 ||
        pattern->GetStringLength() > 4096) {
        co_return bad_request("pattern must be a regular expression of 1 to 4096 bytes", "pattern");
    }
    auto compiled = ConsolePattern::regex(std::string_view(pattern->GetString(),
                                                           pattern->GetStringLength()));
    if (!compiled) {
        co_return bad_request("pattern: " + compiled.error().message, "pattern");
    }
    std::uint64_t from = 0;
    if (const json::Value* f = json::find(doc, "from")) {
        if (!f->IsUint64()) {
            co_return bad_request("from must be a console offset (a byte count)", "from");
        }
        from = f->GetUint64();
    }
    auto timeout = seconds_member(doc, "timeout_s", max_wait_s, false);
    if (auto* problem = std::get_if<Response>(&timeout)) {
        co_return std::move(*problem);
    }
    const auto wait_for = std::get<0>(timeout).value_or(default_wait);
    auto matched = co_await supervisor_.console_wait(name, std::move(*compiled), wait_for, from);
    json::Document d(rapidjson::kObjectType);
    auto& a = d.GetAllocator();
    if (!matched) {
        if (!matched.error().is(errc::timeout)) {
            co_return problem_response(make_problem(matched.error()));
        }
        d.AddMember("timed_out", true, a);
        auto output = supervisor_.console_output(name, 0);
        d.AddMember("offset", output ? output->second : 0, a);
        co_return json_response(200, json::to_string(d));
    }
    d.AddMember("timed_out", false, a);
    d.AddMember("match", json::Value(matched->text.c_str(),
                                     static_cast<rapidjson::SizeType>(matched->text.size()), a),
                a);
    d.AddMember("begin", matched->begin, a);
    d.AddMember("end", matched->end, a);
    // The output from `from` to the end of the match, as far as the ring still holds it.
    auto output = supervisor_.console_output(name, from);
    std::string text = output ? std::move(output->first) : std::string();
    const std::uint64_t start = output ? output->second - text.size() : matched->end;
    if (matched->end >= start && matched->end - start < text.size()) {
        text.resize(static_cast<std::size_t>(matched->end - start));
    }
    d.AddMember("output",
                json::Value(text.c_str(), static_cast<rapidjson::SizeType>(text.size()), a), a);
    co_return json_response(200, json::to_string(d));
}

awaitable<Response> Api::console(std::string name, Query query, Request req)
{
    bool write = false;
    if (const std::string* mode = query_value(query, "mode")) {
        if (*mode == "write") {
            write = true;
        } else if (*mode != "read") {
            co_return bad_request("mode must be \"read\" or \"write\"", "mode");
        }
    }
    if (auto known = supervisor_.inspect(name); !known) {
        co_return problem_response(make_problem(known.error()));
    }
    if (!req.websocket) {
        co_return problem_response(make_problem(
            HttpProblem::upgrade_required,
            fmt::format("the console of '{}' is a WebSocket: ask for the upgrade (Upgrade: "
                        "websocket, Connection: Upgrade; RFC 6455 4.1)",
                        name)));
    }
    auto attached = co_await supervisor_.console_attach(name, options_.console_stream.history);
    if (!attached) {
        co_return problem_response(make_problem(attached.error()));
    }
    std::shared_ptr<daemon::ConsoleSession> session = std::move(*attached);
    const ConsoleStreamOptions stream_options = options_.console_stream;
    Response r;
    r.status = 101;
    if (write) {
        auto claimed = session->claim_writer();
        daemon::audit(req.caller, "console-write", name,
                      claimed ? std::string_view("ok") : daemon::error_info(claimed.error()).name);
        if (!claimed) {
            // Refused once upgraded, not with 409: a browser's WebSocket reports a close code and
            // reason, and never the status of a refused handshake. The session goes now.
            r.stream = [reason = claimed.error().message, stream_options](StreamConnection& c) {
                return refuse_console(c, ConsoleClose::writer_busy, reason, stream_options);
            };
            co_return r;
        }
    }
    r.stream = [session, stream_options](StreamConnection& c) {
        return serve_console(c, session, stream_options);
    };
    co_return r;
}

} // namespace qm::rest
