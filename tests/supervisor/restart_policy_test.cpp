// SPDX-License-Identifier: GPL-2.0-or-later
// Restart policies, in-process with real QEMU (-machine none): on-failure brings a killed QEMU
// back, `no` leaves it crashed, `always` also restarts after a quit nobody asked for through an
// operation, the backoff doubles, the crash-loop limit ends in `failed`, and an operator's stop
// or delete cancels a pending restart. Every attempt is an event.
#include <chrono>
#include <csignal>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "tests/supervisor/supervisor_fixture.hpp"

namespace qm::test {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

std::string restart_spec(const std::string& policy, int max_restarts = 5, int initial_ms = 50,
                         int max_ms = 1000, int window_s = 60)
{
    return fmt::format(R"(, "restart": {{"policy": "{}", "max_restarts": {}, "window_s": {},
                          "backoff_initial_ms": {}, "backoff_max_ms": {}}})",
                       policy, max_restarts, window_s, initial_ms, max_ms);
}

class RestartPolicyTest : public SupervisorFixture
{
protected:
    void SetUp() override
    {
        SupervisorFixture::SetUp();
        if (IsSkipped() || HasFatalFailure()) {
            return;
        }
        options_.unresponsive_limit = 300ms;
        options_.probe_timeout = 200ms;
        open_supervisor();
    }

    pid_t running(const std::string& name, const std::string& extra)
    {
        EXPECT_TRUE(create(name, none_spec(extra)));
        auto started = start(name);
        EXPECT_TRUE(started) << (started ? "" : describe(started.error()));
        return started ? started->machine.pid.value_or(-1) : -1;
    }

    // Waits for `name` to run with a pid other than `old`; the new pid (-1 if none came).
    pid_t wait_new_pid(const std::string& name, pid_t old, std::chrono::milliseconds t = 20s)
    {
        pid_t now = -1;
        run_until(
            ioc_,
            [&] {
                const auto m = sup_->inspect(name);
                if (m && m->state == MachineState::running && m->pid && *m->pid != old) {
                    now = *m->pid;
                    return true;
                }
                return false;
            },
            t);
        return now;
    }

    // The data of `event` for `name` after `since`.
    std::vector<json::Document> events_of(const std::string& name, std::string_view event,
                                          std::uint64_t since)
    {
        std::vector<json::Document> out;
        daemon::EventSelector sel;
        sel.machine = name;
        sel.names = {std::string(event)};
        for (const auto& e : sup_->events().replay(since, sel)) {
            json::Document d;
            d.CopyFrom(e.data(), d.GetAllocator());
            out.push_back(std::move(d));
        }
        return out;
    }
};

TEST_F(RestartPolicyTest, OnFailureBringsAKilledQemuBackWithAnEvent)
{
    const pid_t first = running("of", restart_spec("on-failure"));
    ASSERT_GT(first, 0);
    const auto seq = sup_->events().last_seq();
    ASSERT_EQ(::kill(first, SIGKILL), 0);
    const pid_t second = wait_new_pid("of", first);
    ASSERT_GT(second, 0) << to_string(state("of"));
    EXPECT_TRUE(process_gone(first));
    EXPECT_EQ(info("of").restart_count, 1U);
    const auto scheduled = events_of("of", daemon::event_names::restart_scheduled, seq);
    ASSERT_EQ(scheduled.size(), 1U);
    EXPECT_EQ(json::get_int(scheduled[0], "attempt"), 1);
    EXPECT_EQ(json::get_int(scheduled[0], "delay_ms"), 50);
    EXPECT_EQ(json::get_string(scheduled[0], "reason"), "signal");
    // crashed, then starting and running again
    const auto states = states_since("of", seq);
    ASSERT_GE(states.size(), 3U);
    EXPECT_EQ(states[0], "crashed");
    EXPECT_EQ(states.back(), "running");
}

TEST_F(RestartPolicyTest, NoPolicyLeavesItCrashed)
{
    const pid_t pid = running("no", restart_spec("no"));
    ASSERT_GT(pid, 0);
    const auto seq = sup_->events().last_seq();
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    ASSERT_TRUE(wait_state("no", MachineState::crashed));
    run_until(ioc_, [] { return false; }, 300ms); // well past the 50 ms backoff
    EXPECT_EQ(state("no"), MachineState::crashed);
    EXPECT_TRUE(events_of("no", daemon::event_names::restart_scheduled, seq).empty());
    EXPECT_EQ(info("no").restart_count, 0U);
}

TEST_F(RestartPolicyTest, OnFailureIgnoresAQuitAndAlwaysDoesNot)
{
    const pid_t a = running("always", restart_spec("always"));
    const pid_t f = running("failure", restart_spec("on-failure"));
    ASSERT_GT(a, 0);
    ASSERT_GT(f, 0);
    // quit through passthrough: an orderly exit, but not one an operation asked for
    auto qa = qmp("always", "quit");
    auto qf = qmp("failure", "quit");
    (void)qa;
    (void)qf;
    ASSERT_TRUE(wait_state("failure", MachineState::stopped)) << to_string(state("failure"));
    EXPECT_GT(wait_new_pid("always", a), 0) << to_string(state("always"));
    run_until(ioc_, [] { return false; }, 300ms);
    EXPECT_EQ(state("failure"), MachineState::stopped);
    EXPECT_EQ(info("failure").stop_reason.kind, daemon::StopReason::Kind::host_quit);
}

TEST_F(RestartPolicyTest, ATerminationSignalFromOutsideIsAnOperatorsStopForEveryPolicy)
{
    // What `machinectl terminate`, the host's shutdown or an operator's kill does: SIGTERM, QEMU
    // quits cleanly (SHUTDOWN host-signal). Someone asked: not restarted, even under always.
    const pid_t a = running("always", restart_spec("always"));
    const pid_t f = running("failure", restart_spec("on-failure"));
    ASSERT_GT(a, 0);
    ASSERT_GT(f, 0);
    const auto seq = sup_->events().last_seq();
    ASSERT_EQ(::kill(a, SIGTERM), 0);
    ASSERT_EQ(::kill(f, SIGTERM), 0);
    ASSERT_TRUE(wait_state("always", MachineState::stopped)) << to_string(state("always"));
    ASSERT_TRUE(wait_state("failure", MachineState::stopped)) << to_string(state("failure"));
    run_until(ioc_, [] { return false; }, 300ms); // well past the 50 ms backoff
    for (const char* name : {"always", "failure"}) {
        EXPECT_EQ(state(name), MachineState::stopped) << name;
        EXPECT_EQ(info(name).stop_reason.kind, daemon::StopReason::Kind::signal) << name;
        EXPECT_TRUE(events_of(name, daemon::event_names::restart_scheduled, seq).empty()) << name;
        EXPECT_EQ(info(name).restart_count, 0U) << name;
    }
    // A SIGKILL is no request to quit: always (and on-failure) bring that one back.
    auto started = start("always");
    ASSERT_TRUE(started) << describe(started.error());
    const pid_t b = started->machine.pid.value_or(-1);
    ASSERT_EQ(::kill(b, SIGKILL), 0);
    EXPECT_GT(wait_new_pid("always", b), 0) << to_string(state("always"));
}

TEST_F(RestartPolicyTest, BackoffDoublesAndTheCrashLoopLimitEndsInFailed)
{
    pid_t pid = running("loop", restart_spec("on-failure", 3, 100, 1000));
    ASSERT_GT(pid, 0);
    const auto seq = sup_->events().last_seq();
    std::vector<std::chrono::milliseconds> gaps;
    for (int i = 0; i < 3; ++i) {
        const auto killed = Clock::now();
        ASSERT_EQ(::kill(pid, SIGKILL), 0);
        const pid_t next = wait_new_pid("loop", pid);
        ASSERT_GT(next, 0) << "attempt " << i + 1 << ": " << to_string(state("loop"));
        gaps.push_back(std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - killed));
        pid = next;
    }
    // 100, 200, 400 ms: each gap at least its backoff
    EXPECT_GE(gaps[0].count(), 100);
    EXPECT_GE(gaps[1].count(), 200);
    EXPECT_GE(gaps[2].count(), 400);
    const auto scheduled = events_of("loop", daemon::event_names::restart_scheduled, seq);
    ASSERT_EQ(scheduled.size(), 3U);
    EXPECT_EQ(json::get_int(scheduled[0], "delay_ms"), 100);
    EXPECT_EQ(json::get_int(scheduled[1], "delay_ms"), 200);
    EXPECT_EQ(json::get_int(scheduled[2], "delay_ms"), 400);
    // The fourth crash within the window: failed, and it stays so.
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    ASSERT_TRUE(wait_state("loop", MachineState::failed)) << to_string(state("loop"));
    EXPECT_EQ(events_of("loop", daemon::event_names::crash_loop, seq).size(), 1U);
    run_until(ioc_, [] { return false; }, 1000ms);
    EXPECT_EQ(state("loop"), MachineState::failed);
    EXPECT_EQ(info("loop").restart_count, 3U);
    // Someone starts it: it runs again (and the count of automatic restarts stays).
    auto started = start("loop");
    ASSERT_TRUE(started) << describe(started.error());
    EXPECT_EQ(started->machine.state, MachineState::running);
}

TEST_F(RestartPolicyTest, AStopOrDeleteDuringTheBackoffCancelsTheRestart)
{
    const pid_t a = running("stopme", restart_spec("on-failure", 5, 500));
    const pid_t b = running("deleteme", restart_spec("on-failure", 5, 500));
    ASSERT_GT(a, 0);
    ASSERT_GT(b, 0);
    ASSERT_EQ(::kill(a, SIGKILL), 0);
    ASSERT_EQ(::kill(b, SIGKILL), 0);
    ASSERT_TRUE(wait_state("stopme", MachineState::crashed));
    ASSERT_TRUE(wait_state("deleteme", MachineState::crashed));
    auto stopped = stop("stopme");
    ASSERT_TRUE(stopped) << describe(stopped.error());
    auto removed = remove("deleteme");
    ASSERT_TRUE(removed) << describe(removed.error());
    run_until(ioc_, [] { return false; }, 1000ms); // past the 500 ms backoff
    EXPECT_EQ(state("stopme"), MachineState::crashed);
    EXPECT_FALSE(sup_->inspect("deleteme"));
    EXPECT_EQ(info("stopme").restart_count, 0U);
}

TEST_F(RestartPolicyTest, AMachineUnresponsivePastTheLimitIsKilledAndRestarted)
{
    const pid_t pid = running("hung", restart_spec("on-failure"));
    const pid_t plain = running("plain", restart_spec("no"));
    ASSERT_GT(pid, 0);
    ASSERT_GT(plain, 0);
    ::kill(pid, SIGSTOP);
    ::kill(plain, SIGSTOP);
    ASSERT_FALSE(qmp("hung", "query-status", "null", 100ms));
    ASSERT_FALSE(qmp("plain", "query-status", "null", 100ms));
    ASSERT_TRUE(wait_state("hung", MachineState::unresponsive, 5s));
    ASSERT_TRUE(wait_state("plain", MachineState::unresponsive, 5s));
    const pid_t next = wait_new_pid("hung", pid);
    ASSERT_GT(next, 0) << to_string(state("hung"));
    EXPECT_TRUE(process_gone(pid));
    // Without a policy nothing is killed behind the operator's back.
    EXPECT_EQ(state("plain"), MachineState::unresponsive);
    EXPECT_FALSE(process_gone(plain));
    ::kill(plain, SIGCONT);
    ASSERT_TRUE(wait_state("plain", MachineState::running, 10s));
}

} // namespace
} // namespace qm::test
