// SPDX-License-Identifier: GPL-2.0-or-later
// The dbus suite's fixture: a private dbus-daemon (no system bus needed) with a permissive policy
// (so that the daemon's own credential checks are what is tested), the real qmachined serving
// org.qmachined1 on it, an sd-bus client, and the command line clients (busctl, dbus-send).
#pragma once

#include <systemd/sd-bus.h>

#include <sys/stat.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "tests/daemon/machine_daemon.hpp"
#include "tests/support/daemon_process.hpp"

namespace qm::test {

class DbusTest : public MachineDaemonTest
{
protected:
    void SetUp() override
    {
        MachineDaemonTest::SetUp();
        if (HasFatalFailure() || IsSkipped()) {
            return;
        }
        // The bus lives in a directory anyone may enter (not under TMPDIR, which may be private):
        // the tests call it as another user too.
        std::string templ = "/tmp/qbus.XXXXXX";
        ASSERT_NE(::mkdtemp(templ.data()), nullptr);
        bus_dir_ = templ;
        ::chmod(bus_dir_.c_str(), 0755);
        bus_socket_ = bus_dir_ / "bus";
        const auto config = bus_dir_ / "bus.conf";
        write_whole_file(config, fmt::format(R"(<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
  {}
</busconfig>
)",
                                             bus_socket_.string(),
                                             system_policy_ ? "<include>" + policy_file() + "</include>"
                                                            : std::string()));
        bus_daemon_ = std::make_unique<DaemonProcess>(
            "dbus-daemon", std::vector<std::string>{"--config-file=" + config.string(), "--nofork"},
            bus_dir_ / "dbus-daemon.out");
        ASSERT_TRUE(eventually([&] { return accepts_connections(bus_socket_); }, 10s))
            << read_whole_file(bus_dir_ / "dbus-daemon.out");
        ::chmod(bus_socket_.c_str(), 0777);
    }

    void TearDown() override
    {
        if (client_ != nullptr) {
            sd_bus_flush_close_unref(client_);
            client_ = nullptr;
        }
        MachineDaemonTest::TearDown();
        if (bus_daemon_) {
            bus_daemon_->signal(SIGTERM);
            bus_daemon_->wait_exit(10s);
            bus_daemon_.reset();
        }
        std::error_code ec;
        std::filesystem::remove_all(bus_dir_, ec);
    }

    std::string bus_address() const { return "unix:path=" + bus_socket_.string(); }

    // systemd/org.qmachined1.conf, the system bus policy that is installed.
    static std::string policy_file()
    {
        return std::string(QM_SOURCE_DIR) + "/systemd/org.qmachined1.conf";
    }

    // qmachined on the private bus, stopping its machines at SIGTERM; ready once it owns its name.
    void start_bus_daemon(std::vector<std::string> extra = {})
    {
        extra.insert(extra.begin(), {"--bus", bus_address()});
        ASSERT_NO_FATAL_FAILURE(start_daemon(extra));
        ASSERT_TRUE(eventually(
            [&] {
                return busctl({"status", "org.qmachined1"}).status == 0;
            },
            10s))
            << daemon().output();
    }

    // An sd-bus connection of the test's own (root: allowed everything).
    sd_bus* client()
    {
        if (client_ == nullptr) {
            EXPECT_GE(sd_bus_new(&client_), 0);
            EXPECT_GE(sd_bus_set_address(client_, bus_address().c_str()), 0);
            EXPECT_GE(sd_bus_set_bus_client(client_, 1), 0);
            EXPECT_GE(sd_bus_start(client_), 0);
        }
        return client_;
    }

    CommandResult busctl(std::vector<std::string> args)
    {
        args.insert(args.begin(), {"busctl", "--address=" + bus_address()});
        return run_command(args, 60s);
    }

    // dbus-send --print-reply (it names errors: "Error org.qmachined1.Error.X: message"), as
    // `uid` when given (setpriv: its primary group the same number, no supplementary groups but
    // `groups`, a comma-separated list of gids).
    CommandResult dbus_send(const std::string& path, const std::string& method,
                            std::vector<std::string> args, std::optional<uid_t> uid = {},
                            const std::string& groups = {})
    {
        std::vector<std::string> argv;
        if (uid) {
            argv = {"setpriv", fmt::format("--reuid={}", *uid), fmt::format("--regid={}", *uid),
                    groups.empty() ? std::string("--clear-groups") : "--groups=" + groups};
        }
        argv.insert(argv.end(), {"dbus-send", "--bus=" + bus_address(), "--print-reply",
                                 "--reply-timeout=60000", "--dest=org.qmachined1", path, method});
        argv.insert(argv.end(), args.begin(), args.end());
        return run_command(argv, 90s);
    }

    // The bus applies the installed policy after the permissive one (set before SetUp()).
    bool system_policy_ = false;
    std::filesystem::path bus_dir_;
    std::filesystem::path bus_socket_;
    std::unique_ptr<DaemonProcess> bus_daemon_;
    sd_bus* client_ = nullptr;
};

} // namespace qm::test
