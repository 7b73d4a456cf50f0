// SPDX-License-Identifier: GPL-2.0-or-later
// Monitor addresses (a unix socket path or TCP host:port) and the listening socket of the seed's
// way round, where the client listens and QEMU connects.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"

namespace qm::qmp {

using Socket = asio::generic::stream_protocol::socket;

// Where a QMP monitor is: a unix socket path, or a TCP host and port (as the seed's
// monitor_address accepts a path or a (host, port) pair).
struct Address
{
    enum class Kind { unix_path, tcp };

    Kind kind = Kind::unix_path;
    std::string path;  // Kind::unix_path
    std::string host;  // Kind::tcp: a numeric IPv4/IPv6 address or a host name
    std::uint16_t port = 0;

    static Address unix_socket(std::string path);
    static Address tcp(std::string host, std::uint16_t port);
    // "unix:/path", "/path" or "./path" (a unix socket), "host:port", "[v6addr]:port".
    static expected<Address> parse(std::string_view text);

    std::string to_string() const;
    // The address options of a QEMU -chardev socket: "path=/x" or "host=h,port=p".
    std::string chardev_options() const;
};

// A listening monitor socket. Owns the socket and, for a unix path, the socket file: close() and
// the destructor remove it. Loop thread only. Errors: errc::connect_failed (bind/listen/accept),
// errc::timeout (accept), errc::invalid_argument (path too long).
class Listener
{
public:
    static expected<Listener> open(const asio::any_io_executor& ex, const Address& address);

    Listener(Listener&&) noexcept;
    Listener& operator=(Listener&&) noexcept;
    Listener(const Listener&) = delete;
    Listener& operator=(const Listener&) = delete;
    ~Listener();

    // The bound address (with the real port when port 0 was asked for).
    const Address& address() const noexcept { return address_; }

    // Accepts one connection. Coroutine: the Listener must outlive it.
    awaitable<expected<Socket>> accept(std::chrono::milliseconds timeout);

    void close();
    // Gives up the listening socket: returns its descriptor (the caller owns it, O_CLOEXEC) and
    // no longer owns the socket file (close() and the destructor leave it). For a monitor that
    // QEMU serves on a socket bound here (-chardev socket,fd=N,server=on). -1 when closed.
    int release();

private:
    explicit Listener(const asio::any_io_executor& ex);

    asio::basic_socket_acceptor<asio::generic::stream_protocol> acceptor_;
    Address address_;
};

// Connects to a monitor that QEMU serves. errc::connect_failed or errc::timeout.
awaitable<expected<Socket>> connect_socket(Address address, std::chrono::milliseconds timeout);

} // namespace qm::qmp
