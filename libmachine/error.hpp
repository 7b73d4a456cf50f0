// SPDX-License-Identifier: GPL-2.0-or-later
// The one error vocabulary of qmachined: qm::errc (a boost::system category) and qm::Error.
#pragma once

#include <exception>
#include <string>
#include <type_traits>

#include <boost/system/error_code.hpp>

namespace qm {

// Each value is a failure a caller must be able to tell apart. Front ends map every value to an
// HTTP status and a D-Bus error name (tests check that the tables are complete). The numeric values
// are not part of any wire format; the names from to_string() are (Public API, do not change).
enum class errc { // NOLINT(readability-identifier-naming): mirrors std::errc
    // The caller's request is malformed (bad name, bad JSON, option not negotiated, ...).
    invalid_argument = 1,
    // The object is not in a state that allows the operation (not connected, already launched, ...).
    invalid_state,
    // An operation did not complete before its deadline.
    timeout,
    // The peer broke the QMP protocol: malformed JSON, a message of the wrong shape, an error
    // reply without an id, a bad greeting. The connection is closed.
    qmp_protocol,
    // A QMP message exceeded the configured maximum size. The connection is closed.
    qmp_message_too_large,
    // QEMU answered a command with {"error": ...}; Error::qmp_class / qmp_desc carry it.
    qmp_command_failed,
    // The QMP connection is gone (EOF, reset, write failure); pending commands fail with this.
    qmp_disconnected,
    // The QMP connection was closed on our side (close() was called).
    qmp_closed,
    // Could not connect to, listen on or accept a monitor socket.
    connect_failed,
    // A system call failed (the message carries which and errno's text).
    system_error,
    // Could not start a process.
    spawn_failed,
    // A graceful shutdown failed (no exit in time, QMP error) and the process was killed.
    abnormal_shutdown,

    // The supervisor's own failures (qmachined; libmachine never returns these).
    // No machine has that name.
    no_such_machine,
    // A machine with that name (or uuid) already exists.
    exists,
    // A machine could not be started: QEMU did not start, exited or never answered QMP (the
    // message carries the command line and the tail of QEMU's output).
    launch_failed,
    // The machine's monitor stopped answering (the liveness probe failed); QMP is refused until
    // it answers again or the process exits.
    unresponsive,
    // The daemon is shutting down and takes no new operations.
    shutting_down,
    // A limit was reached (machines, subscribers, request size, rate).
    limit_exceeded,
    // The caller is not allowed to do this.
    access_denied,
    // An update named a generation that is no longer the current one.
    stale_generation,
    // A bug: an exception escaped an operation. The message says what it was.
    internal,
    // qmachined's policy refuses the request whoever asks (a QMP command denied for passthrough:
    // human-monitor-command, getfd, migrate to exec:, ...); the configuration can change it.
    forbidden,
};
// Every errc is in [errc_first, errc_last], without gaps (tests walk the range).
inline constexpr errc errc_first = errc::invalid_argument;
inline constexpr errc errc_last = errc::forbidden;

const boost::system::error_category& qm_category() noexcept;

inline boost::system::error_code make_error_code(errc e) noexcept
{
    return {static_cast<int>(e), qm_category()};
}

// The stable snake_case name of an errc ("qmp_command_failed"); "unknown" for anything else.
const char* to_string(errc e) noexcept;

// A failure: its code, a short message for users ("query-status: The command is not allowed"),
// and, for QMP error replies, QEMU's class and desc. The full JSON goes to the debug log only.
struct Error
{
    boost::system::error_code code;
    std::string message;
    std::string qmp_class;
    std::string qmp_desc;

    bool is(errc e) const noexcept { return code == make_error_code(e); }
};

// What an exception that escaped a coroutine says ("unknown exception" for a non-std one), for
// the completion handlers of co_spawn, which log it.
std::string describe_exception(const std::exception_ptr& e);

} // namespace qm

template <>
struct boost::system::is_error_code_enum<qm::errc> : std::true_type
{};
