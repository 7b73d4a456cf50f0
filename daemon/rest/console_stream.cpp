// SPDX-License-Identifier: GPL-2.0-or-later
// The console WebSocket (RFC 6455): one coroutine sends the output and every frame qmachined
// writes (Beast allows one writer), another reads the client's messages.
#include "daemon/rest/console_stream.hpp"

#include <optional>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "daemon/rest/beast_websocket.hpp"
#include "daemon/rest/problem.hpp"
#include "daemon/supervisor/console_session.hpp"
#include "libmachine/deadline.hpp"

namespace qm::rest {

namespace {

using Socket = asio::generic::stream_protocol::socket;
using WebSocket = websocket::stream<Socket&>;

// What the two sides of one console WebSocket share.
struct Shared
{
    explicit Shared(const asio::any_io_executor& ex)
        : finished(ex)
    {}
    // The reading side ended (the client closed, or the connection broke, or it wants to close).
    bool input_done = false;
    // The client is gone, or it closed: nothing more is written.
    bool client_gone = false;
    // The server closes (qmachined goes down).
    bool stopping = false;
    // The reading side asks the writing side to close with this.
    std::optional<websocket::close_reason> close;
    // Cancelled when the reading side ends.
    asio::steady_timer finished;
};

websocket::close_reason make_reason(ConsoleClose code, std::string_view text)
{
    websocket::close_reason r;
    r.code = static_cast<std::uint16_t>(code);
    const std::string cut = close_reason_text(text);
    r.reason.assign(cut.data(), cut.size());
    return r;
}

// Sets the Server header, and turns a handshake Beast refuses into a problem like every other
// error of the API (Beast writes its error's message as plain text).
struct Decorate
{
    std::string server;

    void operator()(websocket::response_type& res) const
    {
        res.set(http::field::server, server);
        if (res.result() == http::status::switching_protocols) {
            return;
        }
        const bool version = res.result() == http::status::upgrade_required;
        Problem p = version ? make_problem(HttpProblem::upgrade_required,
                                           "Sec-WebSocket-Version must be 13 (RFC 6455 4.4)")
                            : make_problem(errc::invalid_argument,
                                           "not a WebSocket handshake (RFC 6455 4.2.1): " +
                                               std::string(res.body()));
        if (version) {
            res.set(http::field::upgrade, "websocket");
            res.set(http::field::connection, "Upgrade");
        }
        res.set(http::field::content_type, std::string(problem_media_type));
        res.body() = problem_body(p);
        res.keep_alive(false); // the session closes the connection after a stream
        res.prepare_payload();
    }
};

void configure(WebSocket& ws, const std::string& server, const ConsoleStreamOptions& options)
{
    websocket::stream_base::timeout timeouts{};
    timeouts.handshake_timeout = options.close_timeout;
    timeouts.idle_timeout = options.idle_timeout;
    timeouts.keep_alive_pings = true;
    ws.set_option(timeouts);
    ws.set_option(websocket::stream_base::decorator(Decorate{server}));
    ws.read_message_max(options.max_input);
    ws.auto_fragment(false);
}

// Sends one message within `timeout`; false when the client is gone or too slow (then the socket
// is cancelled: a frame half written cannot be followed by anything).
awaitable<bool> send(WebSocket& ws, std::string bytes, bool text, std::chrono::milliseconds timeout)
{
    Socket& socket = ws.next_layer();
    Deadline deadline(socket.get_executor(), timeout, [&socket] {
        error_code ignored;
        socket.cancel(ignored);
    });
    ws.text(text);
    error_code ec;
    co_await ws.async_write(asio::buffer(bytes), use_ec(ec));
    if (deadline.expired()) {
        spdlog::debug("REST console: a client took more than {} ms to take a message: dropped",
                      timeout.count());
    }
    co_return !ec;
}

// Reads the client's messages until it closes or goes, or breaks the rules: a writer's go to the
// console, one at a time; a reader's end the stream (1008).
awaitable<void> console_input(WebSocket& ws, std::shared_ptr<daemon::ConsoleSession> session,
                              std::shared_ptr<Shared> shared)
{
    beast::flat_buffer in;
    for (;;) {
        error_code ec;
        co_await ws.async_read(in, use_ec(ec));
        if (ec) {
            // websocket::error::closed: the client closed (Beast answered its close frame).
            // Anything else: the connection broke, or Beast failed it (1009, 1007, the idle
            // timeout) and closed it itself.
            shared->client_gone = true;
            // Its place is free at once: the client may already be connecting again to write.
            session->release_writer();
            spdlog::debug("REST console of '{}': the client's side ended: {}", session->machine(),
                          ec.message());
            break;
        }
        if (!session->is_writer()) {
            shared->close = make_reason(ConsoleClose::read_only,
                                        "this client only reads the console (connect with "
                                        "?mode=write to write)");
            break;
        }
        std::string bytes = beast::buffers_to_string(in.data());
        in.consume(in.size());
        auto written = co_await session->write(std::move(bytes));
        if (!written) {
            // The console ended: the output side says so once it sent what is left.
            spdlog::debug("REST console of '{}': {}", session->machine(), written.error().message);
            shared->input_done = true;
            shared->finished.cancel();
            co_return;
        }
    }
    shared->input_done = true;
    shared->finished.cancel();
    session->reader().cancel(); // wakes the output side
}

} // namespace

std::string close_reason_text(std::string_view reason)
{
    constexpr std::size_t max = 123;
    if (reason.size() <= max) {
        return std::string(reason);
    }
    std::size_t n = max;
    // Back to the first byte of a UTF-8 sequence (continuation bytes are 10xxxxxx).
    while (n > 0 && (static_cast<unsigned char>(reason[n]) & 0xC0) == 0x80) {
        --n;
    }
    return std::string(reason.substr(0, n));
}

awaitable<void> serve_console(StreamConnection& c, std::shared_ptr<daemon::ConsoleSession> session,
                              ConsoleStreamOptions options)
{
    auto ex = c.socket.get_executor();
    WebSocket ws(c.socket);
    configure(ws, c.server_header, options);
    error_code ec;
    // The client sends frames only once it has the 101 (RFC 6455 4.1), so c.buffer holds none.
    co_await ws.async_accept(c.request, use_ec(ec));
    if (ec) {
        spdlog::debug("REST console of '{}': no WebSocket: {}", session->machine(), ec.message());
        co_return;
    }
    spdlog::debug("REST console of '{}': a {} attached", session->machine(),
                  session->is_writer() ? "writer" : "reader");
    auto shared = std::make_shared<Shared>(ex);
    // The server closing: the output side wakes up and closes with 1001.
    c.stop = [shared, session] {
        shared->stopping = true;
        session->reader().cancel();
    };
    asio::co_spawn(ex, console_input(ws, session, shared), [](const std::exception_ptr& e) {
        if (e) {
            spdlog::error("Failed to read a console WebSocket: {}", describe_exception(e));
        }
    });

    std::optional<websocket::close_reason> close;
    for (;;) {
        auto chunk = co_await session->reader().next(options.message_bytes);
        if (!chunk) {
            // Cancelled by one of the others (they say how to close), or the console ended.
            if (shared->close) {
                close = shared->close;
            } else if (shared->stopping) {
                close = make_reason(ConsoleClose::shutting_down, "qmachined is shutting down");
            } else if (!shared->client_gone) {
                close = make_reason(ConsoleClose::ended,
                                    "console ended: " + session->why_ended());
            }
            break;
        }
        if (chunk->lost > 0) {
            std::string notice =
                fmt::format(R"({{"lost":{},"offset":{}}})", chunk->lost, chunk->offset);
            const bool sent = co_await send(ws, std::move(notice), true, options.write_timeout);
            if (!sent) {
                shared->client_gone = true;
                break;
            }
        }
        const bool sent = co_await send(ws, std::move(chunk->bytes), false, options.write_timeout);
        if (!sent) {
            shared->client_gone = true;
            break;
        }
    }
    c.stop = nullptr;
    if (close && !shared->client_gone && ws.is_open()) {
        spdlog::debug("REST console of '{}': closing ({}: {})", session->machine(), close->code,
                      std::string(close->reason.data(), close->reason.size()));
        // Beast waits for the client's close frame at most close_timeout (handshake_timeout).
        co_await ws.async_close(*close, use_ec(ec));
    }
    // The reading side reads from this frame's stream: it ends before we return. (A writer's
    // message still on its way to the console ends with the console at the latest.)
    error_code ignored;
    c.socket.shutdown(asio::socket_base::shutdown_both, ignored);
    c.socket.cancel(ignored);
    while (!shared->input_done) {
        shared->finished.expires_at(asio::steady_timer::time_point::max());
        co_await shared->finished.async_wait(use_ec(ignored));
    }
    session->reader().cancel();
    session->release_writer();
}

awaitable<void> refuse_console(StreamConnection& c, ConsoleClose code, std::string reason,
                               ConsoleStreamOptions options)
{
    WebSocket ws(c.socket);
    configure(ws, c.server_header, options);
    error_code ec;
    co_await ws.async_accept(c.request, use_ec(ec));
    if (ec) {
        co_return;
    }
    const websocket::close_reason why = make_reason(code, reason);
    co_await ws.async_close(why, use_ec(ec));
}

} // namespace qm::rest
