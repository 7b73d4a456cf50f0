// SPDX-License-Identifier: GPL-2.0-or-later
// qm::proc's /proc readers and pidfds with short-lived children: start times, command lines
// (spaces, empty arguments, a zombie's), the command-line hash, pidfd signals and the boot id.
#include "libmachine/proc/proc_info.hpp"

#include <fcntl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "libmachine/proc/spawn.hpp"

#include "tests/support/children.hpp"
namespace qm::proc {
namespace {

using test::reap;
using test::wait_exited_unreaped;

using namespace std::chrono_literals;

std::string describe(const Error& e)
{
    return std::string(to_string(static_cast<errc>(e.code.value()))) + ": " + e.message;
}

// A pid no process has: above the kernel's pid_max (at most 2^22).
constexpr pid_t no_such_pid = 0x7ffffff0;

// The state letter of /proc/PID/stat (after the last ')').
char state_of(pid_t pid)
{
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    const std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const auto close = stat.rfind(')');
    return close != std::string::npos && close + 2 < stat.size() ? stat[close + 2] : '?';
}

// A child that stays until killed, with `argv` as its command line: a shell that stops itself
// (a stopped process keeps its command line and needs no timer). Returns once it has stopped:
// spawn() returns as soon as the old image is gone, before the kernel has set up the new
// command line (/proc/PID/cmdline is empty until then).
pid_t start_stopped_shell(const std::vector<std::string>& extra)
{
    std::vector<std::string> argv{"/bin/sh", "-c", "kill -STOP $$; exit 0", "sh"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto pid = spawn(argv);
    EXPECT_TRUE(pid) << describe(pid.error());
    if (!pid) {
        return -1;
    }
    const auto end = std::chrono::steady_clock::now() + 10s;
    while (state_of(*pid) != 'T' && std::chrono::steady_clock::now() < end) {
        std::this_thread::yield();
    }
    EXPECT_EQ(state_of(*pid), 'T') << "the shell did not stop";
    return *pid;
}

TEST(ProcInfoTest, StartTimeIsStableAndAChildStartsNoEarlierThanUs)
{
    auto ours = process_start_time(::getpid());
    ASSERT_TRUE(ours) << describe(ours.error());
    EXPECT_GT(*ours, 0U);
    auto again = process_start_time(::getpid());
    ASSERT_TRUE(again);
    EXPECT_EQ(*again, *ours);

    auto pid = spawn({"/bin/sleep", "30"});
    ASSERT_TRUE(pid);
    auto child = process_start_time(*pid);
    ASSERT_TRUE(child) << describe(child.error());
    EXPECT_GE(*child, *ours);
    auto child_again = process_start_time(*pid);
    ASSERT_TRUE(child_again);
    EXPECT_EQ(*child_again, *child);
    ::kill(*pid, SIGKILL);
    reap(*pid);

    // Reaped: no such process any more.
    auto gone = process_start_time(*pid);
    ASSERT_FALSE(gone);
    EXPECT_TRUE(gone.error().is(errc::system_error)) << describe(gone.error());
}

TEST(ProcInfoTest, StartTimeOfANonexistentPidIsASystemError)
{
    auto r = process_start_time(no_such_pid);
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::system_error)) << describe(r.error());
    EXPECT_NE(r.error().message.find(std::to_string(no_such_pid)), std::string::npos)
        << r.error().message;
}

TEST(ProcInfoTest, StartTimeIsFoundPastACommandNameWithSpacesAndParentheses)
{
    // comm is the first 15 bytes of the program's file name: ") x (" confuses a parser that
    // counts fields from the first ')' or splits the name at spaces.
    const std::string link = std::string(::getenv("TMPDIR") ? ::getenv("TMPDIR") : "/tmp") +
                             "/a) b c (d";
    ASSERT_EQ(::symlink("/bin/sleep", link.c_str()), 0);
    auto pid = spawn({link, "30"});
    ::unlink(link.c_str());
    ASSERT_TRUE(pid) << describe(pid.error());
    auto start = process_start_time(*pid);
    auto ours = process_start_time(::getpid());
    ::kill(*pid, SIGKILL);
    reap(*pid);
    ASSERT_TRUE(start) << describe(start.error());
    ASSERT_TRUE(ours);
    EXPECT_GE(*start, *ours);
}

TEST(ProcInfoTest, CmdlineRoundTripsSpacesAndEmptyArguments)
{
    const std::vector<std::string> extra{"a b", "", "c", "  ", "", "tab\there", ""};
    const pid_t pid = start_stopped_shell(extra);
    ASSERT_GT(pid, 0);
    std::vector<std::string> expected{"/bin/sh", "-c", "kill -STOP $$; exit 0", "sh"};
    expected.insert(expected.end(), extra.begin(), extra.end());
    auto argv = process_cmdline(pid);
    ::kill(pid, SIGKILL);
    reap(pid);
    ASSERT_TRUE(argv) << describe(argv.error());
    EXPECT_EQ(*argv, expected);
}

TEST(ProcInfoTest, CmdlineOfAZombieIsEmptyAndOfNoProcessAnError)
{
    auto pid = spawn({"/bin/true"});
    ASSERT_TRUE(pid);
    ASSERT_TRUE(wait_exited_unreaped(*pid));
    auto zombie = process_cmdline(*pid);
    ASSERT_TRUE(zombie) << describe(zombie.error());
    EXPECT_TRUE(zombie->empty());
    reap(*pid);

    auto none = process_cmdline(no_such_pid);
    ASSERT_FALSE(none);
    EXPECT_TRUE(none.error().is(errc::system_error)) << describe(none.error());
}

TEST(ProcInfoTest, HashOfTheCommandLineSeparatesArguments)
{
    const std::vector<std::string> argv{"qemu-system-x86_64", "-name", "guest=a"};
    const auto h = hash_command_line(argv);
    EXPECT_EQ(h.size(), 16U);
    EXPECT_EQ(h.find_first_not_of("0123456789abcdef"), std::string::npos) << h;
    EXPECT_EQ(hash_command_line(argv), h);
    EXPECT_EQ(hash_command_line(std::vector<std::string>(argv)), h);

    EXPECT_NE(hash_command_line({"a b"}), hash_command_line({"a", "b"}));
    EXPECT_NE(hash_command_line({"ab"}), hash_command_line({"a", "b"}));
    EXPECT_NE(hash_command_line({"a", "b"}), hash_command_line({"b", "a"}));
    EXPECT_NE(hash_command_line({}), hash_command_line({""}));
    EXPECT_NE(hash_command_line({""}), hash_command_line({"", ""}));
    EXPECT_NE(hash_command_line({"a"}), hash_command_line({"a", ""}));
    // FNV-1a 64 of the empty input is its offset basis.
    EXPECT_EQ(hash_command_line({}), "cbf29ce484222325");
}

TEST(ProcInfoTest, HashMatchesWhatProcShowsOfTheProcess)
{
    const pid_t pid = start_stopped_shell({"x y", ""});
    ASSERT_GT(pid, 0);
    auto argv = process_cmdline(pid);
    ::kill(pid, SIGKILL);
    reap(pid);
    ASSERT_TRUE(argv);
    EXPECT_EQ(hash_command_line(*argv),
              hash_command_line({"/bin/sh", "-c", "kill -STOP $$; exit 0", "sh", "x y", ""}));
}

TEST(ProcInfoTest, PidfdSignalKillsThroughThePidfd)
{
    auto pid = spawn({"/bin/sleep", "30"});
    ASSERT_TRUE(pid);
    auto pidfd = open_pidfd(*pid);
    ASSERT_TRUE(pidfd) << describe(pidfd.error());
    EXPECT_GE(*pidfd, 0);
    EXPECT_TRUE(::fcntl(*pidfd, F_GETFD) & FD_CLOEXEC) << "pidfds are close-on-exec";
    EXPECT_TRUE(pidfd_signal(*pidfd, 0)) << "signal 0: the process exists";
    auto sent = pidfd_signal(*pidfd, SIGKILL);
    EXPECT_TRUE(sent) << describe(sent.error());
    const int status = reap(*pid);
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;

    // Exited and reaped: the pidfd still names it, and a signal to it is not an error (nor does
    // it reach a process that reused the pid).
    auto after = pidfd_signal(*pidfd, SIGKILL);
    EXPECT_TRUE(after) << describe(after.error());
    ::close(*pidfd);
}

TEST(ProcInfoTest, PidfdSignalToAZombieIsNotAnError)
{
    auto pid = spawn({"/bin/true"});
    ASSERT_TRUE(pid);
    auto pidfd = open_pidfd(*pid);
    ASSERT_TRUE(pidfd);
    ASSERT_TRUE(wait_exited_unreaped(*pid));
    EXPECT_TRUE(pidfd_signal(*pidfd, SIGTERM));
    reap(*pid);
    ::close(*pidfd);
}

TEST(ProcInfoTest, PidfdErrors)
{
    auto none = open_pidfd(no_such_pid);
    ASSERT_FALSE(none);
    EXPECT_TRUE(none.error().is(errc::system_error)) << describe(none.error());

    // Not a pidfd at all: a real error, unlike a process that is gone.
    const int not_pidfd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    ASSERT_GE(not_pidfd, 0);
    auto bad = pidfd_signal(not_pidfd, 0);
    ::close(not_pidfd);
    ASSERT_FALSE(bad);
    EXPECT_TRUE(bad.error().is(errc::system_error)) << describe(bad.error());
}

TEST(ProcInfoTest, BootIdIsAStableUuid)
{
    const auto id = boot_id();
    EXPECT_EQ(id.size(), 36U) << id;
    EXPECT_EQ(id.find_first_not_of("0123456789abcdef-"), std::string::npos) << id;
    EXPECT_EQ(boot_id(), id);
    EXPECT_EQ(id.find('\n'), std::string::npos);
}

} // namespace
} // namespace qm::proc
