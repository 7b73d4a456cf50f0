// SPDX-License-Identifier: GPL-2.0-or-later
// rest-bench: QMP passthrough through the real qmachined's REST socket (`POST
// /v1/machines/{name}/qmp`) against direct QMP to QEMU (the floor), with 1 and 32 concurrent
// keep-alive clients over 50 `qemu-system-x86_64 -machine none`. Not a test: it prints figures
// (bench/README.md).
#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <unistd.h>

#include <fmt/format.h>

#include "bench/daemon.hpp" // includes libmachine/asio.hpp first (trap 1)
#include "bench/floor.hpp"
#include "bench/stats.hpp"
#include "libmachine/json.hpp"
#include "libmachine/proc/spawn.hpp"
#include "tests/support/loop.hpp"

// After libmachine/asio.hpp (trap 1), which does not include it: only the floor's clients read
// up to a delimiter.
#include <boost/asio/read_until.hpp>

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;
namespace asio = qm::asio;
namespace beast = qm::rest::beast;
namespace http = qm::rest::http;
using qm::awaitable;
using qm::error_code;
using qm::use_ec;
using qm::bench::BareQemu;
using qm::bench::command_line;
using qm::bench::Daemon;
using qm::bench::die;
using qm::bench::make_request;
using qm::bench::percentile;
using qm::bench::processes_sched;
using qm::bench::qmachined_binary;
using qm::bench::Request;
using qm::bench::Sched;
using qm::bench::spawn_bare_qemu;
using Local = asio::local::stream_protocol;

// The issue's targets, at every concurrency.
constexpr double overhead_target_us = 100; // REST p50 - floor p50
constexpr double throughput_target = 0.5;  // REST req/s / floor req/s
// shared/bench-anchors.md, QMP commands/s at N = 50, `-machine pc`: the Python seed
// (qemu.machine + qemu.qmp, one command at a time) and libvirt (python3-libvirt, 8 threads on one
// connection, qemuMonitorCommand).
constexpr double seed_sequential = 3068;
constexpr double libvirt_concurrent = 2134;
// Each window starts with this much load that is not recorded: connections made, caches warm.
constexpr auto window_warm_up = 300ms;
// Before the trials of each concurrency, one window per side that is not recorded at all.
constexpr auto concurrency_warm_up = 500ms;

constexpr std::string_view qmp_body = R"({"execute":"query-status"})";
constexpr std::string_view qmp_line = "{\"execute\":\"query-status\"}\n";

struct Args
{
    int machines = 50;
    int seconds = 2;
    int trials = 3;
    std::vector<int> concurrency{1, 32};
};

std::string machine_name(int i)
{
    return fmt::format("m{:02}", i);
}

// The floor's QEMUs (bench/daemon.hpp: qmachined's command line, QMP straight to them).
using qm::bench::BareQemus;

//---- the load ----------------------------------------------------------------------------------

// One measured run of one side at one concurrency: C clients, each with one connection (REST) or
// its machines' monitors (floor), sending its next request when the previous answer arrived.
struct Window
{
    bool recording = false;
    bool stopping = false;
    bool keeper_done = false;
    int running = 0;
    Clock::time_point begin{};
    Clock::time_point end{};
    std::vector<double> us; // latencies of the requests answered while recording
    std::string error;

    void record(Clock::time_point t0, Clock::time_point t1)
    {
        if (recording) {
            us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
        }
    }
    void fail(std::string why)
    {
        if (error.empty()) {
            error = std::move(why);
        }
        stopping = true;
    }
};

// Counts a client out of its window however its coroutine ends (even destroyed unfinished).
struct ClientGuard
{
    explicit ClientGuard(Window& w)
        : w_(w)
    {
        ++w_.running;
    }
    ClientGuard(const ClientGuard&) = delete;
    ClientGuard& operator=(const ClientGuard&) = delete;
    ~ClientGuard() { --w_.running; }
    Window& w_;
};

// A REST client: one keep-alive connection; `requests[i]` is machine i's prepared request, and
// `mine` the machines it takes in turn.
awaitable<void> rest_client(std::string socket_path,
                            std::shared_ptr<const std::vector<Request>> requests,
                            std::vector<std::size_t> mine, std::shared_ptr<Window> w)
{
    const ClientGuard guard(*w);
    Local::socket socket(co_await asio::this_coro::executor);
    const Local::endpoint endpoint(socket_path);
    error_code ec;
    co_await socket.async_connect(endpoint, use_ec(ec));
    if (ec) {
        w->fail("REST: connect: " + ec.message());
        co_return;
    }
    beast::flat_buffer buffer;
    for (std::size_t i = 0; !w->stopping; ++i) {
        const Request& req = (*requests)[mine[i % mine.size()]];
        const auto t0 = Clock::now();
        co_await http::async_write(socket, req, use_ec(ec));
        if (ec) {
            w->fail("REST: write: " + ec.message());
            break;
        }
        http::response<http::string_body> res;
        co_await http::async_read(socket, buffer, res, use_ec(ec));
        const auto t1 = Clock::now();
        if (ec) {
            w->fail("REST: read: " + ec.message());
            break;
        }
        if (res.result_int() != 200 || !res.body().starts_with("{\"return\":")) {
            w->fail(fmt::format("REST: {} -> {} {}", std::string(req.target()), res.result_int(),
                                res.body().substr(0, 300)));
            break;
        }
        w->record(t0, t1);
    }
    socket.shutdown(asio::socket_base::shutdown_both, ec);
    socket.close(ec);
}

// A floor client: the same command written straight to QEMU's monitor of each of `mine` in turn
// (one line), its reply read to '\n'. No other client uses these monitors meanwhile.
awaitable<void> floor_client(std::shared_ptr<const BareQemus> floors, std::vector<std::size_t> mine,
                             std::shared_ptr<Window> w)
{
    const ClientGuard guard(*w);
    error_code ec;
    for (std::size_t i = 0; !w->stopping; ++i) {
        BareQemu& m = *(*floors)[mine[i % mine.size()]];
        const auto t0 = Clock::now();
        co_await asio::async_write(*m.socket, asio::buffer(qmp_line), use_ec(ec));
        if (ec) {
            w->fail("floor: write: " + ec.message());
            break;
        }
        std::size_t n = 0;
        for (;;) {
            auto buffer = asio::dynamic_buffer(m.in);
            n = co_await asio::async_read_until(*m.socket, buffer, '\n', use_ec(ec));
            if (ec || std::string_view(m.in.data(), n).find("\"event\"") == std::string::npos) {
                break;
            }
            m.in.erase(0, n); // an event (qmp-spec 2.5), not our reply
        }
        const auto t1 = Clock::now();
        if (ec) {
            w->fail("floor: read: " + ec.message());
            break;
        }
        if (std::string_view(m.in.data(), n).find("\"return\"") == std::string_view::npos) {
            w->fail("floor: " + m.in.substr(0, std::min<std::size_t>(n, 300)));
            break;
        }
        m.in.erase(0, n);
        w->record(t0, t1);
    }
}

// CPU time over the recorded window: the side's QEMUs (every thread), qmachined (every thread)
// and this process (every thread: the clients' loop and nothing else busy).
struct CpuProbe
{
    std::vector<pid_t> qemus;
    pid_t daemon = -1;
    Sched qemu;
    Sched daemon_cpu;
    Sched self;

    void begin()
    {
        qemu = processes_sched(qemus);
        daemon_cpu = processes_sched({daemon});
        self = processes_sched({::getpid()});
    }
    void end()
    {
        qemu = processes_sched(qemus) - qemu;
        daemon_cpu = processes_sched({daemon}) - daemon_cpu;
        self = processes_sched({::getpid()}) - self;
    }
};

// Starts the recording after the warm-up, ends the window after `measure`. The CPU readings
// (a few hundred small /proc reads) are taken outside the recorded window.
awaitable<void> timekeeper(std::shared_ptr<Window> w, std::shared_ptr<CpuProbe> cpu,
                           Clock::duration warm, Clock::duration measure)
{
    asio::steady_timer timer(co_await asio::this_coro::executor);
    error_code ec;
    timer.expires_after(warm);
    co_await timer.async_wait(use_ec(ec));
    if (!w->stopping) {
        cpu->begin();
        w->recording = true;
        w->begin = Clock::now();
        timer.expires_at(w->begin + measure);
        co_await timer.async_wait(use_ec(ec));
        w->end = Clock::now();
        w->recording = false;
        w->stopping = true;
        cpu->end();
    }
    w->keeper_done = true;
}

enum class Side { rest, floor };

const char* side_name(Side s)
{
    return s == Side::rest ? "REST" : "floor";
}

// One window's figures.
struct Run
{
    std::vector<double> us;
    double rps = 0;
    // CPU per request, us: the side's QEMUs, qmachined (REST only), this process (the clients)
    double qemu_us = 0;
    double daemon_us = 0;
    double self_us = 0;
    double busy = 0;      // their CPU time / (window x CPUs)
    double qemu_runs = 0; // times a thread of the side's QEMUs was put on a CPU, per request
};

// Everything the load needs: the loop, the daemon (REST) and the floor's monitors.
struct Load
{
    asio::io_context& ioc;
    const Daemon& daemon;
    std::shared_ptr<const std::vector<Request>> requests; // machine i's QMP request
    std::shared_ptr<const BareQemus> floors;              // floor QEMU i
    std::size_t machines = 0;
    std::vector<pid_t> rest_qemus;  // the daemon's
    std::vector<pid_t> floor_qemus; // ours
};

// C clients of `side`, client k taking machines k, k + C, k + 2C, ... in turn; `warm` of load,
// then `measure` recorded.
Run run_window(Load& load, Side side, int concurrency, Clock::duration warm,
               Clock::duration measure)
{
    auto w = std::make_shared<Window>();
    auto cpu = std::make_shared<CpuProbe>();
    cpu->daemon = load.daemon.pid();
    cpu->qemus = side == Side::rest ? load.rest_qemus : load.floor_qemus;
    w->us.reserve(200000);
    const auto c = static_cast<std::size_t>(concurrency);
    for (std::size_t k = 0; k < c; ++k) {
        std::vector<std::size_t> mine;
        for (std::size_t i = k; i < load.machines; i += c) {
            mine.push_back(i);
        }
        auto on_end = [w](const std::exception_ptr& e) {
            if (e) {
                w->fail("a client threw");
            }
        };
        if (side == Side::rest) {
            asio::co_spawn(
                load.ioc, rest_client(load.daemon.socket_path(), load.requests, std::move(mine), w),
                on_end);
        } else {
            asio::co_spawn(load.ioc, floor_client(load.floors, std::move(mine), w), on_end);
        }
    }
    asio::co_spawn(load.ioc, timekeeper(w, cpu, warm, measure), asio::detached);
    const auto limit = std::chrono::duration_cast<std::chrono::milliseconds>(warm + measure) + 30s;
    const bool done = qm::test::run_until(
        load.ioc,
        [&] {
            return (w->running == 0 && (w->keeper_done || !w->error.empty())) ||
                   qm::bench::interrupted != 0;
        },
        limit);
    qm::bench::check_interrupted();
    if (!w->error.empty()) {
        die(fmt::format("{} at concurrency {}: {}", side_name(side), concurrency, w->error));
    }
    if (!done) {
        die(fmt::format("{} at concurrency {}: the clients did not finish", side_name(side),
                        concurrency));
    }
    Run r;
    const double seconds = std::chrono::duration<double>(w->end - w->begin).count();
    const auto n = static_cast<double>(w->us.size());
    r.rps = seconds > 0 ? n / seconds : 0;
    if (n > 0) {
        r.qemu_us = static_cast<double>(cpu->qemu.ns) / 1e3 / n;
        r.daemon_us = static_cast<double>(cpu->daemon_cpu.ns) / 1e3 / n;
        r.self_us = static_cast<double>(cpu->self.ns) / 1e3 / n;
        r.qemu_runs = static_cast<double>(cpu->qemu.runs) / n;
    }
    if (seconds > 0) {
        r.busy = static_cast<double>(cpu->qemu.ns + cpu->daemon_cpu.ns + cpu->self.ns) / 1e9 /
                 seconds / std::thread::hardware_concurrency();
    }
    r.us = std::move(w->us);
    return r;
}

// All the windows of one side at one concurrency.
struct Figures
{
    std::vector<double> us; // pooled over trials
    std::vector<double> rps;
    std::vector<double> qemu_us;
    std::vector<double> daemon_us;
    std::vector<double> self_us;
    std::vector<double> busy;
    std::vector<double> qemu_runs;

    void add(Run r)
    {
        qemu_runs.push_back(r.qemu_runs);
        us.insert(us.end(), r.us.begin(), r.us.end());
        rps.push_back(r.rps);
        qemu_us.push_back(r.qemu_us);
        daemon_us.push_back(r.daemon_us);
        self_us.push_back(r.self_us);
        busy.push_back(r.busy);
    }
    double p50() const { return percentile(us, 50); }
    double p99() const { return percentile(us, 99); }
    double rps50() const { return percentile(rps, 50); }
};

struct Row
{
    int concurrency = 0;
    Figures rest;
    Figures floor;

    double overhead_us() const { return rest.p50() - floor.p50(); }
    double ratio() const { return rest.rps50() / floor.rps50(); }
    bool overhead_pass() const { return overhead_us() <= overhead_target_us; }
    bool ratio_pass() const { return ratio() >= throughput_target; }
};

std::string range_of(const std::vector<double>& v)
{
    const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
    return fmt::format("{:.0f}-{:.0f}", *lo, *hi);
}

const char* verdict(bool pass)
{
    return pass ? "PASS" : "FAIL";
}

//---- main --------------------------------------------------------------------------------------

void usage()
{
    fmt::print(
        "usage: rest-bench [--machines N] [--seconds S] [--trials N] [--concurrency C,C,...]\n"
        "  --machines N        machines created and started through qmachined, and floor "
        "QEMUs (default 50)\n"
        "  --seconds S         recorded seconds per window: per side, concurrency and trial "
        "(default 2)\n"
        "  --trials N          interleaved REST/floor trials per concurrency (default 3)\n"
        "  --concurrency LIST  concurrent clients, each at most --machines (default 1,32)\n");
    fmt::print("{}", qm::bench::environment_usage);
}

std::vector<int> parse_list(std::string_view flag, std::string_view text)
{
    std::vector<int> out;
    for (std::size_t at = 0; at <= text.size();) {
        const std::size_t comma = std::min(text.find(',', at), text.size());
        out.push_back(qm::bench::parse_int(flag, text.substr(at, comma - at), 1));
        at = comma + 1;
    }
    return out;
}

int run(const Args& args)
{
    const auto started = Clock::now();
    qm::bench::raise_fd_limit();
    // A short directory: the daemon's machine sockets are inside it, and a unix socket's path
    // has at most 107 bytes.
    qm::bench::Env env(fs::temp_directory_path(), "rb");
    const auto machines = static_cast<std::size_t>(args.machines);
    Daemon daemon(qmachined_binary(), env.dir / "d");
    auto floors = std::make_shared<BareQemus>();

    // The daemon, its machines, the floor's QEMUs.
    daemon.start("stop-machines", "warn");
    daemon.wait_ready();
    const std::string spec = qm::bench::none_spec(env.qemu, false); // no console, as the issue says
    auto setup = std::make_shared<qm::bench::Setup>();
    for (std::size_t i = 0; i < machines; ++i) {
        setup->names.push_back(machine_name(static_cast<int>(i)));
    }
    // A connection per machine, all at once.
    const double setup_ms =
        qm::bench::create_and_start(env.ioc, daemon.socket_path(), spec, setup, machines);
    const std::vector<std::string> daemon_argv = command_line(setup->pids.front());
    const auto floor_argv = qm::bench::bare_template(daemon_argv, machine_name(0));
    std::vector<std::string> floor_names;
    for (std::size_t i = 0; i < machines; ++i) {
        floor_names.push_back(fmt::format("f{:02}", i));
    }
    const double floor_ms = qm::bench::spawn_bare_qemus(env.ioc, floor_argv, floor_names, *floors);

    const auto version = qm::test::run_co(
        env.ioc, qm::bench::request(daemon.socket_path(), http::verb::get, "/v1/version", ""));
    const std::string qemu_version = version ? qemu_version_of(*version) : "?";
    fmt::print("rest-bench: qmachined {}\n  QEMU {} -machine none, {} CPUs; {} machines, "
               "concurrency {}, {} trials x {} s per side and concurrency\n",
               qmachined_binary(), qemu_version, std::thread::hardware_concurrency(), machines,
               fmt::join(args.concurrency, ","), args.trials, args.seconds);
    fmt::print("temporary directory {} ({}); load average at start {}\n", env.dir.string(),
               qm::bench::fs_type(env.dir), qm::bench::load_average());
    fmt::print("set-up, not compared: {} machines created and started over REST at once in "
               "{:.0f} ms; {} floor QEMUs\nlaunched and negotiated in {:.0f} ms\n",
               machines, setup_ms, machines, floor_ms);
    fmt::print("command line (the floor's QEMUs differ only in -name, and talk QMP over a "
               "socket pair to this\nprocess as qmachined's do to it, without the served "
               "monitor):\n  {}\n",
               qm::proc::format_command_line(daemon_argv));
    fmt::print(
        "REST  = POST /v1/machines/{{name}}/qmp {} on qmachined's unix socket: a Beast "
        "client per\n        connection (keep-alive), on this process's io_context\nfloor = "
        "the same command as one line straight to a QEMU's QMP monitor, reply read to "
        "'\\n'\nClient k of C takes machines k, k+C, k+2C, ... in turn and sends its next "
        "request when the\nprevious answer arrived. Each window: {} ms unrecorded, then {} s "
        "recorded; trials alternate\nwhich side goes first, after {} ms of each side "
        "unrecorded per concurrency.\n\n",
        qmp_body, window_warm_up.count(), args.seconds, concurrency_warm_up.count());
    std::fflush(stdout);

    Load load{env.ioc, daemon, nullptr, floors, machines, setup->pids, {}};
    for (const auto& q : *floors) {
        load.floor_qemus.push_back(q->pid);
    }
    auto requests = std::make_shared<std::vector<Request>>();
    for (std::size_t i = 0; i < machines; ++i) {
        requests->push_back(
            make_request(http::verb::post,
                         "/v1/machines/" + machine_name(static_cast<int>(i)) + "/qmp", qmp_body));
    }
    load.requests = requests;
    const Clock::duration measure = std::chrono::seconds(args.seconds);

    std::vector<Row> rows;
    for (const int c : args.concurrency) {
        Row row;
        row.concurrency = c;
        run_window(load, Side::rest, c, concurrency_warm_up, 0s);
        run_window(load, Side::floor, c, concurrency_warm_up, 0s);
        for (int t = 0; t < args.trials; ++t) {
            qm::bench::interleaved(
                t, [&] { row.rest.add(run_window(load, Side::rest, c, window_warm_up, measure)); },
                [&] { row.floor.add(run_window(load, Side::floor, c, window_warm_up, measure)); });
        }
        rows.push_back(std::move(row));
    }

    fmt::print("latency (us; every request of the recorded windows, pooled over trials); "
               "throughput (req/s; median\ntrial and range); CPU per request (us, median "
               "trial; every thread: the side's {} QEMUs,\nqmachined, this process's "
               "clients), what they used of the {} CPUs, and how many times a QEMU\nthread "
               "was put on a CPU per request (schedstat):\n",
               machines, std::thread::hardware_concurrency());
    fmt::print("  {:>4}  {:<5} {:>7} {:>7} {:>7} {:>13} {:>8}   {:>6} {:>6} {:>7} {:>6} "
               "{:>5} {:>6}\n",
               "conc", "side", "p50", "p99", "req/s", "range", "requests", "qemu", "daemon",
               "clients", "total", "busy", "q runs");
    for (const auto& r : rows) {
        for (const Side s : {Side::rest, Side::floor}) {
            const Figures& f = s == Side::rest ? r.rest : r.floor;
            const double q = percentile(f.qemu_us, 50);
            const double d = percentile(f.daemon_us, 50);
            const double c = percentile(f.self_us, 50);
            fmt::print("  {:>4}  {:<5} {:>7.0f} {:>7.0f} {:>7.0f} {:>13} {:>8}   {:>6.1f} "
                       "{:>6.1f} {:>7.1f} {:>6.1f} {:>4.0f}% {:>6.2f}\n",
                       r.concurrency, side_name(s), f.p50(), f.p99(), f.rps50(), range_of(f.rps),
                       f.us.size(), q, d, c, q + d + c, 100 * percentile(f.busy, 50),
                       percentile(f.qemu_runs, 50));
        }
    }
    fmt::print("\ntargets (issue 6): p50 overhead (REST p50 - floor p50) <= {:.0f} us; "
               "throughput >= {:.2f}x the floor's\n",
               overhead_target_us, throughput_target);
    bool all_pass = true;
    for (const auto& r : rows) {
        all_pass = all_pass && r.overhead_pass() && r.ratio_pass();
        fmt::print("  concurrency {:>2}: overhead p50 {:+.0f} us {} | throughput {:.0f} / "
                   "{:.0f} = {:.2f}x {}\n",
                   r.concurrency, r.overhead_us(), verdict(r.overhead_pass()), r.rest.rps50(),
                   r.floor.rps50(), r.ratio(), verdict(r.ratio_pass()));
    }
    fmt::print("\nanchors (shared/bench-anchors.md, QMP commands/s over 50 machines, -machine "
               "pc): the Python seed\n  (qemu.qmp, one at a time) {:.0f}/s; libvirt (8 "
               "threads, qemuMonitorCommand) {:.0f}/s\n",
               seed_sequential, libvirt_concurrent);
    for (const auto& r : rows) {
        fmt::print("  REST at concurrency {:>2}: {:.2f}x the seed's, {:.2f}x libvirt's\n",
                   r.concurrency, r.rest.rps50() / seed_sequential,
                   r.rest.rps50() / libvirt_concurrent);
    }

    std::string rows_json;
    auto side_json = [](const Figures& f) {
        return fmt::format(R"({{"p50_us":{:.1f},"p99_us":{:.1f},"rps":{:.0f},"cpu_us_per_req":)"
                           R"({{"qemu":{:.1f},"daemon":{:.1f},"clients":{:.1f}}}}})",
                           f.p50(), f.p99(), f.rps50(), percentile(f.qemu_us, 50),
                           percentile(f.daemon_us, 50), percentile(f.self_us, 50));
    };
    for (const auto& r : rows) {
        rows_json += fmt::format(
            R"({}{{"concurrency":{},"rest":{},"floor":{},)"
            R"("overhead_p50_us":{:.1f},"throughput_ratio":{:.3f},"pass":{}}})",
            rows_json.empty() ? "" : ",", r.concurrency, side_json(r.rest), side_json(r.floor),
            r.overhead_us(), r.ratio(), r.overhead_pass() && r.ratio_pass());
    }
    fmt::print("\nJSON "
               R"({{"bench":"rest-bench","qemu":{},"machines":{},"trials":{},"seconds":{},)"
               R"("targets":{{"overhead_p50_us":{:.0f},"throughput_ratio":{:.2f}}},)"
               R"("rows":[{}],"pass":{}}})"
               "\n",
               qm::json::quote(qemu_version), machines, args.trials, args.seconds,
               overhead_target_us, throughput_target, rows_json, all_pass);
    fmt::print("\nverdicts:");
    for (const auto& r : rows) {
        fmt::print(" concurrency {}: overhead {}, throughput {};", r.concurrency,
                   verdict(r.overhead_pass()), verdict(r.ratio_pass()));
    }
    fmt::print("\n");
    std::fflush(stdout);

    // Teardown: the floor's QEMUs quit over QMP; the daemon gets SIGTERM and stops its
    // machines.
    const std::size_t floor_failed = qm::bench::quit_all(*floors);
    qm::bench::teardown(daemon, env.dir, machines, floor_failed, started);
    return 0;
}

} // namespace

int main(int argc, char** argv)
{
    qm::bench::install_signal_handlers();
    Args args;
    using qm::bench::int_option;
    const std::vector<qm::bench::Option> options{
        int_option("--machines", args.machines, 1),
        int_option("--seconds", args.seconds, 1),
        int_option("--trials", args.trials, 1),
        {"--concurrency",
         [&](std::string_view v) {
             args.concurrency = parse_list("--concurrency", v);
         }},
    };
    return qm::bench::bench_main("rest-bench", argc, argv, options, usage, [&] {
        for (const int c : args.concurrency) {
            if (c > args.machines) {
                throw std::invalid_argument(fmt::format(
                    "concurrency {} is more than --machines {}: every client needs machines of "
                    "its own",
                    c, args.machines));
            }
        }
        return run(args);
    });
}
