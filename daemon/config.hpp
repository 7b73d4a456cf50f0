// SPDX-License-Identifier: GPL-2.0-or-later
// qmachined's configuration: embedded defaults (root: /var/lib/qmachined and /run/qmachined; a
// user: $XDG_STATE_HOME/qmachined and $XDG_RUNTIME_DIR/qmachined), an optional file with the same
// keys as the flags, then the command line (which wins).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <spdlog/common.h>

#include "libmachine/expected.hpp"

namespace qm::daemon {

struct Config
{
    std::string state_dir;   // definitions (persistent)
    std::string runtime_dir; // sockets, records, logs of running machines (tmpfs)
    spdlog::level::level_enum log_level = spdlog::level::info;
    std::string config_file; // empty: none
};

// What the command line asked for.
struct CommandLine
{
    Config config;
    bool help = false;
    bool version = false;
};

// The defaults for the current user (geteuid() == 0: the system paths) and environment.
// errc::invalid_argument when a user has neither XDG_RUNTIME_DIR nor HOME.
expected<Config> default_config();

// Parses argv: --state-dir DIR, --runtime-dir DIR, --log-level LEVEL (trace, debug, info, warn,
// error, critical, off), --config FILE, --help, --version; "--key=value" and "--key value" both.
// A config file given with --config is read and applied under the flags. errc::invalid_argument
// with a message for the user ("unknown option '--frob'", "--log-level: 'loud' is not one of ...",
// "/etc/q.conf:3: unknown key 'x'").
expected<CommandLine> parse_command_line(const std::vector<std::string>& args);

// Applies a configuration file's text to `config`: lines "key = value" (keys as the long flags
// without dashes: state-dir, runtime-dir, log-level), '#' comments, blank lines. Relative paths
// are an error. `origin` names the file in messages.
expected<void> apply_config_text(Config& config, const std::string& text, const std::string& origin);
// Reads and applies `path` (errc::system_error when it cannot be read).
expected<void> apply_config_file(Config& config, const std::string& path);

// Creates `dir` and missing parents, each new one mode 0700; checks that an existing `dir` is a
// directory owned by us and tightens it to 0700 (warning when it was looser). errc::system_error.
expected<void> ensure_private_dir(const std::string& dir);

// The --help text.
std::string usage();

} // namespace qm::daemon
