// SPDX-License-Identifier: GPL-2.0-or-later
// Monitor addresses and the listening socket.
#include "libmachine/qmp/address.hpp"

#include <sys/socket.h>
#include <netinet/in.h>
#include <sys/un.h>
#include <unistd.h>

#include <charconv>
#include <memory>

#include <fmt/format.h>

#include "libmachine/deadline.hpp"

namespace qm::qmp {
namespace {

constexpr std::size_t max_unix_path = sizeof(sockaddr_un::sun_path) - 1;

expected<asio::generic::stream_protocol::endpoint> unix_endpoint(const std::string& path)
{
    if (path.empty() || path.size() > max_unix_path) {
        return fail(errc::invalid_argument,
                    fmt::format("unix socket path '{}' is empty or longer than {} bytes", path,
                                max_unix_path));
    }
    return asio::generic::stream_protocol::endpoint(asio::local::stream_protocol::endpoint(path));
}

// Resolves a TCP address to endpoints without blocking the loop.
awaitable<expected<asio::ip::tcp::resolver::results_type>> resolve(const Address& a)
{
    asio::ip::tcp::resolver resolver(co_await asio::this_coro::executor);
    error_code ec;
    auto results = co_await resolver.async_resolve(a.host, std::to_string(a.port),
                                                   asio::ip::tcp::resolver::numeric_service,
                                                   use_ec(ec));
    if (ec || results.empty()) {
        co_return fail(errc::connect_failed,
                       fmt::format("cannot resolve '{}': {}", a.host, ec.message()));
    }
    co_return results;
}

} // namespace

Address Address::unix_socket(std::string path)
{
    Address a;
    a.kind = Kind::unix_path;
    a.path = std::move(path);
    return a;
}

Address Address::tcp(std::string host, std::uint16_t port)
{
    Address a;
    a.kind = Kind::tcp;
    a.host = std::move(host);
    a.port = port;
    return a;
}

expected<Address> Address::parse(std::string_view text)
{
    if (text.starts_with("unix:")) {
        text.remove_prefix(5);
        if (text.empty()) {
            return fail(errc::invalid_argument, "empty unix socket path");
        }
        return unix_socket(std::string(text));
    }
    if (text.starts_with("/") || text.starts_with("./")) {
        return unix_socket(std::string(text));
    }
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos || colon == 0) {
        return fail(errc::invalid_argument,
                    fmt::format("monitor address '{}' is neither a path nor host:port", text));
    }
    std::string_view host = text.substr(0, colon);
    std::string_view port_text = text.substr(colon + 1);
    if (host.starts_with("[") && host.ends_with("]")) {
        host = host.substr(1, host.size() - 2);
    }
    unsigned port = 0;
    auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (ec != std::errc{} || end != port_text.data() + port_text.size() || port > 65535 ||
        host.empty()) {
        return fail(errc::invalid_argument, fmt::format("bad host:port '{}'", text));
    }
    return tcp(std::string(host), static_cast<std::uint16_t>(port));
}

std::string Address::to_string() const
{
    if (kind == Kind::unix_path) {
        return path;
    }
    if (host.find(':') != std::string::npos) {
        return fmt::format("[{}]:{}", host, port);
    }
    return fmt::format("{}:{}", host, port);
}

std::string Address::chardev_options() const
{
    if (kind == Kind::unix_path) {
        return "path=" + path;
    }
    return fmt::format("host={},port={}", host, port);
}

Listener::Listener(const asio::any_io_executor& ex) : acceptor_(ex) {}

Listener::Listener(Listener&&) noexcept = default;

Listener& Listener::operator=(Listener&& other) noexcept
{
    if (this != &other) {
        close();
        acceptor_ = std::move(other.acceptor_);
        address_ = std::move(other.address_);
    }
    return *this;
}

Listener::~Listener()
{
    close();
}

expected<Listener> Listener::open(const asio::any_io_executor& ex, const Address& address)
{
    Listener l(ex);
    error_code ec;
    asio::generic::stream_protocol::endpoint ep;
    if (address.kind == Address::Kind::unix_path) {
        auto uep = unix_endpoint(address.path);
        if (!uep) {
            return fail(uep.error());
        }
        ep = *uep;
    } else {
        auto ip = asio::ip::make_address(address.host, ec);
        if (ec) {
            return fail(errc::invalid_argument,
                        fmt::format("cannot listen on '{}': not a numeric address",
                                    address.host));
        }
        ep = asio::generic::stream_protocol::endpoint(asio::ip::tcp::endpoint(ip, address.port));
    }
    l.acceptor_.open(ep.protocol(), ec);
    if (!ec && address.kind == Address::Kind::tcp) {
        l.acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    }
    if (!ec) {
        l.acceptor_.bind(ep, ec);
        if (!ec) {
            // From here on the socket file is ours: close() removes it.
            l.address_ = address;
            l.acceptor_.listen(asio::socket_base::max_listen_connections, ec);
        }
    }
    if (ec) {
        l.close();
        return fail(errc::connect_failed,
                    fmt::format("cannot listen on '{}': {}", address.to_string(), ec.message()));
    }
    if (address.kind == Address::Kind::tcp) {
        auto local = l.acceptor_.local_endpoint(ec);
        if (!ec) {
            const auto* sa = reinterpret_cast<const sockaddr*>(local.data());
            if (sa->sa_family == AF_INET) {
                l.address_.port = ntohs(reinterpret_cast<const sockaddr_in*>(sa)->sin_port);
            } else if (sa->sa_family == AF_INET6) {
                l.address_.port = ntohs(reinterpret_cast<const sockaddr_in6*>(sa)->sin6_port);
            }
        }
    }
    return l;
}

awaitable<expected<Socket>> Listener::accept(std::chrono::milliseconds timeout)
{
    if (!acceptor_.is_open()) {
        co_return fail(errc::invalid_state, "listener is closed");
    }
    Deadline deadline(acceptor_.get_executor(), timeout, [this] {
        error_code ignored;
        acceptor_.cancel(ignored);
    });
    error_code ec;
    Socket socket(acceptor_.get_executor());
    co_await acceptor_.async_accept(socket, use_ec(ec));
    deadline.disarm();
    if (deadline.expired()) {
        co_return fail(errc::timeout, fmt::format("no connection on '{}' within {} ms",
                                                  address_.to_string(), timeout.count()));
    }
    if (ec) {
        co_return fail(errc::connect_failed,
                       fmt::format("cannot accept on '{}': {}", address_.to_string(), ec.message()));
    }
    co_return socket;
}

void Listener::close()
{
    if (acceptor_.is_open()) {
        error_code ignored;
        acceptor_.close(ignored);
        if (address_.kind == Address::Kind::unix_path && !address_.path.empty()) {
            ::unlink(address_.path.c_str());
        }
    }
    address_ = Address{};
}

int Listener::release()
{
    if (!acceptor_.is_open()) {
        return -1;
    }
    error_code ec;
    const int fd = acceptor_.release(ec);
    address_ = Address{};
    return ec ? -1 : fd;
}

awaitable<expected<Socket>> connect_socket(Address address, std::chrono::milliseconds timeout)
{
    auto ex = co_await asio::this_coro::executor;
    Socket socket(ex);
    std::vector<asio::generic::stream_protocol::endpoint> endpoints;
    if (address.kind == Address::Kind::unix_path) {
        auto ep = unix_endpoint(address.path);
        if (!ep) {
            co_return fail(ep.error());
        }
        endpoints.push_back(*ep);
    } else {
        auto results = co_await resolve(address);
        if (!results) {
            co_return fail(results.error());
        }
        for (const auto& r : *results) {
            endpoints.emplace_back(r.endpoint());
        }
    }
    // The deadline closes the socket, which ends a pending connect with operation_aborted.
    Deadline deadline(ex, timeout, [&socket] {
        error_code ignored;
        socket.close(ignored);
    });
    error_code ec;
    for (const auto& ep : endpoints) {
        error_code ignored;
        socket.close(ignored);
        socket.open(ep.protocol(), ec);
        if (ec) {
            continue;
        }
        co_await socket.async_connect(ep, use_ec(ec));
        if (!ec || deadline.expired()) {
            break;
        }
    }
    deadline.disarm();
    if (deadline.expired()) {
        co_return fail(errc::timeout, fmt::format("cannot connect to '{}' within {} ms",
                                                  address.to_string(), timeout.count()));
    }
    if (ec) {
        co_return fail(errc::connect_failed, fmt::format("cannot connect to '{}': {}",
                                                         address.to_string(), ec.message()));
    }
    co_return std::move(socket);
}

} // namespace qm::qmp
