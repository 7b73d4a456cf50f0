// SPDX-License-Identifier: GPL-2.0-or-later
// Streaming answers: a request whose answer is a stream (Server-Sent Events, a WebSocket) takes
// the connection over from the session; the Server-Sent Events writer of the daemon's events.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "daemon/rest/beast.hpp"
#include "daemon/supervisor/events.hpp"
#include "libmachine/asio.hpp"

namespace qm::rest {

using namespace std::chrono_literals;

// The connection a streaming answer takes over once its request is read: the socket (the unix
// socket's or TCP's, as one type), the bytes already read past the request, and the request (a
// WebSocket handshake answers it). Owned by the session, which closes the socket when the server
// closes; the stream's coroutine ends when its reads or writes fail.
struct StreamConnection
{
    asio::generic::stream_protocol::socket socket;
    beast::flat_buffer buffer;
    http::request<http::string_body> request;
    std::string server_header;
    // Set by the stream: how it ends cleanly when the server closes (the daemon is going down).
    // Without it the server closes the socket.
    std::function<void()> stop;
};

struct EventStreamOptions
{
    // A comment line after this long without an event, so that proxies and clients see the
    // stream alive (and a dead client is found by the write failing).
    std::chrono::milliseconds keep_alive = 15s;
    // The longest a write may take: a client that stops reading is dropped after it (its
    // subscription reports the lag before, on its own queue).
    std::chrono::milliseconds write_timeout = 30s;
    // Events waiting in the subscription are sent together, up to about this many bytes.
    std::size_t batch_bytes = 64 * 1024;
};

// One event as a Server-Sent Events message: "id: SEQ\nevent: NAME\ndata: JSON\n\n". A lag
// notice is "event: lagged" with {"first_missing", "resume_seq"} and no id (the client's last id
// stays the last event it got, so that a reconnect resumes from the ring when it still can).
std::string sse_message(const daemon::StreamItem& item);

// Serves `subscription` as a Server-Sent Events stream (HTTP/1.1 chunked) until the client goes,
// the subscription ends (the daemon shuts down) or a write times out. The first chunk is a comment
// line saying the subscription started, sent at once.
awaitable<void> serve_events(StreamConnection& c, std::shared_ptr<daemon::Subscription> subscription,
                             EventStreamOptions options);

} // namespace qm::rest
