// SPDX-License-Identifier: GPL-2.0-or-later
// The D-Bus methods' operations.
#include "daemon/dbus/calls.hpp"

#include <chrono>

#include <fmt/format.h>

#include "daemon/audit.hpp"
#include "daemon/supervisor/errors.hpp"
#include "libmachine/json.hpp"

namespace qm::dbus {

namespace {

using BodyWriter = Service::BodyWriter;

void audit(const std::string& caller, std::string_view op, std::string_view machine,
           const Error* error)
{
    daemon::audit(daemon::Caller{caller}, op, machine,
                  error == nullptr ? std::string_view("ok") : daemon::error_info(*error).name);
}

// A JSON object from a method's string argument ("" is {}); errc::invalid_argument naming `what`.
expected<json::Document> object_argument(const std::string& text, std::string_view what)
{
    if (text.empty()) {
        return json::Document(rapidjson::kObjectType);
    }
    auto parsed = json::parse(text);
    if (!parsed) {
        return fail(errc::invalid_argument,
                    fmt::format("{} is not valid JSON: {}", what, parsed.error().message));
    }
    if (!parsed->IsObject()) {
        return fail(errc::invalid_argument, fmt::format("{} must be a JSON object", what));
    }
    return std::move(*parsed);
}

BodyWriter string_path(std::string path)
{
    return [path = std::move(path)](sd_bus_message* reply) {
        return sd_bus_message_append(reply, "o", path.c_str());
    };
}

BodyWriter string_body(std::string text)
{
    return [text = std::move(text)](sd_bus_message* reply) {
        return sd_bus_message_append(reply, "s", text.c_str());
    };
}

} // namespace

const char* to_string(Action a) noexcept
{
    switch (a) {
    case Action::start: return "start";
    case Action::stop: return "stop";
    case Action::kill: return "kill";
    case Action::pause: return "pause";
    case Action::resume: return "resume";
    case Action::restart: return "restart";
    }
    return "?";
}

expected<daemon::StopOptions> stop_options(std::string_view mode, std::uint64_t timeout_usec)
{
    daemon::StopOptions options;
    if (mode == "powerdown") {
        options.mode = daemon::ShutdownModeSpec::powerdown;
    } else if (mode == "quit") {
        options.mode = daemon::ShutdownModeSpec::quit;
    } else if (!mode.empty()) {
        return fail(errc::invalid_argument,
                    "mode must be \"powerdown\", \"quit\" or \"\" (the spec's)");
    }
    constexpr std::uint64_t day_usec = std::uint64_t{86400} * 1000000;
    if (timeout_usec > day_usec) {
        return fail(errc::invalid_argument, "timeout_usec must be at most a day (0: the spec's)");
    }
    if (timeout_usec > 0) {
        options.timeout = std::chrono::milliseconds((timeout_usec + 999) / 1000);
    }
    return options;
}

awaitable<expected<BodyWriter>> create_call(Service* s, std::string caller, std::string name,
                                            std::string spec_json)
{
    auto spec = object_argument(spec_json, "spec_json");
    if (!spec) {
        audit(caller, "create", name, &spec.error());
        co_return fail(spec.error());
    }
    auto created = co_await s->supervisor().create(name, std::move(*spec));
    audit(caller, "create", name, created ? nullptr : &created.error());
    if (!created) {
        co_return fail(created.error());
    }
    co_return string_path(Service::machine_path(name));
}

awaitable<expected<BodyWriter>> action_call(Service* s, std::string caller, std::string name,
                                            Action action, daemon::StopOptions stop)
{
    auto& sup = s->supervisor();
    expected<daemon::OpResult> r = fail(errc::internal, "no such action");
    switch (action) {
    case Action::start: r = co_await sup.start(name); break;
    case Action::stop: r = co_await sup.stop(name, stop); break;
    case Action::kill: r = co_await sup.kill(name); break;
    case Action::pause: r = co_await sup.pause(name); break;
    case Action::resume: r = co_await sup.resume(name); break;
    case Action::restart: r = co_await sup.restart(name); break;
    }
    audit(caller, to_string(action), name, r ? nullptr : &r.error());
    if (!r) {
        co_return fail(r.error());
    }
    co_return BodyWriter{};
}

awaitable<expected<BodyWriter>> delete_call(Service* s, std::string caller, std::string name,
                                            bool force)
{
    auto removed = co_await s->supervisor().remove(name, force);
    audit(caller, "delete", name, removed ? nullptr : &removed.error());
    if (!removed) {
        co_return fail(removed.error());
    }
    co_return BodyWriter{};
}

awaitable<expected<BodyWriter>> stop_all_call(Service* s, std::string caller,
                                              std::uint32_t concurrency)
{
    if (concurrency > 256) {
        Error e;
        e.code = make_error_code(errc::invalid_argument);
        e.message = "concurrency must be 0 to 256";
        audit(caller, "stop-all", "", &e);
        co_return fail(std::move(e));
    }
    if (s->supervisor().shutting_down()) {
        co_return fail(errc::shutting_down, "qmachined is shutting down");
    }
    auto result = co_await s->supervisor().stop_all(concurrency);
    audit(caller, "stop-all", "", nullptr);
    co_return BodyWriter{[result = std::move(result)](sd_bus_message* reply) {
        int r = sd_bus_message_open_container(reply, 'a', "s");
        for (std::size_t i = 0; r >= 0 && i < result.stopped.size(); ++i) {
            r = sd_bus_message_append(reply, "s", result.stopped[i].c_str());
        }
        if (r >= 0) {
            r = sd_bus_message_close_container(reply);
        }
        if (r >= 0) {
            r = sd_bus_message_open_container(reply, 'a', "(ss)");
        }
        for (std::size_t i = 0; r >= 0 && i < result.failed.size(); ++i) {
            r = sd_bus_message_append(reply, "(ss)", result.failed[i].first.c_str(),
                                      result.failed[i].second.c_str());
        }
        if (r >= 0) {
            r = sd_bus_message_close_container(reply);
        }
        return r;
    }};
}

awaitable<expected<BodyWriter>> execute_call(Service* s, std::string caller, std::string name,
                                             std::string command, std::string arguments_json)
{
    const std::string op = "qmp:" + command;
    json::Document arguments;
    if (!arguments_json.empty()) {
        auto parsed = object_argument(arguments_json, "arguments_json");
        if (!parsed) {
            audit(caller, op, name, &parsed.error());
            co_return fail(parsed.error());
        }
        arguments = std::move(*parsed);
    }
    auto result = co_await s->supervisor().qmp(name, command, std::move(arguments));
    audit(caller, op, name, result ? nullptr : &result.error());
    if (!result) {
        co_return fail(result.error());
    }
    co_return string_body(json::to_string(result->value));
}

awaitable<expected<BodyWriter>> log_call(Service* s, std::string path,
                                         std::optional<std::size_t> max_lines)
{
    auto text = co_await s->supervisor().read_log(std::move(path), max_lines,
                                                  s->options().log_read_limit);
    if (!text) {
        co_return fail(text.error());
    }
    co_return string_body(std::move(*text));
}

awaitable<expected<BodyWriter>> wait_event_call(Service* s, std::string name, std::string event,
                                                std::string match_json, std::uint64_t since,
                                                std::uint64_t timeout_usec)
{
    daemon::EventSelector selector;
    selector.match.SetNull();
    if (!event.empty()) {
        selector.names.push_back(std::move(event));
    }
    if (!match_json.empty()) {
        auto match = object_argument(match_json, "match_json");
        if (!match) {
            co_return fail(match.error());
        }
        selector.match = std::move(*match);
    }
    constexpr std::uint64_t hour_usec = std::uint64_t{3600} * 1000000;
    if (timeout_usec > hour_usec) {
        co_return fail(errc::invalid_argument, "timeout_usec must be at most an hour (0: 30 s)");
    }
    const auto timeout = timeout_usec == 0
                             ? std::chrono::milliseconds(30000)
                             : std::chrono::milliseconds((timeout_usec + 999) / 1000);
    std::optional<std::uint64_t> from;
    if (since > 0) {
        from = since;
    }
    auto found = co_await s->supervisor().wait_event(name, std::move(selector), from, timeout);
    if (!found) {
        co_return fail(found.error());
    }
    co_return string_body(found->to_json());
}

} // namespace qm::dbus
