// SPDX-License-Identifier: GPL-2.0-or-later
// dbus-bench: QMP passthrough through the real qmachined's D-Bus front end
// (`org.qmachined1.Machine.Execute("query-status", "")` on a private dbus-daemon) against direct
// QMP to bare QEMUs (the floor), with 1 and 16 concurrent callers, in the same run. Not a test: it
// prints figures (bench/README.md).
#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
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
#include <systemd/sd-bus.h>

#include "bench/daemon.hpp" // includes libmachine/asio.hpp first (trap 1)
#include "bench/floor.hpp"
#include "bench/stats.hpp"
#include "libmachine/json.hpp"
#include "libmachine/proc/spawn.hpp"
#include "tests/support/loop.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;
namespace http = qm::rest::http;
using qm::bench::BareQemu;
using qm::bench::BareQemus;
using qm::bench::command_line;
using qm::bench::Daemon;
using qm::bench::die;
using qm::bench::elapsed_ms;
using qm::bench::errno_text;
using qm::bench::parse_list;
using qm::bench::percentile;
using qm::bench::processes_sched;
using qm::bench::qmachined_binary;
using qm::bench::range_of;
using qm::bench::Sched;
using qm::bench::verdict;

// The issue's targets: p50 at most the floor's + 300 µs (every concurrency), and at most 0.5 ms
// absolute where its anchor applies, one call at a time.
constexpr double overhead_target_us = 300;
constexpr double absolute_target_us = 500;
// shared/bench-anchors.md, `-machine pc`, 50 domains: libvirt's QMP passthrough
// (python3-libvirt's qemuMonitorCommand) one call at a time, p50 / p99 and calls/s; with 8
// threads on one connection, calls/s and p50 / p99.
constexpr double libvirt_seq_p50_us = 1071;
constexpr double libvirt_seq_p99_us = 1979;
constexpr double libvirt_seq_rate = 905;
constexpr double libvirt_conc_rate = 2134;
constexpr double libvirt_conc_p50_us = 3525;
// Each window starts with this much load that is not recorded: caches warm, every caller's
// credentials looked up once by the daemon.
constexpr auto window_warm_up = 300ms;
// Before the trials of each concurrency, one window per side that is not recorded at all.
constexpr auto concurrency_warm_up = 500ms;
// A call that takes this long means a hang (the daemon's own QMP timeout is 10 s).
constexpr std::uint64_t call_timeout_us = 20'000'000;

constexpr const char* bus_name = "org.qmachined1";
constexpr const char* machine_prefix = "/org/qmachined1/machine";
constexpr const char* machine_interface = "org.qmachined1.Machine";
constexpr const char* command = "query-status";
constexpr std::string_view qmp_line = "{\"execute\":\"query-status\"}\n";

enum class Connections { one, each, both };

struct Args
{
    int machines = 16;
    int seconds = 2;
    int trials = 3;
    std::vector<int> concurrency{1, 16};
    Connections connections = Connections::both;
};

std::string machine_name(std::size_t i)
{
    return fmt::format("m{:02}", i);
}

//---- a private dbus-daemon ---------------------------------------------------------------------

// dbus-daemon on a bus of its own (`dir`/bus), as tests/dbus/dbus_fixture.hpp starts it: a
// session-type configuration, EXTERNAL authentication, a policy that allows everything (the
// daemon's own credential check decides; the bench runs as root; a configuration of our own
// starts from no rule at all, and without the receive rule even the bus's answer to Hello is
// withheld), forked by spawn_child (SIGTERM
// should we die). It is ready when it has printed its address (--print-address to a pipe: no
// polling); its output goes to `dir`/dbus-daemon.log. The destructor stops one still running.
class BusDaemon
{
public:
    explicit BusDaemon(const fs::path& dir)
        : socket_path_((dir / "bus").string())
        , log_path_((dir / "dbus-daemon.log").string())
        , address_("unix:path=" + socket_path_)
    {
        const fs::path config = dir / "bus.conf";
        std::ofstream(config) << fmt::format(
            R"(<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>{}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
)",
            address_);
        std::array<int, 2> pipe{};
        if (::pipe2(pipe.data(), O_CLOEXEC) != 0) {
            die(errno_text("pipe2"));
        }
        const std::string binary = qm::bench::find_in_path("dbus-daemon");
        t0_ = Clock::now();
        pid_ = qm::bench::spawn_child(
            {binary, "--config-file=" + config.string(), "--nofork", "--print-address=3"},
            log_path_, SIGTERM, pipe[1], 3);
        ::close(pipe[1]);
        std::string printed;
        const auto end = Clock::now() + 10s;
        while (printed.find('\n') == std::string::npos) {
            qm::bench::check_interrupted();
            const auto left =
                std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now());
            pollfd p{pipe[0], POLLIN, 0};
            if (left.count() <= 0 || (::poll(&p, 1, static_cast<int>(left.count())) == 0)) {
                ::close(pipe[0]);
                die("dbus-daemon did not print its address within 10 s:\n" + log());
            }
            std::array<char, 512> buf{};
            const ssize_t n = ::read(pipe[0], buf.data(), buf.size());
            if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) {
                ::close(pipe[0]);
                die("dbus-daemon exited during start-up:\n" + log());
            }
            if (n > 0) {
                printed.append(buf.data(), static_cast<std::size_t>(n));
            }
        }
        ::close(pipe[0]);
        ready_ms_ = elapsed_ms(t0_, Clock::now());
        if (!printed.starts_with(address_)) {
            die(fmt::format("dbus-daemon listens on '{}', not '{}'", printed, address_));
        }
    }
    BusDaemon(const BusDaemon&) = delete;
    BusDaemon& operator=(const BusDaemon&) = delete;
    ~BusDaemon()
    {
        if (pid_ > 0) {
            try {
                stop();
            } catch (const std::exception& e) {
                fmt::print(stderr, "stopping dbus-daemon: {}\n", e.what());
            }
        }
    }

    // SIGTERM, then until it has exited (SIGKILL after 10 s); dies unless it exited with status
    // 0 and removed its socket. Returns the time in ms.
    double stop()
    {
        const auto t0 = Clock::now();
        ::kill(pid_, SIGTERM);
        int status = 0;
        for (;;) {
            const pid_t r = ::waitpid(pid_, &status, WNOHANG);
            if (r == pid_ || (r < 0 && errno != EINTR)) {
                break;
            }
            if (Clock::now() - t0 > 10s) {
                ::kill(pid_, SIGKILL);
                ::waitpid(pid_, &status, 0);
                pid_ = -1;
                die("dbus-daemon did not exit within 10 s of SIGTERM (killed):\n" + log());
            }
            // A child we have no other signal from: short naps, bounded by the deadline.
            std::this_thread::sleep_for(1ms);
        }
        pid_ = -1;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            die("dbus-daemon did not exit with status 0 after SIGTERM:\n" + log());
        }
        if (fs::exists(fs::symlink_status(socket_path_))) {
            die("dbus-daemon left its socket " + socket_path_);
        }
        return elapsed_ms(t0, Clock::now());
    }

    std::string log() const
    {
        const std::string all = qm::bench::read_file(log_path_);
        return all.size() > 4000 ? all.substr(all.size() - 4000) : all;
    }

    pid_t pid() const noexcept { return pid_; }
    const std::string& address() const noexcept { return address_; }
    double ready_ms() const noexcept { return ready_ms_; }

private:
    std::string socket_path_;
    std::string log_path_;
    std::string address_;
    pid_t pid_ = -1;
    Clock::time_point t0_{};
    double ready_ms_ = 0;
};

// A client connection to the bus at `address` (Hello done).
sd_bus* open_client(const std::string& address)
{
    sd_bus* b = nullptr;
    int r = sd_bus_new(&b);
    if (r >= 0) {
        r = sd_bus_set_address(b, address.c_str());
    }
    if (r >= 0) {
        r = sd_bus_set_bus_client(b, 1);
    }
    if (r >= 0) {
        r = sd_bus_start(b);
    }
    if (r < 0) {
        sd_bus_unref(b);
        die(fmt::format("cannot connect to {}: {}", address, std::strerror(-r)));
    }
    return b;
}

// The client connections of a run, closed at the end (flushed: nothing is left to send).
struct Clients
{
    Clients() = default;
    Clients(const Clients&) = delete;
    Clients& operator=(const Clients&) = delete;
    ~Clients()
    {
        for (sd_bus* b : all) {
            sd_bus_flush_close_unref(b);
        }
    }
    std::vector<sd_bus*> all; // [0] is the shared one
};

int on_name_owner_changed(sd_bus_message* /*m*/, void* userdata, sd_bus_error* /*error*/)
{
    *static_cast<bool*>(userdata) = true;
    return 0;
}

// Until qmachined owns org.qmachined1 on `bus` (it asks for the name once it is ready): the
// NameOwnerChanged signal is subscribed to before NameHasOwner is asked, so it cannot be missed.
// Returns the time it took, in ms.
double wait_for_name(sd_bus* bus, const Daemon& daemon)
{
    const auto t0 = Clock::now();
    bool owned = false;
    sd_bus_slot* slot = nullptr;
    int r = sd_bus_add_match(bus, &slot,
                             "type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/"
                             "DBus',interface='org.freedesktop.DBus',member='NameOwnerChanged',"
                             "arg0='org.qmachined1'",
                             on_name_owner_changed, &owned);
    if (r < 0) {
        die(fmt::format("AddMatch: {}", std::strerror(-r)));
    }
    sd_bus_error error{};
    sd_bus_message* reply = nullptr;
    r = sd_bus_call_method(bus, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                           "org.freedesktop.DBus", "NameHasOwner", &error, &reply, "s", bus_name);
    int has = 0;
    if (r >= 0) {
        r = sd_bus_message_read(reply, "b", &has);
    }
    sd_bus_message_unref(reply);
    sd_bus_error_free(&error);
    if (r < 0) {
        sd_bus_slot_unref(slot);
        die(fmt::format("NameHasOwner: {}", std::strerror(-r)));
    }
    owned = owned || has != 0;
    const auto end = t0 + 30s;
    while (!owned) {
        qm::bench::check_interrupted();
        if (Clock::now() > end) {
            sd_bus_slot_unref(slot);
            die("qmachined did not own org.qmachined1 within 30 s:\n" + daemon.log_tail());
        }
        r = sd_bus_process(bus, nullptr);
        if (r < 0) {
            sd_bus_slot_unref(slot);
            die(fmt::format("the bus connection failed: {}", std::strerror(-r)));
        }
        if (r == 0) {
            sd_bus_wait(bus, 100'000); // woken by the signal; every 100 ms for ^C and the deadline
        }
    }
    sd_bus_slot_unref(slot);
    return elapsed_ms(t0, Clock::now());
}

//---- the load ----------------------------------------------------------------------------------

// One run of one side at one concurrency: C callers, each sending its next call when the previous
// answer arrived.
struct Window
{
    bool recording = false;
    bool stopping = false;
    int in_flight = 0;
    Clock::time_point begin{};
    Clock::time_point end{};
    std::vector<double> us; // latencies of the calls answered while recording
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

// A caller: the machines it takes in turn, and its call in flight.
struct Caller
{
    std::vector<std::size_t> mine;
    std::size_t turn = 0;
    Clock::time_point t0{};
    sd_bus* bus = nullptr; // D-Bus sides
    struct DbusIo* io = nullptr;

    std::size_t current() const { return mine[turn % mine.size()]; }
};

// Callers k of C take machines k, k + C, k + 2C, ...
std::vector<Caller> make_callers(std::size_t machines, std::size_t c)
{
    std::vector<Caller> callers(c);
    for (std::size_t k = 0; k < c; ++k) {
        for (std::size_t i = k; i < machines; i += c) {
            callers[k].mine.push_back(i);
        }
    }
    return callers;
}

timespec to_timespec(Clock::duration d)
{
    const auto ns =
        std::max<std::int64_t>(0, std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
    return timespec{static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
}

// The D-Bus side: Execute calls with sd_bus_call_method_async on one or several connections, all
// driven by one ppoll() loop on this thread (sd_bus_process until it has nothing left after each
// wake-up: the cheapest sd-bus client).
struct DbusIo
{
    Window* w = nullptr;
    const std::vector<std::string>* paths = nullptr; // machine i's object
    std::vector<sd_bus*> buses;                      // the connections this window uses
    std::vector<Caller> callers;

    static int on_reply(sd_bus_message* m, void* userdata, sd_bus_error* /*error*/)
    {
        const auto t1 = Clock::now();
        auto* c = static_cast<Caller*>(userdata);
        DbusIo& io = *c->io;
        --io.w->in_flight;
        if (const sd_bus_error* e = sd_bus_message_get_error(m); e != nullptr) {
            io.w->fail(fmt::format("Execute on {}: {}: {}", (*io.paths)[c->current()],
                                   e->name != nullptr ? e->name : "?",
                                   e->message != nullptr ? e->message : ""));
            return 0;
        }
        const char* text = nullptr;
        if (sd_bus_message_read(m, "s", &text) < 0 || text == nullptr ||
            std::string_view(text).find("\"status\":") == std::string_view::npos) {
            io.w->fail(fmt::format("Execute on {}: unexpected answer '{}'",
                                   (*io.paths)[c->current()], text != nullptr ? text : "?"));
            return 0;
        }
        io.w->record(c->t0, t1);
        ++c->turn;
        if (!io.w->stopping) {
            io.send(*c);
        }
        return 0;
    }

    void send(Caller& c)
    {
        c.t0 = Clock::now();
        sd_bus_message* m = nullptr;
        int r = sd_bus_message_new_method_call(c.bus, &m, bus_name, (*paths)[c.current()].c_str(),
                                               machine_interface, "Execute");
        if (r >= 0) {
            r = sd_bus_message_append(m, "ss", command, "");
        }
        if (r >= 0) {
            r = sd_bus_call_async(c.bus, nullptr, m, on_reply, &c, call_timeout_us);
        }
        sd_bus_message_unref(m);
        if (r < 0) {
            w->fail(fmt::format("Execute: cannot send: {}", std::strerror(-r)));
            return;
        }
        ++w->in_flight;
    }

    void start()
    {
        for (auto& c : callers) {
            send(c);
        }
    }

    // Waits until a connection has something to do or `wait` has passed, and does it.
    void step(Clock::duration wait)
    {
        std::array<pollfd, 64> fds{};
        auto deadline = Clock::now() + wait;
        for (std::size_t i = 0; i < buses.size(); ++i) {
            fds[i] =
                pollfd{sd_bus_get_fd(buses[i]), static_cast<short>(sd_bus_get_events(buses[i])), 0};
            std::uint64_t usec = 0;
            if (sd_bus_get_timeout(buses[i], &usec) >= 0 && usec != UINT64_MAX) {
                // CLOCK_MONOTONIC µs, steady_clock's clock on Linux.
                deadline = std::min(deadline, Clock::time_point(std::chrono::microseconds(usec)));
            }
        }
        const timespec ts = to_timespec(deadline - Clock::now());
        const int n = ::ppoll(fds.data(), buses.size(), &ts, nullptr);
        if (n < 0 && errno != EINTR) {
            die(errno_text("ppoll"));
        }
        for (std::size_t i = 0; i < buses.size(); ++i) {
            if (n > 0 && fds[i].revents == 0) {
                continue;
            }
            int r = 0;
            while ((r = sd_bus_process(buses[i], nullptr)) > 0) {
            }
            if (r < 0) {
                die(fmt::format("the bus connection failed: {}", std::strerror(-r)));
            }
        }
    }
};

// The floor: the same command as one line straight to each caller's QEMU monitor, its reply read
// to '\n' (events skipped, qmp-spec 2.5), driven by the same kind of ppoll() loop.
struct FloorIo
{
    Window* w = nullptr;
    BareQemus* qemus = nullptr;
    std::vector<Caller> callers;

    BareQemu& qemu_of(const Caller& c) { return *(*qemus)[c.current()]; }

    void send(Caller& c)
    {
        const int fd = qemu_of(c).socket->native_handle();
        c.t0 = Clock::now();
        const ssize_t n = ::send(fd, qmp_line.data(), qmp_line.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n != static_cast<ssize_t>(qmp_line.size())) {
            w->fail(n < 0 ? errno_text("floor: send") : std::string("floor: short send"));
            return;
        }
        ++w->in_flight;
    }

    void start()
    {
        for (auto& c : callers) {
            send(c);
        }
    }

    // A caller's QEMU had something to read: its reply completes the call.
    void readable(Caller& c)
    {
        BareQemu& q = qemu_of(c);
        std::array<char, 4096> buf{};
        const ssize_t n = ::recv(q.socket->native_handle(), buf.data(), buf.size(), MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            return;
        }
        if (n <= 0) {
            --w->in_flight;
            w->fail(n == 0 ? std::string("floor: QEMU closed its monitor")
                           : errno_text("floor: recv"));
            return;
        }
        q.in.append(buf.data(), static_cast<std::size_t>(n));
        for (auto nl = q.in.find('\n'); nl != std::string::npos; nl = q.in.find('\n')) {
            const std::string_view line(q.in.data(), nl + 1);
            if (line.find("\"event\"") != std::string_view::npos) {
                q.in.erase(0, nl + 1); // an event, not our reply
                continue;
            }
            const auto t1 = Clock::now();
            --w->in_flight;
            if (line.find("\"return\"") == std::string_view::npos) {
                w->fail("floor: " + std::string(line.substr(0, 300)));
                return;
            }
            q.in.erase(0, nl + 1);
            w->record(c.t0, t1);
            ++c.turn;
            if (!w->stopping) {
                send(c);
            }
            return;
        }
    }

    void step(Clock::duration wait)
    {
        std::array<pollfd, 64> fds{};
        for (std::size_t k = 0; k < callers.size(); ++k) {
            fds[k] = pollfd{qemu_of(callers[k]).socket->native_handle(), POLLIN, 0};
        }
        const timespec ts = to_timespec(wait);
        const int n = ::ppoll(fds.data(), callers.size(), &ts, nullptr);
        if (n < 0 && errno != EINTR) {
            die(errno_text("ppoll"));
        }
        for (std::size_t k = 0; k < callers.size() && n > 0; ++k) {
            if (fds[k].revents != 0) {
                readable(callers[k]);
            }
        }
    }
};

// CPU time over the recorded window (every thread, schedstat): the side's QEMUs, qmachined,
// dbus-daemon and this process (the callers' loop and nothing else busy).
struct CpuProbe
{
    std::vector<pid_t> qemus;
    pid_t daemon = -1;
    pid_t bus = -1;
    Sched qemu;
    Sched daemon_cpu;
    Sched bus_cpu;
    Sched self;

    void begin()
    {
        qemu = processes_sched(qemus);
        daemon_cpu = processes_sched({daemon});
        bus_cpu = processes_sched({bus});
        self = processes_sched({::getpid()});
    }
    void end()
    {
        qemu = processes_sched(qemus) - qemu;
        daemon_cpu = processes_sched({daemon}) - daemon_cpu;
        bus_cpu = processes_sched({bus}) - bus_cpu;
        self = processes_sched({::getpid()}) - self;
    }
};

// Runs `io`'s callers: `warm` of load, then `measure` recorded (nothing when it is 0), then
// until every call in flight is answered. The CPU readings (a few dozen small /proc reads) are
// taken between calls, outside what any latency covers but inside the loop.
template <typename Io>
void drive(Io& io, Window& w, CpuProbe& cpu, Clock::duration warm, Clock::duration measure,
           const std::string& what)
{
    const auto t0 = Clock::now();
    const auto record_at = t0 + warm;
    const auto limit = t0 + warm + measure + 30s;
    auto end_at = Clock::time_point::max();
    io.start();
    while (w.in_flight > 0) {
        const auto now = Clock::now();
        if (!w.stopping && !w.recording && now >= record_at) {
            if (measure == Clock::duration::zero()) {
                w.stopping = true;
            } else {
                cpu.begin();
                w.begin = Clock::now();
                end_at = w.begin + measure;
                w.recording = true;
            }
        } else if (w.recording && now >= end_at) {
            w.end = now;
            w.recording = false;
            w.stopping = true;
            cpu.end();
        }
        qm::bench::check_interrupted();
        if (now > limit) {
            die(what + ": the calls in flight were not answered within 30 s");
        }
        const auto next = w.stopping ? limit : (w.recording ? end_at : record_at);
        io.step(std::max(Clock::duration::zero(), next - Clock::now()));
    }
    if (!w.error.empty()) {
        die(what + ": " + w.error);
    }
}

enum class Side { dbus_one, dbus_each, floor };

const char* side_name(Side s)
{
    switch (s) {
    case Side::dbus_one:
        return "dbus-one";
    case Side::dbus_each:
        return "dbus-each";
    case Side::floor:
        return "floor";
    }
    return "?";
}

// One window's figures.
struct Run
{
    std::vector<double> us;
    double rate = 0;
    // CPU per call, µs: the side's QEMUs, qmachined, dbus-daemon, this process (the callers)
    double qemu_us = 0;
    double daemon_us = 0;
    double bus_us = 0;
    double self_us = 0;
    double daemon_wait_us = 0; // qmachined runnable but waiting for a CPU, per call
    double busy = 0;           // their CPU time / (window x CPUs)
    double qemu_runs = 0;      // times a thread of the side's QEMUs was put on a CPU, per call
};

// Everything the load needs.
struct Load
{
    const Daemon& daemon;
    const BusDaemon& bus;
    std::vector<std::string> paths; // machine i's object
    Clients clients;                // [0] shared by the callers of dbus-one; [k] caller k's
    BareQemus* floors = nullptr;    // floor QEMU i
    std::size_t machines = 0;
    std::vector<pid_t> dbus_qemus;  // the daemon's
    std::vector<pid_t> floor_qemus; // ours
};

Run run_window(Load& load, Side side, int concurrency, Clock::duration warm,
               Clock::duration measure)
{
    Window w;
    CpuProbe cpu;
    cpu.daemon = load.daemon.pid();
    cpu.bus = load.bus.pid();
    cpu.qemus = side == Side::floor ? load.floor_qemus : load.dbus_qemus;
    w.us.reserve(100000);
    const auto c = static_cast<std::size_t>(concurrency);
    const std::string what = fmt::format("{} at concurrency {}", side_name(side), concurrency);
    if (side == Side::floor) {
        FloorIo io;
        io.w = &w;
        io.qemus = load.floors;
        io.callers = make_callers(load.machines, c);
        drive(io, w, cpu, warm, measure, what);
    } else {
        DbusIo io;
        io.w = &w;
        io.paths = &load.paths;
        io.callers = make_callers(load.machines, c);
        for (std::size_t k = 0; k < c; ++k) {
            io.callers[k].io = &io;
            io.callers[k].bus = side == Side::dbus_one ? load.clients.all[0] : load.clients.all[k];
        }
        if (side == Side::dbus_one) {
            io.buses = {load.clients.all[0]};
        } else {
            io.buses.assign(load.clients.all.begin(),
                            load.clients.all.begin() + static_cast<std::ptrdiff_t>(c));
        }
        drive(io, w, cpu, warm, measure, what);
    }
    Run r;
    const double seconds = std::chrono::duration<double>(w.end - w.begin).count();
    const auto n = static_cast<double>(w.us.size());
    r.rate = seconds > 0 ? n / seconds : 0;
    if (n > 0) {
        r.qemu_us = static_cast<double>(cpu.qemu.ns) / 1e3 / n;
        r.daemon_us = static_cast<double>(cpu.daemon_cpu.ns) / 1e3 / n;
        r.bus_us = static_cast<double>(cpu.bus_cpu.ns) / 1e3 / n;
        r.self_us = static_cast<double>(cpu.self.ns) / 1e3 / n;
        r.daemon_wait_us = static_cast<double>(cpu.daemon_cpu.wait_ns) / 1e3 / n;
        r.qemu_runs = static_cast<double>(cpu.qemu.runs) / n;
    }
    if (seconds > 0) {
        r.busy =
            static_cast<double>(cpu.qemu.ns + cpu.daemon_cpu.ns + cpu.bus_cpu.ns + cpu.self.ns) /
            1e9 / seconds / std::thread::hardware_concurrency();
    }
    r.us = std::move(w.us);
    return r;
}

// All the windows of one side at one concurrency.
struct Figures
{
    Side side = Side::floor;
    std::vector<double> us; // pooled over trials
    std::vector<double> rate;
    std::vector<double> qemu_us;
    std::vector<double> daemon_us;
    std::vector<double> bus_us;
    std::vector<double> self_us;
    std::vector<double> daemon_wait_us;
    std::vector<double> busy;
    std::vector<double> qemu_runs;

    void add(Run r)
    {
        qemu_runs.push_back(r.qemu_runs);
        us.insert(us.end(), r.us.begin(), r.us.end());
        rate.push_back(r.rate);
        qemu_us.push_back(r.qemu_us);
        daemon_us.push_back(r.daemon_us);
        bus_us.push_back(r.bus_us);
        self_us.push_back(r.self_us);
        daemon_wait_us.push_back(r.daemon_wait_us);
        busy.push_back(r.busy);
    }
    double p50() const { return percentile(us, 50); }
    double p99() const { return percentile(us, 99); }
    double rate50() const { return percentile(rate, 50); }
};

struct Row
{
    int concurrency = 0;
    std::vector<Figures> sides; // the D-Bus sides, then the floor (last)

    const Figures& floor() const { return sides.back(); }
    double overhead_us(const Figures& f) const { return f.p50() - floor().p50(); }
    bool overhead_pass(const Figures& f) const { return overhead_us(f) <= overhead_target_us; }
    // The absolute target's anchor is one call at a time.
    bool absolute_applies() const { return concurrency == 1; }
    bool absolute_pass(const Figures& f) const
    {
        return !absolute_applies() || f.p50() <= absolute_target_us;
    }
};

//---- main --------------------------------------------------------------------------------------

void usage()
{
    fmt::print(
        "usage: dbus-bench [--machines N] [--seconds S] [--trials N] [--concurrency C,C,...]\n"
        "                  [--connections one|each|both]\n"
        "  --machines N        machines created and started through qmachined, and floor QEMUs "
        "(default 16)\n"
        "  --seconds S         recorded seconds per window: per side, concurrency and trial "
        "(default 2)\n"
        "  --trials N          interleaved trials per concurrency (default 3)\n"
        "  --concurrency LIST  concurrent callers, each at most --machines and 64 (default "
        "1,16)\n"
        "  --connections WHICH D-Bus callers on one shared connection, on a connection each, or "
        "both\n"
        "                      side by side (default both; at concurrency 1 they are the same)\n");
    fmt::print("{}", qm::bench::environment_usage);
}

// Runs every side of trial `t` in turn, the first one rotating from trial to trial, so that drift
// (CPU frequency, other load) hits every side alike.
void rotated(int t, const std::vector<std::function<void()>>& sides)
{
    for (std::size_t i = 0; i < sides.size(); ++i) {
        sides[(i + static_cast<std::size_t>(t)) % sides.size()]();
    }
}

int run(const Args& args)
{
    const auto started = Clock::now();
    qm::bench::raise_fd_limit();
    // A short directory: the bus and the daemon's machine sockets are inside it, and a unix
    // socket's path has at most 107 bytes.
    qm::bench::Env env(fs::temp_directory_path(), "db");
    const auto machines = static_cast<std::size_t>(args.machines);
    const int most = *std::max_element(args.concurrency.begin(), args.concurrency.end());

    BusDaemon bus(env.dir);
    Daemon daemon(qmachined_binary(), env.dir / "d");
    BareQemus floors;
    Load load{daemon, bus, {}, {}, &floors, machines, {}, {}};

    // The daemon on the bus, its machines, the floor's QEMUs, the callers' connections.
    daemon.start("stop-machines", "warn", {"--bus", bus.address()});
    const double ready_ms = daemon.wait_ready();
    load.clients.all.push_back(open_client(bus.address()));
    const double name_ms = wait_for_name(load.clients.all[0], daemon);
    const std::string spec = qm::bench::none_spec(env.qemu, false);
    auto setup = std::make_shared<qm::bench::Setup>();
    for (std::size_t i = 0; i < machines; ++i) {
        setup->names.push_back(machine_name(i));
        char* path = nullptr;
        if (sd_bus_path_encode(machine_prefix, setup->names.back().c_str(), &path) < 0) {
            die("sd_bus_path_encode");
        }
        load.paths.emplace_back(path);
        std::free(path);
    }
    const double setup_ms =
        qm::bench::create_and_start(env.ioc, daemon.socket_path(), spec, setup, machines);
    load.dbus_qemus = setup->pids;
    const std::vector<std::string> daemon_argv = command_line(setup->pids.front());
    const auto floor_argv = qm::bench::bare_template(daemon_argv, machine_name(0));
    std::vector<std::string> floor_names;
    for (std::size_t i = 0; i < machines; ++i) {
        floor_names.push_back(fmt::format("f{:02}", i));
    }
    const double floor_ms = qm::bench::spawn_bare_qemus(env.ioc, floor_argv, floor_names, floors);
    for (const auto& q : floors) {
        load.floor_qemus.push_back(q->pid);
    }
    const bool each = args.connections != Connections::one && most > 1;
    const bool one = args.connections != Connections::each || most == 1;
    if (each) {
        for (int k = 1; k < most; ++k) {
            load.clients.all.push_back(open_client(bus.address()));
        }
    }

    const auto version = qm::test::run_co(
        env.ioc, qm::bench::request(daemon.socket_path(), http::verb::get, "/v1/version", ""));
    const std::string qemu_version = version ? qm::bench::qemu_version_of(*version) : "?";
    fmt::print("dbus-bench: qmachined {}\n  QEMU {} -machine none, {} CPUs; {} machines, "
               "concurrency {}, {} trials x {} s per side and concurrency\n",
               qmachined_binary(), qemu_version, std::thread::hardware_concurrency(), machines,
               fmt::join(args.concurrency, ","), args.trials, args.seconds);
    fmt::print("temporary directory {} ({}); load average at start {}\n", env.dir.string(),
               qm::bench::fs_type(env.dir), qm::bench::load_average());
    fmt::print("set-up, not compared: dbus-daemon listening in {:.0f} ms; qmachined's REST socket "
               "in {:.0f} ms, org.qmachined1\nowned {:.0f} ms later; {} machines created and "
               "started over REST at once in {:.0f} ms; {} floor QEMUs\nlaunched and negotiated "
               "in {:.0f} ms\n",
               bus.ready_ms(), ready_ms, name_ms, machines, setup_ms, machines, floor_ms);
    fmt::print("command line (the floor's QEMUs differ only in -name, and talk QMP over a socket "
               "pair to this\nprocess as qmachined's do to it, without the served monitor):\n  "
               "{}\n",
               qm::proc::format_command_line(daemon_argv));
    fmt::print(
        "dbus-one  = org.qmachined1.Machine.Execute(\"{}\", \"\") through a private dbus-daemon, "
        "every caller's\n            calls on ONE sd-bus connection (sd_bus_call_async, up to C "
        "in flight on it)\ndbus-each = the same, each caller on a connection of its own\nfloor  "
        "   = {} as one line straight to a QEMU's QMP monitor, reply read to '\\n'\nOne thread, "
        "one ppoll() loop for every side. Caller k of C takes machines k, k+C, k+2C, ... in\n"
        "turn and sends its next call when the previous answer arrived. Each window: {} ms "
        "unrecorded,\nthen {} s recorded; trials rotate which side goes first, after {} ms of "
        "each side unrecorded\nper concurrency.\n\n",
        command, std::string_view(qmp_line).substr(0, qmp_line.size() - 1), window_warm_up.count(),
        args.seconds, concurrency_warm_up.count());
    std::fflush(stdout);

    const Clock::duration measure = std::chrono::seconds(args.seconds);
    std::vector<Row> rows;
    for (const int c : args.concurrency) {
        Row row;
        row.concurrency = c;
        std::vector<Side> sides;
        if (one || c == 1) {
            sides.push_back(Side::dbus_one);
        }
        if (each && c > 1) {
            sides.push_back(Side::dbus_each);
        }
        sides.push_back(Side::floor);
        row.sides.resize(sides.size());
        std::vector<std::function<void()>> trials;
        for (std::size_t i = 0; i < sides.size(); ++i) {
            row.sides[i].side = sides[i];
            run_window(load, sides[i], c, concurrency_warm_up, 0s);
            trials.emplace_back([&, i, side = sides[i]] {
                row.sides[i].add(run_window(load, side, c, window_warm_up, measure));
            });
        }
        for (int t = 0; t < args.trials; ++t) {
            rotated(t, trials);
        }
        rows.push_back(std::move(row));
    }

    fmt::print("latency (us; every call of the recorded windows, pooled over trials); throughput "
               "(calls/s; median\ntrial and range); CPU per call (us, median trial; every thread "
               "of: the side's {} QEMUs, qmachined,\ndbus-daemon, this process's callers), what "
               "they used of the {} CPUs, qmachined's time runnable\nbut waiting for a CPU per "
               "call (us), and how many times a QEMU thread was put on a CPU per call\n"
               "(schedstat):\n",
               machines, std::thread::hardware_concurrency());
    fmt::print("  {:>4}  {:<9} {:>6} {:>6} {:>7} {:>11} {:>6}   {:>5} {:>6} {:>5} {:>7} {:>5} "
               "{:>4} {:>6} {:>6}\n",
               "conc", "side", "p50", "p99", "calls/s", "range", "calls", "qemu", "qmachd", "bus",
               "callers", "total", "busy", "d wait", "q runs");
    for (const auto& r : rows) {
        for (const Figures& f : r.sides) {
            const double q = percentile(f.qemu_us, 50);
            const double d = percentile(f.daemon_us, 50);
            const double b = percentile(f.bus_us, 50);
            const double c = percentile(f.self_us, 50);
            fmt::print("  {:>4}  {:<9} {:>6.0f} {:>6.0f} {:>7.0f} {:>11} {:>6}   {:>5.0f} "
                       "{:>6.1f} {:>5.1f} {:>7.1f} {:>5.0f} {:>3.0f}% {:>6.0f} {:>6.2f}\n",
                       r.concurrency, side_name(f.side), f.p50(), f.p99(), f.rate50(),
                       range_of(f.rate), f.us.size(), q, d, b, c, q + d + b + c,
                       100 * percentile(f.busy, 50), percentile(f.daemon_wait_us, 50),
                       percentile(f.qemu_runs, 50));
        }
    }

    fmt::print("\ntargets: p50 <= floor p50 + {:.0f} us (every concurrency); p50 <= {:.0f} us "
               "absolute (one call at a time,\nthe anchor's case)\n",
               overhead_target_us, absolute_target_us);
    bool all_pass = true;
    for (const auto& r : rows) {
        for (std::size_t i = 0; i + 1 < r.sides.size(); ++i) {
            const Figures& f = r.sides[i];
            const bool pass = r.overhead_pass(f) && r.absolute_pass(f);
            all_pass = all_pass && pass;
            fmt::print("  concurrency {:>2} {:<9}: p50 {:.0f} us = floor {:.0f} {:+.0f} us {} | "
                       "absolute {} | p50 {:.2f}x, calls/s {:.0f} / {:.0f} = {:.2f}x the floor's\n",
                       r.concurrency, side_name(f.side), f.p50(), r.floor().p50(), r.overhead_us(f),
                       verdict(r.overhead_pass(f)),
                       r.absolute_applies()
                           ? fmt::format("{:.0f} us {}", f.p50(), verdict(r.absolute_pass(f)))
                           : fmt::format("n/a (the floor's own p50 is {:.0f} us)", r.floor().p50()),
                       f.p50() / r.floor().p50(), f.rate50(), r.floor().rate50(),
                       f.rate50() / r.floor().rate50());
        }
    }
    fmt::print("\nanchor (shared/bench-anchors.md, libvirt 9.0 qemuMonitorCommand, 50 domains, "
               "-machine pc): one call at\n  a time p50 {:.0f} us, p99 {:.0f} us, {:.0f} calls/s; "
               "8 threads on one connection {:.0f} calls/s, p50 {:.0f} us\n",
               libvirt_seq_p50_us, libvirt_seq_p99_us, libvirt_seq_rate, libvirt_conc_rate,
               libvirt_conc_p50_us);
    for (const auto& r : rows) {
        for (std::size_t i = 0; i + 1 < r.sides.size(); ++i) {
            const Figures& f = r.sides[i];
            if (r.concurrency == 1) {
                fmt::print("  concurrency  1 {:<9}: p50 {:.2f}x libvirt's, {:.2f}x its calls/s\n",
                           side_name(f.side), f.p50() / libvirt_seq_p50_us,
                           f.rate50() / libvirt_seq_rate);
            } else {
                fmt::print("  concurrency {:>2} {:<9}: {:.2f}x libvirt's calls/s with 8 threads\n",
                           r.concurrency, side_name(f.side), f.rate50() / libvirt_conc_rate);
            }
        }
    }

    std::string rows_json;
    auto side_json = [](const Figures& f) {
        return fmt::format(R"({{"p50_us":{:.1f},"p99_us":{:.1f},"calls_per_s":{:.0f},)"
                           R"("cpu_us_per_call":{{"qemu":{:.1f},"qmachined":{:.1f},)"
                           R"("dbus_daemon":{:.1f},"callers":{:.1f}}},"qmachined_wait_us":{:.1f},)"
                           R"("qemu_runs_per_call":{:.2f}}})",
                           f.p50(), f.p99(), f.rate50(), percentile(f.qemu_us, 50),
                           percentile(f.daemon_us, 50), percentile(f.bus_us, 50),
                           percentile(f.self_us, 50), percentile(f.daemon_wait_us, 50),
                           percentile(f.qemu_runs, 50));
    };
    for (const auto& r : rows) {
        std::string sides_json;
        for (std::size_t i = 0; i + 1 < r.sides.size(); ++i) {
            const Figures& f = r.sides[i];
            sides_json += fmt::format(
                R"({}"{}":{{"side":{},"overhead_p50_us":{:.1f},"p50_ratio":{:.3f},)"
                R"("throughput_ratio":{:.3f},"pass":{}}})",
                sides_json.empty() ? "" : ",", side_name(f.side), side_json(f), r.overhead_us(f),
                f.p50() / r.floor().p50(), f.rate50() / r.floor().rate50(),
                r.overhead_pass(f) && r.absolute_pass(f));
        }
        rows_json +=
            fmt::format(R"({}{{"concurrency":{},{},"floor":{}}})", rows_json.empty() ? "" : ",",
                        r.concurrency, sides_json, side_json(r.floor()));
    }
    fmt::print("\nJSON "
               R"({{"bench":"dbus-bench","qemu":{},"machines":{},"trials":{},"seconds":{},)"
               R"("targets":{{"overhead_p50_us":{:.0f},"absolute_p50_us_at_1":{:.0f}}},)"
               R"("anchor_libvirt_p50_us":{:.0f},"rows":[{}],"pass":{}}})"
               "\n",
               qm::json::quote(qemu_version), machines, args.trials, args.seconds,
               overhead_target_us, absolute_target_us, libvirt_seq_p50_us, rows_json, all_pass);
    fmt::print("\nverdicts:");
    for (const auto& r : rows) {
        for (std::size_t i = 0; i + 1 < r.sides.size(); ++i) {
            const Figures& f = r.sides[i];
            fmt::print(" concurrency {} {}: overhead {}{};", r.concurrency, side_name(f.side),
                       verdict(r.overhead_pass(f)),
                       r.absolute_applies()
                           ? fmt::format(", absolute {}", verdict(r.absolute_pass(f)))
                           : std::string());
        }
    }
    fmt::print("\n");
    std::fflush(stdout);

    // Teardown: the callers hang up, the floor's QEMUs quit over QMP, the daemon gets SIGTERM
    // and stops its machines while the bus is still there, then the bus stops.
    for (sd_bus* b : load.clients.all) {
        sd_bus_flush_close_unref(b);
    }
    load.clients.all.clear();
    const std::size_t floor_failed = qm::bench::quit_all(floors);
    qm::bench::teardown(daemon, env.dir, machines, floor_failed, started, [&] {
        return fmt::format("dbus-daemon exited in {:.0f} ms after SIGTERM", bus.stop());
    });
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
        {"--connections",
         [&](std::string_view v) {
             if (v == "one") {
                 args.connections = Connections::one;
             } else if (v == "each") {
                 args.connections = Connections::each;
             } else if (v == "both") {
                 args.connections = Connections::both;
             } else {
                 throw std::invalid_argument("--connections wants one, each or both, not '" +
                                             std::string(v) + "'");
             }
         }},
    };
    return qm::bench::bench_main("dbus-bench", argc, argv, options, usage, [&] {
        for (const int c : args.concurrency) {
            if (c > args.machines || c > 64) {
                throw std::invalid_argument(fmt::format(
                    "concurrency {} is more than --machines {} or 64: every caller needs "
                    "machines of its own",
                    c, args.machines));
            }
        }
        return run(args);
    });
}
