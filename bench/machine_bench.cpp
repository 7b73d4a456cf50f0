// SPDX-License-Identifier: GPL-2.0-or-later
// machine-bench: qm::Machine against the floor (posix_spawn, one epoll loop, raw unix sockets) on
// N `qemu-system-x86_64 -machine none` at once: launch to all ready, teardown, and the memory the
// supervising process spends per machine. Not a test: it prints figures (bench/README.md).
#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <spawn.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>

#include "bench/stats.hpp"
#include "libmachine/asio.hpp"
#include "libmachine/machine/machine.hpp"
#include "libmachine/proc/spawn.hpp"
#include "libmachine/qmp/address.hpp"
#include "tests/support/loop.hpp"
#include "tests/support/qemu_process.hpp"

extern char** environ; // NOLINT(readability-redundant-declaration): POSIX leaves it undeclared

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;
using qm::bench::percentile;

// Far beyond what 50 QEMUs need on 2 cores (well under a second): only a hang reaches it.
constexpr auto op_deadline = 120s;
// The issue's targets.
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

[[noreturn]] void die(const std::string& what)
{
    throw std::runtime_error(what);
}

// Set by SIGINT and SIGTERM. Every wait below wakes up for it (the handler is installed without
// SA_RESTART), and the run then ends as after a failure: the QEMUs, in sessions of their own, do
// not get the terminal's ^C, so the unwinding must kill them.
volatile std::sig_atomic_t interrupted = 0;

void on_interrupt(int /*signo*/)
{
    interrupted = 1;
}

void check_interrupted()
{
    if (interrupted != 0) {
        die("interrupted");
    }
}

std::string errno_text(std::string_view what)
{
    return fmt::format("{}: {}", what, std::strerror(errno));
}

double elapsed_ms(Clock::time_point from, Clock::time_point to)
{
    return std::chrono::duration<double, std::milli>(to - from).count();
}

// The QEMU binary as an absolute path, so that both sides exec the same file without a PATH search.
std::string resolve_qemu()
{
    std::string bin = qm::test::QemuProcess::binary();
    if (bin.find('/') != std::string::npos) {
        return bin;
    }
    const char* path = std::getenv("PATH");
    std::istringstream dirs(path != nullptr ? path : "");
    for (std::string d; std::getline(dirs, d, ':');) {
        const fs::path p = fs::path(d.empty() ? "." : d) / bin;
        if (::access(p.c_str(), X_OK) == 0) {
            return fs::absolute(p).string();
        }
    }
    die("'" + bin + "' not found in PATH");
}

// What both sides share: the loop, the QEMU binary and a private temporary directory (every
// socket, log and machine directory of the run is inside it; removed at the end).
struct Env
{
    explicit Env(const fs::path& base)
        : qemu(resolve_qemu())
    {
        std::string templ = (base / "machine-bench.XXXXXX").string();
        if (::mkdtemp(templ.data()) == nullptr) {
            die(errno_text("mkdtemp"));
        }
        dir = templ;
    }
    Env(const Env&) = delete;
    Env& operator=(const Env&) = delete;
    ~Env()
    {
        std::error_code ignored;
        fs::remove_all(dir, ignored);
    }

    qm::asio::io_context ioc{1};
    std::string qemu;
    fs::path dir;
};

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

//---- resident memory ---------------------------------------------------------------------------

// Resident memory of this process, in bytes, two ways: `Rss:` of /proc/self/smaps_rollup, counted
// by walking the page tables (exact), and `VmRSS:` of /proc/self/status, the kernel's running
// counters (cheaper, and per-CPU batched on recent kernels, so they may lag by a few pages).
struct Rss
{
    std::size_t exact = 0;
    std::size_t vmrss = 0;
};

// A "Field:   1234 kB" line of a /proc file, in bytes. Plain syscalls and a stack buffer: reading
// must not allocate, or it would change what it measures.
std::size_t read_proc_kib(const char* file, std::string_view field)
{
    const int fd = ::open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        die(errno_text(file));
    }
    std::array<char, 8192> buf{};
    std::size_t len = 0;
    for (;;) {
        const ssize_t n = ::read(fd, buf.data() + len, buf.size() - len);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            break;
        }
        len += static_cast<std::size_t>(n);
    }
    ::close(fd);
    const std::string_view text(buf.data(), len);
    for (std::size_t at = 0; at < text.size();) {
        const std::size_t nl = std::min(text.find('\n', at), text.size());
        std::string_view line = text.substr(at, nl - at);
        at = nl + 1;
        if (!line.starts_with(field) || line.size() <= field.size() || line[field.size()] != ':') {
            continue;
        }
        line.remove_prefix(field.size() + 1);
        line.remove_prefix(std::min(line.find_first_not_of(" \t"), line.size()));
        std::size_t kib = 0;
        if (std::from_chars(line.data(), line.data() + line.size(), kib).ec == std::errc{}) {
            return kib * 1024;
        }
    }
    die(fmt::format("no '{}' in {}", field, file));
}

Rss read_rss()
{
    return {read_proc_kib("/proc/self/smaps_rollup", "Rss"),
            read_proc_kib("/proc/self/status", "VmRSS")};
}

//---- the machine side: qm::Machine on one io_context -------------------------------------------

// The completions of operations started together, and when the last one ended.
struct Fanout
{
    std::size_t remaining = 0;
    Clock::time_point last{};
    std::vector<std::string> errors;

    void done()
    {
        if (--remaining == 0) {
            last = Clock::now();
        }
    }
};

qm::awaitable<void> tracked(qm::awaitable<qm::expected<void>> op, std::shared_ptr<Fanout> fan,
                            std::string what)
{
    auto r = co_await std::move(op);
    if (!r) {
        fan->errors.push_back(what + ": " + r.error().message);
    }
    fan->done();
}

using MachineOp = std::function<qm::awaitable<qm::expected<void>>(qm::Machine&)>;

// co_spawns `op` on every machine at once and runs the loop until all have completed. Returns the
// time from before the first co_spawn to the last completion, in ms.
double run_all(Env& env, const std::vector<std::unique_ptr<qm::Machine>>& machines,
               const MachineOp& op, const char* what)
{
    auto fan = std::make_shared<Fanout>();
    fan->remaining = machines.size();
    const auto t0 = Clock::now();
    for (const auto& m : machines) {
        qm::asio::co_spawn(env.ioc, tracked(op(*m), fan, what),
                           [fan, what](const std::exception_ptr& e) {
                               if (e) {
                                   fan->errors.push_back(std::string(what) + ": threw");
                                   fan->done();
                               }
                           });
    }
    const bool done = qm::test::run_until(
        env.ioc, [&] { return fan->remaining == 0 || interrupted != 0; }, op_deadline);
    check_interrupted();
    if (!done) {
        die(fmt::format("machine: {} did not complete within {} s", what, op_deadline.count()));
    }
    if (!fan->errors.empty()) {
        die(fmt::format("machine: {} of {} failed; first: {}", fan->errors.size(), machines.size(),
                        fan->errors.front()));
    }
    return elapsed_ms(t0, fan->last);
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

struct Timing
{
    double ready_ms = 0;
    double teardown_ms = 0;
};

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
struct FloorVm
{
    enum class Step { accept, greeting, capabilities, status, ready };

    std::vector<std::string> argv;
    std::string socket_path;
    int listen_fd = -1;
    int fd = -1;
    pid_t pid = -1;
    Step step = Step::accept;
    std::string in;
};

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

// What any supervisor of N QEMUs must at least do to start them, learn over QMP that they are
// ready, and stop them: a listening socket per QEMU, posix_spawn (with qm::proc::spawn's
// attributes), one thread waiting in epoll_wait on every socket, line-at-a-time QMP on raw
// sockets, blocking waitpid at the end.
class Floor
{
public:
    explicit Floor(std::vector<FloorVm> vms)
        : vms_(std::move(vms))
        , epoll_fd_(::epoll_create1(EPOLL_CLOEXEC))
    {
        if (epoll_fd_ < 0) {
            die(errno_text("floor: epoll_create1"));
        }
        // The child's stdin and output go to /dev/null: the floor keeps no log.
        posix_spawn_file_actions_init(&actions_);
        posix_spawn_file_actions_addopen(&actions_, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
        posix_spawn_file_actions_addopen(&actions_, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
        posix_spawn_file_actions_adddup2(&actions_, STDOUT_FILENO, STDERR_FILENO);
        // The attributes qm::proc::spawn gives a QEMU, above all a session of its own: with
        // sched_autogroup (Debian's default) every session is a scheduling group, so QEMUs in
        // their own sessions share the CPUs with other sessions' work differently from QEMUs
        // in ours. Both sides must be scheduled alike.
        posix_spawnattr_init(&attr_);
        sigset_t all;
        sigset_t none;
        sigfillset(&all);
        sigemptyset(&none);
        posix_spawnattr_setsigdefault(&attr_, &all);
        posix_spawnattr_setsigmask(&attr_, &none);
        posix_spawnattr_setflags(&attr_, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK |
                                             POSIX_SPAWN_SETSID);
    }
    Floor(const Floor&) = delete;
    Floor& operator=(const Floor&) = delete;
    ~Floor()
    {
        kill_all();
        posix_spawnattr_destroy(&attr_);
        posix_spawn_file_actions_destroy(&actions_);
        ::close(epoll_fd_);
    }

    // Listens, spawns every QEMU, then negotiates all of them from one epoll loop. Returns the
    // time until the last query-status reply, in ms.
    double launch()
    {
        const auto t0 = Clock::now();
        for (std::size_t i = 0; i < vms_.size(); ++i) {
            auto& vm = vms_[i];
            vm.step = FloorVm::Step::accept;
            vm.in.clear();
            vm.listen_fd = listen_on(vm.socket_path);
            watch(vm.listen_fd, i);
            std::vector<char*> argv;
            argv.reserve(vm.argv.size() + 1);
            for (auto& a : vm.argv) {
                argv.push_back(a.data());
            }
            argv.push_back(nullptr);
            const int rc = ::posix_spawn(&vm.pid, argv[0], &actions_, &attr_, argv.data(), environ);
            if (rc != 0) {
                vm.pid = -1;
                die(fmt::format("floor: posix_spawn: {}", std::strerror(rc)));
            }
        }
        const auto deadline = t0 + op_deadline;
        std::array<epoll_event, 64> events{};
        for (std::size_t ready = 0; ready < vms_.size();) {
            check_interrupted();
            const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
            if (left.count() <= 0) {
                die(fmt::format("floor: {} of {} QEMUs ready within {} s", ready, vms_.size(),
                                op_deadline.count()));
            }
            const int n = ::epoll_wait(epoll_fd_, events.data(), static_cast<int>(events.size()),
                                       static_cast<int>(left.count()));
            if (n < 0 && errno != EINTR) {
                die(errno_text("floor: epoll_wait"));
            }
            for (int k = 0; k < n; ++k) {
                const auto index =
                    static_cast<std::size_t>(events[static_cast<std::size_t>(k)].data.u64);
                ready += advance(index) ? 1 : 0;
            }
        }
        return elapsed_ms(t0, Clock::now());
    }

    // Sends quit on every socket, then waits for every QEMU. Returns the time until the last one
    // was reaped, in ms; every one must have exited with status 0.
    double teardown()
    {
        const auto t0 = Clock::now();
        for (auto& vm : vms_) {
            send_line(vm, R"({"execute":"quit"})");
        }
        int failed = 0;
        for (auto& vm : vms_) {
            check_interrupted();
            failed += reap(vm) ? 0 : 1;
        }
        for (auto& vm : vms_) {
            ::close(vm.fd);
            vm.fd = -1;
        }
        const double ms = elapsed_ms(t0, Clock::now());
        if (failed > 0) {
            die(fmt::format("floor: {} of {} QEMUs did not exit with status 0", failed,
                            vms_.size()));
        }
        return ms;
    }

private:
    static int listen_on(const std::string& path)
    {
        sockaddr_un sa{};
        sa.sun_family = AF_UNIX;
        if (path.size() >= sizeof(sa.sun_path)) {
            die("floor: socket path too long: " + path);
        }
        std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
        const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            die(errno_text("floor: socket"));
        }
        if (::bind(fd, reinterpret_cast<const sockaddr*>(&sa), sizeof(sa)) != 0 ||
            ::listen(fd, 1) != 0) {
            const std::string why = errno_text("floor: bind/listen " + path);
            ::close(fd);
            die(why);
        }
        return fd;
    }

    void watch(int fd, std::size_t index) const
    {
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = index;
        if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
            die(errno_text("floor: epoll_ctl"));
        }
    }

    static void send_line(const FloorVm& vm, std::string_view json)
    {
        std::string text(json);
        text += '\n';
        // A few dozen bytes into an empty socket buffer: one send, never short.
        if (::send(vm.fd, text.data(), text.size(), MSG_NOSIGNAL) !=
            static_cast<ssize_t>(text.size())) {
            die(errno_text("floor: send"));
        }
    }

    // Handles one readiness event of vms_[index]; true when that QEMU has just become ready.
    bool advance(std::size_t index)
    {
        FloorVm& vm = vms_[index];
        if (vm.step == FloorVm::Step::accept) {
            const int fd = ::accept4(vm.listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd < 0) {
                if (errno == EAGAIN || errno == EINTR) {
                    return false;
                }
                die(errno_text("floor: accept4"));
            }
            // As Machine does: once QEMU is connected, the listening socket and its file go.
            ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, vm.listen_fd, nullptr);
            ::close(vm.listen_fd);
            vm.listen_fd = -1;
            ::unlink(vm.socket_path.c_str());
            vm.fd = fd;
            vm.step = FloorVm::Step::greeting;
            watch(fd, index);
            return false;
        }
        std::array<char, 4096> chunk{};
        const ssize_t n = ::read(vm.fd, chunk.data(), chunk.size());
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                return false;
            }
            die(errno_text("floor: read"));
        }
        if (n == 0) {
            die("floor: QEMU closed its monitor during negotiation");
        }
        vm.in.append(chunk.data(), static_cast<std::size_t>(n));
        bool ready = false;
        for (std::size_t nl = vm.in.find('\n'); nl != std::string::npos; nl = vm.in.find('\n')) {
            const std::string_view line(vm.in.data(), nl);
            // Events do not move the negotiation on (qmp-spec 2.5); none come here anyway.
            if (line.find("\"event\"") == std::string_view::npos) {
                ready = step(vm, line) || ready;
            }
            vm.in.erase(0, nl + 1);
        }
        return ready;
    }

    // One line from QEMU: the greeting, then qmp_capabilities' and query-status' replies.
    static bool step(FloorVm& vm, std::string_view line)
    {
        auto expect = [&](std::string_view what) {
            if (line.find(what) == std::string_view::npos) {
                die(fmt::format("floor: expected {}, got {}", what, line));
            }
        };
        switch (vm.step) {
        case FloorVm::Step::greeting:
            expect("\"QMP\"");
            send_line(vm, R"({"execute":"qmp_capabilities"})");
            vm.step = FloorVm::Step::capabilities;
            return false;
        case FloorVm::Step::capabilities:
            expect("\"return\"");
            send_line(vm, R"({"execute":"query-status"})");
            vm.step = FloorVm::Step::status;
            return false;
        case FloorVm::Step::status:
            expect("\"return\"");
            vm.step = FloorVm::Step::ready;
            return true;
        case FloorVm::Step::accept:
        case FloorVm::Step::ready: break;
        }
        die(fmt::format("floor: unexpected message: {}", line));
    }

    // Blocking waitpid; true when the QEMU exited with status 0.
    static bool reap(FloorVm& vm)
    {
        int status = 0;
        pid_t r = 0;
        do {
            // The machine side's SIGCHLD handler (Asio's) interrupts us: not an error.
            r = ::waitpid(vm.pid, &status, 0);
        } while (r < 0 && errno == EINTR);
        vm.pid = -1;
        return r > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }

    // After a failure: nothing of this floor survives it.
    void kill_all()
    {
        for (auto& vm : vms_) {
            if (vm.pid > 0) {
                ::kill(vm.pid, SIGKILL);
                reap(vm);
            }
            for (int* fd : {&vm.fd, &vm.listen_fd}) {
                if (*fd >= 0) {
                    ::close(*fd);
                    *fd = -1;
                }
            }
            ::unlink(vm.socket_path.c_str());
        }
    }

    std::vector<FloorVm> vms_;
    int epoll_fd_ = -1;
    posix_spawn_file_actions_t actions_{};
    posix_spawnattr_t attr_{};
};

Timing floor_trial(Floor& floor)
{
    Timing t;
    t.ready_ms = floor.launch();
    t.teardown_ms = floor.teardown();
    return t;
}

//---- memory: a fresh process per figure --------------------------------------------------------

// The memory probe, run in a child process of its own (`--probe-memory`): one warm-up launch and
// teardown of a single machine (or floor QEMU), so that first-use costs (Asio services, the
// ChildWatcher, spdlog, code pages, the allocator's arena) are paid; then the RSS before creating
// N and once all N are ready. Prints "exact_before exact_ready vmrss_before vmrss_ready" in bytes.
int probe_memory(std::string_view kind, int n, const fs::path& base)
{
    Env env(base);
    Rss before;
    Rss ready;
    if (kind == "machine") {
        machine_trial(env, 1);
        before = read_rss();
        auto machines = make_machines(env, n);
        launch_machines(env, machines);
        ready = read_rss();
        shut_down_machines(env, machines);
        machines.clear();
        drain(env);
    } else if (kind == "floor") {
        {
            Floor warm(floor_vms(env, 1));
            floor_trial(warm);
        }
        before = read_rss();
        Floor floor(floor_vms(env, n));
        floor.launch();
        ready = read_rss();
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
MemoryFigure run_probe(const std::string& self, const std::string& kind, int n,
                       const fs::path& base)
{
    int pipe_fds[2];
    if (::pipe2(pipe_fds, O_CLOEXEC) != 0) {
        die(errno_text("pipe2"));
    }
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, pipe_fds[1], STDOUT_FILENO);
    std::vector<std::string> args{self, "--probe-memory", kind, std::to_string(n), base.string()};
    std::vector<char*> argv;
    argv.reserve(args.size() + 1);
    for (auto& a : args) {
        argv.push_back(a.data());
    }
    argv.push_back(nullptr);
    pid_t pid = -1;
    const int rc = ::posix_spawn(&pid, self.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    ::close(pipe_fds[1]);
    std::string out;
    if (rc == 0) {
        std::array<char, 256> buf{};
        for (;;) {
            const ssize_t got = ::read(pipe_fds[0], buf.data(), buf.size());
            if (got < 0 && errno == EINTR) {
                continue;
            }
            if (got <= 0) {
                break;
            }
            out.append(buf.data(), static_cast<std::size_t>(got));
        }
    }
    ::close(pipe_fds[0]);
    if (rc != 0) {
        die(fmt::format("cannot start the memory probe: {}", std::strerror(rc)));
    }
    int status = 0;
    pid_t r = 0;
    do {
        r = ::waitpid(pid, &status, 0);
    } while (r < 0 && errno == EINTR);
    check_interrupted(); // the probe, in our process group, was interrupted too
    MemoryFigure f;
    std::istringstream in(out);
    if (r < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0 ||
        !(in >> f.before.exact >> f.ready.exact >> f.before.vmrss >> f.ready.vmrss)) {
        die(fmt::format("the {} memory probe at N={} failed (output '{}')", kind, n, out));
    }
    auto per_vm = [n](std::size_t before, std::size_t ready) {
        return (static_cast<double>(ready) - static_cast<double>(before)) / 1024.0 / n;
    };
    f.per_vm_kib = per_vm(f.before.exact, f.ready.exact);
    f.per_vm_vmrss_kib = per_vm(f.before.vmrss, f.ready.vmrss);
    return f;
}

// `memory_runs` fresh processes, sorted by their per-VM figure.
std::vector<MemoryFigure> probes(const std::string& self, const std::string& kind, int n,
                                 const fs::path& base)
{
    std::vector<MemoryFigure> runs;
    runs.reserve(memory_runs);
    for (int i = 0; i < memory_runs; ++i) {
        runs.push_back(run_probe(self, kind, n, base));
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
// on a disk file system each costs the supervisor far more than on tmpfs.
std::string fs_type(const fs::path& dir)
{
    struct statfs st
    {
    };
    if (::statfs(dir.c_str(), &st) != 0) {
        return "unknown";
    }
    switch (static_cast<unsigned long>(st.f_type)) {
    case 0xEF53: return "ext4";
    case 0x01021994: return "tmpfs";
    case 0x58465342: return "xfs";
    case 0x9123683E: return "btrfs";
    case 0x794C7630: return "overlayfs";
    default: return fmt::format("f_type {:#x}", static_cast<unsigned long>(st.f_type));
    }
}

// The first three fields of /proc/loadavg: other work on the machine moves every figure here.
std::string load_average()
{
    std::ifstream in("/proc/loadavg");
    std::string one;
    std::string five;
    std::string fifteen;
    if (!(in >> one >> five >> fifteen)) {
        return "unknown";
    }
    return one + " " + five + " " + fifteen;
}

int parse_int(std::string_view flag, std::string_view s, int min)
{
    int v = 0;
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc{} || end != s.data() + s.size() || v < min) {
        throw std::invalid_argument(
            fmt::format("{} wants an integer >= {}, not '{}'", flag, min, s));
    }
    return v;
}

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

std::string self_path()
{
    std::error_code ec;
    auto p = fs::read_symlink("/proc/self/exe", ec);
    if (ec) {
        die("cannot read /proc/self/exe: " + ec.message());
    }
    return p.string();
}

// What the run left behind: files in its directory and children not reaped.
std::string leftovers(const fs::path& dir)
{
    std::size_t files = 0;
    std::error_code ec;
    for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::end(it);
         it.increment(ec)) {
        ++files;
    }
    // ECHILD: no child at all, running or zombie.
    const bool children = !(::waitpid(-1, nullptr, WNOHANG) < 0 && errno == ECHILD);
    return fmt::format("{} files left in the temporary directory, {}", files,
                       children ? "CHILD PROCESSES LEFT" : "no child process left");
}

int run(const Args& args)
{
    const auto started = Clock::now();
    Env env(fs::temp_directory_path());
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
                   fs_type(env.dir), load_average());
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
            floor_trial(floor);
            Samples ready;
            Samples down;
            for (int t = 0; t < args.trials; ++t) {
                auto machine = [&] {
                    const Timing tm = machine_trial(env, n);
                    ready.machine.push_back(tm.ready_ms);
                    down.machine.push_back(tm.teardown_ms);
                };
                auto floor_side = [&] {
                    const Timing tm = floor_trial(floor);
                    ready.floor.push_back(tm.ready_ms);
                    down.floor.push_back(tm.teardown_ms);
                };
                // Interleaved: the side that goes first alternates from trial to trial.
                if (t % 2 == 0) {
                    machine();
                    floor_side();
                } else {
                    floor_side();
                    machine();
                }
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

        const std::string self = self_path();
        fmt::print("\n(c) host-process memory per machine, KiB: (RSS once all N are ready - RSS "
                   "before creating them) / N,\n    in a fresh process after one warm-up launch + "
                   "teardown; RSS = /proc/self/smaps_rollup Rss (VmRSS\n    alongside); the "
                   "median of {} processes per figure, the machine's range beside it\n",
                   memory_runs);
        print_memory_header();
        for (const int n : args.sizes) {
            print_memory_row(n, probes(self, "machine", n, env.dir),
                             probes(self, "floor", n, env.dir));
            std::fflush(stdout);
        }

        fmt::print("\ncleanup: {}; load average at end {}; total {:.1f} s\n", leftovers(env.dir),
                   load_average(), std::chrono::duration<double>(Clock::now() - started).count());
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
    struct sigaction sa
    {
    };
    sa.sa_handler = on_interrupt;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGINT, &sa, nullptr);
    ::sigaction(SIGTERM, &sa, nullptr);
    // A closed stdout (`| head`) is an error to report and clean up after, not a silent death.
    std::signal(SIGPIPE, SIG_IGN);
    Args args;
    try {
        if (argc == 5 && std::string_view(argv[1]) == "--probe-memory") {
            // Internal: the memory probe, run by the benchmark in a process of its own.
            return probe_memory(argv[2], parse_int("--probe-memory", argv[3], 1), argv[4]);
        }
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
                args.trials = parse_int(a, argv[++i], 2);
            } else if (a == "--sizes") {
                args.sizes = parse_sizes(argv[++i]);
            } else {
                throw std::invalid_argument(fmt::format("unknown option '{}'", a));
            }
        }
    } catch (const std::invalid_argument& e) {
        fmt::print(stderr, "machine-bench: {}\n", e.what());
        usage();
        return 2;
    } catch (const std::exception& e) {
        fmt::print(stderr, "machine-bench: {}\n", e.what());
        return 1;
    }
    if (auto why = qm::test::QemuProcess::unavailable_reason()) {
        fmt::print(stderr, "machine-bench: cannot run: {}\n", *why);
        return 2;
    }
    try {
        return run(args);
    } catch (const std::exception& e) {
        fmt::print(stderr, "machine-bench: {}\n", e.what());
        return 1;
    }
}
