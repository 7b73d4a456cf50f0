// SPDX-License-Identifier: GPL-2.0-or-later
// HTTP clients for the REST tests: a Beast connection (unix socket or TCP) driven on the test's
// loop with a deadline on every exchange, and curl run as a child (no shell).
#pragma once

#include <cctype>
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "daemon/rest/beast.hpp"
#include "libmachine/asio.hpp"
#include "libmachine/json.hpp"
#include "tests/support/daemon_process.hpp"
#include "tests/support/loop.hpp"

namespace qm::test {

namespace http = rest::http;
namespace beast = rest::beast;

// One response, from either client.
struct HttpResponse
{
    int status = 0; // 0: none came (see HttpConnection::error())
    unsigned version = 11;
    std::map<std::string, std::string> headers; // names in lower case
    std::string body;
    bool keep_alive = false;

    std::string header(std::string name) const
    {
        for (char& c : name) {
            c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        }
        auto it = headers.find(name);
        return it == headers.end() ? std::string() : it->second;
    }
    bool has_header(const std::string& name) const { return !header(name).empty(); }
    // The body as JSON (a null document when it is not).
    json::Document json() const
    {
        auto d = json::parse(body);
        return d ? std::move(*d) : json::Document();
    }
    // A string member of the JSON body ("" when absent).
    std::string str(std::string_view key) const
    {
        const json::Document d = json();
        return std::string(json::get_string(d, key).value_or(""));
    }
    // The problem type's name: "urn:qmachined:error:Exists" -> "Exists".
    std::string problem() const
    {
        const std::string type = str("type");
        const auto colon = type.rfind(':');
        return colon == std::string::npos ? type : type.substr(colon + 1);
    }
};

inline std::ostream& operator<<(std::ostream& os, const HttpResponse& r)
{
    return os << "HTTP " << r.status << " " << r.body.substr(0, 2000);
}

// Extra request header fields.
using Headers = std::vector<std::pair<std::string, std::string>>;

// One client connection (unix socket or TCP, both as a generic stream socket). Every exchange runs
// the loop `ioc` until it completes or its deadline passes (then the socket is closed). Test
// thread only; `ioc` outlives the connection.
class HttpConnection
{
public:
    using Socket = asio::generic::stream_protocol::socket;

    HttpConnection(asio::io_context& ioc, const std::filesystem::path& unix_path)
        : ioc_(ioc)
        , socket_(ioc)
    {
        const asio::local::stream_protocol::endpoint ep(unix_path.string());
        socket_.connect(asio::generic::stream_protocol::endpoint(ep), error_);
    }
    HttpConnection(asio::io_context& ioc, const asio::ip::tcp::endpoint& ep)
        : ioc_(ioc)
        , socket_(ioc)
    {
        socket_.connect(asio::generic::stream_protocol::endpoint(ep), error_);
    }

    // Why the last operation failed (connect included); empty when it did not.
    const error_code& error() const { return error_; }
    bool is_open() const { return socket_.is_open() && !error_; }

    static http::request<http::string_body>
    make_request(const std::string& method, const std::string& target, std::string body = {},
                 const Headers& headers = {}, unsigned version = 11)
    {
        http::request<http::string_body> req;
        req.method_string(method);
        req.target(target);
        req.version(version);
        req.set(http::field::host, "localhost");
        if (!body.empty()) {
            req.set(http::field::content_type, "application/json");
        }
        for (const auto& [name, value] : headers) {
            req.set(name, value);
        }
        req.body() = std::move(body);
        req.prepare_payload();
        return req;
    }

    // Starts writing `req`, then reading its response; done() once both finished or failed.
    void start(http::request<http::string_body> req)
    {
        request_ = std::move(req);
        parser_.emplace();
        parser_->body_limit(64 * 1024 * 1024);
        // A response to HEAD announces a body it does not have.
        parser_->skip(request_.method() == http::verb::head);
        done_ = false;
        http::async_write(socket_, request_, [this](error_code ec, std::size_t) {
            if (ec) {
                finish(ec);
                return;
            }
            read_next();
        });
    }
    bool done() const { return done_; }
    // The response start() asked for (status 0 when none came).
    HttpResponse take() { return std::move(response_); }

    // One exchange.
    HttpResponse request(const std::string& method, const std::string& target,
                         std::string body = {}, const Headers& headers = {},
                         std::chrono::milliseconds deadline = 30s)
    {
        return send(make_request(method, target, std::move(body), headers), deadline);
    }
    HttpResponse send(http::request<http::string_body> req,
                      std::chrono::milliseconds deadline = 30s)
    {
        start(std::move(req));
        wait(deadline);
        return take();
    }

    // Writes `bytes` as they are.
    error_code write_raw(std::string_view bytes, std::chrono::milliseconds deadline = 10s)
    {
        bool finished = false;
        asio::async_write(socket_, asio::buffer(bytes.data(), bytes.size()),
                          [this, &finished](error_code ec, std::size_t) {
                              error_ = ec;
                              finished = true;
                          });
        drive([&] { return finished; }, deadline);
        return error_;
    }

    // Reads one response to what write_raw() sent (status 0 when none came within `deadline`).
    HttpResponse read_response(std::chrono::milliseconds deadline = 30s)
    {
        parser_.emplace();
        parser_->body_limit(64 * 1024 * 1024);
        done_ = false;
        read_next();
        wait(deadline);
        return take();
    }

    // Whether the server closes the connection (EOF or reset) within `deadline`; what it sends
    // before is appended to `*received`.
    bool closed_by_peer(std::chrono::milliseconds deadline, std::string* received = nullptr)
    {
        if (buffer_.size() > 0 && received != nullptr) {
            std::string pending(buffer_.size(), '\0');
            asio::buffer_copy(asio::buffer(pending), buffer_.data());
            received->append(pending);
        }
        buffer_.consume(buffer_.size());
        bool closed = false;
        bool finished = false;
        std::vector<char> chunk(4096);
        std::function<void()> read_more = [&] {
            socket_.async_read_some(asio::buffer(chunk), [&](error_code ec, std::size_t n) {
                if (received != nullptr) {
                    received->append(chunk.data(), n);
                }
                if (ec) {
                    closed =
                        ec != asio::error::operation_aborted && ec != asio::error::bad_descriptor;
                    finished = true;
                    return;
                }
                read_more();
            });
        };
        read_more();
        drive([&] { return finished; }, deadline);
        return closed;
    }

    void close()
    {
        error_code ec;
        socket_.shutdown(asio::socket_base::shutdown_both, ec);
        socket_.close(ec);
    }

private:
    void read_next()
    {
        http::async_read(socket_, buffer_, *parser_, [this](error_code ec, std::size_t) {
            if (ec) {
                finish(ec);
                return;
            }
            // RFC 9110 15.2: interim responses (100 Continue) precede the final one.
            if (parser_->get().result_int() / 100 == 1) {
                parser_.emplace();
                parser_->body_limit(64 * 1024 * 1024);
                read_next();
                return;
            }
            auto& msg = parser_->get();
            response_.status = static_cast<int>(msg.result_int());
            response_.version = msg.version();
            response_.keep_alive = msg.keep_alive();
            for (const auto& field : msg) {
                std::string name(field.name_string());
                for (char& c : name) {
                    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
                }
                response_.headers[name] = std::string(field.value());
            }
            response_.body = std::move(msg.body());
            finish({});
        });
    }

    void finish(error_code ec)
    {
        error_ = ec;
        done_ = true;
    }

    void wait(std::chrono::milliseconds deadline)
    {
        drive([this] { return done_; }, deadline);
        if (!done_) {
            error_ = asio::error::timed_out;
        }
    }

    // Runs the loop until `finished` holds; past `deadline`, closes the socket and runs the loop
    // until the aborted operations have completed.
    template <typename F>
    void drive(F finished, std::chrono::milliseconds deadline)
    {
        if (run_until(ioc_, finished, deadline)) {
            return;
        }
        error_code ec;
        socket_.close(ec);
        run_until(ioc_, finished, 5s);
    }

    asio::io_context& ioc_;
    Socket socket_;
    beast::flat_buffer buffer_;
    http::request<http::string_body> request_;
    std::optional<http::response_parser<http::string_body>> parser_;
    HttpResponse response_;
    bool done_ = false;
    error_code error_;
};

// Parses curl -i output: interim responses are skipped; the last header block and the body.
inline HttpResponse parse_curl_output(const std::string& out)
{
    HttpResponse r;
    std::size_t pos = 0;
    while (out.compare(pos, 5, "HTTP/") == 0) {
        const std::size_t end = out.find("\r\n\r\n", pos);
        if (end == std::string::npos) {
            break;
        }
        const std::string head = out.substr(pos, end - pos);
        pos = end + 4;
        r.headers.clear();
        const std::size_t sp = head.find(' ');
        r.status = std::stoi(head.substr(sp + 1, 3));
        r.version = head.compare(0, 8, "HTTP/1.0") == 0 ? 10 : 11;
        std::size_t line = head.find("\r\n");
        while (line != std::string::npos) {
            const std::size_t next = head.find("\r\n", line + 2);
            const std::string field = head.substr(
                line + 2, next == std::string::npos ? std::string::npos : next - line - 2);
            const std::size_t colon = field.find(':');
            if (colon != std::string::npos) {
                std::string name = field.substr(0, colon);
                for (char& c : name) {
                    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
                }
                std::string value = field.substr(colon + 1);
                value.erase(0, value.find_first_not_of(' '));
                r.headers[name] = value;
            }
            line = next;
        }
        if (r.status / 100 != 1) {
            break;
        }
    }
    r.body = out.substr(pos);
    r.keep_alive = r.header("connection") != "close";
    return r;
}

// curl (no shell): `-sS -i --path-as-is` plus `args`; the exit status and the parsed response.
struct CurlResult
{
    int status = -1;
    std::string err;
    HttpResponse response;
};

inline CurlResult run_curl(std::vector<std::string> args)
{
    std::vector<std::string> argv{"curl", "-sS", "-i", "--path-as-is", "--max-time", "30"};
    argv.insert(argv.end(), args.begin(), args.end());
    CommandResult r = run_command(argv, 60s);
    CurlResult out;
    out.status = r.status;
    out.err = std::move(r.err);
    out.response = parse_curl_output(r.out);
    return out;
}

} // namespace qm::test
