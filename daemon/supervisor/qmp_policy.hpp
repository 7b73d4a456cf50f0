// SPDX-License-Identifier: GPL-2.0-or-later
// The QMP passthrough policy: which commands a client may send to a machine's QEMU through
// qmachined. Whoever may use the API must not get the host (or qmachined's role) through QMP.
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "libmachine/expected.hpp"
#include "libmachine/json.hpp"

namespace qm::daemon {

// A command of the default deny set and why it is there.
struct DeniedQmpCommand
{
    std::string_view command;
    // Denied only when its `uri` starts with "exec:" (or a channel's transport is exec).
    bool exec_uri_only;
    std::string_view why;
};

// The default deny set, sorted by command: human-monitor-command (HMP can do anything QMP cannot
// refuse), getfd and add-fd (descriptors come from qmachined only), migrate and migrate-incoming
// to exec: (runs a program on the host).
std::span<const DeniedQmpCommand> default_denied_qmp_commands() noexcept;

// A plain value, copied into SupervisorOptions; used from the loop thread. check() returns
// errc::forbidden for a denied command, with a message naming it and how the policy changes.
struct QmpPolicy
{
    // Commands lifted from the default deny set ("human-monitor-command"; "migrate" lifts the
    // exec: check as well). The configuration's qmp-allow.
    std::vector<std::string> allow{};
    // Commands denied besides the default set; deny wins over allow. The configuration's qmp-deny.
    std::vector<std::string> deny{};

    // Whether `command` with `arguments` (an object, or nullptr for none) may pass through.
    expected<void> check(std::string_view command, const json::Value* arguments) const;
};

// Whether `name` can be a QMP command name in qmp-allow or qmp-deny: [A-Za-z0-9_-]+ (QAPI names
// use nothing else).
bool valid_qmp_command_name(std::string_view name) noexcept;

} // namespace qm::daemon
