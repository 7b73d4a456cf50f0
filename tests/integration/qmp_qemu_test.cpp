// SPDX-License-Identifier: GPL-2.0-or-later
// qm::qmp::Client against a real qemu-system-x86_64 -machine none: greeting, commands, events,
// fd passing, oob, pipelining, quit, both connection directions over unix and TCP, reconnect.
#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/asio.hpp"
#include "libmachine/json.hpp"
#include "libmachine/qmp/client.hpp"
#include "libmachine/qmp/message.hpp"
#include "tests/support/loop.hpp"
#include "tests/support/qemu_process.hpp"

namespace qm::qmp {
namespace {

using namespace std::chrono_literals;
using test::QemuOptions;
using test::QemuProcess;
using test::run_co;
using test::run_until;

// ClientOptions and CallOptions have members without default initialisers, so designated
// initialisers trip -Wmissing-field-initializers: build them here instead.
ClientOptions client_options(bool oob, std::string name = "")
{
    ClientOptions o;
    o.oob = oob;
    o.name = std::move(name);
    return o;
}

CallOptions exec_oob()
{
    CallOptions o;
    o.oob = true;
    return o;
}

CallOptions with_fd(int fd)
{
    CallOptions o;
    o.fd = fd;
    return o;
}

CallOptions with_timeout(std::chrono::milliseconds timeout)
{
    CallOptions o;
    o.timeout = timeout;
    return o;
}

std::string status_of(const json::Value& v)
{
    return std::string(json::get_string(v, "status").value_or("<none>"));
}

std::string describe(const Error& e)
{
    return std::string(to_string(static_cast<errc>(e.code.value()))) + ": " + e.message;
}

// wait_event() as a JSON document: Event has no default constructor, which run_co needs.
awaitable<expected<json::Document>> wait_event_doc(std::shared_ptr<Client> client,
                                                   std::vector<EventFilter> filters,
                                                   std::chrono::milliseconds timeout)
{
    auto event = co_await client->wait_event(std::move(filters), timeout);
    if (!event) {
        co_return fail(event.error());
    }
    co_return json::parse(event->to_json());
}

// Both ends of a pipe, closed at the end of the scope.
struct Pipe
{
    Pipe()
    {
        if (::pipe2(fds.data(), O_CLOEXEC | O_NONBLOCK) != 0) {
            fds = {-1, -1};
        }
    }
    Pipe(const Pipe&) = delete;
    Pipe& operator=(const Pipe&) = delete;
    ~Pipe()
    {
        close_write();
        if (fds[0] >= 0) {
            ::close(fds[0]);
        }
    }
    void close_write()
    {
        if (fds[1] >= 0) {
            ::close(fds[1]);
            fds[1] = -1;
        }
    }
    int read_end() const { return fds[0]; }
    int write_end() const { return fds[1]; }
    std::array<int, 2> fds{-1, -1};
};

class QmpQemuTest : public testing::Test
{
protected:
    void SetUp() override
    {
        if (auto why = QemuProcess::unavailable_reason()) {
            GTEST_SKIP() << "no QEMU: " << *why;
        }
    }

    void TearDown() override
    {
        // Let the clients' reader and writer coroutines see their sockets closed and end.
        ioc_.restart();
        ioc_.poll();
    }

    std::unique_ptr<QemuProcess> launch(QemuOptions options = {})
    {
        auto q = QemuProcess::start(ioc_, std::move(options));
        if (!q) {
            ADD_FAILURE() << "cannot start QEMU: " << describe(q.error());
            return nullptr;
        }
        return std::move(*q);
    }

    std::shared_ptr<Client> attach(QemuProcess& q, ClientOptions options = {}, int index = 0)
    {
        auto c = run_co(ioc_, q.attach(std::move(options), index, 10s), 20s);
        if (!c) {
            ADD_FAILURE() << "cannot attach to QEMU's monitor: " << describe(c.error());
            return nullptr;
        }
        return *c;
    }

    expected<json::Document> exec(Client& c, std::string command, std::string arguments = "",
                                  CallOptions options = {})
    {
        return run_co(ioc_, c.execute_json(std::move(command), std::move(arguments), options), 30s);
    }

    expected<json::Document> wait_event(const std::shared_ptr<Client>& c, EventFilter filter,
                                        std::chrono::milliseconds timeout = 5s)
    {
        std::vector<EventFilter> filters;
        filters.push_back(std::move(filter));
        return run_co(ioc_, wait_event_doc(c, std::move(filters), timeout), timeout + 5s);
    }

    // `quit` and its SHUTDOWN event, the disconnect, and QEMU's exit status 0.
    void quit(QemuProcess& q, const std::shared_ptr<Client>& c)
    {
        auto r = exec(*c, "quit");
        EXPECT_TRUE(r) << describe(r.error());
        auto shutdown = wait_event(c, EventFilter::named("SHUTDOWN"));
        EXPECT_TRUE(shutdown) << describe(shutdown.error());
        EXPECT_TRUE(q.wait_exit(10s)) << "QEMU did not exit after quit";
        EXPECT_EQ(q.exit_code(), 0) << q.describe_exit() << "\n" << q.log();
        EXPECT_TRUE(run_until(
            ioc_, [&] { return c->state() == Client::State::closed; }, 5s));
        c->close();
    }

    asio::io_context ioc_{1};
};

TEST_F(QmpQemuTest, GreetingReportsVersionAndOffersOob)
{
    auto q = launch();
    ASSERT_TRUE(q);
    auto c = attach(*q);
    ASSERT_TRUE(c);
    ASSERT_TRUE(c->greeting());
    const Greeting& g = *c->greeting();
    EXPECT_GE(g.major, 2);
    EXPECT_GE(g.minor, 0);
    EXPECT_GE(g.micro, 0);
    EXPECT_EQ(g.version(), fmt::format("{}.{}.{}", g.major, g.minor, g.micro));
    // oob exists since QEMU 2.12 (qmp-spec 2.2.1); 7.2 offers it on a socket monitor.
    EXPECT_TRUE(g.offers("oob")) << "capabilities: " << ::testing::PrintToString(g.capabilities);
    EXPECT_FALSE(c->oob_enabled()) << "oob was not asked for";
    EXPECT_TRUE(c->is_connected());

    // query-version agrees with the greeting.
    auto v = exec(*c, "query-version");
    ASSERT_TRUE(v) << describe(v.error());
    const json::Value* qemu = json::find(*v, "qemu");
    ASSERT_NE(qemu, nullptr) << json::to_string(*v);
    EXPECT_EQ(json::get_int(*qemu, "major"), g.major);
    EXPECT_EQ(json::get_int(*qemu, "minor"), g.minor);
    EXPECT_EQ(json::get_int(*qemu, "micro"), g.micro);
    quit(*q, c);
}

TEST_F(QmpQemuTest, QueryStatusIsRunningForMachineNone)
{
    auto q = launch();
    ASSERT_TRUE(q);
    auto c = attach(*q);
    ASSERT_TRUE(c);
    auto st = exec(*c, "query-status");
    ASSERT_TRUE(st) << describe(st.error());
    EXPECT_EQ(status_of(*st), "running") << json::to_string(*st);
    ASSERT_NE(json::find(*st, "running"), nullptr);
    EXPECT_TRUE((*st)["running"].IsBool() && (*st)["running"].GetBool());
    quit(*q, c);
}

TEST_F(QmpQemuTest, QueryStatusIsPrelaunchWithDashSUntilCont)
{
    auto q = launch({.paused = true});
    ASSERT_TRUE(q);
    auto c = attach(*q);
    ASSERT_TRUE(c);
    auto st = exec(*c, "query-status");
    ASSERT_TRUE(st) << describe(st.error());
    EXPECT_EQ(status_of(*st), "prelaunch") << json::to_string(*st);

    auto r = exec(*c, "cont");
    ASSERT_TRUE(r) << describe(r.error());
    auto resume = wait_event(c, EventFilter::named("RESUME"));
    EXPECT_TRUE(resume) << describe(resume.error());
    st = exec(*c, "query-status");
    ASSERT_TRUE(st) << describe(st.error());
    EXPECT_EQ(status_of(*st), "running") << json::to_string(*st);
    quit(*q, c);
}

TEST_F(QmpQemuTest, QueryQmpSchemaIsALargeArrayNamingQueryStatus)
{
    auto q = launch();
    ASSERT_TRUE(q);
    auto c = attach(*q);
    ASSERT_TRUE(c);
    auto schema = exec(*c, "query-qmp-schema");
    ASSERT_TRUE(schema) << describe(schema.error());
    ASSERT_TRUE(schema->IsArray());
    // ~200 KiB on the wire from QEMU 7.2; still well over 100 KiB without the whitespace.
    EXPECT_GT(json::to_string(*schema).size(), 100U * 1024U);

    bool found_query_status = false;
    std::vector<std::string> allow_oob;
    for (const auto& entity : schema->GetArray()) {
        if (json::get_string(entity, "meta-type") != "command") {
            continue;
        }
        const auto name = json::get_string(entity, "name").value_or("");
        const json::Value* oob = json::find(entity, "allow-oob");
        const bool oob_ok = oob != nullptr && oob->IsBool() && oob->GetBool();
        if (name == "query-status") {
            found_query_status = true;
            EXPECT_FALSE(oob_ok) << "query-status is in-band only";
        }
        if (oob_ok) {
            allow_oob.emplace_back(name);
        }
    }
    EXPECT_TRUE(found_query_status);
    // The oob tests and the benchmark use query-yank, the one cheap allow-oob query (6.0+).
    EXPECT_NE(std::find(allow_oob.begin(), allow_oob.end(), "query-yank"), allow_oob.end())
        << "allow-oob commands: " << ::testing::PrintToString(allow_oob);
    quit(*q, c);
}

TEST_F(QmpQemuTest, StopAndContEmitEventsAndChangeStatus)
{
    auto q = launch();
    ASSERT_TRUE(q);
    auto c = attach(*q);
    ASSERT_TRUE(c);
    std::vector<std::string> seen;
    c->subscribe([&seen](const Event& e) { seen.emplace_back(e.name()); });

    // QEMU 7.2 may send STOP before stop's reply: the event is then already queued, and
    // wait_event() looks at the queue first.
    auto r = exec(*c, "stop");
    ASSERT_TRUE(r) << describe(r.error());
    auto stop = wait_event(c, EventFilter::named("STOP"));
    ASSERT_TRUE(stop) << describe(stop.error());
    auto st = exec(*c, "query-status");
    ASSERT_TRUE(st) << describe(st.error());
    EXPECT_EQ(status_of(*st), "paused") << json::to_string(*st);
    EXPECT_TRUE((*st)["running"].IsBool() && !(*st)["running"].GetBool());

    r = exec(*c, "cont");
    ASSERT_TRUE(r) << describe(r.error());
    auto resume = wait_event(c, EventFilter::named("RESUME"));
    ASSERT_TRUE(resume) << describe(resume.error());
    st = exec(*c, "query-status");
    ASSERT_TRUE(st) << describe(st.error());
    EXPECT_EQ(status_of(*st), "running") << json::to_string(*st);

    EXPECT_EQ(seen, (std::vector<std::string>{"STOP", "RESUME"}));
    quit(*q, c);
}

TEST_F(QmpQemuTest, GetfdPassesARealDescriptorAndClosefdReleasesIt)
{
    auto q = launch();
    ASSERT_TRUE(q);
    auto c = attach(*q);
    ASSERT_TRUE(c);
    Pipe pipe;
    ASSERT_GE(pipe.read_end(), 0) << std::strerror(errno);

    auto r = exec(*c, "getfd", R"({"fdname":"fd0"})", with_fd(pipe.write_end()));
    ASSERT_TRUE(r) << describe(r.error());
    // The client sent a duplicate: ours is still open and usable.
    EXPECT_EQ(::fcntl(pipe.write_end(), F_GETFD), FD_CLOEXEC);

    // Once we drop our write end, QEMU's copy is the only writer: no EOF on the read end yet.
    pipe.close_write();
    char byte = 0;
    EXPECT_EQ(::read(pipe.read_end(), &byte, 1), -1);
    EXPECT_EQ(errno, EAGAIN) << "QEMU does not hold the passed descriptor";

    r = exec(*c, "closefd", R"({"fdname":"fd0"})");
    ASSERT_TRUE(r) << describe(r.error());
    // closefd replied after QEMU closed its copy: the last writer is gone.
    EXPECT_EQ(::read(pipe.read_end(), &byte, 1), 0) << "QEMU still holds the descriptor";

    // The name is gone now, and a name never given fails the same way.
    for (const char* name : {"fd0", "no-such-fd"}) {
        r = exec(*c, "closefd", fmt::format(R"({{"fdname":"{}"}})", name));
        ASSERT_FALSE(r) << name;
        EXPECT_TRUE(r.error().is(errc::qmp_command_failed)) << describe(r.error());
        EXPECT_EQ(r.error().qmp_class, "GenericError");
        EXPECT_NE(r.error().qmp_desc.find(name), std::string::npos) << r.error().qmp_desc;
    }
    EXPECT_TRUE(c->is_connected());
    quit(*q, c);
}

TEST_F(QmpQemuTest, UnknownCommandFailsWithCommandNotFound)
{
    auto q = launch();
    ASSERT_TRUE(q);
    auto c = attach(*q);
    ASSERT_TRUE(c);
    auto r = exec(*c, "no-such-command");
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::qmp_command_failed)) << describe(r.error());
    EXPECT_EQ(r.error().qmp_class, "CommandNotFound");
    EXPECT_NE(r.error().message.find("no-such-command"), std::string::npos) << r.error().message;

    // A command error leaves the session usable.
    auto st = exec(*c, "query-status");
    ASSERT_TRUE(st) << describe(st.error());
    EXPECT_EQ(status_of(*st), "running");
    quit(*q, c);
}

TEST_F(QmpQemuTest, QuitSendsShutdownThenDisconnectsOnceAndQemuExitsZero)
{
    auto q = launch();
    ASSERT_TRUE(q);
    auto c = attach(*q);
    ASSERT_TRUE(c);
    std::vector<std::string> seen;
    int disconnects = 0;
    c->subscribe([&seen](const Event& e) { seen.emplace_back(e.name()); });
    c->on_disconnect([&](const Error& e) {
        ++disconnects;
        seen.emplace_back("disconnect:" +
                          std::string(to_string(static_cast<errc>(e.code.value()))));
    });

    auto r = exec(*c, "quit");
    ASSERT_TRUE(r) << describe(r.error());
    auto shutdown =
        wait_event(c, *EventFilter::with_match("SHUTDOWN", R"({"data":{"guest":false}})"));
    ASSERT_TRUE(shutdown) << describe(shutdown.error());
    const json::Value* data = json::find(*shutdown, "data");
    ASSERT_NE(data, nullptr) << json::to_string(*shutdown);
    EXPECT_EQ(json::get_string(*data, "reason"), "host-qmp-quit");

    ASSERT_TRUE(run_until(
        ioc_, [&] { return disconnects > 0; }, 5s))
        << "no disconnect after quit";
    EXPECT_TRUE(c->close_reason().is(errc::qmp_disconnected)) << describe(c->close_reason());
    ASSERT_TRUE(q->wait_exit(10s)) << "QEMU did not exit after quit";
    EXPECT_EQ(q->exit_code(), 0) << q->describe_exit() << "\n" << q->log();

    // Neither close() nor more loop turns report the end again.
    c->close();
    ioc_.restart();
    ioc_.poll();
    EXPECT_EQ(disconnects, 1);
    EXPECT_EQ(seen, (std::vector<std::string>{"SHUTDOWN", "disconnect:qmp_disconnected"}));
    auto late = exec(*c, "query-status");
    ASSERT_FALSE(late);
    EXPECT_TRUE(late.error().is(errc::qmp_disconnected)) << describe(late.error());
}

TEST_F(QmpQemuTest, KilledQemuFailsThePendingCommandWithDisconnect)
{
    auto q = launch();
    ASSERT_TRUE(q);
    auto c = attach(*q);
    ASSERT_TRUE(c);
    int disconnects = 0;
    c->on_disconnect([&](const Error&) { ++disconnects; });

    // A stopped QEMU cannot answer: the command stays pending until QEMU dies.
    ASSERT_EQ(::kill(q->pid(), SIGSTOP), 0);
    std::optional<expected<json::Document>> result;
    asio::co_spawn(ioc_, c->execute("query-status"),
                   [&](const std::exception_ptr& e, expected<json::Document> r) {
                       if (e) {
                           ADD_FAILURE() << "execute threw";
                       }
                       result = std::move(r);
                   });
    ASSERT_TRUE(run_until(
        ioc_, [&] { return c->pending_commands() == 1; }, 5s));
    q->kill();
    ASSERT_TRUE(run_until(
        ioc_, [&] { return result.has_value(); }, 5s));
    ASSERT_FALSE(*result);
    EXPECT_TRUE(result->error().is(errc::qmp_disconnected)) << describe(result->error());
    EXPECT_EQ(disconnects, 1);
    EXPECT_EQ(c->pending_commands(), 0U);
    EXPECT_EQ(q->describe_exit(), "killed by signal 9");
}

TEST_F(QmpQemuTest, LateReplyAfterTimeoutIsDroppedAndTheSessionGoesOn)
{
    auto q = launch();
    ASSERT_TRUE(q);
    auto c = attach(*q);
    ASSERT_TRUE(c);
    ASSERT_EQ(::kill(q->pid(), SIGSTOP), 0);
    auto r = exec(*c, "query-status", "", with_timeout(200ms));
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::timeout)) << describe(r.error());
    ASSERT_EQ(::kill(q->pid(), SIGCONT), 0);

    // QEMU now answers the first command too; that reply has no caller and is dropped.
    auto st = exec(*c, "query-status");
    ASSERT_TRUE(st) << describe(st.error());
    EXPECT_EQ(status_of(*st), "running");
    EXPECT_EQ(c->dropped_replies(), 1U);
    EXPECT_TRUE(c->is_connected());
    quit(*q, c);
}

TEST_F(QmpQemuTest, OobNegotiatedRunsAllowOobCommandsOutOfBand)
{
    auto q = launch();
    ASSERT_TRUE(q);
    auto c = attach(*q, client_options(true));
    ASSERT_TRUE(c);
    EXPECT_TRUE(c->oob_enabled());

    // query-yank is allow-oob (see the schema test) and harmless.
    auto yank = exec(*c, "query-yank", "", exec_oob());
    ASSERT_TRUE(yank) << describe(yank.error());
    EXPECT_TRUE(yank->IsArray()) << json::to_string(*yank);

    // migrate-pause is allow-oob but refuses outside postcopy: a QMP error, not a protocol one.
    auto pause = exec(*c, "migrate-pause", "", exec_oob());
    ASSERT_FALSE(pause);
    EXPECT_TRUE(pause.error().is(errc::qmp_command_failed)) << describe(pause.error());
    EXPECT_EQ(pause.error().qmp_class, "GenericError");

    // query-status is not allow-oob: QEMU refuses exec-oob for it, again as a command error.
    auto st = exec(*c, "query-status", "", exec_oob());
    ASSERT_FALSE(st);
    EXPECT_TRUE(st.error().is(errc::qmp_command_failed)) << describe(st.error());
    EXPECT_NE(st.error().qmp_desc.find("OOB"), std::string::npos) << st.error().qmp_desc;

    // In-band commands still work with oob on.
    st = exec(*c, "query-status");
    ASSERT_TRUE(st) << describe(st.error());
    EXPECT_EQ(status_of(*st), "running");
    EXPECT_TRUE(c->is_connected());
    quit(*q, c);
}

TEST_F(QmpQemuTest, ExecOobWithoutOobNegotiatedIsRefusedLocally)
{
    auto q = launch();
    ASSERT_TRUE(q);
    auto c = attach(*q, client_options(false));
    ASSERT_TRUE(c);
    EXPECT_FALSE(c->oob_enabled());
    auto r = exec(*c, "query-yank", "", exec_oob());
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::invalid_argument)) << describe(r.error());
    EXPECT_EQ(c->pending_commands(), 0U);
    auto yank = exec(*c, "query-yank");
    ASSERT_TRUE(yank) << describe(yank.error());
    quit(*q, c);
}

TEST_F(QmpQemuTest, ReconnectToServedMonitorGetsAFreshGreeting)
{
    auto q = launch({.monitor = QemuOptions::Monitor::qemu_listens});
    ASSERT_TRUE(q);
    auto first = attach(*q);
    ASSERT_TRUE(first);
    auto st = exec(*first, "stop");
    ASSERT_TRUE(st) << describe(st.error());
    first->close();
    EXPECT_EQ(first->state(), Client::State::closed);

    // What the daemon does after a restart: a new client on the same monitor.
    auto second = attach(*q, client_options(false, "second"));
    ASSERT_TRUE(second);
    ASSERT_TRUE(second->greeting());
    EXPECT_GE(second->greeting()->major, 2);
    EXPECT_TRUE(second->greeting()->offers("oob"));
    // The machine kept its state across the reconnect.
    st = exec(*second, "query-status");
    ASSERT_TRUE(st) << describe(st.error());
    EXPECT_EQ(status_of(*st), "paused");
    EXPECT_TRUE(first->close_reason().is(errc::qmp_closed));
    quit(*q, second);
}

TEST_F(QmpQemuTest, QemuThatDiesAtStartUpFailsTheAttachWithItsLog)
{
    // The fixture must fail fast and say why, in both directions, rather than wait out the
    // timeout (an accept, or connection retries, that can never succeed).
    for (auto monitor : {QemuOptions::Monitor::test_listens, QemuOptions::Monitor::qemu_listens}) {
        QemuOptions options;
        options.monitor = monitor;
        options.extra_args = {"-no-such-option"};
        auto q = launch(options);
        ASSERT_TRUE(q);
        const auto start = std::chrono::steady_clock::now();
        auto c = run_co(ioc_, q->attach(ClientOptions{}, 0, 10s), 20s);
        ASSERT_FALSE(c);
        EXPECT_TRUE(c.error().is(errc::connect_failed)) << describe(c.error());
        EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
        EXPECT_NE(c.error().message.find("-no-such-option"), std::string::npos)
            << "QEMU's log is missing: " << c.error().message;
        EXPECT_EQ(q->exit_code(), 1) << q->describe_exit();
    }
}

// Both directions (we listen / QEMU listens), over unix and TCP.
struct Transport
{
    QemuOptions::Monitor monitor;
    bool tcp;
};

class QmpQemuTransportTest : public QmpQemuTest, public testing::WithParamInterface<Transport>
{
};

TEST_P(QmpQemuTransportTest, NegotiatesQueriesAndQuits)
{
    const Transport t = GetParam();
    auto q = launch({.monitor = t.monitor, .tcp = t.tcp});
    ASSERT_TRUE(q);
    EXPECT_EQ(q->monitor_address().kind, t.tcp ? Address::Kind::tcp : Address::Kind::unix_path);
    auto c = attach(*q, client_options(true));
    ASSERT_TRUE(c);
    EXPECT_TRUE(c->oob_enabled());
    auto st = exec(*c, "query-status");
    ASSERT_TRUE(st) << describe(st.error());
    EXPECT_EQ(status_of(*st), "running");

    // SCM_RIGHTS exists only on unix sockets.
    Pipe pipe;
    ASSERT_GE(pipe.read_end(), 0);
    auto r = exec(*c, "getfd", R"({"fdname":"fd0"})", with_fd(pipe.write_end()));
    if (t.tcp) {
        ASSERT_FALSE(r);
        EXPECT_TRUE(r.error().is(errc::invalid_argument)) << describe(r.error());
    } else {
        EXPECT_TRUE(r) << describe(r.error());
    }
    EXPECT_TRUE(c->is_connected());
    quit(*q, c);
}

INSTANTIATE_TEST_SUITE_P(Directions, QmpQemuTransportTest,
                         testing::Values(Transport{QemuOptions::Monitor::test_listens, false},
                                         Transport{QemuOptions::Monitor::test_listens, true},
                                         Transport{QemuOptions::Monitor::qemu_listens, false},
                                         Transport{QemuOptions::Monitor::qemu_listens, true}),
                         [](const testing::TestParamInfo<Transport>& info) {
                             return std::string(info.param.monitor ==
                                                        QemuOptions::Monitor::test_listens
                                                    ? "WeListen"
                                                    : "QemuListens") +
                                    (info.param.tcp ? "Tcp" : "Unix");
                         });

// 64 commands in flight at once, with and without oob: each reply reaches its own caller.
class QmpQemuPipelineTest : public QmpQemuTest, public testing::WithParamInterface<bool>
{
};

TEST_P(QmpQemuPipelineTest, SixtyFourCommandsInFlightAreAllAnswered)
{
    constexpr int in_flight = 64;
    const bool oob = GetParam();
    auto q = launch();
    ASSERT_TRUE(q);
    auto c = attach(*q, client_options(oob));
    ASSERT_TRUE(c);
    EXPECT_EQ(c->oob_enabled(), oob);

    // Alternate two commands whose replies differ, so a mix-up of ids would show.
    std::vector<std::optional<expected<json::Document>>> results(in_flight);
    int done = 0;
    for (int i = 0; i < in_flight; ++i) {
        asio::co_spawn(
            ioc_, c->execute(i % 2 == 0 ? "query-status" : "query-version"),
            [&results, &done, i](const std::exception_ptr& e, expected<json::Document> r) {
                if (!e) {
                    results[i] = std::move(r);
                }
                ++done;
            });
    }
    std::size_t max_pending = 0;
    ASSERT_TRUE(run_until(
        ioc_,
        [&] {
            max_pending = std::max(max_pending, c->pending_commands());
            return done == in_flight;
        },
        20s));
    EXPECT_EQ(max_pending, static_cast<std::size_t>(in_flight)) << "not all were in flight at once";
    for (int i = 0; i < in_flight; ++i) {
        ASSERT_TRUE(results[i]) << "command " << i << " threw";
        ASSERT_TRUE(*results[i]) << i << ": " << describe(results[i]->error());
        const json::Document& d = **results[i];
        if (i % 2 == 0) {
            EXPECT_EQ(status_of(d), "running") << i << ": " << json::to_string(d);
        } else {
            EXPECT_NE(json::find(d, "qemu"), nullptr) << i << ": " << json::to_string(d);
        }
    }
    EXPECT_EQ(c->pending_commands(), 0U);
    EXPECT_EQ(c->dropped_replies(), 0U);
    quit(*q, c);
}

INSTANTIATE_TEST_SUITE_P(Oob, QmpQemuPipelineTest, testing::Bool(),
                         [](const testing::TestParamInfo<bool>& info) {
                             return std::string(info.param ? "OobOn" : "OobOff");
                         });

} // namespace
} // namespace qm::qmp
