// SPDX-License-Identifier: GPL-2.0-or-later
// qm::proc::spawn with real processes, on both of its paths: posix_spawn (no credentials) and
// fork + exec with credentials dropped in the child (as root; skipped otherwise): the log, the
// credentials, PATH search, inherited descriptors as 3, 4, ... and nothing else, a session of its
// own, and a failing step reported by name.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/proc/spawn.hpp"

#include "tests/support/children.hpp"
namespace qm::proc {
namespace {

using test::reap;

namespace fs = std::filesystem;
using namespace std::chrono_literals;

constexpr uid_t nobody = 65534;

std::string describe(const Error& e)
{
    return std::string(to_string(static_cast<errc>(e.code.value()))) + ": " + e.message;
}

std::string read_file(const fs::path& path)
{
    std::ifstream f(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

int exit_code(int wstatus)
{
    return WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1000 - WTERMSIG(wstatus);
}

// The descriptors a process has open.
std::set<int> fds_of(pid_t pid)
{
    std::set<int> fds;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(fmt::format("/proc/{}/fd", pid), ec)) {
        fds.insert(std::stoi(e.path().filename().string()));
    }
    return fds;
}

// Field 6 of /proc/PID/stat (the session id), counted from the last ')' (comm may hold any).
pid_t session_of(pid_t pid)
{
    const std::string stat = read_file(fmt::format("/proc/{}/stat", pid));
    const auto close = stat.rfind(')');
    if (close == std::string::npos) {
        return -1;
    }
    std::istringstream fields(stat.substr(close + 1));
    std::string state;
    pid_t ppid = 0;
    pid_t pgrp = 0;
    pid_t session = -1;
    fields >> state >> ppid >> pgrp >> session;
    return session;
}

// A descriptor numbered high (>= 40), so that the low numbers the child sees are not its own.
int open_high(const fs::path& path, int flags)
{
    const int fd = ::open(path.c_str(), flags | O_CLOEXEC, 0600);
    if (fd < 0) {
        return -1;
    }
    const int high = ::fcntl(fd, F_DUPFD_CLOEXEC, 40);
    ::close(fd);
    return high;
}

class SpawnTest : public testing::Test
{
protected:
    void SetUp() override { dir_ = fs::temp_directory_path(); }

    // Runs argv to completion with its output in a log file: {wait status, output}.
    std::pair<int, std::string> run(const std::vector<std::string>& argv, SpawnOptions options)
    {
        const auto log = dir_ / "spawn.log";
        fs::remove(log);
        options.log_path = log.string();
        auto pid = spawn(argv, options);
        if (!pid) {
            ADD_FAILURE() << describe(pid.error());
            return {-1, {}};
        }
        const int status = reap(*pid);
        std::string out = read_file(log);
        fs::remove(log);
        return {status, out};
    }

    static SpawnOptions as_nobody()
    {
        SpawnOptions o;
        o.uid = nobody;
        o.gid = nobody;
        o.groups = {};
        return o;
    }

    static bool root() { return ::geteuid() == 0; }

    fs::path dir_;
};

#define SKIP_UNLESS_ROOT()                                                                     \
    do {                                                                                       \
        if (!root()) {                                                                         \
            GTEST_SKIP() << "changing credentials needs root";                                 \
        }                                                                                      \
    } while (0)

TEST_F(SpawnTest, WithoutCredentialsTheChildRunsWithOursAndItsOutputInTheLog)
{
    auto [status, out] = run({"/usr/bin/id", "-u"}, {});
    EXPECT_EQ(exit_code(status), 0);
    EXPECT_EQ(out, fmt::format("{}\n", ::geteuid()));

    auto [status2, out2] = run({"sh", "-c", "echo out; echo err >&2; exit 7"}, {});
    EXPECT_EQ(exit_code(status2), 7);
    EXPECT_EQ(out2, "out\nerr\n") << "stdout and stderr both go to the log";
}

TEST_F(SpawnTest, EmptyArgvAndAMissingProgramFail)
{
    auto empty = spawn({});
    ASSERT_FALSE(empty);
    EXPECT_TRUE(empty.error().is(errc::invalid_argument)) << describe(empty.error());

    auto missing = spawn({"/nonexistent/program"});
    ASSERT_FALSE(missing);
    EXPECT_TRUE(missing.error().is(errc::spawn_failed)) << describe(missing.error());
    EXPECT_NE(missing.error().message.find("/nonexistent/program"), std::string::npos);
}

TEST_F(SpawnTest, CredentialsAreDroppedBeforeExec)
{
    SKIP_UNLESS_ROOT();
    auto [status, uid] = run({"/usr/bin/id", "-u"}, as_nobody());
    EXPECT_EQ(exit_code(status), 0);
    EXPECT_EQ(uid, "65534\n");

    auto [status_g, gid] = run({"/usr/bin/id", "-g"}, as_nobody());
    EXPECT_EQ(exit_code(status_g), 0);
    EXPECT_EQ(gid, "65534\n");

    // Supplementary groups: none but the group itself (id -G lists the effective group too).
    auto [status_groups, groups] = run({"/usr/bin/id", "-G"}, as_nobody());
    EXPECT_EQ(exit_code(status_groups), 0);
    EXPECT_EQ(groups, "65534\n") << "root's supplementary groups were kept";

    // Real, effective, saved and file-system ids all changed: the child cannot get root back.
    auto [status_ids, ids] = run({"/bin/grep", "-E", "^(Uid|Gid|Groups):", "/proc/self/status"},
                                 as_nobody());
    EXPECT_EQ(exit_code(status_ids), 0);
    EXPECT_EQ(ids, "Uid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\n"
                   "Groups:\t \n");

    SpawnOptions with_groups = as_nobody();
    with_groups.groups = {nobody, 100};
    auto [status_more, more] = run({"/usr/bin/id", "-G"}, with_groups);
    EXPECT_EQ(exit_code(status_more), 0);
    EXPECT_EQ(more, "65534 100\n");

    // The log is opened before the credentials change: root's file, 0600.
    const auto log = dir_ / "owned.log";
    SpawnOptions o = as_nobody();
    o.log_path = log.string();
    auto pid = spawn({"/bin/true"}, o);
    ASSERT_TRUE(pid) << describe(pid.error());
    EXPECT_EQ(exit_code(reap(*pid)), 0);
    struct stat st
    {
    };
    ASSERT_EQ(::stat(log.c_str(), &st), 0);
    EXPECT_EQ(st.st_uid, 0U);
    EXPECT_EQ(st.st_mode & 0777, 0600U);
    fs::remove(log);
}

TEST_F(SpawnTest, OnlyAUserOrOnlyAGroupChangesOnlyThat)
{
    SKIP_UNLESS_ROOT();
    SpawnOptions only_gid;
    only_gid.gid = nobody;
    auto [status, ids] = run({"/bin/sh", "-c", "id -u; id -G"}, only_gid);
    EXPECT_EQ(exit_code(status), 0);
    EXPECT_EQ(ids, "0\n65534\n") << "the supplementary groups are dropped with any change";

    SpawnOptions only_uid;
    only_uid.uid = nobody;
    auto [status2, ids2] = run({"/bin/sh", "-c", "id -u; id -g"}, only_uid);
    EXPECT_EQ(exit_code(status2), 0);
    EXPECT_EQ(ids2, "65534\n0\n");
}

TEST_F(SpawnTest, AProgramThatDoesNotExistFailsAtTheExecStep)
{
    SKIP_UNLESS_ROOT();
    auto pid = spawn({"/nonexistent/qemu"}, as_nobody());
    ASSERT_FALSE(pid);
    EXPECT_TRUE(pid.error().is(errc::spawn_failed)) << describe(pid.error());
    EXPECT_EQ(pid.error().message,
              "cannot start '/nonexistent/qemu': exec: No such file or directory");

    auto unnamed = spawn({"no-such-program-qm"}, as_nobody());
    ASSERT_FALSE(unnamed);
    EXPECT_TRUE(unnamed.error().is(errc::spawn_failed)) << describe(unnamed.error());
    EXPECT_NE(unnamed.error().message.find(": exec: "), std::string::npos)
        << unnamed.error().message;
    // The leak check: the failed child was reaped by spawn().
}

TEST_F(SpawnTest, AFailingStepIsNamed)
{
    SKIP_UNLESS_ROOT();
    SpawnOptions o = as_nobody();
    o.log_path = "/nonexistent/dir/log";
    auto pid = spawn({"/bin/true"}, o);
    ASSERT_FALSE(pid);
    EXPECT_TRUE(pid.error().is(errc::spawn_failed)) << describe(pid.error());
    EXPECT_NE(pid.error().message.find("open /dev/null or the log"), std::string::npos)
        << pid.error().message;

    // A program only root may execute: exec fails after the credentials changed.
    const auto script = dir_ / "root-only.sh";
    {
        std::ofstream f(script);
        f << "#!/bin/sh\nexit 3\n";
    }
    fs::permissions(script, fs::perms::owner_all, fs::perm_options::replace);
    auto [status, out] = run({script.string()}, {});
    EXPECT_EQ(exit_code(status), 3) << "root runs it: " << out;
    auto denied = spawn({script.string()}, as_nobody());
    ASSERT_FALSE(denied);
    EXPECT_TRUE(denied.error().is(errc::spawn_failed)) << describe(denied.error());
    EXPECT_NE(denied.error().message.find(": exec: Permission denied"), std::string::npos)
        << denied.error().message;
    fs::remove(script);
}

TEST_F(SpawnTest, APathSearchedNameWorksWithCredentials)
{
    SKIP_UNLESS_ROOT();
    auto [status, uid] = run({"id", "-u"}, as_nobody());
    EXPECT_EQ(exit_code(status), 0);
    EXPECT_EQ(uid, "65534\n");
}

// Both paths: the inherited descriptors are 3, 4, 5 in order, and nothing else crosses exec.
class SpawnFdsTest : public SpawnTest, public testing::WithParamInterface<bool>
{
protected:
    SpawnOptions options() const
    {
        if (GetParam()) {
            return as_nobody();
        }
        return {};
    }
    void SetUp() override
    {
        SpawnTest::SetUp();
        if (GetParam() && !root()) {
            GTEST_SKIP() << "changing credentials needs root";
        }
    }
};

TEST_P(SpawnFdsTest, InheritedDescriptorsArriveAs3And4AndNothingElse)
{
    const auto a = dir_ / "inherit-a";
    const auto b = dir_ / "inherit-b";
    const auto c = dir_ / "inherit-c";
    std::ofstream(a).put('a');
    std::ofstream(b).put('b');
    std::ofstream(c).put('c');
    // Numbered high, so that the low numbers are free in the parent (as the report pipe of the
    // credentials path would like them to be).
    const int fa = open_high(a, O_RDONLY);
    const int fb = open_high(b, O_RDONLY);
    ASSERT_GE(fa, 0);
    ASSERT_GE(fb, 0);
    // Not close-on-exec, and not passed: must not reach the child either.
    const int stray = ::open(c.c_str(), O_RDONLY);
    ASSERT_GE(stray, 0);

    SpawnOptions o = options();
    o.inherit_fds = {fb, fa};
    auto [status, out] = run({"/usr/bin/readlink", "/proc/self/fd/3", "/proc/self/fd/4"}, o);
    EXPECT_EQ(exit_code(status), 0) << out;
    EXPECT_EQ(out, b.string() + "\n" + a.string() + "\n");

    auto [status5, out5] = run({"/usr/bin/readlink", "/proc/self/fd/5"}, o);
    EXPECT_NE(exit_code(status5), 0) << "fd 5 reached the child: " << out5;

    // The whole set, from outside, while the child sleeps: 0, 1, 2, 3, 4 and nothing else.
    o.log_path.clear();
    auto pid = spawn({"/bin/sleep", "30"}, o);
    ASSERT_TRUE(pid) << describe(pid.error());
    const std::set<int> expected{0, 1, 2, 3, 4};
    const auto end = std::chrono::steady_clock::now() + 5s;
    std::set<int> seen;
    while ((seen = fds_of(*pid)) != expected && std::chrono::steady_clock::now() < end) {
        // sleep may hold a descriptor for a moment while it starts (locale files)
    }
    EXPECT_EQ(seen, expected) << "stray fd " << stray;
    std::error_code ec;
    EXPECT_EQ(fs::read_symlink(fmt::format("/proc/{}/fd/3", *pid), ec), b);
    EXPECT_EQ(fs::read_symlink(fmt::format("/proc/{}/fd/4", *pid), ec), a);
    EXPECT_EQ(fs::read_symlink(fmt::format("/proc/{}/fd/0", *pid), ec), "/dev/null");
    ::kill(*pid, SIGKILL);
    EXPECT_EQ(exit_code(reap(*pid)), -1000 - SIGKILL);

    // Ours are untouched.
    EXPECT_NE(::fcntl(fa, F_GETFD), -1);
    EXPECT_NE(::fcntl(fb, F_GETFD), -1);
    ::close(fa);
    ::close(fb);
    ::close(stray);
    fs::remove(a);
    fs::remove(b);
    fs::remove(c);
}

TEST_P(SpawnFdsTest, ThreeHighDescriptorsAllArriveAndAFailureIsStillReported)
{
    std::vector<fs::path> paths;
    std::vector<int> fds;
    for (int i = 0; i < 3; ++i) {
        paths.push_back(dir_ / fmt::format("high-{}", i));
        std::ofstream(paths.back()).put('x');
        fds.push_back(open_high(paths.back(), O_RDWR));
        ASSERT_GE(fds.back(), 0);
    }
    SpawnOptions o = options();
    o.inherit_fds = fds;
    auto [status, out] = run({"/usr/bin/readlink", "/proc/self/fd/3", "/proc/self/fd/4",
                              "/proc/self/fd/5"},
                             o);
    EXPECT_EQ(exit_code(status), 0) << out;
    EXPECT_EQ(out, paths[0].string() + "\n" + paths[1].string() + "\n" + paths[2].string() + "\n");

    // A child that fails still says so, and writes nothing into a passed descriptor.
    auto missing = spawn({"/nonexistent/qemu"}, o);
    ASSERT_FALSE(missing) << "a failed exec was reported as a started child";
    EXPECT_TRUE(missing.error().is(errc::spawn_failed)) << describe(missing.error());
    for (const auto& p : paths) {
        EXPECT_EQ(read_file(p), "x") << p;
    }
    for (int fd : fds) {
        ::close(fd);
    }
    for (const auto& p : paths) {
        fs::remove(p);
    }
}

TEST_P(SpawnFdsTest, TheChildIsInANewSessionUnlessAskedOtherwise)
{
    SpawnOptions o = options();
    auto pid = spawn({"/bin/sleep", "30"}, o);
    ASSERT_TRUE(pid) << describe(pid.error());
    EXPECT_EQ(session_of(*pid), *pid) << "the child leads a session of its own";
    EXPECT_NE(session_of(*pid), ::getsid(0));
    ::kill(*pid, SIGKILL);
    EXPECT_EQ(exit_code(reap(*pid)), -1000 - SIGKILL);

    o.new_session = false;
    auto same = spawn({"/bin/sleep", "30"}, o);
    ASSERT_TRUE(same) << describe(same.error());
    EXPECT_EQ(session_of(*same), ::getsid(0));
    ::kill(*same, SIGKILL);
    EXPECT_EQ(exit_code(reap(*same)), -1000 - SIGKILL);
}

INSTANTIATE_TEST_SUITE_P(Paths, SpawnFdsTest, testing::Bool(),
                         [](const testing::TestParamInfo<bool>& info) {
                             return info.param ? "WithCredentials" : "PosixSpawn";
                         });

} // namespace
} // namespace qm::proc
