// SPDX-License-Identifier: GPL-2.0-or-later
// What /proc says of a process, to recognise it again after a restart: its start time (which rules
// out a reused pid), its command line, and a pidfd that names it for good.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "libmachine/expected.hpp"

namespace qm::proc {

// The process's start time in clock ticks since boot (/proc/PID/stat, field 22). Two processes
// that had the same pid have different start times. errc::system_error (no such process, or
// /proc unreadable), errc::invalid_argument (a stat line we cannot parse).
expected<std::uint64_t> process_start_time(pid_t pid);

// The command line of a live process (/proc/PID/cmdline split at NUL). A zombie's is empty.
expected<std::vector<std::string>> process_cmdline(pid_t pid);

// A pidfd for `pid` (O_CLOEXEC; the caller owns it). errc::system_error (ESRCH: no such process).
expected<int> open_pidfd(pid_t pid);

// Sends `signal` through a pidfd: never to another process that reused the pid. A process that is
// already gone is not an error.
expected<void> pidfd_signal(int pidfd, int signal);

// 16 hex digits of a 64-bit FNV-1a hash of the arguments, each followed by a NUL (the layout of
// /proc/PID/cmdline): equal command lines hash equal.
std::string hash_command_line(const std::vector<std::string>& argv);

// This boot's id (/proc/sys/kernel/random/boot_id), empty when unreadable.
std::string boot_id();

} // namespace qm::proc
