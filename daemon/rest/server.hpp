// SPDX-License-Identifier: GPL-2.0-or-later
// The REST server: the unix socket (and optional loopback TCP) listeners, one session coroutine per
// connection (HTTP/1.1 keep-alive, limits, read deadlines, bearer tokens on TCP), requests handed
// to the Api.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <sys/types.h>

#include "daemon/metrics.hpp"
#include "daemon/rest/api.hpp"
#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"

namespace qm::rest {

using namespace std::chrono_literals;

struct ServerOptions
{
    // The unix socket (mode 0660); empty: none.
    std::string unix_path;
    // Its group (the admin group qmachined of a root daemon); nullopt: the daemon's.
    std::optional<gid_t> unix_group;
    // The TCP listener; nullopt: none. Every request on it needs the bearer token.
    std::optional<asio::ip::tcp::endpoint> tcp;
    // Listening sockets a service manager passed (socket activation), used instead of binding
    // unix_path and tcp: the server neither binds nor removes them (the manager owns the file).
    // -1: none. The server owns them from construction.
    int unix_fd = -1;
    int tcp_fd = -1;
    std::string token;
    // Open connections at most, for each listener (the unix socket and TCP count apart).
    std::size_t max_connections = 1024;
    std::size_t max_body = 1024 * 1024;
    std::size_t max_header = 16 * 1024;
    // From the first byte of a request (or the end of the previous one, on a kept-alive
    // connection) to its last; also the bound of writing a response.
    std::chrono::milliseconds request_timeout = 30s;
    std::string server_header = "qmachined";
};

// Owned by the daemon; loop thread only; holds the Api and the metrics registry by reference (they
// outlive the server), and counts every response it sends in the registry (requests by route and
// status, their latency, open connections). listen() fails with errc::system_error naming the
// address and errno's text.
class Server
{
public:
    Server(asio::io_context& ioc, Api& api, ServerOptions options, daemon::Registry& metrics);
    ~Server();
    Server(const Server&) = delete;
    Server& operator=(const Server&) = delete;

    // Binds and listens, or accepts on the passed sockets. The unix socket appears at its path
    // only once it accepts (bound under a temporary name, then renamed), replacing a stale one of
    // a previous daemon.
    expected<void> listen();
    // The port the TCP listener got (for port 0), 0 without one.
    std::uint16_t tcp_port() const noexcept;
    // From now on responses carry `Connection: close`.
    void drain() noexcept { draining_ = true; }
    // Stops accepting, removes the unix socket (unless the manager passed it) and closes every
    // connection.
    void close();

    std::size_t connections() const noexcept { return sessions_.size(); }

private:
    template <class Protocol>
    awaitable<void> accept_loop(typename Protocol::acceptor& acceptor, bool needs_token);
    template <class Protocol>
    awaitable<void> session(typename Protocol::socket socket, bool needs_token, std::uint64_t id);
    template <class Protocol>
    awaitable<void> refuse(typename Protocol::socket socket);
    bool authorized(std::string_view header) const noexcept;
    // One response sent: its route's label ("machine.start", "unmatched") and status, and for a
    // request the Api answered, how long it took.
    void count_response(std::string_view route, int status,
                        std::optional<double> seconds = std::nullopt);

    asio::io_context& ioc_;
    Api& api_;
    ServerOptions options_;
    std::optional<asio::local::stream_protocol::acceptor> unix_acceptor_;
    std::optional<asio::ip::tcp::acceptor> tcp_acceptor_;
    // Each open connection: how to close it, and the deadline of its read or write in progress.
    struct Slot
    {
        std::function<void()> close;   // cancel and close the socket
        std::function<void()> expire;  // the deadline passed: flag it, cancel the socket
        std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max();
        bool tcp = false; // came through the TCP listener
    };
    // Drops the session's slot (and its count).
    void forget(std::uint64_t id);
    // One timer for every connection's deadline (a per-request timer reprogrammed the loop's
    // timerfd three times per request; rest-bench measured it). It runs only while connections
    // are open, every sweep_period(); deadlines are kept to within that period.
    awaitable<void> sweep();
    std::chrono::milliseconds sweep_period() const noexcept;
    void set_deadline(std::uint64_t id, std::chrono::milliseconds timeout);
    void clear_deadline(std::uint64_t id);

    // The HTTP series of one route (routes() in order, then "unmatched"): its requests by status,
    // in the order first seen (a route answers few distinct statuses: a scan is cheapest), and
    // the latency of those that reached the Api (null until the first).
    struct RouteMeters
    {
        std::string_view route;
        std::vector<std::pair<int, daemon::Counter*>> by_status;
        daemon::Histogram* seconds = nullptr;
    };
    RouteMeters& meters(std::string_view route) noexcept;

    daemon::Registry& metrics_;
    std::vector<RouteMeters> route_meters_;
    std::uint64_t collector_ = 0;
    std::map<std::uint64_t, Slot> sessions_;
    // Of sessions_, those of the TCP listener: each listener has max_connections of its own, so
    // clients of the port (who may not even hold the token) cannot take the unix socket's.
    std::size_t tcp_sessions_ = 0;
    asio::steady_timer sweep_timer_;
    bool sweeping_ = false;
    std::uint64_t next_session_ = 1;
    bool draining_ = false;
    bool closed_ = false;
    bool passed_unix_ = false; // the unix socket came from the service manager: not ours to remove
    std::shared_ptr<int> life_ = std::make_shared<int>(0);
};

// Whether two secrets are equal, in time that depends only on their lengths (not on where they
// differ).
bool constant_time_equal(std::string_view a, std::string_view b) noexcept;

// The token in `path` (first line, trimmed); when the file does not exist, a new random one
// (32 bytes from getrandom, hex) written there with mode 0600. errc::system_error when it cannot be
// read or written, errc::invalid_argument when it is empty or readable by others.
expected<std::string> load_or_create_token(const std::string& path);

} // namespace qm::rest
