// SPDX-License-Identifier: GPL-2.0-or-later
// The qmachined executable: flags and exit codes, private directories, loading definitions (a
// corrupt one set aside), autostart, one daemon per runtime directory, SIGHUP, and SIGTERM/SIGINT
// stopping every machine before exit.
#include <grp.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/json.hpp"
#include "tests/support/daemon_process.hpp"
#include "tests/support/qemu_process.hpp"

#ifndef QM_QMACHINED
#error "QM_QMACHINED (the daemon under test) must be defined by the build"
#endif

namespace qm::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

// The children of `pid` that are machines' QEMUs (their -name says guest=...): the daemon also
// runs `qemu-system-x86_64 --version` once at start, which may still be running.
std::vector<pid_t> machine_children(pid_t pid)
{
    std::vector<pid_t> out;
    for (pid_t child : children_of(pid)) {
        if (read_whole_file("/proc/" + std::to_string(child) + "/cmdline").find("guest=") !=
            std::string::npos) {
            out.push_back(child);
        }
    }
    return out;
}

std::size_t machines_of(pid_t pid)
{
    return machine_children(pid).size();
}

// One qmachined process, its output in a file.
class Daemon : public DaemonProcess
{
public:
    Daemon(const std::vector<std::string>& args, const fs::path& output)
        : DaemonProcess(QM_QMACHINED, without_bus(args), output)
    {}

private:
    // Never the host's D-Bus (a later flag still wins).
    static std::vector<std::string> without_bus(std::vector<std::string> args)
    {
        args.insert(args.begin(), {"--bus", "none"});
        return args;
    }
};

class QmachinedTest : public testing::Test
{
protected:
    void SetUp() override
    {
        root_ = fs::temp_directory_path() / "qmd";
        fs::create_directories(root_);
        state_ = root_ / "state";
        runtime_ = root_ / "run";
    }
    void TearDown() override
    {
        std::error_code ec;
        fs::remove_all(root_, ec);
    }

    std::vector<std::string> dirs() const
    {
        return {"--state-dir", state_.string(), "--runtime-dir=" + runtime_.string(),
                "--shutdown-policy=stop-machines"};
    }

    static std::string definition(const std::string& name, bool autostart)
    {
        // Every definition the daemon writes has a uuid; one without is refused.
        static int n = 0;
        return fmt::format(R"({{"format": 1, "name": "{}", "generation": 1, "spec": {{
            "uuid": "6b1d7f0e-3c2a-4e4b-9d3c-0000000000{:02}",
            "binary": {}, "machine": "none", "console": {{"enabled": false}},
            "shutdown": {{"mode": "quit", "timeout_s": 10}}, "autostart": {}}}}})",
                           name, ++n, json::quote(QemuProcess::binary()),
                           autostart ? "true" : "false");
    }

    fs::path root_;
    fs::path state_;
    fs::path runtime_;
};

TEST_F(QmachinedTest, HelpVersionAndBadFlags)
{
    {
        Daemon d({"--help"}, root_ / "help.out");
        EXPECT_EQ(d.wait_exit(), 0);
        for (const char* flag : {"--state-dir", "--runtime-dir", "--log-level", "--config",
                                 "--help", "--version"}) {
            EXPECT_TRUE(d.says(flag)) << flag << " missing from --help:\n" << d.output();
        }
    }
    {
        Daemon d({"--version"}, root_ / "version.out");
        EXPECT_EQ(d.wait_exit(), 0);
        EXPECT_TRUE(d.says("qmachined 0.1.0")) << d.output();
    }
    {
        Daemon d({"--frobnicate"}, root_ / "bad.out");
        EXPECT_EQ(d.wait_exit(), 2);
        EXPECT_TRUE(d.says("--frobnicate")) << d.output();
        EXPECT_TRUE(d.says("--help")) << d.output();
    }
    {
        Daemon d({"--log-level", "loud"}, root_ / "level.out");
        EXPECT_EQ(d.wait_exit(), 2);
        EXPECT_TRUE(d.says("loud")) << d.output();
    }
    {
        Daemon d({"--config", (root_ / "missing.conf").string()}, root_ / "conf.out");
        EXPECT_NE(d.wait_exit(), 0);
        EXPECT_TRUE(d.says("missing.conf")) << d.output();
    }
}

TEST_F(QmachinedTest, AutostartsLoadsAndStopsEveryMachineOnSigterm)
{
    if (auto why = QemuProcess::unavailable_reason()) {
        GTEST_SKIP() << "no QEMU: " << *why;
    }
    fs::create_directories(state_);
    write_whole_file(state_ / "auto1.json", definition("auto1", true));
    write_whole_file(state_ / "auto2.json", definition("auto2", true));
    write_whole_file(state_ / "idle.json", definition("idle", false));
    write_whole_file(state_ / "broken.json", "{\"format\": 1, \"name\": \"bro");

    Daemon d(dirs(), root_ / "daemon.out");
    ASSERT_TRUE(d.wait_for_output("ready")) << d.output();
    // Two QEMUs, children of the daemon.
    ASSERT_TRUE(eventually([&] { return machines_of(d.pid()) == 2; })) << d.output();
    const auto qemus = machine_children(d.pid());
    ASSERT_TRUE(d.wait_for_output("Started 'auto2'")) << d.output();
    ASSERT_TRUE(d.wait_for_output("Started 'auto1'")) << d.output();

    // Private directories; the corrupt definition set aside and reported.
    struct stat st{};
    ASSERT_EQ(::stat(state_.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0700U);
    ASSERT_EQ(::stat(runtime_.c_str(), &st), 0);
    // As root with the administrators' group (sysusers.d): 0710 with that group, so its members
    // reach the REST socket (0660, that group), never list the directory.
    const group* admins = ::geteuid() == 0 ? ::getgrnam("qmachined") : nullptr;
    if (admins != nullptr) {
        EXPECT_EQ(st.st_mode & 0777, 0710U);
        EXPECT_EQ(st.st_gid, admins->gr_gid);
        struct stat sock{};
        ASSERT_EQ(::stat((runtime_ / "qmachined.sock").c_str(), &sock), 0);
        EXPECT_EQ(sock.st_mode & 0777, 0660U);
        EXPECT_EQ(sock.st_gid, admins->gr_gid);
    } else {
        EXPECT_EQ(st.st_mode & 0777, 0700U);
    }
    EXPECT_FALSE(fs::exists(state_ / "broken.json"));
    EXPECT_TRUE(d.says("broken.json")) << d.output();
    EXPECT_TRUE(fs::exists(state_ / "idle.json"));

    ::kill(d.pid(), SIGTERM);
    EXPECT_EQ(d.wait_exit(), 0) << d.output();
    for (pid_t q : qemus) {
        EXPECT_TRUE(eventually([&] { return ::kill(q, 0) != 0; })) << "QEMU " << q << " survived";
    }
    std::vector<std::string> sockets;
    for (const auto& e : fs::recursive_directory_iterator(runtime_)) {
        if (e.is_socket()) {
            sockets.push_back(e.path().string());
        }
    }
    EXPECT_EQ(sockets, std::vector<std::string>{});
    EXPECT_TRUE(d.says("Machine 'auto1' is stopped")) << d.output();

    // A second qmachined in the same boot (an upgrade, a restart after a crash) leaves stopped
    // what was stopped: autostart is once per boot.
    {
        Daemon again(dirs(), root_ / "again.out");
        ASSERT_TRUE(again.wait_for_output("ready")) << again.output();
        EXPECT_TRUE(again.says("Autostart: done already in this boot")) << again.output();
        std::this_thread::sleep_for(300ms);
        EXPECT_EQ(machines_of(again.pid()), 0U) << again.output();
        ::kill(again.pid(), SIGTERM);
        EXPECT_EQ(again.wait_exit(), 0) << again.output();
    }
    // The record of another boot (or none): autostart again.
    write_whole_file(runtime_ / "autostarted", "not-this-boot\n");
    Daemon next_boot(dirs(), root_ / "next.out");
    ASSERT_TRUE(next_boot.wait_for_output("Started 'auto1'")) << next_boot.output();
    ASSERT_TRUE(next_boot.wait_for_output("Started 'auto2'")) << next_boot.output();
    EXPECT_EQ(machines_of(next_boot.pid()), 2U) << next_boot.output();
    ::kill(next_boot.pid(), SIGTERM);
    EXPECT_EQ(next_boot.wait_exit(), 0) << next_boot.output();
}

TEST_F(QmachinedTest, OneDaemonPerRuntimeDirectorySighupReloadsSigintStops)
{
    const fs::path conf = root_ / "qmachined.conf";
    write_whole_file(conf, "# test configuration\nlog-level = info\n");
    auto args = dirs();
    args.emplace_back("--config");
    args.push_back(conf.string());
    Daemon first(args, root_ / "first.out");
    ASSERT_TRUE(first.wait_for_output("ready")) << first.output();

    Daemon second(dirs(), root_ / "second.out");
    EXPECT_EQ(second.wait_exit(), 1);
    EXPECT_TRUE(second.says("Another qmachined")) << second.output();

    write_whole_file(conf, "log-level = debug\n");
    ::kill(first.pid(), SIGHUP);
    EXPECT_TRUE(first.wait_for_output("(log level debug)")) << first.output();

    ::kill(first.pid(), SIGINT);
    EXPECT_EQ(first.wait_exit(), 0) << first.output();

    // --log-level wins over the file, at a reload too.
    args.insert(args.end(), {"--log-level", "info"});
    Daemon flagged(args, root_ / "flagged.out");
    ASSERT_TRUE(flagged.wait_for_output("ready")) << flagged.output();
    ::kill(flagged.pid(), SIGHUP);
    EXPECT_TRUE(flagged.wait_for_output("(log level info, from --log-level)")) << flagged.output();
    ::kill(flagged.pid(), SIGINT);
    EXPECT_EQ(flagged.wait_exit(), 0) << flagged.output();
    EXPECT_FALSE(flagged.says("debug:")) << flagged.output();
}

} // namespace
} // namespace qm::test
