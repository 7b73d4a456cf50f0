// SPDX-License-Identifier: GPL-2.0-or-later
// The floor (posix_spawn, one epoll loop, raw unix sockets: the cheapest supervisor of N QEMUs)
// and what the benchmarks that measure against it share: interruption, /proc readings, the
// fan-out of operations on one io_context, probe processes, the facts a report's header gives.
#pragma once

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <spawn.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"
#include "tests/support/loop.hpp"
#include "tests/support/qemu_process.hpp"

extern char** environ; // NOLINT(readability-redundant-declaration): POSIX leaves it undeclared

namespace qm::bench {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

// Far beyond what 200 QEMUs need on 2 cores (a few seconds): only a hang reaches it.
inline constexpr auto op_deadline = 120s;

[[noreturn]] inline void die(const std::string& what)
{
    throw std::runtime_error(what);
}

//---- interruption ------------------------------------------------------------------------------

// Set by SIGINT and SIGTERM. Every wait wakes up for it (the handler is installed without
// SA_RESTART), and the run then ends as after a failure: the QEMUs, in sessions of their own, do
// not get the terminal's ^C, so the unwinding must kill them.
inline volatile std::sig_atomic_t interrupted = 0;

inline void on_interrupt(int /*signo*/)
{
    interrupted = 1;
}

// SIGINT and SIGTERM set `interrupted`; a closed stdout (`| head`) is an error to report and
// clean up after, not a silent death.
inline void install_signal_handlers()
{
    struct sigaction sa
    {
    };
    sa.sa_handler = on_interrupt;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGINT, &sa, nullptr);
    ::sigaction(SIGTERM, &sa, nullptr);
    std::signal(SIGPIPE, SIG_IGN);
}

inline void check_interrupted()
{
    if (interrupted != 0) {
        die("interrupted");
    }
}

inline std::string errno_text(std::string_view what)
{
    return fmt::format("{}: {}", what, std::strerror(errno));
}

inline double elapsed_ms(Clock::time_point from, Clock::time_point to)
{
    return std::chrono::duration<double, std::milli>(to - from).count();
}

// The QEMU binary as an absolute path, so that both sides exec the same file without a PATH search.
inline std::string resolve_qemu()
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

// A private directory under `base` (every socket, log and machine directory of a run is inside
// it), removed with everything in it at the end.
struct ScratchDir
{
    ScratchDir(const fs::path& base, std::string_view prefix)
    {
        std::string templ = (base / fmt::format("{}.XXXXXX", prefix)).string();
        if (::mkdtemp(templ.data()) == nullptr) {
            die(errno_text("mkdtemp"));
        }
        path = templ;
    }
    ScratchDir(const ScratchDir&) = delete;
    ScratchDir& operator=(const ScratchDir&) = delete;
    ~ScratchDir()
    {
        std::error_code ignored;
        fs::remove_all(path, ignored);
    }

    fs::path path;
};

// What a benchmark's sides share: the loop, the QEMU binary and a private temporary directory
// (every socket, log, state and machine directory of the run is inside it; removed at the end).
struct Env
{
    Env(const fs::path& base, std::string_view prefix)
        : qemu(resolve_qemu())
        , scratch(base, prefix)
        , dir(scratch.path)
    {}

    asio::io_context ioc{1};
    std::string qemu;
    ScratchDir scratch;
    fs::path dir;
};

// 200 supervised QEMUs hold ~600 descriptors: more than the usual soft limit of 1024 leaves room
// for with everything else.
inline void raise_fd_limit()
{
    rlimit rl{};
    if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        ::setrlimit(RLIMIT_NOFILE, &rl);
    }
}

//---- /proc readings ----------------------------------------------------------------------------

// The number of a "Field:   1234 kB" (or "Field:\t1234") line of a /proc file. Plain syscalls and
// a stack buffer: reading must not allocate, or it would change what it measures.
inline std::size_t read_proc_number(const char* file, std::string_view field)
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
        std::size_t value = 0;
        if (std::from_chars(line.data(), line.data() + line.size(), value).ec == std::errc{}) {
            return value;
        }
    }
    die(fmt::format("no '{}' in {}", field, file));
}

// Resident memory of this process, in bytes, two ways: `Rss:` of /proc/self/smaps_rollup, counted
// by walking the page tables (exact), and `VmRSS:` of /proc/self/status, the kernel's running
// counters (cheaper, and per-CPU batched on recent kernels, so they may lag by a few pages).
struct Rss
{
    std::size_t exact = 0;
    std::size_t vmrss = 0;
};

inline Rss read_rss()
{
    return {read_proc_number("/proc/self/smaps_rollup", "Rss") * 1024,
            read_proc_number("/proc/self/status", "VmRSS") * 1024};
}

//---- operations started together on one io_context ---------------------------------------------

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

template <typename T>
awaitable<void> tracked(awaitable<expected<T>> op, std::shared_ptr<Fanout> fan, std::string what)
{
    auto r = co_await std::move(op);
    if (!r) {
        fan->errors.push_back(what + ": " + r.error().message);
    }
    fan->done();
}

// co_spawns every operation of `ops` at once and runs the loop until all have completed; `side`
// and `what` name them in errors ("machine", "launch"). Returns the time from before the first
// co_spawn to the last completion, in ms. After a failure (an interrupt, the deadline) some may
// still be in flight: `fan`, if the caller keeps it, says how many.
template <typename T>
double run_all(asio::io_context& ioc, std::vector<awaitable<expected<T>>> ops,
               std::string_view side, const char* what,
               std::shared_ptr<Fanout> fan = std::make_shared<Fanout>())
{
    fan->remaining = ops.size();
    fan->errors.clear();
    const std::size_t total = ops.size();
    const auto t0 = Clock::now();
    for (auto& op : ops) {
        asio::co_spawn(ioc, tracked(std::move(op), fan, what),
                       [fan, what](const std::exception_ptr& e) {
                           if (e) {
                               fan->errors.push_back(std::string(what) + ": threw");
                               fan->done();
                           }
                       });
    }
    const bool done = qm::test::run_until(
        ioc, [&] { return fan->remaining == 0 || interrupted != 0; }, op_deadline);
    check_interrupted();
    if (!done) {
        die(fmt::format("{}: {} did not complete within {} s", side, what, op_deadline.count()));
    }
    if (!fan->errors.empty()) {
        die(fmt::format("{}: {} of {} failed; first: {}", side, fan->errors.size(), total,
                        fan->errors.front()));
    }
    return elapsed_ms(t0, fan->last);
}

//---- the floor: posix_spawn, one epoll loop, raw unix sockets ----------------------------------

// One QEMU of the floor: its command line (the compared side's, with a name and socket of its
// own) and how far its QMP negotiation has gone.
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
            // The other side's SIGCHLD handler (Asio's) interrupts us: not an error.
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

// One launch and one teardown, in ms.
struct Timing
{
    double ready_ms = 0;
    double teardown_ms = 0;
};

inline Timing floor_trial(Floor& floor)
{
    Timing t;
    t.ready_ms = floor.launch();
    t.teardown_ms = floor.teardown();
    return t;
}

// Runs both sides of trial number `t`; the side that goes first alternates from trial to trial, so
// that drift (CPU frequency, other load) hits both alike.
inline void interleaved(int t, const std::function<void()>& one, const std::function<void()>& other)
{
    if (t % 2 == 0) {
        one();
        other();
    } else {
        other();
        one();
    }
}

//---- probe processes ---------------------------------------------------------------------------

inline std::string self_path()
{
    std::error_code ec;
    auto p = fs::read_symlink("/proc/self/exe", ec);
    if (ec) {
        die("cannot read /proc/self/exe: " + ec.message());
    }
    return p.string();
}

// Runs this program again with `args` (argv[1]...) in a process of its own, so that what it
// measures (its RSS above all) starts from a fresh heap, and returns what it printed on stdout.
// Dies when it cannot start or does not exit with status 0.
inline std::string run_self(const std::vector<std::string>& args)
{
    const std::string self = self_path();
    int pipe_fds[2];
    if (::pipe2(pipe_fds, O_CLOEXEC) != 0) {
        die(errno_text("pipe2"));
    }
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, pipe_fds[1], STDOUT_FILENO);
    std::vector<std::string> all{self};
    all.insert(all.end(), args.begin(), args.end());
    std::vector<char*> argv;
    argv.reserve(all.size() + 1);
    for (auto& a : all) {
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
        die(fmt::format("cannot start the probe: {}", std::strerror(rc)));
    }
    int status = 0;
    pid_t r = 0;
    do {
        r = ::waitpid(pid, &status, 0);
    } while (r < 0 && errno == EINTR);
    check_interrupted(); // the probe, in our process group, was interrupted too
    if (r < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        die(fmt::format("the probe '{}' failed (output '{}')", fmt::join(args, " "), out));
    }
    return out;
}

//---- main ----------------------------------------------------------------------------------------

// An option that takes a value ("--trials 3"): its name, and what to do with the value (throws
// std::invalid_argument when it is wrong).
struct Option
{
    std::string_view name;
    std::function<void(std::string_view)> set;
};

// Runs `body` and turns what it throws into the exit status: 2 for a wrong argument (after
// `usage`), 1 for anything else, each with one line on stderr.
inline int guarded(std::string_view program, const std::function<int()>& body,
                   const std::function<void()>& usage = {})
{
    try {
        return body();
    } catch (const std::invalid_argument& e) {
        fmt::print(stderr, "{}: {}\n", program, e.what());
        if (usage) {
            usage();
        }
        return 2;
    } catch (const std::exception& e) {
        fmt::print(stderr, "{}: {}\n", program, e.what());
        return 1;
    }
}

// A benchmark's main() after its internal modes: the options, then 2 when QEMU is missing, then
// `run`'s status (0 when it measured, whatever the figures).
inline int bench_main(std::string_view program, int argc, char** argv,
                      const std::vector<Option>& options, const std::function<void()>& usage,
                      const std::function<int()>& run)
{
    bool help = false;
    const int parsed = guarded(
        program,
        [&] {
            for (int i = 1; i < argc && !help; ++i) {
                const std::string_view a(argv[i]);
                if (a == "--help" || a == "-h") {
                    help = true;
                    continue;
                }
                const auto it = std::find_if(options.begin(), options.end(),
                                             [&](const Option& o) { return o.name == a; });
                if (it == options.end() || i + 1 >= argc) {
                    throw std::invalid_argument(
                        fmt::format("unknown or incomplete option '{}'", a));
                }
                it->set(argv[++i]);
            }
            return 0;
        },
        usage);
    if (parsed != 0) {
        return parsed;
    }
    if (help) {
        usage();
        return 0;
    }
    if (auto why = qm::test::QemuProcess::unavailable_reason()) {
        fmt::print(stderr, "{}: cannot run: {}\n", program, *why);
        return 2;
    }
    return guarded(program, run);
}

//---- what a report's header says ---------------------------------------------------------------

// The file system of `dir`: every supervised machine creates a directory, a log file and a socket
// there, and on a disk file system each costs the supervisor far more than on tmpfs.
inline std::string fs_type(const fs::path& dir)
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

// The first three fields of /proc/loadavg: other work on the machine moves every figure.
inline std::string load_average()
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

inline int parse_int(std::string_view flag, std::string_view s, int min)
{
    int v = 0;
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc{} || end != s.data() + s.size() || v < min) {
        throw std::invalid_argument(
            fmt::format("{} wants an integer >= {}, not '{}'", flag, min, s));
    }
    return v;
}

// An option that sets `target` to an integer >= min ("--trials 3").
inline Option int_option(std::string_view name, int& target, int min)
{
    return {name, [name, &target, min](std::string_view v) { target = parse_int(name, v, min); }};
}

// What the run left behind: files in its directory and children not reaped.
inline std::string leftovers(const fs::path& dir)
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

} // namespace qm::bench
