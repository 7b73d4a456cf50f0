// SPDX-License-Identifier: GPL-2.0-or-later
// The daemon survives its own death: the real qmachined SIGKILLed with machines running (and a real
// guest among them), started again on the same directories, takes every live QEMU over (same pid,
// QMP answers, the console reconnected), marks the ones that died meanwhile crashed, kills QEMUs
// whose definition is gone, and never leaves a second QEMU, an orphan or a stale socket behind.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/asio.hpp"
#include "libmachine/json.hpp"
#include "tests/daemon/machine_daemon.hpp"
#include "tests/rest/http_client.hpp"
#include "tests/support/daemon_process.hpp"
#include "tests/support/guest_image.hpp"
#include "tests/support/qemu_process.hpp"

namespace qm::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

// A client of a console socket QEMU serves, for the moments the daemon is not connected to it.
class ConsoleClient
{
public:
    explicit ConsoleClient(const fs::path& path)
    {
        fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
        if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
            error_ = std::strerror(errno);
        }
        timeval tv{0, 200000};
        ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    }
    ~ConsoleClient() { ::close(fd_); }
    ConsoleClient(const ConsoleClient&) = delete;
    ConsoleClient& operator=(const ConsoleClient&) = delete;

    const std::string& error() const { return error_; }

    // Writes `line` and reads until `expect` appears (or `deadline`); what was read.
    std::string ask(const std::string& line, const std::string& expect,
                    std::chrono::milliseconds deadline = 30s)
    {
        const std::string out = line + "\n";
        if (::write(fd_, out.data(), out.size()) != static_cast<ssize_t>(out.size())) {
            return "write failed: " + std::string(std::strerror(errno));
        }
        std::string got;
        const auto end = std::chrono::steady_clock::now() + deadline;
        while (got.find(expect) == std::string::npos && std::chrono::steady_clock::now() < end) {
            char buf[4096];
            const ssize_t n = ::read(fd_, buf, sizeof buf);
            if (n > 0) {
                got.append(buf, static_cast<std::size_t>(n));
            } else if (n == 0) {
                break;
            }
        }
        return got;
    }

private:
    int fd_ = -1;
    std::string error_;
};

class ReattachTest : public MachineDaemonTest
{
protected:
    void TearDown() override
    {
        // Whatever the test left running is stopped by a daemon that takes it over and stops it
        // at SIGTERM (stop-machines); the fixture then checks that nothing is left behind.
        if (daemon_) {
            kill_daemon();
        }
        MachineDaemonTest::TearDown();
    }

    // The pids of every machine the daemon lists as having a process, by name.
    std::map<std::string, pid_t> listed_pids()
    {
        std::map<std::string, pid_t> out;
        const json::Document d = call("GET", "/v1/machines").json();
        const json::Value* list = json::find(d, "machines");
        if (list == nullptr || !list->IsArray()) {
            ADD_FAILURE() << "no machine list";
            return out;
        }
        for (const auto& m : list->GetArray()) {
            const auto pid = json::get_int(m, "pid");
            if (pid) {
                out[std::string(json::get_string(m, "name").value_or(""))] =
                    static_cast<pid_t>(*pid);
            }
        }
        return out;
    }

    fs::path console_socket(const std::string& name)
    {
        return machine_dir(name) / "qemu-console.sock";
    }

    void kill_daemon()
    {
        daemon().signal(SIGKILL);
        ASSERT_EQ(daemon().wait_exit(10s), 128 + SIGKILL);
        daemon_.reset();
    }
};

// The issue's scenario: 10 machines (one a real guest), the daemon SIGKILLed and started again
// 20 times in a row; in each round one QEMU is killed while the daemon is down.
TEST_F(ReattachTest, SigkillRestartTwentyRoundsKeepsEveryMachine)
{
    const auto& g = guest_image();
    ASSERT_TRUE(g.error.empty()) << "no test guest: " << g.error;
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    std::vector<std::string> names;
    for (int i = 0; i < 9; ++i) {
        names.push_back(fmt::format("m{}", i));
        HttpResponse r = create(names.back(), quick_spec(i % 2 == 0));
        ASSERT_EQ(r.status, 201) << r;
    }
    names.emplace_back("guest");
    ASSERT_EQ(create("guest", guest_spec()).status, 201);
    for (const auto& n : names) {
        start_machine(n);
    }
    // The guest booted (its console log says so) before the rounds start.
    ASSERT_TRUE(eventually(
        [&] {
            return call("GET", "/v1/machines/guest/console/log").body.find("qmtest: ready") !=
                   std::string::npos;
        },
        120s))
        << call("GET", "/v1/machines/guest/console/log");
    std::map<std::string, pid_t> pids = listed_pids();
    ASSERT_EQ(pids.size(), names.size());
    const fs::path guest_console = console_socket("guest");

    for (int round = 0; round < 20; ++round) {
        SCOPED_TRACE(fmt::format("round {}", round));
        ASSERT_NO_FATAL_FAILURE(kill_daemon());
        // Every QEMU outlives the daemon.
        for (const auto& [name, pid] : pids) {
            ASSERT_TRUE(alive(pid)) << name << " (pid " << pid << ") died with the daemon";
        }
        // One of the quick machines dies while the daemon is down.
        const std::string victim = names[static_cast<std::size_t>(round) % 9];
        ASSERT_EQ(::kill(pids[victim], SIGKILL), 0);
        ASSERT_TRUE(eventually([&] { return !alive(pids[victim]); }, 10s));
        if (round == 0 || round == 19) {
            // The guest's console still answers, straight from QEMU while nobody is connected.
            ConsoleClient console(guest_console);
            ASSERT_EQ(console.error(), "");
            const std::string word = fmt::format("round{}", round);
            const std::string got = console.ask("echo " + word, "qmtest: " + word);
            EXPECT_NE(got.find("qmtest: " + word), std::string::npos) << got;
        }

        ASSERT_NO_FATAL_FAILURE(start_daemon());
        EXPECT_TRUE(daemon().says("Re-attached 9 running machine(s), 1 died")) << daemon().output();
        const auto listed = listed_pids();
        for (const auto& n : names) {
            const json::Document d = machine(n);
            if (n == victim) {
                EXPECT_EQ(json::get_string(d, "state"), "crashed") << json::to_string(d);
                EXPECT_EQ(listed.count(n), 0U);
                continue;
            }
            EXPECT_EQ(json::get_string(d, "state"), "running") << json::to_string(d);
            ASSERT_EQ(listed.count(n), 1U) << n;
            EXPECT_EQ(listed.at(n), pids[n]) << n << " has another process";
            HttpResponse q = call("POST", "/v1/machines/" + n + "/qmp",
                                  R"({"execute": "query-status"})");
            EXPECT_EQ(q.status, 200) << n << ": " << q;
            EXPECT_NE(q.body.find("\"running\""), std::string::npos) << q;
        }
        // The victim's stale sockets are gone; the console sockets of the live ones have the
        // daemon connected again (once every machine answers: soon after it is ready).
        EXPECT_FALSE(fs::exists(console_socket(victim)));
        EXPECT_TRUE(eventually([&] { return unix_connections(guest_console) == 1U; }, 10s))
            << unix_connections(guest_console) << " connection(s) to the console";
        // Never a second QEMU for a machine, never an orphan.
        EXPECT_EQ(qemus().size(), names.size() - 1);
        pids[victim] = start_machine(victim);
        EXPECT_EQ(qemus().size(), names.size());
    }

    // The guest is still the same guest: it powers off at the button, through the re-attached
    // monitor, and says so on the console.
    HttpResponse stopped = call("POST", "/v1/machines/guest/stop");
    EXPECT_EQ(stopped.status, 200) << stopped;
    const json::Document d = stopped.json();
    const json::Value* reason = json::find(d, "stop_reason");
    ASSERT_NE(reason, nullptr);
    EXPECT_EQ(json::get_string(*reason, "kind"), "guest-poweroff") << stopped;
    EXPECT_NE(call("GET", "/v1/machines/guest/console/log").body.find(
                  "qmtest: power button pressed"),
              std::string::npos);
}

// A QEMU whose definition disappeared while the daemon was down is not left as an orphan.
TEST_F(ReattachTest, QemuWithoutDefinitionIsKilled)
{
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    ASSERT_EQ(create("gone", quick_spec(true)).status, 201);
    const std::string id(json::get_string(machine("gone"), "id").value_or("?"));
    const pid_t pid = start_machine("gone");
    ASSERT_NO_FATAL_FAILURE(kill_daemon());
    ASSERT_TRUE(alive(pid));
    fs::remove(state_ / "gone.json");
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    EXPECT_TRUE(eventually([&] { return !alive(pid); }, 10s)) << daemon().output();
    EXPECT_FALSE(fs::exists(runtime_ / "m" / id));
    EXPECT_TRUE(daemon().says("it has no definition any more")) << daemon().output();
    EXPECT_EQ(call("GET", "/v1/machines/gone").status, 404);
}

// A record whose process is another one (the pid reused after a reboot of the daemon's host or a
// wrap-around) is not trusted: the machine is crashed, the unrelated process untouched.
TEST_F(ReattachTest, ReusedPidIsNotTakenOver)
{
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    ASSERT_EQ(create("r", quick_spec(false)).status, 201);
    const std::string id(json::get_string(machine("r"), "id").value_or("?"));
    const pid_t pid = start_machine("r");
    ASSERT_NO_FATAL_FAILURE(kill_daemon());
    // QEMU dies; an unrelated process takes the record's place (its pid written into it).
    ::kill(pid, SIGKILL);
    ASSERT_TRUE(eventually([&] { return !alive(pid); }, 10s));
    const pid_t other = spawn_process({"sleep", "30"}, -1, -1);
    const fs::path record = runtime_ / "m" / id / "record.json";
    std::string text = read_whole_file(record);
    const std::string from = fmt::format("\"pid\":{}", pid);
    ASSERT_NE(text.find(from), std::string::npos) << text;
    text.replace(text.find(from), from.size(), fmt::format("\"pid\":{}", other));
    write_whole_file(record, text);
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    const json::Document d = machine("r");
    EXPECT_EQ(json::get_string(d, "state"), "crashed") << json::to_string(d);
    EXPECT_TRUE(alive(other)) << "qmachined touched a process that is not its QEMU";
    EXPECT_FALSE(fs::exists(record));
    ::kill(other, SIGKILL);
    int st = 0;
    ::waitpid(other, &st, 0);
}

} // namespace
} // namespace qm::test
