// SPDX-License-Identifier: GPL-2.0-or-later
// The front ends' error table (errc → HTTP status, problem type, D-Bus error name), written out
// by hand beside its contract proto/errors.json; errors_test checks that the two agree.
#include "daemon/supervisor/errors.hpp"

#include <array>

namespace qm::daemon {
namespace {

// In errc order, one row per value (errors_test walks [errc_first, errc_last]). Names, types and
// D-Bus names are public API: clients match on them. Statuses follow RFC 9110 section 15.
// Two lines a row, laid out by hand (clang-format would wrap each row differently).
// clang-format off
constexpr std::array<ErrorInfo, 22> table{{
    {errc::invalid_argument, "InvalidArgument", 400, "Invalid argument",
     "urn:qmachined:error:InvalidArgument", "org.qmachined1.Error.InvalidArgument"},
    {errc::invalid_state, "StateConflict", 409, "Not allowed in the machine's current state",
     "urn:qmachined:error:StateConflict", "org.qmachined1.Error.StateConflict"},
    {errc::timeout, "Timeout", 504, "Timed out",
     "urn:qmachined:error:Timeout", "org.qmachined1.Error.Timeout"},
    {errc::qmp_protocol, "QmpProtocol", 502, "QMP protocol error",
     "urn:qmachined:error:QmpProtocol", "org.qmachined1.Error.QmpProtocol"},
    {errc::qmp_message_too_large, "QmpMessageTooLarge", 502, "QMP message too large",
     "urn:qmachined:error:QmpMessageTooLarge", "org.qmachined1.Error.QmpMessageTooLarge"},
    {errc::qmp_command_failed, "QmpError", 422, "QMP command failed",
     "urn:qmachined:error:QmpError", "org.qmachined1.Error.QmpError"},
    {errc::qmp_disconnected, "QmpDisconnected", 503, "QMP connection lost",
     "urn:qmachined:error:QmpDisconnected", "org.qmachined1.Error.QmpDisconnected"},
    {errc::qmp_closed, "QmpClosed", 503, "QMP connection closed",
     "urn:qmachined:error:QmpClosed", "org.qmachined1.Error.QmpClosed"},
    {errc::connect_failed, "ConnectFailed", 502, "Cannot connect to the monitor",
     "urn:qmachined:error:ConnectFailed", "org.qmachined1.Error.ConnectFailed"},
    {errc::system_error, "SystemError", 500, "System call failed",
     "urn:qmachined:error:SystemError", "org.qmachined1.Error.SystemError"},
    {errc::spawn_failed, "SpawnFailed", 502, "Cannot start process",
     "urn:qmachined:error:SpawnFailed", "org.qmachined1.Error.SpawnFailed"},
    {errc::abnormal_shutdown, "AbnormalShutdown", 500, "Graceful shutdown failed",
     "urn:qmachined:error:AbnormalShutdown", "org.qmachined1.Error.AbnormalShutdown"},
    {errc::no_such_machine, "NoSuchMachine", 404, "No such machine",
     "urn:qmachined:error:NoSuchMachine", "org.qmachined1.Error.NoSuchMachine"},
    {errc::exists, "Exists", 409, "Machine already exists",
     "urn:qmachined:error:Exists", "org.qmachined1.Error.Exists"},
    {errc::launch_failed, "LaunchFailed", 502, "Machine could not be started",
     "urn:qmachined:error:LaunchFailed", "org.qmachined1.Error.LaunchFailed"},
    {errc::unresponsive, "Unresponsive", 503, "Machine's monitor does not answer",
     "urn:qmachined:error:Unresponsive", "org.qmachined1.Error.Unresponsive"},
    {errc::shutting_down, "ShuttingDown", 503, "qmachined is shutting down",
     "urn:qmachined:error:ShuttingDown", "org.qmachined1.Error.ShuttingDown"},
    {errc::limit_exceeded, "LimitExceeded", 429, "Limit exceeded",
     "urn:qmachined:error:LimitExceeded", "org.qmachined1.Error.LimitExceeded"},
    {errc::access_denied, "AccessDenied", 403, "Access denied",
     "urn:qmachined:error:AccessDenied", "org.qmachined1.Error.AccessDenied"},
    {errc::stale_generation, "StaleGeneration", 412, "Stale generation",
     "urn:qmachined:error:StaleGeneration", "org.qmachined1.Error.StaleGeneration"},
    {errc::internal, "Internal", 500, "Internal error",
     "urn:qmachined:error:Internal", "org.qmachined1.Error.Internal"},
    {errc::forbidden, "Forbidden", 403, "Forbidden by policy",
     "urn:qmachined:error:Forbidden", "org.qmachined1.Error.Forbidden"},
}};
// clang-format on

// The rows are in errc order without gaps, so a code's row is found by index.
constexpr bool in_errc_order()
{
    for (std::size_t i = 0; i < table.size(); ++i) {
        if (static_cast<int>(table[i].code) != static_cast<int>(errc_first) + static_cast<int>(i)) {
            return false;
        }
    }
    return table.back().code == errc_last;
}
static_assert(in_errc_order(), "error table rows must follow qm::errc, one per value");

const ErrorInfo& internal_row()
{
    return table[static_cast<std::size_t>(static_cast<int>(errc::internal) -
                                          static_cast<int>(errc_first))];
}

} // namespace

std::span<const ErrorInfo> error_table() noexcept
{
    return table;
}

const ErrorInfo& error_info(errc code) noexcept
{
    const int index = static_cast<int>(code) - static_cast<int>(errc_first);
    if (index < 0 || static_cast<std::size_t>(index) >= table.size()) {
        return internal_row();
    }
    return table[static_cast<std::size_t>(index)];
}

const ErrorInfo& error_info(const Error& error) noexcept
{
    if (error.code.category() != qm_category()) {
        return internal_row();
    }
    return error_info(static_cast<errc>(error.code.value()));
}

} // namespace qm::daemon
