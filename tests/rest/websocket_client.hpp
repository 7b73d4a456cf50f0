// SPDX-License-Identifier: GPL-2.0-or-later
// A WebSocket client for the REST tests (Beast, on the daemon's unix socket), driven on the test's
// loop with a deadline on every step: the console's bytes and notices as they come, and the close
// code and reason the daemon ends with.
#pragma once

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "daemon/rest/beast_websocket.hpp"
#include "libmachine/asio.hpp"
#include "tests/support/loop.hpp"

namespace qm::test {

namespace beast = rest::beast;
namespace websocket = rest::websocket;

// One client connection. Once open(), it reads every message until the connection ends. Test
// thread only; `ioc` outlives it.
class WebSocketClient
{
public:
    using Socket = asio::generic::stream_protocol::socket;

    WebSocketClient(asio::io_context& ioc, const std::filesystem::path& unix_path)
        : ioc_(ioc)
        , ws_(ioc)
    {
        const asio::local::stream_protocol::endpoint ep(unix_path.string());
        ws_.next_layer().connect(asio::generic::stream_protocol::endpoint(ep), error_);
    }
    ~WebSocketClient()
    {
        // The read in progress refers to this object: it ends before the object does.
        error_code ignored;
        ws_.next_layer().close(ignored);
        run_until(ioc_, [this] { return !reading_; }, std::chrono::seconds(5));
    }
    WebSocketClient(const WebSocketClient&) = delete;
    WebSocketClient& operator=(const WebSocketClient&) = delete;

    // The opening handshake for `target`: true when the daemon switched protocols (101); then
    // reading starts. Otherwise response() is the daemon's answer (404, 409, ...).
    bool open(const std::string& target, std::chrono::milliseconds deadline = std::chrono::seconds(10))
    {
        if (error_) {
            return false;
        }
        bool done = false;
        ws_.async_handshake(response_, "localhost", target, [this, &done](error_code ec) {
            error_ = ec;
            done = true;
        });
        if (!drive([&] { return done; }, deadline) || error_) {
            return false;
        }
        read_next();
        return true;
    }

    const websocket::response_type& response() const { return response_; }
    // Why the last step failed; websocket::error::closed once the daemon closed.
    const error_code& error() const { return error_; }
    // Every byte of the binary messages, in order.
    const std::string& output() const { return output_; }
    // The text messages (notices).
    const std::vector<std::string>& notices() const { return notices_; }
    // The connection ended (the daemon closed it, or it broke).
    bool ended() const { return ended_; }
    // The daemon's close frame (code 0 when it sent none).
    std::uint16_t close_code() const { return ws_.reason().code; }
    std::string close_reason() const
    {
        return std::string(ws_.reason().reason.data(), ws_.reason().reason.size());
    }

    // Runs the loop until output() holds `text` at or after `from`; false when the connection
    // ended or the deadline passed first.
    bool wait_output(const std::string& text, std::chrono::milliseconds deadline,
                     std::size_t from = 0)
    {
        return drive([&] { return output_.find(text, from) != std::string::npos; }, deadline);
    }
    // Runs the loop until the connection ended.
    bool wait_end(std::chrono::milliseconds deadline)
    {
        return run_until(ioc_, [this] { return ended_; }, deadline);
    }

    // One binary message.
    bool send(const std::string& bytes, std::chrono::milliseconds deadline = std::chrono::seconds(10))
    {
        bool done = false;
        error_code result;
        ws_.binary(true);
        ws_.async_write(asio::buffer(bytes), [&](error_code ec, std::size_t) {
            result = ec;
            done = true;
        });
        return drive([&] { return done; }, deadline) && !result;
    }

    // The closing handshake from this side (1000); the daemon's answer ends the read.
    bool close(std::chrono::milliseconds deadline = std::chrono::seconds(10))
    {
        bool done = false;
        ws_.async_close(websocket::close_code::normal, [&](error_code) { done = true; });
        return drive([&] { return done && ended_; }, deadline);
    }

private:
    void read_next()
    {
        reading_ = true;
        ws_.async_read(in_, [this](error_code ec, std::size_t) {
            if (ec) {
                error_ = ec;
                ended_ = true;
                reading_ = false;
                return;
            }
            std::string message = beast::buffers_to_string(in_.data());
            in_.consume(in_.size());
            if (ws_.got_text()) {
                notices_.push_back(std::move(message));
            } else {
                output_ += message;
            }
            read_next();
        });
    }

    // Runs the loop until `finished` holds, at most `deadline`; false also when the connection
    // ended first (without `finished`).
    template <typename F>
    bool drive(F finished, std::chrono::milliseconds deadline)
    {
        run_until(ioc_, [&] { return finished() || ended_; }, deadline);
        return finished();
    }

    asio::io_context& ioc_;
    websocket::stream<Socket> ws_;
    websocket::response_type response_;
    beast::flat_buffer in_;
    std::string output_;
    std::vector<std::string> notices_;
    error_code error_;
    bool reading_ = false;
    bool ended_ = false;
};

} // namespace qm::test
