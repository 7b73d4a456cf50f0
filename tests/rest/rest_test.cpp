// SPDX-License-Identifier: GPL-2.0-or-later
// The REST API over the wire: the real qmachined on a temp unix socket (and loopback TCP) with real
// QEMU, driven by curl and a Beast client. Every route and its statuses; bad input, each answered
// with its problem and nothing changed afterwards (machines, state files, the daemon's descriptors
// and children); limits (body, header, slow clients, connections); tokens; shutdown; /metrics; the
// console WebSocket with the test guest (tests/guest/init).
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/asio.hpp"
#include "libmachine/json.hpp"
#include "libmachine/machine/state.hpp"
#include "tests/rest/daemon_fixture.hpp"
#include "tests/rest/exposition.hpp"
#include "tests/rest/http_client.hpp"
#include "tests/rest/websocket_client.hpp"
#include "tests/support/daemon_process.hpp"
#include "tests/support/guest_image.hpp"
#include "tests/support/loop.hpp"
#include "tests/support/qemu_process.hpp"

namespace qm::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// A machine that starts in milliseconds and stops at once (quit: -machine none has nothing that
// would answer the power button).
std::string quick_spec(const std::string& extra = {})
{
    return fmt::format(R"({{"binary": {}, "machine": "none", "console": {{"enabled": false}},
        "shutdown": {{"mode": "quit", "timeout_s": 10}}{}}})",
                       json::quote(QemuProcess::binary()), extra);
}

// A quick machine with a console (-machine none: nothing is ever written on it).
std::string quick_console_spec()
{
    return fmt::format(R"({{"binary": {}, "machine": "none",
        "shutdown": {{"mode": "quit", "timeout_s": 10}}}})",
                       json::quote(QemuProcess::binary()));
}

// The header fields of a WebSocket handshake (RFC 6455 4.1), for requests sent without Beast's
// WebSocket client.
const Headers& websocket_headers()
{
    static const Headers headers{{"Upgrade", "websocket"},
                                 {"Connection", "Upgrade"},
                                 {"Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="},
                                 {"Sec-WebSocket-Version", "13"}};
    return headers;
}

std::string create_body(const std::string& name, const std::string& spec = quick_spec())
{
    return fmt::format(R"({{"name": {}, "spec": {}}})", json::quote(name), spec);
}

// What "nothing changed" compares.
struct Snapshot
{
    std::string machines; // GET /v1/machines
    std::map<std::string, std::string> state_files;
    std::size_t fds = 0;
    std::vector<pid_t> children;
};

class RestTest : public DaemonFixture
{
protected:
    void SetUp() override
    {
        DaemonFixture::SetUp();
        if (HasFatalFailure()) {
            return;
        }
        if (auto why = QemuProcess::unavailable_reason()) {
            GTEST_SKIP() << "no QEMU: " << *why;
        }
        if (start_in_set_up_) {
            ASSERT_NO_FATAL_FAILURE(start_daemon(args_));
            ASSERT_NO_FATAL_FAILURE(wait_version_probe());
        }
    }

    // The daemon asks QEMU for its version once it serves (a child process and a pipe for a
    // moment): snapshots are taken after that.
    void wait_version_probe()
    {
        HttpResponse version;
        ASSERT_TRUE(eventually(
            [&] {
                version = call("GET", "/v1/version");
                const json::Document d = version.json();
                const json::Value* q = json::find(d, "qemu");
                return q != nullptr && q->IsObject();
            },
            10s))
            << version;
        ASSERT_TRUE(eventually([&] { return children_of(daemon_pid()).empty(); }, 10s));
    }

    // One exchange on a new connection, closed afterwards.
    HttpResponse call(const std::string& method, const std::string& target, std::string body = {},
                      const Headers& headers = {})
    {
        HttpConnection c(ioc_, socket_path());
        EXPECT_FALSE(c.error()) << c.error().message();
        HttpResponse r = c.request(method, target, std::move(body), headers);
        EXPECT_NE(r.status, 0) << method << " " << target << ": " << c.error().message();
        c.close();
        return r;
    }

    // curl on the unix socket: `args` go before the URL.
    CurlResult curl(const std::string& method, const std::string& target,
                    std::vector<std::string> args = {})
    {
        std::vector<std::string> all{"--unix-socket", socket_path().string(), "-X", method};
        all.insert(all.end(), args.begin(), args.end());
        all.push_back("http://localhost" + target);
        CurlResult r = run_curl(all);
        EXPECT_EQ(r.status, 0) << "curl " << method << " " << target << ": " << r.err;
        return r;
    }
    // curl with a JSON body.
    CurlResult curl_json(const std::string& method, const std::string& target,
                         const std::string& body)
    {
        return curl(method, target,
                    {"-H", "Content-Type: application/json", "--data-binary", body});
    }

    HttpResponse create(const std::string& name, const std::string& spec = quick_spec())
    {
        HttpResponse r = call("POST", "/v1/machines", create_body(name, spec));
        EXPECT_EQ(r.status, 201) << r;
        return r;
    }

    HttpResponse action(const std::string& name, const std::string& verb, std::string body = {})
    {
        return call("POST", "/v1/machines/" + name + "/" + verb, std::move(body));
    }

    // Creates and starts a quick machine; its pid.
    pid_t running_machine(const std::string& name, const std::string& spec = quick_spec())
    {
        create(name, spec);
        HttpResponse r = action(name, "start");
        EXPECT_EQ(r.status, 200) << r;
        EXPECT_EQ(r.str("state"), "running") << r;
        const auto pid = json::get_int(r.json(), "pid");
        EXPECT_TRUE(pid.has_value()) << r;
        return static_cast<pid_t>(pid.value_or(-1));
    }

    // A spec whose stop waits `timeout_s` for the guest: powerdown, and under -machine none
    // nothing answers the power button.
    static std::string slow_stop_spec(int timeout_s)
    {
        return fmt::format(R"({{"machine": "none", "console": {{"enabled": false}},
            "shutdown": {{"mode": "powerdown", "timeout_s": {}}}}})",
                           timeout_s);
    }

    // Asks for `name`'s stop on a connection of its own and returns once the machine is
    // stopping (nullptr if it does not get there); the answer comes later (done(), take()).
    std::unique_ptr<HttpConnection> stop_in_background(const std::string& name)
    {
        auto c = std::make_unique<HttpConnection>(ioc_, socket_path());
        c->start(HttpConnection::make_request("POST", "/v1/machines/" + name + "/stop"));
        // call() runs the loop, which sends the stop.
        const bool stopping = eventually(
            [&] { return call("GET", "/v1/machines/" + name).str("state") == "stopping"; }, 5s);
        return stopping ? std::move(c) : nullptr;
    }

    // The daemon's descriptors once it holds no REST connection.
    std::size_t quiet_fd_count()
    {
        EXPECT_TRUE(eventually([&] { return unix_connections(socket_path()) == 0; }, 10s))
            << unix_connections(socket_path()) << " REST connections still open";
        return fd_count(daemon_pid());
    }

    Snapshot snapshot()
    {
        Snapshot s;
        HttpResponse r = call("GET", "/v1/machines");
        EXPECT_EQ(r.status, 200) << r;
        s.machines = r.body;
        std::error_code ec;
        for (const auto& e : fs::recursive_directory_iterator(state_, ec)) {
            if (e.is_regular_file()) {
                s.state_files[e.path().lexically_relative(state_).string()] =
                    read_whole_file(e.path());
            }
        }
        s.fds = quiet_fd_count();
        s.children = children_of(daemon_pid());
        return s;
    }

    // Everything as in `before`: the machines, the state files, the daemon's descriptors (its
    // connections closed) and children.
    void expect_unchanged(const Snapshot& before)
    {
        Snapshot now = snapshot();
        EXPECT_EQ(now.machines, before.machines);
        EXPECT_EQ(now.state_files, before.state_files);
        // TCP connections the client closed may still be the daemon's for a moment (the unix
        // ones are waited for above): a leak stays, a closing connection goes.
        eventually([&] { return (now.fds = fd_count(daemon_pid())) == before.fds; }, 10s);
        EXPECT_EQ(now.fds, before.fds) << "the daemon's descriptors changed";
        EXPECT_EQ(now.children, before.children) << "the daemon's children changed";
    }

    asio::io_context ioc_{1};
    std::vector<std::string> args_;
    bool start_in_set_up_ = true;
};

void expect_problem(const HttpResponse& r, int status, const std::string& type,
                    const std::string& field = {})
{
    EXPECT_EQ(r.status, status) << r;
    EXPECT_EQ(r.header("Content-Type"), "application/problem+json") << r;
    EXPECT_EQ(r.problem(), type) << r;
    const json::Document d = r.json();
    EXPECT_EQ(json::get_int(d, "status"), status) << r;
    EXPECT_TRUE(json::get_string(d, "title").has_value()) << r;
    EXPECT_TRUE(json::get_string(d, "detail").has_value()) << r;
    if (!field.empty()) {
        EXPECT_EQ(r.str("field"), field) << r;
    }
}

bool is_null(const HttpResponse& r, std::string_view key)
{
    const json::Document d = r.json();
    const json::Value* v = json::find(d, key);
    return v != nullptr && v->IsNull();
}

std::string stop_reason_kind(const HttpResponse& r)
{
    const json::Document d = r.json();
    const json::Value* reason = json::find(d, "stop_reason");
    if (reason == nullptr || !reason->IsObject()) {
        return {};
    }
    return std::string(json::get_string(*reason, "kind").value_or(""));
}

std::int64_t spec_int(const HttpResponse& r, std::string_view key)
{
    const json::Document d = r.json();
    const json::Value* spec = json::find(d, "spec");
    return spec == nullptr ? -1 : json::get_int(*spec, key).value_or(-1);
}

bool alive(pid_t pid)
{
    return ::kill(pid, 0) == 0;
}

// ---- routes ---------------------------------------------------------------------------------

TEST_F(RestTest, SocketIsPrivateVersionAndHealthAnswer)
{
    struct stat st
    {
    };
    ASSERT_EQ(::stat(socket_path().c_str(), &st), 0);
    EXPECT_TRUE(S_ISSOCK(st.st_mode));
    EXPECT_EQ(st.st_mode & 0777, 0660U);

    // SetUp waited for the QEMU version probe (null until it is done).
    const HttpResponse version = call("GET", "/v1/version");
    EXPECT_EQ(version.status, 200);
    EXPECT_EQ(version.header("Content-Type"), "application/json");
    EXPECT_EQ(version.str("qmachined"), "0.1.0");
    EXPECT_EQ(version.str("api"), "v1");
    {
        const json::Document d = version.json();
        EXPECT_STREQ(d["qemu"]["binary"].GetString(), "qemu-system-x86_64");
        EXPECT_NE(std::string(d["qemu"]["version"].GetString()).find('.'), std::string::npos)
            << version;
        EXPECT_TRUE(std::string(d["qemu"]["text"].GetString()).starts_with("QEMU emulator version"))
            << version;
    }

    const HttpResponse health = call("GET", "/v1/health");
    EXPECT_EQ(health.status, 200) << health;
    EXPECT_EQ(health.str("status"), "ok");
    EXPECT_EQ(json::get_int(health.json(), "machines"), 0);

    // The same with curl.
    const CurlResult c = curl("GET", "/v1/health");
    EXPECT_EQ(c.response.status, 200) << c.response;
    EXPECT_EQ(c.response.str("status"), "ok");
    EXPECT_EQ(c.response.header("Content-Type"), "application/json");
}

TEST_F(RestTest, CreateGetListAndExists)
{
    // curl creates: 201, Location, ETag, the machine with its defaults filled.
    const CurlResult made = curl_json("POST", "/v1/machines", create_body("vm1"));
    const HttpResponse& r = made.response;
    ASSERT_EQ(r.status, 201) << r;
    EXPECT_EQ(r.header("Location"), "/v1/machines/vm1");
    EXPECT_EQ(r.header("ETag"), "\"1\"");
    EXPECT_EQ(r.header("Content-Type"), "application/json");
    EXPECT_EQ(r.str("name"), "vm1");
    EXPECT_EQ(r.str("state"), "defined");
    EXPECT_EQ(json::get_int(r.json(), "generation"), 1);
    EXPECT_TRUE(is_null(r, "pid")) << r;
    EXPECT_TRUE(is_null(r, "stop_reason")) << r;
    EXPECT_EQ(spec_int(r, "cpus"), 1) << r;
    EXPECT_EQ(r.str("uuid").size(), 36U) << r;
    EXPECT_TRUE(fs::exists(state_ / "vm1.json"));

    // Beast creates another; the spec is optional (every default).
    HttpResponse vm0 = call("POST", "/v1/machines", R"({"name": "vm0"})");
    ASSERT_EQ(vm0.status, 201) << vm0;
    EXPECT_EQ(vm0.header("Location"), "/v1/machines/vm0");
    {
        const json::Document d = vm0.json();
        EXPECT_STREQ(d["spec"]["shutdown"]["mode"].GetString(), "powerdown");
        EXPECT_EQ(d["spec"]["shutdown"]["timeout_s"].GetInt(), 30);
    }

    const HttpResponse got = call("GET", "/v1/machines/vm1");
    EXPECT_EQ(got.status, 200) << got;
    EXPECT_EQ(got.header("ETag"), "\"1\"");
    EXPECT_EQ(got.str("uuid"), r.str("uuid"));
    EXPECT_EQ(got.str("state"), "defined");

    const CurlResult list = curl("GET", "/v1/machines");
    ASSERT_EQ(list.response.status, 200) << list.response;
    {
        const json::Document d = list.response.json();
        ASSERT_TRUE(d.IsObject() && d.HasMember("machines") && d["machines"].IsArray())
            << list.response;
        ASSERT_EQ(d["machines"].Size(), 2U);
        EXPECT_STREQ(d["machines"][0]["name"].GetString(), "vm0"); // sorted by name
        EXPECT_STREQ(d["machines"][1]["name"].GetString(), "vm1");
    }

    // An existing name: 409 Exists, whatever the spec; nothing changed.
    const Snapshot before = snapshot();
    expect_problem(call("POST", "/v1/machines", create_body("vm1", R"({"cpus": 2})")), 409,
                   "Exists");
    expect_problem(curl_json("POST", "/v1/machines", create_body("vm0")).response, 409, "Exists");
    expect_problem(call("GET", "/v1/machines/nope"), 404, "NoSuchMachine");
    expect_unchanged(before);
}

TEST_F(RestTest, ActionsAnswerWithTheResultingState)
{
    const pid_t first = running_machine("vm");
    ASSERT_GT(first, 0);
    EXPECT_EQ(children_of(daemon_pid()), std::vector<pid_t>{first});
    {
        const HttpResponse got = call("GET", "/v1/machines/vm");
        EXPECT_EQ(got.str("state"), "running");
        EXPECT_EQ(got.str("qemu_status"), "running");
    }

    HttpResponse r = action("vm", "pause");
    EXPECT_EQ(r.status, 200) << r;
    EXPECT_EQ(r.str("state"), "paused") << r;
    EXPECT_EQ(r.str("qemu_status"), "paused") << r;
    r = action("vm", "resume", "{}");
    EXPECT_EQ(r.status, 200) << r;
    EXPECT_EQ(r.str("state"), "running") << r;

    // Restart: a new QEMU, the old one gone.
    r = action("vm", "restart");
    ASSERT_EQ(r.status, 200) << r;
    EXPECT_EQ(r.str("state"), "running") << r;
    const auto second = static_cast<pid_t>(json::get_int(r.json(), "pid").value_or(-1));
    EXPECT_GT(second, 0);
    EXPECT_NE(second, first);
    EXPECT_TRUE(eventually([&] { return !alive(first); }, 10s));
    EXPECT_EQ(children_of(daemon_pid()), std::vector<pid_t>{second});

    // Stop (curl): answered once QEMU has exited, with the reason.
    const CurlResult stopped = curl("POST", "/v1/machines/vm/stop");
    r = stopped.response;
    EXPECT_EQ(r.status, 200) << r;
    EXPECT_EQ(r.str("state"), "stopped") << r;
    EXPECT_TRUE(is_null(r, "pid")) << r;
    EXPECT_EQ(stop_reason_kind(r), "host-quit") << r;
    EXPECT_EQ(json::get_int(r.json(), "exit_code"), 0) << r;
    EXPECT_FALSE(alive(second));
    EXPECT_EQ(children_of(daemon_pid()), std::vector<pid_t>{});

    // Kill (a body of {} is fine too).
    const pid_t third =
        static_cast<pid_t>(json::get_int(action("vm", "start").json(), "pid").value_or(-1));
    ASSERT_GT(third, 0);
    r = action("vm", "kill", "{}");
    EXPECT_EQ(r.status, 200) << r;
    EXPECT_EQ(r.str("state"), "stopped") << r;
    EXPECT_EQ(stop_reason_kind(r), "host-kill") << r;
    EXPECT_FALSE(alive(third));

    // Stop's body: a mode and a timeout.
    ASSERT_EQ(action("vm", "start").status, 200);
    r = action("vm", "stop", R"({"mode": "quit", "timeout_s": 5})");
    EXPECT_EQ(r.status, 200) << r;
    EXPECT_EQ(r.str("state"), "stopped") << r;
    EXPECT_EQ(stop_reason_kind(r), "host-quit") << r;
}

TEST_F(RestTest, ActionsInEffectAreNoopsAndConflictsAre409)
{
    // proto/states.md: an action already in effect succeeds at once and changes nothing.
    auto expect_noops = [&](std::initializer_list<const char*> verbs, const std::string& state) {
        const Snapshot before = snapshot();
        for (const char* verb : verbs) {
            const HttpResponse r = action("vm", verb);
            EXPECT_EQ(r.status, 200) << verb << ": " << r;
            EXPECT_EQ(r.str("state"), state) << verb << ": " << r;
        }
        expect_unchanged(before);
    };
    running_machine("vm");
    expect_noops({"start", "resume"}, "running");
    ASSERT_EQ(action("vm", "pause").str("state"), "paused");
    expect_noops({"pause", "start"}, "paused");
    ASSERT_EQ(action("vm", "stop").str("state"), "stopped");
    expect_noops({"stop", "kill"}, "stopped");

    const Snapshot before = snapshot();
    // Without a process: pause, resume and QMP conflict; unknown machines are 404.
    expect_problem(action("vm", "pause"), 409, "StateConflict");
    expect_problem(action("vm", "resume"), 409, "StateConflict");
    expect_problem(call("POST", "/v1/machines/vm/qmp", R"({"execute": "query-status"})"), 409,
                   "StateConflict");
    for (const char* verb : {"start", "stop", "kill", "pause", "resume", "restart"}) {
        expect_problem(action("nope", verb), 404, "NoSuchMachine");
    }
    expect_unchanged(before);

    // While a stop waits for the guest, other operations conflict; kill preempts it.
    running_machine("slow", slow_stop_spec(20));
    const auto stopper = stop_in_background("slow");
    ASSERT_TRUE(stopper);
    for (const char* verb : {"start", "pause", "resume", "restart"}) {
        const HttpResponse r = action("slow", verb);
        expect_problem(r, 409, "StateConflict");
        EXPECT_NE(r.str("detail").find("stop"), std::string::npos) << r;
    }
    expect_problem(call("PUT", "/v1/machines/slow/spec", quick_spec()), 409, "StateConflict");
    expect_problem(call("DELETE", "/v1/machines/slow"), 409, "StateConflict");
    EXPECT_FALSE(stopper->done());
    const auto t0 = Clock::now();
    const HttpResponse killed = action("slow", "kill");
    EXPECT_EQ(killed.status, 200) << killed;
    EXPECT_EQ(killed.str("state"), "stopped") << killed;
    EXPECT_EQ(stop_reason_kind(killed), "host-kill") << killed;
    // The preempted stop is answered too, at once.
    ASSERT_TRUE(run_until(
        ioc_, [&] { return stopper->done(); }, 5s));
    const HttpResponse preempted = stopper->take();
    EXPECT_EQ(preempted.status, 200) << preempted;
    EXPECT_EQ(preempted.str("state"), "stopped") << preempted;
    EXPECT_EQ(stop_reason_kind(preempted), "host-kill") << preempted;
    EXPECT_LT(Clock::now() - t0, 5s);
    EXPECT_EQ(call("GET", "/v1/machines/slow").str("state"), "stopped");
    stopper->close();
}

TEST_F(RestTest, BadActionBodiesChangeNothing)
{
    running_machine("vm");
    const Snapshot before = snapshot();
    expect_problem(action("vm", "stop", R"({"mode": "gently"})"), 400, "InvalidArgument", "mode");
    expect_problem(action("vm", "stop", R"({"mode": 1})"), 400, "InvalidArgument", "mode");
    expect_problem(action("vm", "stop", R"({"timeout_s": "5"})"), 400, "InvalidArgument",
                   "timeout_s");
    expect_problem(action("vm", "stop", R"({"timeout_s": -1})"), 400, "InvalidArgument",
                   "timeout_s");
    expect_problem(action("vm", "stop", R"({"timeout_s": 86401})"), 400, "InvalidArgument",
                   "timeout_s");
    expect_problem(action("vm", "stop", R"({"force": true})"), 400, "InvalidArgument", "force");
    expect_problem(action("vm", "stop", R"({"mode": "quit")"), 400, "InvalidArgument");
    expect_problem(action("vm", "pause", R"({"now": true})"), 400, "InvalidArgument", "now");
    expect_problem(action("vm", "kill", "[]"), 400, "InvalidArgument");
    expect_problem(action("vm", "restart", "null"), 400, "InvalidArgument");
    expect_problem(curl("POST", "/v1/machines/vm/kill", {"-d", "{}"}).response, 415,
                   "UnsupportedMediaType");
    expect_unchanged(before);
}

TEST_F(RestTest, QmpPassthroughAndQmpErrors)
{
    running_machine("vm");
    HttpResponse r = call("POST", "/v1/machines/vm/qmp", R"({"execute": "query-status"})");
    ASSERT_EQ(r.status, 200) << r;
    {
        const json::Document d = r.json();
        ASSERT_TRUE(d.IsObject() && d.HasMember("return")) << r;
        EXPECT_STREQ(d["return"]["status"].GetString(), "running");
        EXPECT_TRUE(d.HasMember("event_seq") && d["event_seq"].IsUint64()) << r;
    }
    // With arguments and a timeout, through curl (human-monitor-command, which this test used,
    // is denied by the QMP policy: QmpPolicyDeniesOverTheWire).
    const CurlResult qom = curl_json(
        "POST", "/v1/machines/vm/qmp",
        R"({"execute": "qom-get", "arguments": {"path": "/machine", "property": "type"},
            "timeout_s": 5})");
    ASSERT_EQ(qom.response.status, 200) << qom.response;
    {
        const json::Document d = qom.response.json();
        ASSERT_TRUE(d.IsObject() && d.HasMember("return") && d["return"].IsString())
            << qom.response;
        EXPECT_STREQ(d["return"].GetString(), "none-machine");
    }

    // QEMU's error: 422 with its class and description.
    const Snapshot before = snapshot();
    r = call("POST", "/v1/machines/vm/qmp", R"({"execute": "no-such-command"})");
    expect_problem(r, 422, "QmpError");
    EXPECT_EQ(r.str("class"), "CommandNotFound") << r;
    EXPECT_NE(r.str("desc").find("no-such-command"), std::string::npos) << r;
    r = call("POST", "/v1/machines/vm/qmp", R"({"execute": "qom-get", "arguments": {"frob": 1}})");
    expect_problem(r, 422, "QmpError");
    EXPECT_EQ(r.str("class"), "GenericError") << r;

    // Bad requests never reach QEMU.
    const std::string qmp = "/v1/machines/vm/qmp";
    expect_problem(call("POST", qmp, "{}"), 400, "InvalidArgument", "execute");
    expect_problem(call("POST", qmp), 400, "InvalidArgument", "execute");
    expect_problem(call("POST", qmp, R"({"execute": 5})"), 400, "InvalidArgument", "execute");
    expect_problem(call("POST", qmp, R"({"execute": ""})"), 400, "InvalidArgument", "execute");
    expect_problem(call("POST", qmp, fmt::format(R"({{"execute": "{}"}})", std::string(129, 'q'))),
                   400, "InvalidArgument", "execute");
    expect_problem(call("POST", qmp, R"({"execute": "query-status", "arguments": [1]})"), 400,
                   "InvalidArgument", "arguments");
    expect_problem(call("POST", qmp, R"({"execute": "query-status", "timeout_s": 0})"), 400,
                   "InvalidArgument", "timeout_s");
    expect_problem(call("POST", qmp, R"({"execute": "query-status", "timeout_s": 3601})"), 400,
                   "InvalidArgument", "timeout_s");
    expect_problem(call("POST", qmp, R"({"execute": "query-status", "id": 1})"), 400,
                   "InvalidArgument", "id");
    expect_problem(call("POST", "/v1/machines/nope/qmp", R"({"execute": "query-status"})"), 404,
                   "NoSuchMachine");
    expect_unchanged(before);

    // No process: 409.
    ASSERT_EQ(action("vm", "stop").status, 200);
    expect_problem(call("POST", qmp, R"({"execute": "query-status"})"), 409, "StateConflict");
}

// The default QMP policy over the wire: denied commands are 403 Forbidden before QEMU (or the
// machine) is looked at; everything else passes.
TEST_F(RestTest, QmpPolicyDeniesOverTheWire)
{
    running_machine("vm");
    const std::string qmp = "/v1/machines/vm/qmp";
    const Snapshot before = snapshot();
    HttpResponse r = call("POST", qmp,
                          R"({"execute": "human-monitor-command",
                              "arguments": {"command-line": "info version"}})");
    expect_problem(r, 403, "Forbidden");
    EXPECT_EQ(r.str("type"), "urn:qmachined:error:Forbidden") << r;
    EXPECT_EQ(r.str("title"), "Forbidden by policy") << r;
    EXPECT_EQ(r.str("detail"), "QMP command 'human-monitor-command' is denied by qmachined's "
                               "policy (qmp-allow lifts it)")
        << r;
    expect_problem(call("POST", qmp, R"({"execute": "getfd", "arguments": {"fdname": "x"}})"),
                   403, "Forbidden");
    expect_problem(call("POST", qmp, R"({"execute": "migrate", "arguments": {"uri": "exec:id"}})"),
                   403, "Forbidden");
    // Whatever the machine: the policy does not depend on it.
    expect_problem(call("POST", "/v1/machines/nope/qmp", R"({"execute": "human-monitor-command"})"),
                   403, "Forbidden");
    expect_unchanged(before);

    // What the policy lets through still works.
    r = call("POST", qmp, R"({"execute": "query-status"})");
    ASSERT_EQ(r.status, 200) << r;
    const json::Document status = r.json();
    EXPECT_STREQ(status["return"]["status"].GetString(), "running");
    // migrate to something other than exec: reaches QEMU (which refuses this one).
    r = call("POST", qmp, R"({"execute": "migrate", "arguments": {"uri": "frob:x"}})");
    expect_problem(r, 422, "QmpError");
}

// How often `text` occurs in `s`.
std::size_t occurrences(const std::string& s, const std::string& text)
{
    std::size_t n = 0;
    for (std::size_t at = s.find(text); at != std::string::npos; at = s.find(text, at + 1)) {
        ++n;
    }
    return n;
}

// Every mutating call is one audit line in the daemon's log once it completed, naming the caller
// (this process, from SO_PEERCRED); reads are not audited.
TEST_F(RestTest, MutatingCallsAreAuditedOnce)
{
    const std::string caller = fmt::format(R"(caller="uid={} pid={}")", ::geteuid(), ::getpid());
    const auto expect_once = [&](const std::string& line) {
        ASSERT_TRUE(daemon().wait_for_output(line, 10s)) << line << "\n" << daemon_output();
        EXPECT_EQ(occurrences(daemon_output(), line), 1u) << line << "\n" << daemon_output();
    };
    create("vm");
    expect_once("audit: op=create machine=vm result=ok " + caller);
    ASSERT_EQ(action("vm", "start").status, 200);
    expect_once("audit: op=start machine=vm result=ok " + caller);
    expect_problem(call("POST", "/v1/machines/vm/qmp", R"({"execute": "human-monitor-command"})"),
                   403, "Forbidden");
    expect_once("audit: op=qmp:human-monitor-command machine=vm result=Forbidden " + caller);
    ASSERT_EQ(call("POST", "/v1/machines/vm/qmp", R"({"execute": "query-status"})").status, 200);
    expect_once("audit: op=qmp:query-status machine=vm result=ok " + caller);
    expect_problem(call("DELETE", "/v1/machines/vm"), 409, "StateConflict");
    expect_once("audit: op=delete machine=vm result=StateConflict " + caller);
    expect_problem(call("POST", "/v1/machines", create_body("bad name")), 400, "InvalidArgument");
    expect_once(R"(audit: op=create machine="bad name" result=InvalidArgument )" + caller);
    expect_problem(action("nope", "kill"), 404, "NoSuchMachine");
    expect_once("audit: op=kill machine=nope result=NoSuchMachine " + caller);

    // Reads change nothing and are not audited.
    ASSERT_EQ(call("GET", "/v1/machines").status, 200);
    ASSERT_EQ(call("GET", "/v1/machines/vm").status, 200);
    ASSERT_EQ(call("GET", "/v1/machines/vm/log").status, 200);
    ASSERT_EQ(call("GET", "/v1/health").status, 200);
    ASSERT_EQ(action("vm", "stop").status, 200);
    expect_once("audit: op=stop machine=vm result=ok " + caller);
    EXPECT_EQ(occurrences(daemon_output(), "audit: "), 8u) << daemon_output();
}

TEST_F(RestTest, PutSpecNeedsTheGenerationAndAStoppedMachine)
{
    create("vm");
    const std::string target = "/v1/machines/vm/spec";
    HttpResponse r =
        call("PUT", target, quick_spec(R"(, "memory_mib": 64)"), {{"If-Match", "\"1\""}});
    ASSERT_EQ(r.status, 200) << r;
    EXPECT_EQ(json::get_int(r.json(), "generation"), 2) << r;
    EXPECT_EQ(r.header("ETag"), "\"2\"");
    EXPECT_EQ(spec_int(r, "memory_mib"), 64) << r;
    {
        // Written to the state directory.
        auto stored = json::parse(read_whole_file(state_ / "vm.json"));
        ASSERT_TRUE(stored);
        EXPECT_EQ(json::get_int(*stored, "generation"), 2);
        const json::Value* spec = json::find(*stored, "spec");
        ASSERT_NE(spec, nullptr);
        EXPECT_EQ(json::get_int(*spec, "memory_mib"), 64);
    }

    // Bare digits (curl users type them).
    const CurlResult bare = curl("PUT", target,
                                 {"-H", "Content-Type: application/json", "-H", "If-Match: 2",
                                  "--data-binary", quick_spec(R"(, "memory_mib": 96)")});
    ASSERT_EQ(bare.response.status, 200) << bare.response;
    EXPECT_EQ(json::get_int(bare.response.json(), "generation"), 3);

    // A stale or malformed generation, a bad spec: nothing changes.
    Snapshot before = snapshot();
    expect_problem(
        call("PUT", target, quick_spec(R"(, "memory_mib": 128)"), {{"If-Match", "\"2\""}}), 412,
        "StaleGeneration");
    expect_problem(
        call("PUT", target, quick_spec(R"(, "memory_mib": 128)"), {{"If-Match", "\"9\""}}), 412,
        "StaleGeneration");
    // RFC 9110 13.1.1: If-Match compares strongly; a weak tag never matches.
    expect_problem(call("PUT", target, quick_spec(), {{"If-Match", "W/\"3\""}}), 412,
                   "StaleGeneration");
    expect_problem(call("PUT", target, quick_spec(), {{"If-Match", "\"abc\""}}), 400,
                   "InvalidArgument");
    expect_problem(call("PUT", target, R"({"cpus": "two"})", {{"If-Match", "\"3\""}}), 400,
                   "InvalidArgument", "spec.cpus");
    expect_problem(call("PUT", target, R"({"console": {"frob": 1}})"), 400, "InvalidArgument",
                   "spec.console.frob");
    expect_problem(call("PUT", target, R"({"args": ["-m", "-qmp"]})"), 400, "InvalidArgument",
                   "spec.args[1]");
    expect_problem(call("PUT", target, "[]"), 400, "InvalidArgument");
    expect_problem(call("PUT", target), 400, "InvalidArgument");
    expect_problem(call("PUT", target, "{\"cpus\": "), 400, "InvalidArgument");
    expect_problem(call("PUT", "/v1/machines/nope/spec", quick_spec()), 404, "NoSuchMachine");
    expect_unchanged(before);

    // While it runs: 409, with or without If-Match.
    ASSERT_EQ(action("vm", "start").status, 200);
    before = snapshot();
    expect_problem(call("PUT", target, quick_spec(), {{"If-Match", "\"3\""}}), 409,
                   "StateConflict");
    expect_problem(call("PUT", target, quick_spec(), {{"If-Match", "*"}}), 409, "StateConflict");
    expect_unchanged(before);
}

TEST_F(RestTest, DeleteNeedsForceWhileRunning)
{
    const pid_t pid = running_machine("vm");
    create("idle");
    Snapshot before = snapshot();
    expect_problem(call("DELETE", "/v1/machines/vm"), 409, "StateConflict");
    expect_problem(call("DELETE", "/v1/machines/vm?force=false"), 409, "StateConflict");
    expect_problem(call("DELETE", "/v1/machines/vm?force=maybe"), 400, "InvalidArgument", "force");
    expect_problem(call("DELETE", "/v1/machines/vm?force=true&force=true"), 400, "InvalidArgument",
                   "force");
    expect_problem(call("DELETE", "/v1/machines/nope?force=true"), 404, "NoSuchMachine");
    expect_unchanged(before);
    EXPECT_TRUE(alive(pid));

    // Forced: 204, no body; QEMU gone with the definition.
    const CurlResult forced = curl("DELETE", "/v1/machines/vm?force=true");
    EXPECT_EQ(forced.response.status, 204) << forced.response;
    EXPECT_EQ(forced.response.body, "");
    EXPECT_FALSE(forced.response.has_header("Content-Length")) << forced.response;
    EXPECT_TRUE(eventually([&] { return !alive(pid); }, 10s));
    EXPECT_FALSE(fs::exists(state_ / "vm.json"));
    expect_problem(call("GET", "/v1/machines/vm"), 404, "NoSuchMachine");

    // A machine without a process needs no force.
    const HttpResponse r = call("DELETE", "/v1/machines/idle");
    EXPECT_EQ(r.status, 204) << r;
    EXPECT_EQ(r.body, "");
    EXPECT_FALSE(fs::exists(state_ / "idle.json"));
    const HttpResponse list = call("GET", "/v1/machines");
    EXPECT_EQ(list.body, R"({"machines":[]})");
    EXPECT_EQ(children_of(daemon_pid()), std::vector<pid_t>{});
}

TEST_F(RestTest, LogAndConsoleLogWithTail)
{
    // QEMU traces each QMP command it runs on stderr: its log grows a line per command.
    running_machine("vm", quick_spec(R"(, "args": ["-trace", "monitor_qmp_cmd_in_band"])"));
    for (int i = 0; i < 3; ++i) {
        ASSERT_EQ(call("POST", "/v1/machines/vm/qmp", R"({"execute": "query-status"})").status,
                  200);
    }
    const HttpResponse all = call("GET", "/v1/machines/vm/log");
    ASSERT_EQ(all.status, 200) << all;
    EXPECT_EQ(all.header("Content-Type"), "text/plain; charset=utf-8");
    const auto lines = std::count(all.body.begin(), all.body.end(), '\n');
    EXPECT_GE(lines, 4) << all.body;

    const CurlResult two = curl("GET", "/v1/machines/vm/log?tail=2");
    ASSERT_EQ(two.response.status, 200) << two.response;
    EXPECT_EQ(std::count(two.response.body.begin(), two.response.body.end(), '\n'), 2)
        << two.response.body;
    EXPECT_TRUE(all.body.ends_with(two.response.body));
    EXPECT_TRUE(two.response.body.starts_with("monitor_qmp_cmd_in_band")) << two.response.body;
    EXPECT_EQ(call("GET", "/v1/machines/vm/log?tail=0").body, "");
    EXPECT_EQ(call("GET", "/v1/machines/vm/log?tail=1000000").body, all.body);

    // The console log: the console is off, so it is empty, with or without tail.
    HttpResponse console = call("GET", "/v1/machines/vm/console/log?tail=5");
    EXPECT_EQ(console.status, 200) << console;
    EXPECT_EQ(console.header("Content-Type"), "text/plain; charset=utf-8");
    EXPECT_EQ(console.body, "");
    console = curl("GET", "/v1/machines/vm/console/log").response;
    EXPECT_EQ(console.status, 200) << console;

    const Snapshot before = snapshot();
    for (const char* bad : {"-1", "x", "1000001", "", "1.5", "99999999999999999999999"}) {
        expect_problem(call("GET", std::string("/v1/machines/vm/log?tail=") + bad), 400,
                       "InvalidArgument", "tail");
        expect_problem(call("GET", std::string("/v1/machines/vm/console/log?tail=") + bad), 400,
                       "InvalidArgument", "tail");
    }
    expect_problem(call("GET", "/v1/machines/vm/log?lines=3"), 400, "InvalidArgument", "lines");
    expect_problem(call("GET", "/v1/machines/nope/log"), 404, "NoSuchMachine");
    expect_problem(call("GET", "/v1/machines/nope/console/log"), 404, "NoSuchMachine");
    expect_unchanged(before);
}

// ---- the console WebSocket ------------------------------------------------------------------

TEST_F(RestTest, ConsoleWebSocketExchangesALineWithTheGuestASecondWriterIsRefused)
{
    ASSERT_EQ(guest_image().error, "") << "the test guest cannot be built";
    // It answers "echo TEXT" with "qmtest: TEXT".
    create("guest", guest_spec());
    ASSERT_EQ(action("guest", "start").status, 200);
    {
        // Booted: its /init said so (the wait may take a TCG boot's time, more than call()'s).
        HttpConnection c(ioc_, socket_path());
        const HttpResponse ready =
            c.request("POST", "/v1/machines/guest/console/wait",
                      R"({"pattern": "qmtest: ready", "timeout_s": 120})", {}, 130s);
        ASSERT_EQ(ready.status, 200) << ready;
        ASSERT_EQ(ready.str("match"), "qmtest: ready") << ready;
    }

    // A reader (the default) gets the ring first: the boot's last words.
    WebSocketClient reader(ioc_, socket_path());
    ASSERT_TRUE(reader.open("/v1/machines/guest/console")) << reader.error().message();
    EXPECT_EQ(reader.response().result_int(), 101);
    ASSERT_TRUE(reader.wait_output("qmtest: ready", 10s)) << reader.output();
    WebSocketClient writer(ioc_, socket_path());
    ASSERT_TRUE(writer.open("/v1/machines/guest/console?mode=write")) << writer.error().message();
    ASSERT_TRUE(writer.wait_output("qmtest: ready", 10s)) << writer.output();

    // A second writer is upgraded, then closed with 4409 and the documented reason.
    WebSocketClient second(ioc_, socket_path());
    ASSERT_TRUE(second.open("/v1/machines/guest/console?mode=write")) << second.error().message();
    ASSERT_TRUE(second.wait_end(10s));
    EXPECT_EQ(second.close_code(), 4409);
    EXPECT_EQ(second.close_reason(), "another client is writing to the console of 'guest'");
    EXPECT_EQ(second.output(), "") << "a refused writer gets no output";

    // The writer's line reaches the guest; the answer reaches the writer and the reader.
    const std::size_t reader_from = reader.output().size();
    const std::size_t writer_from = writer.output().size();
    ASSERT_TRUE(writer.send("echo hello-ws\n"));
    EXPECT_TRUE(writer.wait_output("qmtest: hello-ws", 30s, writer_from)) << writer.output();
    EXPECT_TRUE(reader.wait_output("qmtest: hello-ws", 30s, reader_from)) << reader.output();
    EXPECT_TRUE(reader.notices().empty()) << reader.notices().front();
    EXPECT_FALSE(second.wait_output("qmtest: hello-ws", 100ms));

    // A reader that writes is closed with 1008; its line never reaches the guest.
    ASSERT_TRUE(reader.send("echo from-reader\n"));
    ASSERT_TRUE(reader.wait_end(10s));
    EXPECT_EQ(reader.close_code(), 1008);
    EXPECT_NE(reader.close_reason().find("?mode=write"), std::string::npos) << reader.close_reason();

    // The writer leaves: its place is free for the next one.
    EXPECT_TRUE(writer.close());
    WebSocketClient next(ioc_, socket_path());
    ASSERT_TRUE(next.open("/v1/machines/guest/console?mode=write")) << next.error().message();
    ASSERT_TRUE(next.send("echo again\n"));
    EXPECT_TRUE(next.wait_output("qmtest: again", 30s)) << next.output();
    EXPECT_FALSE(next.ended()) << next.close_code() << " " << next.close_reason();
    EXPECT_EQ(next.output().find("qmtest: from-reader"), std::string::npos) << next.output();
    WebSocketClient watcher(ioc_, socket_path());
    ASSERT_TRUE(watcher.open("/v1/machines/guest/console"));

    // The machine stops (quit: at once): every client is closed with 1000 and the reason.
    const HttpResponse stopped = action("guest", "stop", R"({"mode": "quit"})");
    EXPECT_EQ(stopped.status, 200) << stopped;
    for (WebSocketClient* c : {&next, &watcher}) {
        ASSERT_TRUE(c->wait_end(10s));
        EXPECT_EQ(c->close_code(), 1000);
        EXPECT_EQ(c->close_reason(), "console ended: the machine is stopping");
    }
    expect_problem(call("GET", "/v1/machines/guest/console", {}, websocket_headers()), 409,
                   "StateConflict");
}

TEST_F(RestTest, ConsoleWebSocketRefusalsAreProblems)
{
    create("quiet"); // no console
    create("idle", quick_console_spec());
    running_machine("vm", quick_console_spec());
    const Snapshot before = snapshot();
    const std::string target = "/v1/machines/vm/console";

    // Without the upgrade: 426, naming the protocol.
    for (const HttpResponse& r : {call("GET", target), curl("GET", target).response}) {
        expect_problem(r, 426, "UpgradeRequired");
        EXPECT_EQ(r.header("Upgrade"), "websocket") << r;
    }
    expect_problem(call("GET", "/v1/machines/nope/console", {}, websocket_headers()), 404,
                   "NoSuchMachine");
    expect_problem(call("GET", "/v1/machines/nope/console"), 404, "NoSuchMachine");
    expect_problem(call("GET", "/v1/machines/a%2Fb/console", {}, websocket_headers()), 400,
                   "InvalidArgument", "name");
    expect_problem(call("GET", "/v1/machines/quiet/console", {}, websocket_headers()), 409,
                   "StateConflict");
    expect_problem(call("GET", "/v1/machines/idle/console", {}, websocket_headers()), 409,
                   "StateConflict");
    expect_problem(call("GET", target + "?mode=all", {}, websocket_headers()), 400,
                   "InvalidArgument", "mode");
    expect_problem(call("GET", target + "?from=0", {}, websocket_headers()), 400,
                   "InvalidArgument", "from");
    {
        // Handshakes Beast refuses get the API's problems too.
        Headers no_key = websocket_headers();
        no_key.erase(no_key.begin() + 2);
        expect_problem(call("GET", target, {}, no_key), 400, "InvalidArgument");
        Headers version = websocket_headers();
        version.back().second = "8";
        const HttpResponse r = call("GET", target, {}, version);
        expect_problem(r, 426, "UpgradeRequired");
        EXPECT_EQ(r.header("Sec-WebSocket-Version"), "13") << r;
    }
    {
        // Beast's client sees the refusal as such, with the problem.
        WebSocketClient c(ioc_, socket_path());
        EXPECT_FALSE(c.open("/v1/machines/nope/console"));
        EXPECT_EQ(c.response().result_int(), 404);
    }
    {
        // A silent console: the client gets nothing, and stays until it leaves.
        WebSocketClient c(ioc_, socket_path());
        ASSERT_TRUE(c.open(target)) << c.error().message();
        EXPECT_FALSE(c.wait_output("x", 200ms));
        EXPECT_FALSE(c.ended());
        EXPECT_TRUE(c.close());
    }
    expect_unchanged(before);
}

// ---- bad input ------------------------------------------------------------------------------

TEST_F(RestTest, BadCreateBodiesChangeNothing)
{
    create("vm");
    const Snapshot before = snapshot();
    struct Case
    {
        std::string body;
        std::string field; // "" when the problem names none
    };
    const std::vector<Case> cases{
        {R"({"name": "x",)", ""},                            // malformed
        {R"({"name": "x"} {})", ""},                         // trailing data
        {"\xff\xfe", ""},                                    // not UTF-8 JSON at all
        {R"([{"name": "x"}])", ""},                          // not an object
        {R"("x")", ""},                                      //
        {std::string(200, '[') + std::string(200, ']'), ""}, // deeper than the parser allows
        {R"({"spec": {}})", "name"},                         // missing name
        {R"({"name": 5})", "name"},                          // wrong types
        {R"({"name": null})", "name"},                       //
        {R"({"name": ["x"]})", "name"},                      //
        {R"({"name": "x", "spec": []})", "spec"},            //
        {R"({"name": "x", "spec": "none"})", "spec"},        //
        {R"({"name": "x", "spec": {"cpus": "two"}})", "spec.cpus"},
        {R"({"name": "x", "spec": {"cpus": 0}})", "spec.cpus"},
        {R"({"name": "x", "spec": {"console": {"enabled": 1}}})", "spec.console.enabled"},
        {R"({"name": "x", "frob": 1})", "frob"}, // unknown fields
        {R"({"name": "x", "spec": {"frob": 1}})", "spec.frob"},
        {R"({"name": "x", "spec": {"console": {"frob": 1}}})", "spec.console.frob"},
        {R"({"name": "x", "spec": {"args": ["-m", "-qmp"]}})", "spec.args[1]"},
        {R"({"name": ""})", "name"}, // bad names
        {R"({"name": "a/b"})", "name"},
        {R"({"name": ".."})", "name"},
        {R"({"name": "."})", "name"},
        {R"({"name": "-x"})", "name"},
        {R"({"name": "a\u0000b"})", "name"},
        {R"({"name": "a b"})", "name"},
        {R"({"name": "vm\n"})", "name"},
        {R"({"name": "\u00e9t\u00e9"})", "name"},
        {fmt::format(R"({{"name": "{}"}})", std::string(65, 'a')), "name"},
    };
    for (const auto& c : cases) {
        SCOPED_TRACE(c.body.substr(0, 80));
        expect_problem(call("POST", "/v1/machines", c.body), 400, "InvalidArgument", c.field);
    }
    // A few through curl too.
    expect_problem(curl_json("POST", "/v1/machines", R"({"name": "x",)").response, 400,
                   "InvalidArgument");
    expect_problem(curl_json("POST", "/v1/machines", R"({"name": "x", "frob": 1})").response, 400,
                   "InvalidArgument", "frob");
    expect_problem(curl_json("POST", "/v1/machines", R"({"spec": {}})").response, 400,
                   "InvalidArgument", "name");
    expect_unchanged(before);

    // 64 characters are fine.
    create(std::string(64, 'a'));
}

TEST_F(RestTest, BadNamesInThePathChangeNothing)
{
    running_machine("vm");
    const Snapshot before = snapshot();
    const std::vector<std::string> names{
        "a%2Fb", "%2F", "..",    "%2e%2e", "%2E%2E", ".",   "%2e",   "..%2F..",
        "a%00b", "%00", "vm%00", "a%20b",  "%C3%A9", "-vm", "vm%0A", std::string(65, 'a')};
    for (const auto& name : names) {
        SCOPED_TRACE(name);
        const std::string base = "/v1/machines/" + name;
        expect_problem(call("GET", base), 400, "InvalidArgument", "name");
        expect_problem(call("DELETE", base + "?force=true"), 400, "InvalidArgument", "name");
        expect_problem(call("PUT", base + "/spec", quick_spec()), 400, "InvalidArgument", "name");
        expect_problem(call("GET", base + "/log"), 400, "InvalidArgument", "name");
        expect_problem(call("GET", base + "/console/log"), 400, "InvalidArgument", "name");
        for (const char* verb : {"start", "stop", "kill", "pause", "resume", "restart"}) {
            expect_problem(action(name, verb), 400, "InvalidArgument", "name");
        }
        expect_problem(call("POST", base + "/qmp", R"({"execute": "quit"})"), 400,
                       "InvalidArgument", "name");
        expect_problem(curl("GET", base).response, 400, "InvalidArgument", "name");
        expect_problem(curl("POST", base + "/kill").response, 400, "InvalidArgument", "name");
    }
    // A raw '/' splits the path: no such route. A malformed escape: 400.
    expect_problem(call("GET", "/v1/machines/a/b"), 404, "NotFound");
    expect_problem(call("GET", "/v1/machines/../machines/vm/x"), 404, "NotFound");
    expect_problem(call("GET", "/v1/machines/vm%2"), 400, "InvalidArgument");
    expect_problem(call("GET", "/v1/machines/vm%zz"), 400, "InvalidArgument");
    // 64 characters are a name, just not a known one.
    expect_problem(call("GET", "/v1/machines/" + std::string(64, 'a')), 404, "NoSuchMachine");
    expect_unchanged(before);
    // The escaped name of a real machine is that machine.
    EXPECT_EQ(call("GET", "/v1/machines/%76%6d").str("name"), "vm");
}

TEST_F(RestTest, BodiesThatAreNotJsonAre415)
{
    create("vm");
    const Snapshot before = snapshot();
    const std::string body = create_body("x");
    expect_problem(call("POST", "/v1/machines", body, {{"Content-Type", "text/plain"}}), 415,
                   "UnsupportedMediaType");
    expect_problem(
        call("POST", "/v1/machines", body, {{"Content-Type", "application/x-www-form-urlencoded"}}),
        415, "UnsupportedMediaType");
    expect_problem(call("POST", "/v1/machines", body, {{"Content-Type", "application/jsonx"}}), 415,
                   "UnsupportedMediaType");
    {
        // No Content-Type at all.
        auto req = HttpConnection::make_request("POST", "/v1/machines", body);
        req.erase(http::field::content_type);
        HttpConnection c(ioc_, socket_path());
        expect_problem(c.send(std::move(req)), 415, "UnsupportedMediaType");
    }
    expect_problem(curl("POST", "/v1/machines", {"-d", body}).response, 415,
                   "UnsupportedMediaType");
    expect_problem(
        call("PUT", "/v1/machines/vm/spec", quick_spec(), {{"Content-Type", "text/plain"}}), 415,
        "UnsupportedMediaType");
    expect_problem(call("POST", "/v1/machines/vm/qmp", R"({"execute": "query-status"})",
                        {{"Content-Type", "application/xml"}}),
                   415, "UnsupportedMediaType");
    expect_problem(call("POST", "/v1/machines/vm/stop", "{}", {{"Content-Type", "text/json"}}), 415,
                   "UnsupportedMediaType");
    expect_unchanged(before);

    // Parameters and case do not matter.
    const HttpResponse r =
        call("POST", "/v1/machines", body, {{"Content-Type", "Application/JSON; charset=utf-8"}});
    EXPECT_EQ(r.status, 201) << r;
}

TEST_F(RestTest, TenMebibyteBodiesAre413)
{
    create("vm");
    const Snapshot before = snapshot();
    constexpr std::size_t ten_mib = 10 * 1024 * 1024;
    const fs::path big = root_ / "big.json";
    {
        std::string s = R"({"name": "big", "spec": {"args": [")";
        s.append(ten_mib - s.size() - 6, 'x');
        s += "\"]}}";
        s += "  ";
        ASSERT_EQ(s.size(), ten_mib);
        write_whole_file(big, s);
    }
    const std::string data = "@" + big.string();
    const std::vector<std::string> json_type{"-H", "Content-Type: application/json"};

    // curl as it is (it sends "Expect: 100-continue" for a body this large): refused before the
    // body is sent.
    auto with = [&](std::vector<std::string> extra) {
        std::vector<std::string> args = json_type;
        args.insert(args.end(), extra.begin(), extra.end());
        args.emplace_back("--data-binary");
        args.push_back(data);
        return curl("POST", "/v1/machines", args).response;
    };
    HttpResponse r = with({});
    expect_problem(r, 413, "PayloadTooLarge");
    EXPECT_EQ(r.header("Connection"), "close");
    expect_problem(with({"-H", "Expect:"}), 413, "PayloadTooLarge");
    expect_problem(with({"-H", "Transfer-Encoding: chunked"}), 413, "PayloadTooLarge");
    expect_problem(with({"-H", "Transfer-Encoding: chunked", "-H", "Expect:"}), 413,
                   "PayloadTooLarge");
    expect_problem(curl("PUT", "/v1/machines/vm/spec",
                        {"-H", "Content-Type: application/json", "--data-binary", data})
                       .response,
                   413, "PayloadTooLarge");

    const std::string head = "POST /v1/machines HTTP/1.1\r\nHost: x\r\n"
                             "Content-Type: application/json\r\n";
    {
        // Beast: a Content-Length over the limit is refused at once, with or without Expect,
        // without waiting for the body.
        for (const char* expect : {"", "Expect: 100-continue\r\n"}) {
            HttpConnection c(ioc_, socket_path());
            ASSERT_FALSE(
                c.write_raw(fmt::format("{}Content-Length: {}\r\n{}\r\n", head, ten_mib, expect)));
            const auto t0 = Clock::now();
            r = c.read_response(5s);
            expect_problem(r, 413, "PayloadTooLarge");
            EXPECT_LT(Clock::now() - t0, 2s);
            EXPECT_TRUE(c.closed_by_peer(5s));
        }
    }
    {
        // Beast: chunked without a length. The answer comes once the limit is passed, without
        // waiting for the end of the body; then the connection is closed (after a while of
        // reading and dropping what the client still sends: RFC 9112 9.6).
        HttpConnection c(ioc_, socket_path());
        ASSERT_FALSE(c.write_raw(head + "Transfer-Encoding: chunked\r\n\r\n"));
        const std::string chunk = fmt::format("10000\r\n{}\r\n", std::string(0x10000, ' '));
        for (int i = 0; i < 20; ++i) { // 1.25 MiB
            ASSERT_FALSE(c.write_raw(chunk));
        }
        const auto t0 = Clock::now();
        r = c.read_response(5s);
        expect_problem(r, 413, "PayloadTooLarge");
        EXPECT_LT(Clock::now() - t0, 1s);
        EXPECT_TRUE(c.closed_by_peer(5s));
    }
    expect_unchanged(before);
    // A body just under the limit is read (and refused for what it says).
    std::string under = R"({"name": "x", "frob": ")";
    under.append(1024 * 1024 - under.size() - 2, 'y');
    under += "\"}";
    expect_problem(call("POST", "/v1/machines", under), 400, "InvalidArgument", "frob");
    expect_unchanged(before);
}

TEST_F(RestTest, HeaderFloodsAre431)
{
    const Snapshot before = snapshot();
    auto raw = [&](const std::string& request) {
        HttpConnection c(ioc_, socket_path());
        c.write_raw(request); // the server may close before all of it is written
        HttpResponse r = c.read_response(5s);
        EXPECT_TRUE(c.closed_by_peer(5s));
        return r;
    };
    std::string many = "GET /v1/health HTTP/1.1\r\nHost: x\r\n";
    for (int i = 0; i < 2000; ++i) {
        many += fmt::format("X-Flood-{}: {}\r\n", i, std::string(40, 'v'));
    }
    expect_problem(raw(many + "\r\n"), 431, "HeaderFieldsTooLarge");
    expect_problem(raw("GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Huge: " +
                       std::string(64 * 1024, 'h') + "\r\n\r\n"),
                   431, "HeaderFieldsTooLarge");
    expect_problem(raw("GET /v1/machines/" + std::string(32 * 1024, 'n') + " HTTP/1.1\r\n\r\n"),
                   431, "HeaderFieldsTooLarge");
    // Without the end of the header: refused as soon as the limit is passed.
    expect_problem(raw(many), 431, "HeaderFieldsTooLarge");
    {
        std::vector<std::string> args;
        for (int i = 0; i < 400; ++i) {
            args.emplace_back("-H");
            args.push_back(fmt::format("X-Flood-{}: {}", i, std::string(60, 'v')));
        }
        expect_problem(curl("GET", "/v1/health", args).response, 431, "HeaderFieldsTooLarge");
    }
    expect_unchanged(before);

    // A header well under the limit is fine.
    Headers some;
    for (int i = 0; i < 50; ++i) {
        some.emplace_back(fmt::format("X-Some-{}", i), std::string(100, 's'));
    }
    EXPECT_EQ(call("GET", "/v1/health", {}, some).status, 200);
}

TEST_F(RestTest, UnknownRoutesMethodsAndQueryParameters)
{
    create("vm");
    const Snapshot before = snapshot();
    for (const char* target :
         {"/", "/v1", "/v1/", "/v2/machines", "/v1/machine", "/v1/machines/vm/frob",
          "/v1/machines/vm/consoles", "/v1/machines/vm/start/now", "/v1/version/x", "/V1/health",
          "/v1/machines/vm/log/x", "/v1//machines", "/v1/metrics", "/metrics/x"}) {
        SCOPED_TRACE(target);
        expect_problem(call("GET", target), 404, "NotFound");
        expect_problem(call("POST", target, "{}"), 404, "NotFound");
    }
    struct Case
    {
        const char* method;
        const char* target;
        const char* allow;
    };
    for (const Case& c : std::vector<Case>{
             {"DELETE", "/v1/machines", "GET, POST"},
             {"PUT", "/v1/machines", "GET, POST"},
             {"PATCH", "/v1/machines/vm", "GET, DELETE"},
             {"POST", "/v1/machines/vm", "GET, DELETE"},
             {"GET", "/v1/machines/vm/start", "POST"},
             {"DELETE", "/v1/machines/vm/qmp", "POST"},
             {"POST", "/v1/version", "GET"},
             {"DELETE", "/v1/health", "GET"},
             {"GET", "/v1/machines/vm/spec", "PUT"},
             {"POST", "/v1/machines/vm/log", "GET"},
             {"POST", "/v1/machines/vm/console", "GET"},
             {"OPTIONS", "/v1/machines", "GET, POST"},
             {"FROB", "/v1/health", "GET"},
             {"POST", "/metrics", "GET"},
             {"DELETE", "/metrics", "GET"},
         }) {
        SCOPED_TRACE(std::string(c.method) + " " + c.target);
        const HttpResponse r = call(c.method, c.target);
        expect_problem(r, 405, "MethodNotAllowed");
        EXPECT_EQ(r.header("Allow"), c.allow);
    }
    {
        // HEAD is not served either (and the answer has no body).
        const CurlResult head = curl("HEAD", "/v1/health", {"--head"});
        EXPECT_EQ(head.response.status, 405) << head.response;
        EXPECT_EQ(head.response.header("Allow"), "GET");
    }
    const HttpResponse curl405 = curl("DELETE", "/v1/version").response;
    expect_problem(curl405, 405, "MethodNotAllowed");
    EXPECT_EQ(curl405.header("Allow"), "GET");

    for (const char* target :
         {"/v1/machines?x=1", "/v1/health?verbose", "/v1/version?v=2", "/metrics?x",
          "/v1/machines/vm?tail=1", "/v1/machines/vm/log?force=true"}) {
        SCOPED_TRACE(target);
        const HttpResponse r = call("GET", target);
        expect_problem(r, 400, "InvalidArgument");
        EXPECT_FALSE(r.str("field").empty()) << r;
    }
    expect_problem(call("GET", "/v1/machines?x=1"), 400, "InvalidArgument", "x");
    expect_problem(call("POST", "/v1/machines/vm/start?force=true"), 400, "InvalidArgument",
                   "force");
    expect_problem(call("GET", "/v1/machines?%zz=1"), 400, "InvalidArgument");
    expect_problem(curl("GET", "/v1/machines?x=1").response, 400, "InvalidArgument", "x");
    expect_unchanged(before);
}

// ---- metrics --------------------------------------------------------------------------------

// A GET /metrics answer read by the strict reader (tests/rest/exposition.hpp), with what qmachined
// promises beyond the format: its content type, names under qmachined_, counters in _total.
Exposition read_metrics(const HttpResponse& r)
{
    EXPECT_EQ(r.status, 200) << r;
    EXPECT_EQ(r.header("Content-Type"), "text/plain; version=0.0.4; charset=utf-8");
    Exposition e = parse_exposition(r.body);
    EXPECT_TRUE(e.errors.empty()) << testing::PrintToString(e.errors) << "\n" << r.body;
    for (const auto& [name, family] : e.families) {
        EXPECT_TRUE(name.starts_with("qmachined_")) << name;
        EXPECT_TRUE(family.type != "counter" || name.ends_with("_total")) << name;
    }
    return e;
}

TEST_F(RestTest, MetricsParseAndTheirCountersMove)
{
    const HttpResponse version = call("GET", "/v1/version");
    const Exposition before = read_metrics(call("GET", "/metrics"));
    // Every family docs/rest.md lists (the HTTP ones exist already: SetUp asked for the version).
    for (const auto& [name, type] : std::vector<std::pair<std::string, std::string>>{
             {"qmachined_machines", "gauge"},
             {"qmachined_machine_restarts_total", "counter"},
             {"qmachined_qmp_commands_total", "counter"},
             {"qmachined_qmp_command_duration_seconds", "histogram"},
             {"qmachined_events_total", "counter"},
             {"qmachined_events_dropped_total", "counter"},
             {"qmachined_event_subscribers", "gauge"},
             {"qmachined_http_requests_total", "counter"},
             {"qmachined_http_request_duration_seconds", "histogram"},
             {"qmachined_http_connections", "gauge"},
             {"qmachined_start_time_seconds", "gauge"},
             {"qmachined_build_info", "gauge"},
         }) {
        ASSERT_TRUE(before.families.contains(name)) << name;
        EXPECT_EQ(before.families.at(name).type, type) << name;
        EXPECT_FALSE(before.families.at(name).help.empty()) << name;
    }
    // Every state, zeros included; every QMP result.
    for (MachineState state : machine_states()) {
        EXPECT_EQ(before.value("qmachined_machines", {{"state", std::string(to_string(state))}}), 0)
            << to_string(state);
    }
    for (const char* result : {"ok", "error", "timeout"}) {
        EXPECT_EQ(before.value("qmachined_qmp_commands_total", {{"result", result}}), 0) << result;
    }
    EXPECT_GE(before.value_or_zero("qmachined_http_connections"), 1) << "the scrape's own";
    EXPECT_EQ(before.value("qmachined_event_subscribers"), 0);
    EXPECT_EQ(before.value("qmachined_build_info", {{"version", version.str("qmachined")}}), 1);
    const double now =
        std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    const double started = before.value_or_zero("qmachined_start_time_seconds");
    EXPECT_LE(started, now);
    EXPECT_GT(started, now - 120);

    // A machine created and started; QMP passthrough: one answer, one QEMU error.
    running_machine("vm");
    const std::string qmp = "/v1/machines/vm/qmp";
    const HttpResponse status = call("POST", qmp, R"({"execute": "query-status"})");
    ASSERT_EQ(status.status, 200) << status;
    expect_problem(call("POST", qmp, R"({"execute": "no-such-command"})"), 422, "QmpError");
    // Not sent: the policy refuses it before QEMU sees it.
    expect_problem(call("POST", qmp,
                        R"({"execute": "human-monitor-command",
                            "arguments": {"command-line": "info version"}})"),
                   403, "Forbidden");
    expect_problem(call("GET", "/v1/nope"), 404, "NotFound");

    const Exposition after = read_metrics(call("GET", "/metrics"));
    auto moved = [&](const std::string& name, const MetricLabels& labels = {}) {
        return after.value_or_zero(name, labels) - before.value_or_zero(name, labels);
    };
    EXPECT_EQ(moved("qmachined_machines", {{"state", "running"}}), 1);
    EXPECT_EQ(moved("qmachined_machines", {{"state", "defined"}}), 0) << "created, then started";
    EXPECT_EQ(moved("qmachined_qmp_commands_total", {{"result", "ok"}}), 1);
    EXPECT_EQ(moved("qmachined_qmp_commands_total", {{"result", "error"}}), 1);
    EXPECT_EQ(moved("qmachined_qmp_commands_total", {{"result", "timeout"}}), 0);
    EXPECT_EQ(moved("qmachined_qmp_command_duration_seconds_count"), 2);
    EXPECT_GT(moved("qmachined_qmp_command_duration_seconds_sum"), 0);
    EXPECT_EQ(moved("qmachined_qmp_command_duration_seconds_bucket", {{"le", "+Inf"}}), 2);
    const std::string requests = "qmachined_http_requests_total";
    EXPECT_EQ(moved(requests, {{"route", "machines.create"}, {"status", "201"}}), 1);
    EXPECT_EQ(moved(requests, {{"route", "machine.start"}, {"status", "200"}}), 1);
    EXPECT_EQ(moved(requests, {{"route", "machine.qmp"}, {"status", "200"}}), 1);
    EXPECT_EQ(moved(requests, {{"route", "machine.qmp"}, {"status", "422"}}), 1);
    EXPECT_EQ(moved(requests, {{"route", "machine.qmp"}, {"status", "403"}}), 1);
    EXPECT_EQ(moved(requests, {{"route", "unmatched"}, {"status", "404"}}), 1);
    // The first scrape is counted once it was answered: this one does not count itself yet.
    EXPECT_EQ(moved(requests, {{"route", "metrics"}, {"status", "200"}}), 1);
    const std::string latencies = "qmachined_http_request_duration_seconds_count";
    EXPECT_EQ(moved(latencies, {{"route", "machine.qmp"}}), 3);
    EXPECT_EQ(moved(latencies, {{"route", "machine.start"}}), 1);
    // Every event got the next sequence number, and the QMP answer said which one was last.
    const auto seq = json::get_int(status.json(), "event_seq");
    ASSERT_TRUE(seq.has_value()) << status;
    EXPECT_EQ(after.value("qmachined_events_total"), static_cast<double>(*seq));
    EXPECT_GE(moved("qmachined_events_total"), 3)
        << "MACHINE_CREATED and the start's STATE_CHANGEDs";
    EXPECT_EQ(moved("qmachined_events_dropped_total"), 0);

    // A restart by the policy: the QEMU killed from outside comes back, counted once.
    const pid_t pid = running_machine(
        "r", quick_spec(R"(, "restart": {"policy": "on-failure", "max_restarts": 3, "window_s": 600,
                                         "backoff_initial_ms": 0, "backoff_max_ms": 0})"));
    ASSERT_GT(pid, 0);
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    HttpResponse r;
    ASSERT_TRUE(eventually(
        [&] {
            r = call("GET", "/v1/machines/r");
            return r.str("state") == "running" && json::get_int(r.json(), "restart_count") == 1;
        },
        20s))
        << r;
    const Exposition restarted = read_metrics(call("GET", "/metrics"));
    EXPECT_EQ(restarted.value_or_zero("qmachined_machine_restarts_total") -
                  after.value_or_zero("qmachined_machine_restarts_total"),
              1);
    EXPECT_EQ(restarted.value("qmachined_machines", {{"state", "running"}}),
              after.value_or_zero("qmachined_machines", {{"state", "running"}}) + 1);
    EXPECT_EQ(restarted.value("qmachined_machines", {{"state", "crashed"}}), 0);
}

// ---- connections ----------------------------------------------------------------------------

TEST_F(RestTest, KeepAliveServesManyRequestsOnOneConnection)
{
    {
        HttpConnection c(ioc_, socket_path());
        const std::vector<std::pair<std::string, std::string>> requests{
            {"GET", "/v1/version"},          {"GET", "/v1/health"},
            {"GET", "/v1/nothing"},          {"POST", "/v1/machines"},
            {"GET", "/v1/machines/vm"},      {"POST", "/v1/machines/vm/start"},
            {"POST", "/v1/machines/vm/qmp"}, {"POST", "/v1/machines/vm/stop"},
            {"DELETE", "/v1/machines/vm"},   {"GET", "/v1/machines"},
        };
        const std::vector<int> statuses{200, 200, 404, 201, 200, 200, 200, 200, 204, 200};
        for (std::size_t i = 0; i < requests.size(); ++i) {
            const auto& [method, target] = requests[i];
            std::string body;
            if (target == "/v1/machines" && method == "POST") {
                body = create_body("vm");
            } else if (target.ends_with("/qmp")) {
                body = R"({"execute": "query-status"})";
            }
            const HttpResponse r = c.request(method, target, body);
            EXPECT_EQ(r.status, statuses[i]) << method << " " << target << ": " << r;
            EXPECT_TRUE(r.keep_alive) << method << " " << target;
            EXPECT_EQ(unix_connections(socket_path()), 1U);
        }
        // Two requests in one write (pipelined): two answers, in order.
        ASSERT_FALSE(c.write_raw("GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
                                 "GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n"));
        EXPECT_EQ(c.read_response(5s).status, 200);
        EXPECT_EQ(c.read_response(5s).status, 404);
        c.close();
    }
    {
        // HTTP/1.0 without keep-alive: answered, then closed by the server.
        HttpConnection c(ioc_, socket_path());
        const HttpResponse r =
            c.send(HttpConnection::make_request("GET", "/v1/health", {}, {}, 10));
        EXPECT_EQ(r.status, 200) << r;
        EXPECT_EQ(r.version, 10U);
        EXPECT_FALSE(r.keep_alive);
        EXPECT_TRUE(c.closed_by_peer(5s));
    }
    {
        // HTTP/1.0 asking for keep-alive: kept.
        HttpConnection c(ioc_, socket_path());
        for (int i = 0; i < 3; ++i) {
            const HttpResponse r = c.send(HttpConnection::make_request(
                "GET", "/v1/health", {}, {{"Connection", "keep-alive"}}, 10));
            EXPECT_EQ(r.status, 200) << r;
            EXPECT_TRUE(r.keep_alive);
        }
        c.close();
    }
    {
        // HTTP/1.1 with "Connection: close": closed after the answer.
        HttpConnection c(ioc_, socket_path());
        const HttpResponse r = c.request("GET", "/v1/health", {}, {{"Connection", "close"}});
        EXPECT_EQ(r.status, 200) << r;
        EXPECT_FALSE(r.keep_alive);
        EXPECT_TRUE(c.closed_by_peer(5s));
    }
    {
        // A request that is not HTTP: 400, closed.
        HttpConnection c(ioc_, socket_path());
        ASSERT_FALSE(c.write_raw("HELLO\r\n\r\n"));
        expect_problem(c.read_response(5s), 400, "InvalidArgument");
        EXPECT_TRUE(c.closed_by_peer(5s));
    }
    EXPECT_TRUE(eventually([&] { return unix_connections(socket_path()) == 0; }, 5s));
}

TEST_F(RestTest, AmbiguousMessageFramingIsRefused)
{
    // A request whose body length cannot be known must not be answered as if it had none: what
    // follows would be read as the next request (request smuggling). RFC 9112 6.1 and 6.3: 400
    // (or 501 for an unknown coding) and close.
    const Snapshot before = snapshot();
    const std::string smuggled = "GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n";
    for (const char* framing :
         {"Transfer-Encoding: gzip\r\n", "Transfer-Encoding: chunked, gzip\r\n",
          "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
          "Content-Length: 2\r\nContent-Length: 3\r\n", "Content-Length: -1\r\n"}) {
        SCOPED_TRACE(framing);
        HttpConnection c(ioc_, socket_path());
        ASSERT_FALSE(c.write_raw(fmt::format("POST /v1/machines HTTP/1.1\r\nHost: x\r\n"
                                             "Content-Type: application/json\r\n{}\r\n{}",
                                             framing, smuggled)));
        const HttpResponse r = c.read_response(5s);
        EXPECT_TRUE(r.status == 400 || r.status == 501) << r;
        EXPECT_FALSE(r.keep_alive) << r;
        std::string after;
        EXPECT_TRUE(c.closed_by_peer(2s, &after));
        EXPECT_EQ(after.find("HTTP/1.1 404"), std::string::npos)
            << "the smuggled request was served";
    }
    expect_unchanged(before);
}

TEST_F(RestTest, FiveHundredConcurrentKeepAliveConnections)
{
    constexpr std::size_t n = 500;
    // Our end of every connection is a descriptor too.
    rlimit rl{};
    ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &rl), 0);
    if (rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &rl), 0);
    }
    ASSERT_GE(rl.rlim_cur, n + 100) << "RLIMIT_NOFILE is too low for this test";
    running_machine("vm");
    const Snapshot before = snapshot();

    std::vector<std::unique_ptr<HttpConnection>> conns;
    for (std::size_t i = 0; i < n; ++i) {
        conns.push_back(std::make_unique<HttpConnection>(ioc_, socket_path()));
        ASSERT_FALSE(conns.back()->error()) << i << ": " << conns.back()->error().message();
    }
    // All open at once before any request.
    ASSERT_TRUE(eventually([&] { return unix_connections(socket_path()) == n; }, 10s))
        << unix_connections(socket_path());
    EXPECT_EQ(fd_count(daemon_pid()), before.fds + n);

    // One request on each, all in flight together; mixed routes.
    const auto t0 = Clock::now();
    for (std::size_t i = 0; i < n; ++i) {
        switch (i % 3) {
        case 0:
            conns[i]->start(HttpConnection::make_request("GET", "/v1/health"));
            break;
        case 1:
            conns[i]->start(HttpConnection::make_request("GET", "/v1/machines/vm"));
            break;
        default:
            conns[i]->start(HttpConnection::make_request("POST", "/v1/machines/vm/qmp",
                                                         R"({"execute": "query-status"})"));
            break;
        }
    }
    ASSERT_TRUE(run_until(
        ioc_,
        [&] { return std::all_of(conns.begin(), conns.end(), [](auto& c) { return c->done(); }); },
        30s));
    const auto elapsed = Clock::now() - t0;
    std::size_t ok = 0;
    for (auto& c : conns) {
        const HttpResponse r = c->take();
        ok += r.status == 200 && r.keep_alive ? 1 : 0;
    }
    EXPECT_EQ(ok, n);
    // Still all open (kept alive).
    EXPECT_EQ(unix_connections(socket_path()), n);
    RecordProperty(
        "ms_for_500_requests",
        static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(elapsed).count()));
    for (auto& c : conns) {
        c->close();
    }
    conns.clear();
    expect_unchanged(before);
}

// ---- shutdown -------------------------------------------------------------------------------

TEST_F(RestTest, RequestsDuringShutdownAre503)
{
    running_machine("slow", slow_stop_spec(3));
    create("idle");
    // A stop already asked for when the daemon is told to go: it is answered before the exit.
    const auto stopper = stop_in_background("slow");
    ASSERT_TRUE(stopper);
    const auto t0 = Clock::now();
    daemon().signal(SIGTERM);

    HttpResponse health;
    ASSERT_TRUE(eventually(
        [&] {
            health = call("GET", "/v1/health");
            return health.status == 503;
        },
        2s))
        << health;
    expect_problem(health, 503, "ShuttingDown");
    EXPECT_FALSE(health.keep_alive) << "a draining server keeps no connection";
    expect_problem(action("idle", "start"), 503, "ShuttingDown");
    expect_problem(call("POST", "/v1/machines", create_body("late")), 503, "ShuttingDown");
    expect_problem(curl("POST", "/v1/machines/idle/start").response, 503, "ShuttingDown");
    const HttpResponse slow = call("GET", "/v1/machines/slow");
    EXPECT_EQ(slow.status, 200) << slow;
    EXPECT_EQ(slow.str("state"), "stopping") << slow;
    EXPECT_LT(Clock::now() - t0, 2500ms) << "the checks above must run while the machine stops";

    ASSERT_TRUE(run_until(
        ioc_, [&] { return stopper->done(); }, 15s));
    const HttpResponse stopped = stopper->take();
    EXPECT_EQ(stopped.status, 200) << stopped << " " << stopper->error().message();
    EXPECT_EQ(stopped.str("state"), "stopped") << stopped;
    EXPECT_FALSE(stopped.keep_alive);
    stopper->close();
    EXPECT_EQ(daemon().wait_exit(15s), 0) << daemon_output();
    EXPECT_GE(Clock::now() - t0, 2500ms) << "the stop did not wait for the guest";
    expect_daemon_gone();
    EXPECT_FALSE(fs::exists(state_ / "late.json"));
}

// The machines outlive the daemon (leave-running): a console WebSocket is closed with 1001.
class RestLeaveRunningTest : public RestTest
{
protected:
    RestLeaveRunningTest() { args_ = {"--shutdown-policy", "leave-running"}; }
};

TEST_F(RestLeaveRunningTest, ConsoleWebSocketsAreClosedWhenTheDaemonGoes)
{
    const pid_t pid = running_machine("vm", quick_console_spec());
    WebSocketClient c(ioc_, socket_path());
    ASSERT_TRUE(c.open("/v1/machines/vm/console")) << c.error().message();
    daemon().signal(SIGTERM);
    ASSERT_TRUE(c.wait_end(10s));
    EXPECT_EQ(c.close_code(), 1001);
    EXPECT_EQ(c.close_reason(), "qmachined is shutting down");
    EXPECT_EQ(daemon().wait_exit(15s), 0) << daemon_output();
    ASSERT_TRUE(alive(pid)) << "leave-running: QEMU outlives the daemon";
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    expect_daemon_gone();
}

// ---- limits (short request timeout, few connections) ----------------------------------------

class RestLimitsTest : public RestTest
{
protected:
    RestLimitsTest() { args_ = {"--rest-request-timeout", "2", "--rest-max-connections", "8"}; }
};

// Writes one byte of `text` a second to `conn` until it is all written or a write fails.
class SlowWriter
{
public:
    SlowWriter(asio::io_context& ioc, HttpConnection::Socket& socket, std::string text)
        : socket_(socket)
        , timer_(ioc)
        , text_(std::move(text))
    {
        step();
    }
    std::size_t written() const { return written_; }
    void cancel() { timer_.cancel(); }

private:
    void step()
    {
        if (written_ == text_.size()) {
            return;
        }
        asio::async_write(socket_, asio::buffer(text_.data() + written_, 1),
                          [this](error_code ec, std::size_t) {
                              if (ec) {
                                  return;
                              }
                              ++written_;
                              timer_.expires_after(1s);
                              timer_.async_wait([this](error_code e) {
                                  if (!e) {
                                      step();
                                  }
                              });
                          });
    }

    HttpConnection::Socket& socket_;
    asio::steady_timer timer_;
    std::string text_;
    std::size_t written_ = 0;
};

TEST_F(RestLimitsTest, SlowClientIsCutOffWhileOthersAreServed)
{
    const Snapshot before = snapshot();
    asio::generic::stream_protocol::socket slow(ioc_);
    slow.connect(asio::generic::stream_protocol::endpoint(
        asio::local::stream_protocol::endpoint(socket_path().string())));
    std::string received;
    bool closed = false;
    std::vector<char> buf(4096);
    std::function<void()> read_more = [&] {
        slow.async_read_some(asio::buffer(buf), [&](error_code ec, std::size_t n) {
            received.append(buf.data(), n);
            if (ec) {
                closed = true;
                return;
            }
            read_more();
        });
    };
    read_more();
    const auto t0 = Clock::now();
    SlowWriter writer(ioc_, slow, "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");

    // Meanwhile other clients get answers at once.
    std::chrono::microseconds worst{0};
    int served = 0;
    while (!closed && Clock::now() - t0 < 8s) {
        const auto start = Clock::now();
        const HttpResponse r = call("GET", "/v1/machines");
        worst = std::max(
            worst, std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start));
        served += r.status == 200 ? 1 : 0;
        run_until(
            ioc_, [&] { return closed; }, 100ms);
    }
    const auto cut = Clock::now() - t0;
    writer.cancel();
    ASSERT_TRUE(closed) << "the slow client was not cut off";
    EXPECT_GE(cut, 1900ms);
    EXPECT_LT(cut, 3500ms);
    EXPECT_TRUE(received.starts_with("HTTP/1.1 408 ")) << received;
    EXPECT_NE(received.find("urn:qmachined:error:RequestTimeout"), std::string::npos) << received;
    EXPECT_LT(writer.written(), 5U);
    EXPECT_GE(served, 5);
    EXPECT_LT(worst, 250ms) << "a request waited for the slow client";
    RecordProperty("worst_us_during_slow_client", static_cast<int>(worst.count()));
    error_code ec;
    slow.close(ec);
    run_until(
        ioc_, [] { return false; }, 10ms); // the cancelled handlers
    expect_unchanged(before);
}

TEST_F(RestLimitsTest, IdleConnectionsAreClosedQuietly)
{
    const Snapshot before = snapshot();
    // Never a byte: closed after the timeout, without an answer.
    HttpConnection idle(ioc_, socket_path());
    // Kept alive after one request, then idle: closed the same way.
    HttpConnection kept(ioc_, socket_path());
    EXPECT_EQ(kept.request("GET", "/v1/health").status, 200);
    const auto t0 = Clock::now();
    std::string from_idle;
    std::string from_kept;
    EXPECT_TRUE(idle.closed_by_peer(5s, &from_idle));
    EXPECT_TRUE(kept.closed_by_peer(5s, &from_kept));
    EXPECT_LT(Clock::now() - t0, 3500ms);
    EXPECT_EQ(from_idle, "");
    EXPECT_EQ(from_kept, "");
    expect_unchanged(before);
}

TEST_F(RestLimitsTest, ConnectionsOverTheLimitAre429)
{
    const Snapshot before = snapshot();
    std::vector<std::unique_ptr<HttpConnection>> conns;
    for (int i = 0; i < 8; ++i) {
        conns.push_back(std::make_unique<HttpConnection>(ioc_, socket_path()));
    }
    ASSERT_TRUE(eventually([&] { return unix_connections(socket_path()) == 8; }, 5s));
    {
        HttpConnection extra(ioc_, socket_path());
        const HttpResponse r = extra.read_response(5s);
        expect_problem(r, 429, "LimitExceeded");
        EXPECT_EQ(r.header("Retry-After"), "1");
        EXPECT_TRUE(extra.closed_by_peer(5s));
    }
    // The open ones still work; one closed makes room for another.
    EXPECT_EQ(conns[3]->request("GET", "/v1/health").status, 200);
    conns[0]->close();
    ASSERT_TRUE(eventually([&] { return unix_connections(socket_path()) == 7; }, 5s));
    {
        HttpConnection again(ioc_, socket_path());
        EXPECT_EQ(again.request("GET", "/v1/health").status, 200);
        again.close();
    }
    conns.clear();
    expect_unchanged(before);
}

// ---- TCP with a token -----------------------------------------------------------------------

// A port nobody listens on now (bound and released: --rest-listen 127.0.0.1:0 would not tell us
// which one the daemon got).
std::uint16_t free_port()
{
    asio::io_context ioc;
    asio::ip::tcp::acceptor a(ioc, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
    return a.local_endpoint().port();
}

class RestTcpTest : public RestTest
{
protected:
    RestTcpTest()
    {
        port_ = free_port();
        args_ = {"--rest-listen", fmt::format("127.0.0.1:{}", port_)};
    }

    asio::ip::tcp::endpoint endpoint() const
    {
        return {asio::ip::make_address("127.0.0.1"), port_};
    }
    HttpResponse tcp_call(const std::string& method, const std::string& target,
                          const Headers& headers, std::string body = {})
    {
        HttpConnection c(ioc_, endpoint());
        EXPECT_FALSE(c.error()) << c.error().message();
        HttpResponse r = c.request(method, target, std::move(body), headers);
        c.close();
        return r;
    }
    CurlResult tcp_curl(const std::string& method, const std::string& target,
                        std::vector<std::string> args = {})
    {
        args.insert(args.begin(), {"-X", method});
        args.push_back(fmt::format("http://127.0.0.1:{}{}", port_, target));
        return run_curl(args);
    }

    std::uint16_t port_ = 0;
};

TEST_F(RestTcpTest, TokenIsRequired)
{
    const fs::path token_file = state_ / "rest.token";
    struct stat st
    {
    };
    ASSERT_EQ(::stat(token_file.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600U);
    std::string token = read_whole_file(token_file);
    ASSERT_TRUE(token.ends_with("\n"));
    token.pop_back();
    EXPECT_EQ(token.size(), 64U);
    EXPECT_EQ(token.find_first_not_of("0123456789abcdef"), std::string::npos) << token;

    create("vm");
    const Snapshot before = snapshot();
    const std::vector<Headers> refused{
        {},
        {{"Authorization", "Bearer wrong"}},
        {{"Authorization", "Bearer " + token.substr(0, 63)}},
        {{"Authorization", "Bearer " + token + "0"}},
        {{"Authorization", "Basic " + token}},
        {{"Authorization", token}},
        {{"Authorization", "Bearer"}},
    };
    for (const auto& headers : refused) {
        SCOPED_TRACE(headers.empty() ? "no token" : headers[0].second);
        for (const auto& [method, target] :
             std::vector<std::pair<std::string, std::string>>{{"GET", "/v1/health"},
                                                              {"POST", "/v1/machines"},
                                                              {"DELETE", "/v1/machines/vm?force=1"},
                                                              {"GET", "/v1/nothing"}}) {
            HttpConnection c(ioc_, endpoint());
            const std::string body = method == "POST" ? create_body("x") : "";
            const HttpResponse r = c.request(method, target, body, headers);
            expect_problem(r, 401, "Unauthorized");
            EXPECT_EQ(r.header("WWW-Authenticate"), "Bearer realm=\"qmachined\"");
            EXPECT_TRUE(c.closed_by_peer(5s));
        }
    }
    const CurlResult no_token = tcp_curl("GET", "/v1/machines");
    expect_problem(no_token.response, 401, "Unauthorized");
    EXPECT_EQ(no_token.response.header("WWW-Authenticate"), "Bearer realm=\"qmachined\"");
    expect_problem(tcp_curl("GET", "/v1/machines", {"-H", "Authorization: Bearer nope"}).response,
                   401, "Unauthorized");
    expect_unchanged(before);

    // The right token (the scheme in any case).
    const Headers auth{{"Authorization", "Bearer " + token}};
    EXPECT_EQ(tcp_call("GET", "/v1/health", auth).status, 200);
    EXPECT_EQ(tcp_call("GET", "/v1/health", {{"Authorization", "bearer " + token}}).status, 200);
    const HttpResponse made = tcp_call("POST", "/v1/machines", auth, create_body("tcp"));
    EXPECT_EQ(made.status, 201) << made;
    const CurlResult listed =
        tcp_curl("GET", "/v1/machines/tcp", {"-H", "Authorization: Bearer " + token});
    EXPECT_EQ(listed.response.status, 200) << listed.response;
    {
        // Kept alive with the token.
        HttpConnection c(ioc_, endpoint());
        for (int i = 0; i < 3; ++i) {
            const HttpResponse r = c.request("GET", "/v1/version", {}, auth);
            EXPECT_EQ(r.status, 200);
            EXPECT_TRUE(r.keep_alive);
        }
        c.close();
    }
    // The unix socket needs none.
    EXPECT_EQ(call("GET", "/v1/machines/tcp").status, 200);

    // The audit line names the TCP peer; refused requests never reached an operation.
    const std::string line = R"(audit: op=create machine=tcp result=ok caller="tcp=127.0.0.1:)";
    ASSERT_TRUE(daemon().wait_for_output(line, 10s)) << daemon_output();
    const std::string out = daemon_output();
    const std::string rest = out.substr(out.find(line) + line.size());
    EXPECT_TRUE(rest.substr(0, rest.find('\n')).ends_with(R"( token")")) << rest;
    EXPECT_EQ(occurrences(out, "audit: "), 2u) << out; // create vm (unix), create tcp
}

TEST_F(RestTcpTest, EarlyAnswersSurviveUnreadBodiesOverTcp)
{
    // 401 and 413 are answered from the header; TCP resets a connection closed with unread
    // data, which can destroy the answer before the client reads it (RFC 9112 9.6): the server
    // must let the client finish sending.
    std::string token = read_whole_file(state_ / "rest.token");
    token.erase(token.find_last_not_of('\n') + 1);
    const Snapshot before = snapshot();
    // 401 for a body within the limit (never read), 413 for one over it.
    for (const bool with_token : {false, true}) {
        SCOPED_TRACE(with_token ? "413" : "401");
        const std::string body((with_token ? 2048 : 768) * 1024, ' ');
        HttpConnection c(ioc_, endpoint());
        std::string head = fmt::format("POST /v1/machines HTTP/1.1\r\nHost: x\r\n"
                                       "Content-Type: application/json\r\nContent-Length: {}\r\n",
                                       body.size());
        if (with_token) {
            head += "Authorization: Bearer " + token + "\r\n";
        }
        EXPECT_FALSE(c.write_raw(head + "\r\n" + body));
        const HttpResponse r = c.read_response(5s);
        if (with_token) {
            expect_problem(r, 413, "PayloadTooLarge");
        } else {
            expect_problem(r, 401, "Unauthorized");
        }
        EXPECT_TRUE(c.closed_by_peer(5s));
    }
    const fs::path big = root_ / "big.json";
    write_whole_file(big, std::string(10 * 1024 * 1024, ' '));
    const CurlResult r =
        tcp_curl("POST", "/v1/machines",
                 {"-H", "Authorization: Bearer " + token, "-H", "Content-Type: application/json",
                  "-H", "Expect:", "--data-binary", "@" + big.string()});
    EXPECT_EQ(r.status, 0) << r.err;
    expect_problem(r.response, 413, "PayloadTooLarge");
    expect_unchanged(before);
}

TEST_F(RestTcpTest, TokenFileGivenAndReused)
{
    // Restarted with a token file of our own.
    stop_daemon();
    const fs::path mine = root_ / "token";
    write_whole_file(mine, "  s3cret-token \n");
    ASSERT_EQ(::chmod(mine.c_str(), 0600), 0);
    auto args = args_;
    args.insert(args.end(), {"--rest-token-file", mine.string()});
    ASSERT_NO_FATAL_FAILURE(start_daemon(args));
    EXPECT_EQ(tcp_call("GET", "/v1/health", {{"Authorization", "Bearer s3cret-token"}}).status,
              200);
    expect_problem(tcp_call("GET", "/v1/health", {{"Authorization", "Bearer s3cret"}}), 401,
                   "Unauthorized");
    stop_daemon();

    // One readable by others is refused: the daemon does not start.
    ASSERT_EQ(::chmod(mine.c_str(), 0644), 0);
    const CommandResult refused = run_command([&] {
        std::vector<std::string> argv{QM_QMACHINED};
        for (const auto& a : daemon_args(args)) {
            argv.push_back(a);
        }
        return argv;
    }());
    EXPECT_EQ(refused.status, 1) << refused.err;
    EXPECT_NE(refused.err.find("0600"), std::string::npos) << refused.err;
    EXPECT_FALSE(fs::exists(socket_path()));
}

class RestRemoteTest : public RestTest
{
protected:
    RestRemoteTest() { start_in_set_up_ = false; }
};

TEST_F(RestRemoteTest, NonLoopbackListenNeedsAllowRemote)
{
    const std::uint16_t port = free_port();
    std::vector<std::string> argv{QM_QMACHINED};
    for (const auto& a : daemon_args({"--rest-listen", fmt::format("0.0.0.0:{}", port)})) {
        argv.push_back(a);
    }
    const CommandResult r = run_command(argv, 30s);
    EXPECT_EQ(r.status, 2) << r.out << r.err;
    EXPECT_NE(r.err.find("--rest-allow-remote"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("0.0.0.0"), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(socket_path()));
    EXPECT_FALSE(fs::exists(state_ / "rest.token"));
    // Nothing listens on the port.
    asio::ip::tcp::socket s(ioc_);
    error_code ec;
    s.connect({asio::ip::make_address("127.0.0.1"), port}, ec);
    EXPECT_TRUE(ec) << "something listens on " << port;
}

} // namespace
} // namespace qm::test
