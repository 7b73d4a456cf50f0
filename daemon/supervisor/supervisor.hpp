// SPDX-License-Identifier: GPL-2.0-or-later
// The supervisor: the registry of machines, their operations and states, persistence of their
// definitions and the event stream. The one internal API that REST and D-Bus both call.
#pragma once

#include <sys/types.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "daemon/metrics.hpp"
#include "daemon/supervisor/console_session.hpp"
#include "daemon/supervisor/events.hpp"
#include "daemon/supervisor/qmp_policy.hpp"
#include "daemon/supervisor/record.hpp"
#include "daemon/supervisor/spec.hpp"
#include "daemon/supervisor/store.hpp"
#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"
#include "libmachine/json.hpp"
#include "libmachine/machine/console.hpp"
#include "libmachine/machine/state.hpp"

namespace qm {
class Machine;
}

namespace qm::daemon {

using namespace std::chrono_literals;

// Why the last process of a machine ended. One per stop.
struct StopReason
{
    enum class Kind {
        none,           // never stopped (or running)
        guest_poweroff, // the guest powered off (by itself or after the power button)
        host_quit,      // `quit` (ours, or through QMP passthrough)
        host_kill,      // SIGKILL by qmachined (kill, or a stop whose graceful part failed)
        signal,         // a signal qmachined did not send (`signal` says which)
        crashed,        // a non-zero exit qmachined did not ask for (`exit_code`)
        launch_failed,  // QEMU did not start or never answered (detail: argv and output tail)
        unknown,        // the exit was not observable
    };
    Kind kind = Kind::none;
    int signal = 0;
    std::optional<int> exit_code{};
    std::string detail{};
};
// "none", "guest-poweroff", "host-quit", "host-kill", "signal", "crashed", "launch-failed",
// "unknown".
const char* to_string(StopReason::Kind kind) noexcept;

// A machine as the daemon's model knows it (never asks QEMU).
struct MachineInfo
{
    std::string name;
    std::string id; // 12 hex digits: names the machine's runtime directory
    std::uint64_t generation = 0;
    MachineSpec spec;
    MachineState state = MachineState::defined;
    std::int64_t state_since_us = 0; // wall clock, µs since the epoch
    std::optional<pid_t> pid;
    std::optional<int> exit_code;   // of the last process, when it exited
    std::optional<int> exit_signal; // of the last process, when a signal ended it
    StopReason stop_reason;
    std::uint32_t restart_count = 0;
    std::string qemu_status; // QEMU's run state ("running", "paused", "prelaunch", ...)
    std::string operation;   // the operation in progress ("start", "stop", ...), empty if none
    std::string runtime_dir; // <runtime>/m/<id>
    std::string log_path;    // QEMU's stdout/stderr
    std::string console_log_path; // empty without a console log
};

// The JSON of a machine for the front ends.
json::Document machine_to_json(const MachineInfo& info);
void stop_reason_to_json(const StopReason& r, json::Value& out, json::Document::AllocatorType& a);

// What an operation returns: the machine after it, and the event sequence number at completion
// (every event the operation caused has seq <= this one).
struct OpResult
{
    MachineInfo machine;
    std::uint64_t seq = 0;
};

struct QmpResult
{
    json::Document value; // QEMU's "return"
    std::uint64_t seq = 0;
};

struct StopOptions
{
    // Override the spec's shutdown mode and timeout for this stop.
    std::optional<ShutdownModeSpec> mode{};
    std::optional<std::chrono::milliseconds> timeout{};
};

// What stop_all() did, by machine name.
struct StopAllResult
{
    std::vector<std::string> stopped;
    std::vector<std::pair<std::string, std::string>> failed; // name, why
    std::uint64_t seq = 0; // every event the stops caused has seq <= this one
};

struct SupervisorOptions
{
    std::string state_dir;
    std::string runtime_dir;
    // Default deadline of a QMP passthrough command (a call may set its own).
    std::chrono::milliseconds qmp_timeout = 10s;
    // Deadline of pause/resume (stop/cont and their event).
    std::chrono::milliseconds pause_timeout = 10s;
    // From spawn to QMP negotiated.
    std::chrono::milliseconds launch_timeout = 30s;
    // The liveness probe's query-status, after a command overran its deadline.
    std::chrono::milliseconds probe_timeout = 5s;
    // How many machines may exist.
    // The largest QMP message accepted from a QEMU (setting qmp-max-message).
    std::size_t qmp_max_message = std::size_t{16} << 20;
    std::size_t max_machines = 4096;
    // A machine with a restart policy that stays unresponsive this long is killed, and its
    // policy restarts it (on-failure counts it as a failure).
    std::chrono::milliseconds unresponsive_limit = 30s;
    // How many machines the daemon's own shutdown stops at once.
    std::size_t stop_concurrency = 16;
    // QEMU's credentials, when they are to differ from the daemon's (it runs as root): set in the
    // child before exec (proc::SpawnOptions).
    std::optional<uid_t> qemu_uid{};
    std::optional<gid_t> qemu_gid{};
    std::vector<gid_t> qemu_groups{};
    // Every QEMU runs under -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
    // resourcecontrol=deny (seccomp).
    bool sandbox = true;
    // Each machine's QEMU output log is kept under this many bytes (0: unbounded): past it the
    // log is copied to "qemu.log.1" and emptied (at most twice this on disk). Checked every
    // log_check_period, a stat per running machine.
    std::uint64_t qemu_log_max = std::uint64_t{1024} * 1024;
    std::chrono::milliseconds log_check_period = 5s;
    EventBusOptions events{};
    // What QMP passthrough refuses (errc::forbidden), before anything else is looked at.
    QmpPolicy qmp_policy{};
};

// Owned by main (or a test); loop thread only; destroyed after shutdown() completed (it kills
// whatever still runs). Operations on one machine are serialised (one
// lifecycle operation at a time; see proto/states.md for what conflicts and what joins);
// operations on different machines never wait on each other. List and inspect answer from the
// model. Errors (qm::errc): no_such_machine, exists, invalid_argument (name, spec), invalid_state
// (StateConflict: the operation conflicts with the state or the operation in progress),
// stale_generation, launch_failed, unresponsive, timeout, qmp_* (passthrough), shutting_down,
// limit_exceeded, system_error (the state directory). It holds the daemon's metrics registry: its
// own series (machines by state, restarts, QMP commands for clients, events) and the front ends'.
class Supervisor
{
public:
    Supervisor(asio::io_context& ioc, SupervisorOptions options);
    ~Supervisor();
    Supervisor(const Supervisor&) = delete;
    Supervisor& operator=(const Supervisor&) = delete;

    // Start-up, before serving anyone: reads every definition (blocking), renames corrupt ones
    // aside (returned, and logged). errc::invalid_argument when the runtime directory is too long
    // for socket paths.
    expected<std::vector<LoadProblem>> load();
    // After load(), before serving anyone: takes over every QEMU that kept running while the
    // daemon was down (its runtime record names a live process with the same start time and
    // command line): watches it by pidfd, reconnects QMP and the console, and publishes
    // MACHINE_REATTACHED. A machine whose QEMU died meanwhile is `crashed`; a QEMU whose machine
    // has no definition any more is killed. Leaves no stale socket or record behind. Completes
    // when every machine is settled; from then on the QEMU logs are kept bounded (qemu_log_max).
    awaitable<void> reattach();
    // Starts every autostart machine, concurrently; returns at once.
    void autostart();

    std::vector<MachineInfo> list() const;
    expected<MachineInfo> inspect(std::string_view name) const;
    std::size_t size() const noexcept { return machines_.size(); }
    // Counts by state name (for status lines and metrics).
    std::map<std::string, std::size_t> count_by_state() const;

    awaitable<expected<OpResult>> create(std::string name, json::Document spec);
    awaitable<expected<OpResult>> update(std::string name, json::Document spec,
                                         std::uint64_t generation);
    // The seq after removal.
    awaitable<expected<std::uint64_t>> remove(std::string name, bool force);
    awaitable<expected<OpResult>> start(std::string name);
    awaitable<expected<OpResult>> stop(std::string name, StopOptions options = {});
    awaitable<expected<OpResult>> kill(std::string name);
    awaitable<expected<OpResult>> pause(std::string name);
    awaitable<expected<OpResult>> resume(std::string name);
    awaitable<expected<OpResult>> restart(std::string name);
    // QMP passthrough: `arguments` is an object or null.
    awaitable<expected<QmpResult>> qmp(std::string name, std::string command,
                                       json::Document arguments,
                                       std::optional<std::chrono::milliseconds> timeout = {});
    // The serial console of a machine with a process and a console (else StateConflict).
    awaitable<expected<std::uint64_t>> console_write(std::string name, std::string bytes);
    // Waits for `pattern` in the console output from offset `from` (Console's rules).
    awaitable<expected<ConsoleMatch>> console_wait(std::string name, ConsolePattern pattern,
                                                   std::chrono::milliseconds timeout,
                                                   std::uint64_t from = 0);
    // The recent output (the ring) from offset `from`, and the offset after it.
    expected<std::pair<std::string, std::uint64_t>> console_output(std::string_view name,
                                                                   std::uint64_t from = 0) const;
    // A live view of the console of a machine with a process and a console (else StateConflict,
    // also once its console closed: the machine is stopping): a reader that gets the newest
    // `history` bytes of the ring, then every byte as it comes, buffering at most about `history`
    // bytes for a client that falls behind. The session may claim the machine's one writer place.
    // ShuttingDown once the daemon goes down.
    awaitable<expected<std::shared_ptr<ConsoleSession>>> console_attach(std::string name,
                                                                        std::size_t history);

    // The first event of machine `name` matching `selector` (its machine is set to `name`) after
    // `since` (from now without it). errc::timeout when none came in time.
    awaitable<expected<Event>> wait_event(std::string name, EventSelector selector,
                                          std::optional<std::uint64_t> since,
                                          std::chrono::milliseconds timeout);

    // The newest `max_lines` lines (all when nullopt) of at most `limit` bytes of the log at `path`
    // (a machine's log_path or console_log_path), read off the loop (read_log_tail on the store's
    // worker thread). A missing file is empty.
    awaitable<expected<std::string>> read_log(std::string path, std::optional<std::size_t> max_lines,
                                              std::size_t limit)
    {
        return store_.read_tail(std::move(path), max_lines, limit);
    }

    EventBus& events() noexcept { return events_; }
    // The daemon's metrics (docs/rest.md lists them); the front ends add their own series.
    Registry& metrics() noexcept { return metrics_; }
    const SupervisorOptions& options() const noexcept { return options_; }

    // Every machine with a process (or an operation in progress) stopped gracefully, at most
    // `concurrency` at once (0: stop_concurrency), each with its own spec's mode and timeout (a
    // guest that ignores the power button is killed past its timeout); the host shutdown's
    // qmachined-guests.service asks for it. Restart policies and pending restarts are off while it
    // runs. Completes when every one has stopped (or failed to).
    awaitable<StopAllResult> stop_all(std::size_t concurrency);
    // The daemon is going down: new operations fail with shutting_down; then stop_all().
    awaitable<void> shutdown();
    // The daemon is going down and leaves the machines running (shutdown-policy leave-running):
    // new operations fail with shutting_down, every QEMU is let go (connections closed, records,
    // sockets and logs kept) for the next start's reattach(). Operations in progress are dropped.
    void detach_all();
    bool shutting_down() const noexcept { return shutting_down_; }
    // Restart policies are off: the daemon shuts down, or stop_all() runs.
    bool restarts_suspended() const noexcept { return shutting_down_ || stopping_all_ > 0; }

private:
    struct Entry;
    enum class Job { none, start, stop, restart, pause, resume, update, remove };
    static const char* to_string(Job job) noexcept;

    Entry* find(std::string_view name) const;
    expected<Entry*> lookup(std::string_view name) const;
    MachineInfo info(const Entry& e) const;
    OpResult result(const Entry& e) const;
    expected<void> check_open() const;
    // check_open() and lookup(): the entry an operation works on.
    expected<std::shared_ptr<Entry>> open_entry(std::string_view name) const;
    awaitable<expected<OpResult>> pause_or_resume(std::string name, Job job);

    void register_metrics();
    // A QMP command sent for a client, `sent` when it was sent: by result, and its latency.
    void count_qmp(std::chrono::steady_clock::time_point sent, const Error* failure);

    void set_state(Entry& e, MachineState state, std::string detail = {});
    void on_machine_state(Entry& e, MachineState s);
    void on_machine_event(Entry& e, const qmp::Event& event);
    void on_machine_exit(Entry& e);
    StopReason reason_from_exit(const Entry& e) const;

    std::shared_ptr<Machine> make_machine(Entry& e);
    awaitable<void> connect_console(std::shared_ptr<Machine> machine, std::string name);
    void save_last_run(const Entry& e);
    void restore_last_run(Entry& e);
    awaitable<void> attach_one(std::shared_ptr<Entry> e, RuntimeRecord record, pid_t pid,
                               int pidfd);
    void settle_dead(Entry& e, const RuntimeRecord& record, const std::string& why);
    void remove_runtime_files(const Entry& e, const RuntimeRecord* record);
    void arm_log_check();
    void check_logs();
    // The restart policy after an exit (or a failed automatic start) nobody asked for.
    void apply_restart_policy(std::shared_ptr<Entry> e);
    void cancel_restart(Entry& e);
    awaitable<void> auto_restart(std::shared_ptr<Entry> e, std::uint64_t token);
    awaitable<expected<void>> do_start(std::shared_ptr<Entry> e);
    awaitable<expected<void>> do_stop(std::shared_ptr<Entry> e, StopOptions options);
    awaitable<void> cleanup_after_exit(std::shared_ptr<Entry> e);
    awaitable<void> probe(std::shared_ptr<Entry> e);
    // One machine of stop_all(): its error message, empty when it stopped.
    awaitable<std::string> stop_for_shutdown(std::shared_ptr<Entry> e);
    // co_spawn on the loop; an exception is logged with `what` ("Failed to <what>: ...").
    void spawn(awaitable<void> task, const char* what);
    void begin_job(Entry& e, Job job);
    void end_job(Entry& e);
    awaitable<void> wait_job(std::shared_ptr<Entry> e);
    expected<void> job_conflict(const Entry& e, std::string_view op) const;

    asio::io_context& ioc_;
    SupervisorOptions options_;
    Registry metrics_;
    // Series of metrics_ (registered by the constructor): the restart policies' restarts, the
    // QMP commands sent for clients by result (ok, error, timeout) and their latency.
    Counter* restarts_total_ = nullptr;
    std::array<Counter*, 3> qmp_total_{};
    Histogram* qmp_seconds_ = nullptr;
    EventBus events_;
    Store store_;
    std::map<std::string, std::shared_ptr<Entry>, std::less<>> machines_;
    bool shutting_down_ = false;
    int stopping_all_ = 0; // stop_all() calls running
    std::size_t jobs_running_ = 0; // machines with an operation in progress
    std::size_t jobs_peak_ = 0;    // the most at once since the last malloc_trim
    asio::steady_timer log_timer_;
    std::shared_ptr<int> life_ = std::make_shared<int>(0);
};

} // namespace qm::daemon
