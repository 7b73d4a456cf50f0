// SPDX-License-Identifier: GPL-2.0-or-later
// qm::Machine without a process: the seed's defaults, the command line of every console and
// monitor option (inspectable before launch), add_fd's arguments, event_match, the temp dir, and
// what a machine that was never launched answers.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/asio.hpp"
#include "libmachine/json.hpp"
#include "libmachine/machine/machine.hpp"
#include "libmachine/qmp/address.hpp"
#include "tests/support/loop.hpp"

namespace qm {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using test::run_co;
using Args = std::vector<std::string>;

class MachineArgsTest : public testing::Test
{
protected:
    MachineConfig config(std::string name = "vm") const
    {
        MachineConfig c;
        c.binary = "/usr/bin/qemu-system-x86_64";
        c.name = std::move(name);
        c.base_temp_dir = fs::temp_directory_path().string();
        return c;
    }

    std::string tmp() const { return fs::temp_directory_path().string(); }

    // The base arguments up to and including the QMP monitor, for a machine named "vm".
    Args monitor_prefix() const
    {
        return {"-display", "none",
                "-vga",     "none",
                "-name",    "guest=vm,process=qemu:vm",
                "-chardev", "socket,id=mon,path=" + tmp() + "/vm-monitor.sock",
                "-mon",     "chardev=mon,mode=control"};
    }

    static Args concat(Args a, const Args& b)
    {
        a.insert(a.end(), b.begin(), b.end());
        return a;
    }

    asio::io_context ioc_{1};
};

TEST_F(MachineArgsTest, ConfigDefaultsAreTheSeeds)
{
    const MachineConfig c;
    EXPECT_EQ(c.binary, "qemu-system-x86_64");
    EXPECT_TRUE(c.args.empty());
    EXPECT_TRUE(c.wrapper.empty());
    EXPECT_TRUE(c.name.empty());
    EXPECT_EQ(c.base_temp_dir, "/var/tmp");
    EXPECT_FALSE(c.monitor_address.has_value());
    EXPECT_TRUE(c.sock_dir.empty());
    EXPECT_FALSE(c.drain_console);
    EXPECT_TRUE(c.console_log.empty());
    EXPECT_TRUE(c.log_dir.empty());
    EXPECT_EQ(c.qmp_timer, 30s);
    EXPECT_FALSE(c.log_append);

    // shutdown(has_quit=False, hard=False, timeout=30); wait(timeout=30).
    const ShutdownOptions s;
    EXPECT_FALSE(s.has_quit);
    EXPECT_FALSE(s.hard);
    EXPECT_EQ(s.timeout, 30s);
}

TEST_F(MachineArgsTest, ConsoleAndShutdownModeDefaultsBeyondTheSeed)
{
    const MachineConfig c;
    EXPECT_EQ(c.console_ring_size, 64U * 1024U);
    EXPECT_EQ(c.console_log_max, 1024U * 1024U);
    const ShutdownOptions s;
    EXPECT_EQ(s.mode, ShutdownMode::quit) << "the seed's ladder";
    EXPECT_EQ(s.powerdown_timeout, 60s);
    EXPECT_STREQ(to_string(ShutdownStep::none), "none");
    EXPECT_STREQ(to_string(ShutdownStep::exited), "exited");
    EXPECT_STREQ(to_string(ShutdownStep::guest_poweroff), "guest-poweroff");
    EXPECT_STREQ(to_string(ShutdownStep::quit), "quit");
    EXPECT_STREQ(to_string(ShutdownStep::kill), "kill");
    Machine m(ioc_, config("m-step"));
    EXPECT_EQ(m.last_shutdown_step(), ShutdownStep::none);
}

TEST_F(MachineArgsTest, ConsoleCallsNeedAConsoleAndALaunch)
{
    Machine plain(ioc_, config("m-noconsole"));
    EXPECT_EQ(plain.console(), nullptr);
    EXPECT_EQ(plain.console_output(), "");
    EXPECT_EQ(plain.console_offset(), 0U);
    auto w = run_co(ioc_, plain.console_write("x"));
    ASSERT_FALSE(w);
    EXPECT_TRUE(w.error().is(errc::invalid_state)) << w.error().message;
    auto r = run_co(ioc_, plain.wait_console("x", 10ms));
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::invalid_state)) << r.error().message;

    Machine with(ioc_, config("m-console-unlaunched"));
    with.set_console();
    auto before = run_co(ioc_, with.wait_console("x", 10ms));
    ASSERT_FALSE(before);
    EXPECT_TRUE(before.error().is(errc::invalid_state)) << before.error().message;
    EXPECT_NE(before.error().message.find("launched"), std::string::npos) << before.error().message;
}

TEST_F(MachineArgsTest, DefaultNameIsQemuPidWithACounter)
{
    MachineConfig c = config("");
    Machine a(ioc_, c);
    Machine b(ioc_, c);
    const std::string prefix = fmt::format("qemu-{}-", ::getpid());
    EXPECT_EQ(a.name().rfind(prefix, 0), 0U) << a.name();
    EXPECT_EQ(b.name().rfind(prefix, 0), 0U) << b.name();
    EXPECT_NE(a.name(), b.name());
    // ... and the socket names follow it.
    EXPECT_EQ(a.console_socket_path(), tmp() + "/" + a.name() + "-console.sock");
}

TEST_F(MachineArgsTest, BaseArgsAreTheSeedsPlusName)
{
    Machine m(ioc_, config());
    EXPECT_EQ(m.base_args(), monitor_prefix());
    EXPECT_EQ(m.full_args(), concat({"/usr/bin/qemu-system-x86_64"}, monitor_prefix()));
    EXPECT_TRUE(m.args().empty());
}

TEST_F(MachineArgsTest, SetMachineComesAfterTheMonitor)
{
    Machine m(ioc_, config());
    m.set_machine("none");
    EXPECT_EQ(m.base_args(), concat(monitor_prefix(), {"-machine", "none"}));
}

TEST_F(MachineArgsTest, ArgsAndAddArgsFollowTheBaseArguments)
{
    MachineConfig c = config();
    c.args = {"-S"};
    Machine m(ioc_, c);
    m.add_args({"-m", "64"});
    m.add_args({"-nodefaults"});
    EXPECT_EQ(m.args(), (Args{"-S", "-m", "64", "-nodefaults"}));
    EXPECT_EQ(m.full_args(), concat(concat({"/usr/bin/qemu-system-x86_64"}, monitor_prefix()),
                                    {"-S", "-m", "64", "-nodefaults"}));
}

TEST_F(MachineArgsTest, WrapperPrefixesTheCommandLine)
{
    MachineConfig c = config();
    c.wrapper = {"taskset", "-c", "1"};
    Machine m(ioc_, c);
    EXPECT_EQ(m.full_args(),
              concat({"taskset", "-c", "1", "/usr/bin/qemu-system-x86_64"}, monitor_prefix()));
}

TEST_F(MachineArgsTest, SetConsoleWithoutDeviceUsesTheDefaultSerialPort)
{
    Machine m(ioc_, config());
    m.set_machine("pc");
    m.set_console();
    EXPECT_EQ(m.base_args(),
              concat(monitor_prefix(),
                     {"-machine", "pc", "-chardev",
                      "socket,id=console,path=" + tmp() + "/vm-console.sock,server=on,wait=off",
                      "-serial", "chardev:console"}));
}

TEST_F(MachineArgsTest, SetConsoleWithADeviceType)
{
    Machine m(ioc_, config());
    m.set_console("isa-serial");
    EXPECT_EQ(m.base_args(),
              concat(monitor_prefix(),
                     {"-chardev",
                      "socket,id=console,path=" + tmp() + "/vm-console.sock,server=on,wait=off",
                      "-device", "isa-serial,chardev=console"}));
}

TEST_F(MachineArgsTest, ConsoleIndexAddsNullSerialsFirst)
{
    Machine m(ioc_, config());
    m.set_console(std::nullopt, 2);
    EXPECT_EQ(m.base_args(),
              concat(monitor_prefix(),
                     {"-serial", "null", "-serial", "null", "-chardev",
                      "socket,id=console,path=" + tmp() + "/vm-console.sock,server=on,wait=off",
                      "-serial", "chardev:console"}));

    Machine d(ioc_, config());
    d.set_console("virtconsole", 1);
    EXPECT_EQ(d.base_args(),
              concat(monitor_prefix(),
                     {"-serial", "null", "-chardev",
                      "socket,id=console,path=" + tmp() + "/vm-console.sock,server=on,wait=off",
                      "-device", "virtconsole,chardev=console"}));
}

TEST_F(MachineArgsTest, ConsoleLogIsQemusOwnAppendedLogfile)
{
    MachineConfig c = config();
    c.console_log = "/var/log/vm,console.log";
    Machine m(ioc_, c);
    m.set_console();
    const Args args = m.base_args();
    ASSERT_GE(args.size(), 2U);
    EXPECT_EQ(args[args.size() - 3],
              "socket,id=console,path=" + tmp() +
                  "/vm-console.sock,server=on,wait=off,logfile=/var/log/vm,,console.log,"
                  "logappend=on");
}

TEST_F(MachineArgsTest, SockDirHoldsBothSockets)
{
    MachineConfig c = config();
    c.sock_dir = "/run/qm";
    Machine m(ioc_, c);
    m.set_console();
    EXPECT_EQ(m.console_socket_path(), "/run/qm/vm-console.sock");
    const Args args = m.base_args();
    EXPECT_NE(std::find(args.begin(), args.end(), "socket,id=mon,path=/run/qm/vm-monitor.sock"),
              args.end());
    EXPECT_NE(std::find(args.begin(), args.end(),
                        "socket,id=console,path=/run/qm/vm-console.sock,server=on,wait=off"),
              args.end());
}

TEST_F(MachineArgsTest, SetQmpMonitorFalseDropsTheMonitor)
{
    Machine m(ioc_, config());
    m.set_qmp_monitor(false);
    m.set_machine("none");
    EXPECT_EQ(m.base_args(), (Args{"-display", "none", "-vga", "none", "-name",
                                   "guest=vm,process=qemu:vm", "-machine", "none"}));
    m.set_qmp_monitor(true);
    EXPECT_EQ(m.base_args(), concat(monitor_prefix(), {"-machine", "none"}));
}

TEST_F(MachineArgsTest, AddMonitorNullAppendsAnHmpMonitorOnNull)
{
    Machine m(ioc_, config());
    m.add_monitor_null();
    EXPECT_EQ(m.args(), (Args{"-monitor", "null"}));
    EXPECT_EQ(m.base_args(), monitor_prefix()); // the QMP monitor stays
}

TEST_F(MachineArgsTest, TcpMonitorAddressGivesHostAndPort)
{
    auto addr = qmp::Address::parse("127.0.0.1:4444");
    ASSERT_TRUE(addr);
    MachineConfig c = config();
    c.monitor_address = *addr;
    Machine m(ioc_, c);
    const Args args = m.base_args();
    ASSERT_GE(args.size(), 10U);
    EXPECT_EQ(args[6], "-chardev");
    EXPECT_EQ(args[7], "socket,id=mon,host=127.0.0.1,port=4444");
    EXPECT_EQ(args[8], "-mon");
    EXPECT_EQ(args[9], "chardev=mon,mode=control");
}

TEST_F(MachineArgsTest, UnixMonitorAddressIsUsedAsGiven)
{
    MachineConfig c = config();
    c.monitor_address = qmp::Address::unix_socket("/run/qm/my,mon.sock");
    Machine m(ioc_, c);
    const Args args = m.base_args();
    ASSERT_GE(args.size(), 8U);
    // QemuOpts doubles commas in values.
    EXPECT_EQ(args[7], "socket,id=mon,path=/run/qm/my,,mon.sock");
}

TEST_F(MachineArgsTest, NameWithACommaIsEscapedInName)
{
    Machine m(ioc_, config("a,b"));
    const Args args = m.base_args();
    ASSERT_GE(args.size(), 6U);
    EXPECT_EQ(args[4], "-name");
    EXPECT_EQ(args[5], "guest=a,,b,process=qemu:a,,b");
}

TEST_F(MachineArgsTest, AddFdNumbersTheInheritedDescriptorsFromThree)
{
    const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    {
        Machine m(ioc_, config());
        ASSERT_TRUE(m.add_fd(fd, 1, "first"));
        ASSERT_TRUE(m.add_fd(fd, 2, "with,comma", "extra=1"));
        EXPECT_EQ(m.args(), (Args{"-add-fd", "fd=3,set=1,opaque=first", "-add-fd",
                                  "fd=4,set=2,opaque=with,,comma,extra=1"}));
        // The machine holds duplicates until it is destroyed, never the caller's descriptor.
        EXPECT_GE(::fcntl(fd, F_GETFD), 0);
    }
    EXPECT_GE(::fcntl(fd, F_GETFD), 0) << "the caller's descriptor was closed";
    ::close(fd);
}

TEST_F(MachineArgsTest, AddFdRefusesABadDescriptor)
{
    Machine m(ioc_, config());
    auto r = m.add_fd(-1, 1, "x");
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::invalid_argument)) << r.error().message;
    EXPECT_TRUE(m.args().empty());
}

TEST_F(MachineArgsTest, EventMatchFollowsTheSeedsExamples)
{
    auto j = [](const char* text) { return std::move(*json::parse(text)); };
    const json::Value null_match;
    EXPECT_TRUE(Machine::event_match(j(R"({"a":1})"), null_match));
    EXPECT_TRUE(Machine::event_match(j(R"({"foo":{"bar":1}})"), j(R"({"foo":null})")));
    EXPECT_TRUE(Machine::event_match(j(R"({"foo":5})"), j(R"({"foo":null})")));
    EXPECT_FALSE(Machine::event_match(j(R"({"foo":{"bar":1}})"), j(R"({"foo":{"abc":null}})")));
    EXPECT_TRUE(
        Machine::event_match(j(R"({"foo":{"bar":1,"rab":2}})"), j(R"({"foo":{"rab":2}})")));
    EXPECT_FALSE(Machine::event_match(j(R"({"foo":{"rab":3}})"), j(R"({"foo":{"rab":2}})")));
    EXPECT_FALSE(Machine::event_match(j(R"({"bar":1})"), j(R"({"foo":null})")));
    EXPECT_TRUE(Machine::event_match(j(R"({"a":"x"})"), j(R"({})")));
}

TEST_F(MachineArgsTest, TempDirIsCreatedOnDemandAndRemovedWithTheMachine)
{
    std::string dir;
    {
        Machine m(ioc_, config());
        EXPECT_TRUE(fs::is_empty(tmp())) << "created before it was asked for";
        auto t = m.temp_dir();
        ASSERT_TRUE(t) << t.error().message;
        dir = *t;
        EXPECT_TRUE(fs::is_directory(dir));
        EXPECT_EQ(fs::path(dir).parent_path().string(), tmp());
        EXPECT_EQ(fs::path(dir).filename().string().rfind("qemu-machine-", 0), 0U) << dir;
        auto again = m.temp_dir();
        ASSERT_TRUE(again);
        EXPECT_EQ(*again, dir);
        // log_dir defaults to the temp dir.
        auto logs = m.log_dir();
        ASSERT_TRUE(logs);
        EXPECT_EQ(*logs, dir);
    }
    EXPECT_FALSE(fs::exists(dir));

    MachineConfig c = config();
    c.log_dir = "/var/log/qm";
    Machine m(ioc_, c);
    auto logs = m.log_dir();
    ASSERT_TRUE(logs);
    EXPECT_EQ(*logs, "/var/log/qm");
    EXPECT_TRUE(fs::is_empty(tmp())) << "log_dir must not create the temp dir";
}

TEST_F(MachineArgsTest, TempDirInAMissingBaseIsASystemError)
{
    MachineConfig c = config();
    c.base_temp_dir = tmp() + "/no/such/dir";
    Machine m(ioc_, c);
    auto t = m.temp_dir();
    ASSERT_FALSE(t);
    EXPECT_TRUE(t.error().is(errc::system_error)) << t.error().message;
    EXPECT_NE(t.error().message.find("no/such/dir"), std::string::npos) << t.error().message;
}

TEST_F(MachineArgsTest, AMachineNeverLaunchedHasNoProcessNoQmpAndShutsDownAsANoOp)
{
    Machine m(ioc_, config());
    EXPECT_EQ(m.state(), MachineState::defined);
    EXPECT_FALSE(m.is_running());
    EXPECT_EQ(m.pid(), std::nullopt);
    EXPECT_EQ(m.exitcode(), std::nullopt);
    EXPECT_FALSE(m.exit_status().has_value());
    EXPECT_TRUE(m.get_log().empty());
    EXPECT_FALSE(m.get_qmp_event().has_value());
    EXPECT_TRUE(m.get_qmp_events().empty());

    auto r = run_co(ioc_, m.cmd("query-status"));
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::invalid_state));
    EXPECT_NE(r.error().message.find("no connection"), std::string::npos) << r.error().message;
    auto q = run_co(ioc_, m.qmp("query-status"));
    ASSERT_FALSE(q);
    EXPECT_TRUE(q.error().is(errc::invalid_state));

    EXPECT_TRUE(run_co(ioc_, m.shutdown()));
    EXPECT_TRUE(run_co(ioc_, m.kill()));
    EXPECT_TRUE(run_co(ioc_, m.wait(1s)));
    EXPECT_EQ(m.state(), MachineState::defined);
    EXPECT_TRUE(fs::is_empty(tmp()));
}

} // namespace
} // namespace qm
