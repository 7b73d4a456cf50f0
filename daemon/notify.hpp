// SPDX-License-Identifier: GPL-2.0-or-later
// The service manager's notification protocol (sd_notify(3)): READY=1, STATUS=, WATCHDOG=1 and
// STOPPING=1 as datagrams on $NOTIFY_SOCKET; nothing at all when it is unset.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <sys/types.h>

#include "libmachine/asio.hpp"

namespace qm::daemon {

using namespace std::chrono_literals;

// What the service manager asked for, from the environment (sd_notify(3), sd_watchdog_enabled(3)).
struct NotifyEnvironment
{
    std::string socket; // $NOTIFY_SOCKET: an absolute path, or "@name" (abstract); empty: none
    // Half of $WATCHDOG_USEC (the period sd_watchdog_enabled(3) recommends), when it is set, valid
    // and $WATCHDOG_PID (if set) names `self`.
    std::optional<std::chrono::microseconds> watchdog_period{};
};

// Reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID through `getenv` (nullptr: unset) for the
// process `self`. A socket that is neither absolute nor abstract, or too long for sockaddr_un, is
// ignored (logged at debug), as are a WATCHDOG_USEC that is not a positive number and a
// WATCHDOG_PID of another process.
NotifyEnvironment parse_notify_environment(const std::function<const char*(const char*)>& getenv,
                                           pid_t self);
// The same from the process environment, which then loses the three variables: QEMU and whatever
// else qmachined starts must not notify in its name (sd_notify(3)'s unset_environment).
NotifyEnvironment take_notify_environment();

// "3 machines: 2 running, 1 stopped" ("0 machines", "1 machine: 1 defined"): running and paused
// first, then the other states by name; states without machines are left out.
std::string machine_count_status(const std::map<std::string, std::size_t>& counts);

// The notifications of one qmachined. Owned by main; used from the loop thread only. Sends are
// non-blocking datagrams: one the manager's queue has no room for is dropped, and the first
// failure is logged at debug (never an error: a notification must not take the daemon down).
// Without a socket every call is a no-op and no timer runs.
class Notifier
{
public:
    struct Options
    {
        // The least time between two STATUS= updates from status_changed().
        std::chrono::milliseconds status_interval = 1s;
    };

    Notifier(asio::io_context& ioc, NotifyEnvironment env, Options options);
    Notifier(asio::io_context& ioc, NotifyEnvironment env) : Notifier(ioc, std::move(env), {}) {}
    ~Notifier();
    Notifier(const Notifier&) = delete;
    Notifier& operator=(const Notifier&) = delete;

    bool enabled() const noexcept { return fd_ >= 0; }

    // Starts WATCHDOG=1 every watchdog_period (when the manager asked for it): from the loop, so
    // a loop that hangs stops the keep-alives and the manager acts.
    void start_watchdog();
    // Where status_changed() reads the current STATUS= text from.
    void set_status_source(std::function<std::string()> source);
    // The status may have changed: the source is read and sent if its text differs from the last
    // one sent, at once or, within status_interval of the last send, at the end of it (so a burst
    // of changes is one datagram). Nothing before ready() or stopping().
    void status_changed();
    // READY=1 with STATUS=status.
    void ready(const std::string& status);
    // STOPPING=1 with STATUS=status. Later status_changed() calls still send (the shutdown's
    // progress), from the same source.
    void stopping(const std::string& status);
    // One STATUS= line now.
    void status(const std::string& status);

    // Datagrams sent (tests, debug).
    std::uint64_t sent() const noexcept { return sent_; }

private:
    void send(std::string message);
    void arm_watchdog();
    void flush_status();

    asio::io_context& ioc_;
    NotifyEnvironment env_;
    Options options_;
    int fd_ = -1;
    std::string address_; // the sockaddr_un bytes
    bool reporting_ = false; // ready() or stopping() was sent: status changes are news
    bool logged_failure_ = false;
    std::uint64_t sent_ = 0;
    std::function<std::string()> source_;
    std::string last_status_;
    std::chrono::steady_clock::time_point last_status_at_{};
    bool status_pending_ = false;
    asio::steady_timer status_timer_;
    asio::steady_timer watchdog_timer_;
    std::shared_ptr<int> life_ = std::make_shared<int>(0);
};

} // namespace qm::daemon
