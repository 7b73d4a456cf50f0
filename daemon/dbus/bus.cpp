// SPDX-License-Identifier: GPL-2.0-or-later
// The sd-bus connection on the asio loop.
#include "daemon/dbus/bus.hpp"

#include <fcntl.h>
#include <poll.h>
#include <time.h>
#include <unistd.h>

#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace qm::dbus {

BusAddress BusAddress::parse(const std::string& text)
{
    BusAddress a;
    if (text == "system") {
        a.kind = Kind::system;
    } else if (text == "user") {
        a.kind = Kind::user;
    } else {
        a.kind = Kind::address;
        a.address = text;
    }
    return a;
}

std::string BusAddress::describe() const
{
    switch (kind) {
    case Kind::system: return "the system bus";
    case Kind::user: return "the user bus";
    case Kind::address: return "the bus at '" + address + "'";
    }
    return "?";
}

expected<std::unique_ptr<Bus>> Bus::open(asio::io_context& ioc, const BusAddress& address)
{
    sd_bus* bus = nullptr;
    int r = 0;
    switch (address.kind) {
    case BusAddress::Kind::system:
        r = sd_bus_open_system_with_description(&bus, "qmachined");
        break;
    case BusAddress::Kind::user:
        r = sd_bus_open_user_with_description(&bus, "qmachined");
        break;
    case BusAddress::Kind::address:
        r = sd_bus_new(&bus);
        if (r >= 0) {
            r = sd_bus_set_address(bus, address.address.c_str());
        }
        if (r >= 0) {
            r = sd_bus_set_bus_client(bus, 1);
        }
        if (r >= 0) {
            r = sd_bus_set_description(bus, "qmachined");
        }
        if (r >= 0) {
            r = sd_bus_start(bus);
        }
        break;
    }
    if (r < 0) {
        sd_bus_unref(bus);
        return fail(errc::connect_failed, fmt::format("cannot connect to {}: {}",
                                                      address.describe(), std::strerror(-r)));
    }
    const int fd = sd_bus_get_fd(bus);
    const int own = fd < 0 ? -1 : ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (own < 0) {
        sd_bus_unref(bus);
        return fail(errc::connect_failed, fmt::format("cannot watch {}: {}", address.describe(),
                                                      std::strerror(fd < 0 ? -fd : errno)));
    }
    auto b = std::unique_ptr<Bus>(new Bus(ioc, bus, own));
    b->process(); // the authentication and Hello may already have something to do
    return b;
}

Bus::Bus(asio::io_context& ioc, sd_bus* bus, int fd)
    : ioc_(ioc), bus_(bus), fd_(ioc, fd), timer_(ioc)
{}

Bus::~Bus()
{
    close();
}

void Bus::close()
{
    if (closed_) {
        return;
    }
    closed_ = true;
    error_code ec;
    fd_.cancel(ec);
    fd_.close(ec);
    timer_.cancel();
    // Whatever is still queued is dropped: sd_bus_flush() would block the loop.
    sd_bus_close_unref(bus_);
    bus_ = nullptr;
}

void Bus::process()
{
    if (closed_) {
        return;
    }
    for (;;) {
        const int r = sd_bus_process(bus_, nullptr);
        if (r < 0) {
            spdlog::error("D-Bus: the connection failed: {}", std::strerror(-r));
            close();
            return;
        }
        if (r == 0) {
            break;
        }
    }
    arm();
}

void Bus::schedule()
{
    if (scheduled_ || closed_) {
        return;
    }
    scheduled_ = true;
    asio::post(ioc_, [this, life = std::weak_ptr<int>(life_)] {
        if (life.expired()) {
            return;
        }
        scheduled_ = false;
        process();
    });
}

void Bus::arm()
{
    const int events = sd_bus_get_events(bus_);
    if (events < 0) {
        return; // closed
    }
    std::weak_ptr<int> life = life_;
    if ((events & POLLIN) != 0 && !reading_) {
        reading_ = true;
        fd_.async_wait(asio::posix::descriptor_base::wait_read, [this, life](error_code ec) {
            if (life.expired()) {
                return;
            }
            reading_ = false;
            if (!ec) {
                process();
            }
        });
    }
    if ((events & POLLOUT) != 0 && !writing_) {
        writing_ = true;
        fd_.async_wait(asio::posix::descriptor_base::wait_write, [this, life](error_code ec) {
            if (life.expired()) {
                return;
            }
            writing_ = false;
            if (!ec) {
                process();
            }
        });
    }
    // sd-bus's timeout is an absolute CLOCK_MONOTONIC time in µs (UINT64_MAX: none), the clock
    // of steady_clock on Linux.
    std::uint64_t usec = 0;
    if (sd_bus_get_timeout(bus_, &usec) >= 0 && usec != UINT64_MAX) {
        timespec now{};
        ::clock_gettime(CLOCK_MONOTONIC, &now);
        const auto now_us = static_cast<std::uint64_t>(now.tv_sec) * 1000000 +
                            static_cast<std::uint64_t>(now.tv_nsec) / 1000;
        const auto wait = std::chrono::microseconds(usec > now_us ? usec - now_us : 0);
        timer_.expires_after(wait);
        timer_.async_wait([this, life](error_code ec) {
            if (!ec && !life.expired()) {
                process();
            }
        });
    }
}

void Bus::request_name(const std::string& name)
{
    const int r = sd_bus_request_name_async(
        bus_, nullptr, name.c_str(), 0,
        [](sd_bus_message* m, void*, sd_bus_error*) -> int {
            const sd_bus_error* e = sd_bus_message_get_error(m);
            if (e != nullptr) {
                spdlog::error("D-Bus: cannot own the bus name: {} ({})",
                              e->message != nullptr ? e->message : "",
                              e->name != nullptr ? e->name : "");
                return 0;
            }
            // RequestName's answer: 1 primary owner, 2 queued, 3 exists, 4 already the owner.
            std::uint32_t code = 0;
            (void)sd_bus_message_read(m, "u", &code);
            if (code == 1 || code == 4) {
                spdlog::info("D-Bus: the bus name is ours");
            } else {
                spdlog::error("D-Bus: the bus name is owned by another process (answer {}): "
                              "D-Bus is not served, REST goes on", code);
            }
            return 0;
        },
        nullptr);
    if (r < 0) {
        spdlog::error("D-Bus: cannot ask for the name '{}': {}", name, std::strerror(-r));
    }
    schedule();
}

} // namespace qm::dbus
