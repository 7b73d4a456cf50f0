// SPDX-License-Identifier: GPL-2.0-or-later
// qm::Machine when things go wrong, with a real QEMU: failed launches (bad binary, bad argument,
// an early exit, no connection or no greeting in time, a socket path too long), QEMU killed or
// frozen from outside, a machine destroyed while running, and 50 machines on one loop.
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/json.hpp"
#include "libmachine/machine/machine.hpp"
#include "libmachine/proc/child_watcher.hpp"
#include "tests/machine/machine_fixture.hpp"

#ifndef QM_SILENT_QMP_PEER
#error "QM_SILENT_QMP_PEER must name the silent_qmp_peer helper (tests/machine/meson.build)"
#endif

namespace qm {
namespace {

using test::describe;
using test::process_gone;
using test::run_co;
using test::run_until;
namespace fs = std::filesystem;

bool contains(const std::string& haystack, const std::string& needle)
{
    return haystack.find(needle) != std::string::npos;
}

class MachineFaultTest : public test::MachineFixture
{
protected:
    // Records every state and exit of `m`, and the pid it had while starting.
    void record(Machine& m)
    {
        m.on_state_change([this, &m](MachineState s) {
            states_.push_back(s);
            if (s == MachineState::starting && m.pid()) {
                started_pid_ = *m.pid();
            }
        });
        m.on_exit([this](const proc::ExitStatus& s) { exits_.push_back(s); });
    }

    // A failed launch: the error, within `max` (not the whole qmp_timer), leaving nothing.
    Error expect_failed_launch(Machine& m, std::chrono::milliseconds max = 10s)
    {
        const auto start = std::chrono::steady_clock::now();
        auto r = launch(m);
        elapsed_ = std::chrono::steady_clock::now() - start;
        EXPECT_FALSE(r) << "launch succeeded";
        if (r) {
            return Error{};
        }
        EXPECT_LT(elapsed_, max);
        EXPECT_EQ(m.state(), MachineState::failed);
        expect_nothing_left(m, started_pid_);
        EXPECT_TRUE(contains(r.error().message, "Command line: ")) << r.error().message;
        return r.error();
    }

    std::vector<MachineState> states_;
    std::vector<proc::ExitStatus> exits_;
    pid_t started_pid_ = -1;
    std::chrono::steady_clock::duration elapsed_{};
};

TEST_F(MachineFaultTest, MissingBinaryFailsTheLaunchWithTheCommandLine)
{
    auto c = config();
    c.binary = (fs::temp_directory_path() / "no-such-qemu").string();
    auto m = make_machine(c);
    record(*m);
    const Error e = expect_failed_launch(*m);
    EXPECT_TRUE(e.is(errc::spawn_failed)) << describe(e);
    EXPECT_TRUE(contains(e.message, "Command line: " + c.binary + " -display none -vga none"))
        << e.message;
    EXPECT_TRUE(contains(e.message, "No such file or directory")) << e.message;
    EXPECT_EQ(started_pid_, -1) << "no process was ever started";
    EXPECT_TRUE(exits_.empty());

    // A name searched in PATH fails the same way.
    auto c2 = config();
    c2.binary = "qm-no-such-qemu-binary";
    auto m2 = make_machine(c2);
    const Error e2 = expect_failed_launch(*m2);
    EXPECT_TRUE(e2.is(errc::spawn_failed)) << describe(e2);
    EXPECT_TRUE(contains(e2.message, "qm-no-such-qemu-binary")) << e2.message;
}

TEST_F(MachineFaultTest, InvalidArgumentFailsAtOnceWithQemusMessage)
{
    auto m = make_machine();
    record(*m);
    m->add_args({"-no-such-option"});
    const Error e = expect_failed_launch(*m, 5s); // qmp_timer is 20 s: QEMU's exit ends it
    EXPECT_TRUE(e.is(errc::spawn_failed)) << describe(e);
    EXPECT_TRUE(contains(e.message, "invalid option")) << e.message;
    EXPECT_TRUE(contains(e.message, "-no-such-option")) << e.message;
    EXPECT_TRUE(contains(e.message, "exited with status 1")) << e.message;
    EXPECT_TRUE(contains(m->get_log(), "invalid option")) << m->get_log();
    EXPECT_EQ(m->exitcode(), 1);
    ASSERT_EQ(exits_.size(), 1U);
    EXPECT_TRUE(process_gone(started_pid_));
    // A failed launch may be retried (and fails again the same way).
    const Error again = expect_failed_launch(*m, 5s);
    EXPECT_TRUE(again.is(errc::spawn_failed)) << describe(again);
}

TEST_F(MachineFaultTest, ProcessExitingBeforeItConnectsFailsAtOnceWithItsOutput)
{
    auto c = config();
    c.wrapper = {"sh", "-c", "echo wrapper gives up >&2; exit 3", "--"};
    auto m = make_machine(c);
    record(*m);
    const Error e = expect_failed_launch(*m, 5s);
    EXPECT_TRUE(e.is(errc::spawn_failed)) << describe(e);
    EXPECT_TRUE(contains(e.message, "exited with status 3")) << e.message;
    EXPECT_TRUE(contains(e.message, "Output: wrapper gives up")) << e.message;
    EXPECT_TRUE(contains(e.message, "Command line: sh -c 'echo wrapper gives up >&2; exit 3' -- "))
        << e.message;
    EXPECT_EQ(m->exitcode(), 3);
}

TEST_F(MachineFaultTest, NoConnectionWithinQmpTimerFailsWithTimeoutAndKillsTheProcess)
{
    auto c = config();
    // sh execs sleep, which never connects; the wrapper's arguments end with "--", so QEMU's
    // command line becomes sh's ignored positional parameters.
    c.wrapper = {"sh", "-c", "exec sleep 30", "--"};
    c.qmp_timer = 300ms;
    auto m = make_machine(c);
    record(*m);
    const Error e = expect_failed_launch(*m, 5s);
    EXPECT_TRUE(e.is(errc::timeout)) << describe(e);
    EXPECT_GE(elapsed_, 300ms);
    EXPECT_TRUE(contains(e.message, "Command line: sh -c 'exec sleep 30' -- ")) << e.message;
    ASSERT_GT(started_pid_, 0);
    EXPECT_TRUE(process_gone(started_pid_)) << "the sleep was not killed and reaped";
    ASSERT_EQ(exits_.size(), 1U);
    EXPECT_EQ(exits_[0].signal, SIGKILL);
    EXPECT_EQ(states_.back(), MachineState::failed);
}

TEST_F(MachineFaultTest, AProcessKilledByAFailedLaunchIsNeitherACrashNorWarnedAbout)
{
    auto c = config();
    c.wrapper = {"sh", "-c", "exec sleep 30", "--"};
    c.qmp_timer = 300ms;
    auto m = make_machine(c);
    record(*m);
    const Error e = expect_failed_launch(*m, 5s);
    EXPECT_TRUE(e.is(errc::timeout)) << describe(e);
    // The machine sent that SIGKILL itself: the seed warns only about a signal QEMU was not
    // sent by us, and a supervisor must see a failed launch, not a crash.
    EXPECT_EQ(states_, (std::vector<MachineState>{MachineState::starting, MachineState::failed}));
    EXPECT_TRUE(warnings_.messages().empty()) << testing::PrintToString(warnings_.messages());
}

TEST_F(MachineFaultTest, NoGreetingWithinQmpTimerFailsWithTimeoutAndKillsTheProcess)
{
    auto c = config();
    c.wrapper = {QM_SILENT_QMP_PEER};
    c.qmp_timer = 300ms;
    auto m = make_machine(c);
    record(*m);
    const Error e = expect_failed_launch(*m, 5s);
    EXPECT_TRUE(e.is(errc::timeout)) << describe(e);
    EXPECT_GE(elapsed_, 300ms);
    EXPECT_TRUE(contains(e.message, "saying nothing")) << "the peer's output is missing: "
                                                        << e.message;
    ASSERT_GT(started_pid_, 0);
    EXPECT_TRUE(process_gone(started_pid_));
}

TEST_F(MachineFaultTest, GetLogKeepsTheLast64KiBOfALongOutput)
{
    auto c = config();
    c.wrapper = {"sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x; echo; echo THE-END; exit 1",
                 "--"};
    auto m = make_machine(c);
    const Error e = expect_failed_launch(*m, 5s);
    EXPECT_TRUE(e.is(errc::spawn_failed)) << describe(e);
    const std::string& log = m->get_log();
    EXPECT_EQ(log.size(), 64U * 1024U);
    EXPECT_EQ(log.substr(log.size() - 9), "\nTHE-END\n");
    EXPECT_EQ(log.find_first_not_of('x'), log.size() - 9);
}

TEST_F(MachineFaultTest, MonitorPathTooLongForAUnixSocketIsAClearError)
{
    auto c = config();
    c.sock_dir = (fs::temp_directory_path() / std::string(120, 'd')).string();
    auto m = make_machine(c);
    record(*m);
    const auto path = monitor_path(*m);
    auto r = launch(*m);
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::invalid_argument) || r.error().is(errc::connect_failed))
        << describe(r.error());
    EXPECT_TRUE(contains(r.error().message, path)) << r.error().message;
    EXPECT_EQ(m->state(), MachineState::failed);
    EXPECT_EQ(started_pid_, -1) << "QEMU was started anyway";
    expect_nothing_left(*m, -1);
}

TEST_F(MachineFaultTest, ConsolePathTooLongForAUnixSocketIsAClearError)
{
    auto c = config();
    c.sock_dir = (fs::temp_directory_path() / std::string(120, 'd')).string();
    auto addr = qmp::Address::parse(fmt::format("127.0.0.1:{}", test::free_tcp_port()));
    ASSERT_TRUE(addr);
    c.monitor_address = *addr;
    auto m = make_machine(c);
    record(*m);
    m->set_console();
    auto r = launch(*m);
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::invalid_argument)) << describe(r.error());
    EXPECT_TRUE(contains(r.error().message, m->console_socket_path())) << r.error().message;
    EXPECT_EQ(started_pid_, -1);
    expect_nothing_left(*m, -1);
}

TEST_F(MachineFaultTest, QemuKilledFromOutsideIsNoticedAtOnce)
{
    auto m = make_machine();
    ASSERT_TRUE(launch(*m));
    record(*m);
    const pid_t pid = *m->pid();
    const std::string tmp = *m->temp_dir();

    // A stopped QEMU cannot answer: the command stays pending until QEMU dies.
    ASSERT_EQ(::kill(pid, SIGSTOP), 0);
    std::optional<expected<json::Document>> pending;
    asio::co_spawn(ioc_, m->cmd("query-status"),
                   [&](const std::exception_ptr& ex, expected<json::Document> r) {
                       if (ex) {
                           ADD_FAILURE() << "cmd threw";
                       }
                       pending = std::move(r);
                   });
    ASSERT_TRUE(run_until(ioc_, [&] { return m->qmp_client()->pending_commands() == 1; }, 5s));
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    const auto killed = std::chrono::steady_clock::now();

    // Nobody calls the machine: the child watcher sees the exit and the machine reacts, at once
    // (no polling interval).
    ASSERT_TRUE(run_until(ioc_, [&] { return pending.has_value() && !exits_.empty(); }, 5s));
    EXPECT_LT(std::chrono::steady_clock::now() - killed, 1s);
    ASSERT_FALSE(*pending);
    // The socket's reset or the watcher's exit report, whichever the loop sees first.
    EXPECT_TRUE(pending->error().is(errc::qmp_disconnected)) << describe(pending->error());
    EXPECT_EQ(m->state(), MachineState::crashed);
    EXPECT_EQ(m->exitcode(), -SIGKILL);
    ASSERT_TRUE(m->exit_status());
    EXPECT_EQ(m->exit_status()->kind, proc::ExitStatus::Kind::signaled);
    EXPECT_EQ(m->exit_status()->signal, SIGKILL);
    EXPECT_FALSE(m->is_running());
    EXPECT_EQ(m->pid(), std::nullopt);
    EXPECT_FALSE(m->qmp_client()->is_connected());
    EXPECT_TRUE(process_gone(pid)) << "not reaped";
    auto late = cmd(*m, "query-status");
    ASSERT_FALSE(late);
    EXPECT_TRUE(late.error().is(errc::invalid_state)) << describe(late.error());

    // Cleanup still runs, reports nothing again, and warns (the seed's warning) about a signal
    // QEMU was not sent by us.
    auto r = shutdown(*m);
    EXPECT_TRUE(r) << describe(r.error());
    EXPECT_EQ(exits_.size(), 1U) << "on_exit must be called once";
    EXPECT_EQ(m->state(), MachineState::crashed);
    const auto warned = warnings_.messages();
    ASSERT_EQ(warned.size(), 1U) << testing::PrintToString(warned);
    EXPECT_TRUE(contains(warned[0], "qemu received signal 9")) << warned[0];
    EXPECT_TRUE(contains(warned[0], m->config().binary + " -display none")) << warned[0];
    expect_nothing_left(*m, pid, tmp);
}

TEST_F(MachineFaultTest, AKilledQemuIsNeverReportedAsUnresponsive)
{
    // The QMP socket's reset and SIGCHLD race; whichever comes first, a dead process is
    // "crashed" and was never "unresponsive" (which says the process lives). A few rounds, so
    // that both orders are likely to occur.
    for (int round = 0; round < 3; ++round) {
        auto m = make_machine();
        ASSERT_TRUE(launch(*m));
        std::vector<MachineState> states;
        m->on_state_change([&](MachineState s) { states.push_back(s); });
        const pid_t pid = *m->pid();
        ASSERT_EQ(::kill(pid, SIGKILL), 0);
        ASSERT_TRUE(run_until(ioc_, [&] { return !m->is_running(); }, 5s));
        EXPECT_EQ(states, (std::vector<MachineState>{MachineState::crashed})) << "round " << round;
        EXPECT_TRUE(shutdown(*m));
    }
}

TEST_F(MachineFaultTest, AQuitNotSentByTheMachineIsNeverReportedAsUnresponsive)
{
    // What a guest powering off looks like: SHUTDOWN, the monitor closes, the process exits 0.
    auto m = make_machine();
    ASSERT_TRUE(launch(*m));
    std::vector<MachineState> states;
    m->on_state_change([&](MachineState s) { states.push_back(s); });
    ASSERT_TRUE(cmd(*m, "quit"));
    ASSERT_TRUE(run_until(ioc_, [&] { return !m->is_running(); }, 10s));
    EXPECT_EQ(m->exitcode(), 0);
    EXPECT_EQ(states, (std::vector<MachineState>{MachineState::stopping, MachineState::stopped}));
    EXPECT_TRUE(run_co(ioc_, m->wait(10s)));
}

TEST_F(MachineFaultTest, FrozenQemuFailsTheGracefulShutdownAndIsKilled)
{
    auto m = make_machine();
    ASSERT_TRUE(launch(*m));
    record(*m);
    const pid_t pid = *m->pid();
    const std::string tmp = *m->temp_dir();
    ASSERT_EQ(::kill(pid, SIGSTOP), 0);

    ShutdownOptions options;
    options.timeout = 300ms;
    const auto start = std::chrono::steady_clock::now();
    auto r = shutdown(*m, options);
    const auto elapsed = std::chrono::steady_clock::now() - start;
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::abnormal_shutdown)) << describe(r.error());
    EXPECT_TRUE(contains(r.error().message, "graceful")) << r.error().message;
    EXPECT_GE(elapsed, 300ms);
    EXPECT_LT(elapsed, 10s);
    EXPECT_EQ(m->exitcode(), -SIGKILL);
    EXPECT_EQ(exits_.size(), 1U);
    EXPECT_NE(m->state(), MachineState::crashed);
    EXPECT_EQ(m->last_shutdown_step(), ShutdownStep::kill);
    expect_nothing_left(*m, pid, tmp);
}

TEST_F(MachineFaultTest, ShutdownDuringLaunchKillsTheProcessAndFailsTheLaunch)
{
    auto c = config();
    c.wrapper = {"sh", "-c", "exec sleep 30", "--"};
    auto m = make_machine(c);
    record(*m);
    std::optional<expected<void>> launched;
    asio::co_spawn(ioc_, m->launch(), [&](const std::exception_ptr&, expected<void> r) {
        launched = std::move(r);
    });
    ASSERT_TRUE(run_until(ioc_, [&] { return started_pid_ > 0; }, 5s));
    const auto start = std::chrono::steady_clock::now();
    auto r = shutdown(*m);
    EXPECT_TRUE(r) << describe(r.error());
    ASSERT_TRUE(run_until(ioc_, [&] { return launched.has_value(); }, 5s));
    EXPECT_LT(std::chrono::steady_clock::now() - start, 5s) << "waited for qmp_timer";
    ASSERT_FALSE(*launched);
    EXPECT_EQ(m->state(), MachineState::failed);
    expect_nothing_left(*m, started_pid_);
}

TEST_F(MachineFaultTest, DestroyingARunningMachineKillsItAndTheWatcherReapsIt)
{
    auto m = make_machine();
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    const std::string tmp = *m->temp_dir();
    const std::string sock = monitor_path(*m);
    m.reset();
    EXPECT_FALSE(fs::exists(tmp));
    ASSERT_TRUE(run_until(ioc_, [&] { return process_gone(pid); }, 10s))
        << "no zombie, ever: the watcher reaps a forgotten child";
    EXPECT_FALSE(fs::exists(sock));
}

class MachineScaleTest : public test::MachineFixture
{
};

TEST_F(MachineScaleTest, FiftyMachinesLaunchAndShutDownConcurrentlyOnOneLoop)
{
    constexpr std::size_t count = 50;
    std::vector<std::unique_ptr<Machine>> machines;
    for (std::size_t i = 0; i < count; ++i) {
        machines.push_back(make_machine()); // default names: qemu-PID-N, all different
    }
    std::vector<std::optional<expected<void>>> launched(count);
    for (std::size_t i = 0; i < count; ++i) {
        asio::co_spawn(ioc_, machines[i]->launch(),
                       [&launched, i](const std::exception_ptr& ex, expected<void> r) {
                           if (ex) {
                               ADD_FAILURE() << "launch " << i << " threw";
                           }
                           launched[i] = std::move(r);
                       });
    }
    ASSERT_TRUE(run_until(
        ioc_,
        [&] {
            return std::all_of(launched.begin(), launched.end(),
                               [](const auto& r) { return r.has_value(); });
        },
        60s));
    std::set<pid_t> pids;
    std::set<std::string> names;
    for (std::size_t i = 0; i < count; ++i) {
        ASSERT_TRUE(*launched[i]) << i << ": " << describe(launched[i]->error());
        ASSERT_TRUE(machines[i]->pid().has_value());
        pids.insert(*machines[i]->pid());
        names.insert(machines[i]->name());
        EXPECT_EQ(machines[i]->state(), MachineState::running) << i;
    }
    EXPECT_EQ(pids.size(), count);
    EXPECT_EQ(names.size(), count);
    // One watcher for all of them.
    EXPECT_EQ(proc::ChildWatcher::get(ioc_).watched(), count);

    std::vector<std::optional<expected<void>>> stopped(count);
    for (std::size_t i = 0; i < count; ++i) {
        asio::co_spawn(ioc_, machines[i]->shutdown(),
                       [&stopped, i](const std::exception_ptr& ex, expected<void> r) {
                           if (ex) {
                               ADD_FAILURE() << "shutdown " << i << " threw";
                           }
                           stopped[i] = std::move(r);
                       });
    }
    ASSERT_TRUE(run_until(
        ioc_,
        [&] {
            return std::all_of(stopped.begin(), stopped.end(),
                               [](const auto& r) { return r.has_value(); });
        },
        60s));
    for (std::size_t i = 0; i < count; ++i) {
        EXPECT_TRUE(*stopped[i]) << i << ": " << describe(stopped[i]->error());
        EXPECT_EQ(machines[i]->exitcode(), 0) << i;
        EXPECT_EQ(machines[i]->state(), MachineState::stopped) << i;
        EXPECT_FALSE(fs::exists(monitor_path(*machines[i])));
    }
    for (pid_t pid : pids) {
        EXPECT_TRUE(process_gone(pid)) << pid;
    }
    EXPECT_EQ(proc::ChildWatcher::get(ioc_).watched(), 0U);
    EXPECT_TRUE(test::temp_entries("qemu-").empty())
        << testing::PrintToString(test::temp_entries("qemu-"));
    EXPECT_TRUE(warnings_.messages().empty()) << testing::PrintToString(warnings_.messages());
}

} // namespace
} // namespace qm
