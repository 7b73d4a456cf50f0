// SPDX-License-Identifier: GPL-2.0-or-later
// The QMP passthrough policy: the default deny set and the check.
#include "daemon/supervisor/qmp_policy.hpp"

#include <algorithm>
#include <array>

#include <fmt/format.h>

namespace qm::daemon {
namespace {

// Sorted by command (a test checks it).
constexpr std::array<DeniedQmpCommand, 5> default_denied{{
    {"add-fd", false,
     "adds a descriptor sent by the client to an fd set: qmachined owns fd passing"},
    {"getfd", false, "names a descriptor sent by the client: qmachined owns fd passing"},
    {"human-monitor-command", false,
     "HMP can do what the policy refuses in QMP (and more: it has no schema to check)"},
    {"migrate", true, "an exec: URI runs a program on the host (migration/exec.c)"},
    {"migrate-incoming", true, "an exec: URI runs a program on the host (migration/exec.c)"},
}};

bool contains(const std::vector<std::string>& names, std::string_view command)
{
    return std::find(names.begin(), names.end(), command) != names.end();
}

// Whether migrate or migrate-incoming `arguments` would run a program: a `uri` with the exec:
// prefix (QEMU matches it exactly, strstart() in migration.c), or, in QEMU 8.2 and later, a
// channel whose address has the exec transport.
bool runs_a_program(const json::Value* arguments)
{
    if (arguments == nullptr) {
        return false;
    }
    if (auto uri = json::get_string(*arguments, "uri"); uri && uri->starts_with("exec:")) {
        return true;
    }
    const json::Value* channels = json::find(*arguments, "channels");
    if (channels == nullptr || !channels->IsArray()) {
        return false;
    }
    for (const auto& channel : channels->GetArray()) {
        const json::Value* addr = json::find(channel, "addr");
        if (addr != nullptr && json::get_string(*addr, "transport") == "exec") {
            return true;
        }
    }
    return false;
}

} // namespace

std::span<const DeniedQmpCommand> default_denied_qmp_commands() noexcept
{
    return default_denied;
}

expected<void> QmpPolicy::check(std::string_view command, const json::Value* arguments) const
{
    if (contains(deny, command)) {
        return fail(
            errc::forbidden,
            fmt::format("QMP command '{}' is denied by qmachined's policy (qmp-deny)", command));
    }
    const auto it = std::find_if(default_denied.begin(), default_denied.end(),
                                 [&](const DeniedQmpCommand& d) { return d.command == command; });
    if (it == default_denied.end() || contains(allow, command)) {
        return {};
    }
    if (!it->exec_uri_only) {
        return fail(errc::forbidden,
                    fmt::format("QMP command '{}' is denied by qmachined's policy (qmp-allow "
                                "lifts it)",
                                command));
    }
    if (runs_a_program(arguments)) {
        return fail(errc::forbidden,
                    fmt::format("QMP command '{}' with an exec: URI is denied by qmachined's "
                                "policy: it runs a program on the host (qmp-allow lifts it)",
                                command));
    }
    return {};
}

bool valid_qmp_command_name(std::string_view name) noexcept
{
    return !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
               c == '_' || c == '-';
    });
}

} // namespace qm::daemon
