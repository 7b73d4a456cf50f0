// SPDX-License-Identifier: GPL-2.0-or-later
// The "qmachined" error category and the errc name table.
#include "libmachine/error.hpp"

#include <array>
#include <utility>

namespace qm {
namespace {

// Public API via REST/D-Bus (error names derive from these), do not change.
constexpr std::array<std::pair<errc, const char*>, 22> errc_names{{
    {errc::invalid_argument, "invalid_argument"},
    {errc::invalid_state, "invalid_state"},
    {errc::timeout, "timeout"},
    {errc::qmp_protocol, "qmp_protocol"},
    {errc::qmp_message_too_large, "qmp_message_too_large"},
    {errc::qmp_command_failed, "qmp_command_failed"},
    {errc::qmp_disconnected, "qmp_disconnected"},
    {errc::qmp_closed, "qmp_closed"},
    {errc::connect_failed, "connect_failed"},
    {errc::system_error, "system_error"},
    {errc::spawn_failed, "spawn_failed"},
    {errc::abnormal_shutdown, "abnormal_shutdown"},
    {errc::no_such_machine, "no_such_machine"},
    {errc::exists, "exists"},
    {errc::launch_failed, "launch_failed"},
    {errc::unresponsive, "unresponsive"},
    {errc::shutting_down, "shutting_down"},
    {errc::limit_exceeded, "limit_exceeded"},
    {errc::access_denied, "access_denied"},
    {errc::stale_generation, "stale_generation"},
    {errc::internal, "internal"},
    {errc::forbidden, "forbidden"},
}};

// NOLINTNEXTLINE(cppcoreguidelines-virtual-class-destructor): one static instance, never deleted
class Category final : public boost::system::error_category
{
public:
    const char* name() const noexcept override { return "qmachined"; }
    std::string message(int ev) const override
    {
        switch (static_cast<errc>(ev)) {
        case errc::invalid_argument: return "invalid argument";
        case errc::invalid_state: return "operation not allowed in the current state";
        case errc::timeout: return "timed out";
        case errc::qmp_protocol: return "QMP protocol error";
        case errc::qmp_message_too_large: return "QMP message too large";
        case errc::qmp_command_failed: return "QMP command failed";
        case errc::qmp_disconnected: return "QMP connection lost";
        case errc::qmp_closed: return "QMP connection closed";
        case errc::connect_failed: return "cannot connect to the monitor";
        case errc::system_error: return "system call failed";
        case errc::spawn_failed: return "cannot start process";
        case errc::abnormal_shutdown: return "could not perform graceful shutdown";
        case errc::no_such_machine: return "no such machine";
        case errc::exists: return "machine already exists";
        case errc::launch_failed: return "machine could not be started";
        case errc::unresponsive: return "the machine's monitor does not answer";
        case errc::shutting_down: return "the daemon is shutting down";
        case errc::limit_exceeded: return "limit exceeded";
        case errc::access_denied: return "access denied";
        case errc::stale_generation: return "the spec was changed since that generation";
        case errc::internal: return "internal error";
        case errc::forbidden: return "forbidden by qmachined's policy";
        }
        return "unknown qmachined error";
    }
};

} // namespace

const boost::system::error_category& qm_category() noexcept
{
    static const Category category;
    return category;
}

std::string describe_exception(const std::exception_ptr& e)
{
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& ex) {
        return ex.what();
    } catch (...) { // NOLINT(bugprone-empty-catch): not a std::exception, nothing to say
    }
    return "unknown exception";
}

const char* to_string(errc e) noexcept
{
    for (const auto& [code, name] : errc_names) {
        if (code == e) {
            return name;
        }
    }
    return "unknown";
}

} // namespace qm
