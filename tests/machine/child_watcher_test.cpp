// SPDX-License-Identifier: GPL-2.0-or-later
// qm::proc::ChildWatcher with real processes: one watcher per io_context, SIGCHLD reaping of
// registered children only (exit codes, signals, exits before watch(), many at once, forget()),
// and pidfd watching of a process that is not our child.
#include <fcntl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "libmachine/asio.hpp"
#include "libmachine/machine/machine.hpp"
#include "libmachine/proc/child_watcher.hpp"
#include "libmachine/proc/spawn.hpp"
#include "tests/machine/machine_fixture.hpp"

#include "tests/support/children.hpp"
namespace qm::proc {
namespace {

using test::wait_exited_unreaped;

using namespace std::chrono_literals;
using test::process_gone;
using test::run_until;

pid_t reap(pid_t pid, int flags)
{
    int status = 0;
    pid_t r = 0;
    do {
        r = ::waitpid(pid, &status, flags);
    } while (r < 0 && errno == EINTR);
    return r;
}

class ChildWatcherTest : public testing::Test
{
protected:
    void TearDown() override
    {
        auto& watcher = ChildWatcher::get(ioc_);
        EXPECT_TRUE(run_until(ioc_, [&] { return watcher.watched() == 0; }, 10s));
    }

    pid_t start(const std::vector<std::string>& argv, SpawnOptions options = {})
    {
        auto pid = spawn(argv, options);
        EXPECT_TRUE(pid) << pid.error().message;
        return pid ? *pid : -1;
    }

    asio::io_context ioc_{1};
};

TEST_F(ChildWatcherTest, OneWatcherPerIoContextSharedByMachines)
{
    ChildWatcher& a = ChildWatcher::get(ioc_);
    ChildWatcher& b = ChildWatcher::get(ioc_);
    EXPECT_EQ(&a, &b);
    asio::io_context other{1};
    EXPECT_NE(&ChildWatcher::get(other), &a);
    EXPECT_EQ(a.watched(), 0U);
}

TEST_F(ChildWatcherTest, ReapsAChildAndReportsItsExitCodeOnce)
{
    auto& watcher = ChildWatcher::get(ioc_); // before the child exists, as Machine does
    const pid_t pid = start({"sh", "-c", "exit 7"});
    ASSERT_GT(pid, 0);
    std::vector<ExitStatus> seen;
    watcher.watch(pid, [&](pid_t p, ExitStatus s) {
        EXPECT_EQ(p, pid);
        seen.push_back(s);
    });
    EXPECT_EQ(watcher.watched(), 1U);
    ASSERT_TRUE(run_until(ioc_, [&] { return !seen.empty(); }, 10s));
    ioc_.restart();
    ioc_.poll();
    ASSERT_EQ(seen.size(), 1U);
    EXPECT_EQ(seen[0].kind, ExitStatus::Kind::exited);
    EXPECT_EQ(seen[0].code, 7);
    EXPECT_FALSE(seen[0].success());
    EXPECT_EQ(seen[0].to_string(), "exited with status 7");
    EXPECT_TRUE(process_gone(pid));
    EXPECT_EQ(watcher.watched(), 0U);
}

TEST_F(ChildWatcherTest, ReportsTheSignalThatKilledAChild)
{
    auto& watcher = ChildWatcher::get(ioc_);
    const pid_t pid = start({"sleep", "30"});
    ASSERT_GT(pid, 0);
    std::optional<ExitStatus> seen;
    watcher.watch(pid, [&](pid_t, ExitStatus s) { seen = s; });
    ASSERT_EQ(::kill(pid, SIGTERM), 0);
    ASSERT_TRUE(run_until(ioc_, [&] { return seen.has_value(); }, 10s));
    EXPECT_EQ(seen->kind, ExitStatus::Kind::signaled);
    EXPECT_EQ(seen->signal, SIGTERM);
    EXPECT_NE(seen->to_string().find("killed by signal 15"), std::string::npos)
        << seen->to_string();
    EXPECT_TRUE(process_gone(pid));
}

TEST_F(ChildWatcherTest, AChildThatExitedBeforeWatchIsStillReported)
{
    auto& watcher = ChildWatcher::get(ioc_);
    const pid_t pid = start({"true"});
    ASSERT_GT(pid, 0);
    // Wait for the exit without reaping (WNOWAIT): the child is a zombie when watch() comes.
    ASSERT_TRUE(wait_exited_unreaped(pid)) << std::strerror(errno);
    ioc_.restart();
    ioc_.poll(); // its SIGCHLD is handled while nobody watches it
    std::optional<ExitStatus> seen;
    watcher.watch(pid, [&](pid_t, ExitStatus s) { seen = s; });
    ASSERT_TRUE(run_until(ioc_, [&] { return seen.has_value(); }, 10s));
    EXPECT_TRUE(seen->success()) << seen->to_string();
    EXPECT_TRUE(process_gone(pid));
}

TEST_F(ChildWatcherTest, ManyChildrenExitingTogetherAreAllReaped)
{
    auto& watcher = ChildWatcher::get(ioc_);
    constexpr int count = 40;
    std::map<pid_t, int> expected_codes;
    std::map<pid_t, ExitStatus> seen;
    for (int i = 0; i < count; ++i) {
        const pid_t pid = start({"sh", "-c", "exit " + std::to_string(i)});
        ASSERT_GT(pid, 0);
        expected_codes[pid] = i;
        watcher.watch(pid, [&seen](pid_t p, ExitStatus s) {
            EXPECT_EQ(seen.count(p), 0U) << "reported twice";
            seen[p] = s;
        });
    }
    // Signals coalesce: far fewer SIGCHLDs than exits may arrive.
    ASSERT_TRUE(run_until(ioc_, [&] { return seen.size() == expected_codes.size(); }, 20s));
    for (const auto& [pid, code] : expected_codes) {
        EXPECT_EQ(seen[pid].code, code) << pid;
        EXPECT_TRUE(process_gone(pid)) << pid;
    }
}

TEST_F(ChildWatcherTest, ForgetSilencesTheHandlerButStillReaps)
{
    auto& watcher = ChildWatcher::get(ioc_);
    const pid_t pid = start({"sleep", "30"});
    ASSERT_GT(pid, 0);
    bool called = false;
    watcher.watch(pid, [&](pid_t, ExitStatus) { called = true; });
    watcher.forget(pid);
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    ASSERT_TRUE(run_until(ioc_, [&] { return process_gone(pid); }, 10s)) << "left a zombie";
    EXPECT_FALSE(called);
    EXPECT_EQ(watcher.watched(), 0U);
}

TEST_F(ChildWatcherTest, ChildrenNotWatchedAreLeftToTheirOwner)
{
    auto& watcher = ChildWatcher::get(ioc_);
    const pid_t mine = start({"true"});
    const pid_t watched = start({"true"});
    ASSERT_GT(mine, 0);
    ASSERT_GT(watched, 0);
    ASSERT_TRUE(wait_exited_unreaped(mine)) << std::strerror(errno);
    bool reported = false;
    watcher.watch(watched, [&](pid_t, ExitStatus) { reported = true; });
    ASSERT_TRUE(run_until(ioc_, [&] { return reported; }, 10s));
    // The SIGCHLDs of both were handled; the unwatched child is still ours to reap.
    EXPECT_EQ(reap(mine, WNOHANG), mine) << "the watcher reaped a foreign child";
}

TEST_F(ChildWatcherTest, PidfdWatchesAProcessThatIsNotOurChild)
{
    auto& watcher = ChildWatcher::get(ioc_);
    // sh starts sleep in the background, prints its pid and waits for it: the sleep is sh's
    // child, our grandchild. When it dies, sh reaps it and exits, and we reap sh.
    std::array<int, 2> out{-1, -1};
    ASSERT_EQ(::pipe2(out.data(), O_CLOEXEC), 0);
    SpawnOptions options;
    options.log_fd = out[1];
    const pid_t sh = start({"sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!; wait"}, options);
    ::close(out[1]);
    ASSERT_GT(sh, 0);
    std::optional<ExitStatus> sh_exit;
    watcher.watch(sh, [&](pid_t, ExitStatus s) { sh_exit = s; });

    std::string line;
    char c = 0;
    for (;;) {
        const ssize_t n = ::read(out[0], &c, 1);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n != 1 || c == '\n') {
            break;
        }
        line += c;
    }
    ::close(out[0]);
    ASSERT_FALSE(line.empty());
    const pid_t grandchild = std::stoi(line);
    ASSERT_EQ(reap(grandchild, WNOHANG), -1);
    ASSERT_EQ(errno, ECHILD) << "the sleep is not supposed to be our child";

    std::vector<ExitStatus> seen;
    auto w = watcher.watch_pidfd(grandchild, [&](pid_t p, ExitStatus s) {
        EXPECT_EQ(p, grandchild);
        seen.push_back(s);
    });
    ASSERT_TRUE(w) << w.error().message;
    EXPECT_EQ(watcher.watched(), 2U);
    ioc_.restart();
    ioc_.poll();
    EXPECT_TRUE(seen.empty()) << "reported an exit before there was one";

    ASSERT_EQ(::kill(grandchild, SIGKILL), 0);
    ASSERT_TRUE(run_until(ioc_, [&] { return !seen.empty() && sh_exit.has_value(); }, 10s));
    ASSERT_EQ(seen.size(), 1U);
    // Only a parent can read the status of a process.
    EXPECT_EQ(seen[0].kind, ExitStatus::Kind::unknown);
    EXPECT_EQ(seen[0].to_string(), "exited, status unknown");
    EXPECT_TRUE(process_gone(grandchild));
    EXPECT_TRUE(process_gone(sh));
}

TEST_F(ChildWatcherTest, PidfdOfAMissingProcessIsASystemError)
{
    auto& watcher = ChildWatcher::get(ioc_);
    const pid_t pid = start({"true"});
    ASSERT_GT(pid, 0);
    ASSERT_EQ(reap(pid, 0), pid); // reaped: the pid names nothing now
    auto w = watcher.watch_pidfd(pid, [](pid_t, ExitStatus) {});
    ASSERT_FALSE(w);
    EXPECT_TRUE(w.error().is(errc::system_error)) << w.error().message;
    EXPECT_EQ(watcher.watched(), 0U);
}

TEST_F(ChildWatcherTest, ForgetClosesThePidfd)
{
    auto& watcher = ChildWatcher::get(ioc_);
    const pid_t pid = start({"sleep", "30"});
    ASSERT_GT(pid, 0);
    bool pidfd_called = false;
    ASSERT_TRUE(watcher.watch_pidfd(pid, [&](pid_t, ExitStatus) { pidfd_called = true; }));
    EXPECT_EQ(watcher.watched(), 1U);
    watcher.forget(pid); // the leak check sees the pidfd closed
    EXPECT_EQ(watcher.watched(), 0U);
    std::optional<ExitStatus> exit;
    watcher.watch(pid, [&](pid_t, ExitStatus s) { exit = s; });
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    ASSERT_TRUE(run_until(ioc_, [&] { return exit.has_value(); }, 10s));
    ioc_.restart();
    ioc_.poll();
    EXPECT_FALSE(pidfd_called);
    EXPECT_EQ(exit->signal, SIGKILL);
}

} // namespace
} // namespace qm::proc
