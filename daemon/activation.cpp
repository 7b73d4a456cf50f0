// SPDX-License-Identifier: GPL-2.0-or-later
#include "daemon/activation.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>

#include "libmachine/asio.hpp"

namespace qm::daemon {

namespace {

std::string unix_path_of(int fd)
{
    sockaddr_un addr{};
    socklen_t len = sizeof addr;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
        len <= offsetof(sockaddr_un, sun_path) || addr.sun_path[0] == '\0') {
        return {};
    }
    const auto max = len - offsetof(sockaddr_un, sun_path);
    return std::string(addr.sun_path, ::strnlen(addr.sun_path, max));
}

// The address and port a TCP socket is bound to, as "127.0.0.1:8080" or "[::1]:8080", and
// whether it is a loopback address, by rest-listen's rule (asio's is_loopback, as config.cpp).
std::pair<std::string, bool> tcp_address_of(int fd)
{
    asio::ip::tcp::endpoint ep;
    socklen_t len = static_cast<socklen_t>(ep.capacity());
    if (::getsockname(fd, ep.data(), &len) != 0) {
        return {"?", false};
    }
    ep.resize(len);
    const auto address = ep.address();
    std::string text = address.is_v6()
                           ? fmt::format("[{}]:{}", address.to_string(), ep.port())
                           : fmt::format("{}:{}", address.to_string(), ep.port());
    return {std::move(text), address.is_loopback()};
}

} // namespace

expected<ActivatedSockets> take_activated_sockets()
{
    char** names = nullptr;
    // unset_environment = 1: LISTEN_* go now, whatever follows.
    const int n = ::sd_listen_fds_with_names(1, &names);
    if (n < 0) {
        return fail(errc::invalid_argument,
                    fmt::format("cannot read the sockets passed by the service manager "
                                "(LISTEN_FDS): {}",
                                std::strerror(-n)));
    }
    std::vector<std::string> fd_names;
    for (int i = 0; i < n; ++i) {
        fd_names.emplace_back(names != nullptr && names[i] != nullptr ? names[i] : "unknown");
    }
    if (names != nullptr) {
        for (int i = 0; names[i] != nullptr; ++i) {
            std::free(names[i]);
        }
        std::free(names);
    }
    ActivatedSockets out;
    auto refuse = [&](int fd, const std::string& why) -> expected<ActivatedSockets> {
        for (int i = 0; i < n; ++i) {
            ::close(SD_LISTEN_FDS_START + i);
        }
        return fail(errc::invalid_argument,
                    fmt::format("socket activation: descriptor {} (named '{}') {}", fd,
                                fd_names[static_cast<std::size_t>(fd - SD_LISTEN_FDS_START)], why));
    };
    for (int i = 0; i < n; ++i) {
        const int fd = SD_LISTEN_FDS_START + i;
        // sd_listen_fds(3) leaves them close-on-exec, but say what we need.
        ::fcntl(fd, F_SETFD, FD_CLOEXEC);
        if (::sd_is_socket_unix(fd, SOCK_STREAM, 1, nullptr, 0) > 0) {
            if (out.unix_fd >= 0) {
                return refuse(fd, "is a second unix socket: qmachined serves REST on one");
            }
            out.unix_fd = fd;
            out.unix_path = unix_path_of(fd);
        } else if (::sd_is_socket_inet(fd, AF_UNSPEC, SOCK_STREAM, 1, 0) > 0) {
            if (out.tcp_fd >= 0) {
                return refuse(fd, "is a second TCP socket: qmachined serves REST on one");
            }
            out.tcp_fd = fd;
            std::tie(out.tcp_address, out.tcp_loopback) = tcp_address_of(fd);
        } else {
            return refuse(fd, "is not a listening stream socket (unix or TCP): the REST API "
                              "needs ListenStream=");
        }
    }
    return out;
}

} // namespace qm::daemon
