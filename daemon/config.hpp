// SPDX-License-Identifier: GPL-2.0-or-later
// qmachined's configuration: embedded defaults (root: /var/lib/qmachined and /run/qmachined; a
// user: $XDG_STATE_HOME/qmachined and $XDG_RUNTIME_DIR/qmachined), an optional file with the same
// keys as the flags, then the command line (which wins).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string_view>
#include <utility>
#include <string>
#include <vector>

#include <sys/types.h>

#include <spdlog/common.h>

#include "daemon/supervisor/qmp_policy.hpp"
#include "libmachine/expected.hpp"

namespace qm::daemon {

// What happens to running machines when qmachined stops (SIGTERM, systemctl stop).
enum class ShutdownPolicy {
    leave_running, // they keep running; the next qmachined takes them over (the default)
    stop_machines, // each is stopped by its spec's shutdown (graceful, then killed)
};
// "leave-running", "stop-machines".
const char* to_string(ShutdownPolicy p) noexcept;

struct Config
{
    std::string state_dir;   // definitions (persistent)
    std::string runtime_dir; // sockets, records, logs of running machines (tmpfs)
    spdlog::level::level_enum log_level = spdlog::level::info;
    std::string config_file; // empty: none
    bool log_level_from_flag = false; // --log-level was given (it wins over the file's, at reload too)

    // REST (keys rest-*; see usage()).
    std::string rest_socket;     // the unix socket; empty: <runtime_dir>/qmachined.sock; "none": none
    std::string rest_listen;     // "127.0.0.1:8080", "[::1]:8080"; empty: no TCP listener
    bool rest_allow_remote = false; // rest-listen may name a non-loopback address
    std::string rest_token_file; // empty: <state_dir>/rest.token
    std::size_t rest_max_connections = 1024;
    std::size_t rest_max_subscribers = 1024; // open event streams
    // The D-Bus: "system", "user", "none" or an address; empty: system as root, user otherwise.
    std::string bus;
    // The event stream (keys event-ring, event-queue): recent events kept for resume and waits,
    // and how far behind a stream's reader may be before it is told it lagged.
    std::size_t event_ring = 4096;
    std::size_t event_queue = 1024;
    std::size_t rest_max_body = 1024 * 1024;
    std::size_t rest_max_header = 16 * 1024;
    // QEMU's side: the largest QMP message taken (a longer one ends the monitor connection), and
    // each machine's QMP event rate limit (events per second, and the burst allowed above it).
    std::size_t qmp_max_message = std::size_t{16} << 20;
    double event_rate = 200;
    double event_burst = 400;
    std::chrono::milliseconds rest_request_timeout{30000};

    // Machines and QEMU (keys shutdown-policy, qemu-*, qmp-*; see usage()).
    ShutdownPolicy shutdown_policy = ShutdownPolicy::leave_running;
    // The user QEMU runs as when qmachined runs as root; empty: qmachined's own user.
    std::string qemu_user = "qmachined-qemu";
    bool qemu_sandbox = true;              // QEMU's seccomp sandbox (-sandbox on,...)
    std::vector<std::string> qmp_allow;    // lifted from the QMP policy's default deny set
    std::vector<std::string> qmp_deny;     // denied besides it
    std::uint64_t qemu_log_max = 1048576;  // bytes of each machine's QEMU output log; 0: unbounded
    std::size_t max_machines = 4096;       // machines that may exist
    std::chrono::milliseconds qmp_timeout{10000}; // a QMP passthrough command's default deadline
    // Directories of disk images QEMU may write (key image-dirs): absolute, cleaned, no white
    // space, quotes, '\\' or '%'. Default: /var/lib/qmachined-images as root, none otherwise.
    // The daemon only checks that they exist; qmachined-generator makes them writable in the
    // service's sandbox.
    std::vector<std::string> image_dirs;
    // systemd-machined registration (key machined): "auto" (as root, when serving the system
    // bus), "on" (through the system bus in any case), "off".
    std::string machined = "auto";
};

// The QMP passthrough policy of qmp-allow and qmp-deny.
QmpPolicy qmp_policy(const Config& config);

// The unix socket path (rest_socket with its default filled in; empty for "none").
std::string rest_socket_path(const Config& config);
std::string rest_token_path(const Config& config);
// "ADDR:PORT" or "[V6ADDR]:PORT" to an address and port. errc::invalid_argument.
expected<std::pair<std::string, std::uint16_t>> parse_listen_address(std::string_view text);

// What the command line asked for.
struct CommandLine
{
    Config config;
    bool help = false;
    bool version = false;
};

// Reads an environment variable (::getenv, or a table in tests); nullptr when unset.
using GetEnv = std::function<const char*(const char*)>;

// The defaults for the current user (geteuid() == 0: the system paths) and environment.
// errc::invalid_argument when a user has neither XDG_STATE_HOME nor HOME ("... use --state-dir"),
// or no XDG_RUNTIME_DIR ("XDG_RUNTIME_DIR is not set; use --runtime-dir"). Relative XDG paths are
// ignored, as the XDG base directory spec says.
expected<Config> default_config();
// The same for root (`as_root`) or a user with the environment `getenv` (tests).
expected<Config> default_config(bool as_root, const GetEnv& getenv);

// Parses the arguments (argv without the program name): --state-dir DIR, --runtime-dir DIR,
// --log-level LEVEL (trace, debug, info, warn, error, critical, off), --config FILE, --help (-h),
// --version; "--key=value" and "--key value" both; the last of a repeated flag wins. Relative
// paths are made absolute against the current directory. The result is complete: the defaults,
// under the config file given with --config, under the flags. With --help or --version nothing
// else is read (no file, no defaults), so they work anywhere. errc::invalid_argument with a
// message for the user ("unknown option '--frob'", "--log-level: 'loud' is not one of ...",
// "/etc/q.conf:3: unknown key 'x'"); errc::system_error when the config file cannot be read.
expected<CommandLine> parse_command_line(const std::vector<std::string>& args);
// The same with the defaults of default_config(as_root, getenv) (tests).
expected<CommandLine> parse_command_line(const std::vector<std::string>& args, bool as_root,
                                         const GetEnv& getenv);

// Applies a configuration file's text to `config`: lines "key = value" (keys as the long flags
// without dashes: state-dir, runtime-dir, log-level, rest-*, ...), blank lines and comments ('#'
// at the start of a line or after white space, to the end of the line). Relative paths are an
// error, as are unknown keys, lines without '=' and empty values (except for qemu-user, qmp-allow
// and qmp-deny, where empty means something); messages start "<origin>:<line>: ". `origin` names
// the file.
expected<void> apply_config_text(Config& config, const std::string& text,
                                 const std::string& origin);
// Reads and applies `path` (errc::system_error when it cannot be read).
expected<void> apply_config_file(Config& config, const std::string& path);

// Creates `dir` and missing parents, each new one mode 0700; checks that `dir` is a directory
// (symlinks to one are followed) owned by us and sets it to 0700 (spdlog::warn when it was
// looser). With `group`: 0710 and that group instead, so that the group's members can reach a
// socket inside (the runtime directory of a root daemon with the group qmachined), never list
// it. errc::system_error naming the path ("'/x' exists and is not a directory", "'/x' is owned
// by uid 1000, not by uid 0").
expected<void> ensure_private_dir(const std::string& dir, std::optional<gid_t> group = {});

// The --help text.
std::string usage();

} // namespace qm::daemon
