// SPDX-License-Identifier: GPL-2.0-or-later
// The machine suite's fixture: a Machine on a private TMPDIR with a real QEMU, warnings captured
// from spdlog, and the helpers that prove nothing was left behind (process, socket, temp dir).
#pragma once

#include <sys/types.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>

#include "libmachine/asio.hpp"
#include "libmachine/json.hpp"
#include "libmachine/machine/machine.hpp"
#include "libmachine/proc/child_watcher.hpp"
#include "tests/support/loop.hpp"
#include "tests/support/qemu_process.hpp"

namespace qm {
// gtest prints states by name.
inline void PrintTo(MachineState s, std::ostream* os)
{
    *os << to_string(s);
}
} // namespace qm

namespace qm::test {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

inline std::string describe(const Error& e)
{
    return std::string(to_string(static_cast<errc>(e.code.value()))) + ": " + e.message;
}

inline std::string read_file(const fs::path& path)
{
    std::ifstream f(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// The NUL-separated contents of /proc/PID/cmdline or /proc/PID/environ.
inline std::vector<std::string> read_nul_list(const fs::path& path)
{
    std::vector<std::string> out;
    std::istringstream in(read_file(path));
    std::string item;
    while (std::getline(in, item, '\0')) {
        out.push_back(item);
    }
    return out;
}

// Gone means reaped: a zombie still answers kill(pid, 0).
inline bool process_gone(pid_t pid)
{
    return ::kill(pid, 0) != 0 && errno == ESRCH;
}

// Whether `pid` has installed a handler for `signo` (SigCgt in /proc/PID/status): a readiness
// check that needs no sleep.
inline bool catches_signal(pid_t pid, int signo)
{
    std::ifstream f(fmt::format("/proc/{}/status", pid));
    std::string line;
    while (std::getline(f, line)) {
        if (line.rfind("SigCgt:", 0) == 0) {
            const unsigned long long mask = std::stoull(line.substr(7), nullptr, 16);
            return ((mask >> (signo - 1)) & 1U) != 0;
        }
    }
    return false;
}

// The entries of the temporary directory whose names start with `prefix`.
inline std::vector<std::string> temp_entries(const std::string& prefix)
{
    std::vector<std::string> out;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(fs::temp_directory_path(), ec)) {
        const auto name = e.path().filename().string();
        if (name.rfind(prefix, 0) == 0) {
            out.push_back(name);
        }
    }
    return out;
}

// A TCP port on 127.0.0.1 that was free a moment ago (the tests run one at a time).
inline std::uint16_t free_tcp_port()
{
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return 0;
    }
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(sa);
    std::uint16_t port = 0;
    if (::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0 &&
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len) == 0) {
        port = ntohs(sa.sin_port);
    }
    ::close(fd);
    return port;
}

// Warnings (and worse) logged through spdlog while it lives: the library logs above debug only
// for the seed's "qemu received signal" warning.
class WarningCapture
{
public:
    WarningCapture()
        : sink_(std::make_shared<Sink>())
        , previous_(spdlog::default_logger())
    {
        auto logger = std::make_shared<spdlog::logger>("machine-test", sink_);
        logger->set_level(spdlog::level::warn);
        spdlog::set_default_logger(std::move(logger));
    }
    WarningCapture(const WarningCapture&) = delete;
    WarningCapture& operator=(const WarningCapture&) = delete;
    ~WarningCapture() { spdlog::set_default_logger(previous_); }

    std::vector<std::string> messages() const
    {
        std::lock_guard<std::mutex> lock(sink_->mutex_);
        return sink_->messages;
    }

private:
    struct Sink : spdlog::sinks::base_sink<std::mutex>
    {
        friend class WarningCapture;
        std::vector<std::string> messages;

    protected:
        void sink_it_(const spdlog::details::log_msg& msg) override
        {
            messages.emplace_back(msg.payload.data(), msg.payload.size());
        }
        void flush_() override {}
    };

    std::shared_ptr<Sink> sink_;
    std::shared_ptr<spdlog::logger> previous_;
};

// run_co() needs a default-constructible result; qmp::Event has none, so tests get its JSON.
inline awaitable<expected<std::string>> event_json(awaitable<expected<qmp::Event>> wait)
{
    auto event = co_await std::move(wait);
    if (!event) {
        co_return fail(event.error());
    }
    co_return event->to_json();
}

// One test's loop, machines and captured warnings. Skips when QEMU is missing.
class MachineFixture : public testing::Test
{
protected:
    void SetUp() override
    {
        if (auto why = QemuProcess::unavailable_reason()) {
            GTEST_SKIP() << "no QEMU: " << *why;
        }
    }

    void TearDown() override
    {
        // A machine destroyed while running was SIGKILLed and forgotten; the watcher still reaps
        // it, and the QMP clients' coroutines see their sockets closed.
        auto& watcher = proc::ChildWatcher::get(ioc_);
        EXPECT_TRUE(run_until(
            ioc_, [&] { return watcher.watched() == 0; }, 20s))
            << watcher.watched() << " processes still watched at the end of the test";
        ioc_.restart();
        ioc_.poll();
        // No socket file, temp dir or log left by any machine of the test (the leak check says
        // the same for every file; this names the machine's own).
        EXPECT_EQ(temp_entries(""), std::vector<std::string>{});
    }

    // The seed's QEMUMachine(binary, base_temp_dir=...) with -machine none.
    MachineConfig config(std::string name = {}) const
    {
        MachineConfig c;
        c.binary = QemuProcess::binary();
        c.name = std::move(name);
        // Not the seed's /var/tmp: the leak check watches this program's private TMPDIR.
        c.base_temp_dir = fs::temp_directory_path().string();
        c.qmp_timer = 20s;
        return c;
    }

    std::unique_ptr<Machine> make_machine(MachineConfig c)
    {
        auto m = std::make_unique<Machine>(ioc_, std::move(c));
        m->set_machine("none");
        return m;
    }

    std::unique_ptr<Machine> make_machine(std::string name = {})
    {
        return make_machine(config(std::move(name)));
    }

    // Where the machine's default monitor socket is (the seed's <sock_dir>/<name>-monitor.sock).
    static std::string monitor_path(const Machine& m)
    {
        const auto& c = m.config();
        const std::string& dir = c.sock_dir.empty() ? c.base_temp_dir : c.sock_dir;
        return dir + "/" + m.name() + "-monitor.sock";
    }

    expected<void> launch(Machine& m) { return run_co(ioc_, m.launch(), 60s); }

    expected<void> shutdown(Machine& m, ShutdownOptions options = {})
    {
        return run_co(ioc_, m.shutdown(options), 90s);
    }

    // The seed's vm.cmd(name, **args), arguments as JSON text ("" for none).
    expected<json::Document> cmd(Machine& m, std::string command, std::string arguments = "",
                                 bool conv_keys = true)
    {
        json::Document args;
        if (!arguments.empty()) {
            auto parsed = json::parse(arguments);
            if (!parsed) {
                ADD_FAILURE() << "bad JSON in the test: " << arguments;
                return fail(parsed.error());
            }
            args = std::move(*parsed);
        }
        return run_co(ioc_, m.cmd(std::move(command), std::move(args), conv_keys), 30s);
    }

    expected<json::Document> qmp(Machine& m, std::string command, std::string arguments = "",
                                 bool conv_keys = true)
    {
        json::Document args;
        if (!arguments.empty()) {
            args = std::move(*json::parse(arguments));
        }
        return run_co(ioc_, m.qmp(std::move(command), std::move(args), conv_keys), 30s);
    }

    // The seed's event_wait(name, timeout, match), the event as JSON.
    expected<std::string> event_wait(Machine& m, std::string name,
                                     std::chrono::milliseconds timeout,
                                     std::string match_json = "")
    {
        json::Document match;
        if (!match_json.empty()) {
            match = std::move(*json::parse(match_json));
        }
        return run_co(ioc_, event_json(m.event_wait(std::move(name), timeout, std::move(match))),
                      timeout + 10s);
    }

    // What a finished machine must have left: no process, no monitor socket, no temp dir.
    void expect_nothing_left(const Machine& m, pid_t pid, const std::string& temp_dir = {})
    {
        EXPECT_FALSE(m.is_running());
        EXPECT_EQ(m.pid(), std::nullopt);
        if (pid > 0) {
            EXPECT_TRUE(process_gone(pid)) << "process " << pid << " still exists";
        }
        EXPECT_FALSE(fs::exists(monitor_path(m))) << monitor_path(m);
        if (!temp_dir.empty()) {
            EXPECT_FALSE(fs::exists(temp_dir)) << temp_dir;
        }
        EXPECT_EQ(temp_entries("qemu-machine-"), std::vector<std::string>{});
    }

    asio::io_context ioc_{1};
    WarningCapture warnings_;
};

} // namespace qm::test
