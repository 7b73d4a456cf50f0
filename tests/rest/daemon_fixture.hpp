// SPDX-License-Identifier: GPL-2.0-or-later
// A fixture that runs the real qmachined on private short temp directories: started as a child,
// ready once `<runtime>/qmachined.sock` exists, and at teardown SIGTERMed and checked (exit 0, no
// QEMU left, no socket left). For the REST suite now, the D-Bus and CLI suites later.
#pragma once

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <signal.h>
#include <stdlib.h>
#include <sys/types.h>

#include <gtest/gtest.h>

#include "tests/support/daemon_process.hpp"

#ifndef QM_QMACHINED
#error "QM_QMACHINED (the daemon under test) must be defined by the build"
#endif

namespace qm::test {

class DaemonFixture : public testing::Test
{
protected:
    void SetUp() override
    {
        // Short: unix socket paths (the daemon's and each QEMU's) must stay under 108 bytes.
        // Under TMPDIR, which the leak check watches.
        std::string templ = (std::filesystem::temp_directory_path() / "qd.XXXXXX").string();
        ASSERT_NE(::mkdtemp(templ.data()), nullptr) << std::strerror(errno);
        root_ = templ;
        state_ = root_ / "s";
        runtime_ = root_ / "r";
    }

    void TearDown() override
    {
        if (daemon_) {
            stop_daemon();
        }
        std::error_code ec;
        std::filesystem::remove_all(root_, ec);
    }

    // The daemon's arguments: the private directories, then `extra`.
    std::vector<std::string> daemon_args(const std::vector<std::string>& extra = {}) const
    {
        // stop-machines: the fixture's SIGTERM stops what runs (the daemon suite's tests of the
        // default, leave-running, pass their own).
        std::vector<std::string> args{"--state-dir", state_.string(), "--runtime-dir",
                                      runtime_.string(), "--shutdown-policy", "stop-machines",
                                      // Never the host's bus (the dbus suite names a private one).
                                      "--bus", "none"};
        args.insert(args.end(), extra.begin(), extra.end());
        return args;
    }

    // Starts qmachined and waits until its socket accepts connections (it appears only once the
    // daemon answers; one left by a daemon that was killed refuses them). Use with ASSERT_NO_FATAL_FAILURE.
    void start_daemon(const std::vector<std::string>& extra = {})
    {
        ASSERT_FALSE(daemon_) << "the daemon already runs";
        daemon_ =
            std::make_unique<DaemonProcess>(QM_QMACHINED, daemon_args(extra),
                                            root_ / ("daemon" + std::to_string(++runs_) + ".out"));
        const bool ready = eventually(
            [&] { return accepts_connections(socket_path()) || !daemon_->running(); }, 30s);
        ASSERT_TRUE(ready && daemon_->running()) << "qmachined did not become ready:\n"
                                                 << daemon_->output();
    }

    // SIGTERM; the daemon must exit 0 within `deadline`, leave no QEMU behind and remove its
    // socket.
    void stop_daemon(std::chrono::milliseconds deadline = 60s)
    {
        if (!daemon_) {
            return;
        }
        daemon_->signal(SIGTERM);
        EXPECT_EQ(daemon_->wait_exit(deadline), 0) << daemon_->output();
        expect_daemon_gone();
    }

    // After the daemon exited: no process mentions our directories (every QEMU did), no socket.
    void expect_daemon_gone()
    {
        EXPECT_TRUE(eventually([&] { return processes_mentioning(root_.string()).empty(); }, 10s))
            << "processes left behind: "
            << testing::PrintToString(processes_mentioning(root_.string()));
        EXPECT_FALSE(std::filesystem::exists(socket_path())) << "the socket was left behind";
        daemon_.reset();
    }

    std::filesystem::path socket_path() const { return runtime_ / "qmachined.sock"; }
    DaemonProcess& daemon() { return *daemon_; }
    pid_t daemon_pid() const { return daemon_->pid(); }
    std::string daemon_output() const { return daemon_ ? daemon_->output() : std::string(); }

    std::filesystem::path root_;
    std::filesystem::path state_;
    std::filesystem::path runtime_;
    std::unique_ptr<DaemonProcess> daemon_;
    int runs_ = 0;
};

} // namespace qm::test
