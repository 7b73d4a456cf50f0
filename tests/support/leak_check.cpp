// SPDX-License-Identifier: GPL-2.0-or-later
// A GoogleTest listener linked into every test binary: after each test, the process must have the
// same open file descriptors, no child processes and no new entries in its temporary directory as
// before it. A test that leaks fails, naming what leaked. Each test program gets a temporary
// directory of its own (TMPDIR points there, so std::filesystem::temp_directory_path() and QEMU
// use it), which must be empty when the program ends.
#include <dirent.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include <gtest/gtest.h>

namespace {

std::set<int> open_fds()
{
    std::set<int> fds;
    for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
        fds.insert(std::stoi(entry.path().filename().string()));
    }
    return fds;
}

std::string fd_target(int fd)
{
    std::error_code ec;
    auto target = std::filesystem::read_symlink("/proc/self/fd/" + std::to_string(fd), ec);
    return ec ? std::string("?") : target.string();
}

// Children of this process, from /proc (zombies included: an unreaped child is a leak too).
std::set<pid_t> children()
{
    std::set<pid_t> out;
    const auto self = std::to_string(::getpid());
    std::ifstream f("/proc/self/task/" + self + "/children");
    pid_t pid = 0;
    while (f >> pid) {
        out.insert(pid);
    }
    return out;
}

std::set<std::string> temp_entries()
{
    std::set<std::string> out;
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(
             std::filesystem::temp_directory_path(), ec)) {
        out.insert(entry.path().filename().string());
    }
    return out;
}

class LeakCheck : public testing::EmptyTestEventListener
{
public:
    void OnTestProgramStart(const testing::UnitTest& /*unit*/) override
    {
        // A private TMPDIR: parallel test programs must not see each other's files.
        std::string templ = "/tmp/qm-test.XXXXXX";
        if (::mkdtemp(templ.data()) != nullptr) {
            dir_ = templ;
            ::setenv("TMPDIR", dir_.c_str(), 1);
        }
    }

    void OnTestProgramEnd(const testing::UnitTest& /*unit*/) override
    {
        if (dir_.empty()) {
            return;
        }
        std::error_code ec;
        if (!std::filesystem::is_empty(dir_, ec)) {
            std::fprintf(stderr, "leak_check: files left in %s:", dir_.c_str());
            for (const auto& name : temp_entries()) {
                std::fprintf(stderr, " %s", name.c_str());
            }
            std::fprintf(stderr, "\n");
        }
        std::filesystem::remove_all(dir_, ec);
    }

    void OnTestStart(const testing::TestInfo& /*info*/) override
    {
        fds_ = open_fds();
        children_ = children();
        temp_ = temp_entries();
    }

    void OnTestEnd(const testing::TestInfo& info) override
    {
        if (info.result()->Skipped()) {
            return;
        }
        // The directory iterator above held one fd during the listing; it is closed again now.
        std::ostringstream leaks;
        for (int fd : open_fds()) {
            if (fds_.count(fd) == 0) {
                leaks << " fd " << fd << " -> " << fd_target(fd) << ";";
            }
        }
        for (pid_t pid : children()) {
            if (children_.count(pid) == 0) {
                leaks << " child process " << pid << ";";
            }
        }
        for (const auto& name : temp_entries()) {
            if (temp_.count(name) == 0) {
                leaks << " temporary file " << name << ";";
            }
        }
        if (!leaks.str().empty()) {
            ADD_FAILURE() << "Test leaked:" << leaks.str();
        }
    }

private:
    std::string dir_;
    std::set<int> fds_;
    std::set<pid_t> children_;
    std::set<std::string> temp_;
};

// Registered before main() runs (gtest_main then runs the tests with it).
const bool registered = [] {
    testing::UnitTest::GetInstance()->listeners().Append(new LeakCheck); // NOLINT: gtest owns it
    return true;
}();

} // namespace
