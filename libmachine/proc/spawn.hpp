// SPDX-License-Identifier: GPL-2.0-or-later
// Starting a child process without a shell: argv as given, stdin from /dev/null, stdout and
// stderr appended to a log file (as the seed does: a file outlives us, a pipe would not).
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "libmachine/expected.hpp"

namespace qm::proc {

struct SpawnOptions
{
    // Where stdout and stderr go (created 0600, appended to); empty means /dev/null.
    std::string log_path{};
    // Instead of log_path: an open descriptor for stdout and stderr (the caller keeps it).
    int log_fd = -1;
    // Start the child in a session of its own, so signals to our process group do not reach it.
    bool new_session = true;
    // Descriptors the child inherits, as 3, 4, 5, ... in this order (see inherited_fd_number).
    // Every other descriptor is closed in the child, whatever its O_CLOEXEC flag.
    std::vector<int> inherit_fds{};
    // Credentials of the child, set before exec (as libvirt does, not with QEMU's -runas, which
    // QEMU 7.2 applies after its seccomp filter): supplementary groups first, then the group,
    // then the user. Setting any of them needs the privilege to (CAP_SETUID/CAP_SETGID); a child
    // that cannot drop them never runs the program (spawn fails, naming the step).
    std::optional<uid_t> uid{};
    std::optional<gid_t> gid{};
    std::vector<gid_t> groups{};
};

// The descriptor number the child sees for inherit_fds[index].
constexpr int inherited_fd_number(std::size_t index)
{
    return 3 + static_cast<int>(index);
}

// Starts argv[0] (searched in PATH when it has no '/'). The caller owns the pid and must reap it.
// errc::invalid_argument (empty argv), errc::spawn_failed (naming argv[0] and the reason).
expected<pid_t> spawn(const std::vector<std::string>& argv, const SpawnOptions& options = {});

// The command line for messages and logs, each argument quoted when it needs to be.
std::string format_command_line(const std::vector<std::string>& argv);

} // namespace qm::proc
