// SPDX-License-Identifier: GPL-2.0-or-later
// The tail of a log file, for the front ends (REST's /log routes, D-Bus's GetLog).
#pragma once

#include <cstddef>
#include <optional>
#include <string>

#include "libmachine/expected.hpp"

namespace qm::daemon {

// The last `max_lines` lines (all with nullopt) of the last `limit` bytes of the file at `path`;
// empty when it does not exist. errc::system_error when it cannot be read.
expected<std::string> read_log_tail(const std::string& path, std::optional<std::size_t> max_lines,
                                    std::size_t limit);

} // namespace qm::daemon
