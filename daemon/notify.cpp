// SPDX-License-Identifier: GPL-2.0-or-later
// The service manager's notification protocol: the environment, the datagrams, the keep-alive.
#include "daemon/notify.hpp"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>

namespace qm::daemon {

namespace {

constexpr std::array<const char*, 3> notify_variables{"NOTIFY_SOCKET", "WATCHDOG_USEC",
                                                      "WATCHDOG_PID"};

std::optional<std::uint64_t> parse_number(const char* text)
{
    if (text == nullptr) {
        return std::nullopt;
    }
    const std::string_view s(text);
    std::uint64_t value = 0;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
    if (ec != std::errc{} || end != s.data() + s.size() || s.empty()) {
        return std::nullopt;
    }
    return value;
}

// The order states are named in a status line: what runs first.
int state_rank(const std::string& state)
{
    if (state == "running") {
        return 0;
    }
    if (state == "paused") {
        return 1;
    }
    return 2;
}

// STATUS= is one line of the datagram's "KEY=value\n" list (sd_notify(3)).
std::string one_line(const std::string& text)
{
    std::string out = text;
    std::replace(out.begin(), out.end(), '\n', ' ');
    return out;
}

} // namespace

NotifyEnvironment parse_notify_environment(const std::function<const char*(const char*)>& getenv,
                                           pid_t self)
{
    NotifyEnvironment env;
    if (const char* socket = getenv("NOTIFY_SOCKET"); socket != nullptr && *socket != '\0') {
        const std::string_view s(socket);
        if (s.front() != '/' && s.front() != '@') {
            spdlog::debug("Ignoring NOTIFY_SOCKET '{}': neither an absolute path nor abstract", s);
        } else if (s.size() >= sizeof(sockaddr_un::sun_path) || s.size() < 2) {
            spdlog::debug("Ignoring NOTIFY_SOCKET '{}': not a usable socket address", s);
        } else {
            env.socket = s;
        }
    }
    const auto usec = parse_number(getenv("WATCHDOG_USEC"));
    if (usec && *usec > 0) {
        // WATCHDOG_PID unset: the variable is for us (an older manager, or a wrapper that exec'ed).
        const char* pid_text = getenv("WATCHDOG_PID");
        const auto pid = parse_number(pid_text);
        if (pid_text != nullptr && (!pid || *pid != static_cast<std::uint64_t>(self))) {
            spdlog::debug("Ignoring WATCHDOG_USEC: WATCHDOG_PID '{}' is not pid {}", pid_text,
                          self);
        } else {
            env.watchdog_period = std::chrono::microseconds(std::max<std::uint64_t>(*usec / 2, 1));
        }
    } else if (getenv("WATCHDOG_USEC") != nullptr) {
        spdlog::debug("Ignoring WATCHDOG_USEC '{}': not a positive number",
                      getenv("WATCHDOG_USEC"));
    }
    return env;
}

NotifyEnvironment take_notify_environment()
{
    auto env = parse_notify_environment([](const char* name) { return std::getenv(name); },
                                        ::getpid());
    for (const char* name : notify_variables) {
        ::unsetenv(name);
    }
    return env;
}

std::string machine_count_status(const std::map<std::string, std::size_t>& counts)
{
    std::vector<std::pair<std::string, std::size_t>> states;
    std::size_t total = 0;
    for (const auto& [state, n] : counts) {
        if (n > 0) {
            states.emplace_back(state, n);
            total += n;
        }
    }
    std::stable_sort(states.begin(), states.end(), [](const auto& a, const auto& b) {
        return state_rank(a.first) < state_rank(b.first);
    });
    std::string out = std::to_string(total) + (total == 1 ? " machine" : " machines");
    const char* separator = ": ";
    for (const auto& [state, n] : states) {
        out += separator + std::to_string(n) + " " + state;
        separator = ", ";
    }
    return out;
}

Notifier::Notifier(asio::io_context& ioc, NotifyEnvironment env, Options options)
    : ioc_(ioc), env_(std::move(env)), options_(options), status_timer_(ioc), watchdog_timer_(ioc)
{
    if (env_.socket.empty()) {
        return;
    }
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, env_.socket.data(), env_.socket.size());
    std::size_t length = offsetof(sockaddr_un, sun_path) + env_.socket.size();
    if (addr.sun_path[0] == '@') {
        addr.sun_path[0] = '\0'; // abstract: the name's bytes exactly, no terminating NUL
    } else {
        ++length; // a path: with its NUL
    }
    address_.assign(reinterpret_cast<const char*>(&addr), length);
    // Non-blocking: a manager that does not read must not stall the loop (sd_notify(3) blocks).
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd_ < 0) {
        spdlog::debug("Not notifying '{}': socket: {}", env_.socket, std::strerror(errno));
    }
}

Notifier::~Notifier()
{
    if (fd_ >= 0) {
        ::close(fd_);
    }
}

void Notifier::start_watchdog()
{
    if (!enabled() || !env_.watchdog_period) {
        return;
    }
    spdlog::debug("Sending WATCHDOG=1 every {} µs", env_.watchdog_period->count());
    send("WATCHDOG=1");
    arm_watchdog();
}

void Notifier::arm_watchdog()
{
    watchdog_timer_.expires_after(*env_.watchdog_period);
    watchdog_timer_.async_wait(
        [this, life = std::weak_ptr<int>(life_)](const error_code& ec) {
            if (ec || life.expired()) {
                return;
            }
            send("WATCHDOG=1");
            arm_watchdog();
        });
}

void Notifier::set_status_source(std::function<std::string()> source)
{
    source_ = std::move(source);
}

void Notifier::status_changed()
{
    if (!enabled() || !source_ || !reporting_ || status_pending_) {
        return;
    }
    status_pending_ = true;
    const auto due = last_status_at_ + options_.status_interval;
    auto flush = [this, life = std::weak_ptr<int>(life_)](const error_code& ec = {}) {
        if (!ec && !life.expired()) {
            flush_status();
        }
    };
    // Posted even when due: the change being published is seen complete (a create publishes
    // before it returns), and the changes of one handler make one datagram.
    if (std::chrono::steady_clock::now() >= due) {
        asio::post(ioc_, [flush] { flush(); });
        return;
    }
    status_timer_.expires_at(due);
    status_timer_.async_wait(flush);
}

void Notifier::flush_status()
{
    status_pending_ = false;
    const std::string text = one_line(source_());
    if (text != last_status_) {
        status(text);
    }
}

void Notifier::ready(const std::string& status)
{
    reporting_ = true;
    last_status_ = one_line(status);
    last_status_at_ = std::chrono::steady_clock::now();
    send("READY=1\nSTATUS=" + last_status_);
}

void Notifier::stopping(const std::string& status)
{
    // Readiness is over, but the shutdown's progress is still news.
    reporting_ = true;
    last_status_ = one_line(status);
    last_status_at_ = std::chrono::steady_clock::now();
    send("STOPPING=1\nSTATUS=" + last_status_);
}

void Notifier::status(const std::string& status)
{
    last_status_ = one_line(status);
    last_status_at_ = std::chrono::steady_clock::now();
    send("STATUS=" + last_status_);
}

void Notifier::send(std::string message)
{
    if (!enabled()) {
        return;
    }
    const ssize_t n =
        ::sendto(fd_, message.data(), message.size(), MSG_DONTWAIT | MSG_NOSIGNAL,
                 reinterpret_cast<const sockaddr*>(address_.data()),
                 static_cast<socklen_t>(address_.size()));
    if (n < 0) {
        if (!logged_failure_) {
            logged_failure_ = true;
            spdlog::debug("Failed to notify '{}' ({}): {} (further failures are not logged)",
                          env_.socket, message.substr(0, message.find('\n')),
                          std::strerror(errno));
        }
        return;
    }
    ++sent_;
    if (message != "WATCHDOG=1") {
        spdlog::debug("Notified '{}': {}", env_.socket, one_line(message));
    }
}

} // namespace qm::daemon
