// SPDX-License-Identifier: GPL-2.0-or-later
// qm::Machine: the C++ port of QEMU's Python QEMUMachine (python/qemu/machine/machine.py),
// asynchronous on an io_context it does not own, so that one thread runs hundreds of machines.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"
#include "libmachine/json.hpp"
#include "libmachine/machine/console.hpp"
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
    // Beyond the seed: the prefix of socket and log file names instead of `name` (a supervisor
    // names files by a short fixed-length id, so that no name makes a socket path too long).
    std::string file_prefix{};
    // Where sockets are created; base_temp_dir when empty (as the seed).
    std::string sock_dir{};
    // Console (set_console). The seed drains the console into a buffer only when asked
    // (drain_console, or console_log); here a machine with a console always drains it from launch
    // to shutdown (the ring, wait_console() and the log bound need it, and a drained console never
    // makes the guest wait), so drain_console is accepted for parity and changes nothing.
    bool drain_console = false;
    // QEMU's own logfile= on the console chardev, appended to: everything the guest writes, from
    // the first byte, whether or not anyone reads the console. Empty: no log.
    std::string console_log{};
    // Beyond the seed: how many of the most recent console bytes the machine keeps in memory
    // (console_output(), wait_console()); 0 keeps none. This memory (at most 1.25 × the size plus
    // 4 KiB, allocated at the guest's first byte) is on top of the machine's own overhead.
    std::size_t console_ring_size = std::size_t{64} * 1024;
    // Beyond the seed: the bound on console_log (0: unbounded). Past it the log is copied to
    // "<console_log>.1" and truncated (see qm::Console): at most twice this on disk.
    std::uint64_t console_log_max = std::uint64_t{1024} * 1024;
    // Where QEMU's stdout/stderr log goes; the temporary directory when empty.
    std::string log_dir{};
    // Deadline for QEMU to connect and negotiate QMP (the seed's qmp_timer; 30 s as upstream).
    std::chrono::milliseconds qmp_timer = 30s;
    // Beyond the seed: how many received events are kept for get_qmp_event(s)/event_wait (the
    // oldest dropped beyond it). A supervisor that takes every event through on_event() sets 0.
    std::size_t event_queue_limit = 1024;
    // Beyond the seed: the largest QMP message accepted from QEMU; a longer one ends the
    // connection (the machine turns unresponsive).
    std::size_t qmp_max_message = std::size_t{16} << 20;
    // Append to QEMU's log rather than truncating it (the seed truncates).
    bool log_append = false;
    // Beyond the seed: QEMU serves the monitor and the console on unix sockets the machine binds
    // and hands over as descriptors (-chardev socket,fd=N,server=on,wait=off), and writes the
    // console log to a descriptor (an -add-fd set): QEMU needs no access to any directory, and
    // there is no wait for QEMU to create a file. At launch the machine talks QMP over a second
    // monitor, a connected socket pair (QEMU greets it once set up; nothing races its start-up).
    // The socket files stay while QEMU runs and QEMU accepts a new client once the old one is
    // gone, so that a supervisor that restarts can attach() to the served monitor. Unix sockets
    // only.
    bool pass_sockets = false;
    // Beyond the seed: the process's credentials and sandbox (see proc::SpawnOptions).
    std::optional<uid_t> run_as_uid{};
    std::optional<gid_t> run_as_gid{};
    std::vector<gid_t> run_as_groups{};
};

// attach()'s description of a QEMU started earlier (by another process, or by this one before a
// restart) with pass_sockets, the same name, file prefix and socket directory.
struct AttachOptions
{
    pid_t pid = -1;
    // A pidfd for `pid`, opened before the caller checked that `pid` is that QEMU (start time,
    // command line); the machine owns it from the call on.
    int pidfd = -1;
    // The command line it was started with (for messages).
    std::vector<std::string> argv{};
    // Leave the console for ensure_console() (or the first console operation): a supervisor that
    // takes over hundreds of machines answers first and connects their consoles afterwards.
    // QEMU's console log has the output meanwhile.
    bool console_later = false;
};

// How a graceful shutdown starts.
enum class ShutdownMode {
    // `quit` over QMP (SIGTERM without a monitor), then SIGKILL: the seed's ladder.
    quit,
    // system_powerdown (the ACPI power button), wait up to powerdown_timeout for the guest to
    // power off, then the quit ladder.
    powerdown,
};

// Which step of the shutdown ladder ended the process (Machine::last_shutdown_step()).
enum class ShutdownStep {
    // No shutdown has ended a process yet.
    none,
    // QEMU exited by itself, not after a step of ours and not after a guest power-off (a crash,
    // or a quit sent by someone else that left no SHUTDOWN event).
    exited,
    // The guest shut itself down (SHUTDOWN with "guest": true: a power-off, or with -no-reboot a
    // reset or panic), on its own or after system_powerdown.
    guest_poweroff,
    // QEMU exited after `quit` (or SIGTERM without a monitor), ours or one that made QEMU send
    // SHUTDOWN with reason host-qmp-quit.
    quit,
    // SIGKILL.
    kill,
};
// "none", "exited", "guest-poweroff", "quit", "kill".
const char* to_string(ShutdownStep step) noexcept;

// shutdown()'s options, as the seed's shutdown(has_quit, hard, timeout), plus the mode.
struct ShutdownOptions
{
    // `quit` was already sent: only wait for the process to exit.
    bool has_quit = false;
    // Skip the graceful step: SIGKILL at once (and no warning about the signal).
    bool hard = false;
    // How long the graceful step may take (milliseconds::max() waits forever); in powerdown
    // mode, the quit step after the guest's time is over.
    std::chrono::milliseconds timeout = 30s;
    // Beyond the seed: start with the guest's power button (ignored when has_quit or hard).
    ShutdownMode mode = ShutdownMode::quit;
    // powerdown mode: how long the guest has to power off before `quit`.
    std::chrono::milliseconds powerdown_timeout = 60s;
};

// One QEMU virtual machine: its configuration, command line, process, QMP connection, events
// and log. Owned by its creator (not shared); every coroutine member needs the Machine to
// outlive it. Loop thread only.
//
// Errors: errc::invalid_state ("VM already launched", QMP not connected), errc::spawn_failed and
// errc::connect_failed / errc::timeout (launch; the message carries the command line and QEMU's
// output), errc::abnormal_shutdown (the graceful step failed and the process was killed),
// errc::qmp_* (commands), errc::invalid_argument (bad fd, socket path too long); console calls:
// errc::invalid_state (no console, not launched, closed), errc::timeout (wait_console),
// errc::connect_failed (the console socket; then launch fails too).
class Machine
{
public:
    using ExitHandler = std::function<void(const proc::ExitStatus&)>;
    using StateHandler = std::function<void(MachineState)>;
    using EventHandler = std::function<void(const qmp::Event&)>;

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
    // Beyond the seed: takes over a QEMU that is already running (see AttachOptions): watches it
    // through its pidfd (its exit status is then unknown: it is not our child), connects to the
    // monitor it serves, negotiates, asks query-status, and connects the console. Completes once
    // QMP is negotiated (the console may be left for later: AttachOptions::console_later). When
    // the monitor does not answer, the machine still holds the process
    // (state unresponsive: shutdown() then kills it) and the error says why. errc::invalid_state
    // when launched already.
    awaitable<expected<void>> attach(AttachOptions options);
    // Connects the console if it is not yet (a machine without a monitor, or attached with
    // console_later); console operations call it themselves. errc::invalid_state without a
    // console or before a launch.
    awaitable<expected<void>> ensure_console();
    // Beyond the seed: lets the process run on without us: closes the QMP and console connections,
    // stops watching the process and leaves its socket files and logs, so that a later attach()
    // (from a restarted supervisor) finds them. Afterwards the machine is as if never launched.
    void detach() noexcept;
    // Called right after the process was started (before QMP is negotiated) with its pid: a
    // supervisor records it there, so that a crash of its own never leaves the process unknown.
    void on_spawn(std::function<void(pid_t)> handler) { on_spawn_ = std::move(handler); }
    // The command line of the current (or last) process, once launched.
    const std::vector<std::string>& command_line() const noexcept { return full_args_; }
    // Graceful (quit, then wait up to the timeout), then hard (SIGKILL): the seed's ladder.
    // In powerdown mode system_powerdown and up to powerdown_timeout for the guest come first;
    // a guest that ignores the button ends in quit, which is still a success.
    // Cleanup always runs; a shutdown of a machine not launched is a no-op.
    // errc::abnormal_shutdown when the process had to be killed after a graceful step failed.
    awaitable<expected<void>> shutdown(ShutdownOptions options = {});
    awaitable<expected<void>> kill();
    // Beyond the seed: SIGKILL at once, whatever is in progress (a shutdown() waiting for the guest
    // or for quit then completes with step kill; a launch fails). No-op without a process.
    void kill_now() noexcept;
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
    // Which step ended the process at the last shutdown() (kill, wait, a shutdown during launch
    // included); none until one has. Reset by launch().
    ShutdownStep last_shutdown_step() const noexcept { return last_shutdown_step_; }
    MachineState state() const noexcept { return state_; }
    // Why the QMP connection of the running process was lost ("QMP message exceeds 33554432
    // bytes", "connection reset by peer"), once state() went unresponsive for it; empty otherwise.
    const std::string& qmp_lost_reason() const noexcept { return qmp_lost_reason_; }
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

    //---- console (set_console(); the seed's console_socket and its drained buffer) ----
    // A machine with a console connects to its socket during launch(), once QMP is negotiated
    // (every chardev exists by then), and drains it until shutdown (closed at its first step, as
    // the seed does; in powerdown mode after the guest's time). Without a QMP monitor nothing says
    // when the socket exists: the first console_write() or wait_console() connects instead.
    // The ring, offsets and connection are per launch: a relaunch starts again at offset 0; after
    // shutdown the last launch's ring stays readable.
    //
    // Writes `bytes` to the guest (in call order); completes once the socket took them all.
    awaitable<expected<void>> console_write(std::string bytes);
    // The most recent output (at most console_ring_size bytes) from offset `from` on.
    std::string console_output(std::uint64_t from = 0) const;
    // Console bytes received since launch: monotonic; take it before writing a command, then
    // wait_console(..., from) sees only what came after.
    std::uint64_t console_offset() const noexcept;
    // Waits until `pattern` matches the output from offset `from` on: what the ring still holds
    // at the call, then everything that arrives (Console's rules: a substring may span lines, a
    // regex matches within a line). errc::timeout after `timeout`; errc::invalid_state at once
    // when the console ended (QEMU exited, shutdown) without a match, or the ring size is 0.
    awaitable<expected<ConsoleMatch>> wait_console(ConsolePattern pattern,
                                                   std::chrono::milliseconds timeout = 60s,
                                                   std::uint64_t from = 0);
    // The console connection of this (or the last) launch; nullptr without set_console().
    std::shared_ptr<Console> console() const noexcept { return console_; }

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
    const std::string& file_prefix() const noexcept
    {
        return config_.file_prefix.empty() ? config_.name : config_.file_prefix;
    }
    const MachineConfig& config() const noexcept { return config_; }

    //---- notifications (beyond the seed, for a supervisor) ----
    void on_exit(ExitHandler handler) { on_exit_ = std::move(handler); }
    void on_state_change(StateHandler handler) { on_state_change_ = std::move(handler); }
    // Every QMP event, in arrival order, after the machine's own state has followed it.
    void on_event(EventHandler handler) { on_event_ = std::move(handler); }
    // The QMP client of the running machine (or of the last one, for its queued events).
    std::shared_ptr<qmp::Client> qmp_client() const noexcept { return client_; }

private:
    struct StateWaiter;

    awaitable<expected<void>> do_launch();
    awaitable<expected<void>> soft_shutdown(std::chrono::milliseconds timeout, bool has_quit);
    awaitable<bool> powerdown_guest(std::chrono::milliseconds timeout);
    ShutdownStep exit_step() const;
    awaitable<expected<void>> hard_shutdown();
    awaitable<bool> wait_until(std::function<bool()> done, std::chrono::milliseconds timeout);
    awaitable<bool> wait_for_exit(std::chrono::milliseconds timeout);
    void early_cleanup();
    void post_shutdown();
    void handle_exit(const proc::ExitStatus& status);
    awaitable<expected<void>> negotiate(qmp::Socket socket, std::chrono::milliseconds greeting_timeout);
    // Resets what a run (launch or attach) learns about its process, and its console.
    void begin_run();
    awaitable<expected<void>> connect_console();
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
    std::string qmp_lost_reason_;
    bool console_later_ = false; // this run's attach() leaves the console to ensure_console()
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
    std::shared_ptr<Console> console_;
    // what ended the process: the last SHUTDOWN event, and our SIGKILL
    bool guest_shutdown_ = false;
    std::string shutdown_reason_;
    bool sigkill_sent_ = false;
    ShutdownStep last_shutdown_step_ = ShutdownStep::none;

    std::function<void(pid_t)> on_spawn_;
    ExitHandler on_exit_;
    StateHandler on_state_change_;
    EventHandler on_event_;
};

} // namespace qm
