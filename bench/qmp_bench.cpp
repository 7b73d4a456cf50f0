// SPDX-License-Identifier: GPL-2.0-or-later
// qmp-bench: qm::qmp::Client against the floor (blocking raw-socket QMP loops) on real
// `qemu-system-x86_64 -machine none` processes: sequential latency and pipelined throughput.
// Not a test: it prints figures (bench/README.md says what each one means).
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>

#include "bench/stats.hpp"
#include "libmachine/asio.hpp"
#include "libmachine/json.hpp"
#include "libmachine/qmp/client.hpp"
#include "tests/support/qemu_process.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using qm::bench::percentile;
using qm::test::QemuOptions;
using qm::test::QemuProcess;

struct Args
{
    int trials = 10;
    int commands = 128; // per trial, per side, per QEMU
    int qemus = 16;
    int depth = 64; // commands in flight per QEMU
};

// What one measurement sends: a command, as "execute" or "exec-oob", on a session negotiated
// with or without oob.
struct Variant
{
    std::string command;
    bool oob_session = false;
    bool exec_oob = false;

    std::string label() const
    {
        return fmt::format("{:<12} {:<8} oob {}", command, exec_oob ? "exec-oob" : "execute",
                           oob_session ? "on" : "off");
    }
};

[[noreturn]] void die(const std::string& what)
{
    throw std::runtime_error(what);
}

double elapsed_us(Clock::time_point from, Clock::time_point to)
{
    return std::chrono::duration<double, std::micro>(to - from).count();
}

// Runs `aw` on `ioc` to completion. The clients' readers keep the loop busy forever, so the
// completion handler stops the loop rather than waiting for it to run out of work.
template <typename T>
T run_to_end(qm::asio::io_context& ioc, qm::awaitable<T> aw)
{
    std::optional<T> result;
    std::exception_ptr error;
    qm::asio::co_spawn(ioc, std::move(aw), [&](const std::exception_ptr& e, T value) {
        error = e;
        if (!e) {
            result.emplace(std::move(value));
        }
        ioc.stop();
    });
    ioc.restart();
    ioc.run();
    if (error) {
        std::rethrow_exception(error);
    }
    if (!result) {
        die("the loop stopped before the benchmark coroutine finished");
    }
    return std::move(*result);
}

//---- the floor: blocking raw-socket QMP ---------------------------------------------------------

// One monitor connection used with plain ::write/::read: what any QMP client must at least pay.
class RawMonitor
{
public:
    explicit RawMonitor(int fd)
        : fd_(fd)
    {}
    RawMonitor(RawMonitor&& o) noexcept
        : fd_(std::exchange(o.fd_, -1))
        , buf_(std::move(o.buf_))
    {}
    RawMonitor& operator=(RawMonitor&&) = delete;
    RawMonitor(const RawMonitor&) = delete;
    RawMonitor& operator=(const RawMonitor&) = delete;
    ~RawMonitor()
    {
        if (fd_ >= 0) {
            ::close(fd_);
        }
    }

    int fd() const { return fd_; }

    // Reads the greeting and negotiates, as the client does (qmp-spec 2.2, 2.3).
    void negotiate(bool oob)
    {
        const std::string greeting = read_line();
        if (greeting.find("\"QMP\"") == std::string::npos) {
            die("raw: expected the greeting, got " + greeting);
        }
        write_all(oob ? R"({"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":0})"
                        "\n"
                      : R"({"execute":"qmp_capabilities","id":0})"
                        "\n");
        const std::string reply = read_reply();
        if (reply.find("\"return\"") == std::string::npos) {
            die("raw: qmp_capabilities failed: " + reply);
        }
    }

    void write_all(std::string_view text) const
    {
        while (!text.empty()) {
            const ssize_t n = ::write(fd_, text.data(), text.size());
            if (n < 0) {
                if (errno == EINTR) {
                    continue;
                }
                die(fmt::format("raw: write: {}", std::strerror(errno)));
            }
            text.remove_prefix(static_cast<std::size_t>(n));
        }
    }

    // One line (without "\r\n"), reading as needed (blocking).
    std::string read_line()
    {
        for (;;) {
            if (auto nl = buf_.find('\n', scan_); nl != std::string::npos) {
                std::string line = buf_.substr(0, nl);
                buf_.erase(0, nl + 1);
                scan_ = 0;
                if (!line.empty() && line.back() == '\r') {
                    line.pop_back();
                }
                return line;
            }
            scan_ = buf_.size();
            fill();
        }
    }

    // The next reply (events skipped).
    std::string read_reply()
    {
        for (;;) {
            std::string line = read_line();
            if (!is_event(line)) {
                return line;
            }
        }
    }

    // Reads what is there (one read) and returns how many complete replies it finished.
    // `errors` counts error replies among them.
    int read_available(int& errors)
    {
        fill();
        int replies = 0;
        std::size_t start = 0;
        for (std::size_t nl = buf_.find('\n', scan_); nl != std::string::npos;
             nl = buf_.find('\n', start)) {
            const std::string_view line(buf_.data() + start, nl - start);
            if (!is_event(line)) {
                ++replies;
                errors += is_error(line) ? 1 : 0;
            }
            start = nl + 1;
        }
        buf_.erase(0, start);
        scan_ = buf_.size();
        return replies;
    }

    static bool is_event(std::string_view line) { return line.find("\"event\"") != line.npos; }
    static bool is_error(std::string_view line) { return line.find("\"error\"") != line.npos; }

private:
    void fill()
    {
        char chunk[65536];
        for (;;) {
            const ssize_t n = ::read(fd_, chunk, sizeof(chunk));
            if (n > 0) {
                buf_.append(chunk, static_cast<std::size_t>(n));
                return;
            }
            if (n < 0 && errno == EINTR) {
                continue;
            }
            die(n == 0 ? std::string("raw: QEMU closed the monitor")
                       : fmt::format("raw: read: {}", std::strerror(errno)));
        }
    }

    int fd_ = -1;
    std::string buf_;
    std::size_t scan_ = 0;
};

std::string raw_command(const Variant& v, std::uint64_t id)
{
    return fmt::format(R"({{"{}":"{}","id":{}}})"
                       "\n",
                       v.exec_oob ? "exec-oob" : "execute", v.command, id);
}

// Sequential round trips: write one command, read until its reply.
std::vector<double> floor_sequential(RawMonitor& m, const Variant& v, int n, std::uint64_t& id)
{
    std::vector<double> out;
    out.reserve(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
        const std::string text = raw_command(v, ++id);
        const auto t0 = Clock::now();
        m.write_all(text);
        const std::string reply = m.read_reply();
        out.push_back(elapsed_us(t0, Clock::now()));
        if (RawMonitor::is_error(reply)) {
            die("raw: " + v.command + " failed: " + reply);
        }
    }
    return out;
}

// One pipelined batch: `depth` commands written to every monitor in one write each, then every
// reply read (a blocking read on one monitor, poll() across several). Returns its duration.
double floor_batch(std::vector<RawMonitor*>& monitors, const Variant& v, int depth,
                   std::uint64_t& id)
{
    std::vector<std::string> texts;
    texts.reserve(monitors.size());
    for (std::size_t i = 0; i < monitors.size(); ++i) {
        std::string batch;
        for (int k = 0; k < depth; ++k) {
            batch += raw_command(v, ++id);
        }
        texts.push_back(std::move(batch));
    }
    int errors = 0;
    const auto t0 = Clock::now();
    for (std::size_t i = 0; i < monitors.size(); ++i) {
        monitors[i]->write_all(texts[i]);
    }
    if (monitors.size() == 1) {
        for (int got = 0; got < depth;) {
            got += monitors[0]->read_available(errors);
        }
    } else {
        std::vector<pollfd> fds;
        fds.reserve(monitors.size());
        std::vector<int> left(monitors.size(), depth);
        for (auto* m : monitors) {
            fds.push_back({m->fd(), POLLIN, 0});
        }
        std::size_t open = monitors.size();
        while (open > 0) {
            if (::poll(fds.data(), fds.size(), -1) < 0) {
                if (errno == EINTR) {
                    continue;
                }
                die(fmt::format("raw: poll: {}", std::strerror(errno)));
            }
            for (std::size_t i = 0; i < fds.size(); ++i) {
                if (fds[i].revents == 0) {
                    continue;
                }
                left[i] -= monitors[i]->read_available(errors);
                if (left[i] <= 0) {
                    fds[i].fd = -1; // poll() ignores it from now on
                    --open;
                }
            }
        }
    }
    const double us = elapsed_us(t0, Clock::now());
    if (errors > 0) {
        die(fmt::format("raw: {} of the pipelined {} failed", errors, v.command));
    }
    return us;
}

//---- the client ---------------------------------------------------------------------------------

qm::qmp::CallOptions call_options(const Variant& v)
{
    qm::qmp::CallOptions o;
    o.oob = v.exec_oob;
    return o;
}

qm::awaitable<std::vector<double>> client_sequential(std::shared_ptr<qm::qmp::Client> c, Variant v,
                                                     int n)
{
    std::vector<double> out;
    out.reserve(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
        const auto t0 = Clock::now();
        auto r = co_await c->execute(v.command, qm::json::Document(), call_options(v));
        out.push_back(elapsed_us(t0, Clock::now()));
        if (!r) {
            die("client: " + r.error().message);
        }
    }
    co_return out;
}

// The completions of one pipelined batch.
struct Batch
{
    explicit Batch(const qm::asio::any_io_executor& ex)
        : done(ex)
    {}
    qm::asio::steady_timer done;
    std::size_t remaining = 0;
    Clock::time_point end;
    std::string error;
};

// One pipelined batch through the client: `depth` executes spawned per client, all in flight at
// once. Returns the time until the last reply.
qm::awaitable<double> client_batch(std::vector<std::shared_ptr<qm::qmp::Client>> clients, Variant v,
                                   int depth)
{
    auto ex = co_await qm::asio::this_coro::executor;
    auto batch = std::make_shared<Batch>(ex);
    batch->remaining = clients.size() * static_cast<std::size_t>(depth);
    const auto options = call_options(v);
    const auto t0 = Clock::now();
    for (auto& c : clients) {
        for (int k = 0; k < depth; ++k) {
            qm::asio::co_spawn(
                ex, c->execute(v.command, qm::json::Document(), options),
                [batch](const std::exception_ptr& e, qm::expected<qm::json::Document> r) {
                    if (e) {
                        batch->error = "client: execute threw";
                    } else if (!r) {
                        batch->error = "client: " + r.error().message;
                    }
                    if (--batch->remaining == 0) {
                        batch->end = Clock::now();
                        batch->done.cancel();
                    }
                });
        }
    }
    // Nothing completes before this wait starts: the replies need the loop, which we hold.
    batch->done.expires_at(Clock::time_point::max());
    qm::error_code ec;
    co_await batch->done.async_wait(qm::use_ec(ec));
    if (!batch->error.empty()) {
        die(batch->error);
    }
    co_return elapsed_us(t0, batch->end);
}

//---- sessions ----------------------------------------------------------------------------------

// One QEMU with a client on mon0 and the floor on mon1, both negotiated the same way.
struct Session
{
    std::shared_ptr<qm::qmp::Client> client;
    std::optional<RawMonitor> raw;
};

qm::awaitable<std::vector<Session>> open_sessions(std::vector<QemuProcess*> qemus, bool oob)
{
    std::vector<Session> out;
    for (auto* q : qemus) {
        qm::qmp::ClientOptions options;
        options.oob = oob;
        auto client = co_await q->attach(options, 0, 10s);
        if (!client) {
            die("cannot attach the client: " + client.error().message);
        }
        if ((*client)->oob_enabled() != oob) {
            die("oob was not negotiated as asked");
        }
        auto socket = co_await q->monitor_socket(1, 10s);
        if (!socket) {
            die("cannot connect the floor: " + socket.error().message);
        }
        // The floor owns a blocking duplicate; the Asio socket closes its own.
        const int fd = ::fcntl(socket->native_handle(), F_DUPFD_CLOEXEC, 0);
        if (fd < 0 || ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK) != 0) {
            die(fmt::format("cannot take the floor's socket: {}", std::strerror(errno)));
        }
        qm::error_code ignored;
        socket->close(ignored);
        Session s;
        s.client = std::move(*client);
        s.raw.emplace(fd);
        s.raw->negotiate(oob);
        out.push_back(std::move(s));
    }
    co_return out;
}

//---- calibration -------------------------------------------------------------------------------

// The machine's own floor: median of one-byte round trips between two processes over a unix
// socketpair. Every QMP round trip costs at least two such hand-offs (and QEMU's main loop adds
// more), so this says how slow process wake-ups are here.
double process_ping_pong_us(int n)
{
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
        die(fmt::format("socketpair: {}", std::strerror(errno)));
    }
    const pid_t child = ::fork();
    if (child < 0) {
        die(fmt::format("fork: {}", std::strerror(errno)));
    }
    char byte = 0;
    if (child == 0) {
        ::close(sv[0]);
        while (::read(sv[1], &byte, 1) == 1 && ::write(sv[1], &byte, 1) == 1) {
        }
        ::_exit(0);
    }
    ::close(sv[1]);
    std::vector<double> us;
    for (int i = 0; i < n; ++i) {
        const auto t0 = Clock::now();
        if (::write(sv[0], &byte, 1) != 1 || ::read(sv[0], &byte, 1) != 1) {
            break;
        }
        us.push_back(elapsed_us(t0, Clock::now()));
    }
    ::close(sv[0]); // the child reads EOF and exits
    int status = 0;
    ::waitpid(child, &status, 0);
    return percentile(std::move(us), 50);
}

//---- reporting ---------------------------------------------------------------------------------

struct Samples
{
    std::vector<double> client;
    std::vector<double> floor;
};

void print_sequential(const Variant& v, const Samples& s)
{
    const double c50 = percentile(s.client, 50);
    const double f50 = percentile(s.floor, 50);
    const double ratio = c50 / f50;
    fmt::print("  {:<34} {:>8.1f} {:>8.1f}   {:>8.1f} {:>8.1f}   {:>6.2f}x  {}\n", v.label(), c50,
               percentile(s.client, 99), f50, percentile(s.floor, 99), ratio,
               ratio <= 1.2 ? "ok (<= 1.20x)" : "MISSED (> 1.20x)");
    std::fflush(stdout);
}

void print_pipelined(const Variant& v, std::size_t qemus, int depth, const Samples& s)
{
    const double cmds = static_cast<double>(qemus) * depth;
    const double c50 = percentile(s.client, 50);
    const double f50 = percentile(s.floor, 50);
    // Throughput from batch times: the p99 batch time is the 1% slowest, i.e. the low throughput.
    const double ratio = f50 / c50;
    fmt::print("  {:<34} {:>3}  {:>8.0f} {:>8.0f}   {:>8.0f} {:>8.0f}   {:>7.1f} {:>7.1f}   "
               "{:>5.2f}x  {}\n",
               v.label(), qemus, c50, percentile(s.client, 99), f50, percentile(s.floor, 99),
               cmds / c50 * 1e3, cmds / f50 * 1e3, ratio,
               ratio >= 0.9 ? "ok (>= 0.90x)" : "MISSED (< 0.90x)");
    std::fflush(stdout);
}

//---- main --------------------------------------------------------------------------------------

int parse_int(std::string_view flag, const char* text, int min)
{
    int v = 0;
    const std::string_view s(text);
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc{} || end != s.data() + s.size() || v < min) {
        throw std::invalid_argument(
            fmt::format("{} wants an integer >= {}, not '{}'", flag, min, s));
    }
    return v;
}

void usage()
{
    fmt::print("usage: qmp-bench [--trials N] [--commands N] [--qemus N] [--depth N]\n"
               "  --trials N    interleaved trials per figure (default 10, at least 2)\n"
               "  --commands N  commands per trial, per side and per QEMU (default 128)\n"
               "  --qemus N     QEMUs for the many-QEMU pipelined figures (default 16)\n"
               "  --depth N     commands in flight per QEMU when pipelining (default 64)\n"
               "QM_QEMU names the QEMU binary (default qemu-system-x86_64 in PATH).\n");
}

// Asks every QEMU to quit through a fresh client on mon0; returns how many accepted.
qm::awaitable<int> quit_all(std::vector<QemuProcess*> qemus)
{
    int asked = 0;
    for (auto* q : qemus) {
        auto c = co_await q->attach(qm::qmp::ClientOptions(), 0, 5s);
        if (c) {
            auto r = co_await (*c)->execute("quit");
            asked += r ? 1 : 0;
            (*c)->close();
        }
    }
    co_return asked;
}

struct Bench
{
    Args args;
    qm::asio::io_context ioc{1};
    std::vector<std::unique_ptr<QemuProcess>> qemus;
    std::uint64_t raw_id = 0;

    void run_phase(bool oob, const std::vector<Variant>& variants)
    {
        std::vector<QemuProcess*> ptrs;
        for (auto& q : qemus) {
            ptrs.push_back(q.get());
        }
        auto sessions = run_to_end(ioc, open_sessions(ptrs, oob));
        const int batches = std::max(1, args.commands / args.depth);

        for (const auto& v : variants) {
            // Warm-up, not recorded: both sides, every QEMU.
            for (auto& s : sessions) {
                run_to_end(ioc, client_sequential(s.client, v, 16));
                floor_sequential(*s.raw, v, 16, raw_id);
            }

            // (a) sequential round trips on one QEMU.
            Samples seq;
            for (int t = 0; t < args.trials; ++t) {
                auto client = [&] {
                    auto us =
                        run_to_end(ioc, client_sequential(sessions[0].client, v, args.commands));
                    seq.client.insert(seq.client.end(), us.begin(), us.end());
                };
                auto floor = [&] {
                    auto us = floor_sequential(*sessions[0].raw, v, args.commands, raw_id);
                    seq.floor.insert(seq.floor.end(), us.begin(), us.end());
                };
                // Interleaved: the side that goes first alternates from trial to trial.
                if (t % 2 == 0) {
                    client();
                    floor();
                } else {
                    floor();
                    client();
                }
            }
            sequential_rows.emplace_back(v, std::move(seq));

            // (b) pipelined, on one QEMU and on all of them.
            std::vector<std::size_t> counts{1};
            if (sessions.size() > 1) {
                counts.push_back(sessions.size());
            }
            for (const std::size_t n : counts) {
                std::vector<std::shared_ptr<qm::qmp::Client>> clients;
                std::vector<RawMonitor*> raws;
                for (std::size_t i = 0; i < n; ++i) {
                    clients.push_back(sessions[i].client);
                    raws.push_back(&*sessions[i].raw);
                }
                run_to_end(ioc, client_batch(clients, v, args.depth));
                floor_batch(raws, v, args.depth, raw_id);
                Samples pipe;
                for (int t = 0; t < args.trials; ++t) {
                    auto client = [&] {
                        for (int b = 0; b < batches; ++b) {
                            pipe.client.push_back(
                                run_to_end(ioc, client_batch(clients, v, args.depth)));
                        }
                    };
                    auto floor = [&] {
                        for (int b = 0; b < batches; ++b) {
                            pipe.floor.push_back(floor_batch(raws, v, args.depth, raw_id));
                        }
                    };
                    if (t % 2 == 0) {
                        client();
                        floor();
                    } else {
                        floor();
                        client();
                    }
                }
                pipelined_rows.push_back({v, n, std::move(pipe)});
            }
        }
        for (auto& s : sessions) {
            s.client->close();
            s.raw.reset();
        }
        ioc.restart();
        ioc.poll();
    }

    struct PipelinedRow
    {
        Variant variant;
        std::size_t qemus;
        Samples samples;
    };
    std::vector<std::pair<Variant, Samples>> sequential_rows;
    std::vector<PipelinedRow> pipelined_rows;

    // Quits every QEMU through QMP, then reaps it; the destructors kill what is left.
    int shut_down()
    {
        std::vector<QemuProcess*> ptrs;
        for (auto& q : qemus) {
            ptrs.push_back(q.get());
        }
        run_to_end(ioc, quit_all(ptrs));
        int clean = 0;
        for (auto& q : qemus) {
            if (q->wait_exit(10s) && q->exit_code() == 0) {
                ++clean;
            }
        }
        qemus.clear();
        return clean;
    }
};

std::string first_line(const std::string& s)
{
    return s.substr(0, s.find('\n'));
}

} // namespace

int main(int argc, char** argv)
{
    Bench bench;
    try {
        for (int i = 1; i < argc; ++i) {
            const std::string_view a(argv[i]);
            if (a == "--help" || a == "-h") {
                usage();
                return 0;
            }
            if (i + 1 >= argc) {
                throw std::invalid_argument(fmt::format("unknown or incomplete option '{}'", a));
            }
            if (a == "--trials") {
                bench.args.trials = parse_int(a, argv[++i], 2);
            } else if (a == "--commands") {
                bench.args.commands = parse_int(a, argv[++i], 1);
            } else if (a == "--qemus") {
                bench.args.qemus = parse_int(a, argv[++i], 1);
            } else if (a == "--depth") {
                bench.args.depth = parse_int(a, argv[++i], 1);
            } else {
                throw std::invalid_argument(fmt::format("unknown option '{}'", a));
            }
        }
    } catch (const std::exception& e) {
        fmt::print(stderr, "qmp-bench: {}\n", e.what());
        usage();
        return 2;
    }
    if (auto why = QemuProcess::unavailable_reason()) {
        fmt::print(stderr, "qmp-bench: cannot run: {}\n", *why);
        return 2;
    }

    const Args& args = bench.args;
    const auto started = Clock::now();
    try {
        const double ping_pong = process_ping_pong_us(2000);
        // All QEMUs start at once; each serves two monitors: mon0 for the client, mon1 for the
        // floor.
        for (int i = 0; i < args.qemus; ++i) {
            QemuOptions o;
            o.monitor = QemuOptions::Monitor::qemu_listens;
            o.monitors = 2;
            auto q = QemuProcess::start(bench.ioc, o);
            if (!q) {
                die("cannot start QEMU: " + q.error().message);
            }
            bench.qemus.push_back(std::move(*q));
        }
        std::vector<QemuProcess*> first{bench.qemus[0].get()};
        auto probe = run_to_end(bench.ioc, open_sessions(first, false));
        const auto& g = *probe[0].client->greeting();
        fmt::print("qmp-bench: QEMU {} ({}) -machine none, {} CPUs; {} trials, {} commands per "
                   "trial, side and QEMU, {} in flight per QEMU, {} QEMUs\n",
                   g.version(), g.package, std::thread::hardware_concurrency(), args.trials,
                   args.commands, args.depth, args.qemus);
        probe[0].client->close();
        probe.clear();
        fmt::print("machine floor: a 1-byte round trip between two processes over a unix "
                   "socketpair takes {:.1f} us (p50)\n",
                   ping_pong);
        fmt::print("client = qm::qmp::Client on an io_context; floor = blocking ::write/::read on "
                   "a second monitor of the same QEMU. Trials interleave client and floor.\n\n");

        const std::vector<Variant> in_band{{"query-status", false, false},
                                           {"query-yank", false, false}};
        const std::vector<Variant> with_oob{{"query-status", true, false},
                                            {"query-yank", true, true}};
        bench.run_phase(false, in_band);
        bench.run_phase(true, with_oob);

        fmt::print("(a) sequential round trips, 1 QEMU: latency per command in us "
                   "(samples = trials x commands)\n");
        fmt::print("  {:<34} {:>8} {:>8}   {:>8} {:>8}   {:>7}  {}\n", "variant", "client50",
                   "client99", "floor50", "floor99", "c/f p50", "target");
        for (const auto& [v, s] : bench.sequential_rows) {
            print_sequential(v, s);
        }
        fmt::print("\n(b) pipelined, {} in flight per QEMU: time per batch in us (samples = trials "
                   "x {} batches), throughput at p50 in kcmd/s\n",
                   args.depth, std::max(1, args.commands / args.depth));
        fmt::print("  {:<34} {:>3}  {:>8} {:>8}   {:>8} {:>8}   {:>7} {:>7}   {:>6}  {}\n",
                   "variant", "vms", "client50", "client99", "floor50", "floor99", "c kcmd",
                   "f kcmd", "c/f", "target (throughput)");
        for (const auto& row : bench.pipelined_rows) {
            print_pipelined(row.variant, row.qemus, args.depth, row.samples);
        }

        // What oob does to in-band pipelining, and what exec-oob buys.
        auto p50 = [&](const std::string& cmd, bool oob_session, bool exec_oob, std::size_t n,
                       bool client) -> double {
            for (const auto& r : bench.pipelined_rows) {
                if (r.variant.command == cmd && r.variant.oob_session == oob_session &&
                    r.variant.exec_oob == exec_oob && r.qemus == n) {
                    return percentile(client ? r.samples.client : r.samples.floor, 50);
                }
            }
            return NAN;
        };
        fmt::print("\n(c) pipelined throughput gained by oob, 1 QEMU (p50 batch time off / on):\n");
        for (const bool client : {true, false}) {
            fmt::print("  {:<6} query-status execute, oob on vs off: {:.2f}x;  query-yank exec-oob "
                       "(oob on) vs execute (oob off): {:.2f}x\n",
                       client ? "client" : "floor",
                       p50("query-status", false, false, 1, client) /
                           p50("query-status", true, false, 1, client),
                       p50("query-yank", false, false, 1, client) /
                           p50("query-yank", true, true, 1, client));
        }
        const int clean = bench.shut_down();
        fmt::print("\ncleanup: {} of {} QEMUs quit with status 0; total {:.1f} s\n", clean,
                   args.qemus, std::chrono::duration<double>(Clock::now() - started).count());
        return clean == args.qemus ? 0 : 1;
    } catch (const std::exception& e) {
        fmt::print(stderr, "qmp-bench: {}\n", e.what());
        for (auto& q : bench.qemus) {
            if (q->running()) {
                fmt::print(stderr, "  QEMU {} log: {}\n", q->pid(), first_line(q->log()));
            }
        }
        return 1;
    }
}
