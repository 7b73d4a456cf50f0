// SPDX-License-Identifier: GPL-2.0-or-later
// The supervisor with the real test guest under TCG: the console through the supervisor, a stop by
// the power button (guest-poweroff), a guest that powers itself off (an exit nobody asked for), and
// a guest that ignores the button (the ladder goes on to quit).
#include <chrono>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "tests/support/guest_image.hpp"
#include "tests/supervisor/supervisor_fixture.hpp"

namespace qm::test {
namespace {

using daemon::StopReason;

constexpr auto boot_timeout = 90s;
constexpr auto answer_timeout = 30s;

class SupervisorGuestTest : public SupervisorFixture
{
protected:
    void SetUp() override
    {
        SupervisorFixture::SetUp();
        if (IsSkipped()) {
            return;
        }
        const auto& g = guest_image();
        ASSERT_TRUE(g.error.empty()) << "no test guest: " << g.error;
        open_supervisor();
    }

    void boot(const std::string& name, int timeout_s = 60)
    {
        ASSERT_TRUE(create(name, test::guest_spec({}, timeout_s)));
        auto started = start(name);
        ASSERT_TRUE(started) << describe(started.error());
        auto ready = run_co(ioc_, sup_->console_wait(name, "qmtest: ready", boot_timeout),
                            boot_timeout + 10s);
        ASSERT_TRUE(ready) << describe(ready.error()) << "\nconsole: " << console(name);
    }

    std::string console(const std::string& name)
    {
        auto out = sup_->console_output(name);
        return out ? out->first : describe(out.error());
    }

    expected<ConsoleMatch> ask(const std::string& name, const std::string& line,
                               const std::string& answer)
    {
        auto offset = run_co(ioc_, sup_->console_write(name, line + "\n"), answer_timeout);
        if (!offset) {
            return fail(offset.error());
        }
        return run_co(ioc_, sup_->console_wait(name, answer, answer_timeout, *offset),
                      answer_timeout + 10s);
    }
};

TEST_F(SupervisorGuestTest, ConsoleThroughTheSupervisorAndAStopByThePowerButton)
{
    boot("g1");
    if (HasFatalFailure()) {
        return;
    }
    auto echo = ask("g1", "echo through the supervisor", "qmtest: through the supervisor");
    ASSERT_TRUE(echo) << describe(echo.error()) << "\nconsole: " << console("g1");
    const auto log = info("g1").console_log_path;
    ASSERT_FALSE(log.empty());

    const auto seq = sup_->events().last_seq();
    auto stopped = stop("g1");
    ASSERT_TRUE(stopped) << describe(stopped.error());
    EXPECT_EQ(stopped->machine.state, MachineState::stopped);
    EXPECT_EQ(stopped->machine.stop_reason.kind, StopReason::Kind::guest_poweroff);
    EXPECT_EQ(stopped->machine.exit_code, 0);
    EXPECT_EQ(states_since("g1", seq), (std::vector<std::string>{"stopping", "stopped"}));
    // QEMU itself wrote the console log, kept after the stop for the operator.
    EXPECT_NE(read_file(log).find("qmtest: through the supervisor"), std::string::npos);
}

TEST_F(SupervisorGuestTest, AGuestThatPowersItselfOffIsStoppedWithThatReason)
{
    boot("g2");
    if (HasFatalFailure()) {
        return;
    }
    const auto seq = sup_->events().last_seq();
    auto off = ask("g2", "poweroff", "qmtest: powering off");
    ASSERT_TRUE(off) << describe(off.error());
    ASSERT_TRUE(wait_state("g2", MachineState::stopped, answer_timeout));
    const auto m = info("g2");
    EXPECT_EQ(m.stop_reason.kind, StopReason::Kind::guest_poweroff);
    EXPECT_EQ(states_since("g2", seq), (std::vector<std::string>{"stopping", "stopped"}));
    daemon::EventSelector shutdown;
    shutdown.machine = "g2";
    shutdown.names = {"SHUTDOWN"};
    auto events = sup_->events().replay(seq, shutdown);
    ASSERT_EQ(events.size(), 1U);
    EXPECT_EQ(json::to_string(events[0].data()), R"({"guest":true,"reason":"guest-shutdown"})");
}

TEST_F(SupervisorGuestTest, AGuestThatIgnoresTheButtonIsQuitAfterItsTime)
{
    boot("g3", 2);
    if (HasFatalFailure()) {
        return;
    }
    auto ignoring = ask("g3", "ignore-button", "qmtest: ignoring the power button");
    ASSERT_TRUE(ignoring) << describe(ignoring.error());
    auto stopped = stop("g3");
    ASSERT_TRUE(stopped) << describe(stopped.error());
    EXPECT_EQ(stopped->machine.stop_reason.kind, StopReason::Kind::host_quit);
    EXPECT_EQ(stopped->machine.state, MachineState::stopped);
}

} // namespace
} // namespace qm::test
