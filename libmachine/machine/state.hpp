// SPDX-License-Identifier: GPL-2.0-or-later
// The run state of a machine, derived from QMP events and the process, never from replies alone.
#pragma once

#include <optional>
#include <span>
#include <string_view>

namespace qm {

// Public API via REST/D-Bus (the names of to_string()), do not change.
enum class MachineState {
    defined,      // not launched (or cleaned up after a shutdown)
    starting,     // process started, QMP not yet negotiated
    running,      // guest running (QMP status "running")
    paused,       // guest stopped: -S (prelaunch), `stop`, an error pause, ...
    stopping,     // SHUTDOWN seen or a shutdown asked for; the process has not exited yet
    stopped,      // the process exited normally, or was stopped by us
    crashed,      // the process died on its own: a signal we did not send or a non-zero exit
    failed,       // launch failed
    unresponsive, // the process lives but the monitor stopped answering
};

std::string_view to_string(MachineState s) noexcept;
// Every state, in the order above (metrics list each one, zeros included).
std::span<const MachineState> machine_states() noexcept;
std::optional<MachineState> machine_state_from_string(std::string_view s) noexcept;

// True for the states in which a QEMU process exists.
bool has_process(MachineState s) noexcept;

} // namespace qm
