// SPDX-License-Identifier: GPL-2.0-or-later
// qmachinectl's commands: each a function from the parsed command line to REST calls and output,
// and the table that names them, their options and their help.
#include "daemon/ctl/commands.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <optional>
#include <sstream>
#include <vector>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "daemon/ctl/console.hpp"
#include "daemon/ctl/output.hpp"
#include "libmachine/json.hpp"

extern char** environ; // NOLINT: POSIX declares it in no header

namespace qm::ctl {

namespace {

using namespace std::chrono_literals;

// ---- helpers ---------------------------------------------------------------------------------

void out(std::string_view text)
{
    std::fwrite(text.data(), 1, text.size(), stdout);
}

// "qmachinectl: cannot reach qmachined at ...": exit 3.
int unreachable(const Error& e)
{
    std::fprintf(stderr, "qmachinectl: %s\n", e.message.c_str());
    return exit_unreachable;
}

// "Failed to start 'web1': no machine named 'web1'": exit 1.
int failed(std::string_view verb, std::string_view name, const Response& r)
{
    if (name.empty()) {
        std::fprintf(stderr, "Failed to %.*s: %s\n", static_cast<int>(verb.size()), verb.data(),
                     problem_detail(r).c_str());
    } else {
        std::fprintf(stderr, "Failed to %.*s '%.*s': %s\n", static_cast<int>(verb.size()),
                     verb.data(), static_cast<int>(name.size()), name.data(),
                     problem_detail(r).c_str());
    }
    return exit_failed;
}

int usage_error(std::string_view message)
{
    std::fprintf(stderr, "qmachinectl: %.*s\nTry 'qmachinectl --help'.\n",
                 static_cast<int>(message.size()), message.data());
    return exit_usage;
}

// A path segment or query value, percent-encoded (RFC 3986: all but the unreserved characters).
std::string encode(std::string_view s)
{
    std::string outs;
    for (const char c : s) {
        const auto u = static_cast<unsigned char>(c);
        if ((u >= 'A' && u <= 'Z') || (u >= 'a' && u <= 'z') || (u >= '0' && u <= '9') ||
            c == '-' || c == '.' || c == '_' || c == '~') {
            outs += c;
        } else {
            outs += fmt::format("%{:02X}", u);
        }
    }
    return outs;
}

std::string machine_path(std::string_view name, std::string_view rest = {})
{
    return "/v1/machines/" + encode(name) + std::string(rest);
}

// The answer's JSON; nullopt (and a message) when it is not JSON.
std::optional<json::Document> body_json(const Response& r)
{
    auto doc = json::parse(r.body);
    if (!doc) {
        std::fprintf(stderr, "qmachinectl: qmachined answered something that is not JSON: %s\n",
                     doc.error().message.c_str());
        return std::nullopt;
    }
    return std::move(*doc);
}

// A call whose answer is JSON: `doc` when it succeeded, else the exit status with the problem
// printed ("Failed to <verb> '<name>': ...", or the daemon unreachable).
struct JsonAnswer
{
    int status = exit_ok;
    json::Document doc;
    Response response; // the daemon's answer (status 0 when it was not reached)

    bool ok() const { return status == exit_ok; }
};

JsonAnswer call_json(Context& c, std::string_view verb, std::string_view name,
                     std::string_view method, const std::string& target, std::string body = {},
                     std::string if_match = {})
{
    JsonAnswer a;
    auto r = c.client.request(method, target, std::move(body), std::move(if_match));
    if (!r) {
        a.status = unreachable(r.error());
        return a;
    }
    a.response = std::move(*r);
    if (!a.response.ok()) {
        a.status = failed(verb, name, a.response);
        return a;
    }
    auto doc = body_json(a.response);
    if (!doc) {
        a.status = exit_failed;
        return a;
    }
    a.doc = std::move(*doc);
    return a;
}

std::string str(const json::Value& v, std::string_view key, std::string_view fallback = "-")
{
    if (auto s = json::get_string(v, key)) {
        return std::string(*s);
    }
    return std::string(fallback);
}

std::optional<std::int64_t> integer(const json::Value& v, std::string_view key)
{
    return json::get_int(v, key);
}

std::string int_or(const json::Value& v, std::string_view key, std::string_view fallback = "-")
{
    if (auto n = integer(v, key)) {
        return std::to_string(*n);
    }
    return std::string(fallback);
}

std::int64_t now_us()
{
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
}

// "2026-11-25T22:13:14.874Z" for an event's timestamp.
std::string utc_time(std::int64_t seconds, std::int64_t micros)
{
    const std::time_t t = seconds;
    std::tm tm{};
    ::gmtime_r(&t, &tm);
    return fmt::format("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z", tm.tm_year + 1900,
                       tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, micros / 1000);
}

void print_json(const json::Value& v)
{
    out(pretty_json(v));
    out("\n");
}

// "running, pid 4242", "stopped (host-quit)", for the action lines.
std::string state_summary(const json::Value& m, bool colour)
{
    std::string s = coloured_state(str(m, "state"), colour);
    if (auto pid = integer(m, "pid")) {
        s += fmt::format(", pid {}", *pid);
    } else if (const auto* reason = json::find(m, "stop_reason"); reason && reason->IsObject()) {
        s += fmt::format(" ({})", str(*reason, "kind"));
    }
    return s;
}

// One event as a line: "42  2026-11-25T22:13:14.874Z  web1  STATE_CHANGED  {...}".
std::string event_line(const json::Value& e)
{
    std::string when = "-";
    if (const auto* ts = json::find(e, "timestamp")) {
        when =
            utc_time(integer(*ts, "seconds").value_or(0), integer(*ts, "microseconds").value_or(0));
    }
    std::string data;
    if (const auto* d = json::find(e, "data")) {
        data = json::to_string(*d);
    }
    return fmt::format("{}  {}  {}  {}  {}", int_or(e, "seq"), when, str(e, "machine"),
                       str(e, "event"), data);
}

// Reads a whole file ("-": stdin).
expected<std::string> read_file(const std::string& path)
{
    if (path == "-") {
        return std::string(std::istreambuf_iterator<char>(std::cin), {});
    }
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        return fail(errc::system_error,
                    fmt::format("cannot read '{}': {}", path, std::strerror(errno)));
    }
    return std::string(std::istreambuf_iterator<char>(f), {});
}

void set_member(json::Document& doc, const char* key, json::Value value)
{
    auto it = doc.FindMember(key);
    if (it != doc.MemberEnd()) {
        it->value = std::move(value);
    } else {
        doc.AddMember(json::Value(key, doc.GetAllocator()), std::move(value), doc.GetAllocator());
    }
}

// The positional arguments after the machine names.
const std::vector<std::string>& names(const Context& c)
{
    return c.args.positional;
}

// ---- list, show ------------------------------------------------------------------------------

int cmd_list(Context& c)
{
    auto a = call_json(c, "list machines", {}, "GET", "/v1/machines");
    if (!a.ok()) {
        return a.status;
    }
    const json::Value* machines = json::find(a.doc, "machines");
    if (machines == nullptr || !machines->IsArray()) {
        return exit_failed;
    }
    if (c.args.has("names")) {
        for (const auto& m : machines->GetArray()) {
            out(str(m, "name") + "\n");
        }
        return exit_ok;
    }
    if (c.json) {
        print_json(a.doc);
        return exit_ok;
    }
    if (machines->Empty()) {
        out("No machines.\n");
        return exit_ok;
    }
    Table t({"NAME", "STATE", "SINCE", "PID", "CPUS", "MEMORY", "OPERATION"});
    const auto now = now_us();
    for (const auto& m : machines->GetArray()) {
        const json::Value* spec = json::find(m, "spec");
        const std::string state = str(m, "state");
        const auto memory = spec ? integer(*spec, "memory_mib") : std::nullopt;
        t.add_row({str(m, "name"), state,
                   integer(m, "state_since_us") ? age(*integer(m, "state_since_us"), now) : "-",
                   int_or(m, "pid"), spec ? int_or(*spec, "cpus") : "-",
                   memory ? fmt::format("{} MiB", *memory) : "-", str(m, "operation")},
                  {std::nullopt, coloured_state(state, c.colour)});
    }
    out(t.render());
    return exit_ok;
}

std::string shell_word(std::string_view s)
{
    const bool plain = !s.empty() && std::all_of(s.begin(), s.end(), [](char ch) {
        return std::isalnum(static_cast<unsigned char>(ch)) || std::strchr("-_./=,:@+%", ch);
    });
    if (plain) {
        return std::string(s);
    }
    std::string q = "'";
    for (const char ch : s) {
        q += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
    }
    return q + "'";
}

int cmd_show(Context& c)
{
    const std::string& name = names(c)[0];
    auto a = call_json(c, "show", name, "GET", machine_path(name));
    if (!a.ok()) {
        return a.status;
    }
    if (c.json) {
        print_json(a.doc);
        return exit_ok;
    }
    const json::Value& m = a.doc;
    static const json::Value empty(rapidjson::kObjectType);
    const json::Value* spec_p = json::find(m, "spec");
    const json::Value& spec = spec_p ? *spec_p : empty;
    std::vector<std::pair<std::string, std::string>> rows;
    rows.emplace_back("Name", str(m, "name"));
    rows.emplace_back("UUID", str(m, "uuid"));
    std::string state = coloured_state(str(m, "state"), c.colour);
    if (auto since = integer(m, "state_since_us")) {
        state += fmt::format(" since {} ({} ago)", str(m, "state_since"), age(*since, now_us()));
    }
    rows.emplace_back("State", state);
    if (const auto* op = json::find(m, "operation"); op && op->IsString()) {
        rows.emplace_back("Operation", op->GetString());
    }
    rows.emplace_back("PID", int_or(m, "pid"));
    rows.emplace_back("QEMU status", str(m, "qemu_status"));
    if (const auto* reason = json::find(m, "stop_reason"); reason && reason->IsObject()) {
        std::string text = str(*reason, "kind");
        if (auto code = integer(m, "exit_code")) {
            text += fmt::format(", exit code {}", *code);
        }
        if (auto sig = integer(m, "exit_signal")) {
            text += fmt::format(", signal {}", *sig);
        }
        if (auto detail = json::get_string(*reason, "detail")) {
            text += fmt::format(": {}", *detail);
        }
        rows.emplace_back("Last stop", text);
    }
    rows.emplace_back("Restarts", int_or(m, "restart_count"));
    rows.emplace_back("Generation", int_or(m, "generation"));
    rows.emplace_back("Binary", str(spec, "binary"));
    rows.emplace_back("Machine", str(spec, "machine", "(QEMU's default)"));
    rows.emplace_back("CPUs", int_or(spec, "cpus"));
    const auto memory = integer(spec, "memory_mib");
    rows.emplace_back("Memory", memory ? fmt::format("{} MiB", *memory) : "(QEMU's default)");
    std::string args;
    if (const auto* a = json::find(spec, "args"); a && a->IsArray()) {
        for (const auto& arg : a->GetArray()) {
            if (arg.IsString()) {
                args += (args.empty() ? "" : " ") + shell_word(arg.GetString());
            }
        }
    }
    rows.emplace_back("Arguments", args.empty() ? "-" : args);
    if (const auto* con = json::find(spec, "console")) {
        const bool on = json::find(*con, "enabled") && json::find(*con, "enabled")->IsTrue();
        rows.emplace_back("Console",
                          on ? fmt::format("enabled (ring {} B, log {} B)",
                                           int_or(*con, "ring_size"), int_or(*con, "log_size"))
                             : "disabled");
    }
    if (const auto* sd = json::find(spec, "shutdown")) {
        rows.emplace_back("Shutdown",
                          fmt::format("{}, {} s", str(*sd, "mode"), int_or(*sd, "timeout_s")));
    }
    if (const auto* rs = json::find(spec, "restart")) {
        rows.emplace_back("Restart policy",
                          fmt::format("{} (at most {} in {} s)", str(*rs, "policy"),
                                      int_or(*rs, "max_restarts"), int_or(*rs, "window_s")));
    }
    const auto* autostart = json::find(spec, "autostart");
    rows.emplace_back("Autostart", autostart && autostart->IsTrue() ? "yes" : "no");
    if (const auto* paths = json::find(m, "paths")) {
        rows.emplace_back("Runtime dir", str(*paths, "runtime_dir"));
        rows.emplace_back("QEMU log", str(*paths, "log"));
        rows.emplace_back("Console log", str(*paths, "console_log"));
    }
    std::size_t width = 0;
    for (const auto& [k, v] : rows) {
        width = std::max(width, k.size());
    }
    for (const auto& [k, v] : rows) {
        out(fmt::format("{:>{}}: {}\n", k, width, v));
    }
    return exit_ok;
}

// ---- create, edit, delete --------------------------------------------------------------------

int cmd_create(Context& c)
{
    const std::string& name = names(c)[0];
    json::Document spec;
    if (auto file = c.args.last("spec")) {
        auto text = read_file(*file);
        if (!text) {
            std::fprintf(stderr, "qmachinectl: %s\n", text.error().message.c_str());
            return exit_failed;
        }
        auto parsed = json::parse(*text);
        if (!parsed || !parsed->IsObject()) {
            std::fprintf(stderr, "qmachinectl: %s: not a JSON object%s%s\n", file->c_str(),
                         parsed ? "" : ": ", parsed ? "" : parsed.error().message.c_str());
            return exit_failed;
        }
        spec = std::move(*parsed);
    } else {
        spec.SetObject();
    }
    auto& alloc = spec.GetAllocator();
    if (auto binary = c.args.last("binary")) {
        set_member(spec, "binary", json::Value(binary->c_str(), alloc));
    }
    if (auto machine = c.args.last("machine")) {
        set_member(spec, "machine", json::Value(machine->c_str(), alloc));
    }
    if (auto memory = c.args.last("memory")) {
        auto n = parse_integer("--memory", *memory, 1, 16777216);
        if (!n) {
            return usage_error(n.error().message);
        }
        set_member(spec, "memory_mib", json::Value(static_cast<std::int64_t>(*n)));
    }
    if (auto cpus = c.args.last("cpus")) {
        auto n = parse_integer("--cpus", *cpus, 1, 1024);
        if (!n) {
            return usage_error(n.error().message);
        }
        set_member(spec, "cpus", json::Value(static_cast<std::int64_t>(*n)));
    }
    if (c.args.has("arg")) {
        json::Value args(rapidjson::kArrayType);
        if (auto it = spec.FindMember("args"); it != spec.MemberEnd() && it->value.IsArray()) {
            args.CopyFrom(it->value, alloc);
        }
        for (const auto& arg : c.args.all("arg")) {
            args.PushBack(json::Value(arg.c_str(), alloc), alloc);
        }
        set_member(spec, "args", std::move(args));
    }
    if (c.args.has("autostart")) {
        set_member(spec, "autostart", json::Value(true));
    }
    const std::string body =
        fmt::format(R"({{"name":{},"spec":{}}})", json::quote(name), json::to_string(spec));
    auto a = call_json(c, "create", name, "POST", "/v1/machines", body);
    if (!a.ok()) {
        return a.status;
    }
    if (c.json) {
        print_json(a.doc);
    } else {
        out(fmt::format("Created {} ({}).\n", name, coloured_state(str(a.doc, "state"), c.colour)));
    }
    return exit_ok;
}

// Runs $VISUAL or $EDITOR (vi without either) on `path` through sh, so that an editor with
// arguments ("code -w") works; its exit status (-1 when it could not run).
int run_editor(const std::string& path)
{
    const char* visual = std::getenv("VISUAL");
    const char* editor = std::getenv("EDITOR");
    const std::string command = visual && *visual ? visual : editor && *editor ? editor : "vi";
    const std::string script = command + " \"$1\"";
    std::vector<std::string> argv{"/bin/sh", "-c", script, "qmachinectl-edit", path};
    std::vector<char*> cargv;
    for (auto& s : argv) {
        cargv.push_back(s.data());
    }
    cargv.push_back(nullptr);
    pid_t pid = -1;
    if (::posix_spawn(&pid, "/bin/sh", nullptr, nullptr, cargv.data(), environ) != 0) {
        return -1;
    }
    int st = 0;
    while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

int cmd_edit(Context& c)
{
    const std::string& name = names(c)[0];
    auto got = call_json(c, "edit", name, "GET", machine_path(name));
    if (!got.ok()) {
        return got.status;
    }
    const json::Document& doc = got.doc;
    const json::Value* spec = json::find(doc, "spec");
    if (spec == nullptr) {
        return exit_failed;
    }
    // The spec changes only while there is no QEMU process: say so before the editor opens.
    const std::string state = str(doc, "state");
    if (state != "defined" && state != "stopped" && state != "crashed" && state != "failed") {
        std::fprintf(stderr, "Failed to edit '%s': it is %s; stop it first\n", name.c_str(),
                     state.c_str());
        return exit_failed;
    }
    const auto generation = integer(doc, "generation").value_or(0);
    const std::string before = pretty_json(*spec) + "\n";
    namespace fs = std::filesystem;
    std::string templ =
        (fs::temp_directory_path() / ("qmachinectl-" + name + "-XXXXXX.json")).string();
    const int fd = ::mkstemps(templ.data(), 5);
    if (fd < 0) {
        std::fprintf(stderr, "qmachinectl: cannot create a temporary file: %s\n",
                     std::strerror(errno));
        return exit_failed;
    }
    const bool written =
        ::write(fd, before.data(), before.size()) == static_cast<ssize_t>(before.size());
    ::close(fd);
    if (!written) {
        std::fprintf(stderr, "qmachinectl: cannot write %s\n", templ.c_str());
        fs::remove(templ);
        return exit_failed;
    }
    const int editor = run_editor(templ);
    if (editor != 0) {
        std::fprintf(stderr, "qmachinectl: the editor failed (exit status %d); nothing changed\n",
                     editor);
        fs::remove(templ);
        return exit_failed;
    }
    auto after = read_file(templ);
    if (!after) {
        std::fprintf(stderr, "qmachinectl: %s\n", after.error().message.c_str());
        return exit_failed;
    }
    if (*after == before) {
        fs::remove(templ);
        if (c.json) {
            print_json(doc);
        } else {
            out(fmt::format("{}: nothing changed.\n", name));
        }
        return exit_ok;
    }
    auto put = call_json(c, "edit", name, "PUT", machine_path(name, "/spec"), *after,
                         fmt::format("\"{}\"", generation));
    if (!put.ok()) {
        if (put.response.status == 412) {
            std::fprintf(stderr,
                         "The spec changed while you edited it; run 'qmachinectl edit %s' again.\n",
                         name.c_str());
        }
        std::fprintf(stderr, "Your edit is kept in %s\n", templ.c_str());
        return put.status;
    }
    fs::remove(templ);
    if (c.json) {
        print_json(put.doc);
    } else {
        out(fmt::format("Updated {} (generation {}).\n", name, int_or(put.doc, "generation")));
    }
    return exit_ok;
}

int cmd_delete(Context& c)
{
    int status = exit_ok;
    for (const auto& name : names(c)) {
        auto r = c.client.request("DELETE",
                                  machine_path(name, c.args.has("force") ? "?force=true" : ""));
        if (!r) {
            return unreachable(r.error());
        }
        if (!r->ok()) {
            status = failed("delete", name, *r);
            continue;
        }
        if (c.json) {
            out(fmt::format("{{\"name\": {}, \"deleted\": true}}\n", json::quote(name)));
        } else {
            out(fmt::format("Deleted {}.\n", name));
        }
    }
    return status;
}

// ---- actions ---------------------------------------------------------------------------------

int action(Context& c, std::string_view verb, std::string_view done, std::string body = {})
{
    int status = exit_ok;
    for (const auto& name : names(c)) {
        auto a =
            call_json(c, verb, name, "POST", machine_path(name, "/" + std::string(verb)), body);
        if (a.status == exit_unreachable) {
            return a.status;
        }
        if (!a.ok()) {
            status = a.status;
            continue;
        }
        if (c.json) {
            print_json(a.doc);
        } else {
            out(fmt::format("{} {}: {}.\n", done, name, state_summary(a.doc, c.colour)));
        }
    }
    return status;
}

int cmd_start(Context& c)
{
    return action(c, "start", "Started");
}

// stop --all: every machine with a process, by its own spec, in parallel (POST /v1/stop-all).
int stop_all(Context& c)
{
    if (!c.args.positional.empty() || c.args.last("mode") || c.args.last("timeout")) {
        return usage_error("--all stops every machine by its own spec: no NAME, --mode or "
                           "--timeout with it");
    }
    std::string body;
    if (auto concurrency = c.args.last("concurrency")) {
        auto n = parse_integer("--concurrency", *concurrency, 1, 256);
        if (!n) {
            return usage_error(n.error().message);
        }
        body = fmt::format("{{\"concurrency\":{}}}", *n);
    }
    auto a = call_json(c, "stop", "every machine", "POST", "/v1/stop-all", body);
    if (!a.ok()) {
        return a.status;
    }
    if (c.json) {
        print_json(a.doc);
    }
    int status = exit_ok;
    if (const json::Value* failed = json::find(a.doc, "failed"); failed && failed->IsArray()) {
        for (const auto& f : failed->GetArray()) {
            status = exit_failed;
            std::fprintf(stderr, "qmachinectl: Failed to stop '%s': %s\n", str(f, "name").c_str(),
                         str(f, "detail").c_str());
        }
    }
    if (!c.json) {
        const json::Value* stopped = json::find(a.doc, "stopped");
        const std::size_t n = stopped && stopped->IsArray() ? stopped->Size() : 0;
        out(fmt::format("Stopped {} machine{}.\n", n, n == 1 ? "" : "s"));
    }
    return status;
}

int cmd_stop(Context& c)
{
    if (c.args.has("all")) {
        return stop_all(c);
    }
    if (c.args.positional.empty()) {
        return usage_error("stop needs NAME... or --all");
    }
    if (c.args.last("concurrency")) {
        return usage_error("--concurrency goes with --all");
    }
    std::string body;
    std::vector<std::string> members;
    if (auto mode = c.args.last("mode")) {
        if (*mode != "powerdown" && *mode != "quit") {
            return usage_error(fmt::format("--mode: '{}' is not powerdown or quit", *mode));
        }
        members.push_back(fmt::format("\"mode\":{}", json::quote(*mode)));
    }
    if (auto timeout = c.args.last("timeout")) {
        auto n = parse_integer("--timeout", *timeout, 0, 86400);
        if (!n) {
            return usage_error(n.error().message);
        }
        members.push_back(fmt::format("\"timeout_s\":{}", *n));
    }
    if (!members.empty()) {
        body = "{" + fmt::format("{}", fmt::join(members, ",")) + "}";
    }
    return action(c, "stop", "Stopped", body);
}

int cmd_kill(Context& c)
{
    return action(c, "kill", "Killed");
}
int cmd_pause(Context& c)
{
    return action(c, "pause", "Paused");
}
int cmd_resume(Context& c)
{
    return action(c, "resume", "Resumed");
}
int cmd_restart(Context& c)
{
    return action(c, "restart", "Restarted");
}

// ---- qmp -------------------------------------------------------------------------------------

int cmd_qmp(Context& c)
{
    const std::string& name = names(c)[0];
    const std::string& command = names(c)[1];
    std::string body = fmt::format(R"({{"execute":{})", json::quote(command));
    if (names(c).size() > 2) {
        auto args = json::parse(names(c)[2]);
        if (!args || !args->IsObject()) {
            return usage_error(fmt::format("the arguments of '{}' must be a JSON object, not '{}'",
                                           command, names(c)[2]));
        }
        body += ",\"arguments\":" + json::to_string(*args);
    }
    if (auto timeout = c.args.last("timeout")) {
        auto s = parse_seconds("--timeout", *timeout, 0.001, 3600);
        if (!s) {
            return usage_error(s.error().message);
        }
        body += fmt::format(",\"timeout_s\":{}", *s);
    }
    body += "}";
    auto a = call_json(c, fmt::format("run '{}' on", command), name, "POST",
                       machine_path(name, "/qmp"), body);
    if (!a.ok()) {
        return a.status;
    }
    if (c.json) {
        print_json(a.doc);
    } else if (const auto* ret = json::find(a.doc, "return")) {
        if (!(ret->IsObject() && ret->ObjectEmpty())) {
            print_json(*ret);
        }
    }
    return exit_ok;
}

// ---- events, wait ----------------------------------------------------------------------------

// Prints the stream's messages; with --json each event's JSON on a line of its own.
class EventPrinter
{
public:
    EventPrinter(bool as_json, bool quiet_first_lag)
        : json_(as_json)
        , quiet_first_lag_(quiet_first_lag)
    {}

    void feed(std::string_view bytes)
    {
        for (const auto& m : parser_.feed(bytes)) {
            if (m.event == "lagged") {
                if (!(quiet_first_lag_ && events_ == 0)) {
                    if (json_) {
                        out(fmt::format("{{\"lagged\": {}}}\n", m.data));
                    } else {
                        std::fprintf(stderr, "qmachinectl: events were lost (lagged: %s)\n",
                                     m.data.c_str());
                    }
                }
                continue;
            }
            ++events_;
            if (json_) {
                out(m.data + "\n");
            } else if (auto e = json::parse(m.data)) {
                out(event_line(*e) + "\n");
            } else {
                out(m.data + "\n");
            }
            std::fflush(stdout);
        }
    }

    // stdout is gone (a closed pipe: qmachinectl events -f | head -3).
    bool broken() const { return std::ferror(stdout) != 0; }

private:
    SseParser parser_;
    bool json_;
    bool quiet_first_lag_;
    std::size_t events_ = 0;
};

int cmd_events(Context& c)
{
    std::vector<std::string> query;
    if (auto m = c.args.last("machine")) {
        query.push_back("machine=" + encode(*m));
    }
    for (const auto& e : c.args.all("event")) {
        query.push_back("event=" + encode(e));
    }
    if (auto match = c.args.last("match")) {
        query.push_back("match=" + encode(*match));
    }
    const bool follow = c.args.has("follow");
    std::optional<std::string> since = c.args.last("since");
    if (since) {
        if (auto n = parse_integer("--since", *since, 0, INT64_MAX); !n) {
            return usage_error(n.error().message);
        }
    } else if (!follow) {
        since = "0"; // what the ring holds
    }
    if (since) {
        query.push_back("since=" + *since);
    }
    std::string target = "/v1/events";
    for (std::size_t i = 0; i < query.size(); ++i) {
        target += (i == 0 ? "?" : "&") + query[i];
    }
    EventPrinter printer(c.json, !c.args.last("since").has_value());
    // Ctrl-C (and SIGTERM) end a followed stream cleanly.
    asio::signal_set signals(c.client.io(), SIGINT, SIGTERM);
    signals.async_wait([&](error_code ec, int) {
        if (!ec) {
            c.client.stop();
        }
    });
    // Without --follow: the ring's events come at once after ": subscribed"; a quiet gap ends it.
    const std::optional<std::chrono::milliseconds> idle =
        follow ? std::nullopt : std::optional<std::chrono::milliseconds>(500ms);
    auto r = c.client.stream(
        target,
        [&](std::string_view bytes) {
            printer.feed(bytes);
            if (printer.broken()) {
                c.client.stop();
            }
        },
        idle);
    error_code ignored;
    signals.cancel(ignored);
    if (!r) {
        return unreachable(r.error());
    }
    if (!r->ok()) {
        return failed("read the events", {}, *r);
    }
    return exit_ok;
}

int cmd_wait(Context& c)
{
    const std::string& name = names(c)[0];
    std::vector<std::string> members;
    auto pattern = c.args.last("console");
    if (pattern && names(c).size() > 1) {
        return usage_error("wait takes an EVENT or --console PATTERN, not both");
    }
    if (!pattern && names(c).size() < 2) {
        return usage_error("wait needs an EVENT (or --console PATTERN)");
    }
    if (pattern) {
        members.push_back("\"pattern\":" + json::quote(*pattern));
        if (auto from = c.args.last("from")) {
            auto n = parse_integer("--from", *from, 0, INT64_MAX);
            if (!n) {
                return usage_error(n.error().message);
            }
            members.push_back(fmt::format("\"from\":{}", *n));
        }
    } else {
        if (names(c)[1] != "any") {
            members.push_back("\"event\":" + json::quote(names(c)[1]));
        }
        if (auto match = c.args.last("match")) {
            auto m = json::parse(*match);
            if (!m || !m->IsObject()) {
                return usage_error(fmt::format("--match: '{}' is not a JSON object", *match));
            }
            members.push_back("\"match\":" + json::to_string(*m));
        }
        if (auto since = c.args.last("since")) {
            auto n = parse_integer("--since", *since, 0, INT64_MAX);
            if (!n) {
                return usage_error(n.error().message);
            }
            members.push_back(fmt::format("\"since\":{}", *n));
        }
    }
    if (auto timeout = c.args.last("timeout")) {
        auto s = parse_seconds("--timeout", *timeout, 0, 3600);
        if (!s) {
            return usage_error(s.error().message);
        }
        members.push_back(fmt::format("\"timeout_s\":{}", *s));
    }
    const std::string body = "{" + fmt::format("{}", fmt::join(members, ",")) + "}";
    auto a = call_json(c, "wait on", name, "POST",
                       machine_path(name, pattern ? "/console/wait" : "/events/wait"), body);
    if (!a.ok()) {
        return a.status;
    }
    const auto* timed_out = json::find(a.doc, "timed_out");
    const bool timeout = timed_out && timed_out->IsTrue();
    if (c.json) {
        print_json(a.doc);
    } else if (!timeout) {
        if (pattern) {
            out(str(a.doc, "match", "") + "\n");
        } else if (const auto* e = json::find(a.doc, "event")) {
            out(event_line(*e) + "\n");
        }
    }
    if (timeout) {
        std::fprintf(stderr, "Timed out waiting for %s on '%s'.\n",
                     pattern ? ("'" + *pattern + "'").c_str() : names(c)[1].c_str(), name.c_str());
        return exit_failed;
    }
    return exit_ok;
}

// ---- log, console ----------------------------------------------------------------------------

int cmd_log(Context& c)
{
    const std::string& name = names(c)[0];
    const bool console = c.args.has("console");
    const bool follow = c.args.has("follow");
    std::string query;
    if (auto tail = c.args.last("tail")) {
        auto n = parse_integer("--tail", *tail, 0, 1000000);
        if (!n) {
            return usage_error(n.error().message);
        }
        query = fmt::format("?tail={}", *n);
    }
    if (console && follow) {
        // The console's WebSocket as a watcher: the ring's recent bytes, then the live output.
        ConsoleOptions options;
        options.machine = name;
        options.read_only = true;
        options.banner = false;
        return run_console(c.client, options);
    }
    const std::string target = machine_path(name, console ? "/console/log" : "/log");
    auto r = c.client.request("GET", target + query);
    if (!r) {
        return unreachable(r.error());
    }
    if (!r->ok()) {
        return failed("read the log of", name, *r);
    }
    out(r->body);
    std::fflush(stdout);
    if (!follow) {
        return exit_ok;
    }
    // QEMU's log has no stream: it is polled every half second, printing what is new (the
    // answers are the file's last 1 MiB; log_increment finds where the last one ended).
    std::string previous = r->body;
    bool stop = false;
    asio::signal_set signals(c.client.io(), SIGINT, SIGTERM);
    signals.async_wait([&](error_code ec, int) { stop = !ec; });
    asio::steady_timer timer(c.client.io());
    bool ticked = false; // outlives the wait: a stop leaves it pending until the poll below
    while (!stop) {
        ticked = false;
        timer.expires_after(500ms);
        timer.async_wait([&](error_code) { ticked = true; });
        c.client.io().restart();
        while (!ticked && !stop) {
            c.client.io().run_one();
        }
        if (stop) {
            break;
        }
        auto next = c.client.request("GET", target);
        if (!next) {
            return unreachable(next.error());
        }
        if (!next->ok()) {
            return failed("read the log of", name, *next);
        }
        out(log_increment(previous, next->body));
        std::fflush(stdout);
        if (std::ferror(stdout) != 0) {
            break; // stdout is gone (a closed pipe)
        }
        previous = std::move(next->body);
    }
    timer.cancel();
    error_code ignored;
    signals.cancel(ignored);
    c.client.io().restart();
    c.client.io().poll();
    return exit_ok;
}

int cmd_console(Context& c)
{
    ConsoleOptions options;
    options.machine = names(c)[0];
    options.read_only = c.args.has("read-only");
    if (auto escape = c.args.last("escape")) {
        auto key = parse_escape(*escape);
        if (!key) {
            return usage_error(
                fmt::format("--escape: '{}' is not ^X (a control key) or none", *escape));
        }
        options.escape = *key;
    }
    return run_console(c.client, options);
}

// ---- version ---------------------------------------------------------------------------------

int cmd_version(Context& c)
{
    if (!c.json) {
        out("qmachinectl " QM_VERSION "\n"); // whether the daemon answers or not
    }
    auto a = call_json(c, "ask qmachined for its version", {}, "GET", "/v1/version");
    if (!a.ok()) {
        return a.status;
    }
    if (c.json) {
        json::Document both;
        both.SetObject();
        both.AddMember("qmachinectl", QM_VERSION, both.GetAllocator());
        json::Value daemon;
        daemon.CopyFrom(a.doc, both.GetAllocator());
        both.AddMember("qmachined", std::move(daemon), both.GetAllocator());
        print_json(both);
        return exit_ok;
    }
    std::string text =
        fmt::format("qmachined   {} (API {})\n", str(a.doc, "qmachined"), str(a.doc, "api"));
    if (const auto* qemu = json::find(a.doc, "qemu"); qemu && qemu->IsObject()) {
        text += fmt::format("QEMU        {} ({})\n", str(*qemu, "version"), str(*qemu, "binary"));
    }
    out(text);
    return exit_ok;
}

// ---- the table -------------------------------------------------------------------------------

constexpr std::array<OptionSpec, 7> global_table{{
    {"socket", 0, "PATH", "qmachined's unix socket (default: the daemon's, see below)"},
    {"url", 0, "URL", "qmachined over TCP: http://HOST:PORT (needs the token)"},
    {"token", 0, "TOKEN", "the bearer token for --url"},
    {"token-file", 0, "FILE", "read the bearer token from FILE"},
    {"json", 0, "", "print JSON for scripts instead of text for people"},
    {"help", 'h', "", "show this help"},
    {"version", 0, "", "print qmachinectl's version"},
}};

constexpr std::array<OptionSpec, 1> list_options{{
    {"names", 0, "", "print only the names, one per line"},
}};
constexpr std::array<OptionSpec, 7> create_options{{
    {"spec", 0, "FILE", "the spec as JSON (proto/machine.schema.json); '-' reads stdin"},
    {"binary", 0, "PATH", "the QEMU binary (default qemu-system-x86_64)"},
    {"machine", 0, "TYPE", "QEMU's -machine (q35, pc, none, ...)"},
    {"memory", 0, "MIB", "memory in MiB"},
    {"cpus", 0, "N", "virtual CPUs"},
    {"arg", 0, "ARG", "one more QEMU argument (repeat it: --arg -drive --arg file=...)"},
    {"autostart", 0, "", "start the machine with qmachined"},
}};
constexpr std::array<OptionSpec, 4> stop_options{{
    {"mode", 0, "MODE", "powerdown (the ACPI power button) or quit (QEMU quits at once)"},
    {"timeout", 0, "SECONDS", "how long the graceful part may take before QEMU is killed"},
    {"all", 0, "", "every machine with a process, each by its own spec, in parallel"},
    {"concurrency", 0, "N", "with --all: machines stopped at once (default 16)"},
}};
constexpr std::array<OptionSpec, 1> delete_options{{
    {"force", 'f', "", "kill a running machine first"},
}};
constexpr std::array<OptionSpec, 1> qmp_options{{
    {"timeout", 0, "SECONDS", "how long QEMU may take to answer (default 10)"},
}};
constexpr std::array<OptionSpec, 5> events_options{{
    {"machine", 0, "NAME", "only this machine's events"},
    {"event", 0, "EVENT", "only events of this name (repeat it for several)"},
    {"match", 0, "JSON", "only events that contain this JSON object"},
    {"since", 0, "SEQ", "the events after sequence number SEQ first"},
    {"follow", 'f', "", "go on printing events as they come, until Ctrl-C"},
}};
constexpr std::array<OptionSpec, 5> wait_options{{
    {"match", 0, "JSON", "only an event that contains this JSON object"},
    {"since", 0, "SEQ", "events after SEQ count too (an action's event_seq)"},
    {"timeout", 0, "SECONDS", "how long to wait (default 30)"},
    {"console", 0, "REGEX", "wait for console output that matches REGEX instead of an event"},
    {"from", 0, "OFFSET", "with --console: look from this console offset on (default 0)"},
}};
constexpr std::array<OptionSpec, 3> log_options{{
    {"follow", 'f', "", "go on printing what is added, until Ctrl-C"},
    {"console", 0, "", "the serial console's log instead of QEMU's"},
    {"tail", 'n', "LINES", "only the last LINES lines"},
}};
constexpr std::array<OptionSpec, 2> console_options{{
    {"read-only", 0, "", "only watch: another client may write"},
    {"escape", 'e', "KEY", "the key that leaves, as ^X (default ^]); none: no key"},
}};

constexpr std::size_t any = SIZE_MAX;

const std::array<Command, 18> command_table{{
    {"list", "", 0, 0, "List the machines",
     "A table of every machine: its state and since when, QEMU's pid, CPUs and memory, the "
     "operation in progress.",
     list_options, cmd_list},
    {"show",
     "NAME",
     1,
     1,
     "Show a machine",
     "Everything qmachined knows of the machine: state, process, last stop, spec, files.",
     {},
     cmd_show},
    {"create", "NAME", 1, 1, "Create a machine",
     "Defines a machine (it is not started). The spec comes from --spec, the other options, or "
     "both\n"
     "(the options override the file's fields). Every field left out takes its default.",
     create_options, cmd_create},
    {"edit",
     "NAME",
     1,
     1,
     "Edit a machine's spec in $EDITOR",
     "Opens the spec in $VISUAL or $EDITOR (vi without either) and sends it back when it changed,\n"
     "with the generation it was read at: a change made meanwhile by someone else is not "
     "overwritten\n"
     "(the edit is refused and kept in its temporary file). The machine must not be running.",
     {},
     cmd_edit},
    {"start",
     "NAME...",
     1,
     any,
     "Start machines",
     "Answers once QMP is negotiated: the machine is running.",
     {},
     cmd_start},
    {"stop", "NAME... | --all", 0, any, "Stop machines gracefully",
     "By the spec's shutdown (or --mode and --timeout); QEMU is killed when the graceful part\n"
     "fails. Answers once the process has exited. --all stops every machine with a process,\n"
     "--concurrency at a time, each by its own spec (what qmachined-guests.service does at the\n"
     "host's shutdown).",
     stop_options, cmd_stop},
    {"kill",
     "NAME...",
     1,
     any,
     "Kill QEMU at once",
     "SIGKILL now, whatever is in progress.",
     {},
     cmd_kill},
    {"pause",
     "NAME...",
     1,
     any,
     "Pause the guest's CPUs",
     "QMP stop; answers once QEMU reported it.",
     {},
     cmd_pause},
    {"resume",
     "NAME...",
     1,
     any,
     "Resume the guest's CPUs",
     "QMP cont; answers once QEMU reported it.",
     {},
     cmd_resume},
    {"restart",
     "NAME...",
     1,
     any,
     "Stop, then start machines",
     "A stop (by the spec's shutdown) and a start as one operation.",
     {},
     cmd_restart},
    {"delete", "NAME...", 1, any, "Delete machines",
     "Removes the definition and the runtime files. A machine with a QEMU process is refused\n"
     "unless --force, which kills it first.",
     delete_options, cmd_delete},
    {"qmp", "NAME COMMAND [JSON-ARGS]", 2, 3, "Run a QMP command",
     "Runs COMMAND with the arguments JSON-ARGS (a JSON object) and prints QEMU's answer.\n"
     "Example: qmachinectl qmp web1 query-status\n"
     "         qmachinectl qmp web1 system_powerdown\n"
     "         qmachinectl qmp web1 human-monitor-command '{\"command-line\": \"info mtree\"}'",
     qmp_options, cmd_qmp},
    {"events", "", 0, 0, "Print events",
     "Without --follow: the events qmachined still holds (its last 4096 by default; those after\n"
     "--since), then exits once none came for 0.5 s. With --follow: from now on (or from "
     "--since),\n"
     "until Ctrl-C. One event per line: sequence number, time (UTC), machine, event, data.",
     events_options, cmd_events},
    {"wait", "NAME [EVENT]", 1, 2, "Wait for an event or console output",
     "Waits for the next event named EVENT ('any': any name) of the machine, or with --console "
     "for\n"
     "its console output to match REGEX. Exits 1 when it timed out.\n"
     "Example: qmachinectl wait web1 SHUTDOWN --timeout 60\n"
     "         qmachinectl wait web1 STATE_CHANGED --match '{\"data\": {\"state\": \"stopped\"}}'\n"
     "         qmachinectl wait web1 --console 'login: $' --timeout 120",
     wait_options, cmd_wait},
    {"log", "NAME", 1, 1, "Print QEMU's log or the console log",
     "QEMU's own output (stdout and stderr), or with --console what the guest wrote to its serial\n"
     "console. --follow: QEMU's log is polled every 0.5 s; the console is followed live over its\n"
     "WebSocket (read-only) until it ends or Ctrl-C.",
     log_options, cmd_log},
    {"console", "NAME", 1, 1, "Attach to a machine's serial console",
     "The terminal becomes the machine's serial console (raw mode) until the escape key (Ctrl-],\n"
     "as telnet and virsh; --escape changes it). One client at a time may write; --read-only\n"
     "watches (Ctrl-C leaves). The terminal is restored on every way out.",
     console_options, cmd_console},
    {"version",
     "",
     0,
     0,
     "Print the versions of qmachinectl, qmachined and QEMU",
     "",
     {},
     cmd_version},
    {"help", "[COMMAND]", 0, 1, "Show the help of qmachinectl or of a command", "", {}, nullptr},
}};

std::string option_lines(std::span<const OptionSpec> options)
{
    std::vector<std::string> left;
    std::size_t width = 0;
    for (const auto& o : options) {
        std::string l = o.short_name != 0 ? fmt::format("-{}, --{}", o.short_name, o.name)
                                          : fmt::format("    --{}", o.name);
        if (o.takes_value()) {
            l += " " + std::string(o.value_name);
        }
        width = std::max(width, l.size());
        left.push_back(std::move(l));
    }
    std::string text;
    for (std::size_t i = 0; i < options.size(); ++i) {
        text += fmt::format("  {:<{}}  {}\n", left[i], width, options[i].help);
    }
    return text;
}

} // namespace

std::span<const Command> commands()
{
    return command_table;
}

const Command* find_command(std::string_view name)
{
    for (const auto& c : command_table) {
        if (c.name == name) {
            return &c;
        }
    }
    return nullptr;
}

std::span<const OptionSpec> global_options()
{
    return global_table;
}

std::string program_help()
{
    std::string text = "Usage: qmachinectl [OPTIONS] COMMAND [ARGS...]\n"
                       "\n"
                       "Controls qmachined, the QEMU machine supervisor, over its REST API.\n"
                       "\n"
                       "Commands:\n";
    for (const auto& c : command_table) {
        text += fmt::format("  {:<10} {}\n", c.name, c.summary);
    }
    text += "\nOptions (before or after the command):\n";
    text += option_lines(global_table);
    text +=
        "\n"
        "Without --socket or --url, the socket is the one qmachined uses by default:\n"
        "/run/qmachined/qmachined.sock as root, $XDG_RUNTIME_DIR/qmachined/qmachined.sock for a "
        "user\n"
        "(or the system one when a user's daemon has no socket).\n"
        "\n"
        "Exit status: 0 ok, 1 the operation failed, 2 bad usage, 3 qmachined cannot be reached.\n"
        "'qmachinectl COMMAND --help' shows a command's options.\n";
    return text;
}

std::string command_help(const Command& c)
{
    std::string text = fmt::format("Usage: qmachinectl {}{}{}{}\n\n{}.\n", c.name,
                                   c.options.empty() ? "" : " [OPTIONS]",
                                   c.arguments.empty() ? "" : " ", c.arguments, c.summary);
    if (!c.help.empty()) {
        text += "\n" + std::string(c.help) + "\n";
    }
    if (!c.options.empty()) {
        text += "\nOptions:\n" + option_lines(c.options);
    }
    text +=
        "\nCommon options: --socket PATH, --url URL, --token TOKEN, --token-file FILE, --json.\n";
    return text;
}

} // namespace qm::ctl
