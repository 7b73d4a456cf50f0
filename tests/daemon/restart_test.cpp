// SPDX-License-Identifier: GPL-2.0-or-later
// Restart policies and how a machine ended, through the real qmachined: a QEMU killed from outside
// is restarted with backoff, also when it died while the daemon was down; a crash loop leaves the
// machine failed; a machine that stopped, crashed or failed before a daemon restart is shown as it
// ended (state, reason, exit), not as never started.
#include <signal.h>
#include <unistd.h>
#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/json.hpp"
#include "libmachine/proc/proc_info.hpp"
#include "tests/daemon/machine_daemon.hpp"
#include "tests/support/daemon_process.hpp"

namespace qm::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

// quick_spec() with a restart policy: one restart at most within 10 minutes, after 100 ms.
std::string restarting_spec()
{
    return fmt::format(R"({{"binary": {}, "machine": "none",
        "shutdown": {{"mode": "quit", "timeout_s": 10}},
        "restart": {{"policy": "on-failure", "max_restarts": 1, "window_s": 600,
                     "backoff_initial_ms": 100, "backoff_max_ms": 200}}}})",
                       json::quote(QemuProcess::binary()));
}

// Seconds since boot (/proc/uptime, 10 ms resolution): the clock of /proc/PID/stat's start time.
double uptime_s()
{
    return std::stod(read_whole_file("/proc/uptime"));
}

class RestartTest : public MachineDaemonTest
{
protected:
    // Waits until `name` runs a process other than `old_pid`; its pid (-1 if it never does).
    pid_t wait_new_process(const std::string& name, pid_t old_pid)
    {
        pid_t pid = -1;
        const bool ok = eventually(
            [&] {
                const json::Document d = machine(name);
                pid = static_cast<pid_t>(json::get_int(d, "pid").value_or(-1));
                return json::get_string(d, "state") == "running" && pid > 0 && pid != old_pid;
            },
            20s);
        EXPECT_TRUE(ok) << json::to_string(machine(name)) << "\n" << daemon().output();
        return ok ? pid : -1;
    }

    std::string stop_kind(const json::Document& d)
    {
        const json::Value* reason = json::find(d, "stop_reason");
        if (reason == nullptr || !reason->IsObject()) {
            return "(none)";
        }
        return std::string(json::get_string(*reason, "kind").value_or("(no kind)"));
    }
};

TEST_F(RestartTest, KilledQemuIsRestartedAlsoAcrossADaemonRestartUntilTheCrashLoopLimit)
{
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    ASSERT_EQ(create("r", restarting_spec()).status, 201);
    const pid_t pid1 = start_machine("r");
    ASSERT_GT(pid1, 0);

    // Killed from outside: a crash, restarted after the backoff (100 ms): the new QEMU started
    // at least that long after the kill (both on the clock of /proc, 10 ms ticks).
    const double killed_at = uptime_s();
    ASSERT_EQ(::kill(pid1, SIGKILL), 0);
    const pid_t pid2 = wait_new_process("r", pid1);
    ASSERT_GT(pid2, 0);
    auto started = proc::process_start_time(pid2);
    ASSERT_TRUE(started);
    const double started_at = static_cast<double>(*started) / static_cast<double>(::sysconf(_SC_CLK_TCK));
    EXPECT_GE(started_at - killed_at, 0.09) << "restarted before the backoff";
    EXPECT_EQ(json::get_int(machine("r"), "restart_count"), 1) << json::to_string(machine("r"));
    EXPECT_TRUE(daemon().says("Restarting 'r' in 100 ms (policy on-failure, attempt 1 of 1"))
        << daemon().output();

    // The daemon dies, then its QEMU: the next daemon finds it dead, calls it a crash and
    // applies the policy (the crash-loop window lives in the daemon: it starts afresh).
    daemon().signal(SIGKILL);
    daemon().wait_exit(10s);
    daemon_.reset();
    ASSERT_EQ(::kill(pid2, SIGKILL), 0);
    ASSERT_TRUE(eventually([&] { return !alive(pid2); }, 10s));
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    EXPECT_TRUE(daemon().says("Re-attached 0 running machine(s), 1 died")) << daemon().output();
    const pid_t pid3 = wait_new_process("r", pid2);
    ASSERT_GT(pid3, 0);
    EXPECT_EQ(json::get_int(machine("r"), "restart_count"), 2) << json::to_string(machine("r"));

    // One more crash within the window is one restart too many: failed, and left so.
    ASSERT_EQ(::kill(pid3, SIGKILL), 0);
    ASSERT_TRUE(eventually([&] { return json::get_string(machine("r"), "state") == "failed"; },
                           10s))
        << json::to_string(machine("r"));
    EXPECT_TRUE(daemon().says("Machine 'r' ended again after 1 restart(s) within 600 s (crash "
                              "loop)"))
        << daemon().output();
    std::this_thread::sleep_for(500ms); // longer than any backoff: nothing restarts it
    json::Document d = machine("r");
    EXPECT_EQ(json::get_string(d, "state"), "failed") << json::to_string(d);
    EXPECT_EQ(json::get_int(d, "pid"), std::nullopt) << json::to_string(d);
    EXPECT_EQ(stop_kind(d), "signal") << json::to_string(d);
    EXPECT_EQ(json::get_int(d, "exit_signal"), SIGKILL) << json::to_string(d);
    EXPECT_TRUE(qemus().empty());

    // A daemon restart shows it as it ended.
    daemon().signal(SIGTERM);
    EXPECT_EQ(daemon().wait_exit(10s), 0) << daemon().output();
    daemon_.reset();
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    const json::Document after = machine("r");
    EXPECT_EQ(json::get_string(after, "state"), "failed") << json::to_string(after);
    EXPECT_EQ(stop_kind(after), "signal") << json::to_string(after);
    EXPECT_EQ(json::get_int(after, "exit_signal"), SIGKILL) << json::to_string(after);
    EXPECT_EQ(json::get_int(after, "restart_count"), 2) << json::to_string(after);
    EXPECT_EQ(json::get_int(after, "state_since_us"), json::get_int(d, "state_since_us"));
    EXPECT_TRUE(qemus().empty()) << "a failed machine is not restarted by a daemon restart";

    // Someone starts it: it runs again.
    const pid_t pid4 = start_machine("r");
    EXPECT_GT(pid4, 0);
}

TEST_F(RestartTest, StoppedAndCrashedMachinesKeepHowTheyEndedAcrossADaemonRestart)
{
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    ASSERT_EQ(create("quits", quick_spec()).status, 201);
    ASSERT_EQ(create("dies", quick_spec()).status, 201);
    ASSERT_EQ(create("never", quick_spec()).status, 201);
    ASSERT_GT(start_machine("quits"), 0);
    const pid_t dies = start_machine("dies");
    ASSERT_GT(dies, 0);
    HttpResponse stopped = call("POST", "/v1/machines/quits/stop");
    ASSERT_EQ(stopped.status, 200) << stopped;
    ASSERT_EQ(::kill(dies, SIGKILL), 0);
    ASSERT_TRUE(eventually([&] { return json::get_string(machine("dies"), "state") == "crashed"; },
                           10s));
    const json::Document quits_before = machine("quits");
    const json::Document dies_before = machine("dies");

    daemon().signal(SIGTERM);
    EXPECT_EQ(daemon().wait_exit(10s), 0) << daemon().output();
    daemon_.reset();
    ASSERT_NO_FATAL_FAILURE(start_daemon());

    const json::Document quits = machine("quits");
    EXPECT_EQ(json::get_string(quits, "state"), "stopped") << json::to_string(quits);
    EXPECT_EQ(stop_kind(quits), "host-quit") << json::to_string(quits);
    EXPECT_EQ(json::get_int(quits, "exit_code"), 0) << json::to_string(quits);
    EXPECT_EQ(json::get_int(quits, "state_since_us"), json::get_int(quits_before, "state_since_us"));
    const json::Document dies_after = machine("dies");
    EXPECT_EQ(json::get_string(dies_after, "state"), "crashed") << json::to_string(dies_after);
    EXPECT_EQ(stop_kind(dies_after), "signal") << json::to_string(dies_after);
    EXPECT_EQ(json::get_int(dies_after, "exit_signal"), SIGKILL) << json::to_string(dies_after);
    EXPECT_EQ(json::to_string(*json::find(dies_after, "stop_reason")),
              json::to_string(*json::find(dies_before, "stop_reason")));
    const json::Document never = machine("never");
    EXPECT_EQ(json::get_string(never, "state"), "defined") << json::to_string(never);
    EXPECT_EQ(stop_kind(never), "(none)") << json::to_string(never);

    // A run ended by the stop-machines policy at SIGTERM is a stop too.
    ASSERT_GT(start_machine("never"), 0);
    daemon().signal(SIGTERM);
    EXPECT_EQ(daemon().wait_exit(10s), 0) << daemon().output();
    daemon_.reset();
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    const json::Document was_running = machine("never");
    EXPECT_EQ(json::get_string(was_running, "state"), "stopped") << json::to_string(was_running);
    EXPECT_EQ(stop_kind(was_running), "host-quit") << json::to_string(was_running);

    // A last-run file that is not one is ignored (and said so), never fatal.
    daemon().signal(SIGTERM);
    EXPECT_EQ(daemon().wait_exit(10s), 0) << daemon().output();
    daemon_.reset();
    const fs::path last = runtime_ / "m" /
                          std::string(json::get_string(quits, "id").value_or("?")) / "last.json";
    ASSERT_TRUE(fs::exists(last));
    write_whole_file(last, "{\"format\": 1, \"state\": ");
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    EXPECT_EQ(json::get_string(machine("quits"), "state"), "defined");
    EXPECT_TRUE(daemon().says("Ignoring the last run of 'quits'")) << daemon().output();
}

} // namespace
} // namespace qm::test
