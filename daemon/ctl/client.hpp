// SPDX-License-Identifier: GPL-2.0-or-later
// qmachinectl's HTTP client: requests to qmachined's REST API over the unix socket or TCP (with the
// bearer token), the event stream (Server-Sent Events) and the console WebSocket.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "daemon/rest/beast_websocket.hpp"
#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"

namespace qm::ctl {

// Where qmachined is: a unix socket, or a TCP host and port with the bearer token.
struct Endpoint
{
    std::string unix_path; // set: the unix socket
    std::string host;      // otherwise TCP
    std::string port;
    std::string token; // TCP only: sent as "Authorization: Bearer <token>"
    // "/run/qmachined/qmachined.sock" or "http://127.0.0.1:8080", for messages.
    std::string describe() const;
};

// "http://HOST:PORT" (also "http://[::1]:8080", a trailing '/'; port 80 when left out) to an
// endpoint. errc::invalid_argument for anything else (https, a path).
expected<Endpoint> parse_url(std::string_view url);

// One HTTP answer of qmachined.
struct Response
{
    unsigned status = 0;
    std::string body;
    std::string content_type;
    std::string etag;

    bool ok() const { return status >= 200 && status < 300; }
};

// What a problem (RFC 9457) says, or what the answer was when it is not one: "no machine named
// 'web1'", "HTTP 502 Bad Gateway".
std::string problem_detail(const Response& r);
// The problem's name ("NoSuchMachine", from urn:qmachined:error:NAME); empty when it is not one.
std::string problem_name(const Response& r);

using Socket = asio::generic::stream_protocol::socket;
using WebSocket = rest::websocket::stream<Socket>;

// The client of one qmachinectl run: each request on a connection of its own (a command makes one
// or two). Single-threaded; every call blocks until its answer. Failures of its expected<> results
// are the transport's only (errc::connect_failed: qmachined cannot be reached or the connection
// broke; its message names the endpoint): an HTTP error is a Response.
class Client
{
public:
    explicit Client(Endpoint endpoint);

    asio::io_context& io() { return ioc_; }
    const Endpoint& endpoint() const { return endpoint_; }

    // `body` is sent as application/json when not empty; `if_match` as If-Match when not empty.
    expected<Response> request(std::string_view method, std::string_view target,
                               std::string body = {}, std::string if_match = {});

    // GET `target` as a Server-Sent Events stream: `on_data` gets the body's bytes as they come
    // (any split). Returns the non-2xx answer when the daemon refused, and a 200 with an empty
    // body when the stream ended: the daemon closed it, `idle` (when set) passed without a byte
    // after the first ones, or stop() was called (a signal handler on io()).
    expected<Response> stream(std::string_view target,
                              const std::function<void(std::string_view)>& on_data,
                              std::optional<std::chrono::milliseconds> idle = std::nullopt);

    // Connects and opens the WebSocket at `target`. When the daemon refuses the upgrade, the
    // answer is in `refused` (its status is non-zero) and the result is null.
    expected<std::unique_ptr<WebSocket>> websocket(std::string_view target, Response& refused);

    // Ends a stream() in progress (from a handler on io()).
    void stop();

private:
    expected<std::unique_ptr<Socket>> connect();
    Error transport_error(const error_code& ec, std::string_view what) const;

    Endpoint endpoint_;
    asio::io_context ioc_{1};
    Socket* streaming_ = nullptr; // the stream() in progress
    bool stopped_ = false;
};

} // namespace qm::ctl
