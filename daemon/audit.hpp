// SPDX-License-Identifier: GPL-2.0-or-later
// Audit lines: who asked for which mutating operation on which machine, and how it ended. One
// info line per call, written by the front ends (REST now, D-Bus later) once the call completed.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include <sys/types.h>

namespace spdlog {
class formatter;
}

namespace qm::daemon {

// Who made a call, as the audit line names it: "uid=1000 pid=4242" (a unix socket or D-Bus peer),
// "tcp=127.0.0.1:5555 token" (a TCP peer that presented the bearer token).
struct Caller
{
    std::string description;
};

// A local peer by its credentials.
Caller unix_caller(uid_t uid, pid_t pid);
// The peer of the connected unix socket `fd`, from SO_PEERCRED (the credentials at connect(), so
// it is read once per connection); "uid=? pid=?" when the kernel does not say.
Caller unix_socket_caller(int fd);
// A TCP peer ("tcp=[::1]:5555 token" for IPv6). Every request on TCP carries the token, so the
// peer is described as one holding it.
Caller tcp_caller(std::string_view address, std::uint16_t port);

// The audit line: `audit: op=start machine=web1 result=ok caller="uid=0 pid=123"`. `op` is the
// operation (create, update, delete, start, stop, kill, pause, resume, restart, qmp:<command>,
// console-write), `result` is ok or the error's name from proto/errors.json (Forbidden,
// StateConflict, ...). A value that is empty or holds a space, '"', '\\', '=' or a byte outside
// printable ASCII is quoted, with C escapes inside (a name from a URL cannot forge a second line
// or field); values are cut at 256 bytes.
std::string audit_line(const Caller& caller, std::string_view op, std::string_view machine,
                       std::string_view result);
// Logs audit_line() through spdlog at info.
void audit(const Caller& caller, std::string_view op, std::string_view machine,
           std::string_view result);

// The daemon log's formatter: "LEVEL: MESSAGE", after the time unless the journal stamps lines
// (`with_time`). In MESSAGE a line feed, a carriage return and every other control byte but the
// tab is escaped ("\n", "\r", "\x1b"): whatever a message quotes (a client's argument, QEMU's
// output, a command line) stays on its own line, so no caller can write a line that looks like
// the daemon's own (a forged audit line).
std::unique_ptr<spdlog::formatter> make_log_formatter(bool with_time);

} // namespace qm::daemon
