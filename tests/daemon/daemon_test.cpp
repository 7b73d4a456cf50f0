// SPDX-License-Identifier: GPL-2.0-or-later
// The real qmachined's privilege model and shutdown policies: QEMU as the unprivileged user under
// its seccomp sandbox with its sockets as descriptors, the start refused for a missing user,
// options and QMP commands the daemon owns refused (and audited), SIGTERM leaving the machines to
// the next start by default or stopping them, and the QEMU log kept bounded.
#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/json.hpp"
#include "tests/daemon/machine_daemon.hpp"
#include "tests/support/daemon_process.hpp"

namespace qm::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

constexpr const char* qemu_user = "qmachined-qemu";
constexpr const char* sandbox_value =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

// The numbers after `key` in /proc/<pid>/status ("Uid:" -> real, effective, saved, filesystem).
std::vector<long> status_numbers(pid_t pid, const std::string& key)
{
    std::vector<long> out;
    for (const auto& line : lines_with(read_whole_file(fmt::format("/proc/{}/status", pid)), key)) {
        if (!line.starts_with(key)) {
            continue;
        }
        std::istringstream in(line.substr(key.size()));
        long n = 0;
        while (in >> n) {
            out.push_back(n);
        }
    }
    return out;
}

std::vector<std::string> cmdline(pid_t pid)
{
    std::vector<std::string> out;
    const std::string text = read_whole_file(fmt::format("/proc/{}/cmdline", pid));
    std::size_t pos = 0;
    while (pos < text.size()) {
        const auto end = text.find('\0', pos);
        out.push_back(text.substr(pos, end - pos));
        pos = end == std::string::npos ? text.size() : end + 1;
    }
    return out;
}

class DaemonTest : public MachineDaemonTest
{
protected:
    // The audit lines of the daemon's output so far.
    std::vector<std::string> audit_lines() { return lines_with(daemon().output(), "audit: "); }

    // The caller field the daemon writes for this test's requests.
    static std::string caller()
    {
        return fmt::format(R"(caller="uid={} pid={}")", ::getuid(), ::getpid());
    }

    // Waits for the audit line of one call (written once the call completed) and checks it is
    // the only one.
    void expect_one_audit(const std::string& op, const std::string& machine,
                          const std::string& result)
    {
        const std::string line =
            fmt::format("audit: op={} machine={} result={} {}", op, machine, result, caller());
        EXPECT_TRUE(eventually([&] { return !lines_with(daemon().output(), line).empty(); }, 5s))
            << "no '" << line << "' in:\n"
            << daemon().output();
        EXPECT_EQ(lines_with(daemon().output(), line).size(), 1U) << daemon().output();
    }
};

#define SKIP_UNLESS_ROOT()                                                                         \
    do {                                                                                           \
        if (::geteuid() != 0) {                                                                    \
            GTEST_SKIP() << "needs root: QEMU's user changes only when qmachined runs as root";    \
        }                                                                                          \
    } while (0)

//---- privileges ---------------------------------------------------------------------------------

TEST_F(DaemonTest, QemuRunsUnprivilegedSandboxedWithDescriptors)
{
    SKIP_UNLESS_ROOT();
    const passwd* pw = ::getpwnam(qemu_user);
    ASSERT_NE(pw, nullptr) << qemu_user << " does not exist (scripts/deps creates it)";
    const uid_t uid = pw->pw_uid;
    const gid_t gid = pw->pw_gid;
    int count = 64;
    std::vector<gid_t> groups(64);
    ASSERT_GE(::getgrouplist(qemu_user, gid, groups.data(), &count), 0);
    groups.resize(static_cast<std::size_t>(count));

    ASSERT_NO_FATAL_FAILURE(start_daemon());
    ASSERT_EQ(create("p", quick_spec(true)).status, 201);
    const pid_t pid = start_machine("p");
    ASSERT_GT(pid, 0);

    // Real, effective, saved and filesystem ids: nothing of root left to regain.
    EXPECT_EQ(status_numbers(pid, "Uid:"), std::vector<long>(4, static_cast<long>(uid)));
    EXPECT_EQ(status_numbers(pid, "Gid:"), std::vector<long>(4, static_cast<long>(gid)));
    const auto supplementary = status_numbers(pid, "Groups:");
    EXPECT_EQ(std::set<long>(supplementary.begin(), supplementary.end()),
              std::set<long>(groups.begin(), groups.end()))
        << "root's supplementary groups must not be inherited";

    const auto args = cmdline(pid);
    const auto sandbox = std::find(args.begin(), args.end(), "-sandbox");
    ASSERT_NE(sandbox, args.end()) << testing::PrintToString(args);
    ASSERT_NE(sandbox + 1, args.end());
    EXPECT_EQ(*(sandbox + 1), sandbox_value);
    // QEMU got its sockets as descriptors: its command line names no path of the runtime
    // directory, which stays root's and private.
    for (const auto& a : args) {
        EXPECT_EQ(a.find(runtime_.string()), std::string::npos) << a;
    }
    const fs::path dir = machine_dir("p");
    struct stat st {};
    ASSERT_EQ(::stat(dir.c_str(), &st), 0) << dir;
    EXPECT_EQ(st.st_uid, 0U);
    EXPECT_EQ(st.st_mode & 07777, 0700U);
    EXPECT_TRUE(
        daemon().says(fmt::format("QEMU runs as '{}' (uid {}, gid {})", qemu_user, uid, gid)))
        << daemon().output();
}

TEST_F(DaemonTest, MissingQemuUserStopsTheStart)
{
    SKIP_UNLESS_ROOT();
    DaemonProcess d(QM_QMACHINED, daemon_args({"--qemu-user", "nosuchuser"}), root_ / "bad.out");
    const auto status = d.wait_exit(10s);
    ASSERT_TRUE(status) << "qmachined still runs:\n" << d.output();
    EXPECT_NE(*status, 0);
    EXPECT_TRUE(d.says("QEMU's user 'nosuchuser' does not exist")) << d.output();
    EXPECT_FALSE(fs::exists(socket_path()));
}

TEST_F(DaemonTest, EmptyQemuUserRunsQemuAsRoot)
{
    SKIP_UNLESS_ROOT();
    ASSERT_NO_FATAL_FAILURE(start_daemon({"--qemu-user="}));
    EXPECT_TRUE(daemon().says("qemu-user is empty: QEMU runs as root")) << daemon().output();
    ASSERT_EQ(create("r", quick_spec()).status, 201);
    const pid_t pid = start_machine("r");
    ASSERT_GT(pid, 0);
    EXPECT_EQ(status_numbers(pid, "Uid:"), std::vector<long>(4, 0L));
    // Still sandboxed.
    const auto args = cmdline(pid);
    EXPECT_NE(std::find(args.begin(), args.end(), sandbox_value), args.end())
        << testing::PrintToString(args);
}

//---- what a client may not do, and the audit ----------------------------------------------------

TEST_F(DaemonTest, OptionsTheDaemonOwnsAreRefusedAtCreate)
{
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    struct Case
    {
        const char* name;
        const char* args;     // JSON array
        const char* mentions; // in the problem's detail
    };
    const Case cases[] = {
        {"f1", R"(["-daemonize"])", "'-daemonize' is managed by qmachined"},
        {"f2", R"(["-sandbox", "off"])", "'-sandbox' is managed by qmachined"},
        {"f3", R"(["-chardev", "socket,id=mon,path=/tmp/x,server=on"])",
         "chardev id 'mon' is reserved"},
    };
    for (const auto& c : cases) {
        SCOPED_TRACE(c.name);
        const std::string spec = fmt::format(R"({{"binary": {}, "machine": "none", "args": {}}})",
                                             json::quote(QemuProcess::binary()), c.args);
        HttpResponse r = create(c.name, spec);
        EXPECT_EQ(r.status, 400) << r;
        EXPECT_EQ(r.problem(), "InvalidArgument") << r;
        EXPECT_NE(r.str("detail").find(c.mentions), std::string::npos) << r;
        EXPECT_EQ(call("GET", std::string("/v1/machines/") + c.name).status, 404);
        expect_one_audit("create", c.name, "InvalidArgument");
    }
    // Reads are not audited.
    EXPECT_EQ(audit_lines().size(), std::size(cases)) << daemon().output();
}

TEST_F(DaemonTest, DeniedQmpCommandIsForbiddenAndEveryCallAudited)
{
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    ASSERT_EQ(create("q", quick_spec()).status, 201);
    expect_one_audit("create", "q", "ok");
    start_machine("q");
    expect_one_audit("start", "q", "ok");

    HttpResponse denied = call("POST", "/v1/machines/q/qmp",
                               R"({"execute": "human-monitor-command",
                                   "arguments": {"command-line": "info version"}})");
    EXPECT_EQ(denied.status, 403) << denied;
    EXPECT_EQ(denied.problem(), "Forbidden") << denied;
    EXPECT_NE(denied.str("detail").find("human-monitor-command"), std::string::npos) << denied;
    expect_one_audit("qmp:human-monitor-command", "q", "Forbidden");

    HttpResponse allowed = call("POST", "/v1/machines/q/qmp", R"({"execute": "query-status"})");
    EXPECT_EQ(allowed.status, 200) << allowed;
    expect_one_audit("qmp:query-status", "q", "ok");

    EXPECT_EQ(call("GET", "/v1/machines/q").status, 200);
    HttpResponse stopped = call("POST", "/v1/machines/q/stop");
    EXPECT_EQ(stopped.status, 200) << stopped;
    expect_one_audit("stop", "q", "ok");
    HttpResponse conflict = call("POST", "/v1/machines/q/pause");
    EXPECT_EQ(conflict.status, 409) << conflict;
    expect_one_audit("pause", "q", "StateConflict");
    EXPECT_EQ(call("DELETE", "/v1/machines/q").status, 204);
    expect_one_audit("delete", "q", "ok");
    EXPECT_EQ(audit_lines().size(), 7U) << daemon().output();
}

//---- SIGTERM ------------------------------------------------------------------------------------

// The default (leave-running): the daemon exits at once and the machines keep running for the
// next start, which takes them over; stop-machines stops them all, and the next start finds them
// stopped.
TEST_F(DaemonTest, SigtermUnderBothPolicies)
{
    ASSERT_NO_FATAL_FAILURE(start_default_daemon());
    std::map<std::string, pid_t> pids;
    for (const char* name : {"a", "b"}) {
        ASSERT_EQ(create(name, quick_spec(true)).status, 201);
        pids[name] = start_machine(name);
    }
    const auto sigterm_at = std::chrono::steady_clock::now();
    daemon().signal(SIGTERM);
    EXPECT_EQ(daemon().wait_exit(5s), 0) << daemon().output();
    EXPECT_LT(std::chrono::steady_clock::now() - sigterm_at, 5s);
    EXPECT_TRUE(daemon().says("leaving the machines running")) << daemon().output();
    daemon_.reset();
    for (const auto& [name, pid] : pids) {
        EXPECT_TRUE(alive(pid)) << name;
    }
    EXPECT_FALSE(fs::exists(socket_path())) << "the socket was left behind";
    EXPECT_EQ(qemus().size(), 2U);

    ASSERT_NO_FATAL_FAILURE(start_daemon({"--shutdown-policy", "stop-machines"}));
    EXPECT_TRUE(daemon().says("Re-attached 2 running machine(s), 0 died")) << daemon().output();
    for (const auto& [name, pid] : pids) {
        const json::Document d = machine(name);
        EXPECT_EQ(json::get_string(d, "state"), "running") << json::to_string(d);
        EXPECT_EQ(json::get_int(d, "pid"), pid) << json::to_string(d);
    }

    // stop-machines: every QEMU stopped before the exit.
    daemon().signal(SIGTERM);
    EXPECT_EQ(daemon().wait_exit(30s), 0) << daemon().output();
    EXPECT_TRUE(daemon().says("stopping every machine")) << daemon().output();
    daemon_.reset();
    EXPECT_TRUE(qemus().empty()) << testing::PrintToString(qemus());
    for (const auto& [name, pid] : pids) {
        EXPECT_TRUE(eventually([&] { return !alive(pid); }, 10s)) << name;
    }
    EXPECT_FALSE(fs::exists(socket_path()));

    // The next start has nothing to take over: the machines are there, without a process, as
    // the policy stopped them.
    ASSERT_NO_FATAL_FAILURE(start_default_daemon());
    EXPECT_TRUE(daemon().says("Re-attached 0 running machine(s), 0 died")) << daemon().output();
    for (const auto& [name, pid] : pids) {
        const json::Document d = machine(name);
        EXPECT_EQ(json::get_string(d, "state"), "stopped") << json::to_string(d);
        EXPECT_EQ(json::get_int(d, "pid"), std::nullopt) << json::to_string(d);
        const json::Value* reason = json::find(d, "stop_reason");
        ASSERT_NE(reason, nullptr) << json::to_string(d);
        EXPECT_EQ(json::get_string(*reason, "kind"), "host-quit") << json::to_string(d);
        // Taken over at the re-attach, not the daemon's child: its exit status is unknown.
        EXPECT_EQ(json::get_int(d, "exit_code"), std::nullopt) << json::to_string(d);
    }
}

//---- the QEMU log -------------------------------------------------------------------------------

// QEMU's output is bounded from outside (it holds the descriptor): past --qemu-log-max the newest
// bytes are kept in qemu.log.1 and the log is emptied. `-d in_asm` under TCG writes hundreds of
// KiB of disassembly while the firmware runs. The check runs every 5 s.
TEST_F(DaemonTest, QemuLogIsBounded)
{
    ASSERT_NO_FATAL_FAILURE(start_daemon({"--qemu-log-max", "4096"}));
    const std::string spec = fmt::format(
        R"({{"binary": {}, "machine": "pc,accel=tcg", "memory_mib": 32,
            "args": ["-nodefaults", "-d", "in_asm"], "shutdown": {{"mode": "quit"}}}})",
        json::quote(QemuProcess::binary()));
    ASSERT_EQ(create("chatty", spec).status, 201);
    const pid_t pid = start_machine("chatty");
    const fs::path log = machine_dir("chatty") / "qemu.log";
    ASSERT_TRUE(eventually([&] { return fs::exists(log) && fs::file_size(log) > 4096; }, 10s))
        << "QEMU wrote little: the test proves nothing";
    ASSERT_TRUE(daemon().wait_for_output("The QEMU log of 'chatty' passed 4096 bytes", 15s))
        << daemon().output();
    EXPECT_EQ(fs::file_size(fs::path(log.string() + ".1")), 4096U);
    EXPECT_TRUE(alive(pid));
    // The log was emptied: QEMU writes on at its new end (O_APPEND: no hole of the old size).
    const std::string text = read_whole_file(log);
    EXPECT_EQ(text.find('\0'), std::string::npos) << "a hole: QEMU kept its old offset";
}

} // namespace
} // namespace qm::test
