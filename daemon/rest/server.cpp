// SPDX-License-Identifier: GPL-2.0-or-later
// The REST server: listeners, sessions, limits, deadlines and tokens.
#include "daemon/rest/server.hpp"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <type_traits>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "daemon/audit.hpp"
#include "daemon/rest/beast.hpp"
#include "daemon/rest/http_request.hpp"
#include "daemon/rest/stream.hpp"
#include "libmachine/deadline.hpp"

namespace qm::rest {

namespace {

using Clock = std::chrono::steady_clock;

constexpr std::string_view requests_help = "HTTP responses sent, by route and status.";
// What Response::route says of a request that reached no route.
constexpr std::string_view unmatched = "unmatched";

// The response of a failure detected before a request was complete (the connection is closed
// after it: what is left of the request cannot be read reliably).
http::response<http::string_body> early_response(const Problem& p, const std::string& server)
{
    const Response r = problem_response(p);
    http::response<http::string_body> res{static_cast<http::status>(r.status), 11};
    res.set(http::field::server, server);
    res.set(http::field::content_type, r.content_type);
    for (const auto& [name, value] : r.headers) {
        res.set(name, value);
    }
    res.body() = r.body;
    res.keep_alive(false);
    res.prepare_payload();
    return res;
}

std::string_view trim(std::string_view s)
{
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) {
        s.remove_prefix(1);
    }
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '\n')) {
        s.remove_suffix(1);
    }
    return s;
}

// Whether a session's sockets are TCP (the other kind is the unix socket): each kind has its own
// connection limit.
template <typename Protocol>
constexpr bool is_tcp = !std::is_same_v<Protocol, asio::local::stream_protocol>;

// After an answer sent before the request was read to its end (413, 431, 408, 400): stop sending,
// then read and drop what the client still sends, for a while, before the caller closes. Closing
// with unread data makes TCP send a reset, which can destroy the answer in the client's receive
// queue before it reads it (RFC 9112 9.6, "tear-down").
template <class Socket>
awaitable<void> linger(Socket& socket)
{
    error_code ec;
    socket.shutdown(asio::socket_base::shutdown_send, ec);
    Deadline deadline(socket.get_executor(), 2s, [&socket] {
        error_code ignored;
        socket.cancel(ignored);
    });
    std::array<char, 16 * 1024> drop{};
    std::size_t total = 0;
    while (total < 16 * 1024 * 1024) {
        const std::size_t n = co_await socket.async_read_some(asio::buffer(drop), use_ec(ec));
        if (ec) {
            break;
        }
        total += n;
    }
}

} // namespace

bool constant_time_equal(std::string_view a, std::string_view b) noexcept
{
    // Every byte of the longer one is looked at, whatever the contents; the lengths are not secret.
    const std::size_t n = std::max(a.size(), b.size());
    unsigned diff = a.size() == b.size() ? 0U : 1U;
    for (std::size_t i = 0; i < n; ++i) {
        const auto x = static_cast<unsigned char>(i < a.size() ? a[i] : 0);
        const auto y = static_cast<unsigned char>(i < b.size() ? b[i] : 0);
        diff |= static_cast<unsigned>(x ^ y);
    }
    return diff == 0;
}

expected<std::string> load_or_create_token(const std::string& path)
{
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd >= 0) {
        struct stat st{};
        if (::fstat(fd, &st) == 0 && (st.st_mode & 077) != 0) {
            ::close(fd);
            return fail(errc::invalid_argument,
                        fmt::format("'{}' is readable by others (mode {:o}): make it 0600", path,
                                    st.st_mode & 0777));
        }
        char buf[512];
        const ssize_t n = ::read(fd, buf, sizeof buf);
        const int err = errno;
        ::close(fd);
        if (n < 0) {
            return fail(errc::system_error, fmt::format("cannot read '{}': {}", path, std::strerror(err)));
        }
        std::string_view text(buf, static_cast<std::size_t>(n));
        text = trim(text.substr(0, text.find('\n')));
        if (text.empty()) {
            return fail(errc::invalid_argument, fmt::format("'{}' holds no token", path));
        }
        return std::string(text);
    }
    if (errno != ENOENT) {
        return fail(errc::system_error, fmt::format("cannot open '{}': {}", path, std::strerror(errno)));
    }
    unsigned char raw[32];
    if (::getrandom(raw, sizeof raw, 0) != static_cast<ssize_t>(sizeof raw)) {
        return fail(errc::system_error, fmt::format("getrandom: {}", std::strerror(errno)));
    }
    std::string token;
    for (unsigned char c : raw) {
        token += fmt::format("{:02x}", c);
    }
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        return fail(errc::system_error, fmt::format("cannot create '{}': {}", path, std::strerror(errno)));
    }
    const std::string line = token + "\n";
    const bool ok = ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size()) &&
                    ::fsync(fd) == 0;
    const int err = errno;
    ::close(fd);
    if (!ok) {
        ::unlink(path.c_str());
        return fail(errc::system_error, fmt::format("cannot write '{}': {}", path, std::strerror(err)));
    }
    spdlog::info("Generated the REST token in '{}'", path);
    return token;
}

Server::Server(asio::io_context& ioc, Api& api, ServerOptions options, daemon::Registry& metrics)
    : ioc_(ioc), api_(api), options_(std::move(options)), metrics_(metrics), sweep_timer_(ioc)
{
    // A route's series appear when it first answers (its latency) or first answers with a status:
    // the text grows with what is used, not with the route table (a histogram is 19 lines).
    for (const RouteInfo& r : routes()) {
        route_meters_.push_back(RouteMeters{r.name, {}, nullptr});
    }
    route_meters_.push_back(RouteMeters{unmatched, {}, nullptr});
    daemon::Gauge& connections =
        metrics_.gauge("qmachined_http_connections", "Open REST connections.");
    collector_ = metrics_.add_collector(
        [this, &connections] { connections.set(static_cast<double>(sessions_.size())); });
}

Server::RouteMeters& Server::meters(std::string_view route) noexcept
{
    for (RouteMeters& m : route_meters_) {
        if (m.route == route) {
            return m;
        }
    }
    return route_meters_.back(); // unmatched
}

void Server::count_response(std::string_view route, int status, std::optional<double> seconds)
{
    RouteMeters& m = meters(route);
    if (seconds) {
        if (m.seconds == nullptr) {
            m.seconds = &metrics_.histogram(
                "qmachined_http_request_duration_seconds",
                "Time from a request read whole to its response ready, by route.",
                daemon::latency_buckets, {{"route", std::string(m.route)}});
        }
        m.seconds->observe(*seconds);
    }
    for (auto& [seen, counter] : m.by_status) {
        if (seen == status) {
            counter->inc();
            return;
        }
    }
    // The first answer of this route with this status: its series, once.
    daemon::Counter& counter =
        metrics_.counter("qmachined_http_requests_total", requests_help,
                         {{"route", std::string(m.route)}, {"status", std::to_string(status)}});
    m.by_status.emplace_back(status, &counter);
    counter.inc();
}

std::chrono::milliseconds Server::sweep_period() const noexcept
{
    return std::clamp(options_.request_timeout / 4, std::chrono::milliseconds(10),
                      std::chrono::milliseconds(1000));
}

void Server::set_deadline(std::uint64_t id, std::chrono::milliseconds timeout)
{
    if (auto it = sessions_.find(id); it != sessions_.end()) {
        it->second.deadline = Clock::now() + timeout;
    }
}

void Server::clear_deadline(std::uint64_t id)
{
    if (auto it = sessions_.find(id); it != sessions_.end()) {
        it->second.deadline = Clock::time_point::max();
    }
}

awaitable<void> Server::sweep()
{
    std::weak_ptr<int> alive = life_;
    while (!alive.expired() && !closed_ && !sessions_.empty()) {
        sweep_timer_.expires_after(sweep_period());
        error_code ec;
        co_await sweep_timer_.async_wait(use_ec(ec));
        if (alive.expired() || ec) {
            co_return;
        }
        const auto now = Clock::now();
        std::vector<std::function<void()>> expired;
        for (auto& [id, slot] : sessions_) {
            if (slot.deadline <= now) {
                slot.deadline = Clock::time_point::max();
                expired.push_back(slot.expire);
            }
        }
        for (auto& expire : expired) {
            expire();
        }
    }
    if (!alive.expired()) {
        sweeping_ = false;
    }
}

Server::~Server()
{
    close();
    // Passed sockets listen() never adopted.
    for (int fd : {options_.unix_fd, options_.tcp_fd}) {
        if (fd >= 0) {
            ::close(fd);
        }
    }
    metrics_.remove_collector(collector_);
}

expected<void> Server::listen()
{
    if (options_.unix_fd >= 0) {
        using Local = asio::local::stream_protocol;
        Local::acceptor acceptor(ioc_);
        error_code ec;
        acceptor.assign(Local(), std::exchange(options_.unix_fd, -1), ec);
        if (ec) {
            return fail(errc::system_error,
                        fmt::format("cannot use the passed unix socket: {}", ec.message()));
        }
        passed_unix_ = true;
        unix_acceptor_.emplace(std::move(acceptor));
        asio::co_spawn(ioc_, accept_loop<Local>(*unix_acceptor_, false), [](std::exception_ptr e) {
            if (e) {
                spdlog::error("Failed to accept REST connections: {}", describe_exception(e));
            }
        });
        spdlog::info("REST listening on '{}' (passed by the service manager)",
                     options_.unix_path.empty() ? "unnamed socket" : options_.unix_path);
    } else if (!options_.unix_path.empty()) {
        // Bound under a temporary name and renamed into place: a client that finds the socket
        // can connect, and a stale socket of a crashed daemon is replaced atomically (the runtime
        // directory's lock says no other daemon uses it).
        const std::string& path = options_.unix_path;
        const std::string tmp = fmt::format("{}.{}.tmp", path, ::getpid());
        ::unlink(tmp.c_str());
        using Local = asio::local::stream_protocol;
        Local::acceptor acceptor(ioc_);
        error_code ec;
        acceptor.open(Local(), ec);
        if (!ec) {
            acceptor.bind(Local::endpoint(tmp), ec);
        }
        if (ec) {
            return fail(errc::system_error, fmt::format("cannot bind '{}': {}", tmp, ec.message()));
        }
        if (::chmod(tmp.c_str(), 0660) != 0) {
            const int err = errno;
            ::unlink(tmp.c_str());
            return fail(errc::system_error, fmt::format("cannot chmod '{}': {}", tmp, std::strerror(err)));
        }
        if (options_.unix_group &&
            ::chown(tmp.c_str(), static_cast<uid_t>(-1), *options_.unix_group) != 0) {
            const int err = errno;
            ::unlink(tmp.c_str());
            return fail(errc::system_error, fmt::format("cannot set the group of '{}': {}", tmp,
                                                        std::strerror(err)));
        }
        acceptor.listen(asio::socket_base::max_listen_connections, ec);
        if (ec || ::rename(tmp.c_str(), path.c_str()) != 0) {
            const std::string why = ec ? ec.message() : std::strerror(errno);
            ::unlink(tmp.c_str());
            return fail(errc::system_error, fmt::format("cannot listen on '{}': {}", path, why));
        }
        unix_acceptor_.emplace(std::move(acceptor));
        asio::co_spawn(ioc_, accept_loop<Local>(*unix_acceptor_, false), [](std::exception_ptr e) {
            if (e) {
                spdlog::error("Failed to accept REST connections: {}", describe_exception(e));
            }
        });
        spdlog::info("REST listening on '{}'", path);
    }
    if (options_.tcp_fd >= 0) {
        using Tcp = asio::ip::tcp;
        const int fd = std::exchange(options_.tcp_fd, -1);
        sockaddr_storage addr{};
        socklen_t len = sizeof addr;
        const bool v6 = ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0 &&
                        addr.ss_family == AF_INET6;
        Tcp::acceptor acceptor(ioc_);
        error_code ec;
        acceptor.assign(v6 ? Tcp::v6() : Tcp::v4(), fd, ec);
        if (ec) {
            ::close(fd);
            return fail(errc::system_error,
                        fmt::format("cannot use the passed TCP socket: {}", ec.message()));
        }
        tcp_acceptor_.emplace(std::move(acceptor));
        asio::co_spawn(ioc_, accept_loop<Tcp>(*tcp_acceptor_, true), [](std::exception_ptr e) {
            if (e) {
                spdlog::error("Failed to accept REST connections: {}", describe_exception(e));
            }
        });
        const auto bound = tcp_acceptor_->local_endpoint(ec);
        spdlog::info("REST listening on {}:{} (passed by the service manager; bearer token "
                     "required)",
                     bound.address().to_string(), bound.port());
    } else if (options_.tcp) {
        using Tcp = asio::ip::tcp;
        Tcp::acceptor acceptor(ioc_);
        error_code ec;
        acceptor.open(options_.tcp->protocol(), ec);
        if (!ec) {
            acceptor.set_option(asio::socket_base::reuse_address(true), ec);
        }
        if (!ec) {
            acceptor.bind(*options_.tcp, ec);
        }
        if (!ec) {
            acceptor.listen(asio::socket_base::max_listen_connections, ec);
        }
        if (ec) {
            return fail(errc::system_error, fmt::format("cannot listen on {}:{}: {}",
                                                        options_.tcp->address().to_string(),
                                                        options_.tcp->port(), ec.message()));
        }
        tcp_acceptor_.emplace(std::move(acceptor));
        asio::co_spawn(ioc_, accept_loop<Tcp>(*tcp_acceptor_, true), [](std::exception_ptr e) {
            if (e) {
                spdlog::error("Failed to accept REST connections: {}", describe_exception(e));
            }
        });
        const auto bound = tcp_acceptor_->local_endpoint(ec);
        spdlog::info("REST listening on {}:{} (bearer token required)", bound.address().to_string(),
                     bound.port());
    }
    return {};
}

std::uint16_t Server::tcp_port() const noexcept
{
    if (!tcp_acceptor_) {
        return 0;
    }
    error_code ec;
    return tcp_acceptor_->local_endpoint(ec).port();
}

void Server::close()
{
    if (closed_) {
        return;
    }
    closed_ = true;
    error_code ec;
    if (unix_acceptor_) {
        unix_acceptor_->close(ec);
        if (!passed_unix_) {
            ::unlink(options_.unix_path.c_str());
        }
    }
    if (tcp_acceptor_) {
        tcp_acceptor_->close(ec);
    }
    // Closers remove nothing themselves (the sessions do, when they end): take a copy.
    sweep_timer_.cancel();
    std::vector<std::function<void()>> closers;
    for (auto& [id, slot] : sessions_) {
        closers.push_back(slot.close);
    }
    for (auto& close : closers) {
        close();
    }
}

void Server::forget(std::uint64_t id)
{
    if (auto it = sessions_.find(id); it != sessions_.end()) {
        tcp_sessions_ -= it->second.tcp ? 1 : 0;
        sessions_.erase(it);
    }
}

bool Server::authorized(std::string_view header) const noexcept
{
    // RFC 6750 2.1: "Bearer" (any case), one space, the token.
    header = trim(header);
    if (header.size() < 7 || !iequals(header.substr(0, 6), "Bearer") || header[6] != ' ') {
        return false;
    }
    return constant_time_equal(trim(header.substr(7)), options_.token);
}

template <class Protocol>
awaitable<void> Server::accept_loop(typename Protocol::acceptor& acceptor, bool needs_token)
{
    std::weak_ptr<int> alive = life_;
    while (true) {
        typename Protocol::socket socket(ioc_);
        error_code ec;
        co_await acceptor.async_accept(socket, use_ec(ec));
        if (alive.expired() || closed_ || ec == asio::error::operation_aborted) {
            co_return;
        }
        if (ec) {
            // EMFILE and friends: the listener stays; wait a moment rather than spin.
            spdlog::warn("Failed to accept a REST connection: {}", ec.message());
            asio::steady_timer pause(ioc_, 100ms);
            co_await pause.async_wait(use_ec(ec));
            continue;
        }
        if ((is_tcp<Protocol> ? tcp_sessions_ : sessions_.size() - tcp_sessions_) >= options_.max_connections) {
            asio::co_spawn(ioc_, refuse<Protocol>(std::move(socket)), asio::detached);
            continue;
        }
        const std::uint64_t id = next_session_++;
        asio::co_spawn(ioc_, session<Protocol>(std::move(socket), needs_token, id),
                       [](std::exception_ptr e) {
                           if (e) {
                               spdlog::error("Failed to serve a REST connection: {}",
                                             describe_exception(e));
                           }
                       });
    }
}

template <class Protocol>
awaitable<void> Server::refuse(typename Protocol::socket socket)
{
    // Over the connection limit: one short answer, then the connection is closed.
    spdlog::warn("Refused a REST connection: {} connections are open (the limit)",
                 options_.max_connections);
    auto res = early_response(make_problem(errc::limit_exceeded,
                                           fmt::format("too many connections (limit {})",
                                                       options_.max_connections)),
                              options_.server_header);
    res.set(http::field::retry_after, "1");
    count_response(unmatched, res.result_int());
    Deadline deadline(socket.get_executor(), 1s, [&socket] { socket.close(); });
    error_code ec;
    co_await http::async_write(socket, res, use_ec(ec));
    if (!ec) {
        co_await linger(socket);
    }
    socket.close(ec);
}

template <class Protocol>
awaitable<void> Server::session(typename Protocol::socket socket, bool needs_token, std::uint64_t id)
{
    std::weak_ptr<int> alive = life_;
    // Who is at the other end, for the audit lines: read once, at accept (SO_PEERCRED gives the
    // credentials of connect() anyway).
    daemon::Caller caller;
    if constexpr (!is_tcp<Protocol>) {
        caller = daemon::unix_socket_caller(socket.native_handle());
    } else {
        error_code peer_ec;
        const auto peer = socket.remote_endpoint(peer_ec);
        if (peer_ec) {
            caller.description = "tcp=? token";
        } else {
            caller = daemon::tcp_caller(peer.address().to_string(), peer.port());
        }
    }
    bool timed_out = false;
    Slot slot;
    slot.close = [&socket] {
        error_code ignored;
        socket.cancel(ignored);
        socket.close(ignored);
    };
    slot.expire = [&socket, &timed_out] {
        timed_out = true;
        error_code ignored;
        socket.cancel(ignored);
    };
    slot.tcp = is_tcp<Protocol>;
    tcp_sessions_ += slot.tcp ? 1 : 0;
    sessions_.emplace(id, std::move(slot));
    if (!sweeping_) {
        sweeping_ = true;
        asio::co_spawn(ioc_, sweep(), [](std::exception_ptr e) {
            if (e) {
                spdlog::error("Failed to watch REST deadlines: {}", describe_exception(e));
            }
        });
    }
    const RequestLimits limits{options_.max_header, options_.max_body};
    beast::flat_buffer buffer;
    error_code ec;
    while (!closed_) {
        // The parsing, checks and conversion are http_request.hpp's (the rest fuzz target runs
        // them too); the reads, the token, the deadlines and the answers are the session's.
        RequestParser parser;
        limit_parser(parser, limits, needs_token);
        timed_out = false;
        set_deadline(id, options_.request_timeout);
        co_await http::async_read_header(socket, buffer, parser, use_ec(ec));
        if (!ec) {
            ec = check_header(parser);
        }
        // An unauthenticated request is answered from its header: its body is never read.
        bool unauthorized = false;
        if (!ec && needs_token) {
            unauthorized = !authorized(sv(parser.get()[http::field::authorization]));
        }
        if (!ec && !unauthorized) {
            ec = admit_body(parser, limits);
            if (!ec && iequals(sv(parser.get()[http::field::expect]), "100-continue") &&
                !parser.is_done()) {
                // RFC 9110 10.1.1: the client waits for this before sending the body.
                http::response<http::empty_body> go_on{http::status::continue_, 11};
                co_await http::async_write(socket, go_on, use_ec(ec));
            }
        }
        if (!ec && !unauthorized && !parser.is_done()) {
            co_await http::async_read(socket, buffer, parser, use_ec(ec));
        }
        if (alive.expired() || closed_) {
            break;
        }
        clear_deadline(id);
        if (ec || unauthorized) {
            std::optional<Problem> problem;
            if (unauthorized) {
                const bool has_header =
                    parser.get().find(http::field::authorization) != parser.get().end();
                problem = make_problem(
                    HttpProblem::unauthorized,
                    has_header ? "the bearer token is not the right one"
                               : "this listener needs \"Authorization: Bearer <token>\" (the "
                                 "token is in the state directory's rest.token)");
            } else if (timed_out) {
                // An idle kept-alive connection is closed quietly; a request that started and
                // did not finish in time gets 408.
                if (parser.got_some() || buffer.size() > 0) {
                    problem = make_problem(HttpProblem::request_timeout,
                                           fmt::format("the request did not arrive within {} ms",
                                                       options_.request_timeout.count()));
                }
            } else {
                problem = read_problem(ec, limits);
            }
            if (problem) {
                spdlog::debug("REST connection {}: {} ({})", id, problem->detail, ec.message());
                auto res = early_response(*problem, options_.server_header);
                count_response(unmatched, res.result_int());
                Deadline write_deadline(socket.get_executor(), 1s, [&socket] {
                    error_code ignored;
                    socket.close(ignored);
                });
                co_await http::async_write(socket, res, use_ec(ec));
                if (!ec) {
                    co_await linger(socket);
                }
            }
            break;
        }

        auto& msg = parser.get();
        const auto started = Clock::now();
        Response response;
        {
            Request request = to_request(msg, caller);
            try {
                response = co_await api_.handle(std::move(request));
            } catch (const std::exception& e) {
                spdlog::error("REST {} {}: a handler failed: {}", std::string(msg.method_string()),
                              std::string(msg.target()), e.what());
                response = problem_response(make_problem(errc::internal, e.what()));
            }
        }
        if (alive.expired() || closed_) {
            break;
        }
        const auto took = Clock::now() - started;
        const auto us = std::chrono::duration_cast<std::chrono::microseconds>(took);
        count_response(response.route, response.status,
                       std::chrono::duration<double>(took).count());
        if (response.stream) {
            // The answer is a stream: it takes the connection over (as one socket type for unix
            // and TCP) for as long as it lasts; Server::close() still closes it.
            spdlog::debug("REST {} {} -> stream", std::string(msg.method_string()),
                          std::string(msg.target()).substr(0, 200));
            StreamConnection conn{asio::generic::stream_protocol::socket(std::move(socket)),
                                  std::move(buffer), std::move(msg), options_.server_header, {}};
            if (auto it = sessions_.find(id); it != sessions_.end()) {
                it->second.close = [&conn] {
                    if (conn.stop) {
                        conn.stop();
                        return;
                    }
                    error_code ignored;
                    conn.socket.cancel(ignored);
                    conn.socket.close(ignored);
                };
                it->second.expire = [] {};
            }
            co_await response.stream(conn);
            if (!alive.expired()) {
                forget(id);
            }
            error_code ignored;
            conn.socket.close(ignored);
            co_return;
        }
        // 503 is an expected answer (shutting down, an unresponsive machine), not a failure here.
        if (response.status >= 500 && response.status != 503) {
            spdlog::warn("REST {} {} -> {} ({} us): {}", std::string(msg.method_string()),
                         std::string(msg.target()).substr(0, 200), response.status, us.count(),
                         response.body.substr(0, 1000));
        } else if (spdlog::should_log(spdlog::level::debug)) {
            spdlog::debug("REST {} {} -> {} ({} us)", std::string(msg.method_string()),
                          std::string(msg.target()).substr(0, 200), response.status, us.count());
        }

        http::response<http::string_body> res{static_cast<http::status>(response.status),
                                              msg.version()};
        res.set(http::field::server, options_.server_header);
        for (const auto& [name, value] : response.headers) {
            res.set(name, value);
        }
        if (!response.content_type.empty()) {
            res.set(http::field::content_type, response.content_type);
        }
        res.body() = std::move(response.body);
        const bool keep = msg.keep_alive() && !draining_;
        res.keep_alive(keep);
        // RFC 9110 8.6: no Content-Length in a 204 (prepare_payload would add "0").
        if (response.status != 204) {
            res.prepare_payload();
        }
        // RFC 9110 9.3.2: a HEAD answer has the header of the answer, not its body.
        if (msg.method() == http::verb::head) {
            res.body().clear();
        }
        set_deadline(id, options_.request_timeout);
        co_await http::async_write(socket, res, use_ec(ec));
        if (alive.expired()) {
            co_return; // the server is gone with its map; the socket closes with this frame
        }
        clear_deadline(id);
        if (ec || !keep || timed_out) {
            break;
        }
    }
    if (!alive.expired()) {
        forget(id);
        socket.shutdown(asio::socket_base::shutdown_send, ec);
        socket.close(ec);
    }
}

} // namespace qm::rest
