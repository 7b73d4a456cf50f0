// SPDX-License-Identifier: GPL-2.0-or-later
// qm::Machine: the C++ port of QEMU's Python QEMUMachine (python/qemu/machine/machine.py),
// asynchronous on an io_context it does not own, so that one thread runs hundreds of machines.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"
#include "libmachine/json.hpp"
#include "libmachine/machine/state.hpp"
#include "libmachine/proc/child_watcher.hpp"
#include "libmachine/qmp/address.hpp"
#include "libmachine/qmp/client.hpp"

namespace qm {

using namespace std::chrono_literals;

// The seed's constructor arguments. Defaults are the seed's, except where noted.
struct MachineConfig
{
    // Path (or PATH-searched name) of the QEMU binary.
    std::string binary = "qemu-system-x86_64";
    // Extra arguments, after the base arguments.
    std::vector<std::string> args{};
    // Prefix of the command line (e.g. {"taskset", "-c", "1"}).
    std::vector<std::string> wrapper{};
    // Prefix of socket and log file names; the seed's "qemu-PID" plus a counter when empty, so
    // that machines of one process never share names.
    std::string name{};
    // Where the temporary directory is created.
    std::string base_temp_dir = "/var/tmp";
    // Where QMP is: by default a unix socket "<sock_dir>/<name>-monitor.sock" that the machine
    // listens on and QEMU connects to (removed as soon as QEMU has connected).
    std::optional<qmp::Address> monitor_address{};
    // Where sockets are created; base_temp_dir when empty (as the seed).
    std::string sock_dir{};
    // Console (set_console): keep reading it into a buffer, and/or its log file (QEMU's own
    // logfile=, appended to, which captures everything from the first byte).
    bool drain_console = false;
    std::string console_log{};
    // Where QEMU's stdout/stderr log goes; the temporary directory when empty.
    std::string log_dir{};
    // Deadline for QEMU to connect and negotiate QMP (the seed's qmp_timer; 30 s as upstream).
    std::chrono::milliseconds qmp_timer = 30s;
    // Append to QEMU's log rather than truncating it (the seed truncates).
    bool log_append = false;
};

// shutdown()'s options, as the seed's shutdown(has_quit, hard, timeout).
struct ShutdownOptions
{
    // `quit` was already sent: only wait for the process to exit.
    bool has_quit = false;
    // Skip the graceful step: SIGKILL at once (and no warning about the signal).
    bool hard = false;
    // How long the graceful step may take (milliseconds::max() waits forever).
    std::chrono::milliseconds timeout = 30s;
};

// One QEMU virtual machine: its configuration, command line, process, QMP connection, events
// and log. Owned by its creator (not shared); every coroutine member needs the Machine to
// outlive it. Loop thread only.
//
// Errors: errc::invalid_state ("VM already launched", QMP not connected), errc::spawn_failed and
// errc::connect_failed / errc::timeout (launch; the message carries the command line and QEMU's
// output), errc::abnormal_shutdown (the graceful step failed and the process was killed),
// errc::qmp_* (commands), errc::invalid_argument (bad fd, socket path too long).
class Machine
{
public:
    using ExitHandler = std::function<void(const proc::ExitStatus&)>;
    using StateHandler = std::function<void(MachineState)>;

    Machine(asio::io_context& ioc, MachineConfig config);
    Machine(const Machine&) = delete;
    Machine& operator=(const Machine&) = delete;
    // A machine still running is killed (SIGKILL); its child is still reaped by the watcher.
    ~Machine();

    //---- configuration, before launch() (the seed's set_*, add_*) ----
    void set_machine(std::string machine_type);
    void add_args(const std::vector<std::string>& args);
    const std::vector<std::string>& args() const noexcept { return config_.args; }
    // A console on a unix socket chardev QEMU serves (server=on,wait=off), on the machine's
    // default serial port or on a device of `device_type`, after `console_index` null serials.
    void set_console(std::optional<std::string> device_type = std::nullopt, int console_index = 0);
    void set_qmp_monitor(bool enabled = true);
    void add_monitor_null();
    // Passes `fd` to QEMU at launch as `-add-fd fd=N,set=fdset,opaque=...`; N is the number the
    // child sees. The Machine keeps a duplicate for every (re)launch until it is destroyed; the
    // caller keeps its own.
    expected<void> add_fd(int fd, int fdset, std::string opaque, std::string opts = {});

    // The command line launch() runs: wrapper, binary, base arguments, extra arguments.
    std::vector<std::string> base_args() const;
    std::vector<std::string> full_args() const;

    //---- lifecycle ----
    // Starts QEMU and completes once QMP is negotiated (at once without a monitor). On failure
    // nothing is left behind: no process, no socket file, no temporary directory.
    awaitable<expected<void>> launch();
    // Graceful (quit, then wait up to the timeout), then hard (SIGKILL): the seed's ladder.
    // Cleanup always runs; a shutdown of a machine not launched is a no-op.
    awaitable<expected<void>> shutdown(ShutdownOptions options = {});
    awaitable<expected<void>> kill();
    // Waits for the guest to power QEMU off (shutdown with has_quit).
    awaitable<expected<void>> wait(std::chrono::milliseconds timeout = 30s);

    // stop / cont over QMP, complete once the STOP / RESUME event has been seen.
    awaitable<expected<void>> pause(std::chrono::milliseconds timeout = 10s);
    awaitable<expected<void>> resume(std::chrono::milliseconds timeout = 10s);

    bool is_running() const noexcept;
    std::optional<pid_t> pid() const noexcept;
    // How the last process ended (nullopt while it runs or before the first launch).
    const std::optional<proc::ExitStatus>& exit_status() const noexcept { return exit_status_; }
    // The seed's exitcode(): the exit code, or minus the signal number.
    std::optional<int> exitcode() const noexcept;
    MachineState state() const noexcept { return state_; }
    // QEMU's own run state string from query-status and events ("running", "prelaunch", ...).
    const std::string& qemu_status() const noexcept { return qemu_status_; }

    //---- QMP ----
    // The seed's qmp(): the whole response, {"return": ...} or {"error": {...}}. conv_keys turns
    // underscores in argument names into dashes. Errors only when there is no answer.
    awaitable<expected<json::Document>> qmp(std::string command, json::Document arguments = {},
                                            bool conv_keys = true);
    // The seed's cmd()/command(): the "return" value, an error reply as errc::qmp_command_failed.
    awaitable<expected<json::Document>> cmd(std::string command, json::Document arguments = {},
                                            bool conv_keys = true);
    awaitable<expected<json::Document>> command(std::string command, json::Document arguments = {},
                                                bool conv_keys = true);
    // Passes `fd` to QEMU under `name` at run time (getfd), the seed's send_fd_scm.
    awaitable<expected<void>> send_fd(int fd, std::string name);

    //---- events (already-received events are searched first) ----
    std::optional<qmp::Event> get_qmp_event();
    awaitable<expected<qmp::Event>> get_qmp_event(std::chrono::milliseconds wait);
    std::vector<qmp::Event> get_qmp_events();
    awaitable<expected<std::vector<qmp::Event>>> get_qmp_events(std::chrono::milliseconds wait);
    awaitable<expected<qmp::Event>> event_wait(std::string name,
                                               std::chrono::milliseconds timeout = 60s,
                                               json::Document match = {});
    awaitable<expected<qmp::Event>> events_wait(std::vector<qmp::EventFilter> events,
                                                std::chrono::milliseconds timeout = 60s);
    static bool event_match(const json::Value& event, const json::Value& match)
    {
        return qmp::event_match(event, match);
    }

    //---- files ----
    // QEMU's output after shutdown() or a failed launch (at most its last 64 KiB), as get_log().
    const std::string& get_log() const noexcept { return iolog_; }
    // Created on demand; removed at cleanup. errc::system_error when it can't be created.
    expected<std::string> temp_dir();
    expected<std::string> log_dir();
    // The path of QEMU's output log ("<log_dir>/<name>.log"), once launched.
    const std::string& log_path() const noexcept { return log_path_; }
    std::string console_socket_path();
    const std::string& name() const noexcept { return config_.name; }
    const MachineConfig& config() const noexcept { return config_; }

    //---- notifications (beyond the seed, for a supervisor) ----
    void on_exit(ExitHandler handler) { on_exit_ = std::move(handler); }
    void on_state_change(StateHandler handler) { on_state_change_ = std::move(handler); }
    // The QMP client of the running machine (or of the last one, for its queued events).
    std::shared_ptr<qmp::Client> qmp_client() const noexcept { return client_; }

private:
    struct StateWaiter;

    awaitable<expected<void>> do_launch();
    awaitable<expected<void>> soft_shutdown(std::chrono::milliseconds timeout, bool has_quit);
    awaitable<expected<void>> hard_shutdown();
    awaitable<bool> wait_until(std::function<bool()> done, std::chrono::milliseconds timeout);
    awaitable<bool> wait_for_exit(std::chrono::milliseconds timeout);
    void early_cleanup();
    void post_shutdown();
    void handle_exit(const proc::ExitStatus& status);
    void handle_event(const qmp::Event& event);
    void set_state(MachineState s);
    void set_qemu_status(std::string_view status);
    void load_io_log();
    Error launch_error(Error e) const;
    expected<qmp::Address> monitor_address();

    asio::io_context& ioc_;
    MachineConfig config_;
    proc::ChildWatcher& watcher_;
    std::shared_ptr<int> life_ = std::make_shared<int>(0); // callbacks check it is still alive

    // configuration beyond MachineConfig
    std::optional<std::string> machine_type_;
    bool qmp_set_ = true;
    bool console_set_ = false;
    std::optional<std::string> console_device_type_;
    int console_index_ = 0;
    std::vector<int> pass_fds_; // owned duplicates, -add-fd'ed at launch
    std::vector<std::string> pass_fd_args_;

    // run state
    bool launched_ = false;
    bool launching_ = false;
    bool shutting_down_ = false;
    bool quit_issued_ = false;
    bool user_killed_ = false;
    pid_t pid_ = -1;
    std::optional<proc::ExitStatus> exit_status_;
    MachineState state_ = MachineState::defined;
    std::string qemu_status_;
    std::vector<std::string> full_args_;
    std::optional<qmp::Listener> listener_;
    std::shared_ptr<qmp::Client> client_;
    std::string temp_dir_;
    std::string log_path_;
    std::vector<std::string> remove_files_;
    std::string iolog_;
    std::list<std::shared_ptr<StateWaiter>> waiters_;

    ExitHandler on_exit_;
    StateHandler on_state_change_;
};

} // namespace qm
