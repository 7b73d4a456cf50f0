// SPDX-License-Identifier: GPL-2.0-or-later
// qm::Machine against a real qemu-system-x86_64 -machine none: launch, QMP in both flavours,
// events, pause/resume from events, the shutdown ladder, wait, relaunch, monitors, the console,
// add_fd, the log and the temp dir.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <csignal>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/json.hpp"
#include "libmachine/machine/machine.hpp"
#include "libmachine/qmp/address.hpp"
#include "tests/machine/machine_fixture.hpp"

namespace qm {
namespace {

using test::describe;
using test::process_gone;
using test::run_co;
using test::run_until;
namespace fs = std::filesystem;

class MachineTest : public test::MachineFixture
{
};

std::string status_of(const json::Value& v)
{
    return std::string(json::get_string(v, "status").value_or("<none>"));
}

// Both ends of a pipe, closed at the end of the scope.
struct Pipe
{
    explicit Pipe(int flags = O_CLOEXEC)
    {
        if (::pipe2(fds.data(), flags) != 0) {
            fds = {-1, -1};
        }
    }
    Pipe(const Pipe&) = delete;
    Pipe& operator=(const Pipe&) = delete;
    ~Pipe()
    {
        for (int fd : fds) {
            if (fd >= 0) {
                ::close(fd);
            }
        }
    }
    // What /proc/PID/fd/N links to for this pipe: "pipe:[INODE]".
    std::string link() const
    {
        struct stat st
        {
        };
        ::fstat(fds[0], &st);
        return fmt::format("pipe:[{}]", st.st_ino);
    }
    std::array<int, 2> fds{-1, -1};
};

TEST_F(MachineTest, LaunchNegotiatesQmpInANewSessionAndShutdownCleansUp)
{
    auto m = make_machine("m-launch");
    std::vector<MachineState> states;
    m->on_state_change([&](MachineState s) { states.push_back(s); });
    int exits = 0;
    m->on_exit([&](const proc::ExitStatus&) { ++exits; });
    const auto argv = m->full_args(); // inspectable before launch

    ASSERT_TRUE(launch(*m));
    EXPECT_EQ(m->state(), MachineState::running);
    EXPECT_EQ(m->qemu_status(), "running");
    ASSERT_TRUE(m->is_running());
    ASSERT_TRUE(m->pid().has_value());
    const pid_t pid = *m->pid();
    ASSERT_TRUE(m->qmp_client());
    EXPECT_TRUE(m->qmp_client()->is_connected());

    // QEMU runs exactly the command line we could read before, in a session of its own, and
    // says which machine it is (-name ...,process=qemu:NAME sets its comm).
    EXPECT_EQ(test::read_nul_list(fmt::format("/proc/{}/cmdline", pid)), argv);
    EXPECT_EQ(::getsid(pid), pid) << "QEMU is not the leader of a session of its own";
    EXPECT_EQ(test::read_file(fmt::format("/proc/{}/comm", pid)), "qemu:m-launch\n");

    // The monitor socket went away once QEMU had connected; the log is in the temp dir.
    EXPECT_FALSE(fs::exists(monitor_path(*m)));
    auto tmp = m->temp_dir();
    ASSERT_TRUE(tmp);
    EXPECT_EQ(fs::path(*tmp).parent_path(), fs::temp_directory_path());
    EXPECT_EQ(m->log_path(), *tmp + "/m-launch.log");
    EXPECT_TRUE(fs::is_regular_file(m->log_path()));

    // The seed's "VM already launched"; the running machine is not disturbed.
    auto again = launch(*m);
    ASSERT_FALSE(again);
    EXPECT_TRUE(again.error().is(errc::invalid_state)) << describe(again.error());
    EXPECT_EQ(again.error().message, "VM already launched");
    EXPECT_EQ(m->pid(), pid);
    EXPECT_EQ(m->state(), MachineState::running);

    auto r = shutdown(*m);
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(m->exitcode(), 0);
    ASSERT_TRUE(m->exit_status());
    EXPECT_TRUE(m->exit_status()->success()) << m->exit_status()->to_string();
    EXPECT_EQ(m->state(), MachineState::stopped);
    EXPECT_EQ(exits, 1);
    EXPECT_TRUE(m->log_path().empty()) << "the log was in the removed temp dir";
    EXPECT_EQ(states, (std::vector<MachineState>{MachineState::starting, MachineState::running,
                                                 MachineState::stopping, MachineState::stopped}));
    expect_nothing_left(*m, pid, *tmp);
    EXPECT_TRUE(warnings_.messages().empty()) << testing::PrintToString(warnings_.messages());
}

TEST_F(MachineTest, QmpReturnsTheWholeResponseAndCmdTheReturnValue)
{
    auto m = make_machine();
    ASSERT_TRUE(launch(*m));

    // qmp(): the response as QEMU sent it, success or error.
    auto resp = qmp(*m, "query-status");
    ASSERT_TRUE(resp) << describe(resp.error());
    const json::Value* ret = json::find(*resp, "return");
    ASSERT_NE(ret, nullptr) << json::to_string(*resp);
    EXPECT_EQ(status_of(*ret), "running");
    auto bad = qmp(*m, "no-such-command");
    ASSERT_TRUE(bad) << "an error reply is a response: " << describe(bad.error());
    const json::Value* err = json::find(*bad, "error");
    ASSERT_NE(err, nullptr) << json::to_string(*bad);
    EXPECT_EQ(json::get_string(*err, "class"), "CommandNotFound");
    EXPECT_FALSE(json::get_string(*err, "desc").value_or("").empty());
    EXPECT_EQ(json::find(*bad, "return"), nullptr);

    // cmd() / command(): the return value; an error reply fails with QEMU's class and desc.
    auto st = cmd(*m, "query-status");
    ASSERT_TRUE(st) << describe(st.error());
    EXPECT_EQ(status_of(*st), "running");
    auto e = cmd(*m, "no-such-command");
    ASSERT_FALSE(e);
    EXPECT_TRUE(e.error().is(errc::qmp_command_failed)) << describe(e.error());
    EXPECT_EQ(e.error().qmp_class, "CommandNotFound");
    EXPECT_NE(e.error().message.find("no-such-command"), std::string::npos) << e.error().message;
    auto c = run_co(ioc_, m->command("no-such-command"));
    ASSERT_FALSE(c);
    EXPECT_TRUE(c.error().is(errc::qmp_command_failed)) << describe(c.error());
    auto version = run_co(ioc_, m->command("query-version"));
    ASSERT_TRUE(version) << describe(version.error());
    const json::Value* qemu = json::find(*version, "qemu");
    ASSERT_NE(qemu, nullptr);

    // conv_keys: command_line becomes command-line (human-monitor-command's argument).
    auto hmp = cmd(*m, "human-monitor-command", R"({"command_line":"info version"})");
    ASSERT_TRUE(hmp) << describe(hmp.error());
    ASSERT_TRUE(hmp->IsString());
    EXPECT_EQ(std::string(hmp->GetString())
                  .rfind(fmt::format("{}.{}.", *json::get_int(*qemu, "major"),
                                     *json::get_int(*qemu, "minor")),
                         0),
              0U)
        << hmp->GetString();
    auto raw = cmd(*m, "human-monitor-command", R"({"command_line":"info version"})", false);
    ASSERT_FALSE(raw) << "command_line reached QEMU unconverted and was accepted?";
    EXPECT_TRUE(raw.error().is(errc::qmp_command_failed)) << describe(raw.error());
    EXPECT_EQ(raw.error().qmp_class, "GenericError");
    auto hmp_resp = qmp(*m, "human-monitor-command", R"({"command_line":"info status"})");
    ASSERT_TRUE(hmp_resp) << describe(hmp_resp.error());
    ret = json::find(*hmp_resp, "return");
    ASSERT_TRUE(ret != nullptr && ret->IsString()) << json::to_string(*hmp_resp);
    EXPECT_NE(std::string(ret->GetString()).find("running"), std::string::npos)
        << ret->GetString();

    ASSERT_TRUE(shutdown(*m));
}

TEST_F(MachineTest, EventWaitFindsAnAlreadyReceivedEventWithMatch)
{
    auto m = make_machine();
    ASSERT_TRUE(launch(*m));
    auto client = m->qmp_client();
    ASSERT_TRUE(client);

    // system_reset resets the (empty) machine and sends RESET after its reply.
    ASSERT_TRUE(cmd(*m, "system_reset"));
    ASSERT_TRUE(run_until(ioc_, [&] { return client->queued_events() == 1; }, 5s));

    // Criteria that do not hold: nothing returned, the event stays queued. A zero timeout only
    // looks at what was already received.
    auto miss = event_wait(*m, "RESET", 0ms, R"({"data":{"guest":true}})");
    ASSERT_FALSE(miss);
    EXPECT_TRUE(miss.error().is(errc::timeout)) << describe(miss.error());
    EXPECT_EQ(client->queued_events(), 1U);
    auto other = event_wait(*m, "STOP", 0ms);
    ASSERT_FALSE(other);
    EXPECT_EQ(client->queued_events(), 1U);

    auto hit = event_wait(*m, "RESET", 0ms,
                          R"({"data":{"guest":false,"reason":"host-qmp-system-reset"}})");
    ASSERT_TRUE(hit) << describe(hit.error());
    auto doc = json::parse(*hit);
    ASSERT_TRUE(doc);
    EXPECT_EQ(json::get_string(*doc, "event"), "RESET");
    EXPECT_EQ(client->queued_events(), 0U) << "events_wait consumes the event it returns";

    // {"data": null} only asks that "data" exists.
    ASSERT_TRUE(cmd(*m, "system_reset"));
    auto waited = event_wait(*m, "RESET", 5s, R"({"data":null})");
    ASSERT_TRUE(waited) << describe(waited.error());
    ASSERT_TRUE(shutdown(*m));
}

TEST_F(MachineTest, EventsWaitReturnsTheFirstMatchAndKeepsTheOthers)
{
    auto m = make_machine();
    ASSERT_TRUE(launch(*m));
    auto client = m->qmp_client();
    ASSERT_TRUE(client);
    ASSERT_TRUE(cmd(*m, "system_reset"));
    ASSERT_TRUE(run_until(ioc_, [&] { return client->queued_events() == 1; }, 5s));

    // Waiting before the event exists: the queued RESET does not qualify, STOP (to come) does.
    std::vector<qmp::EventFilter> filters;
    filters.push_back(*qmp::EventFilter::with_match("RESET", R"({"data":{"guest":true}})"));
    filters.push_back(qmp::EventFilter::named("STOP"));
    std::optional<expected<std::string>> got;
    asio::co_spawn(ioc_, test::event_json(m->events_wait(std::move(filters), 10s)),
                   [&](const std::exception_ptr& ex, expected<std::string> r) {
                       if (ex) {
                           ADD_FAILURE() << "events_wait threw";
                       }
                       got = std::move(r);
                   });
    ioc_.restart();
    ioc_.poll(); // the wait is registered now
    EXPECT_FALSE(got.has_value()) << "matched an event that does not qualify";
    ASSERT_TRUE(cmd(*m, "stop"));
    ASSERT_TRUE(run_until(ioc_, [&] { return got.has_value(); }, 10s));
    ASSERT_TRUE(*got) << describe(got->error());
    EXPECT_NE(got->value().find(R"("event":"STOP")"), std::string::npos) << got->value();
    // The event also drove the state, whoever consumed it.
    EXPECT_EQ(m->state(), MachineState::paused);

    // The RESET is still there for the next reader.
    auto left = m->get_qmp_events();
    ASSERT_EQ(left.size(), 1U);
    EXPECT_EQ(left[0].name(), "RESET");
    ASSERT_TRUE(shutdown(*m));
}

TEST_F(MachineTest, GetQmpEventAndGetQmpEventsPollAndWait)
{
    auto m = make_machine();
    ASSERT_TRUE(launch(*m));
    auto client = m->qmp_client();
    ASSERT_TRUE(client);
    EXPECT_FALSE(m->get_qmp_event().has_value());
    EXPECT_TRUE(m->get_qmp_events().empty());

    // get_qmp_event(wait): the next event, waited for.
    ASSERT_TRUE(cmd(*m, "stop"));
    auto one = run_co(ioc_, test::event_json(m->get_qmp_event(5s)), 10s);
    ASSERT_TRUE(one) << describe(one.error());
    EXPECT_NE(one->find(R"("event":"STOP")"), std::string::npos) << *one;

    // get_qmp_events(): everything queued, oldest first; the queue is empty afterwards.
    ASSERT_TRUE(cmd(*m, "system_reset"));
    ASSERT_TRUE(cmd(*m, "cont"));
    ASSERT_TRUE(run_until(ioc_, [&] { return client->queued_events() == 2; }, 5s));
    auto all = m->get_qmp_events();
    ASSERT_EQ(all.size(), 2U);
    std::vector<std::string> names{std::string(all[0].name()), std::string(all[1].name())};
    std::sort(names.begin(), names.end());
    EXPECT_EQ(names, (std::vector<std::string>{"RESET", "RESUME"}));
    EXPECT_TRUE(m->get_qmp_events().empty());

    // get_qmp_event(): one at a time, without waiting.
    ASSERT_TRUE(cmd(*m, "stop"));
    ASSERT_TRUE(run_until(ioc_, [&] { return client->queued_events() == 1; }, 5s));
    auto polled = m->get_qmp_event();
    ASSERT_TRUE(polled.has_value());
    EXPECT_EQ(polled->name(), "STOP");
    EXPECT_FALSE(m->get_qmp_event().has_value());

    // get_qmp_events(wait): waits for the first, then takes what else is queued.
    ASSERT_TRUE(cmd(*m, "cont"));
    auto waited = run_co(ioc_, m->get_qmp_events(5s), 10s);
    ASSERT_TRUE(waited) << describe(waited.error());
    ASSERT_EQ(waited->size(), 1U);
    EXPECT_EQ((*waited)[0].name(), "RESUME");
    // Nothing comes: a timeout, not a hang.
    auto none = run_co(ioc_, m->get_qmp_events(100ms), 10s);
    ASSERT_FALSE(none);
    EXPECT_TRUE(none.error().is(errc::timeout)) << describe(none.error());
    ASSERT_TRUE(shutdown(*m));
}

TEST_F(MachineTest, PauseAndResumeAreConfirmedByStopAndResumeEvents)
{
    auto m = make_machine();
    ASSERT_TRUE(launch(*m));
    std::vector<MachineState> states;
    m->on_state_change([&](MachineState s) { states.push_back(s); });

    auto p = run_co(ioc_, m->pause(), 20s);
    ASSERT_TRUE(p) << describe(p.error());
    EXPECT_EQ(m->state(), MachineState::paused);
    EXPECT_EQ(m->qemu_status(), "paused");
    auto st = cmd(*m, "query-status");
    ASSERT_TRUE(st);
    EXPECT_EQ(status_of(*st), "paused");

    auto r = run_co(ioc_, m->resume(), 20s);
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(m->state(), MachineState::running);
    EXPECT_EQ(m->qemu_status(), "running");

    // The state comes from the events, not from our own calls: a raw stop/cont does the same.
    ASSERT_TRUE(cmd(*m, "stop"));
    ASSERT_TRUE(run_until(ioc_, [&] { return m->state() == MachineState::paused; }, 5s));
    ASSERT_TRUE(cmd(*m, "cont"));
    ASSERT_TRUE(run_until(ioc_, [&] { return m->state() == MachineState::running; }, 5s));
    EXPECT_EQ(states, (std::vector<MachineState>{MachineState::paused, MachineState::running,
                                                 MachineState::paused, MachineState::running}));
    ASSERT_TRUE(shutdown(*m));
}

TEST_F(MachineTest, GracefulShutdownQuitsAndASecondShutdownIsANoOp)
{
    auto m = make_machine();
    int exits = 0;
    m->on_exit([&](const proc::ExitStatus&) { ++exits; });
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    const std::string tmp = *m->temp_dir();

    auto r = shutdown(*m);
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(m->exitcode(), 0);
    EXPECT_EQ(m->state(), MachineState::stopped);
    EXPECT_EQ(exits, 1);
    // It was `quit`: QEMU said so before it went, and the event stays readable.
    auto ev = event_wait(*m, "SHUTDOWN", 0ms, R"({"data":{"guest":false,"reason":"host-qmp-quit"}})");
    EXPECT_TRUE(ev) << describe(ev.error());
    expect_nothing_left(*m, pid, tmp);

    // Shut down already: shutdown, kill and wait do nothing.
    EXPECT_TRUE(shutdown(*m));
    EXPECT_TRUE(run_co(ioc_, m->kill()));
    EXPECT_TRUE(run_co(ioc_, m->wait(1s)));
    EXPECT_EQ(exits, 1);
    EXPECT_EQ(m->exitcode(), 0);
    EXPECT_EQ(m->state(), MachineState::stopped);
    EXPECT_TRUE(warnings_.messages().empty()) << testing::PrintToString(warnings_.messages());
}

TEST_F(MachineTest, ConcurrentShutdownsBothWaitForTheOneCleanup)
{
    auto m = make_machine();
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    std::optional<expected<void>> first;
    std::optional<expected<void>> second;
    asio::co_spawn(ioc_, m->shutdown(), [&](const std::exception_ptr&, expected<void> r) {
        first = std::move(r);
    });
    asio::co_spawn(ioc_, m->shutdown(), [&](const std::exception_ptr&, expected<void> r) {
        second = std::move(r);
    });
    ASSERT_TRUE(run_until(ioc_, [&] { return first && second; }, 30s));
    EXPECT_TRUE(*first);
    EXPECT_TRUE(*second);
    EXPECT_EQ(m->exitcode(), 0);
    expect_nothing_left(*m, pid);
}

TEST_F(MachineTest, HardShutdownKillsAtOnceWithoutAWarning)
{
    auto m = make_machine();
    int exits = 0;
    m->on_exit([&](const proc::ExitStatus&) { ++exits; });
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    ShutdownOptions hard;
    hard.hard = true;
    auto r = shutdown(*m, hard);
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(m->exitcode(), -SIGKILL);
    ASSERT_TRUE(m->exit_status());
    EXPECT_EQ(m->exit_status()->kind, proc::ExitStatus::Kind::signaled);
    EXPECT_EQ(m->exit_status()->signal, SIGKILL);
    // We sent it: stopped, not crashed, and no "qemu received signal" warning.
    EXPECT_EQ(m->state(), MachineState::stopped);
    EXPECT_EQ(exits, 1);
    EXPECT_TRUE(warnings_.messages().empty()) << testing::PrintToString(warnings_.messages());
    expect_nothing_left(*m, pid);
}

TEST_F(MachineTest, KillIsAHardShutdown)
{
    auto m = make_machine();
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    auto r = run_co(ioc_, m->kill(), 90s);
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(m->exitcode(), -SIGKILL);
    EXPECT_EQ(m->state(), MachineState::stopped);
    EXPECT_TRUE(warnings_.messages().empty()) << testing::PrintToString(warnings_.messages());
    expect_nothing_left(*m, pid);
}

TEST_F(MachineTest, WaitReturnsOnceQemuQuitsOnItsOwn)
{
    auto m = make_machine();
    int exits = 0;
    m->on_exit([&](const proc::ExitStatus&) { ++exits; });
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    // -machine none has no guest to power off: the test sends quit itself, as a guest would
    // shut down; wait() only waits.
    auto q = cmd(*m, "quit");
    ASSERT_TRUE(q) << describe(q.error());
    auto r = run_co(ioc_, m->wait(10s), 30s);
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(m->exitcode(), 0);
    EXPECT_EQ(m->state(), MachineState::stopped);
    EXPECT_EQ(exits, 1);
    expect_nothing_left(*m, pid);
}

TEST_F(MachineTest, ShutdownWithHasQuitDoesNotSendQuitAgain)
{
    auto m = make_machine();
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    ASSERT_TRUE(cmd(*m, "quit"));
    ShutdownOptions options;
    options.has_quit = true;
    options.timeout = 10s;
    auto r = shutdown(*m, options);
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(m->exitcode(), 0);
    expect_nothing_left(*m, pid);
}

TEST_F(MachineTest, WaitForAMachineThatNeverQuitsEndsInAbnormalShutdown)
{
    auto m = make_machine();
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    const auto start = std::chrono::steady_clock::now();
    auto r = run_co(ioc_, m->wait(300ms), 30s);
    const auto elapsed = std::chrono::steady_clock::now() - start;
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::abnormal_shutdown)) << describe(r.error());
    EXPECT_NE(r.error().message.find("graceful"), std::string::npos) << r.error().message;
    EXPECT_GE(elapsed, 300ms);
    EXPECT_LT(elapsed, 10s);
    EXPECT_EQ(m->exitcode(), -SIGKILL);
    EXPECT_NE(m->state(), MachineState::crashed);
    expect_nothing_left(*m, pid);
}

TEST_F(MachineTest, RelaunchAfterShutdownStartsAFreshQemu)
{
    auto m = make_machine();
    int exits = 0;
    m->on_exit([&](const proc::ExitStatus&) { ++exits; });
    ASSERT_TRUE(launch(*m));
    const pid_t first = *m->pid();
    ASSERT_TRUE(cmd(*m, "stop"));
    ASSERT_TRUE(run_until(ioc_, [&] { return m->state() == MachineState::paused; }, 5s));
    ASSERT_TRUE(shutdown(*m));
    EXPECT_EQ(exits, 1);

    auto r = launch(*m);
    ASSERT_TRUE(r) << describe(r.error());
    ASSERT_TRUE(m->pid().has_value());
    const pid_t second = *m->pid();
    EXPECT_NE(second, first);
    EXPECT_TRUE(process_gone(first));
    EXPECT_EQ(m->exitcode(), std::nullopt) << "the last run's status is not this one's";
    // A fresh QEMU: running again, and none of the first run's events.
    EXPECT_EQ(m->state(), MachineState::running);
    auto st = cmd(*m, "query-status");
    ASSERT_TRUE(st) << describe(st.error());
    EXPECT_EQ(status_of(*st), "running");
    EXPECT_TRUE(m->get_qmp_events().empty());

    // And a third time after a hard kill.
    ASSERT_TRUE(run_co(ioc_, m->kill(), 90s));
    ASSERT_TRUE(launch(*m));
    const pid_t third = *m->pid();
    ASSERT_TRUE(shutdown(*m));
    EXPECT_EQ(exits, 3);
    EXPECT_EQ(m->exitcode(), 0);
    expect_nothing_left(*m, second);
    EXPECT_TRUE(process_gone(third));
}

TEST_F(MachineTest, WithoutQmpLaunchIsImmediateAndShutdownAsksWithSigterm)
{
    auto m = make_machine();
    m->set_qmp_monitor(false);
    const auto argv = m->full_args();
    EXPECT_EQ(std::find(argv.begin(), argv.end(), "-mon"), argv.end());
    ASSERT_TRUE(launch(*m));
    EXPECT_EQ(m->state(), MachineState::running);
    const pid_t pid = *m->pid();
    EXPECT_FALSE(fs::exists(monitor_path(*m)));
    auto c = cmd(*m, "query-status");
    ASSERT_FALSE(c);
    EXPECT_TRUE(c.error().is(errc::invalid_state)) << describe(c.error());
    auto ev = event_wait(*m, "STOP", 0ms);
    ASSERT_FALSE(ev);
    EXPECT_TRUE(ev.error().is(errc::invalid_state)) << describe(ev.error());

    // Nothing tells us QEMU is up without a monitor: wait until it handles SIGTERM.
    ASSERT_TRUE(run_until(ioc_, [&] { return test::catches_signal(pid, SIGTERM); }, 10s));
    auto r = shutdown(*m);
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(m->exitcode(), 0);
    EXPECT_EQ(m->state(), MachineState::stopped);
    EXPECT_NE(m->get_log().find("terminating on signal 15"), std::string::npos) << m->get_log();
    expect_nothing_left(*m, pid);
}

TEST_F(MachineTest, MonitorNullAddsAnHmpMonitorBesideQmp)
{
    auto m = make_machine();
    m->add_monitor_null();
    ASSERT_TRUE(launch(*m));
    auto chardevs = cmd(*m, "query-chardev");
    ASSERT_TRUE(chardevs) << describe(chardevs.error());
    ASSERT_TRUE(chardevs->IsArray());
    bool found = false;
    for (const auto& c : chardevs->GetArray()) {
        if (json::get_string(c, "filename") == "null" &&
            json::get_string(c, "label").value_or("").find("monitor") != std::string_view::npos) {
            found = true;
        }
    }
    EXPECT_TRUE(found) << json::to_string(*chardevs);
    ASSERT_TRUE(shutdown(*m));
}

TEST_F(MachineTest, TcpMonitorAddressIsListenedOnAndQemuConnects)
{
    const std::uint16_t port = test::free_tcp_port();
    ASSERT_NE(port, 0);
    auto c = config();
    auto addr = qmp::Address::parse(fmt::format("127.0.0.1:{}", port));
    ASSERT_TRUE(addr);
    c.monitor_address = *addr;
    auto m = make_machine(c);
    const auto argv = m->full_args();
    EXPECT_NE(std::find(argv.begin(), argv.end(),
                        fmt::format("socket,id=mon,host=127.0.0.1,port={}", port)),
              argv.end())
        << testing::PrintToString(argv);
    auto r = launch(*m);
    ASSERT_TRUE(r) << describe(r.error());
    auto st = cmd(*m, "query-status");
    ASSERT_TRUE(st) << describe(st.error());
    EXPECT_EQ(status_of(*st), "running");
    const pid_t pid = *m->pid();
    ASSERT_TRUE(shutdown(*m));
    EXPECT_EQ(m->exitcode(), 0);
    expect_nothing_left(*m, pid);
}

TEST_F(MachineTest, WrapperRunsBeforeQemu)
{
    auto c = config();
    c.wrapper = {"env", "QM_WRAPPED=yes"};
    auto m = make_machine(c);
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    // env exec'd QEMU: same process, the wrapper's mark in its environment.
    const auto env = test::read_nul_list(fmt::format("/proc/{}/environ", pid));
    EXPECT_NE(std::find(env.begin(), env.end(), "QM_WRAPPED=yes"), env.end());
    const auto argv = test::read_nul_list(fmt::format("/proc/{}/cmdline", pid));
    ASSERT_FALSE(argv.empty());
    EXPECT_EQ(argv[0], c.binary);
    ASSERT_TRUE(shutdown(*m));
    expect_nothing_left(*m, pid);
}

TEST_F(MachineTest, ConsoleSocketIsServedByQemuAndRemovedAtCleanup)
{
    auto c = config("m-console");
    c.console_log = (fs::temp_directory_path() / "m-console-guest.log").string();
    auto m = make_machine(c);
    m->set_console();
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    EXPECT_TRUE(fs::is_socket(m->console_socket_path())) << m->console_socket_path();
    EXPECT_TRUE(fs::exists(c.console_log)) << "QEMU opens the console log itself";
    ASSERT_TRUE(shutdown(*m));
    EXPECT_FALSE(fs::exists(m->console_socket_path()));
    EXPECT_TRUE(fs::exists(c.console_log)) << "the console log is the caller's";
    fs::remove(c.console_log);
    expect_nothing_left(*m, pid);
}

TEST_F(MachineTest, ConsoleIsConnectedAtLaunchAndShutdownEndsPendingWaitsAtOnce)
{
    auto m = make_machine("m-console-conn");
    m->set_console();
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    auto first = m->console();
    ASSERT_NE(first, nullptr);
    EXPECT_TRUE(first->is_connected()) << "connected by launch()";
    EXPECT_EQ(m->console_offset(), 0U) << "-machine none has no serial port to write to it";
    auto written = run_co(ioc_, m->console_write("hello\n"), 10s);
    EXPECT_TRUE(written) << describe(written.error());

    std::optional<expected<ConsoleMatch>> waited;
    asio::co_spawn(ioc_, m->wait_console("never", 60s),
                   [&](const std::exception_ptr&, expected<ConsoleMatch> r) {
                       waited = std::move(r);
                   });
    ioc_.restart();
    ioc_.poll();
    ASSERT_FALSE(waited.has_value());
    const auto start = std::chrono::steady_clock::now();
    ASSERT_TRUE(shutdown(*m));
    ASSERT_TRUE(run_until(ioc_, [&] { return waited.has_value(); }, 5s));
    EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
    ASSERT_FALSE(*waited);
    EXPECT_TRUE(waited->error().is(errc::invalid_state)) << describe(waited->error());
    EXPECT_TRUE(first->is_closed());
    EXPECT_FALSE(fs::exists(m->console_socket_path()));

    // A relaunch gets a new connection, counting from 0 again.
    ASSERT_TRUE(launch(*m));
    const pid_t pid2 = *m->pid();
    ASSERT_NE(m->console(), first);
    EXPECT_TRUE(m->console()->is_connected());
    EXPECT_EQ(m->console_offset(), 0U);
    ASSERT_TRUE(shutdown(*m));
    expect_nothing_left(*m, pid);
    expect_nothing_left(*m, pid2);
}

TEST_F(MachineTest, ShutdownStepSaysWhatEndedTheProcess)
{
    auto m = make_machine("m-steps");
    ASSERT_TRUE(launch(*m));
    ASSERT_TRUE(shutdown(*m));
    EXPECT_EQ(m->last_shutdown_step(), ShutdownStep::quit);

    ASSERT_TRUE(launch(*m));
    EXPECT_EQ(m->last_shutdown_step(), ShutdownStep::none) << "reset by launch()";
    ASSERT_TRUE(run_co(ioc_, m->kill(), 90s));
    EXPECT_EQ(m->last_shutdown_step(), ShutdownStep::kill);

    // Killed from outside, then shut down: it had exited by itself.
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    ASSERT_TRUE(run_until(ioc_, [&] { return !m->is_running(); }, 10s));
    ASSERT_TRUE(shutdown(*m));
    EXPECT_EQ(m->last_shutdown_step(), ShutdownStep::exited);
    expect_nothing_left(*m, pid);
}

TEST_F(MachineTest, PowerdownModeWithNoGuestToAnswerEndsInQuitAfterTheTimeout)
{
    // -machine none has no ACPI: the button press changes nothing, and quit ends QEMU after the
    // guest's time.
    auto m = make_machine("m-powerdown");
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    ShutdownOptions options;
    options.mode = ShutdownMode::powerdown;
    options.powerdown_timeout = 300ms;
    const auto start = std::chrono::steady_clock::now();
    auto r = shutdown(*m, options);
    const auto elapsed = std::chrono::steady_clock::now() - start;
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_GE(elapsed, 300ms);
    EXPECT_LT(elapsed, 10s);
    EXPECT_EQ(m->last_shutdown_step(), ShutdownStep::quit);
    EXPECT_EQ(m->exitcode(), 0);
    auto shutdown_event = event_wait(*m, "SHUTDOWN", 0ms);
    ASSERT_TRUE(shutdown_event) << describe(shutdown_event.error());
    EXPECT_NE(shutdown_event->find("host-qmp-quit"), std::string::npos) << *shutdown_event;
    expect_nothing_left(*m, pid);

    // Without a monitor there is no button to press: straight to the quit step (SIGTERM).
    auto plain = make_machine("m-powerdown-noqmp");
    plain->set_qmp_monitor(false);
    ASSERT_TRUE(launch(*plain));
    const pid_t pid2 = *plain->pid();
    options.powerdown_timeout = 30s;
    const auto start2 = std::chrono::steady_clock::now();
    ASSERT_TRUE(shutdown(*plain, options));
    EXPECT_LT(std::chrono::steady_clock::now() - start2, 10s);
    EXPECT_EQ(plain->last_shutdown_step(), ShutdownStep::quit);
    expect_nothing_left(*plain, pid2);
}

TEST_F(MachineTest, AddFdPassesARealDescriptorThatQemuListsInItsFdset)
{
    Pipe passed;
    Pipe leaky(0); // no O_CLOEXEC: spawn must still keep it from QEMU
    ASSERT_GE(passed.fds[0], 0);
    ASSERT_GE(leaky.fds[0], 0);
    auto m = make_machine();
    ASSERT_TRUE(m->add_fd(passed.fds[1], 7, "qm,opaque"));
    EXPECT_EQ(m->args(), (std::vector<std::string>{"-add-fd", "fd=3,set=7,opaque=qm,,opaque"}));
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();

    auto fdsets = cmd(*m, "query-fdsets");
    ASSERT_TRUE(fdsets) << describe(fdsets.error());
    ASSERT_TRUE(fdsets->IsArray() && fdsets->Size() == 1) << json::to_string(*fdsets);
    const json::Value& set = (*fdsets)[0];
    EXPECT_EQ(json::get_int(set, "fdset-id"), 7) << json::to_string(set);
    const json::Value* fds = json::find(set, "fds");
    ASSERT_TRUE(fds != nullptr && fds->IsArray() && fds->Size() == 1) << json::to_string(set);
    EXPECT_EQ(json::get_string((*fds)[0], "opaque"), "qm,opaque") << json::to_string(set);
    // QEMU got it as fd 3 (-add-fd fd=3) and keeps a close-on-exec duplicate of it, whose
    // number query-fdsets reports: that descriptor is our pipe.
    const auto qemu_fd = json::get_int((*fds)[0], "fd");
    ASSERT_TRUE(qemu_fd.has_value()) << json::to_string(set);
    std::error_code ec;
    EXPECT_EQ(fs::read_symlink(fmt::format("/proc/{}/fd/{}", pid, *qemu_fd), ec).string(),
              passed.link());
    // The descriptor without O_CLOEXEC did not cross exec.
    for (const auto& e : fs::directory_iterator(fmt::format("/proc/{}/fd", pid))) {
        const auto target = fs::read_symlink(e.path(), ec).string();
        EXPECT_NE(target, leaky.link()) << "QEMU inherited fd " << e.path().filename();
    }
    ASSERT_TRUE(shutdown(*m));
    expect_nothing_left(*m, pid);
}

TEST_F(MachineTest, SendFdPassesADescriptorAtRunTime)
{
    // The seed's send_fd_scm (through socket_scm_helper) is send_fd (SCM_RIGHTS on the QMP
    // socket, with getfd).
    Pipe pipe;
    ASSERT_GE(pipe.fds[0], 0);
    auto m = make_machine();
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    auto r = run_co(ioc_, m->send_fd(pipe.fds[1], "fd0"), 30s);
    ASSERT_TRUE(r) << describe(r.error());
    bool held = false;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(fmt::format("/proc/{}/fd", pid))) {
        held = held || fs::read_symlink(e.path(), ec).string() == pipe.link();
    }
    EXPECT_TRUE(held) << "QEMU does not hold the descriptor";
    // QEMU knows it by that name: closefd accepts it once.
    EXPECT_TRUE(cmd(*m, "closefd", R"({"fdname":"fd0"})"));
    auto again = cmd(*m, "closefd", R"({"fdname":"fd0"})");
    ASSERT_FALSE(again);
    EXPECT_TRUE(again.error().is(errc::qmp_command_failed)) << describe(again.error());
    // Our descriptor stays ours.
    EXPECT_GE(::fcntl(pipe.fds[1], F_GETFD), 0);
    ASSERT_TRUE(shutdown(*m));
    auto after = run_co(ioc_, m->send_fd(pipe.fds[1], "fd1"), 30s);
    ASSERT_FALSE(after);
    EXPECT_TRUE(after.error().is(errc::invalid_state)) << describe(after.error());
    expect_nothing_left(*m, pid);
}

TEST_F(MachineTest, LogGoesToLogDirAndIsReadableAfterExit)
{
    const fs::path logs = fs::temp_directory_path() / "m-logs";
    fs::create_directory(logs);
    auto c = config("m-log");
    c.log_dir = logs.string();
    auto m = make_machine(c);
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    EXPECT_EQ(m->log_path(), (logs / "m-log.log").string());
    // With a log_dir nothing needed the temp dir: it was never created.
    EXPECT_TRUE(test::temp_entries("qemu-machine-").empty());

    // QEMU writes to its log when told to terminate from outside (and exits normally).
    ASSERT_EQ(::kill(pid, SIGTERM), 0);
    ASSERT_TRUE(run_until(ioc_, [&] { return !m->is_running(); }, 10s));
    EXPECT_EQ(m->exitcode(), 0);
    EXPECT_EQ(m->state(), MachineState::stopped);
    ASSERT_TRUE(shutdown(*m));
    EXPECT_NE(m->get_log().find("terminating on signal 15"), std::string::npos) << m->get_log();
    EXPECT_EQ(test::read_file(logs / "m-log.log"), m->get_log()) << "the log file stays";

    // The next launch truncates it (the seed's 'wb').
    ASSERT_TRUE(launch(*m));
    ASSERT_TRUE(shutdown(*m));
    EXPECT_EQ(m->get_log().find("terminating on signal"), std::string::npos) << m->get_log();
    expect_nothing_left(*m, pid);
    fs::remove_all(logs);
}

TEST_F(MachineTest, LogAppendKeepsEveryRunsOutput)
{
    const fs::path logs = fs::temp_directory_path() / "m-logs";
    fs::create_directory(logs);
    auto c = config("m-log");
    c.log_dir = logs.string();
    c.log_append = true;
    auto m = make_machine(c);
    for (int run = 0; run < 2; ++run) {
        ASSERT_TRUE(launch(*m));
        const pid_t pid = *m->pid();
        ASSERT_EQ(::kill(pid, SIGTERM), 0);
        ASSERT_TRUE(run_until(ioc_, [&] { return !m->is_running(); }, 10s));
        ASSERT_TRUE(shutdown(*m));
    }
    const std::string log = m->get_log();
    const auto first = log.find("terminating on signal 15");
    ASSERT_NE(first, std::string::npos) << log;
    EXPECT_NE(log.find("terminating on signal 15", first + 1), std::string::npos) << log;
    fs::remove_all(logs);
}

} // namespace
} // namespace qm
