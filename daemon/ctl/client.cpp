// SPDX-License-Identifier: GPL-2.0-or-later
// qmachinectl's HTTP client: connections (unix socket or TCP), requests, the event stream and the
// console WebSocket, with Beast on a private io_context.
#include "daemon/ctl/client.hpp"

#include <charconv>
#include <limits>
#include <utility>

#include <sys/un.h>

#include <boost/beast/http/status.hpp>
#include <fmt/format.h>

#include "libmachine/json.hpp"

#ifndef QM_VERSION
#error "QM_VERSION must be defined by the build"
#endif

namespace qm::ctl {

namespace http = rest::http;
namespace beast = rest::beast;
namespace websocket = rest::websocket;

namespace {

constexpr const char* user_agent = "qmachinectl/" QM_VERSION;
constexpr std::string_view problem_prefix = "urn:qmachined:error:";

// The answer to this request is read whole: logs are 1 MiB at most, the rest far smaller.
constexpr std::uint64_t body_limit = 64 * 1024 * 1024;

} // namespace

std::string Endpoint::describe() const
{
    if (!unix_path.empty()) {
        return unix_path;
    }
    const bool v6 = host.find(':') != std::string::npos;
    return fmt::format("http://{}{}{}:{}", v6 ? "[" : "", host, v6 ? "]" : "", port);
}

expected<Endpoint> parse_url(std::string_view url)
{
    const auto bad = [&](std::string_view why) {
        return fail(errc::invalid_argument, fmt::format("--url '{}': {}", url, why));
    };
    constexpr std::string_view scheme = "http://";
    if (!url.starts_with(scheme)) {
        return bad("only http://HOST:PORT is supported");
    }
    std::string_view rest = url.substr(scheme.size());
    if (rest.ends_with('/')) {
        rest.remove_suffix(1);
    }
    if (rest.find('/') != std::string_view::npos) {
        return bad("a path is not supported (qmachined serves /v1 at the root)");
    }
    Endpoint e;
    std::string_view port;
    if (rest.starts_with('[')) {
        const auto close = rest.find(']');
        if (close == std::string_view::npos) {
            return bad("no ']' after the IPv6 address");
        }
        e.host = std::string(rest.substr(1, close - 1));
        rest.remove_prefix(close + 1);
        if (!rest.empty() && !rest.starts_with(':')) {
            return bad("expected ':PORT' after the address");
        }
        port = rest.empty() ? std::string_view() : rest.substr(1);
    } else {
        const auto colon = rest.find(':');
        e.host = std::string(rest.substr(0, colon));
        port = colon == std::string_view::npos ? std::string_view() : rest.substr(colon + 1);
    }
    if (e.host.empty()) {
        return bad("no host");
    }
    if (port.empty()) {
        port = "80";
    }
    unsigned n = 0;
    const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), n);
    if (ec != std::errc() || end != port.data() + port.size() || n == 0 || n > 65535) {
        return bad(fmt::format("'{}' is not a port", port));
    }
    e.port = std::string(port);
    return e;
}

std::string problem_name(const Response& r)
{
    auto doc = json::parse(r.body);
    if (!doc) {
        return {};
    }
    const auto type = json::get_string(*doc, "type");
    if (!type || !type->starts_with(problem_prefix)) {
        return {};
    }
    return std::string(type->substr(problem_prefix.size()));
}

std::string problem_detail(const Response& r)
{
    if (auto doc = json::parse(r.body)) {
        if (auto detail = json::get_string(*doc, "detail")) {
            return std::string(*detail);
        }
    }
    const auto reason = http::obsolete_reason(http::int_to_status(r.status));
    return fmt::format("HTTP {} {}", r.status, std::string_view(reason.data(), reason.size()));
}

Client::Client(Endpoint endpoint)
    : endpoint_(std::move(endpoint))
{}

Error Client::transport_error(const error_code& ec, std::string_view what) const
{
    return Error{make_error_code(errc::connect_failed),
                 fmt::format("{} qmachined at {}: {}", what, endpoint_.describe(), ec.message()),
                 {},
                 {}};
}

expected<std::unique_ptr<Socket>> Client::connect()
{
    auto socket = std::make_unique<Socket>(ioc_);
    error_code ec;
    if (!endpoint_.unix_path.empty()) {
        if (endpoint_.unix_path.size() >= sizeof(sockaddr_un::sun_path)) {
            return fail(transport_error(make_error_code(boost::system::errc::filename_too_long),
                                        "cannot reach"));
        }
        const asio::local::stream_protocol::endpoint ep(endpoint_.unix_path);
        socket->connect(asio::generic::stream_protocol::endpoint(ep), ec);
    } else {
        asio::ip::tcp::resolver resolver(ioc_);
        const auto results = resolver.resolve(endpoint_.host, endpoint_.port, ec);
        if (!ec) {
            ec = asio::error::host_not_found;
            for (const auto& r : results) {
                error_code ignored;
                socket->close(ignored);
                ec = {};
                socket->connect(asio::generic::stream_protocol::endpoint(r.endpoint()), ec);
                if (!ec) {
                    break;
                }
            }
        }
    }
    if (ec) {
        return fail(transport_error(ec, "cannot reach"));
    }
    return socket;
}

namespace {

template <typename Body>
void set_common_fields(http::request<Body>& req, const Endpoint& endpoint)
{
    req.set(http::field::host, "localhost");
    req.set(http::field::user_agent, user_agent);
    if (endpoint.unix_path.empty() && !endpoint.token.empty()) {
        req.set(http::field::authorization, "Bearer " + endpoint.token);
    }
}

Response to_response(http::response<http::string_body>& res)
{
    Response r;
    r.status = res.result_int();
    r.content_type = std::string(res[http::field::content_type]);
    r.etag = std::string(res[http::field::etag]);
    r.body = std::move(res.body());
    return r;
}

} // namespace

expected<Response> Client::request(std::string_view method, std::string_view target,
                                   std::string body, std::string if_match)
{
    auto socket = connect();
    if (!socket) {
        return fail(std::move(socket).error());
    }
    http::request<http::string_body> req;
    req.method_string(beast::string_view(method.data(), method.size()));
    req.target(beast::string_view(target.data(), target.size()));
    req.version(11);
    set_common_fields(req, endpoint_);
    if (!if_match.empty()) {
        req.set(http::field::if_match, if_match);
    }
    if (!body.empty()) {
        req.set(http::field::content_type, "application/json");
        req.body() = std::move(body);
    }
    req.prepare_payload();
    error_code ec;
    http::write(**socket, req, ec);
    if (ec) {
        return fail(transport_error(ec, "lost the connection to"));
    }
    beast::flat_buffer buffer;
    http::response_parser<http::string_body> parser;
    parser.body_limit(body_limit);
    http::read(**socket, buffer, parser, ec);
    if (ec) {
        return fail(transport_error(ec, "lost the connection to"));
    }
    error_code ignored;
    (*socket)->shutdown(asio::socket_base::shutdown_both, ignored);
    return to_response(parser.get());
}

void Client::stop()
{
    stopped_ = true;
    if (streaming_ != nullptr) {
        error_code ignored;
        streaming_->cancel(ignored);
    }
}

namespace {

// Runs `ioc` until `done` holds, `limit` passed (set) or `stopped` holds; the caller cancels the
// operation when it did not complete.
template <typename Done, typename Stopped>
void run_until(asio::io_context& ioc, Done done, Stopped stopped,
               std::optional<std::chrono::milliseconds> limit)
{
    ioc.restart();
    const auto end = limit ? std::chrono::steady_clock::now() + *limit
                           : std::chrono::steady_clock::time_point::max();
    while (!done() && !stopped() && std::chrono::steady_clock::now() < end) {
        if (limit) {
            ioc.run_one_until(end);
        } else {
            ioc.run_one();
        }
        if (ioc.stopped()) {
            ioc.restart();
        }
    }
}

} // namespace

expected<Response> Client::stream(std::string_view target,
                                  const std::function<void(std::string_view)>& on_data,
                                  std::optional<std::chrono::milliseconds> idle)
{
    auto connected = connect();
    if (!connected) {
        return fail(std::move(connected).error());
    }
    Socket& socket = **connected;
    http::request<http::empty_body> req{http::verb::get,
                                        beast::string_view(target.data(), target.size()), 11};
    set_common_fields(req, endpoint_);
    req.set(http::field::accept, "text/event-stream");
    error_code ec;
    http::write(socket, req, ec);
    if (ec) {
        return fail(transport_error(ec, "lost the connection to"));
    }
    streaming_ = &socket;
    beast::flat_buffer buffer;
    http::response_parser<http::string_body> parser;
    // A stream has no end but the daemon's. Not boost::none: Beast 1.74 compares lengths with
    // the optional limit, and every length is more than none.
    parser.body_limit(std::numeric_limits<std::uint64_t>::max());
    // One read at a time; a read that did not complete within `idle` (or before stop()) is
    // cancelled and the stream ends.
    // The idle limit starts with the first bytes of the body (": subscribed"): a loaded daemon
    // may take its time to answer, but once subscribed it sends what it holds at once.
    bool started = false;
    const auto read = [&](bool header) -> error_code {
        bool done = false;
        error_code result;
        const auto handler = [&](error_code e, std::size_t) {
            result = e;
            done = true;
        };
        if (header) {
            http::async_read_header(socket, buffer, parser, handler);
        } else {
            http::async_read_some(socket, buffer, parser, handler);
        }
        run_until(
            ioc_, [&] { return done; }, [&] { return stopped_; }, started ? idle : std::nullopt);
        if (!done) {
            error_code ignored;
            socket.cancel(ignored);
            run_until(
                ioc_, [&] { return done; }, [] { return false; }, std::nullopt);
            return asio::error::operation_aborted;
        }
        return result;
    };
    Response ended;
    ended.status = 200;
    ec = read(true);
    if (ec == asio::error::operation_aborted) {
        streaming_ = nullptr;
        return ended;
    }
    if (ec) {
        streaming_ = nullptr;
        return fail(transport_error(ec, "lost the connection to"));
    }
    if (parser.get().result_int() != 200) {
        // A refusal (400, 429, 503): a problem, read whole.
        bool done = false;
        http::async_read(socket, buffer, parser, [&](error_code e, std::size_t) {
            ec = e;
            done = true;
        });
        run_until(
            ioc_, [&] { return done; }, [] { return false; }, std::nullopt);
        streaming_ = nullptr;
        return to_response(parser.get());
    }
    while (!parser.is_done()) {
        ec = read(false);
        std::string& body = parser.get().body();
        if (!body.empty()) {
            started = true;
            on_data(body);
            body.clear();
        }
        if (ec == asio::error::operation_aborted || ec == http::error::end_of_stream) {
            break;
        }
        if (ec) {
            streaming_ = nullptr;
            return fail(transport_error(ec, "lost the connection to"));
        }
    }
    streaming_ = nullptr;
    return ended;
}

expected<std::unique_ptr<WebSocket>> Client::websocket(std::string_view target, Response& refused)
{
    auto connected = connect();
    if (!connected) {
        return fail(std::move(connected).error());
    }
    auto ws = std::make_unique<WebSocket>(std::move(**connected));
    const std::string token = endpoint_.unix_path.empty() ? endpoint_.token : std::string();
    ws->set_option(websocket::stream_base::decorator([token](websocket::request_type& req) {
        req.set(http::field::user_agent, user_agent);
        if (!token.empty()) {
            req.set(http::field::authorization, "Bearer " + token);
        }
    }));
    websocket::response_type res;
    error_code ec;
    bool done = false;
    // The asynchronous handshake: the synchronous one drops the answer of a refusal.
    ws->async_handshake(res, "localhost", beast::string_view(target.data(), target.size()),
                        [&](error_code e) {
                            ec = e;
                            done = true;
                        });
    run_until(
        ioc_, [&] { return done; }, [] { return false; }, std::nullopt);
    if (ec == websocket::error::upgrade_declined) {
        refused = to_response(res);
        return std::unique_ptr<WebSocket>();
    }
    if (ec) {
        return fail(transport_error(ec, "lost the connection to"));
    }
    return ws;
}

} // namespace qm::ctl
