// SPDX-License-Identifier: GPL-2.0-or-later
// machine-bench: qm::Machine against the floor (posix_spawn, one epoll loop, raw unix sockets) on
// N `qemu-system-x86_64 -machine none` at once: launch to all ready, teardown, and the memory the
// supervising process spends per machine. Not a test: it prints figures (bench/README.md).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "bench/floor.hpp"
#include "bench/stats.hpp"
#include "libmachine/asio.hpp"
#include "libmachine/machine/machine.hpp"
#include "libmachine/proc/spawn.hpp"
#include "libmachine/qmp/address.hpp"
#include "tests/support/loop.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;
using qm::bench::die;
using qm::bench::Floor;
using qm::bench::FloorVm;
using qm::bench::parse_int;
using qm::bench::percentile;
using qm::bench::Rss;
using qm::bench::Timing;

// The targets.
constexpr double ready_target = 1.10; // machine / floor, all-ready p50 at N = 50
constexpr int ready_target_n = 50;
constexpr double teardown_target = 1.50; // machine / floor, teardown p50
constexpr double memory_target_kib = 16; // host-process memory per machine
constexpr int memory_target_min_n = 10;  // below, one machine is a few pages: too coarse
// Fresh processes per memory figure (the median is reported, with the range).
constexpr int memory_runs = 5;

struct Args
{
    int trials = 10;
    std::vector<int> sizes{1, 10, 50};
};

using Env = qm::bench::Env;

// A `-machine none` machine. The floor's command lines come from machines built with an explicit
// name and socket, so that the two sides run the same command line.
std::unique_ptr<qm::Machine> make_machine(Env& env, std::string name = {},
                                          std::optional<qm::qmp::Address> monitor = {})
{
    qm::MachineConfig c;
    c.binary = env.qemu;
    c.base_temp_dir = env.dir.string();
    c.args = {"-nodefaults", "-no-user-config"};
    c.name = std::move(name);
    c.monitor_address = std::move(monitor);
    auto m = std::make_unique<qm::Machine>(env.ioc, std::move(c));
    m->set_machine("none");
    return m;
}

//---- the machine side: qm::Machine on one io_context -------------------------------------------

using MachineOp = std::function<qm::awaitable<qm::expected<void>>(qm::Machine&)>;

// co_spawns `op` on every machine at once and runs the loop until all have completed. Returns the
// time from before the first co_spawn to the last completion, in ms.
double run_all(Env& env, const std::vector<std::unique_ptr<qm::Machine>>& machines,
               const MachineOp& op, const char* what)
{
    std::vector<qm::awaitable<qm::expected<void>>> ops;
    ops.reserve(machines.size());
    for (const auto& m : machines) {
        ops.push_back(op(*m));
    }
    return qm::bench::run_all(env.ioc, std::move(ops), "machine", what);
}


std::vector<std::unique_ptr<qm::Machine>> make_machines(Env& env, int n)
{
    std::vector<std::unique_ptr<qm::Machine>> machines;
    machines.reserve(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
        machines.push_back(make_machine(env));
    }
    return machines;
}

double launch_machines(Env& env, const std::vector<std::unique_ptr<qm::Machine>>& machines)
{
    return run_all(env, machines, [](qm::Machine& m) { return m.launch(); }, "launch");
}

// Shuts every machine down at once (quit, then the exit seen by the ChildWatcher, reaped) and
// checks each QEMU exited with status 0.
double shut_down_machines(Env& env, const std::vector<std::unique_ptr<qm::Machine>>& machines)
{
    const double ms =
        run_all(env, machines, [](qm::Machine& m) { return m.shutdown(); }, "shutdown");
    for (const auto& m : machines) {
        if (m->exitcode() != 0) {
            die(fmt::format("machine: {} {}", m->name(),
                            m->exit_status() ? m->exit_status()->to_string() : "did not exit"));
        }
    }
    return ms;
}

// Lets the loop finish what the machines left queued (readers ending on closed sockets).
void drain(Env& env)
{
    env.ioc.restart();
    env.ioc.poll();
}

Timing machine_trial(Env& env, int n)
{
    auto machines = make_machines(env, n);
    Timing t;
    t.ready_ms = launch_machines(env, machines);
    t.teardown_ms = shut_down_machines(env, machines);
    machines.clear();
    drain(env);
    return t;
}

//---- the floor: posix_spawn, one epoll loop, raw unix sockets ----------------------------------

// One QEMU of the floor: its command line (a Machine's, with a name and socket of its own) and
// how far its QMP negotiation has gone.
std::vector<FloorVm> floor_vms(Env& env, int n)
{
    std::vector<FloorVm> vms(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
        auto& vm = vms[static_cast<std::size_t>(i)];
        vm.socket_path = (env.dir / fmt::format("floor-{}-monitor.sock", i)).string();
        vm.argv = make_machine(env, fmt::format("floor-{}", i),
                               qm::qmp::Address::unix_socket(vm.socket_path))
                      ->full_args();
    }
    return vms;
}

//---- memory: a fresh process per figure --------------------------------------------------------

// The memory probe, run in a child process of its own (`--probe-memory`): one warm-up launch and
// teardown of a single machine (or floor QEMU), so that first-use costs (Asio services, the
// ChildWatcher, spdlog, code pages, the allocator's arena) are paid; then the RSS before creating
// N and once all N are ready. Prints "exact_before exact_ready vmrss_before vmrss_ready" in bytes.
int probe_memory(std::string_view kind, int n, const fs::path& base)
{
    Env env(base, "machine-bench");
    Rss before;
    Rss ready;
    if (kind == "machine") {
        machine_trial(env, 1);
        before = qm::bench::read_rss();
        auto machines = make_machines(env, n);
        launch_machines(env, machines);
        ready = qm::bench::read_rss();
        shut_down_machines(env, machines);
        machines.clear();
        drain(env);
    } else if (kind == "floor") {
        {
            Floor warm(floor_vms(env, 1));
            qm::bench::floor_trial(warm);
        }
        before = qm::bench::read_rss();
        Floor floor(floor_vms(env, n));
        floor.launch();
        ready = qm::bench::read_rss();
        floor.teardown();
    } else {
        die(fmt::format("--probe-memory: unknown kind '{}'", kind));
    }
    fmt::print("{} {} {} {}\n", before.exact, ready.exact, before.vmrss, ready.vmrss);
    return 0;
}

struct MemoryFigure
{
    Rss before;
    Rss ready;
    double per_vm_kib = 0;       // from the exact RSS
    double per_vm_vmrss_kib = 0; // from VmRSS
};

// Runs this program as `--probe-memory kind n base` and reads its figures.
MemoryFigure run_probe(const std::string& kind, int n, const fs::path& base)
{
    const std::string out =
        qm::bench::run_self({"--probe-memory", kind, std::to_string(n), base.string()});
    MemoryFigure f;
    std::istringstream in(out);
    if (!(in >> f.before.exact >> f.ready.exact >> f.before.vmrss >> f.ready.vmrss)) {
        die(fmt::format("the {} memory probe at N={} printed '{}'", kind, n, out));
    }
    auto per_vm = [n](std::size_t before, std::size_t ready) {
        return (static_cast<double>(ready) - static_cast<double>(before)) / 1024.0 / n;
    };
    f.per_vm_kib = per_vm(f.before.exact, f.ready.exact);
    f.per_vm_vmrss_kib = per_vm(f.before.vmrss, f.ready.vmrss);
    return f;
}

// `memory_runs` fresh processes, sorted by their per-VM figure.
std::vector<MemoryFigure> probes(const std::string& kind, int n, const fs::path& base)
{
    std::vector<MemoryFigure> runs;
    runs.reserve(memory_runs);
    for (int i = 0; i < memory_runs; ++i) {
        runs.push_back(run_probe(kind, n, base));
    }
    std::sort(runs.begin(), runs.end(),
              [](const auto& a, const auto& b) { return a.per_vm_kib < b.per_vm_kib; });
    return runs;
}

//---- reporting ---------------------------------------------------------------------------------

struct Samples
{
    std::vector<double> machine;
    std::vector<double> floor;
};

void print_timing_row(int n, const Samples& s, double target, bool judged)
{
    const double m50 = percentile(s.machine, 50);
    const double f50 = percentile(s.floor, 50);
    const double ratio = m50 / f50;
    std::string verdict = "-";
    if (judged) {
        verdict = ratio <= target ? fmt::format("ok (<= {:.2f}x)", target)
                                  : fmt::format("MISSED (> {:.2f}x)", target);
    }
    fmt::print("  {:>4}  {:>9.1f} {:>9.1f}   {:>9.1f} {:>9.1f}   {:>6.2f}x  {}\n", n, m50,
               percentile(s.machine, 99), f50, percentile(s.floor, 99), ratio, verdict);
}

void print_timing_header()
{
    fmt::print("  {:>4}  {:>9} {:>9}   {:>9} {:>9}   {:>7}  {}\n", "N", "machine50", "machine99",
               "floor50", "floor99", "m/f p50", "target");
}

double kib(std::size_t bytes)
{
    return static_cast<double>(bytes) / 1024.0;
}

void print_memory_header()
{
    fmt::print("  {:>4}  {:>8} {:>8} {:>6} {:>11} {:>7}   {:>8} {:>8} {:>6} {:>7}   {}\n", "N",
               "m before", "m ready", "m /VM", "m range", "(VmRSS)", "f before", "f ready", "f /VM",
               "(VmRSS)", "target (machine median)");
}

// `m` and `f` are sorted by their per-VM figure; the row shows the median process of each.
void print_memory_row(int n, const std::vector<MemoryFigure>& m, const std::vector<MemoryFigure>& f)
{
    const MemoryFigure& mm = m[m.size() / 2];
    const MemoryFigure& fm = f[f.size() / 2];
    std::string verdict = "- (N too small to judge)";
    if (n >= memory_target_min_n) {
        verdict = mm.per_vm_kib <= memory_target_kib
                      ? fmt::format("ok (<= {:.0f} KiB)", memory_target_kib)
                      : fmt::format("MISSED (> {:.0f} KiB)", memory_target_kib);
    }
    const std::string range =
        fmt::format("{:.1f}-{:.1f}", m.front().per_vm_kib, m.back().per_vm_kib);
    fmt::print("  {:>4}  {:>8.0f} {:>8.0f} {:>6.1f} {:>11} {:>7.1f}   {:>8.0f} {:>8.0f} {:>6.1f} "
               "{:>7.1f}   {}\n",
               n, kib(mm.before.exact), kib(mm.ready.exact), mm.per_vm_kib, range,
               mm.per_vm_vmrss_kib, kib(fm.before.exact), kib(fm.ready.exact), fm.per_vm_kib,
               fm.per_vm_vmrss_kib, verdict);
}

//---- main --------------------------------------------------------------------------------------

// The file system of `dir`: every Machine creates a directory, a log file and a socket there, and
std::vector<int> parse_sizes(std::string_view s)
{
    std::vector<int> sizes;
    for (std::size_t at = 0; at <= s.size();) {
        const std::size_t comma = std::min(s.find(',', at), s.size());
        sizes.push_back(parse_int("--sizes", s.substr(at, comma - at), 1));
        at = comma + 1;
    }
    return sizes;
}

void usage()
{
    fmt::print("usage: machine-bench [--trials N] [--sizes N,N,...]\n"
               "  --trials N       interleaved trials per size (default 10, at least 2)\n"
               "  --sizes N,N,...  how many machines at once (default 1,10,50)\n"
               "QM_QEMU names the QEMU binary (default qemu-system-x86_64 in PATH).\n");
}

int run(const Args& args)
{
    const auto started = Clock::now();
    Env env(fs::temp_directory_path(), "machine-bench");
    try {
        // Warm-up, not recorded: one machine, to learn QEMU's version and pay first-use costs.
        std::string version;
        std::string command_line;
        {
            auto machines = make_machines(env, 1);
            launch_machines(env, machines);
            if (const auto& g = machines[0]->qmp_client()->greeting()) {
                version = fmt::format("{} ({})", g->version(), g->package);
            }
            command_line = qm::proc::format_command_line(machines[0]->full_args());
            shut_down_machines(env, machines);
            machines.clear();
            drain(env);
        }
        std::string sizes;
        for (int n : args.sizes) {
            sizes += (sizes.empty() ? "" : ",") + std::to_string(n);
        }
        fmt::print("machine-bench: QEMU {} -machine none, {} CPUs; {} trials per size; sizes {}\n",
                   version, std::thread::hardware_concurrency(), args.trials, sizes);
        fmt::print("temporary directory {} ({}); load average at start {}\n", env.dir.string(),
                   qm::bench::fs_type(env.dir), qm::bench::load_average());
        fmt::print("command line (the floor's differs only in -name and the socket path):\n  {}\n",
                   command_line);
        fmt::print("machine = N qm::Machine::launch() / shutdown() co_spawned at once on one "
                   "io_context; floor = the same\ncommand lines, posix_spawn (own session, as "
                   "qm::proc::spawn) + one epoll loop + raw unix sockets +\nblocking waitpid. "
                   "Trials alternate which side goes first; p99 is nearest-rank (with fewer\nthan "
                   "100 trials, the slowest).\n\n");
        std::fflush(stdout);

        std::vector<std::pair<int, Samples>> ready_rows;
        std::vector<std::pair<int, Samples>> teardown_rows;
        for (const int n : args.sizes) {
            Floor floor(floor_vms(env, n));
            machine_trial(env, n); // warm-up at this size, not recorded
            qm::bench::floor_trial(floor);
            Samples ready;
            Samples down;
            for (int t = 0; t < args.trials; ++t) {
                auto machine = [&] {
                    const Timing tm = machine_trial(env, n);
                    ready.machine.push_back(tm.ready_ms);
                    down.machine.push_back(tm.teardown_ms);
                };
                auto floor_side = [&] {
                    const Timing tm = qm::bench::floor_trial(floor);
                    ready.floor.push_back(tm.ready_ms);
                    down.floor.push_back(tm.teardown_ms);
                };
                qm::bench::interleaved(t, machine, floor_side);
            }
            ready_rows.emplace_back(n, std::move(ready));
            teardown_rows.emplace_back(n, std::move(down));
        }

        fmt::print("(a) launch -> all ready (QMP negotiated, query-status answered), ms per "
                   "trial; target at N={}\n",
                   ready_target_n);
        print_timing_header();
        for (const auto& [n, s] : ready_rows) {
            print_timing_row(n, s, ready_target, n == ready_target_n);
        }
        fmt::print("\n(b) teardown (quit -> every QEMU exited and reaped), ms per trial\n");
        print_timing_header();
        for (const auto& [n, s] : teardown_rows) {
            print_timing_row(n, s, teardown_target, true);
        }
        std::fflush(stdout);

        fmt::print("\n(c) host-process memory per machine, KiB: (RSS once all N are ready - RSS "
                   "before creating them) / N,\n    in a fresh process after one warm-up launch + "
                   "teardown; RSS = /proc/self/smaps_rollup Rss (VmRSS\n    alongside); the "
                   "median of {} processes per figure, the machine's range beside it\n",
                   memory_runs);
        print_memory_header();
        for (const int n : args.sizes) {
            print_memory_row(n, probes("machine", n, env.dir), probes("floor", n, env.dir));
            std::fflush(stdout);
        }

        fmt::print("\ncleanup: {}; load average at end {}; total {:.1f} s\n",
                   qm::bench::leftovers(env.dir), qm::bench::load_average(),
                   std::chrono::duration<double>(Clock::now() - started).count());
        return 0;
    } catch (const std::exception& e) {
        fmt::print(stderr, "machine-bench: {}\n", e.what());
        // Machines destroyed by the unwinding were SIGKILLed; let the ChildWatcher reap them.
        auto& watcher = qm::proc::ChildWatcher::get(env.ioc);
        qm::test::run_until(env.ioc, [&] { return watcher.watched() == 0; }, 10s);
        return 1;
    }
}

} // namespace

int main(int argc, char** argv)
{
    qm::bench::install_signal_handlers();
    if (argc == 5 && std::string_view(argv[1]) == "--probe-memory") {
        // Internal: the memory probe, run by the benchmark in a process of its own.
        return qm::bench::guarded("machine-bench", [&] {
            return probe_memory(argv[2], parse_int("--probe-memory", argv[3], 1), argv[4]);
        });
    }
    Args args;
    const std::vector<qm::bench::Option> options{
        {"--trials", [&](std::string_view v) { args.trials = parse_int("--trials", v, 2); }},
        {"--sizes", [&](std::string_view v) { args.sizes = parse_sizes(v); }},
    };
    return qm::bench::bench_main("machine-bench", argc, argv, options, usage,
                                 [&] { return run(args); });
}
