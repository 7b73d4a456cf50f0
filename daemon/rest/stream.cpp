// SPDX-License-Identifier: GPL-2.0-or-later
// The Server-Sent Events stream of the daemon's events (WHATWG HTML, "Server-sent events").
#include "daemon/rest/stream.hpp"

#include <array>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "libmachine/deadline.hpp"
#include "libmachine/json.hpp"

namespace qm::rest {

namespace {

// One HTTP/1.1 chunk (RFC 9112 7.1) holding `data`.
std::string chunk(std::string_view data)
{
    return fmt::format("{:x}\r\n{}\r\n", data.size(), data);
}

// Writes `bytes` within the deadline; false when the client is gone or too slow.
awaitable<bool> write_all(StreamConnection& c, std::string bytes, std::chrono::milliseconds timeout)
{
    Deadline deadline(c.socket.get_executor(), timeout, [&c] {
        error_code ignored;
        c.socket.cancel(ignored);
    });
    error_code ec;
    co_await asio::async_write(c.socket, asio::buffer(bytes), use_ec(ec));
    co_return !ec;
}

// Reads (and drops) whatever the client sends until it closes: then the subscription ends, so
// that a client that went away is noticed at once, not at the next write.
awaitable<void> watch_client(StreamConnection& c, std::shared_ptr<daemon::Subscription> subscription,
                             std::shared_ptr<bool> done, std::shared_ptr<asio::steady_timer> finished)
{
    std::array<char, 512> scratch{};
    error_code ec;
    while (!ec) {
        co_await c.socket.async_read_some(asio::buffer(scratch), use_ec(ec));
    }
    subscription->close();
    *done = true;
    finished->cancel();
}

} // namespace

std::string sse_message(const daemon::StreamItem& item)
{
    if (!item.event.valid()) {
        return fmt::format("event: lagged\ndata: {{\"first_missing\":{},\"resume_seq\":{}}}\n\n",
                           item.lagged_from, item.resume_seq);
    }
    // The JSON is compact (no newline in it), so one data line carries it.
    return fmt::format("id: {}\nevent: {}\ndata: {}\n\n", item.event.seq(), item.event.name(),
                       item.event.to_json());
}

awaitable<void> serve_events(StreamConnection& c, std::shared_ptr<daemon::Subscription> subscription,
                             EventStreamOptions options)
{
    auto ex = c.socket.get_executor();
    // The header and the first comment at once: the client knows it is subscribed (and from
    // which point on) before any event comes.
    std::string head = fmt::format("HTTP/1.1 200 OK\r\n"
                                   "Server: {}\r\n"
                                   "Content-Type: text/event-stream\r\n"
                                   "Cache-Control: no-store\r\n"
                                   "X-Accel-Buffering: no\r\n"
                                   "Transfer-Encoding: chunked\r\n"
                                   "Connection: close\r\n\r\n",
                                   c.server_header);
    head += chunk(": subscribed\n\n");
    const bool started = co_await write_all(c, std::move(head), options.write_timeout);
    if (!started) {
        subscription->close();
        co_return;
    }
    // The server closing ends the subscription: the stream then ends with its last chunk.
    c.stop = [subscription] { subscription->close(); };
    auto done = std::make_shared<bool>(false);
    auto finished = std::make_shared<asio::steady_timer>(ex);
    asio::co_spawn(ex, watch_client(c, subscription, done, finished),
                   [](const std::exception_ptr& e) {
                       if (e) {
                           spdlog::error("Failed to watch an event stream's client: {}",
                                         describe_exception(e));
                       }
                   });
    bool client_gone = false; // a write failed
    for (;;) {
        // Closed by the watcher (the client went) or by stop (the server closes): an error.
        auto item = co_await subscription->next(options.keep_alive);
        std::string batch;
        if (!item) {
            if (!item.error().is(errc::timeout)) {
                break;
            }
            batch = ": keep-alive\n\n";
        } else {
            batch = sse_message(*item);
            while (batch.size() < options.batch_bytes) {
                auto more = subscription->try_next();
                if (!more) {
                    break;
                }
                batch += sse_message(*more);
            }
        }
        std::string bytes = chunk(batch);
        const bool written = co_await write_all(c, std::move(bytes), options.write_timeout);
        if (!written) {
            client_gone = true;
            break;
        }
    }
    const bool clean_end = !client_gone && !*done; // the daemon ends it, not the client
    spdlog::debug("REST event stream ends ({})", clean_end ? "by the daemon" : "by the client");
    if (clean_end) {
        std::string last = "0\r\n\r\n"; // the last chunk: a clean end for the client
        co_await write_all(c, std::move(last), 1s);
    }
    c.stop = nullptr;
    subscription->close();
    // The watcher reads from the socket this frame's caller owns: it ends before we return.
    error_code ignored;
    c.socket.shutdown(asio::socket_base::shutdown_both, ignored);
    c.socket.cancel(ignored);
    while (!*done) {
        finished->expires_at(asio::steady_timer::time_point::max());
        co_await finished->async_wait(use_ec(ignored));
    }
}

} // namespace qm::rest
