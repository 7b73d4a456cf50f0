// SPDX-License-Identifier: GPL-2.0-or-later
// An sd-bus connection driven by the daemon's asio loop: the bus fd watched for the events sd-bus
// asks for, its timeout on a timer, no thread of its own and never a blocking flush.
#pragma once

#include <systemd/sd-bus.h>

#include <memory>
#include <string>

#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"

namespace qm::dbus {

// Which bus: the system bus, the user's session bus, or an address ("unix:path=/run/x").
struct BusAddress
{
    enum class Kind { system, user, address };
    Kind kind = Kind::system;
    std::string address;

    // "system", "user" or an address; "none" is the caller's business.
    static BusAddress parse(const std::string& text);
    std::string describe() const;
};

// Owned by the D-Bus front end; loop thread only. Every sd-bus callback runs inside process(),
// on the loop. Whoever queues a message outside a callback (a reply sent later, a signal)
// calls schedule(): sd-bus writes it when the fd is writable. errc::connect_failed from open().
class Bus
{
public:
    static expected<std::unique_ptr<Bus>> open(asio::io_context& ioc, const BusAddress& address);
    ~Bus();
    Bus(const Bus&) = delete;
    Bus& operator=(const Bus&) = delete;

    sd_bus* get() const noexcept { return bus_; }
    // Runs sd_bus_process() until it has nothing left, then waits again for what sd-bus wants.
    void process();
    // process() soon (coalesced): after a reply or a signal queued outside a callback.
    void schedule();
    // Asks for `name` without waiting; the outcome is logged (another owner: an error, REST goes
    // on).
    void request_name(const std::string& name);
    // Drops the connection (the daemon is going down): pending replies are lost.
    void close();

private:
    Bus(asio::io_context& ioc, sd_bus* bus, int fd);
    void arm();

    asio::io_context& ioc_;
    sd_bus* bus_;
    asio::posix::stream_descriptor fd_;
    asio::steady_timer timer_;
    bool reading_ = false;
    bool writing_ = false;
    bool scheduled_ = false;
    bool closed_ = false;
    std::shared_ptr<int> life_ = std::make_shared<int>(0);
};

} // namespace qm::dbus
