// SPDX-License-Identifier: GPL-2.0-or-later
// MachineState names (a table, as systemd's xxx_to_string).
#include "libmachine/machine/state.hpp"

#include <array>
#include <utility>

namespace qm {
namespace {

constexpr std::array<std::pair<MachineState, std::string_view>, 9> names{{
    {MachineState::defined, "defined"},
    {MachineState::starting, "starting"},
    {MachineState::running, "running"},
    {MachineState::paused, "paused"},
    {MachineState::stopping, "stopping"},
    {MachineState::stopped, "stopped"},
    {MachineState::crashed, "crashed"},
    {MachineState::failed, "failed"},
    {MachineState::unresponsive, "unresponsive"},
}};

constexpr auto states = [] {
    std::array<MachineState, names.size()> out{};
    for (std::size_t i = 0; i < names.size(); ++i) {
        out[i] = names[i].first;
    }
    return out;
}();

} // namespace

std::string_view to_string(MachineState s) noexcept
{
    for (const auto& [state, name] : names) {
        if (state == s) {
            return name;
        }
    }
    return "unknown";
}

std::span<const MachineState> machine_states() noexcept
{
    return states;
}

std::optional<MachineState> machine_state_from_string(std::string_view s) noexcept
{
    for (const auto& [state, name] : names) {
        if (name == s) {
            return state;
        }
    }
    return std::nullopt;
}

bool has_process(MachineState s) noexcept
{
    switch (s) {
    case MachineState::starting:
    case MachineState::running:
    case MachineState::paused:
    case MachineState::stopping:
    case MachineState::unresponsive: return true;
    default: return false;
    }
}

} // namespace qm
