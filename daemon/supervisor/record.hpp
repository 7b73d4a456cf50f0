// SPDX-License-Identifier: GPL-2.0-or-later
// Runtime records: what qmachined needs to find a running QEMU again after its own restart or
// crash ("<runtime>/m/<id>/record.json", versioned), and the check that a live process is that QEMU.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "libmachine/expected.hpp"

namespace qm::daemon {

// The current record format; records of another format are not trusted (the process is then
// looked for by its command line).
inline constexpr int record_format = 1;

struct RuntimeRecord
{
    std::string name;
    std::string uuid;
    std::uint64_t generation = 0; // of the definition the process was started from
    // Absent while the process is being spawned (the record is written before the spawn, so
    // that a crash at any point leaves a trace of it).
    std::optional<pid_t> pid{};
    std::uint64_t start_time = 0; // /proc/PID/stat starttime: with pid, names one process
    std::string boot_id;          // a record of another boot names no live process
    std::vector<std::string> argv;
    std::string argv_hash; // proc::hash_command_line(argv)
    std::string monitor;   // the socket QEMU serves QMP on
    std::string console;   // the console socket, empty without one
    std::int64_t started_at_us = 0;
    std::uint32_t restart_count = 0;

    bool operator==(const RuntimeRecord&) const = default;
};

std::string record_to_json(const RuntimeRecord& r);
// errc::invalid_argument with the reason (bad JSON, unknown format, a missing or mistyped field).
expected<RuntimeRecord> record_from_json(std::string_view text);

// "<dir>/record.json".
std::string record_path(std::string_view dir);
// Written atomically (temp file + rename; the runtime directory is a tmpfs, so no fsync), 0600.
// Small and local: cheap enough to write on the loop. errc::system_error.
expected<void> write_record(const std::string& dir, const RuntimeRecord& r);
// std::nullopt when there is none; errc::invalid_argument / system_error when unreadable.
expected<std::optional<RuntimeRecord>> read_record(const std::string& dir);
void remove_record(const std::string& dir) noexcept;

// How the last run of a machine ended ("<dir>/last.json", versioned): a restarted daemon shows a
// machine that stopped, crashed or failed before as such, with its reason and exit, rather than
// as never started. In the runtime directory: a reboot forgets it, as it forgets the processes.
// Plain values, so that the record knows nothing of the supervisor's types.
struct LastRun
{
    std::string state; // "stopped", "crashed" or "failed"
    std::int64_t since_us = 0;
    std::string stop_kind; // the stop reason's kind ("guest-poweroff", ...)
    int stop_signal = 0;
    std::optional<int> stop_exit_code{};
    std::string stop_detail;
    std::string exit;   // the process's exit: "exited", "signaled", "unknown", or empty (none)
    int exit_value = 0; // the code when exited, the signal when signaled
    std::uint32_t restart_count = 0;

    bool operator==(const LastRun&) const = default;
};

std::string last_run_to_json(const LastRun& r);
// errc::invalid_argument with the reason.
expected<LastRun> last_run_from_json(std::string_view text);
// Written atomically, 0600 (as write_record). errc::system_error.
expected<void> write_last_run(const std::string& dir, const LastRun& r);
// std::nullopt when there is none; errc::invalid_argument / system_error when unreadable.
expected<std::optional<LastRun>> read_last_run(const std::string& dir);

// Whether the process the record names is alive and is that QEMU: same boot, a pidfd for the pid,
// the same start time, the same command line. On success the pidfd (the caller owns it).
// errc::invalid_state with the reason it is not ("process 123 is gone", "pid 123 was reused").
// A record without a pid (a crash during the spawn) is looked for among all processes by its
// command line.
expected<std::pair<pid_t, int>> find_recorded_process(const RuntimeRecord& r);

} // namespace qm::daemon
