// SPDX-License-Identifier: GPL-2.0-or-later
// qm::Machine with a real Linux guest under TCG (scripts/guest-image: Debian's cloud kernel and a
// busybox initramfs whose /init is tests/guest/init): the console (ready line, command and answer,
// pattern waits, the log with and without a reader, the log bound), guest and ACPI power-off as
// shutdown steps, and an fd passed at run time reaching the guest. Each test boots once (~3 s).
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/json.hpp"
#include "libmachine/machine/machine.hpp"
#include "tests/machine/machine_fixture.hpp"
#include "tests/support/guest_image.hpp"

#ifndef QM_SOURCE_DIR
#error "QM_SOURCE_DIR (the source tree, for scripts/guest-image) must be defined by the build"
#endif

namespace qm {
namespace {

using test::describe;
using test::read_file;
using test::run_co;
using test::run_until;
namespace fs = std::filesystem;

// Generous: TCG on a loaded 2-core machine boots several times slower than the ~3 s it takes idle.
constexpr auto boot_timeout = 60s;
constexpr auto answer_timeout = 30s;

class MachineGuestTest : public test::MachineFixture
{
protected:
    void SetUp() override
    {
        MachineFixture::SetUp();
        if (IsSkipped()) {
            return;
        }
        // A missing guest is a failure, not a skip: these tests are the only proof of the console
        // and power-off paths.
        const auto& g = test::guest_image();
        ASSERT_TRUE(g.error.empty()) << "no test guest: " << g.error;
    }

    // The guest on a TCG pc machine, its console on the first serial port.
    std::unique_ptr<Machine> make_guest(MachineConfig c, const std::string& append_extra = {},
                                        const std::vector<std::string>& args = {})
    {
        const std::string& dir = test::guest_image().dir;
        auto m = std::make_unique<Machine>(ioc_, std::move(c));
        m->set_machine("pc,accel=tcg");
        m->set_console();
        m->add_args({"-m", "128", "-nodefaults", "-no-user-config", "-no-reboot", "-kernel",
                     dir + "/vmlinuz", "-initrd", dir + "/initramfs.cpio.gz", "-append",
                     "console=ttyS0 quiet panic=-1" + append_extra});
        m->add_args(args);
        return m;
    }

    expected<ConsoleMatch> wait_console(Machine& m, ConsolePattern pattern,
                                        std::chrono::milliseconds timeout, std::uint64_t from = 0)
    {
        return run_co(ioc_, m.wait_console(std::move(pattern), timeout, from), timeout + 10s);
    }

    // Writes `line` and waits for `answer` in what follows it.
    expected<ConsoleMatch> ask(Machine& m, const std::string& line, ConsolePattern answer)
    {
        const auto from = m.console_offset();
        auto written = run_co(ioc_, m.console_write(line + "\n"), answer_timeout);
        if (!written) {
            return fail(written.error());
        }
        return wait_console(m, std::move(answer), answer_timeout, from);
    }

    void launch_and_wait_ready(Machine& m)
    {
        auto launched = launch(m);
        ASSERT_TRUE(launched) << describe(launched.error());
        // Bytes written before the guest's /init runs are lost: commands only after this.
        auto ready = wait_console(m, "qmtest: ready", boot_timeout);
        ASSERT_TRUE(ready) << describe(ready.error()) << "\nconsole: " << m.console_output();
    }

    static void remove_log(const std::string& path)
    {
        std::error_code ec;
        fs::remove(path, ec);
        fs::remove(path + ".1", ec);
    }
};

TEST_F(MachineGuestTest, ConsoleCapturesTheReadyLineAnswersCommandsAndTheGuestPowersOff)
{
    auto c = config("g-console");
    c.console_log = (fs::temp_directory_path() / "g-console.log").string();
    auto m = make_guest(c);
    launch_and_wait_ready(*m);
    if (HasFatalFailure()) {
        return;
    }
    const pid_t pid = *m->pid();

    // The ready line is in the ring, at the offset the wait reported.
    auto ready = wait_console(*m, "qmtest: ready", 1s);
    ASSERT_TRUE(ready) << describe(ready.error());
    EXPECT_EQ(ready->text, "qmtest: ready");
    EXPECT_EQ(m->console_output(ready->begin).rfind("qmtest: ready", 0), 0U) << m->console_output();

    // A line written to the console, and the guest's answer after it.
    auto echo = ask(*m, "echo hello from the test", "qmtest: hello from the test");
    ASSERT_TRUE(echo) << describe(echo.error()) << "\nconsole: " << m->console_output();
    EXPECT_GT(echo->begin, ready->end);

    // A regex, within a line.
    auto pattern = ConsolePattern::regex(R"(^qmtest: uptime [0-9]+\.[0-9]+$)");
    ASSERT_TRUE(pattern);
    auto uptime = ask(*m, "uptime", *pattern);
    ASSERT_TRUE(uptime) << describe(uptime.error()) << "\nconsole: " << m->console_output();

    // A pattern that never comes: errc::timeout after its deadline, and nothing else changes.
    const auto before = std::chrono::steady_clock::now();
    auto never = wait_console(*m, "qmtest: never printed", 300ms, m->console_offset());
    ASSERT_FALSE(never);
    EXPECT_TRUE(never.error().is(errc::timeout)) << describe(never.error());
    EXPECT_GE(std::chrono::steady_clock::now() - before, 300ms);
    // An answer already received is found again from the ring, but not from after it.
    EXPECT_TRUE(wait_console(*m, "qmtest: hello from the test", 1s));
    EXPECT_FALSE(wait_console(*m, "qmtest: hello from the test", 100ms, echo->end));

    // The guest powers itself off: SHUTDOWN with guest: true, then QEMU exits 0.
    auto off = ask(*m, "poweroff", "qmtest: powering off");
    ASSERT_TRUE(off) << describe(off.error());
    auto shutdown_event = event_wait(*m, "SHUTDOWN", answer_timeout, R"({"data":{"guest":true}})");
    ASSERT_TRUE(shutdown_event) << describe(shutdown_event.error());
    EXPECT_NE(shutdown_event->find("guest-shutdown"), std::string::npos) << *shutdown_event;
    auto waited = run_co(ioc_, m->wait(answer_timeout), answer_timeout + 10s);
    ASSERT_TRUE(waited) << describe(waited.error());
    EXPECT_EQ(m->exitcode(), 0);
    EXPECT_EQ(m->state(), MachineState::stopped);
    EXPECT_EQ(m->last_shutdown_step(), ShutdownStep::guest_poweroff);
    EXPECT_EQ(warnings_.messages(), std::vector<std::string>{});

    // After shutdown the ring stays readable; QEMU's log holds all of it (the ring may have
    // missed the first bytes, the log did not: it is QEMU's).
    const std::string ring = m->console_output();
    EXPECT_NE(ring.find("qmtest: powering off"), std::string::npos) << ring;
    const std::string log = read_file(c.console_log);
    EXPECT_NE(log.find(ring), std::string::npos) << "log:\n" << log << "\nring:\n" << ring;
    EXPECT_EQ(m->console()->log_rotations(), 0U);
    EXPECT_FALSE(fs::exists(m->console_socket_path()));
    remove_log(c.console_log);
    expect_nothing_left(*m, pid);
}

TEST_F(MachineGuestTest, ConsoleLogHoldsTheOutputWithNoReaderConnected)
{
    // Without a QMP monitor the machine connects to the console only for a console call: nobody
    // reads this guest's console, which powers off by itself a second after it is ready.
    auto c = config("g-noreader");
    c.console_log = (fs::temp_directory_path() / "g-noreader.log").string();
    auto m = make_guest(c, " qmtest.poweroff=1");
    m->set_qmp_monitor(false);
    ASSERT_TRUE(launch(*m));
    const pid_t pid = *m->pid();
    auto waited = run_co(ioc_, m->wait(boot_timeout), boot_timeout + 10s);
    ASSERT_TRUE(waited) << describe(waited.error()) << "\nlog: " << m->get_log();
    EXPECT_EQ(m->exitcode(), 0);
    EXPECT_EQ(m->console_offset(), 0U) << "nobody read the console";
    EXPECT_EQ(m->last_shutdown_step(), ShutdownStep::exited) << "no monitor, no SHUTDOWN event";
    const std::string log = read_file(c.console_log);
    EXPECT_NE(log.find("qmtest: ready"), std::string::npos) << log;
    EXPECT_NE(log.find("qmtest: powering off by itself"), std::string::npos) << log;
    remove_log(c.console_log);
    expect_nothing_left(*m, pid);
}

TEST_F(MachineGuestTest, SystemPowerdownEndsInGuestPoweroffAndTheLogStaysBounded)
{
    auto c = config("g-powerdown");
    c.console_log = (fs::temp_directory_path() / "g-powerdown.log").string();
    c.console_log_max = 64; // rotated several times during the boot
    auto m = make_guest(c);
    launch_and_wait_ready(*m);
    if (HasFatalFailure()) {
        return;
    }
    const pid_t pid = *m->pid();
    ShutdownOptions options;
    options.mode = ShutdownMode::powerdown;
    options.powerdown_timeout = answer_timeout;
    auto done = shutdown(*m, options);
    ASSERT_TRUE(done) << describe(done.error()) << "\nconsole: " << m->console_output();
    EXPECT_EQ(m->last_shutdown_step(), ShutdownStep::guest_poweroff);
    EXPECT_EQ(m->exitcode(), 0);
    EXPECT_EQ(m->state(), MachineState::stopped);
    // The button was pressed (POWERDOWN), and the guest itself shut down (SHUTDOWN, guest: true).
    std::string events;
    for (const auto& e : m->get_qmp_events()) {
        events += e.to_json() + "\n";
    }
    EXPECT_NE(events.find(R"("event":"POWERDOWN")"), std::string::npos) << events;
    EXPECT_NE(events.find(R"("event":"SHUTDOWN","data":{"guest":true,"reason":"guest-shutdown"})"),
              std::string::npos)
        << events;
    // The console stayed drained while the guest went down: its last words are in the ring.
    EXPECT_NE(m->console_output().find("qmtest: power button pressed"), std::string::npos)
        << m->console_output();
    EXPECT_EQ(warnings_.messages(), std::vector<std::string>{});

    // The log bound, with QEMU's own O_APPEND writer: rotated, small, and without a hole (QEMU
    // went on at the start of the truncated file, not at its old offset).
    EXPECT_GE(m->console()->log_rotations(), 1U);
    const std::string log = read_file(c.console_log);
    const std::string old = read_file(c.console_log + ".1");
    EXPECT_FALSE(old.empty());
    EXPECT_LT(log.size(), 64U + 4096U);
    EXPECT_LT(old.size(), 64U + 4096U);
    EXPECT_EQ(log.find('\0'), std::string::npos) << "a hole in the truncated log";
    EXPECT_EQ(old.find('\0'), std::string::npos);
    remove_log(c.console_log);
    expect_nothing_left(*m, pid);
}

TEST_F(MachineGuestTest, AGuestIgnoringThePowerButtonEndsInQuitAfterTheTimeout)
{
    auto m = make_guest(config("g-ignore"));
    launch_and_wait_ready(*m);
    if (HasFatalFailure()) {
        return;
    }
    const pid_t pid = *m->pid();
    auto ignoring = ask(*m, "ignore-button", "qmtest: ignoring the power button");
    ASSERT_TRUE(ignoring) << describe(ignoring.error());
    ShutdownOptions options;
    options.mode = ShutdownMode::powerdown;
    options.powerdown_timeout = 2s;
    const auto before = std::chrono::steady_clock::now();
    auto done = shutdown(*m, options);
    const auto elapsed = std::chrono::steady_clock::now() - before;
    ASSERT_TRUE(done) << describe(done.error()) << "\nconsole: " << m->console_output();
    EXPECT_EQ(m->last_shutdown_step(), ShutdownStep::quit);
    EXPECT_GE(elapsed, 2s);
    EXPECT_EQ(m->exitcode(), 0);
    EXPECT_EQ(m->state(), MachineState::stopped);
    auto shutdown_event = event_wait(*m, "SHUTDOWN", 0ms);
    ASSERT_TRUE(shutdown_event) << describe(shutdown_event.error());
    EXPECT_NE(shutdown_event->find(R"("guest":false)"), std::string::npos) << *shutdown_event;
    EXPECT_NE(shutdown_event->find("host-qmp-quit"), std::string::npos) << *shutdown_event;
    EXPECT_EQ(m->console_output().find("qmtest: power button pressed"), std::string::npos);
    EXPECT_EQ(warnings_.messages(), std::vector<std::string>{});
    expect_nothing_left(*m, pid);
}

TEST_F(MachineGuestTest, SendFdAttachesAPassedSocketToTheGuestsSecondSerialPort)
{
    // send_fd (getfd over SCM_RIGHTS) gives QEMU one end of a socketpair under a name;
    // chardev-change then backs the guest's ttyS1 (a null chardev until now) with a socket chardev
    // on that fd ("addr": {"type": "fd"}). Bytes the guest writes to ttyS1 can reach our end only
    // through the descriptor we passed, and the guest reads what we write to it.
    auto m =
        make_guest(config("g-sendfd"), {}, {"-chardev", "null,id=aux", "-serial", "chardev:aux"});
    launch_and_wait_ready(*m);
    if (HasFatalFailure()) {
        return;
    }
    const pid_t pid = *m->pid();
    int pair[2] = {-1, -1};
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair), 0);
    auto sent = run_co(ioc_, m->send_fd(pair[1], "aux0"), answer_timeout);
    ::close(pair[1]); // QEMU has its own copy now
    ASSERT_TRUE(sent) << describe(sent.error());
    auto changed = cmd(*m, "chardev-change",
                       R"({"id":"aux","backend":{"type":"socket","data":{
                            "addr":{"type":"fd","data":{"str":"aux0"}},"server":false}}})");
    ASSERT_TRUE(changed) << describe(changed.error());
    // The chardev took the named descriptor: the monitor no longer has it.
    auto closed = cmd(*m, "closefd", R"({"fdname":"aux0"})");
    EXPECT_FALSE(closed);

    // Guest to us: the guest opens ttyS1 and keeps it open (so nothing we send is lost before it
    // reads), says so on it, then reads one line from it and prints it on the console.
    auto from = m->console_offset();
    auto written = run_co(ioc_,
                          m->console_write("run exec 3<>/dev/ttyS1; echo guest-to-host >&3; "
                                           "head -n 1 <&3\n"),
                          answer_timeout);
    ASSERT_TRUE(written) << describe(written.error());
    std::string received;
    const bool heard = run_until(
        ioc_,
        [&] {
            char buf[256];
            const ssize_t n = ::recv(pair[0], buf, sizeof(buf), MSG_DONTWAIT);
            if (n > 0) {
                received.append(buf, static_cast<std::size_t>(n));
            }
            return received.find("guest-to-host") != std::string::npos;
        },
        answer_timeout);
    EXPECT_TRUE(heard) << "received on our end: '" << received
                       << "'\nconsole: " << m->console_output();
    // Us to guest.
    const std::string line = "host-to-guest\n";
    ASSERT_EQ(::send(pair[0], line.data(), line.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(line.size()));
    auto answer = wait_console(*m, "host-to-guest", answer_timeout, from);
    ASSERT_TRUE(answer) << describe(answer.error()) << "\nconsole: " << m->console_output();
    auto status = wait_console(*m, "qmtest: done 0", answer_timeout, answer->end);
    EXPECT_TRUE(status) << describe(status.error()) << "\nconsole: " << m->console_output();
    ::close(pair[0]);
    ASSERT_TRUE(shutdown(*m));
    EXPECT_EQ(m->last_shutdown_step(), ShutdownStep::quit);
    expect_nothing_left(*m, pid);
}

} // namespace
} // namespace qm
