// SPDX-License-Identifier: GPL-2.0-or-later
// qmachinectl console: a machine's serial console on this terminal, over the console WebSocket.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "daemon/ctl/client.hpp"

namespace qm::ctl {

struct ConsoleOptions
{
    std::string machine;
    bool read_only = false; // attach as a watcher (?mode=read): stdin is not read
    char escape = 0x1d;     // the key that leaves (Ctrl-]); 0: none
    bool banner = true;     // say on stderr how to leave, and why the console ended
};

// "^]" -> 0x1d, "^A" -> 0x01, "none" -> 0; nullopt for anything else.
std::optional<char> parse_escape(std::string_view text);

// Attaches to the console of options.machine and copies its bytes to stdout (and stdin's to it,
// unless read-only) until the escape key, SIGINT (read-only, or when stdin is not a terminal),
// SIGTERM or SIGHUP, or the daemon closing it. A terminal on stdin is in raw mode meanwhile and is
// restored on every way out. The exit status: 0 when the user left or the console ended (the
// machine stopped, qmachined went down), 1 when the daemon refused or ended it for another reason
// (another writer: 4409), 3 when qmachined cannot be reached, 128 + the signal for SIGTERM and
// SIGHUP.
int run_console(Client& client, const ConsoleOptions& options);

} // namespace qm::ctl
