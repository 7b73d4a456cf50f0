// SPDX-License-Identifier: GPL-2.0-or-later
// sd_notify: the Notifier against a datagram socket of the test (the environment, the status line,
// coalescing, never blocking), then the real qmachined with NOTIFY_SOCKET and WATCHDOG_USEC set:
// READY=1 once its socket accepts (and after the re-attach), STATUS= following the machine counts,
// WATCHDOG=1 at half the period, STOPPING=1 at SIGTERM under both shutdown policies.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "daemon/notify.hpp"
#include "libmachine/asio.hpp"
#include "tests/daemon/machine_daemon.hpp"
#include "tests/daemon/notify_listener.hpp"
#include "tests/support/daemon_process.hpp"

namespace qm::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using daemon::machine_count_status;
using daemon::NotifyEnvironment;
using daemon::Notifier;
using daemon::parse_notify_environment;

using Env = std::map<std::string, std::string>;

std::function<const char*(const char*)> getenv_of(const Env& env)
{
    return [&env](const char* name) -> const char* {
        auto it = env.find(name);
        return it == env.end() ? nullptr : it->second.c_str();
    };
}

//---- the pieces ---------------------------------------------------------------------------------

TEST(NotifyEnvironment, ReadsWhatTheManagerSet)
{
    const pid_t self = ::getpid();
    const Env full{{"NOTIFY_SOCKET", "/run/systemd/notify"},
                   {"WATCHDOG_USEC", "200000"},
                   {"WATCHDOG_PID", std::to_string(self)}};
    NotifyEnvironment env = parse_notify_environment(getenv_of(full), self);
    EXPECT_EQ(env.socket, "/run/systemd/notify");
    ASSERT_TRUE(env.watchdog_period);
    EXPECT_EQ(*env.watchdog_period, 100000us);

    // Abstract sockets; a watchdog without WATCHDOG_PID is ours.
    const Env abstract{{"NOTIFY_SOCKET", "@/org/freedesktop/systemd1/notify"},
                       {"WATCHDOG_USEC", "3"}};
    env = parse_notify_environment(getenv_of(abstract), self);
    EXPECT_EQ(env.socket, "@/org/freedesktop/systemd1/notify");
    ASSERT_TRUE(env.watchdog_period);
    EXPECT_EQ(*env.watchdog_period, 1us);

    EXPECT_EQ(parse_notify_environment(getenv_of({}), self).socket, "");
    EXPECT_FALSE(parse_notify_environment(getenv_of({}), self).watchdog_period);
}

TEST(NotifyEnvironment, IgnoresWhatIsNotForUs)
{
    const pid_t self = ::getpid();
    for (const char* socket : {"relative/notify", "", "@", "x"}) {
        EXPECT_EQ(parse_notify_environment(getenv_of({{"NOTIFY_SOCKET", socket}}), self).socket,
                  "")
            << socket;
    }
    const std::string too_long = "/" + std::string(sizeof(sockaddr_un::sun_path), 'x');
    EXPECT_EQ(parse_notify_environment(getenv_of({{"NOTIFY_SOCKET", too_long}}), self).socket, "");
    // The watchdog of another process (a parent that did not unset it), or nonsense.
    const Env other{{"WATCHDOG_USEC", "200000"}, {"WATCHDOG_PID", std::to_string(self + 1)}};
    EXPECT_FALSE(parse_notify_environment(getenv_of(other), self).watchdog_period);
    for (const char* usec : {"0", "-5", "12x", "", "99999999999999999999999"}) {
        EXPECT_FALSE(
            parse_notify_environment(getenv_of({{"WATCHDOG_USEC", usec}}), self).watchdog_period)
            << usec;
    }
    EXPECT_FALSE(parse_notify_environment(
                     getenv_of({{"WATCHDOG_USEC", "200000"}, {"WATCHDOG_PID", "abc"}}), self)
                     .watchdog_period);
}

TEST(NotifyStatus, CountsMachinesByState)
{
    EXPECT_EQ(machine_count_status({}), "0 machines");
    EXPECT_EQ(machine_count_status({{"defined", 1}}), "1 machine: 1 defined");
    EXPECT_EQ(machine_count_status({{"running", 2}, {"stopped", 1}}),
              "3 machines: 2 running, 1 stopped");
    EXPECT_EQ(machine_count_status({{"crashed", 1}, {"paused", 2}, {"running", 3}, {"defined", 0}}),
              "6 machines: 3 running, 2 paused, 1 crashed");
}

class NotifierTest : public testing::Test
{
protected:
    // Runs the loop until `done` holds or `deadline` passes.
    template <typename F>
    bool run_until(F done, std::chrono::milliseconds deadline = 5s)
    {
        const auto end = std::chrono::steady_clock::now() + deadline;
        while (!done() && std::chrono::steady_clock::now() < end) {
            ioc_.restart();
            ioc_.run_for(5ms);
        }
        return done();
    }

    NotifyListener listener_{fmt::format("@qmtest-notify-{}", ::getpid())};
    asio::io_context ioc_{1};
};

TEST_F(NotifierTest, WithoutASocketDoesNothing)
{
    Notifier n(ioc_, NotifyEnvironment{"", 1ms});
    EXPECT_FALSE(n.enabled());
    n.start_watchdog();
    n.set_status_source([] { return std::string("x"); });
    n.ready("r");
    n.status_changed();
    n.stopping("s");
    ioc_.run_for(20ms);
    EXPECT_EQ(n.sent(), 0U);
    EXPECT_FALSE(listener_.next(0ms));
}

TEST_F(NotifierTest, SendsReadyStatusAndStopping)
{
    ASSERT_EQ(listener_.error(), "");
    Notifier n(ioc_, NotifyEnvironment{listener_.address(), std::nullopt});
    ASSERT_TRUE(n.enabled());
    n.ready("1 machine: 1 running");
    n.status("busy\nwith a newline");
    n.stopping("Stopping 1 machine(s) before exit");
    auto d = listener_.next(1s);
    ASSERT_TRUE(d);
    EXPECT_EQ(d->text, "READY=1\nSTATUS=1 machine: 1 running");
    EXPECT_EQ(d->pid, ::getpid());
    d = listener_.next(1s);
    ASSERT_TRUE(d);
    EXPECT_EQ(d->text, "STATUS=busy with a newline");
    d = listener_.next(1s);
    ASSERT_TRUE(d);
    EXPECT_EQ(d->text, "STOPPING=1\nSTATUS=Stopping 1 machine(s) before exit");
    EXPECT_EQ(n.sent(), 3U);
}

// A burst of changes is one datagram, no sooner than the interval after the last one; an
// unchanged text is none; nothing before ready().
TEST_F(NotifierTest, CoalescesStatusChanges)
{
    Notifier n(ioc_, NotifyEnvironment{listener_.address(), std::nullopt},
               Notifier::Options{200ms});
    std::string text = "0 machines";
    n.set_status_source([&] { return text; });
    n.status_changed();
    ioc_.run_for(50ms);
    EXPECT_FALSE(listener_.next(0ms)) << "a status before READY";

    n.ready(text);
    const auto ready_at = std::chrono::steady_clock::now();
    ASSERT_TRUE(listener_.next(1s));
    for (const char* t :
         {"1 machine: 1 defined", "1 machine: 1 starting", "1 machine: 1 running"}) {
        text = t;
        n.status_changed();
    }
    ASSERT_TRUE(run_until([&] { return n.sent() == 2; }));
    EXPECT_GE(std::chrono::steady_clock::now() - ready_at, 200ms);
    auto d = listener_.next(1s);
    ASSERT_TRUE(d);
    EXPECT_EQ(d->text, "STATUS=1 machine: 1 running");

    // The same text again: nothing.
    n.status_changed();
    ioc_.restart();
    ioc_.run_for(400ms);
    EXPECT_EQ(n.sent(), 2U);
    EXPECT_FALSE(listener_.next(0ms));

    // Past the interval a change goes out at once (on the next turn of the loop).
    text = "1 machine: 1 stopped";
    n.status_changed();
    ASSERT_TRUE(run_until([&] { return n.sent() == 3; }, 100ms));
    d = listener_.next(1s);
    ASSERT_TRUE(d);
    EXPECT_EQ(d->text, "STATUS=1 machine: 1 stopped");
}

TEST_F(NotifierTest, WatchdogAtItsPeriod)
{
    Notifier n(ioc_, NotifyEnvironment{listener_.address(), 20ms});
    n.start_watchdog();
    ioc_.run_for(110ms);
    int count = 0;
    while (auto d = listener_.next(0ms)) {
        EXPECT_EQ(d->text, "WATCHDOG=1");
        ++count;
    }
    EXPECT_GE(count, 3); // 6 on time: at 0, 20, ..., 100 ms (a loaded machine is late)
    EXPECT_LE(count, 7);
}

// A manager that does not read: datagrams are dropped, the loop never waits.
TEST_F(NotifierTest, NeverBlocks)
{
    Notifier n(ioc_, NotifyEnvironment{listener_.address(), std::nullopt});
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < 5000; ++i) {
        n.status(fmt::format("status {}", i));
    }
    EXPECT_LT(std::chrono::steady_clock::now() - start, 2s);
    EXPECT_GT(n.sent(), 0U);
    EXPECT_LT(n.sent(), 5000U) << "the listener's queue never filled: the test proves nothing";
}

// And a socket nobody listens on: errors, logged once, nothing else.
TEST_F(NotifierTest, MissingSocketIsNotAnError)
{
    Notifier n(ioc_, NotifyEnvironment{"@qmtest-nobody-listens-here", std::nullopt});
    ASSERT_TRUE(n.enabled());
    n.ready("x");
    n.stopping("y");
    EXPECT_EQ(n.sent(), 0U);
}

//---- qmachined ----------------------------------------------------------------------------------

class NotifyDaemonTest : public MachineDaemonTest
{
protected:
    void TearDown() override
    {
        // Every notification came from the daemon itself, never from a QEMU (systemd's
        // NotifyAccess=main would drop those).
        if (listener_) {
            for (const auto& d : listener_->received()) {
                EXPECT_TRUE(daemon_pids_.count(d.pid)) << "from pid " << d.pid << ": " << d.text;
            }
        }
        MachineDaemonTest::TearDown();
        listener_.reset();
    }

    // Starts qmachined with NOTIFY_SOCKET and WATCHDOG_USEC (200 ms) and waits for READY=1; the
    // REST socket accepts connections by then. The READY datagram.
    void start_notified(const std::vector<std::string>& extra, Datagram* ready)
    {
        if (!listener_) {
            listener_ = std::make_unique<NotifyListener>((root_ / "notify.sock").string());
            ASSERT_EQ(listener_->error(), "");
        }
        {
            ScopedEnv socket("NOTIFY_SOCKET", listener_->address());
            ScopedEnv watchdog("WATCHDOG_USEC", "200000");
            ASSERT_NO_FATAL_FAILURE(start_daemon_only(extra));
        }
        daemon_pids_.insert(daemon_->pid());
        auto d = listener_->wait_for("READY=1");
        ASSERT_TRUE(d) << "no READY=1:\n" << listener_->history() << daemon_->output();
        // At that moment (a socket left by an earlier daemon would refuse).
        EXPECT_TRUE(accepts_connections(socket_path())) << "READY=1 before the socket accepts";
        *ready = *d;
    }

    void start_daemon_only(const std::vector<std::string>& extra)
    {
        ASSERT_FALSE(daemon_);
        leave_running_ = std::find(extra.begin(), extra.end(), "leave-running") != extra.end();
        daemon_ = std::make_unique<DaemonProcess>(
            QM_QMACHINED, daemon_args(extra),
            root_ / ("daemon" + std::to_string(++runs_) + ".out"));
    }

    std::unique_ptr<NotifyListener> listener_;
    std::set<pid_t> daemon_pids_;
};

TEST_F(NotifyDaemonTest, ReadyStatusWatchdogStopping)
{
    Datagram ready;
    ASSERT_NO_FATAL_FAILURE(start_notified({}, &ready));
    EXPECT_EQ(field(ready.text, "STATUS"), "0 machines") << ready.text;
    EXPECT_TRUE(daemon().says("ready")) << daemon().output();

    // WATCHDOG_USEC=200000: a keep-alive every 100 ms.
    int watchdogs = 0;
    const auto end = std::chrono::steady_clock::now() + 1s;
    while (std::chrono::steady_clock::now() < end) {
        auto d = listener_->next(std::chrono::duration_cast<std::chrono::milliseconds>(
            end - std::chrono::steady_clock::now()));
        if (d && d->text == "WATCHDOG=1") {
            ++watchdogs;
        }
    }
    // Ten in the second at half the period; never as few as one per WATCHDOG_USEC (a missed
    // deadline) nor a burst.
    EXPECT_GE(watchdogs, 6) << listener_->history();
    EXPECT_LE(watchdogs, 14) << listener_->history();

    // STATUS= follows the counts.
    ASSERT_EQ(create("a", quick_spec()).status, 201);
    EXPECT_TRUE(listener_->wait_for("STATUS=1 machine: 1 defined", 10s)) << listener_->history();
    const pid_t pid = start_machine("a");
    EXPECT_TRUE(listener_->wait_for("STATUS=1 machine: 1 running", 10s)) << listener_->history();
    // QEMU does not inherit the variables (it must not notify in qmachined's name).
    EXPECT_EQ(read_whole_file(fmt::format("/proc/{}/environ", pid)).find("NOTIFY_SOCKET"),
              std::string::npos);

    // SIGTERM under stop-machines (the fixture's policy).
    daemon().signal(SIGTERM);
    auto stopping = listener_->wait_for("STOPPING=1", 10s);
    ASSERT_TRUE(stopping) << listener_->history();
    EXPECT_EQ(field(stopping->text, "STATUS"), "Stopping 1 machine(s) before exit")
        << stopping->text;
    EXPECT_EQ(daemon().wait_exit(30s), 0) << daemon().output();
    expect_daemon_gone();
    // Nothing after STOPPING=1 says READY again.
    EXPECT_FALSE(listener_->wait_for("READY=1", 200ms));
}

// The default policy says it leaves the machines; a daemon that takes them over is ready only
// once it has.
TEST_F(NotifyDaemonTest, LeaveRunningThenReadyAfterReattach)
{
    Datagram ready;
    ASSERT_NO_FATAL_FAILURE(start_notified({"--shutdown-policy", "leave-running"}, &ready));
    ASSERT_EQ(create("a", quick_spec(true)).status, 201);
    const pid_t pid = start_machine("a");
    daemon().signal(SIGTERM);
    auto stopping = listener_->wait_for("STOPPING=1", 10s);
    ASSERT_TRUE(stopping) << listener_->history();
    EXPECT_EQ(field(stopping->text, "STATUS"), "Exiting, leaving 1 machine(s) running")
        << stopping->text;
    EXPECT_EQ(daemon().wait_exit(10s), 0) << daemon().output();
    daemon_.reset();
    ASSERT_TRUE(alive(pid));

    ASSERT_NO_FATAL_FAILURE(start_notified({}, &ready));
    // READY=1 came after the re-attach (the daemon logged it, and flushes each line).
    EXPECT_TRUE(daemon().says("Re-attached 1 running machine(s)")) << daemon().output();
    EXPECT_EQ(field(ready.text, "STATUS"), "1 machine: 1 running") << ready.text;
    EXPECT_EQ(json::get_int(machine("a"), "pid"), pid);
    // The fixture's SIGTERM (stop-machines) stops it.
}

} // namespace
} // namespace qm::test
