// SPDX-License-Identifier: GPL-2.0-or-later
// A real QEMU for tests and the benchmark: temp dir, monitors, log, reaping.
#include "tests/support/qemu_process.hpp"

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <sstream>

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "libmachine/proc/spawn.hpp"
#include "tests/support/loop.hpp"

namespace qm::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

// Pause between two connection attempts while QEMU has not created its socket yet.
constexpr auto connect_retry_interval = 5ms;
// How often a pending accept looks whether QEMU is still alive.
constexpr auto exit_poll_interval = 20ms;

bool is_executable(const fs::path& p)
{
    struct stat st
    {
    };
    return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(p.c_str(), X_OK) == 0;
}

// A TCP port on 127.0.0.1 that was free a moment ago, for a QEMU that serves its monitor there
// (QEMU cannot tell us which port it picked for port=0 before we connect). The tests run one at
// a time, so the window between close() and QEMU's bind() is harmless.
expected<std::uint16_t> free_tcp_port()
{
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return fail(errc::system_error, fmt::format("socket: {}", std::strerror(errno)));
    }
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sa.sin_port = 0;
    socklen_t len = sizeof(sa);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len) != 0) {
        const int err = errno;
        ::close(fd);
        return fail(errc::system_error,
                    fmt::format("cannot pick a TCP port: {}", std::strerror(err)));
    }
    ::close(fd);
    return static_cast<std::uint16_t>(ntohs(sa.sin_port));
}

} // namespace

std::string QemuProcess::binary()
{
    const char* env = std::getenv("QM_QEMU");
    return env != nullptr && *env != '\0' ? std::string(env) : std::string("qemu-system-x86_64");
}

std::optional<std::string> QemuProcess::unavailable_reason()
{
    const std::string bin = binary();
    if (bin.find('/') != std::string::npos) {
        if (is_executable(bin)) {
            return std::nullopt;
        }
        return fmt::format("QEMU binary '{}' (from QM_QEMU) is missing or not executable", bin);
    }
    const char* path = std::getenv("PATH");
    std::istringstream dirs(path != nullptr ? path : "");
    std::string d;
    while (std::getline(dirs, d, ':')) {
        if (!d.empty() && is_executable(fs::path(d) / bin)) {
            return std::nullopt;
        }
    }
    return fmt::format("'{}' not found in PATH (install qemu-system-x86 or set QM_QEMU)", bin);
}

QemuProcess::QemuProcess(asio::io_context& ioc, QemuOptions options)
    : ioc_(ioc)
    , options_(std::move(options))
{}

expected<std::unique_ptr<QemuProcess>> QemuProcess::start(asio::io_context& ioc,
                                                          QemuOptions options)
{
    if (options.monitors < 1) {
        return fail(errc::invalid_argument, "QEMU needs at least one monitor");
    }
    std::unique_ptr<QemuProcess> q(new QemuProcess(ioc, std::move(options)));
    const QemuOptions& o = q->options_;

    std::string templ = (fs::temp_directory_path() / "qm-qemu.XXXXXX").string();
    if (::mkdtemp(templ.data()) == nullptr) {
        return fail(errc::system_error, fmt::format("mkdtemp: {}", std::strerror(errno)));
    }
    q->dir_ = templ;
    q->log_path_ = q->dir_ / "qemu.log";

    auto& argv = q->argv_;
    argv = {binary(), "-display", "none", "-nodefaults", "-no-user-config", "-machine", "none"};
    if (o.paused) {
        argv.emplace_back("-S");
    }
    for (int i = 0; i < o.monitors; ++i) {
        qmp::Address address;
        if (o.monitor == QemuOptions::Monitor::test_listens) {
            const auto wanted =
                o.tcp
                    ? qmp::Address::tcp("127.0.0.1", 0)
                    : qmp::Address::unix_socket((q->dir_ / fmt::format("qmp{}.sock", i)).string());
            auto listener = qmp::Listener::open(ioc.get_executor(), wanted);
            if (!listener) {
                return fail(listener.error());
            }
            address = listener->address();
            q->listeners_.emplace_back(std::move(*listener));
        } else if (o.tcp) {
            auto port = free_tcp_port();
            if (!port) {
                return fail(port.error());
            }
            address = qmp::Address::tcp("127.0.0.1", *port);
        } else {
            address = qmp::Address::unix_socket((q->dir_ / fmt::format("qmp{}.sock", i)).string());
        }
        std::string chardev = fmt::format("socket,id=mon{},{}", i, address.chardev_options());
        if (o.monitor == QemuOptions::Monitor::qemu_listens) {
            chardev += ",server=on,wait=off";
        }
        argv.emplace_back("-chardev");
        argv.emplace_back(std::move(chardev));
        argv.emplace_back("-mon");
        argv.emplace_back(fmt::format("chardev=mon{},mode=control", i));
        q->addresses_.push_back(std::move(address));
    }
    argv.insert(argv.end(), o.extra_args.begin(), o.extra_args.end());

    proc::SpawnOptions spawn_options;
    spawn_options.log_path = q->log_path_.string();
    auto pid = proc::spawn(argv, spawn_options);
    if (!pid) {
        return fail(pid.error());
    }
    q->pid_ = *pid;
    return q;
}

QemuProcess::~QemuProcess()
{
    for (auto& l : listeners_) {
        if (l) {
            l->close();
        }
    }
    kill();
    if (!dir_.empty()) {
        std::error_code ignored;
        fs::remove_all(dir_, ignored);
    }
}

std::string QemuProcess::log() const
{
    std::ifstream f(log_path_);
    std::ostringstream out;
    out << f.rdbuf();
    return out.str();
}

Error QemuProcess::with_log(Error e)
{
    const std::string text = log();
    e.message += fmt::format(" [QEMU {}; log: {}]", running() ? "running" : describe_exit(),
                             text.empty() ? std::string("(empty)") : text);
    return e;
}

bool QemuProcess::running()
{
    if (pid_ <= 0 || wait_status_) {
        return false;
    }
    int status = 0;
    const pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
        wait_status_ = status;
        return false;
    }
    return r == 0;
}

bool QemuProcess::wait_exit(std::chrono::milliseconds deadline)
{
    return run_until(
        ioc_, [this] { return !running(); }, deadline);
}

void QemuProcess::kill()
{
    if (!running()) {
        return;
    }
    ::kill(pid_, SIGKILL);
    int status = 0;
    pid_t r = -1;
    do {
        r = ::waitpid(pid_, &status, 0);
    } while (r < 0 && errno == EINTR);
    if (r == pid_) {
        wait_status_ = status;
    }
}

std::optional<int> QemuProcess::exit_code() const
{
    if (wait_status_ && WIFEXITED(*wait_status_)) {
        return WEXITSTATUS(*wait_status_);
    }
    return std::nullopt;
}

std::string QemuProcess::describe_exit() const
{
    if (!wait_status_) {
        return "running";
    }
    if (WIFEXITED(*wait_status_)) {
        return fmt::format("exit status {}", WEXITSTATUS(*wait_status_));
    }
    if (WIFSIGNALED(*wait_status_)) {
        return fmt::format("killed by signal {}", WTERMSIG(*wait_status_));
    }
    return fmt::format("wait status {:#x}", *wait_status_);
}

awaitable<expected<qmp::Socket>> QemuProcess::monitor_socket(int index,
                                                             std::chrono::milliseconds timeout)
{
    if (index < 0 || index >= options_.monitors) {
        co_return fail(errc::invalid_argument, fmt::format("QEMU has no monitor {}", index));
    }
    if (options_.monitor == QemuOptions::Monitor::test_listens) {
        co_return co_await accept_monitor(index, timeout);
    }
    co_return co_await connect_monitor(index, timeout);
}

awaitable<expected<qmp::Socket>> QemuProcess::accept_monitor(int index,
                                                             std::chrono::milliseconds timeout)
{
    auto& listener = listeners_.at(index);
    if (!listener) {
        co_return fail(errc::invalid_state,
                       fmt::format("monitor {} was already accepted (QEMU connects once)", index));
    }
    // A QEMU that dies at start-up never connects: a watcher closes the listener when it sees
    // the process gone, which ends the accept at once instead of after the whole timeout.
    auto ex = co_await asio::this_coro::executor;
    auto watch = std::make_shared<ExitWatch>(ex);
    asio::co_spawn(ex, close_listener_on_exit(this, watch, index), [](const std::exception_ptr& e) {
        if (e) {
            try {
                std::rethrow_exception(e);
            } catch (const std::exception& ex) {
                spdlog::error("qemu_process: exit watcher failed: {}", ex.what());
            }
        }
    });
    auto socket = co_await listener->accept(timeout);
    watch->done = true;
    watch->timer.cancel();
    if (watch->exited) {
        co_return fail(with_log(Error{make_error_code(errc::connect_failed),
                                      "QEMU exited before connecting to its monitor",
                                      {},
                                      {}}));
    }
    if (!socket) {
        co_return fail(with_log(socket.error()));
    }
    listener->close(); // removes the socket file: nothing else is to connect here
    listener.reset();
    co_return socket;
}

awaitable<void> QemuProcess::close_listener_on_exit(QemuProcess* self,
                                                    std::shared_ptr<ExitWatch> watch, int index)
{
    for (;;) {
        watch->timer.expires_after(exit_poll_interval);
        error_code ec;
        co_await watch->timer.async_wait(use_ec(ec));
        // After `done` the accept is over and `self` may be gone: touch nothing but `watch`.
        if (watch->done) {
            co_return;
        }
        if (!self->running()) {
            watch->exited = true;
            self->listeners_.at(index)->close();
            co_return;
        }
    }
}

awaitable<expected<qmp::Socket>> QemuProcess::connect_monitor(int index,
                                                              std::chrono::milliseconds timeout)
{
    const qmp::Address address = addresses_.at(index);
    asio::steady_timer retry(co_await asio::this_coro::executor);
    const auto end = std::chrono::steady_clock::now() + timeout;
    for (;;) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            end - std::chrono::steady_clock::now());
        auto socket = co_await qmp::connect_socket(address, std::max(left, 1ms));
        if (socket) {
            co_return socket;
        }
        // ENOENT / ECONNREFUSED: QEMU has not created or bound its socket yet.
        if (!running()) {
            co_return fail(
                with_log(Error{make_error_code(errc::connect_failed),
                               "QEMU exited before serving its monitor: " + socket.error().message,
                               {},
                               {}}));
        }
        if (std::chrono::steady_clock::now() >= end) {
            co_return fail(with_log(
                Error{make_error_code(errc::timeout),
                      fmt::format("QEMU's monitor {} did not accept within "
                                  "{} ms: {}",
                                  address.to_string(), timeout.count(), socket.error().message),
                      {},
                      {}}));
        }
        retry.expires_after(connect_retry_interval);
        error_code ec;
        co_await retry.async_wait(use_ec(ec));
    }
}

awaitable<expected<std::shared_ptr<qmp::Client>>>
QemuProcess::attach(qmp::ClientOptions options, int index, std::chrono::milliseconds timeout)
{
    auto socket = co_await monitor_socket(index, timeout);
    if (!socket) {
        co_return fail(socket.error());
    }
    if (options.name.empty()) {
        options.name = fmt::format("qemu{}/mon{}", pid_, index);
    }
    if (options.greeting_timeout > timeout) {
        options.greeting_timeout = timeout;
    }
    auto client = qmp::Client::create(co_await asio::this_coro::executor, std::move(options));
    auto greeting = co_await client->start(std::move(*socket));
    if (!greeting) {
        co_return fail(with_log(greeting.error()));
    }
    co_return client;
}

} // namespace qm::test
