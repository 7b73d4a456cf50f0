// SPDX-License-Identifier: GPL-2.0-or-later
// qm::Machine with pass_sockets against a real qemu-system-x86_64 -machine none: the sockets the
// machine binds and hands over, detach() and attach() from a second machine (QMP, console, the
// shutdown ladder, an exit seen through the pidfd), a process whose monitor never answers, and
// the calls attach() refuses.
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/json.hpp"
#include "libmachine/machine/machine.hpp"
#include "libmachine/proc/proc_info.hpp"
#include "libmachine/proc/spawn.hpp"
#include "libmachine/qmp/address.hpp"
#include "libmachine/qmp/client.hpp"
#include "tests/machine/machine_fixture.hpp"

#include "tests/support/children.hpp"
#include "tests/support/daemon_process.hpp"
namespace qm {
namespace {

using test::reap;

using test::describe;
using test::process_gone;
using test::run_co;
using test::run_until;
namespace fs = std::filesystem;

std::size_t open_fd_count()
{
    std::size_t n = 0;
    for ([[maybe_unused]] const auto& e : fs::directory_iterator("/proc/self/fd")) {
        ++n;
    }
    return n - 1; // the iterator's own descriptor
}

bool fd_is_open(int fd)
{
    return ::fcntl(fd, F_GETFD) != -1 || errno != EBADF;
}

bool contains(const std::vector<std::string>& argv, const std::string& arg)
{
    return std::find(argv.begin(), argv.end(), arg) != argv.end();
}

class AttachTest : public test::MachineFixture
{
protected:
    // A configuration a restarted supervisor would rebuild identically (name, prefix, sockets).
    // QEMU's log goes to a directory of the test (as a supervisor's does), not to the machine's
    // temporary directory, which is the machine's own and goes with it.
    MachineConfig pass_config(const std::string& name)
    {
        auto c = config(name);
        c.pass_sockets = true;
        c.sock_dir = fs::temp_directory_path().string();
        c.log_dir = (fs::temp_directory_path() / (name + "-logs")).string();
        fs::create_directories(c.log_dir);
        log_dirs_.push_back(c.log_dir);
        return c;
    }

    void TearDown() override
    {
        for (const auto& d : log_dirs_) {
            std::error_code ec;
            fs::remove_all(d, ec);
        }
        MachineFixture::TearDown();
    }

    std::vector<std::string> log_dirs_;

    // Launches a machine of `c`, detaches it and returns what attach() needs to find it again.
    struct Detached
    {
        pid_t pid = -1;
        std::vector<std::string> argv;
    };
    Detached launch_and_detach(Machine& m)
    {
        auto launched = launch(m);
        EXPECT_TRUE(launched) << describe(launched.error());
        if (!launched) {
            return {};
        }
        Detached d{*m.pid(), m.command_line()};
        m.detach();
        // Let the closed connections' coroutines finish.
        ioc_.restart();
        ioc_.poll();
        return d;
    }

    expected<void> attach(Machine& m, pid_t pid, int pidfd, std::vector<std::string> argv,
                          bool console_later = false)
    {
        AttachOptions options;
        options.pid = pid;
        options.pidfd = pidfd;
        options.argv = std::move(argv);
        options.console_later = console_later;
        return run_co(ioc_, m.attach(std::move(options)), 60s);
    }
};

TEST_F(AttachTest, PassSocketsHandsQemuTheBoundSocketsThatStayUntilShutdown)
{
    auto c = pass_config("a-pass");
    c.console_log = (fs::temp_directory_path() / "a-pass-console.log").string();
    auto m = make_machine(c);
    m->set_console();
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    const auto& argv = m->command_line();

    // The launch monitor (a connected socket pair) is fd 3, the served monitor fd 4, the
    // console fd 5, the console log fd 6 (in -add-fd set 999).
    EXPECT_TRUE(contains(argv, "socket,id=mon-launch,fd=3")) << proc::format_command_line(argv);
    EXPECT_TRUE(contains(argv, "socket,id=mon,fd=4,server=on,wait=off"))
        << proc::format_command_line(argv);
    EXPECT_TRUE(contains(argv, "fd=6,set=999,opaque=console-log"))
        << proc::format_command_line(argv);
    EXPECT_TRUE(contains(argv, "socket,id=console,fd=5,server=on,wait=off,"
                               "logfile=/dev/fdset/999,logappend=on"))
        << proc::format_command_line(argv);
    EXPECT_FALSE(contains(argv, "path=" + monitor_path(*m)));
    EXPECT_EQ(test::read_nul_list(fmt::format("/proc/{}/cmdline", pid)), argv);
    // QEMU moves an -add-fd descriptor to a number of its own: look for it by its file.
    std::vector<std::string> qemu_fds;
    for (const auto& e : fs::directory_iterator(fmt::format("/proc/{}/fd", pid))) {
        std::error_code ec;
        qemu_fds.push_back(fs::read_symlink(e.path(), ec).string());
    }
    EXPECT_TRUE(contains(qemu_fds, c.console_log)) << testing::PrintToString(qemu_fds);
    EXPECT_FALSE(contains(qemu_fds, monitor_path(*m))) << "QEMU opened no socket file itself";

    auto status = cmd(*m, "query-status");
    ASSERT_TRUE(status) << describe(status.error());
    EXPECT_EQ(json::get_string(*status, "status").value_or(""), "running");
    EXPECT_EQ(m->state(), MachineState::running);
    EXPECT_TRUE(m->console()->is_connected());

    // The launching machine talks over its own pair: the served monitor greets another client
    // at once (QEMU serves one client per monitor).
    {
        auto other = qmp::Client::create(ioc_.get_executor());
        auto greeting =
            run_co(ioc_, other->connect(qmp::Address::unix_socket(monitor_path(*m))), 10s);
        ASSERT_TRUE(greeting) << describe(greeting.error());
        EXPECT_TRUE(run_co(ioc_, other->execute("query-status"), 10s));
        other->close();
    }

    // Unlike a monitor QEMU connects to, the socket files stay while QEMU runs (for attach()).
    EXPECT_TRUE(fs::is_socket(monitor_path(*m))) << monitor_path(*m);
    EXPECT_TRUE(fs::is_socket(m->console_socket_path())) << m->console_socket_path();

    auto r = shutdown(*m);
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(m->last_shutdown_step(), ShutdownStep::quit);
    ASSERT_TRUE(m->exit_status());
    EXPECT_TRUE(m->exit_status()->success()) << m->exit_status()->to_string();
    EXPECT_EQ(m->state(), MachineState::stopped);
    EXPECT_FALSE(fs::exists(monitor_path(*m)));
    EXPECT_FALSE(fs::exists(m->console_socket_path()));
    EXPECT_TRUE(fs::exists(c.console_log)) << "the console log is the caller's";
    fs::remove(c.console_log);
    expect_nothing_left(*m, pid);
    EXPECT_TRUE(warnings_.messages().empty()) << testing::PrintToString(warnings_.messages());
}

TEST_F(AttachTest, DetachLeavesQemuRunningAndASecondMachineAttachesAndQuitsIt)
{
    const auto c = pass_config("a-detach");
    auto m1 = make_machine(c);
    m1->set_console();
    int m1_exits = 0;
    m1->on_exit([&](const proc::ExitStatus&) { ++m1_exits; });
    const auto d = launch_and_detach(*m1);
    ASSERT_GT(d.pid, 0);

    // Detached: the machine is as if never launched, QEMU and its sockets live on.
    EXPECT_EQ(m1->state(), MachineState::defined);
    EXPECT_FALSE(m1->is_running());
    EXPECT_EQ(m1->pid(), std::nullopt);
    EXPECT_EQ(::kill(d.pid, 0), 0) << "QEMU ended with the detach";
    EXPECT_TRUE(fs::is_socket(monitor_path(*m1)));
    EXPECT_TRUE(fs::is_socket(m1->console_socket_path()));
    // A shutdown of the detached machine is a no-op: it has nothing to end.
    ASSERT_TRUE(shutdown(*m1));
    EXPECT_EQ(::kill(d.pid, 0), 0);

    auto pidfd = proc::open_pidfd(d.pid);
    ASSERT_TRUE(pidfd) << describe(pidfd.error());
    auto m2 = make_machine(c);
    m2->set_console();
    std::vector<MachineState> states;
    m2->on_state_change([&](MachineState s) { states.push_back(s); });
    std::optional<proc::ExitStatus> m2_exit;
    m2->on_exit([&](const proc::ExitStatus& s) { m2_exit = s; });
    auto attached = attach(*m2, d.pid, *pidfd, d.argv);
    ASSERT_TRUE(attached) << describe(attached.error());
    EXPECT_EQ(m2->state(), MachineState::running);
    EXPECT_EQ(m2->qemu_status(), "running");
    EXPECT_EQ(m2->pid(), d.pid);
    EXPECT_EQ(m2->command_line(), d.argv);
    EXPECT_EQ(m2->log_path(), c.log_dir + "/a-detach.log") << "the log QEMU writes to";
    EXPECT_TRUE(fs::is_regular_file(m2->log_path()));
    ASSERT_TRUE(m2->qmp_client());
    EXPECT_TRUE(m2->qmp_client()->is_connected());

    auto status = cmd(*m2, "query-status");
    ASSERT_TRUE(status) << describe(status.error());
    EXPECT_EQ(json::get_string(*status, "status").value_or(""), "running");
    ASSERT_NE(m2->console(), nullptr);
    EXPECT_TRUE(m2->console()->is_connected()) << "connected by attach()";
    auto written = run_co(ioc_, m2->console_write("hello\n"), 10s);
    EXPECT_TRUE(written) << describe(written.error());

    // attach() refuses a second attach while it holds the process.
    auto again = attach(*m2, d.pid, -1, d.argv);
    ASSERT_FALSE(again);
    EXPECT_TRUE(again.error().is(errc::invalid_state)) << describe(again.error());

    auto r = shutdown(*m2);
    ASSERT_TRUE(r) << describe(r.error());
    ASSERT_TRUE(m2->exit_status());
    EXPECT_EQ(m2->exit_status()->kind, proc::ExitStatus::Kind::unknown)
        << "not our child: its status can't be read";
    EXPECT_EQ(m2->exitcode(), std::nullopt);
    EXPECT_EQ(m2->last_shutdown_step(), ShutdownStep::quit);
    EXPECT_EQ(m2->state(), MachineState::stopped);
    ASSERT_TRUE(m2_exit);
    EXPECT_EQ(m2_exit->kind, proc::ExitStatus::Kind::unknown);
    EXPECT_EQ(states, (std::vector<MachineState>{MachineState::starting, MachineState::running,
                                                 MachineState::stopping, MachineState::stopped}));
    EXPECT_FALSE(fs::exists(monitor_path(*m2)));
    EXPECT_FALSE(fs::exists(m2->console_socket_path()));
    // QEMU is still our child (m1 launched it): the watcher reaps it although m1 forgot it.
    EXPECT_TRUE(run_until(ioc_, [&] { return process_gone(d.pid); }, 10s));
    EXPECT_EQ(m1_exits, 0) << "a detached machine hears nothing of its former process";
    EXPECT_EQ(m1->state(), MachineState::defined);
    expect_nothing_left(*m2, d.pid);
    EXPECT_TRUE(warnings_.messages().empty()) << testing::PrintToString(warnings_.messages());
}

TEST_F(AttachTest, ConsoleLaterLeavesTheConsoleToEnsureConsoleAndTwoCallersShareOneConnection)
{
    const auto c = pass_config("a-later");
    auto m1 = make_machine(c);
    m1->set_console();
    const auto d = launch_and_detach(*m1);
    ASSERT_GT(d.pid, 0);
    auto pidfd = proc::open_pidfd(d.pid);
    ASSERT_TRUE(pidfd) << describe(pidfd.error());
    auto m2 = make_machine(c);
    m2->set_console();
    ASSERT_TRUE(attach(*m2, d.pid, *pidfd, d.argv, /*console_later=*/true));
    EXPECT_EQ(m2->state(), MachineState::running);
    ASSERT_NE(m2->console(), nullptr);
    EXPECT_FALSE(m2->console()->is_connected()) << "left for later";
    EXPECT_EQ(test::unix_connections(m2->console_socket_path()), 0U);

    // Two callers at once (the supervisor's deferred connect and a console operation): one
    // connection, both succeed.
    std::optional<expected<void>> first, second;
    asio::co_spawn(ioc_, m2->ensure_console(),
                   [&](const std::exception_ptr&, expected<void> r) { first = std::move(r); });
    asio::co_spawn(ioc_, m2->ensure_console(),
                   [&](const std::exception_ptr&, expected<void> r) { second = std::move(r); });
    ASSERT_TRUE(run_until(ioc_, [&] { return first && second; }, 10s));
    EXPECT_TRUE(*first) << describe(first->error());
    EXPECT_TRUE(*second) << describe(second->error());
    EXPECT_TRUE(m2->console()->is_connected());
    EXPECT_TRUE(run_until(
        ioc_, [&] { return test::unix_connections(m2->console_socket_path()) == 1U; }, 5s))
        << test::unix_connections(m2->console_socket_path()) << " connection(s)";
    auto written = run_co(ioc_, m2->console_write("hello\n"), 10s);
    EXPECT_TRUE(written) << describe(written.error());

    ASSERT_TRUE(shutdown(*m2));
    EXPECT_TRUE(run_until(ioc_, [&] { return process_gone(d.pid); }, 10s));
    expect_nothing_left(*m2, d.pid);
}

TEST_F(AttachTest, AnAttachedQemuKilledFromOutsideIsSeenThroughThePidfdAsCrashed)
{
    const auto c = pass_config("a-killed");
    auto m1 = make_machine(c);
    const auto d = launch_and_detach(*m1);
    ASSERT_GT(d.pid, 0);
    m1.reset(); // the supervisor that launched it is gone
    EXPECT_EQ(::kill(d.pid, 0), 0) << "destroying a detached machine ended its process";
    EXPECT_TRUE(fs::is_socket(c.sock_dir + "/a-killed-monitor.sock"));
    auto pidfd = proc::open_pidfd(d.pid);
    ASSERT_TRUE(pidfd);
    auto m2 = make_machine(c);
    ASSERT_TRUE(attach(*m2, d.pid, *pidfd, d.argv));
    ASSERT_EQ(m2->state(), MachineState::running);

    ASSERT_EQ(::kill(d.pid, SIGKILL), 0);
    ASSERT_TRUE(run_until(ioc_, [&] { return m2->state() == MachineState::crashed; }, 10s))
        << to_string(m2->state());
    ASSERT_TRUE(m2->exit_status());
    EXPECT_EQ(m2->exit_status()->kind, proc::ExitStatus::Kind::unknown);
    EXPECT_FALSE(m2->is_running());

    ASSERT_TRUE(shutdown(*m2));
    EXPECT_EQ(m2->last_shutdown_step(), ShutdownStep::exited);
    EXPECT_EQ(m2->state(), MachineState::crashed);
    EXPECT_TRUE(run_until(ioc_, [&] { return process_gone(d.pid); }, 10s));
    expect_nothing_left(*m2, d.pid);
    EXPECT_FALSE(fs::exists(m2->console_socket_path()));
}

TEST_F(AttachTest, AnAttachedQemuQuitThroughAnotherMonitorIsNotACrash)
{
    auto c = pass_config("a-other");
    const auto other = fs::temp_directory_path() / "a-other-qmp.sock";
    c.args = {"-qmp", fmt::format("unix:{},server=on,wait=off", other.string())};
    auto m1 = make_machine(c);
    const auto d = launch_and_detach(*m1);
    ASSERT_GT(d.pid, 0);
    m1.reset();
    auto pidfd = proc::open_pidfd(d.pid);
    ASSERT_TRUE(pidfd);
    auto m2 = make_machine(c);
    ASSERT_TRUE(attach(*m2, d.pid, *pidfd, d.argv));

    // Someone else's QMP client quits QEMU: its SHUTDOWN (host-qmp-quit) reaches every monitor.
    auto admin = qmp::Client::create(ioc_.get_executor());
    auto greeting = run_co(ioc_, admin->connect(qmp::Address::unix_socket(other.string())), 10s);
    ASSERT_TRUE(greeting) << describe(greeting.error());
    auto quit = run_co(ioc_, admin->execute("quit"), 10s);
    EXPECT_TRUE(quit || quit.error().is(errc::qmp_disconnected)) << describe(quit.error());
    admin->close();
    ASSERT_TRUE(run_until(ioc_, [&] { return m2->exit_status().has_value(); }, 10s));
    EXPECT_EQ(m2->state(), MachineState::stopped) << "a quit is an orderly exit";

    ASSERT_TRUE(shutdown(*m2));
    EXPECT_EQ(m2->last_shutdown_step(), ShutdownStep::quit);
    EXPECT_TRUE(run_until(ioc_, [&] { return process_gone(d.pid); }, 10s));
    expect_nothing_left(*m2, d.pid);
    fs::remove(other);
}

TEST_F(AttachTest, WithoutAPidfdAttachOpensOneAndFailsForAPidThatIsGone)
{
    const auto c = pass_config("a-nopidfd");
    auto m1 = make_machine(c);
    const auto d = launch_and_detach(*m1);
    ASSERT_GT(d.pid, 0);
    m1.reset();

    // A pid nothing has (above any pid_max): nothing to watch, the machine stays as it was.
    auto m2 = make_machine(c);
    auto gone = attach(*m2, 0x7ffffff0, -1, d.argv);
    ASSERT_FALSE(gone);
    EXPECT_TRUE(gone.error().is(errc::system_error)) << describe(gone.error());
    EXPECT_EQ(m2->state(), MachineState::defined);
    EXPECT_FALSE(m2->is_running());

    auto attached = attach(*m2, d.pid, -1, d.argv);
    ASSERT_TRUE(attached) << describe(attached.error());
    EXPECT_EQ(m2->pid(), d.pid);
    EXPECT_EQ(m2->state(), MachineState::running);
    ASSERT_TRUE(run_co(ioc_, m2->kill(), 30s));
    EXPECT_EQ(m2->last_shutdown_step(), ShutdownStep::kill);
    EXPECT_EQ(m2->state(), MachineState::stopped) << "killed by us: not a crash";
    EXPECT_TRUE(run_until(ioc_, [&] { return process_gone(d.pid); }, 10s));
    expect_nothing_left(*m2, d.pid);
}

TEST_F(AttachTest, AProcessWhoseMonitorNeverAnswersIsHeldUnresponsiveAndShutdownEndsIt)
{
    auto c = pass_config("a-silent");
    c.qmp_timer = 500ms;
    auto m = make_machine(c);
    // A monitor socket that listens and never accepts: the connection waits in the backlog and
    // no greeting ever comes.
    const std::string path = monitor_path(*m);
    const int listener = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(listener, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, path.c_str(), sizeof(sa.sun_path) - 1);
    ASSERT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0)
        << std::strerror(errno);
    ASSERT_EQ(::listen(listener, 4), 0);

    const std::vector<std::string> argv{"/bin/sleep", "30"};
    auto pid = proc::spawn(argv);
    ASSERT_TRUE(pid) << describe(pid.error());
    auto pidfd = proc::open_pidfd(*pid);
    ASSERT_TRUE(pidfd);
    const auto start = std::chrono::steady_clock::now();
    auto attached = attach(*m, *pid, *pidfd, argv);
    ASSERT_FALSE(attached);
    EXPECT_TRUE(attached.error().is(errc::timeout)) << describe(attached.error());
    EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
    EXPECT_EQ(m->state(), MachineState::unresponsive);
    EXPECT_TRUE(m->is_running());
    EXPECT_EQ(m->pid(), *pid);
    EXPECT_EQ(::kill(*pid, 0), 0);
    auto status = cmd(*m, "query-status");
    ASSERT_FALSE(status);
    EXPECT_TRUE(status.error().is(errc::invalid_state)) << describe(status.error());

    // The machine holds the process: shutdown() ends it (SIGTERM without a monitor).
    auto r = shutdown(*m);
    EXPECT_TRUE(r) << describe(r.error());
    EXPECT_FALSE(m->is_running());
    ASSERT_TRUE(m->exit_status());
    EXPECT_EQ(m->exit_status()->kind, proc::ExitStatus::Kind::unknown);
    EXPECT_EQ(m->state(), MachineState::stopped);
    const int wstatus = reap(*pid);
    EXPECT_TRUE(WIFSIGNALED(wstatus)) << wstatus;
    EXPECT_TRUE(process_gone(*pid));
    EXPECT_FALSE(fs::exists(path)) << "the monitor socket is removed at cleanup";
    ::close(listener);
}

TEST_F(AttachTest, AProcessWithoutAMonitorSocketIsHeldUnresponsive)
{
    auto c = pass_config("a-nosock");
    c.qmp_timer = 500ms;
    auto m = make_machine(c);
    const std::vector<std::string> argv{"/bin/sleep", "30"};
    auto pid = proc::spawn(argv);
    ASSERT_TRUE(pid) << describe(pid.error());
    auto pidfd = proc::open_pidfd(*pid);
    ASSERT_TRUE(pidfd);
    auto attached = attach(*m, *pid, *pidfd, argv);
    ASSERT_FALSE(attached);
    EXPECT_TRUE(attached.error().is(errc::connect_failed)) << describe(attached.error());
    EXPECT_EQ(m->state(), MachineState::unresponsive);
    ASSERT_TRUE(run_co(ioc_, m->kill(), 30s));
    EXPECT_EQ(m->last_shutdown_step(), ShutdownStep::kill);
    const int wstatus = reap(*pid);
    EXPECT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL) << wstatus;
}

TEST_F(AttachTest, AttachAnExitedProcessFails)
{
    auto c = pass_config("a-exited");
    auto m = make_machine(c);
    auto pid = proc::spawn({"/bin/true"});
    ASSERT_TRUE(pid);
    auto pidfd = proc::open_pidfd(*pid);
    ASSERT_TRUE(pidfd);
    EXPECT_EQ(reap(*pid), 0);
    // Its pidfd is readable at once; the monitor socket does not exist. Whichever attach()
    // sees first, the process is gone and the machine ends crashed (nobody asked it to exit).
    auto attached = attach(*m, *pid, *pidfd, {"/bin/true"});
    ASSERT_FALSE(attached);
    ASSERT_TRUE(run_until(ioc_, [&] { return m->state() == MachineState::crashed; }, 10s))
        << to_string(m->state()) << "; " << describe(attached.error());
    EXPECT_FALSE(m->is_running());
    ASSERT_TRUE(m->exit_status());
    EXPECT_EQ(m->exit_status()->kind, proc::ExitStatus::Kind::unknown);
    ASSERT_TRUE(shutdown(*m));
    EXPECT_EQ(m->last_shutdown_step(), ShutdownStep::exited);
}

TEST_F(AttachTest, AttachIsRefusedWhenLaunchedOrWithoutPassSocketsAndClosesThePidfd)
{
    // Launched already: the running machine is not disturbed.
    auto m = make_machine(pass_config("a-refuse"));
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    const auto fds = open_fd_count();
    auto pidfd = proc::open_pidfd(pid);
    ASSERT_TRUE(pidfd);
    auto r = attach(*m, pid, *pidfd, m->command_line());
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::invalid_state)) << describe(r.error());
    EXPECT_FALSE(fd_is_open(*pidfd)) << "the machine owns the pidfd from the call on";
    EXPECT_EQ(open_fd_count(), fds);
    EXPECT_EQ(m->state(), MachineState::running);
    EXPECT_EQ(m->pid(), pid);
    EXPECT_TRUE(cmd(*m, "query-status"));

    // Without pass_sockets nobody serves a monitor to attach to.
    auto plain = make_machine("a-plain");
    auto pidfd2 = proc::open_pidfd(pid);
    ASSERT_TRUE(pidfd2);
    auto r2 = attach(*plain, pid, *pidfd2, m->command_line());
    ASSERT_FALSE(r2);
    EXPECT_TRUE(r2.error().is(errc::invalid_state)) << describe(r2.error());
    EXPECT_FALSE(fd_is_open(*pidfd2));
    EXPECT_EQ(open_fd_count(), fds);
    EXPECT_EQ(plain->state(), MachineState::defined);
    EXPECT_FALSE(plain->is_running());

    // Nor without a QMP monitor.
    auto no_qmp = make_machine(pass_config("a-noqmp"));
    no_qmp->set_qmp_monitor(false);
    auto pidfd3 = proc::open_pidfd(pid);
    ASSERT_TRUE(pidfd3);
    auto r3 = attach(*no_qmp, pid, *pidfd3, m->command_line());
    ASSERT_FALSE(r3);
    EXPECT_TRUE(r3.error().is(errc::invalid_state)) << describe(r3.error());
    EXPECT_FALSE(fd_is_open(*pidfd3));
    EXPECT_EQ(open_fd_count(), fds);

    ASSERT_TRUE(shutdown(*m));
    expect_nothing_left(*m, pid);
}

TEST_F(AttachTest, DetachOfAMachineNeverLaunchedDoesNothing)
{
    auto m = make_machine(pass_config("a-never"));
    m->detach();
    EXPECT_EQ(m->state(), MachineState::defined);
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    ASSERT_TRUE(shutdown(*m));
    m->detach(); // after shutdown: nothing to leave behind
    EXPECT_EQ(m->state(), MachineState::stopped);
    expect_nothing_left(*m, pid);
}

} // namespace
} // namespace qm
