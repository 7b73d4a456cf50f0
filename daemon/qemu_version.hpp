// SPDX-License-Identifier: GPL-2.0-or-later
// What QEMU binary a daemon runs by default: its `--version`, asked once at start-up, on the loop.
#pragma once

#include <string>

#include "daemon/rest/api.hpp"
#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"

namespace qm::daemon {

// Runs `binary --version` (no shell; output through a pipe the loop reads; the child reaped by
// the ChildWatcher) and parses "QEMU emulator version 7.2.22 (Debian ...)". errc::spawn_failed,
// errc::timeout (no answer within 10 s: the child is killed), errc::invalid_argument (output
// without a version).
awaitable<expected<rest::QemuVersion>> probe_qemu_version(std::string binary);

// The version number in the first line of `qemu --version`'s output ("7.2.22"); empty if none.
std::string parse_qemu_version(std::string_view text);

} // namespace qm::daemon
