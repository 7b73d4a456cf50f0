// SPDX-License-Identifier: GPL-2.0-or-later
// The supervisor: machines by name, one lifecycle operation at a time per machine, states from
// operations, QMP events, process exits and the liveness probe; definitions persisted.
#include "daemon/supervisor/supervisor.hpp"

#include <fcntl.h>
#include <malloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <deque>
#include <filesystem>
#include <list>
#include <utility>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "libmachine/machine/machine.hpp"
#include "libmachine/proc/proc_info.hpp"

namespace qm::daemon {
namespace fs = std::filesystem;

namespace {

// After powerdown's time for the guest, `quit` gets this long before SIGKILL.
constexpr auto quit_step_timeout = 5s;
// Prefix of the files in a machine's runtime directory: qemu-monitor.sock, qemu-console.sock,
// qemu.log (plus console.log).
constexpr std::string_view file_prefix = "qemu";
// The longest file name in a machine's runtime directory, "/m/<id>/qemu-console.sock": the
// runtime directory may be at most 107 - this long (unix socket paths are 108 bytes with NUL).
constexpr std::size_t runtime_suffix_len = 3 + 12 + 1 + 17;
// The seccomp sandbox of every QEMU (QEMU's -sandbox): no obsolete system calls, no setuid and
// friends, no fork/exec, no scheduler or affinity changes.
constexpr std::string_view sandbox_option =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
// Operations in flight at once that make a burst worth giving memory back after (Supervisor::end_job).
constexpr std::size_t trim_after_jobs = 32;

// Commands that take long by nature get a longer default deadline than options().qmp_timeout
// (sorted by name; a call may still give its own).
constexpr std::array<std::pair<std::string_view, std::chrono::seconds>, 4> slow_commands{{
    {"dump-guest-memory", 300s},
    {"human-monitor-command", 60s},
    {"query-qmp-schema", 30s},
    {"screendump", 60s},
}};

std::int64_t now_us()
{
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
}

// 12 hex digits of FNV-1a over the uuid: short, fixed length, stable for a definition.
std::string id_from_uuid(std::string_view uuid)
{
    std::uint64_t h = 14695981039346656037ULL;
    for (char c : uuid) {
        h ^= static_cast<unsigned char>(c);
        h *= 1099511628211ULL;
    }
    return fmt::format("{:012x}", h & 0xffffffffffffULL);
}

bool no_process(MachineState s)
{
    return !has_process(s);
}

std::string quoted(std::string_view name)
{
    return "'" + std::string(name) + "'";
}

} // namespace

const char* to_string(StopReason::Kind kind) noexcept
{
    switch (kind) {
    case StopReason::Kind::none: return "none";
    case StopReason::Kind::guest_poweroff: return "guest-poweroff";
    case StopReason::Kind::host_quit: return "host-quit";
    case StopReason::Kind::host_kill: return "host-kill";
    case StopReason::Kind::signal: return "signal";
    case StopReason::Kind::crashed: return "crashed";
    case StopReason::Kind::launch_failed: return "launch-failed";
    case StopReason::Kind::unknown: return "unknown";
    }
    return "unknown";
}

namespace {

std::optional<StopReason::Kind> stop_reason_kind_from_string(std::string_view s)
{
    using K = StopReason::Kind;
    for (K k : {K::none, K::guest_poweroff, K::host_quit, K::host_kill, K::signal, K::crashed,
                K::launch_failed, K::unknown}) {
        if (s == daemon::to_string(k)) {
            return k;
        }
    }
    return std::nullopt;
}

} // namespace

void stop_reason_to_json(const StopReason& r, json::Value& out, json::Document::AllocatorType& a)
{
    out.SetObject();
    out.AddMember("kind", json::Value(to_string(r.kind), a), a);
    if (r.kind == StopReason::Kind::signal && r.signal != 0) {
        out.AddMember("signal", r.signal, a); // 0: unknown (QEMU's SHUTDOWN names none)
    }
    if (r.exit_code) {
        out.AddMember("exit_code", *r.exit_code, a);
    }
    if (!r.detail.empty()) {
        out.AddMember("detail", json::Value(r.detail.c_str(), a), a);
    }
}

json::Document machine_to_json(const MachineInfo& m)
{
    json::Document d(rapidjson::kObjectType);
    auto& a = d.GetAllocator();
    auto str = [&](std::string_view s) {
        return json::Value(s.data(), static_cast<rapidjson::SizeType>(s.size()), a);
    };
    d.AddMember("name", str(m.name), a);
    d.AddMember("uuid", str(m.spec.uuid), a);
    d.AddMember("id", str(m.id), a);
    d.AddMember("generation", m.generation, a);
    d.AddMember("state", str(to_string(m.state)), a);
    d.AddMember("state_since_us", m.state_since_us, a);
    json::Value null_value;
    d.AddMember("pid", m.pid ? json::Value(*m.pid) : json::Value(), a);
    d.AddMember("exit_code", m.exit_code ? json::Value(*m.exit_code) : json::Value(), a);
    d.AddMember("exit_signal", m.exit_signal ? json::Value(*m.exit_signal) : json::Value(), a);
    if (m.stop_reason.kind == StopReason::Kind::none) {
        d.AddMember("stop_reason", json::Value(), a);
    } else {
        json::Value reason;
        stop_reason_to_json(m.stop_reason, reason, a);
        d.AddMember("stop_reason", reason, a);
    }
    d.AddMember("restart_count", m.restart_count, a);
    d.AddMember("qemu_status", m.qemu_status.empty() ? json::Value() : str(m.qemu_status), a);
    d.AddMember("operation", m.operation.empty() ? json::Value() : str(m.operation), a);
    json::Value paths(rapidjson::kObjectType);
    paths.AddMember("runtime_dir", str(m.runtime_dir), a);
    paths.AddMember("log", str(m.log_path), a);
    paths.AddMember("console_log", m.console_log_path.empty() ? json::Value() : str(m.console_log_path),
                    a);
    d.AddMember("paths", paths, a);
    json::Value spec;
    spec_to_json(m.spec, spec, a);
    d.AddMember("spec", spec, a);
    return d;
}

//---- the entry ----------------------------------------------------------------------------------

struct Supervisor::Entry
{
    Definition def;
    std::string id;
    std::string dir;
    MachineState state = MachineState::defined;
    std::int64_t state_since_us = now_us();
    StopReason stop_reason;
    std::optional<proc::ExitStatus> last_exit;
    std::uint32_t restart_count = 0;
    // The machine of the current (or last) launch; shared with the coroutines that use it.
    std::shared_ptr<Machine> machine;
    Job job = Job::none;
    bool creating = false;     // the definition is being saved for the first time
    bool cleaning_up = false;  // a process exited on its own; its Machine is being cleaned up
    bool unresponsive = false; // the probe failed; state is `unresponsive`
    bool probing = false;
    bool kill_requested = false;
    bool attaching = false; // reattach(): the machine's own state changes are not published
    // The restart policy: when the automatic restarts within the window happened (oldest
    // first), the pending restart's timer and a token that an operation bumps to cancel it.
    std::deque<std::chrono::steady_clock::time_point> restarts;
    std::shared_ptr<asio::steady_timer> restart_timer;
    std::uint64_t restart_token = 0;
    bool auto_starting = false;
    // Unresponsive with a restart policy: killed once this fires (unresponsive_limit).
    std::shared_ptr<asio::steady_timer> unresponsive_timer;
    bool killed_unresponsive = false;
    // The SHUTDOWN event of the current process, if any.
    bool saw_shutdown = false;
    bool shutdown_guest = false;
    std::string shutdown_reason;
    // Woken (cancelled) at every change: job end, state change.
    std::list<std::shared_ptr<asio::steady_timer>> waiters;
    // Which console session may write to the machine's console (console_attach()).
    std::shared_ptr<ConsoleWriterPlace> console_writer = std::make_shared<ConsoleWriterPlace>();

    void notify()
    {
        for (auto& t : waiters) {
            t->cancel();
        }
    }
};

namespace {

// Waits until `done()` holds (re-checked at every change of the entry) or `timeout` passes.
template <typename Entry>
awaitable<bool> wait_entry(std::shared_ptr<Entry> e, std::function<bool()> done,
                           std::chrono::milliseconds timeout = std::chrono::milliseconds::max())
{
    if (done()) {
        co_return true;
    }
    auto ex = co_await asio::this_coro::executor;
    const auto deadline = timeout == std::chrono::milliseconds::max()
                              ? asio::steady_timer::time_point::max()
                              : asio::steady_timer::clock_type::now() + timeout;
    auto timer = std::make_shared<asio::steady_timer>(ex);
    e->waiters.push_back(timer);
    bool ok = false;
    for (;;) {
        timer->expires_at(deadline);
        error_code ec;
        co_await timer->async_wait(use_ec(ec));
        if (done()) {
            ok = true;
            break;
        }
        if (asio::steady_timer::clock_type::now() >= deadline) {
            break;
        }
    }
    e->waiters.remove(timer);
    co_return ok;
}

} // namespace

const char* Supervisor::to_string(Job job) noexcept
{
    switch (job) {
    case Job::none: return "";
    case Job::start: return "start";
    case Job::stop: return "stop";
    case Job::restart: return "restart";
    case Job::pause: return "pause";
    case Job::resume: return "resume";
    case Job::update: return "update";
    case Job::remove: return "delete";
    }
    return "";
}

//---- construction, loading ----------------------------------------------------------------------

namespace {

// Event numbers of this run start above the daemon's start time in µs since the epoch: they keep
// growing across restarts (below 2^53, so JavaScript clients read them exactly, for centuries),
// and a number from an earlier run is told apart from this run's.
EventBusOptions run_events_options(EventBusOptions options)
{
    if (options.seq_base == 0) {
        options.seq_base = static_cast<std::uint64_t>(
            std::chrono::duration_cast<std::chrono::microseconds>(
                std::chrono::system_clock::now().time_since_epoch())
                .count());
    }
    return options;
}

} // namespace

Supervisor::Supervisor(asio::io_context& ioc, SupervisorOptions options)
    : ioc_(ioc), options_(std::move(options)), events_(ioc, run_events_options(options_.events)),
      store_(ioc, options_.state_dir), log_timer_(ioc)
{
    register_metrics();
}

Supervisor::~Supervisor()
{
    life_.reset();
    log_timer_.cancel();
    // Machines still running are killed now (and reaped by the watcher); a Machine held by a
    // suspended operation dies with it. Destroy the supervisor after shutdown() completed.
    for (auto& [name, e] : machines_) {
        cancel_restart(*e); // its coroutine sees the token changed and touches nothing else
        if (e->unresponsive_timer) {
            e->unresponsive_timer->cancel();
        }
        if (e->machine) {
            e->machine->kill_now();
        }
    }
    machines_.clear();
}

expected<std::vector<LoadProblem>> Supervisor::load()
{
    if (options_.runtime_dir.size() + runtime_suffix_len > 107) {
        return fail(errc::invalid_argument,
                    fmt::format("the runtime directory '{}' is {} bytes long; at most {} leave room "
                                "for the machines' socket paths",
                                options_.runtime_dir, options_.runtime_dir.size(),
                                107 - runtime_suffix_len));
    }
    const std::string machines_dir = options_.runtime_dir + "/m";
    if (::mkdir(machines_dir.c_str(), 0700) != 0 && errno != EEXIST) {
        return fail(errc::system_error, fmt::format("cannot create '{}': {}", machines_dir,
                                                    std::strerror(errno)));
    }
    std::vector<LoadProblem> problems;
    std::map<std::string, std::string> uuids; // uuid -> name, of the files accepted so far
    auto validate = [&](const LoadedFile& f) -> std::string {
        auto def = definition_from_json(f.content);
        if (!def) {
            return def.error().message;
        }
        if (def->name != f.name) {
            return fmt::format("the file is named '{}.json' but defines '{}'", f.name, def->name);
        }
        auto [it, inserted] = uuids.emplace(def->spec.uuid, def->name);
        if (!inserted) {
            return fmt::format("uuid {} is already used by '{}'", def->spec.uuid, it->second);
        }
        return {};
    };
    auto files = store_.load_all(validate, problems);
    for (const auto& p : problems) {
        spdlog::error("Failed to load the definition '{}': {} (moved to '{}')", p.file, p.reason,
                      p.moved_to);
    }
    for (const auto& f : files) {
        auto def = definition_from_json(f.content);
        if (!def) {
            continue; // validated above
        }
        auto e = std::make_shared<Entry>();
        e->id = id_from_uuid(def->spec.uuid);
        e->dir = fmt::format("{}/m/{}", options_.runtime_dir, e->id);
        e->def = std::move(*def);
        machines_.emplace(e->def.name, std::move(e));
    }
    spdlog::info("Loaded {} machine definition(s) from '{}' ({} problem(s))", machines_.size(),
                 options_.state_dir, problems.size());
    return problems;
}

void Supervisor::autostart()
{
    for (auto& [name, e] : machines_) {
        if (!e->def.spec.autostart) {
            continue;
        }
        spdlog::info("Starting '{}' (autostart)", name);
        asio::co_spawn(ioc_, start(name),
                       [n = name](const std::exception_ptr& ex, const expected<OpResult>& r) {
                           if (ex) {
                               spdlog::error("Failed to autostart '{}': {}", n,
                                             describe_exception(ex));
                           } else if (!r) {
                               spdlog::error("Failed to autostart '{}': {}", n, r.error().message);
                           }
                       });
    }
}

//---- re-attach after a restart ------------------------------------------------------------------

void Supervisor::remove_runtime_files(const Entry& e, const RuntimeRecord* record)
{
    // Only files inside the machine's own directory (the record is the daemon's, in a directory
    // only the daemon can write, but a path is still checked before it is unlinked).
    const std::string prefix = e.dir + "/";
    auto remove = [&prefix](const std::string& path) {
        if (!path.empty() && path.starts_with(prefix) &&
            path.find("/..", prefix.size() - 1) == std::string::npos) {
            ::unlink(path.c_str());
        }
    };
    remove(e.dir + "/" + std::string(file_prefix) + "-monitor.sock");
    remove(e.dir + "/" + std::string(file_prefix) + "-console.sock");
    if (record != nullptr) {
        remove(record->monitor);
        remove(record->console);
    }
    remove_record(e.dir);
}

void Supervisor::save_last_run(const Entry& e)
{
    LastRun r;
    r.state = std::string(qm::to_string(e.state));
    r.since_us = e.state_since_us;
    r.stop_kind = daemon::to_string(e.stop_reason.kind);
    r.stop_signal = e.stop_reason.signal;
    r.stop_exit_code = e.stop_reason.exit_code;
    r.stop_detail = e.stop_reason.detail;
    if (e.last_exit) {
        switch (e.last_exit->kind) {
        case proc::ExitStatus::Kind::exited:
            r.exit = "exited";
            r.exit_value = e.last_exit->code;
            break;
        case proc::ExitStatus::Kind::signaled:
            r.exit = "signaled";
            r.exit_value = e.last_exit->signal;
            break;
        case proc::ExitStatus::Kind::unknown: r.exit = "unknown"; break;
        }
    }
    r.restart_count = e.restart_count;
    if (auto written = write_last_run(e.dir, r); !written) {
        spdlog::warn("Failed to record how '{}' ended: {}", e.def.name, written.error().message);
    }
}

void Supervisor::restore_last_run(Entry& e)
{
    auto last = read_last_run(e.dir);
    if (!last) {
        spdlog::warn("Ignoring the last run of '{}': {}", e.def.name, last.error().message);
        return;
    }
    if (!*last) {
        return;
    }
    const LastRun& r = **last;
    const auto state = machine_state_from_string(r.state);
    const auto kind = stop_reason_kind_from_string(r.stop_kind);
    if (!state || has_process(*state) || *state == MachineState::defined || !kind) {
        spdlog::warn("Ignoring the last run of '{}': state '{}', stop reason '{}'", e.def.name,
                     r.state, r.stop_kind);
        return;
    }
    e.state = *state;
    e.state_since_us = r.since_us;
    e.stop_reason = StopReason{*kind, r.stop_signal, r.stop_exit_code, r.stop_detail};
    e.restart_count = r.restart_count;
    if (r.exit == "exited") {
        e.last_exit = proc::ExitStatus{proc::ExitStatus::Kind::exited, r.exit_value, 0, false};
    } else if (r.exit == "signaled") {
        e.last_exit = proc::ExitStatus{proc::ExitStatus::Kind::signaled, -1, r.exit_value, false};
    } else if (r.exit == "unknown") {
        e.last_exit = proc::ExitStatus{};
    }
}

void Supervisor::settle_dead(Entry& e, const RuntimeRecord& record, const std::string& why)
{
    remove_runtime_files(e, &record);
    e.restart_count = record.restart_count;
    e.stop_reason = StopReason{StopReason::Kind::unknown, 0, std::nullopt,
                               "QEMU exited while qmachined was not running (" + why + ")"};
    spdlog::warn("Machine '{}' died while qmachined was not running: {}", e.def.name, why);
    set_state(e, MachineState::crashed, e.stop_reason.detail);
    if (auto self = machines_.find(e.def.name); self != machines_.end()) {
        apply_restart_policy(self->second);
    }
}

awaitable<void> Supervisor::attach_one(std::shared_ptr<Entry> e, RuntimeRecord record, pid_t pid,
                                       int pidfd)
{
    auto machine = make_machine(*e);
    e->machine = machine;
    e->restart_count = record.restart_count;
    e->attaching = true;
    AttachOptions options;
    options.pid = pid;
    options.pidfd = pidfd;
    options.argv = record.argv;
    options.console_later = true; // reattach() connects the consoles once every machine answers
    auto attached = co_await machine->attach(std::move(options));
    e->attaching = false;
    if (!machine->is_running()) {
        // It exited while we attached: as if it had died while we were away.
        e->last_exit = machine->exit_status();
        e->cleaning_up = true;
        spawn(cleanup_after_exit(e), "clean up after an exit");
        settle_dead(*e, record, "it exited during the re-attach");
        co_return;
    }
    if (record.pid != pid) {
        record.pid = pid; // found by its command line: recorded now
        auto start_time = proc::process_start_time(pid);
        record.start_time = start_time ? *start_time : 0;
        if (auto written = write_record(e->dir, record); !written) {
            spdlog::error("Failed to record QEMU (pid {}): {}", pid, written.error().message);
        }
    }
    MachineState state = machine->state();
    std::string detail;
    if (!attached) {
        state = MachineState::unresponsive;
        e->unresponsive = true;
        detail = attached.error().message;
        spdlog::error("Failed to re-attach '{}' (pid {}): {}", e->def.name, pid, detail);
    } else if (state != MachineState::paused) {
        state = MachineState::running;
    }
    e->state = state;
    e->state_since_us = state == MachineState::running ? record.started_at_us : now_us();
    json::Document data(rapidjson::kObjectType);
    auto& a = data.GetAllocator();
    const auto name = qm::to_string(state);
    data.AddMember("pid", pid, a);
    data.AddMember("state",
                   json::Value(name.data(), static_cast<rapidjson::SizeType>(name.size()), a), a);
    data.AddMember("since_us", e->state_since_us, a);
    if (!detail.empty()) {
        data.AddMember("detail", json::Value(detail.c_str(), a), a);
    }
    events_.publish(e->def.name, event_names::machine_reattached, data);
    spdlog::info("Re-attached '{}' (pid {}): {}", e->def.name, pid, name);
    e->notify();
}

awaitable<void> Supervisor::connect_console(std::shared_ptr<Machine> machine, std::string name)
{
    auto connected = co_await machine->ensure_console();
    if (!connected) {
        spdlog::warn("Failed to connect the console of '{}': {}", name, connected.error().message);
    }
}

awaitable<void> Supervisor::reattach()
{
    const auto started = std::chrono::steady_clock::now();
    // Directories of machines that have no definition: their QEMU (if any) cannot be managed
    // any more. It is not left behind as an orphan.
    std::map<std::string, const Entry*> by_id;
    for (const auto& [name, e] : machines_) {
        by_id.emplace(e->id, e.get());
    }
    const std::string machines_dir = options_.runtime_dir + "/m";
    std::error_code ec;
    for (const auto& dirent : fs::directory_iterator(machines_dir, ec)) {
        const std::string id = dirent.path().filename().string();
        if (by_id.contains(id) || !dirent.is_directory(ec) || dirent.is_symlink(ec)) {
            continue;
        }
        const std::string dir = dirent.path().string();
        auto record = read_record(dir);
        if (record && *record) {
            if (auto found = find_recorded_process(**record)) {
                spdlog::error("Killing QEMU (pid {}) of machine '{}': it has no definition any "
                              "more", found->first, (*record)->name);
                (void)proc::pidfd_signal(found->second, SIGKILL);
                ::close(found->second);
            }
        }
        fs::remove_all(dir, ec);
    }

    std::size_t attaching = 0;
    std::size_t launched = 0; // attaches started
    std::size_t attached = 0; // ... that ended with the machine taken over
    std::size_t dead = 0;
    auto ex = co_await asio::this_coro::executor;
    asio::steady_timer wake(ex);
    for (auto& [name, e] : machines_) {
        auto record = read_record(e->dir);
        if (!record) {
            spdlog::error("Failed to read the runtime record of '{}': {}", name,
                          record.error().message);
            remove_runtime_files(*e, nullptr);
            continue;
        }
        if (!*record) {
            remove_runtime_files(*e, nullptr); // sockets of a run that ended without cleanup
            restore_last_run(*e);              // how its last run ended, if it ran
            continue;
        }
        const RuntimeRecord& r = **record;
        if (r.name != name || r.uuid != e->def.spec.uuid) {
            spdlog::error("The runtime record of '{}' names '{}' ({}): ignored", name, r.name,
                          r.uuid);
            remove_runtime_files(*e, nullptr);
            continue;
        }
        auto found = find_recorded_process(r);
        if (!found) {
            ++dead;
            settle_dead(*e, r, found.error().message);
            continue;
        }
        ++attaching;
        ++launched;
        // (A structured binding cannot be captured by clang 14: a copy can.)
        std::shared_ptr<Entry> entry = e;
        asio::co_spawn(ex, attach_one(entry, r, found->first, found->second),
                       [&attaching, &attached, &wake, entry, n = name](const std::exception_ptr& ex_ptr) {
                           if (ex_ptr) {
                               spdlog::error("Failed to re-attach '{}': {}", n,
                                             describe_exception(ex_ptr));
                           } else if (has_process(entry->state)) {
                               ++attached;
                           }
                           --attaching;
                           wake.cancel();
                       });
        // Let it connect before the next record is read: QEMU answers while we go on.
        co_await asio::post(ex, asio::use_awaitable);
    }
    while (attaching > 0) {
        wake.expires_at(asio::steady_timer::time_point::max());
        error_code wait_ec;
        co_await wake.async_wait(use_ec(wait_ec));
    }
    // The consoles last, not waited for: QEMU's console log has the output meanwhile, and a
    // console operation that comes first connects it itself.
    for (const auto& [name, e] : machines_) {
        if (e->machine && e->def.spec.console.enabled && e->machine->is_running()) {
            spawn(connect_console(e->machine, name), "connect a console");
        }
    }
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                        std::chrono::steady_clock::now() - started)
                        .count();
    spdlog::info("Re-attached {} running machine(s), {} died while qmachined was down ({} ms)",
                 attached, dead + (launched - attached), ms);
    if (options_.qemu_log_max > 0) {
        arm_log_check();
    }
}

void Supervisor::arm_log_check()
{
    log_timer_.expires_after(options_.log_check_period);
    log_timer_.async_wait([this, life = std::weak_ptr<int>(life_)](error_code ec) {
        if (ec || life.expired() || shutting_down_) {
            return;
        }
        check_logs();
        arm_log_check();
    });
}

void Supervisor::check_logs()
{
    // QEMU appends to its log through a descriptor it holds (O_APPEND), for as long as it runs,
    // across daemon restarts: the daemon bounds it from outside. Past the bound the newest
    // qemu_log_max bytes go to "qemu.log.1" and the log is emptied; QEMU's next write lands at
    // the new end. A stat per running machine, every log_check_period.
    for (const auto& [name, e] : machines_) {
        if (!has_process(e->state)) {
            continue;
        }
        const std::string path = fmt::format("{}/{}.log", e->dir, file_prefix);
        struct stat st {};
        if (::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode) ||
            static_cast<std::uint64_t>(st.st_size) <= options_.qemu_log_max) {
            continue;
        }
        const int in = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        const int out = ::open((path + ".1").c_str(),
                               O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (in >= 0 && out >= 0) {
            auto keep = static_cast<off_t>(options_.qemu_log_max);
            off_t from = st.st_size - keep;
            while (keep > 0) {
                const auto n = ::copy_file_range(in, &from, out, nullptr,
                                                 static_cast<std::size_t>(keep), 0);
                if (n <= 0) {
                    break;
                }
                keep -= n;
            }
            if (::truncate(path.c_str(), 0) == 0) {
                spdlog::info("The QEMU log of '{}' passed {} bytes: kept the newest in '{}.1'",
                             name, options_.qemu_log_max, path);
            }
        } else {
            spdlog::warn("Failed to bound the QEMU log of '{}': {}", name, std::strerror(errno));
        }
        if (in >= 0) {
            ::close(in);
        }
        if (out >= 0) {
            ::close(out);
        }
    }
}

void Supervisor::detach_all()
{
    shutting_down_ = true;
    for (auto& [name, e] : machines_) {
        cancel_restart(*e); // the next start's reattach() applies the policy to what died
    }
    std::size_t left = 0;
    for (auto& [name, e] : machines_) {
        if (e->machine && e->machine->is_running()) {
            ++left;
            spdlog::info("Leaving '{}' running (pid {})", name, e->machine->pid().value_or(-1));
        }
        if (e->machine) {
            e->machine->detach();
        }
    }
    spdlog::info("Left {} machine(s) running for the next start", left);
}

//---- the model ----------------------------------------------------------------------------------

Supervisor::Entry* Supervisor::find(std::string_view name) const
{
    auto it = machines_.find(name);
    if (it == machines_.end() || it->second->creating) {
        return nullptr;
    }
    return it->second.get();
}

expected<Supervisor::Entry*> Supervisor::lookup(std::string_view name) const
{
    if (auto valid = validate_name(name); !valid) {
        return fail(valid.error());
    }
    Entry* e = find(name);
    if (e == nullptr) {
        return fail(errc::no_such_machine, fmt::format("no machine named {}", quoted(name)));
    }
    return e;
}

expected<void> Supervisor::check_open() const
{
    if (shutting_down_) {
        return fail(errc::shutting_down, "qmachined is shutting down");
    }
    return {};
}

expected<std::shared_ptr<Supervisor::Entry>> Supervisor::open_entry(std::string_view name) const
{
    if (auto open = check_open(); !open) {
        return fail(open.error());
    }
    auto found = lookup(name);
    if (!found) {
        return fail(found.error());
    }
    return machines_.find(name)->second;
}

MachineInfo Supervisor::info(const Entry& e) const
{
    MachineInfo m;
    m.name = e.def.name;
    m.id = e.id;
    m.generation = e.def.generation;
    m.spec = e.def.spec;
    m.state = e.state;
    m.state_since_us = e.state_since_us;
    if (e.machine && has_process(e.state)) {
        m.pid = e.machine->pid();
    }
    if (e.last_exit && no_process(e.state)) {
        if (e.last_exit->kind == proc::ExitStatus::Kind::exited) {
            m.exit_code = e.last_exit->code;
        } else if (e.last_exit->kind == proc::ExitStatus::Kind::signaled) {
            m.exit_signal = e.last_exit->signal;
        }
    }
    m.stop_reason = e.stop_reason;
    m.restart_count = e.restart_count;
    if (e.machine && has_process(e.state)) {
        m.qemu_status = e.machine->qemu_status();
    }
    m.operation = to_string(e.job);
    m.runtime_dir = e.dir;
    m.log_path = fmt::format("{}/{}.log", e.dir, file_prefix);
    if (e.def.spec.console.enabled && e.def.spec.console.log_size > 0) {
        m.console_log_path = e.dir + "/console.log";
    }
    return m;
}

OpResult Supervisor::result(const Entry& e) const
{
    return OpResult{info(e), events_.last_seq()};
}

std::vector<MachineInfo> Supervisor::list() const
{
    std::vector<MachineInfo> out;
    out.reserve(machines_.size());
    for (const auto& [name, e] : machines_) {
        if (!e->creating) {
            out.push_back(info(*e));
        }
    }
    return out;
}

expected<MachineInfo> Supervisor::inspect(std::string_view name) const
{
    auto e = lookup(name);
    if (!e) {
        return fail(e.error());
    }
    return info(**e);
}

std::map<std::string, std::size_t> Supervisor::count_by_state() const
{
    std::map<std::string, std::size_t> counts;
    for (const auto& [name, e] : machines_) {
        if (!e->creating) {
            ++counts[std::string(qm::to_string(e->state))];
        }
    }
    return counts;
}

//---- metrics ------------------------------------------------------------------------------------

void Supervisor::register_metrics()
{
    std::vector<Gauge*> machines;
    for (MachineState state : machine_states()) {
        machines.push_back(&metrics_.gauge("qmachined_machines", "Machines by state.",
                                           {{"state", std::string(qm::to_string(state))}}));
    }
    restarts_total_ = &metrics_.counter("qmachined_machine_restarts_total",
                                        "Automatic restarts by the machines' restart policies.");
    constexpr std::array<const char*, 3> results{"ok", "error", "timeout"};
    for (std::size_t i = 0; i < results.size(); ++i) {
        qmp_total_[i] = &metrics_.counter(
            "qmachined_qmp_commands_total",
            "QMP commands sent for clients (passthrough, pause, resume), by result.",
            {{"result", results[i]}});
    }
    qmp_seconds_ = &metrics_.histogram(
        "qmachined_qmp_command_duration_seconds",
        "Latency of QMP commands sent for clients, until QEMU answered (and, for pause and "
        "resume, confirmed with its event).",
        latency_buckets);
    Counter& events = metrics_.counter("qmachined_events_total", "Events published.");
    Counter& dropped = metrics_.counter("qmachined_events_dropped_total",
                                        "QMP events dropped by the per-machine rate limit.");
    Gauge& subscribers = metrics_.gauge("qmachined_event_subscribers", "Open event subscriptions.");
    // Read when scraped rather than counted twice: the model and the bus keep these already.
    metrics_.add_collector([this, machines = std::move(machines), &events, &dropped, &subscribers] {
        const auto counts = count_by_state();
        const auto states = machine_states();
        for (std::size_t i = 0; i < states.size(); ++i) {
            const auto it = counts.find(std::string(qm::to_string(states[i])));
            machines[i]->set(it == counts.end() ? 0 : static_cast<double>(it->second));
        }
        // Every published event has the next sequence number: the last one is the count.
        events.value = events_.last_seq();
        dropped.value = events_.dropped_total();
        subscribers.set(static_cast<double>(events_.subscriber_count()));
    });
}

void Supervisor::count_qmp(std::chrono::steady_clock::time_point sent, const Error* failure)
{
    const std::size_t result = failure == nullptr ? 0 : failure->is(errc::timeout) ? 2 : 1;
    qmp_total_[result]->inc();
    qmp_seconds_->observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - sent).count());
}

//---- states -------------------------------------------------------------------------------------

void Supervisor::set_state(Entry& e, MachineState state, std::string detail)
{
    if (state == e.state) {
        return;
    }
    const MachineState previous = e.state;
    e.state = state;
    e.state_since_us = now_us();
    if (state != MachineState::unresponsive) {
        e.unresponsive = false;
    }
    json::Document data(rapidjson::kObjectType);
    auto& a = data.GetAllocator();
    const auto s = qm::to_string(state);
    const auto p = qm::to_string(previous);
    data.AddMember("state", json::Value(s.data(), static_cast<rapidjson::SizeType>(s.size()), a), a);
    data.AddMember("previous", json::Value(p.data(), static_cast<rapidjson::SizeType>(p.size()), a),
                   a);
    if (state == MachineState::stopped || state == MachineState::crashed ||
        state == MachineState::failed) {
        json::Value reason;
        stop_reason_to_json(e.stop_reason, reason, a);
        data.AddMember("reason", reason, a);
    }
    if (!detail.empty()) {
        data.AddMember("detail", json::Value(detail.c_str(), a), a);
    }
    std::string why = detail;
    if (why.empty() && data.HasMember("reason")) {
        why = fmt::format("reason {}", daemon::to_string(e.stop_reason.kind));
    }
    spdlog::info("Machine '{}' is {} (was {}){}{}", e.def.name, s, p, why.empty() ? "" : ": ", why);
    if (data.HasMember("reason")) {
        save_last_run(e); // a restarted daemon shows it as it ended
    }
    events_.publish(e.def.name, event_names::state_changed, data);
    e.notify();
    if (e.unresponsive_timer) {
        e.unresponsive_timer->cancel();
        e.unresponsive_timer.reset();
    }
    if (state == MachineState::unresponsive && e.def.spec.restart.policy != RestartPolicy::no) {
        // A monitor that never answers again would leave the machine unmanageable for good:
        // past the limit it is killed and its restart policy takes over.
        auto timer = std::make_shared<asio::steady_timer>(ioc_, options_.unresponsive_limit);
        e.unresponsive_timer = timer;
        Entry* raw = &e;
        timer->async_wait([this, raw, timer, life = std::weak_ptr<int>(life_)](error_code ec) {
            if (ec || life.expired() || raw->unresponsive_timer != timer ||
                raw->state != MachineState::unresponsive || !raw->machine) {
                return;
            }
            spdlog::warn("Machine '{}' did not answer for {} ms: killing it (restart policy {})",
                         raw->def.name, options_.unresponsive_limit.count(),
                         daemon::to_string(raw->def.spec.restart.policy));
            raw->killed_unresponsive = true;
            raw->machine->kill_now();
        });
    }
}

void Supervisor::on_machine_state(Entry& e, MachineState s)
{
    if (e.attaching) {
        return; // reattach() publishes the outcome once
    }
    switch (s) {
    case MachineState::starting:
    case MachineState::running:
    case MachineState::paused:
    case MachineState::stopping:
        if (e.state == MachineState::stopping && s != MachineState::stopping && e.job == Job::stop) {
            return; // our stop is under way: a late RESUME does not bring the machine back
        }
        set_state(e, s);
        break;
    case MachineState::unresponsive:
        // The monitor connection broke while QEMU lives on: nothing can be asked of it any more.
        if (has_process(e.state) && e.state != MachineState::stopping) {
            e.unresponsive = true;
            const std::string& why = e.machine->qmp_lost_reason();
            set_state(e, MachineState::unresponsive,
                      why.empty() ? std::string("the QMP connection was lost")
                                  : "the QMP connection was lost: " + why);
        }
        break;
    default:
        // defined, stopped, crashed, failed: the supervisor decides, knowing the reason.
        break;
    }
}

void Supervisor::on_machine_event(Entry& e, const qmp::Event& event)
{
    if (event.name() == "SHUTDOWN") {
        e.saw_shutdown = true;
        const json::Value* guest = json::find(event.data(), "guest");
        e.shutdown_guest = guest != nullptr && guest->IsBool() && guest->GetBool();
        e.shutdown_reason = std::string(json::get_string(event.data(), "reason").value_or(""));
    }
    events_.publish_qmp(e.def.name, event);
}

StopReason Supervisor::reason_from_exit(const Entry& e) const
{
    StopReason r;
    if (e.kill_requested) {
        r.kind = StopReason::Kind::host_kill;
        return r;
    }
    if (e.killed_unresponsive) {
        // Killed by us, but for failing: a failure to the restart policy.
        r.kind = StopReason::Kind::crashed;
        r.detail = fmt::format("unresponsive for {} ms: killed by qmachined",
                               options_.unresponsive_limit.count());
        return r;
    }
    if (!e.last_exit) {
        r.kind = StopReason::Kind::unknown;
        return r;
    }
    if (e.last_exit->kind == proc::ExitStatus::Kind::unknown) {
        // Not our child (re-attached): only its SHUTDOWN event, if any, says how it ended.
        if (e.saw_shutdown && e.shutdown_guest) {
            r.kind = StopReason::Kind::guest_poweroff;
        } else if (e.saw_shutdown && e.shutdown_reason == "host-qmp-quit") {
            r.kind = StopReason::Kind::host_quit;
        } else if (e.saw_shutdown && e.shutdown_reason == "host-signal") {
            r.kind = StopReason::Kind::signal; // which one QEMU does not say
            r.detail = "QEMU exited after a termination signal (SHUTDOWN reason host-signal; exit "
                       "status unknown: the process was re-attached)";
        } else if (e.saw_shutdown) {
            r.kind = StopReason::Kind::unknown;
            r.detail = "SHUTDOWN reason " + e.shutdown_reason + "; exit status unknown";
        } else {
            // QEMU says SHUTDOWN before every orderly exit: without one it died.
            r.kind = StopReason::Kind::crashed;
            r.detail = "exited without a SHUTDOWN event (exit status unknown: the process was "
                       "re-attached, not qmachined's child)";
        }
        return r;
    }
    const auto& x = *e.last_exit;
    if (x.kind == proc::ExitStatus::Kind::signaled) {
        r.kind = StopReason::Kind::signal;
        r.signal = x.signal;
        r.detail = x.to_string();
        return r;
    }
    r.exit_code = x.code;
    if (x.code != 0) {
        r.kind = StopReason::Kind::crashed;
        r.detail = x.to_string();
        return r;
    }
    if (e.saw_shutdown && e.shutdown_guest) {
        r.kind = StopReason::Kind::guest_poweroff;
    } else if (e.saw_shutdown && e.shutdown_reason == "host-qmp-quit") {
        r.kind = StopReason::Kind::host_quit;
    } else if (e.saw_shutdown && e.shutdown_reason == "host-signal") {
        // QEMU was told to exit by a signal (SIGTERM, SIGINT, SIGHUP) from outside.
        r.kind = StopReason::Kind::signal;
        r.detail = "QEMU exited after a termination signal (SHUTDOWN reason host-signal)";
    } else {
        r.kind = StopReason::Kind::unknown;
        r.detail = e.saw_shutdown ? "SHUTDOWN reason " + e.shutdown_reason : "exited with status 0";
    }
    return r;
}

void Supervisor::on_machine_exit(Entry& e)
{
    remove_record(e.dir); // the process it names is gone
    e.last_exit = e.machine ? e.machine->exit_status() : std::nullopt;
    if (e.attaching) {
        e.notify();
        return; // attach_one() sees the exit
    }
    if (e.job == Job::start || e.job == Job::stop || e.job == Job::restart ||
        e.job == Job::remove) {
        e.notify();
        return; // the operation sets the final state, knowing which step ended the process
    }
    // An exit nobody asked for here: a crash, a guest power-off, a quit through passthrough, a kill.
    e.stop_reason = reason_from_exit(e);
    const bool crashed = e.stop_reason.kind == StopReason::Kind::crashed ||
                         (e.stop_reason.kind == StopReason::Kind::signal && e.stop_reason.signal != 0);
    const auto self = machines_.find(e.def.name);
    if (self != machines_.end()) {
        e.cleaning_up = true;
        spawn(cleanup_after_exit(self->second), "clean up after an exit");
    }
    set_state(e, crashed ? MachineState::crashed : MachineState::stopped,
              e.last_exit ? e.last_exit->to_string() : std::string{});
    if (self != machines_.end()) {
        apply_restart_policy(self->second);
    }
}

awaitable<void> Supervisor::cleanup_after_exit(std::shared_ptr<Entry> e)
{
    // The process is gone; shutdown() only cleans up (sockets, the log tail). It cannot fail.
    auto machine = e->machine;
    if (machine) {
        auto r = co_await machine->shutdown();
        (void)r;
    }
    e->cleaning_up = false;
    e->notify();
}

//---- restart policies ---------------------------------------------------------------------------

void Supervisor::apply_restart_policy(std::shared_ptr<Entry> e)
{
    const RestartSpec& policy = e->def.spec.restart;
    if (policy.policy == RestartPolicy::no || restarts_suspended() || has_process(e->state)) {
        return;
    }
    // on-failure: a crash (signal, non-zero exit, death without SHUTDOWN) or a failed start;
    // always: any exit nobody asked for, a guest power-off included. A QEMU that a termination
    // signal from outside made quit cleanly (SHUTDOWN host-signal: `machinectl terminate`, the
    // host's shutdown, an operator's kill) was asked by someone: an operator's stop for both.
    const bool failure = e->state == MachineState::crashed || e->state == MachineState::failed;
    if (policy.policy == RestartPolicy::on_failure && !failure) {
        return;
    }
    if (e->state == MachineState::stopped && e->stop_reason.kind == StopReason::Kind::signal) {
        // (on-failure returned above: this is not a failure.)
        spdlog::info("Machine '{}': QEMU quit on a termination signal from outside: not "
                     "restarted (restart policy always), as for an operator's stop",
                     e->def.name);
        return;
    }
    const auto now = std::chrono::steady_clock::now();
    const auto window = std::chrono::seconds(policy.window_s);
    while (!e->restarts.empty() && now - e->restarts.front() > window) {
        e->restarts.pop_front();
    }
    if (e->restarts.size() >= policy.max_restarts) {
        json::Document data(rapidjson::kObjectType);
        data.AddMember("restarts", static_cast<std::uint64_t>(e->restarts.size()),
                       data.GetAllocator());
        data.AddMember("window_s", policy.window_s, data.GetAllocator());
        events_.publish(e->def.name, event_names::crash_loop, data);
        spdlog::error("Machine '{}' ended again after {} restart(s) within {} s (crash loop): "
                      "left failed until someone starts it", e->def.name, e->restarts.size(),
                      policy.window_s);
        e->restarts.clear();
        set_state(*e, MachineState::failed,
                  fmt::format("crash loop: {} restarts within {} s", policy.max_restarts,
                              policy.window_s));
        return;
    }
    // Exponential backoff within the window: initial, 2 × initial, ... up to the maximum.
    const auto attempt = e->restarts.size();
    std::uint64_t delay = policy.backoff_initial_ms;
    for (std::size_t i = 0; i < attempt && delay < policy.backoff_max_ms; ++i) {
        delay *= 2;
    }
    delay = std::min<std::uint64_t>(delay, policy.backoff_max_ms);
    e->restarts.push_back(now);
    json::Document data(rapidjson::kObjectType);
    auto& a = data.GetAllocator();
    data.AddMember("attempt", static_cast<std::uint64_t>(attempt + 1), a);
    data.AddMember("delay_ms", delay, a);
    const char* why = daemon::to_string(e->stop_reason.kind);
    data.AddMember("reason", json::Value(why, a), a);
    events_.publish(e->def.name, event_names::restart_scheduled, data);
    spdlog::info("Restarting '{}' in {} ms (policy {}, attempt {} of {} within {} s)",
                 e->def.name, delay, daemon::to_string(policy.policy), attempt + 1, policy.max_restarts,
                 policy.window_s);
    cancel_restart(*e);
    e->restart_timer = std::make_shared<asio::steady_timer>(ioc_, std::chrono::milliseconds(delay));
    spawn(auto_restart(e, e->restart_token), "restart a machine");
}

void Supervisor::cancel_restart(Entry& e)
{
    ++e.restart_token;
    if (e.restart_timer) {
        e.restart_timer->cancel();
        e.restart_timer.reset();
    }
}

awaitable<void> Supervisor::auto_restart(std::shared_ptr<Entry> e, std::uint64_t token)
{
    auto timer = e->restart_timer;
    error_code ec;
    co_await timer->async_wait(use_ec(ec));
    if (token != e->restart_token || restarts_suspended() || !machines_.contains(e->def.name) ||
        machines_.at(e->def.name) != e) {
        co_return; // cancelled by an operation, the machine deleted, or the daemon stopping
    }
    e->restart_timer.reset();
    co_await wait_job(e); // a cleanup after the exit
    if (token != e->restart_token || has_process(e->state) || e->job != Job::none) {
        co_return;
    }
    ++e->restart_count;
    restarts_total_->inc();
    begin_job(*e, Job::start);
    e->auto_starting = true;
    auto started = co_await do_start(e);
    e->auto_starting = false;
    end_job(*e);
    if (!started) {
        spdlog::error("Failed to restart '{}': {}", e->def.name, started.error().message);
        apply_restart_policy(e);
    }
}

//---- jobs ---------------------------------------------------------------------------------------

void Supervisor::spawn(awaitable<void> task, const char* what)
{
    asio::co_spawn(ioc_, std::move(task), [what](const std::exception_ptr& ex) {
        if (ex) {
            spdlog::error("Failed to {}: {}", what, describe_exception(ex));
        }
    });
}

void Supervisor::begin_job(Entry& e, Job job)
{
    if (e.job == Job::none) {
        ++jobs_running_;
        jobs_peak_ = std::max(jobs_peak_, jobs_running_);
    }
    e.job = job;
    e.notify();
}

void Supervisor::end_job(Entry& e)
{
    if (e.job != Job::none) {
        --jobs_running_;
    }
    e.job = Job::none;
    e.notify();
    if (jobs_running_ == 0 && jobs_peak_ >= trim_after_jobs) {
        // A burst of operations (hundreds of starts at once) leaves freed memory between the
        // machines' long-lived blocks, resident for good: glibc's malloc_trim gives back every
        // free page, inside the heap too. Once per burst, after the loop's current handler.
        jobs_peak_ = 0;
        asio::post(ioc_, [life = std::weak_ptr<int>(life_)] {
            if (!life.expired()) {
                ::malloc_trim(0);
            }
        });
    }
}

awaitable<void> Supervisor::wait_job(std::shared_ptr<Entry> e)
{
    Entry* raw = e.get();
    std::function<bool()> idle = [raw] { return raw->job == Job::none && !raw->cleaning_up; };
    co_await wait_entry(std::move(e), std::move(idle));
}

expected<void> Supervisor::job_conflict(const Entry& e, std::string_view op) const
{
    return fail(errc::invalid_state, fmt::format("cannot {} '{}': a {} is in progress", op,
                                                 e.def.name, to_string(e.job)));
}

//---- create, update, remove ---------------------------------------------------------------------

awaitable<expected<OpResult>> Supervisor::create(std::string name, json::Document spec_json)
{
    if (auto open = check_open(); !open) {
        co_return fail(open.error());
    }
    if (auto valid = validate_name(name); !valid) {
        co_return fail(valid.error());
    }
    if (machines_.contains(name)) {
        co_return fail(errc::exists, fmt::format("a machine named '{}' already exists", name));
    }
    if (machines_.size() >= options_.max_machines) {
        co_return fail(errc::limit_exceeded,
                       fmt::format("cannot create '{}': the limit of {} machines is reached", name,
                                   options_.max_machines));
    }
    auto spec = parse_spec(spec_json);
    if (!spec) {
        co_return fail(spec.error());
    }
    const std::string id = id_from_uuid(spec->uuid);
    for (const auto& [other, oe] : machines_) {
        if (oe->def.spec.uuid == spec->uuid || oe->id == id) {
            co_return fail(errc::exists, fmt::format("cannot create '{}': uuid {} is already used "
                                                     "by '{}'", name, spec->uuid, other));
        }
    }
    auto e = std::make_shared<Entry>();
    e->def.name = name;
    e->def.generation = 1;
    e->def.spec = std::move(*spec);
    e->id = id;
    e->dir = fmt::format("{}/m/{}", options_.runtime_dir, e->id);
    e->creating = true;
    machines_.emplace(name, e);
    auto saved = co_await store_.save(name, definition_to_json(e->def));
    if (!saved) {
        machines_.erase(name);
        spdlog::error("Failed to create '{}': {}", name, saved.error().message);
        co_return fail(saved.error());
    }
    e->creating = false;
    json::Document data(rapidjson::kObjectType);
    data.AddMember("uuid", json::Value(e->def.spec.uuid.c_str(), data.GetAllocator()),
                   data.GetAllocator());
    data.AddMember("generation", e->def.generation, data.GetAllocator());
    events_.publish(name, event_names::machine_created, data);
    spdlog::info("Created machine '{}' (uuid {}, id {})", name, e->def.spec.uuid, e->id);
    co_return result(*e);
}

awaitable<expected<OpResult>> Supervisor::update(std::string name, json::Document spec_json,
                                                 std::uint64_t generation)
{
    auto opened = open_entry(name);
    if (!opened) {
        co_return fail(opened.error());
    }
    auto e = std::move(*opened);
    if (e->job != Job::none) {
        co_return fail(job_conflict(*e, "update").error());
    }
    if (has_process(e->state) || e->cleaning_up) {
        co_return fail(errc::invalid_state,
                       fmt::format("cannot update '{}' while it is {}: stop it first", name,
                                   qm::to_string(e->state)));
    }
    if (generation != e->def.generation) {
        co_return fail(errc::stale_generation,
                       fmt::format("cannot update '{}': generation {} is not the current one ({})",
                                   name, generation, e->def.generation));
    }
    const bool keeps_uuid = json::find(spec_json, "uuid") == nullptr;
    auto spec = parse_spec(spec_json);
    if (!spec) {
        co_return fail(spec.error());
    }
    if (keeps_uuid) {
        spec->uuid = e->def.spec.uuid;
    }
    const std::string id = id_from_uuid(spec->uuid);
    for (const auto& [other, oe] : machines_) {
        if (oe != e && (oe->def.spec.uuid == spec->uuid || oe->id == id)) {
            co_return fail(errc::exists, fmt::format("cannot update '{}': uuid {} is already used "
                                                     "by '{}'", name, spec->uuid, other));
        }
    }
    Definition def;
    def.name = name;
    def.generation = e->def.generation + 1;
    def.spec = std::move(*spec);
    begin_job(*e, Job::update);
    auto saved = co_await store_.save(name, definition_to_json(def));
    end_job(*e);
    if (!saved) {
        spdlog::error("Failed to update '{}': {}", name, saved.error().message);
        co_return fail(saved.error());
    }
    if (id != e->id) {
        std::error_code ec;
        fs::remove_all(e->dir, ec); // no process: only the last run's logs
        e->id = id;
        e->dir = fmt::format("{}/m/{}", options_.runtime_dir, id);
    }
    e->def = std::move(def);
    json::Document data(rapidjson::kObjectType);
    data.AddMember("generation", e->def.generation, data.GetAllocator());
    events_.publish(name, event_names::machine_updated, data);
    co_return result(*e);
}

awaitable<expected<std::uint64_t>> Supervisor::remove(std::string name, bool force)
{
    auto opened = open_entry(name);
    if (!opened) {
        co_return fail(opened.error());
    }
    auto e = std::move(*opened);
    cancel_restart(*e); // an operator's word replaces the restart policy's
    if (e->job == Job::remove) {
        co_return fail(job_conflict(*e, "delete").error());
    }
    if (!force && (e->job != Job::none || has_process(e->state))) {
        if (e->job != Job::none) {
            co_return fail(job_conflict(*e, "delete").error());
        }
        co_return fail(errc::invalid_state,
                       fmt::format("cannot delete '{}' while it is {}: stop it first, or force",
                                   name, qm::to_string(e->state)));
    }
    if (force && e->machine && (has_process(e->state) || e->job != Job::none)) {
        e->kill_requested = true;
        e->machine->kill_now();
    }
    Entry* raw = e.get();
    std::function<bool()> quiet = [raw] {
        return !has_process(raw->state) && raw->job == Job::none && !raw->cleaning_up;
    };
    co_await wait_entry(e, std::move(quiet));
    if (e->job != Job::none || has_process(e->state)) {
        co_return fail(errc::invalid_state, fmt::format("cannot delete '{}': it was started again "
                                                        "meanwhile", name));
    }
    begin_job(*e, Job::remove);
    auto removed = co_await store_.remove(name);
    if (!removed) {
        end_job(*e);
        spdlog::error("Failed to delete '{}': {}", name, removed.error().message);
        co_return fail(removed.error());
    }
    end_job(*e);
    machines_.erase(name);
    e->machine.reset();
    std::error_code ec;
    fs::remove_all(e->dir, ec);
    events_.forget_machine(name);
    json::Document data(rapidjson::kObjectType);
    const auto seq = events_.publish(name, event_names::machine_removed, data);
    spdlog::info("Deleted machine '{}'", name);
    co_return seq;
}

//---- start --------------------------------------------------------------------------------------

awaitable<expected<OpResult>> Supervisor::start(std::string name)
{
    auto opened = open_entry(name);
    if (!opened) {
        co_return fail(opened.error());
    }
    auto e = std::move(*opened);
    cancel_restart(*e); // an operator's word replaces the restart policy's
    if (e->job == Job::start || e->job == Job::restart) {
        // Joins the start in progress: its outcome is this call's outcome.
        co_await wait_job(e);
        if (has_process(e->state)) {
            co_return result(*e);
        }
        co_return fail(errc::launch_failed,
                       fmt::format("'{}' did not start: {}", name, e->stop_reason.detail));
    }
    if (e->job != Job::none) {
        co_return fail(job_conflict(*e, "start").error());
    }
    if (e->state == MachineState::stopping) {
        co_return fail(errc::invalid_state,
                       fmt::format("cannot start '{}' while it is stopping", name));
    }
    if (has_process(e->state)) {
        co_return result(*e); // running, paused, unresponsive: already started
    }
    begin_job(*e, Job::start);
    auto started = co_await do_start(e);
    end_job(*e);
    if (!started) {
        co_return fail(started.error());
    }
    co_return result(*e);
}

std::shared_ptr<Machine> Supervisor::make_machine(Entry& e)
{
    const MachineSpec& spec = e.def.spec;
    MachineConfig config;
    config.binary = spec.binary;
    config.name = e.def.name;
    config.file_prefix = std::string(file_prefix);
    config.base_temp_dir = e.dir;
    config.sock_dir = e.dir;
    config.log_dir = e.dir;
    config.qmp_timer = options_.launch_timeout;
    config.event_queue_limit = 0; // every event goes to the bus through on_event
    config.qmp_max_message = options_.qmp_max_message;
    config.console_ring_size = spec.console.ring_size;
    config.console_log_max = spec.console.log_size;
    // QEMU gets its sockets and the console log as descriptors: it needs no access to the
    // machine's directory (which stays the daemon's, 0700), and outlives a daemon restart.
    config.pass_sockets = true;
    config.run_as_uid = options_.qemu_uid;
    config.run_as_gid = options_.qemu_gid;
    config.run_as_groups = options_.qemu_groups;
    if (spec.console.enabled && spec.console.log_size > 0) {
        config.console_log = e.dir + "/console.log";
    }
    if (options_.sandbox) {
        config.args.emplace_back("-sandbox");
        config.args.emplace_back(sandbox_option);
    }
    // The machine's identity is the guest's too (SMBIOS system UUID, QMP query-uuid).
    config.args.emplace_back("-uuid");
    config.args.push_back(spec.uuid);
    if (spec.memory_mib) {
        config.args.emplace_back("-m");
        config.args.push_back(std::to_string(*spec.memory_mib));
    }
    if (spec.cpus != 1) {
        config.args.emplace_back("-smp");
        config.args.push_back(std::to_string(spec.cpus));
    }
    config.args.insert(config.args.end(), spec.args.begin(), spec.args.end());

    auto machine = std::make_shared<Machine>(ioc_, std::move(config));
    if (spec.machine) {
        machine->set_machine(*spec.machine);
    }
    if (spec.console.enabled) {
        machine->set_console();
    }
    Entry* raw = &e;
    // The callbacks check the supervisor's liveness token: a machine that outlives it (held by a
    // coroutine frame until the loop is destroyed) never calls into a destroyed supervisor.
    std::weak_ptr<int> life = life_;
    machine->on_state_change([this, raw, life](MachineState s) {
        if (!life.expired()) {
            on_machine_state(*raw, s);
        }
    });
    machine->on_event([this, raw, life](const qmp::Event& ev) {
        if (!life.expired()) {
            on_machine_event(*raw, ev);
        }
    });
    machine->on_exit([this, raw, life](const proc::ExitStatus&) {
        if (!life.expired()) {
            on_machine_exit(*raw);
        }
    });
    return machine;
}

awaitable<expected<void>> Supervisor::do_start(std::shared_ptr<Entry> e)
{
    if (e->cleaning_up) {
        Entry* raw = e.get();
        std::function<bool()> clean = [raw] { return !raw->cleaning_up; };
        co_await wait_entry(e, std::move(clean));
    }
    const MachineSpec& spec = e->def.spec;
    const std::string name = e->def.name;
    if (::mkdir(e->dir.c_str(), 0700) != 0 && errno != EEXIST) {
        e->stop_reason = StopReason{StopReason::Kind::launch_failed, 0, std::nullopt,
                                    fmt::format("cannot create '{}': {}", e->dir,
                                                std::strerror(errno))};
        set_state(*e, MachineState::failed, e->stop_reason.detail);
        co_return fail(errc::launch_failed,
                       fmt::format("cannot start '{}': {}", name, e->stop_reason.detail));
    }
    auto machine = make_machine(*e);
    // The record first (without a pid), then with the pid as soon as there is one: whenever the
    // daemon dies, the next one knows this QEMU may exist.
    RuntimeRecord record;
    record.name = name;
    record.uuid = spec.uuid;
    record.generation = e->def.generation;
    record.boot_id = proc::boot_id();
    record.argv = machine->full_args();
    record.argv_hash = proc::hash_command_line(record.argv);
    record.monitor = e->dir + "/" + std::string(file_prefix) + "-monitor.sock";
    if (spec.console.enabled) {
        record.console = machine->console_socket_path();
    }
    record.started_at_us = now_us();
    record.restart_count = e->restart_count;
    if (auto written = write_record(e->dir, record); !written) {
        e->stop_reason = StopReason{StopReason::Kind::launch_failed, 0, std::nullopt,
                                    written.error().message};
        set_state(*e, MachineState::failed, e->stop_reason.detail);
        co_return fail(errc::launch_failed,
                       fmt::format("cannot start '{}': {}", name, e->stop_reason.detail));
    }
    machine->on_spawn([dir = e->dir, record](pid_t pid) mutable {
        record.pid = pid;
        auto start_time = proc::process_start_time(pid);
        record.start_time = start_time ? *start_time : 0;
        if (auto written = write_record(dir, record); !written) {
            spdlog::error("Failed to record QEMU (pid {}): {}", pid, written.error().message);
        }
    });
    e->machine = machine;
    e->kill_requested = false;
    e->killed_unresponsive = false;
    e->saw_shutdown = false;
    e->shutdown_guest = false;
    e->shutdown_reason.clear();
    e->last_exit.reset();
    e->unresponsive = false;
    set_state(*e, MachineState::starting);

    auto launched = co_await machine->launch();
    if (!launched) {
        remove_record(e->dir);
        e->last_exit = machine->exit_status();
        if (e->kill_requested) {
            e->stop_reason = StopReason{StopReason::Kind::host_kill, 0, std::nullopt, {}};
            set_state(*e, MachineState::stopped, "killed while starting");
            co_return fail(errc::launch_failed,
                           fmt::format("'{}' was killed while starting", name));
        }
        e->stop_reason = StopReason{StopReason::Kind::launch_failed, 0, std::nullopt,
                                    launched.error().message};
        set_state(*e, MachineState::failed);
        spdlog::error("Failed to start '{}': {}", name, launched.error().message);
        co_return fail(errc::launch_failed,
                       fmt::format("cannot start '{}': {}", name, launched.error().message));
    }
    if (!machine->is_running()) {
        // It exited right after negotiating (an exit during the start job is ours to report).
        e->stop_reason = reason_from_exit(*e);
        e->cleaning_up = true;
        spawn(cleanup_after_exit(e), "clean up after an exit");
        set_state(*e, MachineState::crashed);
        co_return fail(errc::launch_failed,
                       fmt::format("'{}' exited right after starting: {}", name,
                                   e->last_exit ? e->last_exit->to_string() : "unknown"));
    }
    e->stop_reason = StopReason{};
    // The machine's state after negotiation: running, or paused (-S, an error state).
    set_state(*e, machine->state() == MachineState::paused ? MachineState::paused
                                                           : MachineState::running);
    spdlog::info("Started '{}' (pid {})", name, machine->pid().value_or(-1));
    co_return expected<void>{};
}

//---- stop, kill, restart ------------------------------------------------------------------------

awaitable<expected<OpResult>> Supervisor::stop(std::string name, StopOptions options)
{
    auto opened = open_entry(name);
    if (!opened) {
        co_return fail(opened.error());
    }
    auto e = std::move(*opened);
    cancel_restart(*e); // an operator's word replaces the restart policy's
    if (e->job == Job::stop) {
        co_await wait_job(e); // joins the stop in progress
        co_return result(*e);
    }
    if (e->job != Job::none) {
        co_return fail(job_conflict(*e, "stop").error());
    }
    if (!has_process(e->state)) {
        co_await wait_job(e); // a cleanup after an exit
        co_return result(*e); // already stopped
    }
    begin_job(*e, Job::stop);
    auto stopped = co_await do_stop(e, options);
    end_job(*e);
    if (!stopped) {
        co_return fail(stopped.error());
    }
    co_return result(*e);
}

awaitable<expected<void>> Supervisor::do_stop(std::shared_ptr<Entry> e, StopOptions options)
{
    auto machine = e->machine;
    if (!machine) {
        co_return expected<void>{};
    }
    const ShutdownModeSpec mode = options.mode.value_or(e->def.spec.shutdown.mode);
    const auto timeout = options.timeout.value_or(
        std::chrono::milliseconds(std::chrono::seconds(e->def.spec.shutdown.timeout_s)));
    ShutdownOptions so;
    so.mode = mode == ShutdownModeSpec::powerdown ? ShutdownMode::powerdown : ShutdownMode::quit;
    if (so.mode == ShutdownMode::powerdown) {
        so.powerdown_timeout = timeout;
        so.timeout = quit_step_timeout;
    } else {
        so.timeout = timeout;
    }
    // A monitor that does not answer cannot quit gracefully; nor can a zero timeout.
    so.hard = e->state == MachineState::unresponsive || timeout.count() == 0;
    set_state(*e, MachineState::stopping);
    auto r = co_await machine->shutdown(so);
    if (!r && !r.error().is(errc::abnormal_shutdown)) {
        spdlog::warn("Stopping '{}': {}", e->def.name, r.error().message);
    }
    e->last_exit = machine->exit_status();
    StopReason reason;
    switch (machine->last_shutdown_step()) {
    case ShutdownStep::guest_poweroff: reason.kind = StopReason::Kind::guest_poweroff; break;
    case ShutdownStep::quit: reason.kind = StopReason::Kind::host_quit; break;
    case ShutdownStep::kill:
        reason.kind = StopReason::Kind::host_kill;
        if (!r) {
            reason.detail = r.error().message;
        }
        break;
    case ShutdownStep::exited:
    case ShutdownStep::none: reason = reason_from_exit(*e); break;
    }
    if (e->kill_requested) {
        reason.kind = StopReason::Kind::host_kill;
    }
    if (e->last_exit && e->last_exit->kind == proc::ExitStatus::Kind::exited) {
        reason.exit_code = e->last_exit->code;
    }
    e->stop_reason = reason;
    set_state(*e, MachineState::stopped);
    co_return expected<void>{};
}

awaitable<expected<OpResult>> Supervisor::kill(std::string name)
{
    auto opened = open_entry(name);
    if (!opened) {
        co_return fail(opened.error());
    }
    auto e = std::move(*opened);
    cancel_restart(*e); // an operator's word replaces the restart policy's
    if (e->machine && (has_process(e->state) || e->job == Job::start || e->job == Job::restart)) {
        // Preempts whatever is in progress: a stop waiting for the guest, a start, a hung monitor.
        e->kill_requested = true;
        e->machine->kill_now();
        spdlog::info("Killing '{}'", name);
    }
    Entry* raw = e.get();
    std::function<bool()> gone = [raw] {
        return !has_process(raw->state) && raw->job != Job::start && raw->job != Job::stop &&
               raw->job != Job::restart;
    };
    co_await wait_entry(e, std::move(gone));
    co_return result(*e);
}

awaitable<expected<OpResult>> Supervisor::restart(std::string name)
{
    auto opened = open_entry(name);
    if (!opened) {
        co_return fail(opened.error());
    }
    auto e = std::move(*opened);
    cancel_restart(*e); // an operator's word replaces the restart policy's
    if (e->job != Job::none) {
        co_return fail(job_conflict(*e, "restart").error());
    }
    if (e->state == MachineState::stopping) {
        co_return fail(errc::invalid_state,
                       fmt::format("cannot restart '{}' while it is stopping", name));
    }
    begin_job(*e, Job::restart);
    if (has_process(e->state)) {
        auto stopped = co_await do_stop(e, StopOptions{});
        if (!stopped) {
            end_job(*e);
            co_return fail(stopped.error());
        }
    }
    if (e->kill_requested) {
        end_job(*e);
        co_return fail(errc::invalid_state, fmt::format("'{}' was killed during restart", name));
    }
    auto started = co_await do_start(e);
    end_job(*e);
    if (!started) {
        co_return fail(started.error());
    }
    co_return result(*e);
}

//---- pause, resume ------------------------------------------------------------------------------

awaitable<expected<OpResult>> Supervisor::pause(std::string name)
{
    co_return co_await pause_or_resume(std::move(name), Job::pause);
}

awaitable<expected<OpResult>> Supervisor::resume(std::string name)
{
    co_return co_await pause_or_resume(std::move(name), Job::resume);
}

// `stop` or `cont`: the two differ only in the state they leave and the command they send.
awaitable<expected<OpResult>> Supervisor::pause_or_resume(std::string name, Job job)
{
    const bool pausing = job == Job::pause;
    const char* op = to_string(job);
    const MachineState from = pausing ? MachineState::running : MachineState::paused;
    const MachineState to = pausing ? MachineState::paused : MachineState::running;
    auto opened = open_entry(name);
    if (!opened) {
        co_return fail(opened.error());
    }
    auto e = std::move(*opened);
    if (e->job == job) {
        co_await wait_job(e);
        co_return result(*e);
    }
    if (e->job != Job::none) {
        co_return fail(job_conflict(*e, op).error());
    }
    if (e->state == to) {
        co_return result(*e);
    }
    if (e->state == MachineState::unresponsive) {
        co_return fail(errc::unresponsive, fmt::format("cannot {} '{}': its monitor does not "
                                                       "answer", op, name));
    }
    if (e->state != from) {
        co_return fail(errc::invalid_state, fmt::format("cannot {} '{}' while it is {}", op, name,
                                                        qm::to_string(e->state)));
    }
    begin_job(*e, job);
    auto machine = e->machine;
    expected<void> r;
    const auto sent = std::chrono::steady_clock::now();
    if (pausing) {
        r = co_await machine->pause(options_.pause_timeout);
    } else {
        r = co_await machine->resume(options_.pause_timeout);
    }
    count_qmp(sent, r ? nullptr : &r.error());
    end_job(*e);
    if (!r) {
        if (r.error().is(errc::timeout)) {
            spawn(probe(e), "probe");
        }
        co_return fail(r.error());
    }
    co_return result(*e);
}

//---- QMP passthrough, probe, waits --------------------------------------------------------------

awaitable<expected<QmpResult>> Supervisor::qmp(std::string name, std::string command,
                                               json::Document arguments,
                                               std::optional<std::chrono::milliseconds> timeout)
{
    // The policy first: a denied command is refused whatever the machine and its state.
    const json::Value* policy_arguments = arguments.IsObject() ? &arguments : nullptr;
    if (auto allowed = options_.qmp_policy.check(command, policy_arguments); !allowed) {
        co_return fail(allowed.error());
    }
    auto opened = open_entry(name);
    if (!opened) {
        co_return fail(opened.error());
    }
    auto e = std::move(*opened);
    if (command.empty()) {
        co_return fail(errc::invalid_argument, "the QMP command name is empty");
    }
    if (!arguments.IsNull() && !arguments.IsObject()) {
        co_return fail(errc::invalid_argument, "QMP arguments must be an object");
    }
    if (e->state == MachineState::unresponsive) {
        co_return fail(errc::unresponsive,
                       fmt::format("'{}' does not answer on its monitor", name));
    }
    if (e->state != MachineState::running && e->state != MachineState::paused) {
        co_return fail(errc::invalid_state, fmt::format("cannot send '{}' to '{}' while it is {}",
                                                        command, name, qm::to_string(e->state)));
    }
    auto client = e->machine ? e->machine->qmp_client() : nullptr;
    if (!client) {
        co_return fail(errc::invalid_state, fmt::format("'{}' has no QMP connection", name));
    }
    qmp::CallOptions call;
    call.timeout = options_.qmp_timeout;
    const auto slow = std::lower_bound(
        slow_commands.begin(), slow_commands.end(), command,
        [](const auto& entry, const std::string& c) { return entry.first < c; });
    if (slow != slow_commands.end() && slow->first == command) {
        call.timeout = std::max<std::chrono::milliseconds>(*call.timeout, slow->second);
    }
    if (timeout) {
        call.timeout = *timeout;
    }
    const auto sent = std::chrono::steady_clock::now();
    auto r = co_await client->execute(command, std::move(arguments), call);
    count_qmp(sent, r ? nullptr : &r.error());
    if (!r) {
        if (r.error().is(errc::timeout)) {
            spawn(probe(e), "probe");
        }
        co_return fail(r.error());
    }
    QmpResult out;
    out.value = std::move(*r);
    out.seq = events_.last_seq();
    co_return out;
}

awaitable<void> Supervisor::probe(std::shared_ptr<Entry> e)
{
    // Runs only after a command overran its deadline: never a periodic per-machine timer.
    if (e->probing || !e->machine) {
        co_return;
    }
    auto client = e->machine->qmp_client();
    if (!client || !has_process(e->state)) {
        co_return;
    }
    e->probing = true;
    qmp::CallOptions call;
    call.timeout = options_.probe_timeout;
    auto r = co_await client->execute("query-status", json::Document(), call);
    if (!r && r.error().is(errc::timeout) && has_process(e->state) &&
        e->state != MachineState::stopping) {
        e->unresponsive = true;
        set_state(*e, MachineState::unresponsive,
                  fmt::format("query-status got no answer within {} ms",
                              options_.probe_timeout.count()));
        // Unresponsive until it answers again or exits: one command waits without a deadline.
        qmp::CallOptions forever;
        forever.timeout = std::chrono::milliseconds::max();
        r = co_await client->execute("query-status", json::Document(), forever);
    }
    e->probing = false;
    if (r && e->state == MachineState::unresponsive) {
        const auto status = json::get_string(*r, "status").value_or("");
        set_state(*e, status == "running" ? MachineState::running : MachineState::paused,
                  "the monitor answers again");
    }
}

namespace {
expected<void> console_available(std::string_view name, const Machine* m, MachineState state)
{
    if (m == nullptr || m->console() == nullptr) {
        return fail(errc::invalid_state, fmt::format("'{}' has no console", name));
    }
    if (!has_process(state)) {
        return fail(errc::invalid_state,
                    fmt::format("'{}' is {}: its console is closed", name, qm::to_string(state)));
    }
    return {};
}
} // namespace

awaitable<expected<std::uint64_t>> Supervisor::console_write(std::string name, std::string bytes)
{
    auto found = lookup(name);
    if (!found) {
        co_return fail(found.error());
    }
    auto e = machines_.find(name)->second;
    if (auto ok = console_available(name, e->machine.get(), e->state); !ok) {
        co_return fail(ok.error());
    }
    auto machine = e->machine;
    auto written = co_await machine->console_write(std::move(bytes));
    if (!written) {
        co_return fail(written.error());
    }
    co_return machine->console_offset();
}

awaitable<expected<ConsoleMatch>> Supervisor::console_wait(std::string name, ConsolePattern pattern,
                                                           std::chrono::milliseconds timeout,
                                                           std::uint64_t from)
{
    auto found = lookup(name);
    if (!found) {
        co_return fail(found.error());
    }
    auto e = machines_.find(name)->second;
    if (auto ok = console_available(name, e->machine.get(), e->state); !ok) {
        co_return fail(ok.error());
    }
    auto machine = e->machine;
    co_return co_await machine->wait_console(std::move(pattern), timeout, from);
}

expected<std::pair<std::string, std::uint64_t>> Supervisor::console_output(std::string_view name,
                                                                           std::uint64_t from) const
{
    auto found = lookup(name);
    if (!found) {
        return fail(found.error());
    }
    const Entry& e = **found;
    if (!e.machine || e.machine->console() == nullptr) {
        return fail(errc::invalid_state, fmt::format("'{}' has no console output", name));
    }
    return std::make_pair(e.machine->console_output(from), e.machine->console_offset());
}

awaitable<expected<std::shared_ptr<ConsoleSession>>>
Supervisor::console_attach(std::string name, std::size_t history)
{
    auto found = open_entry(name);
    if (!found) {
        co_return fail(found.error());
    }
    auto e = std::move(*found);
    if (auto ok = console_available(name, e->machine.get(), e->state); !ok) {
        co_return fail(ok.error());
    }
    auto machine = e->machine;
    if (auto ready = co_await machine->ensure_console(); !ready) {
        co_return fail(ready.error());
    }
    // The connect may have waited: the machine may have stopped, or started again, meanwhile.
    auto console = machine->console();
    if (e->machine != machine || !has_process(e->state) || console == nullptr ||
        console->is_closed()) {
        co_return fail(errc::invalid_state,
                       fmt::format("'{}' is {}: its console is closed", name, qm::to_string(e->state)));
    }
    auto reader = console->follow(history);
    co_return std::make_shared<ConsoleSession>(name, std::move(console), std::move(reader),
                                               e->console_writer);
}

awaitable<expected<Event>> Supervisor::wait_event(std::string name, EventSelector selector,
                                                  std::optional<std::uint64_t> since,
                                                  std::chrono::milliseconds timeout)
{
    if (auto open = check_open(); !open) {
        co_return fail(open.error());
    }
    auto found = lookup(name);
    if (!found) {
        co_return fail(found.error());
    }
    selector.machine = name;
    co_return co_await events_.wait(std::move(selector), since, timeout);
}

//---- daemon shutdown ----------------------------------------------------------------------------

awaitable<std::string> Supervisor::stop_for_shutdown(std::shared_ptr<Entry> e)
{
    co_await wait_job(e);
    if (has_process(e->state)) {
        begin_job(*e, Job::stop);
        auto r = co_await do_stop(e, StopOptions{});
        end_job(*e);
        if (!r) {
            spdlog::error("Failed to stop '{}': {}", e->def.name, r.error().message);
            co_return r.error().message;
        }
    }
    co_return std::string();
}

awaitable<StopAllResult> Supervisor::stop_all(std::size_t concurrency)
{
    if (concurrency == 0) {
        concurrency = std::max<std::size_t>(1, options_.stop_concurrency);
    }
    ++stopping_all_;
    for (auto& [name, e] : machines_) {
        cancel_restart(*e);
    }
    std::vector<std::shared_ptr<Entry>> todo;
    for (auto& [name, e] : machines_) {
        if (has_process(e->state) || e->job != Job::none) {
            todo.push_back(e);
        }
    }
    spdlog::info("Stopping {} machine(s), {} at a time", todo.size(), concurrency);
    const auto started = std::chrono::steady_clock::now();
    StopAllResult result;
    auto ex = co_await asio::this_coro::executor;
    std::size_t running = 0;
    std::size_t next = 0;
    asio::steady_timer wake(ex);
    while (next < todo.size() || running > 0) {
        while (next < todo.size() && running < concurrency) {
            ++running;
            auto e = todo[next++];
            asio::co_spawn(ex, stop_for_shutdown(e),
                           [&, name = e->def.name](const std::exception_ptr& ex_ptr,
                                                   std::string error) {
                               if (ex_ptr) {
                                   error = describe_exception(ex_ptr);
                                   spdlog::error("Stopping '{}' failed: {}", name, error);
                               }
                               if (error.empty()) {
                                   result.stopped.push_back(name);
                               } else {
                                   result.failed.emplace_back(name, std::move(error));
                               }
                               --running;
                               wake.cancel();
                           });
        }
        wake.expires_at(asio::steady_timer::time_point::max());
        error_code ec;
        co_await wake.async_wait(use_ec(ec));
    }
    --stopping_all_;
    result.seq = events_.last_seq();
    spdlog::info("Stopped {} machine(s), {} failed, in {} ms", result.stopped.size(),
                 result.failed.size(),
                 std::chrono::duration_cast<std::chrono::milliseconds>(
                     std::chrono::steady_clock::now() - started)
                     .count());
    co_return result;
}

awaitable<void> Supervisor::shutdown()
{
    shutting_down_ = true;
    co_await stop_all(options_.stop_concurrency);
}

} // namespace qm::daemon
