// SPDX-License-Identifier: GPL-2.0-or-later
// The service manager's side of sd_notify(3) for tests: a datagram socket that receives what
// qmachined sends to $NOTIFY_SOCKET, with each sender's pid (as systemd's NotifyAccess= reads it),
// and ScopedEnv, which sets an environment variable the daemons a test starts inherit. Shared by
// the daemon and systemd suites.
#pragma once

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "tests/daemon/machine_daemon.hpp"

namespace qm::test {

using namespace std::chrono_literals;

// One datagram: its text and the sender's pid (SCM_CREDENTIALS, as systemd reads it).
struct Datagram
{
    std::string text;
    pid_t pid = 0;
};

// The value of `key` in a notification ("READY=1\nSTATUS=x": "STATUS" -> "x"), or nullopt.
inline std::optional<std::string> field(const std::string& message, const std::string& key)
{
    for (const auto& line : lines_with(message, "=")) {
        if (line.starts_with(key + "=")) {
            return line.substr(key.size() + 1);
        }
    }
    return std::nullopt;
}

// The test's NOTIFY_SOCKET: a datagram socket bound at `address` (a path, or "@name": abstract).
class NotifyListener
{
public:
    explicit NotifyListener(std::string address) : address_(std::move(address))
    {
        fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::memcpy(addr.sun_path, address_.data(), address_.size());
        socklen_t length = offsetof(sockaddr_un, sun_path) + address_.size();
        if (address_[0] == '@') {
            addr.sun_path[0] = '\0';
        } else {
            ++length;
        }
        if (::bind(fd_, reinterpret_cast<const sockaddr*>(&addr), length) != 0) {
            error_ = std::strerror(errno);
        }
        const int on = 1;
        ::setsockopt(fd_, SOL_SOCKET, SO_PASSCRED, &on, sizeof on);
    }
    ~NotifyListener()
    {
        ::close(fd_);
        if (address_[0] == '/') {
            ::unlink(address_.c_str());
        }
    }
    NotifyListener(const NotifyListener&) = delete;
    NotifyListener& operator=(const NotifyListener&) = delete;

    const std::string& address() const { return address_; }
    const std::string& error() const { return error_; }

    // The next datagram within `deadline`.
    std::optional<Datagram> next(std::chrono::milliseconds deadline)
    {
        pollfd p{fd_, POLLIN, 0};
        if (::poll(&p, 1, static_cast<int>(deadline.count())) != 1) {
            return std::nullopt;
        }
        char buf[4096];
        alignas(cmsghdr) char control[CMSG_SPACE(sizeof(ucred))];
        iovec iov{buf, sizeof buf};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        const ssize_t n = ::recvmsg(fd_, &msg, MSG_DONTWAIT);
        if (n < 0) {
            return std::nullopt;
        }
        Datagram d{std::string(buf, static_cast<std::size_t>(n)), 0};
        for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_CREDENTIALS) {
                ucred cred{};
                std::memcpy(&cred, CMSG_DATA(c), sizeof cred);
                d.pid = cred.pid;
            }
        }
        received_.push_back(d);
        return d;
    }

    // Reads until a datagram contains `text` (within `deadline`); that one.
    std::optional<Datagram> wait_for(const std::string& text,
                                     std::chrono::milliseconds deadline = 30s)
    {
        const auto end = std::chrono::steady_clock::now() + deadline;
        for (;;) {
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                end - std::chrono::steady_clock::now());
            if (left.count() <= 0) {
                return std::nullopt;
            }
            auto d = next(left);
            if (d && d->text.find(text) != std::string::npos) {
                return d;
            }
        }
    }

    // Everything read so far, for failure messages.
    std::string history() const
    {
        std::string out;
        for (const auto& d : received_) {
            out += fmt::format("[{}] {}\n", d.pid, d.text);
        }
        return out;
    }
    const std::vector<Datagram>& received() const { return received_; }

private:
    std::string address_;
    int fd_ = -1;
    std::string error_;
    std::vector<Datagram> received_;
};

// Sets an environment variable for the life of the object (DaemonProcess passes the test's
// environment on).
class ScopedEnv
{
public:
    ScopedEnv(const char* name, const std::string& value) : name_(name)
    {
        ::setenv(name, value.c_str(), 1);
    }
    ~ScopedEnv() { ::unsetenv(name_); }
    ScopedEnv(const ScopedEnv&) = delete;
    ScopedEnv& operator=(const ScopedEnv&) = delete;

private:
    const char* name_;
};

} // namespace qm::test
