// SPDX-License-Identifier: GPL-2.0-or-later
// Socket activation (sd_listen_fds(3)): the listening sockets a service manager passed
// (qmachined.socket, systemd-socket-activate), taken once at start-up.
#pragma once

#include <string>

#include "libmachine/expected.hpp"

namespace qm::daemon {

// The REST listeners the manager passed: at most one unix stream socket and one TCP socket, both
// listening. -1: none passed. The descriptors are close-on-exec and owned by the caller (the REST
// server adopts them).
struct ActivatedSockets
{
    int unix_fd = -1;
    std::string unix_path; // where the unix socket is bound ("" for an abstract or unnamed one)
    int tcp_fd = -1;
    std::string tcp_address; // "127.0.0.1:8080", "[::1]:8080"
    bool tcp_loopback = false; // bound to 127.0.0.0/8 or ::1 (rest-listen's rule)

    bool any() const noexcept { return unix_fd >= 0 || tcp_fd >= 0; }
};

// Takes the sockets of $LISTEN_FDS (for this process: $LISTEN_PID) and removes LISTEN_FDS,
// LISTEN_PID and LISTEN_FDNAMES from the environment, so QEMU never sees them. Nothing passed:
// an empty result. errc::invalid_argument, naming the descriptor (and its FileDescriptorName=),
// for one that is neither a listening unix stream socket nor a listening TCP socket, or a second
// one of a kind; every passed descriptor is closed then.
expected<ActivatedSockets> take_activated_sockets();

} // namespace qm::daemon
