// SPDX-License-Identifier: GPL-2.0-or-later
// supervisor-bench: qm::daemon::Supervisor against the floor (posix_spawn, one epoll loop, raw
// unix sockets) on N `qemu-system-x86_64 -machine none`: all started at once, teardown, the
// supervisor's memory per machine, and the loop's wake-ups while the machines idle. Not a test:
// it prints figures (bench/README.md).
#include <malloc.h>
#include <sys/resource.h>
#include <sys/time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "bench/floor.hpp"
#include "bench/stats.hpp"
#include "daemon/supervisor/supervisor.hpp"
#include "libmachine/asio.hpp"
#include "libmachine/json.hpp"
#include "libmachine/proc/child_watcher.hpp"
#include "libmachine/proc/spawn.hpp"
#include "tests/support/loop.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;
using qm::bench::die;
using qm::bench::percentile;
using qm::daemon::OpResult;

// The issue's targets.
constexpr double start_target = 1.20;    // supervisor / floor, all-started p50 at N = --n
constexpr double memory_target_kib = 16; // supervisor memory per machine, without console ring
// Fresh processes per memory figure (the median is reported, with the range).
constexpr int memory_runs = 3;
// The wake-up sizes besides --n.
constexpr int small_n = 10;
// Voluntary context switches of the loop thread may differ by this much between sizes and still
// count as "the same": a stray wake-up (a signal, the kernel's own) is not a per-machine timer.
constexpr std::size_t switches_slack = 2;
// Before an idle window: time for what the start left queued to run (not counted).
constexpr auto settle_time = 1s;
// The warm-up machine's name. The floor's command lines are its command line with this name
// replaced by floor-<i> in the -name argument, and its monitor socket by the floor's.
constexpr std::string_view warm_name = "warm";

struct Args
{
    int n = 200;
    int trials = 3;
    int idle_seconds = 10;
};

using Env = qm::bench::Env;

void replace_all(std::string& s, std::string_view from, std::string_view to)
{
    for (auto at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) {
        s.replace(at, from.size(), to);
    }
}

std::string machine_name(int i)
{
    return fmt::format("m{:03}", i);
}

// The spec of tests/supervisor/supervisor_fixture.hpp's none_spec(): `-machine none`, no console
// (so no ring), `quit` to stop.
qm::json::Document none_spec(const Env& env)
{
    const std::string text = fmt::format(
        R"({{"binary": {}, "machine": "none", "console": {{"enabled": false}},
             "shutdown": {{"mode": "quit", "timeout_s": 10}}}})",
        qm::json::quote(env.qemu));
    auto doc = qm::json::parse(text);
    if (!doc) {
        die("bad spec: " + doc.error().message);
    }
    return std::move(*doc);
}

//---- the supervisor side -----------------------------------------------------------------------

// A Supervisor on a state and a runtime directory of its own under the run's directory, loaded
// (nothing to load: both are new). The coroutine of an operation uses the Supervisor, so after a
// failure (an interrupt, a deadline) the operations still in flight must end before it is
// destroyed: the destructor kills every QEMU, so that they end at once, and runs the loop until
// they have. Destroying it kills what still runs; the caller then lets the loop reap
// (reap_all()).
class SupervisorSide
{
public:
    SupervisorSide(Env& env, const std::string& tag)
        : env_(env)
        , root_(env.dir / tag)
    {
        fs::create_directories(root_ / "state");
        fs::create_directories(root_ / "run");
        qm::daemon::SupervisorOptions options;
        options.state_dir = (root_ / "state").string();
        options.runtime_dir = (root_ / "run").string();
        sup_ = std::make_unique<qm::daemon::Supervisor>(env.ioc, std::move(options));
        auto loaded = sup_->load();
        if (!loaded) {
            die("supervisor: load: " + loaded.error().message);
        }
    }
    SupervisorSide(const SupervisorSide&) = delete;
    SupervisorSide& operator=(const SupervisorSide&) = delete;
    ~SupervisorSide()
    {
        if (in_flight()) {
            // Killed, their QEMUs end every start and stop at once; creates end with their write.
            for (const auto& m : sup_->list()) {
                if (m.pid) {
                    ::kill(*m.pid, SIGKILL);
                }
            }
            qm::test::run_until(env_.ioc, [this] { return !in_flight(); }, 30s);
            if (in_flight()) {
                fmt::print(stderr, "supervisor-bench: operations hang; the supervisor is leaked "
                                   "rather than destroyed under them\n");
                (void)sup_.release(); // NOLINT(bugprone-unused-return-value): on purpose
            }
        }
        sup_.reset();
        std::error_code ignored;
        fs::remove_all(root_, ignored);
    }

    // Creates machine_name(0 .. n-1), all at once. Returns the time in ms.
    double create_all(int n)
    {
        return for_all(
            n, [this](std::string name) { return sup_->create(std::move(name), none_spec(env_)); },
            "create");
    }

    // start() of every machine at once; each must end running. Returns the time until the last
    // start() completed, in ms.
    double start_all(int n)
    {
        const double ms = for_all(
            n, [this](std::string name) { return sup_->start(std::move(name)); }, "start");
        for (const auto& m : sup_->list()) {
            if (m.state != qm::MachineState::running) {
                die(fmt::format("supervisor: '{}' is {} after start", m.name,
                                qm::to_string(m.state)));
            }
        }
        return ms;
    }

    // stop() of every machine at once. Returns the time until the last stop() completed, in ms.
    double stop_all(int n)
    {
        const double ms = for_all(
            n, [this](std::string name) { return sup_->stop(std::move(name)); }, "stop");
        check_stopped();
        return ms;
    }

    // The daemon's shutdown: every machine stopped, at most stop_concurrency (16) at once.
    // Returns its time in ms.
    double shutdown()
    {
        const auto t0 = Clock::now();
        run_one(sup_->shutdown());
        const double ms = qm::bench::elapsed_ms(t0, Clock::now());
        check_stopped();
        return ms;
    }

    // One machine created, started, stopped and deleted: the first-use costs (Asio's services,
    // the ChildWatcher, the Store's worker thread, the event ring's first events, code pages)
    // paid. Returns the machine's command line (read from /proc while it ran) and QEMU's
    // version.
    std::pair<std::vector<std::string>, std::string> warm_up()
    {
        const std::string name(warm_name);
        auto run = [&](auto op, const char* what) {
            auto r = run_one(std::move(op));
            if (!r) {
                die(fmt::format("supervisor: warm-up {}: {}", what, r.error().message));
            }
            return std::move(*r);
        };
        run(sup_->create(name, none_spec(env_)), "create");
        const OpResult started = run(sup_->start(name), "start");
        std::vector<std::string> argv = command_line(started.machine.pid.value_or(-1));
        qm::json::Document no_arguments;
        const qm::daemon::QmpResult v =
            run(sup_->qmp(name, "query-version", std::move(no_arguments)), "query-version");
        std::string version = "?";
        if (const auto* q = qm::json::find(v.value, "qemu")) {
            version = fmt::format("{}.{}.{}", qm::json::get_int(*q, "major").value_or(0),
                                  qm::json::get_int(*q, "minor").value_or(0),
                                  qm::json::get_int(*q, "micro").value_or(0));
        }
        version += fmt::format(" ({})", qm::json::get_string(v.value, "package").value_or(""));
        run(sup_->stop(name), "stop");
        run(sup_->remove(name, false), "delete");
        // The socket path the floor rewrites: the runtime directory's monitor socket.
        const std::string socket = started.machine.runtime_dir + "/qemu-monitor.sock";
        const auto has_socket = std::any_of(argv.begin(), argv.end(), [&](const std::string& a) {
            return a.find(socket) != std::string::npos;
        });
        if (!has_socket) {
            die("supervisor: the command line does not name " + socket);
        }
        for (auto& a : argv) {
            replace_all(a, socket, "@SOCKET@");
        }
        return {std::move(argv), std::move(version)};
    }

    // The sequence number of the last event published (every event stays in the bus's ring).
    std::uint64_t last_seq() const { return sup_->events().last_seq(); }

private:
    // `op(name)` (a Supervisor operation) on machine_name(0 .. n-1), all at once. Returns the
    // time until the last one completed, in ms.
    template <typename Op>
    double for_all(int n, Op op, const char* what)
    {
        std::vector<qm::awaitable<qm::expected<OpResult>>> ops;
        ops.reserve(static_cast<std::size_t>(n));
        for (int i = 0; i < n; ++i) {
            ops.push_back(op(machine_name(i)));
        }
        batch_ = std::make_shared<qm::bench::Fanout>();
        return qm::bench::run_all(env_.ioc, std::move(ops), "supervisor", what, batch_);
    }

    // One operation run to completion. Past the deadline it is still in flight: hung (so is one
    // that threw, which only a bug does).
    template <typename T>
    T run_one(qm::awaitable<T> op)
    {
        hung_ = true;
        T r = qm::test::run_co(env_.ioc, std::move(op), qm::bench::op_deadline);
        hung_ = false;
        return r;
    }
    void run_one(qm::awaitable<void> op)
    {
        hung_ = true;
        qm::test::run_co(env_.ioc, std::move(op), qm::bench::op_deadline);
        hung_ = false;
    }

    // Whether an operation may still be in flight: one that hung, or some of the last batch.
    bool in_flight() const { return hung_ || (batch_ && batch_->remaining > 0); }

    // Every machine stopped by our quit, QEMU exited with status 0.
    void check_stopped() const
    {
        for (const auto& m : sup_->list()) {
            if (m.state != qm::MachineState::stopped || m.exit_code != 0) {
                die(fmt::format("supervisor: '{}' is {} (exit code {}) after stopping", m.name,
                                qm::to_string(m.state), m.exit_code.value_or(-1)));
            }
        }
    }

    static std::vector<std::string> command_line(pid_t pid)
    {
        std::ifstream in(fmt::format("/proc/{}/cmdline", pid), std::ios::binary);
        const std::string all((std::istreambuf_iterator<char>(in)),
                              std::istreambuf_iterator<char>());
        std::vector<std::string> argv;
        for (std::size_t at = 0; at < all.size();) {
            const std::size_t nul = std::min(all.find('\0', at), all.size());
            argv.emplace_back(all.substr(at, nul - at));
            at = nul + 1;
        }
        if (argv.empty()) {
            die(fmt::format("cannot read the command line of process {}", pid));
        }
        return argv;
    }

    Env& env_;
    fs::path root_;
    std::unique_ptr<qm::daemon::Supervisor> sup_;
    // The last for_all(), to see what of it is in flight.
    std::shared_ptr<qm::bench::Fanout> batch_;
    bool hung_ = false;
};

// Lets the loop finish what the last operations left queued and reap what was killed.
void reap_all(Env& env)
{
    auto& watcher = qm::proc::ChildWatcher::get(env.ioc);
    qm::test::run_until(env.ioc, [&] { return watcher.watched() == 0; }, 30s);
    env.ioc.restart();
    env.ioc.poll();
}

// CPU time of this process (every thread, user + system; children such as QEMU excluded), in ms.
double cpu_ms()
{
    rusage ru{};
    ::getrusage(RUSAGE_SELF, &ru);
    auto ms = [](const timeval& tv) {
        return static_cast<double>(tv.tv_sec) * 1e3 + static_cast<double>(tv.tv_usec) / 1e3;
    };
    return ms(ru.ru_utime) + ms(ru.ru_stime);
}

// One trial of either side: its start and teardown, the CPU this process spent during the start
// and, for the supervisor, how long the create()s before it took.
struct Trial
{
    qm::bench::Timing timing;
    double start_cpu_ms = 0;
    double create_ms = 0;
};

// A trial of the supervisor side: N create() (timed apart: not part of the comparison), N
// start(), shutdown(), on a new Supervisor with new directories.
Trial supervisor_trial(Env& env, int n, int index)
{
    Trial t;
    {
        SupervisorSide side(env, fmt::format("trial{}", index));
        t.create_ms = side.create_all(n);
        const double cpu0 = cpu_ms();
        t.timing.ready_ms = side.start_all(n);
        t.start_cpu_ms = cpu_ms() - cpu0;
        t.timing.teardown_ms = side.shutdown();
    }
    reap_all(env);
    return t;
}

Trial floor_side_trial(qm::bench::Floor& floor)
{
    Trial t;
    const double cpu0 = cpu_ms();
    t.timing.ready_ms = floor.launch();
    t.start_cpu_ms = cpu_ms() - cpu0;
    t.timing.teardown_ms = floor.teardown();
    return t;
}

//---- the floor's command lines -----------------------------------------------------------------

// N QEMUs for the floor from the supervisor's command line (with @SOCKET@ for its monitor socket):
// each with its own socket in `dir` and its own -name, nothing else changed.
std::vector<qm::bench::FloorVm> floor_vms(const std::vector<std::string>& argv,
                                          const fs::path& dir, int n)
{
    std::vector<qm::bench::FloorVm> vms(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
        auto& vm = vms[static_cast<std::size_t>(i)];
        vm.socket_path = (dir / fmt::format("floor-{}-monitor.sock", i)).string();
        vm.argv = argv;
        const std::string name = fmt::format("floor-{}", i);
        for (std::size_t k = 0; k < vm.argv.size(); ++k) {
            replace_all(vm.argv[k], "@SOCKET@", vm.socket_path);
            if (k > 0 && vm.argv[k - 1] == "-name") {
                replace_all(vm.argv[k], warm_name, name);
            }
        }
    }
    return vms;
}

// The command line goes to the probes in a file: NUL-separated arguments.
void write_argv(const fs::path& file, const std::vector<std::string>& argv)
{
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    for (const auto& a : argv) {
        out << a << '\0';
    }
    if (!out) {
        die("cannot write " + file.string());
    }
}

std::vector<std::string> read_argv(const fs::path& file)
{
    std::ifstream in(file, std::ios::binary);
    std::vector<std::string> argv;
    for (std::string a; std::getline(in, a, '\0');) {
        argv.push_back(a);
    }
    if (argv.empty()) {
        die("cannot read " + file.string());
    }
    return argv;
}

//---- probes: memory and wake-ups in a fresh process --------------------------------------------

// Bytes the allocator has handed out and not got back (every arena, and mmapped blocks).
std::size_t heap_in_use()
{
    const struct mallinfo2 mi = ::mallinfo2();
    return mi.uordblks + mi.hblkhd;
}

struct Footprint
{
    std::size_t rss = 0;
    std::size_t heap = 0;
};

Footprint footprint()
{
    return {qm::bench::read_rss().exact, heap_in_use()};
}

struct Wakeups
{
    std::uint64_t handlers = 0;
    std::size_t voluntary = 0;
    std::size_t involuntary = 0;
};

std::size_t switches(std::string_view field)
{
    // /proc/self/status counts the thread-group leader: the loop thread.
    return qm::bench::read_proc_number("/proc/self/status", field);
}

// Runs the loop for `idle` with nothing asked of it and counts the handlers it runs, and the
// loop thread's context switches. One timer of our own ends the window: run_one() then blocks
// in epoll_wait until something happens (run_one_for() would wake up every second by itself).
Wakeups idle_window(qm::asio::io_context& ioc, std::chrono::seconds idle)
{
    ioc.restart();
    ioc.run_for(settle_time);
    ioc.restart();
    bool over = false;
    qm::asio::steady_timer end(ioc);
    end.expires_after(idle);
    end.async_wait([&over](const qm::error_code&) { over = true; });
    Wakeups w;
    const std::size_t v0 = switches("voluntary_ctxt_switches");
    const std::size_t i0 = switches("nonvoluntary_ctxt_switches");
    while (!over) {
        w.handlers += ioc.run_one();
    }
    w.voluntary = switches("voluntary_ctxt_switches") - v0;
    w.involuntary = switches("nonvoluntary_ctxt_switches") - i0;
    w.handlers -= 1; // the end timer's
    qm::bench::check_interrupted();
    return w;
}

// The probe, in a process of its own (`--probe supervisor|floor N BASE IDLE ARGV_FILE`): warm-up
// with one machine, then the footprint before creating N, once created, once all N run; for the
// supervisor an idle window of IDLE seconds (0: none), then N stop() at once. Prints
// "key=value ..." on one line.
int probe(std::string_view kind, int n, const fs::path& base, int idle_s, const fs::path& argv_file)
{
    qm::bench::raise_fd_limit();
    spdlog::set_level(spdlog::level::warn);
    Env env(base, "probe");
    std::map<std::string, double> out;
    auto put = [&out](const std::string& key, const Footprint& f) {
        out[key + "_rss"] = static_cast<double>(f.rss);
        out[key + "_heap"] = static_cast<double>(f.heap);
    };
    if (kind == "supervisor") {
        SupervisorSide side(env, "s");
        side.warm_up();
        put("before", footprint());
        const auto seq0 = side.last_seq();
        side.create_all(n);
        put("created", footprint());
        side.start_all(n);
        // Handlers already queued run first, as in the daemon's loop (the supervisor gives memory
        // back after a burst in one of them).
        env.ioc.restart();
        env.ioc.poll();
        put("ready", footprint());
        out["events"] = static_cast<double>(side.last_seq() - seq0);
        if (idle_s > 0) {
            const Wakeups w = idle_window(env.ioc, std::chrono::seconds(idle_s));
            out["handlers"] = static_cast<double>(w.handlers);
            out["voluntary"] = static_cast<double>(w.voluntary);
            out["involuntary"] = static_cast<double>(w.involuntary);
            put("idle", footprint());
        }
        out["stop_ms"] = side.stop_all(n);
    } else if (kind == "floor") {
        const auto argv = read_argv(argv_file);
        {
            qm::bench::Floor warm(floor_vms(argv, env.dir, 1));
            qm::bench::floor_trial(warm);
        }
        put("before", footprint());
        qm::bench::Floor floor(floor_vms(argv, env.dir, n));
        put("created", footprint());
        floor.launch();
        put("ready", footprint());
        out["stop_ms"] = floor.teardown();
    } else {
        die(fmt::format("--probe: unknown kind '{}'", kind));
    }
    reap_all(env);
    for (const auto& [key, value] : out) {
        fmt::print("{}={} ", key, value);
    }
    fmt::print("\n");
    return 0;
}

// What one probe process found.
struct ProbeResult
{
    std::map<std::string, double> values;

    double at(const std::string& key) const
    {
        auto it = values.find(key);
        if (it == values.end()) {
            die("a probe did not report " + key);
        }
        return it->second;
    }
    // (footprint at `stage` - footprint before) / n, in KiB.
    double per_machine_kib(const std::string& stage, const std::string& what, int n) const
    {
        return (at(stage + "_" + what) - at("before_" + what)) / 1024.0 / n;
    }
};

ProbeResult run_probe(const std::string& kind, int n, const fs::path& base, int idle_s,
                      const fs::path& argv_file)
{
    const std::string text = qm::bench::run_self({"--probe", kind, std::to_string(n),
                                                  base.string(), std::to_string(idle_s),
                                                  argv_file.string()});
    ProbeResult r;
    std::istringstream in(text);
    for (std::string kv; in >> kv;) {
        const auto eq = kv.find('=');
        if (eq == std::string::npos) {
            die("a probe printed '" + text + "'");
        }
        r.values[kv.substr(0, eq)] = std::stod(kv.substr(eq + 1));
    }
    return r;
}

//---- reporting ---------------------------------------------------------------------------------

struct Samples
{
    std::vector<double> supervisor;
    std::vector<double> floor;
};

const char* verdict(bool pass)
{
    return pass ? "PASS" : "FAIL";
}

void print_timing(const char* title, int n, const Samples& s, const std::string& judged)
{
    fmt::print("{}\n  {:>4}  {:>8} {:>8} {:>8}   {:>8} {:>8} {:>8}   {:>7}  {}\n", title, "N",
               "sup p50", "sup max", "sup min", "floor50", "fl max", "fl min", "s/f p50",
               "target");
    const auto minmax_s = std::minmax_element(s.supervisor.begin(), s.supervisor.end());
    const auto minmax_f = std::minmax_element(s.floor.begin(), s.floor.end());
    fmt::print("  {:>4}  {:>8.1f} {:>8.1f} {:>8.1f}   {:>8.1f} {:>8.1f} {:>8.1f}   {:>6.2f}x  {}\n",
               n, percentile(s.supervisor, 50), *minmax_s.second, *minmax_s.first,
               percentile(s.floor, 50), *minmax_f.second, *minmax_f.first,
               percentile(s.supervisor, 50) / percentile(s.floor, 50), judged);
}

// The median of `runs` by `key` (a per-machine figure computed by `f`).
template <typename F>
double median_of(const std::vector<ProbeResult>& runs, F f)
{
    std::vector<double> v;
    v.reserve(runs.size());
    for (const auto& r : runs) {
        v.push_back(f(r));
    }
    return percentile(v, 50);
}

template <typename F>
std::string range_of(const std::vector<ProbeResult>& runs, F f)
{
    std::vector<double> v;
    v.reserve(runs.size());
    for (const auto& r : runs) {
        v.push_back(f(r));
    }
    const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
    return fmt::format("{:.1f}-{:.1f}", *lo, *hi);
}

struct MemoryRow
{
    int n = 0;
    double rss_kib = 0;     // supervisor, per machine, all N running
    double created_kib = 0; // supervisor, per machine, all N defined, none started
    double heap_kib = 0;    // supervisor, malloc'd bytes per machine, all N running
    double floor_kib = 0;   // floor, per QEMU, all N ready
    double floor_heap_kib = 0;
    double events = 0; // events published per machine (create and start), all still in the ring
    double before_mib = 0;
    double ready_mib = 0;
    std::string rss_range;
    double stop_ms = 0; // N stop() at once
    double floor_stop_ms = 0;
};

MemoryRow memory_row(int n, const std::vector<ProbeResult>& sup, const std::vector<ProbeResult>& fl)
{
    MemoryRow row;
    row.n = n;
    auto rss = [n](const ProbeResult& r) { return r.per_machine_kib("ready", "rss", n); };
    row.rss_kib = median_of(sup, rss);
    row.rss_range = range_of(sup, rss);
    row.created_kib = median_of(
        sup, [n](const ProbeResult& r) { return r.per_machine_kib("created", "rss", n); });
    row.heap_kib =
        median_of(sup, [n](const ProbeResult& r) { return r.per_machine_kib("ready", "heap", n); });
    row.floor_kib =
        median_of(fl, [n](const ProbeResult& r) { return r.per_machine_kib("ready", "rss", n); });
    row.floor_heap_kib =
        median_of(fl, [n](const ProbeResult& r) { return r.per_machine_kib("ready", "heap", n); });
    row.before_mib = median_of(sup, [](const ProbeResult& r) { return r.at("before_rss"); }) /
                     1024.0 / 1024.0;
    row.ready_mib =
        median_of(sup, [](const ProbeResult& r) { return r.at("ready_rss"); }) / 1024.0 / 1024.0;
    row.events = median_of(sup, [n](const ProbeResult& r) { return r.at("events") / n; });
    row.stop_ms = median_of(sup, [](const ProbeResult& r) { return r.at("stop_ms"); });
    row.floor_stop_ms = median_of(fl, [](const ProbeResult& r) { return r.at("stop_ms"); });
    return row;
}

struct WakeRow
{
    int n = 0;
    double handlers = 0;
    double voluntary = 0;
    double involuntary = 0;
    double rss_change_kib = 0; // over the idle window
};

//---- main --------------------------------------------------------------------------------------

void usage()
{
    fmt::print("usage: supervisor-bench [--n N] [--trials N] [--idle-seconds S]\n"
               "  --n N             machines started at once (default 200)\n"
               "  --trials N        interleaved start/teardown trials (default 3, at least 1)\n"
               "  --idle-seconds S  the idle window for wake-ups, at N={} and N (default 10)\n"
               "QM_QEMU names the QEMU binary (default qemu-system-x86_64 in PATH).\n",
               small_n);
}

int run(const Args& args)
{
    const auto started = Clock::now();
    qm::bench::raise_fd_limit();
    // The supervisor logs every transition at info; 200 machines would print ~1,000 lines to the
    // terminal, which times the terminal.
    spdlog::set_level(spdlog::level::warn);
    Env env(fs::temp_directory_path(), "supervisor-bench");
    const int n = args.n;
    try {
        // Warm-up, not recorded: one machine, to learn QEMU's version and the command line.
        std::vector<std::string> argv;
        std::string version;
        {
            SupervisorSide side(env, "warm");
            std::tie(argv, version) = side.warm_up();
        }
        reap_all(env);
        const fs::path argv_file = env.dir / "floor-argv";
        write_argv(argv_file, argv);

        fmt::print("supervisor-bench: QEMU {} -machine none, {} CPUs; N={}, {} trials, idle "
                   "window {} s\n",
                   version, std::thread::hardware_concurrency(), n, args.trials,
                   args.idle_seconds);
        fmt::print("temporary directory {} ({}); load average at start {}\n", env.dir.string(),
                   qm::bench::fs_type(env.dir), qm::bench::load_average());
        fmt::print("command line (the floor's differs only in -name and the socket path):\n  {}\n",
                   qm::proc::format_command_line(argv));
        fmt::print(
            "supervisor = qm::daemon::Supervisor on one io_context: N create() (not timed), N "
            "start() at once,\nthen shutdown() (the daemon's: 16 stops at a time); floor = the "
            "same command lines, posix_spawn\n(own session) + one epoll loop + raw unix sockets "
            "+ quit to all + blocking waitpid.\nTrials alternate which side goes first, after "
            "one warm-up trial of each.\n\n");
        std::fflush(stdout);

        qm::bench::Floor floor(floor_vms(argv, env.dir, n));
        Samples ready;
        Samples down;
        Samples cpu;
        std::vector<double> creates;
        for (int t = -1; t < args.trials; ++t) {
            auto supervisor_side = [&] {
                const Trial tr = supervisor_trial(env, n, t + 1);
                if (t >= 0) {
                    ready.supervisor.push_back(tr.timing.ready_ms);
                    down.supervisor.push_back(tr.timing.teardown_ms);
                    cpu.supervisor.push_back(tr.start_cpu_ms);
                    creates.push_back(tr.create_ms);
                }
            };
            auto floor_side = [&] {
                const Trial tr = floor_side_trial(floor);
                if (t >= 0) {
                    ready.floor.push_back(tr.timing.ready_ms);
                    down.floor.push_back(tr.timing.teardown_ms);
                    cpu.floor.push_back(tr.start_cpu_ms);
                }
            };
            qm::bench::interleaved(t, supervisor_side, floor_side);
        }
        const double start_ratio = percentile(ready.supervisor, 50) / percentile(ready.floor, 50);
        const bool start_pass = start_ratio <= start_target;
        print_timing("(a) start -> all started (supervisor: every start() returned running; "
                     "floor: every query-status answered), ms",
                     n, ready,
                     fmt::format("{} (<= {:.2f}x)", verdict(start_pass), start_target));
        const double cpu_s = percentile(cpu.supervisor, 50);
        const double cpu_f = percentile(cpu.floor, 50);
        fmt::print("    CPU of this process during the start (user + system, every thread, QEMU "
                   "excluded), p50:\n    supervisor {:.0f} ms, floor {:.0f} ms: the supervisor "
                   "spends {:.0f} us more per machine\n",
                   cpu_s, cpu_f, (cpu_s - cpu_f) * 1000.0 / n);
        print_timing("\n(b) teardown (supervisor: shutdown(), 16 at a time; floor: quit to all, "
                     "then waitpid), ms",
                     n, down, "- (a figure, no target)");
        fmt::print("    before each supervisor trial, not compared: N create() at once (each "
                   "definition written and fsynced\n    by the Store's one worker thread) took "
                   "p50 {:.0f} ms\n",
                   percentile(creates, 50));
        std::fflush(stdout);

        // Memory and wake-ups: fresh processes, so that their heaps start cold and the two sides'
        // RSS never mix.
        std::vector<int> sizes{small_n};
        if (n != small_n) {
            sizes.push_back(n);
        }
        std::vector<MemoryRow> memory;
        std::vector<WakeRow> wakes;
        for (const int size : sizes) {
            std::vector<ProbeResult> sup;
            std::vector<ProbeResult> fl;
            for (int i = 0; i < memory_runs; ++i) {
                // The first supervisor probe at each size also holds the idle window.
                const int idle = i == 0 ? args.idle_seconds : 0;
                sup.push_back(run_probe("supervisor", size, env.dir, idle, argv_file));
                fl.push_back(run_probe("floor", size, env.dir, 0, argv_file));
            }
            memory.push_back(memory_row(size, sup, fl));
            if (args.idle_seconds > 0) {
                const ProbeResult& w = sup.front();
                wakes.push_back({size, w.at("handlers"), w.at("voluntary"), w.at("involuntary"),
                                 (w.at("idle_rss") - w.at("ready_rss")) / 1024.0});
            }
        }

        fmt::print("\n(c) supervisor memory per machine, without console ring (consoles disabled), "
                   "KiB:\n    (RSS with N running - RSS before creating them) / N, in a fresh "
                   "process after one warm-up machine\n    (created, started, stopped, deleted); "
                   "RSS = smaps_rollup Rss; heap = malloc'd bytes (mallinfo2);\n    median of {} "
                   "processes per side\n",
                   memory_runs);
        fmt::print("  {:>4}  {:>7} {:>7}   {:>7} {:>11} {:>7} {:>7} {:>8}   {:>7} {:>7}   {}\n",
                   "N", "before", "ready", "RSS/m", "range", "defined", "heap/m", "events/m",
                   "floor/m", "fl heap", "target (RSS/m)");
        fmt::print("  {:>4}  {:>7} {:>7}\n", "", "MiB", "MiB");
        bool memory_pass = true;
        for (const auto& m : memory) {
            const bool pass = m.rss_kib <= memory_target_kib;
            memory_pass = memory_pass && pass;
            fmt::print("  {:>4}  {:>7.1f} {:>7.1f}   {:>7.1f} {:>11} {:>7.1f} {:>7.1f} {:>8.1f}   "
                       "{:>7.1f} {:>7.1f}   {} (<= {:.0f} KiB)\n",
                       m.n, m.before_mib, m.ready_mib, m.rss_kib, m.rss_range, m.created_kib,
                       m.heap_kib, m.events, m.floor_kib, m.floor_heap_kib, verdict(pass),
                       memory_target_kib);
        }
        fmt::print("    (\"defined\": per machine once all N are created, none started; the "
                   "same probes' N stop() at once:");
        for (const auto& m : memory) {
            fmt::print(" N={} {:.0f} ms (floor {:.0f} ms)", m.n, m.stop_ms, m.floor_stop_ms);
        }
        fmt::print(")\n");

        bool wake_pass = true;
        if (!wakes.empty()) {
            fmt::print("\n(d) loop wake-ups with N machines running and idle for {} s (after {} s "
                       "to settle): handlers the\n    io_context ran (run_one() until one timer "
                       "of ours ends the window) and the loop thread's context\n    switches "
                       "(/proc/self/status; the window's own end counts one)\n",
                       args.idle_seconds,
                       std::chrono::duration_cast<std::chrono::seconds>(settle_time).count());
            fmt::print("  {:>4}  {:>8} {:>10} {:>12} {:>11}\n", "N", "handlers", "voluntary",
                       "involuntary", "RSS change");
            for (const auto& w : wakes) {
                fmt::print("  {:>4}  {:>8.0f} {:>10.0f} {:>12.0f} {:>8.0f} KiB\n", w.n,
                           w.handlers, w.voluntary, w.involuntary, w.rss_change_kib);
            }
            for (const auto& w : wakes) {
                wake_pass = wake_pass && w.handlers == wakes.front().handlers &&
                            std::abs(w.voluntary - wakes.front().voluntary) <=
                                static_cast<double>(switches_slack);
            }
            fmt::print("  {}: the same handler count at every N, voluntary switches within {} "
                       "(no per-machine timers)\n",
                       verdict(wake_pass), switches_slack);
        }

        // One line for scripts.
        std::string wake_json;
        for (const auto& w : wakes) {
            wake_json += fmt::format(
                R"({}{{"n":{},"handlers":{:.0f},)"
                R"("voluntary_switches":{:.0f},"involuntary_switches":{:.0f}}})",
                wake_json.empty() ? "" : ",", w.n, w.handlers, w.voluntary, w.involuntary);
        }
        std::string memory_json;
        for (const auto& m : memory) {
            memory_json += fmt::format(
                R"({}{{"n":{},"rss_kib_per_machine":{:.2f},"heap_kib_per_machine":{:.2f},)"
                R"("floor_rss_kib_per_vm":{:.2f},"pass":{}}})",
                memory_json.empty() ? "" : ",", m.n, m.rss_kib, m.heap_kib, m.floor_kib,
                m.rss_kib <= memory_target_kib);
        }
        fmt::print(
            "\nJSON "
            R"({{"bench":"supervisor-bench","qemu":{},"n":{},"trials":{},)"
            R"("start_ms":{{"supervisor_p50":{:.1f},"floor_p50":{:.1f},"ratio":{:.3f},)"
            R"("target":{:.2f},"pass":{},"supervisor_cpu_ms":{:.0f},"floor_cpu_ms":{:.0f}}},)"
            R"("teardown_ms":{{"supervisor_p50":{:.1f},"floor_p50":{:.1f},"ratio":{:.3f}}},)"
            R"("memory":{{"target_kib":{:.0f},"pass":{},"sizes":[{}]}},)"
            R"("wakeups":{{"idle_s":{},"pass":{},"sizes":[{}]}}}})"
            "\n",
            qm::json::quote(version), n, args.trials, percentile(ready.supervisor, 50),
            percentile(ready.floor, 50), start_ratio, start_target, start_pass, cpu_s, cpu_f,
            percentile(down.supervisor, 50), percentile(down.floor, 50),
            percentile(down.supervisor, 50) / percentile(down.floor, 50), memory_target_kib,
            memory_pass, memory_json, args.idle_seconds, wake_pass, wake_json);

        std::error_code ignored;
        fs::remove(argv_file, ignored);
        fmt::print("\nverdicts: start {}, memory {}, wake-ups {}\n", verdict(start_pass),
                   verdict(memory_pass), wakes.empty() ? "-" : verdict(wake_pass));
        fmt::print("cleanup: {}; load average at end {}; total {:.1f} s\n",
                   qm::bench::leftovers(env.dir), qm::bench::load_average(),
                   std::chrono::duration<double>(Clock::now() - started).count());
        return 0;
    } catch (const std::exception& e) {
        fmt::print(stderr, "supervisor-bench: {}\n", e.what());
        // Machines destroyed by the unwinding were SIGKILLed; let the ChildWatcher reap them.
        reap_all(env);
        return 1;
    }
}

} // namespace

int main(int argc, char** argv)
{
    using qm::bench::parse_int;
    qm::bench::install_signal_handlers();
    if (argc == 7 && std::string_view(argv[1]) == "--probe") {
        // Internal: a memory/wake-up probe, run by the benchmark in a process of its own.
        return qm::bench::guarded("supervisor-bench", [&] {
            return probe(argv[2], parse_int("--probe", argv[3], 1), argv[4],
                         parse_int("--probe", argv[5], 0), argv[6]);
        });
    }
    Args args;
    const std::vector<qm::bench::Option> options{
        {"--n", [&](std::string_view v) { args.n = parse_int("--n", v, 1); }},
        {"--trials", [&](std::string_view v) { args.trials = parse_int("--trials", v, 1); }},
        {"--idle-seconds",
         [&](std::string_view v) { args.idle_seconds = parse_int("--idle-seconds", v, 0); }},
    };
    return qm::bench::bench_main("supervisor-bench", argc, argv, options, usage,
                                 [&] { return run(args); });
}
