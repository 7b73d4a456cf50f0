// SPDX-License-Identifier: GPL-2.0-or-later
// The real qmachined under a benchmark, its REST client, /proc readings and bare QEMUs
// (bench/daemon.hpp).
#include "bench/daemon.hpp"

#include <algorithm>
#include <array>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iterator>
#include <thread>
#include <utility>

#include <fcntl.h>
#include <poll.h>
#include <sys/inotify.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>

#include "bench/floor.hpp"
#include "libmachine/json.hpp"
#include "libmachine/proc/spawn.hpp"

// After libmachine/asio.hpp (trap 1), which does not include it: only the bare QEMUs' replies are
// read up to a delimiter.
#include <boost/asio/read_until.hpp>

namespace qm::bench {

namespace beast = rest::beast;
namespace http = rest::http;

namespace {

// A restart with 200 machines takes well under a second; only a hang reaches it.
constexpr auto start_deadline = 30s;

// Starts tried per machine. A start failed now and then when 200 QEMUs started at once on 2 CPUs
// (QEMU 7.2 sending an event before its greeting); the benchmarks measure something else, so they
// try again and report how often.
constexpr int start_attempts = 3;

void replace_all(std::string& s, std::string_view from, std::string_view to)
{
    for (auto at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) {
        s.replace(at, from.size(), to);
    }
}

} // namespace

//---- processes ---------------------------------------------------------------------------------

std::string qmachined_binary()
{
    if (const char* env = std::getenv("QM_QMACHINED"); env != nullptr && *env != '\0') {
        return env;
    }
#ifdef QM_QMACHINED
    if (::access(QM_QMACHINED, X_OK) == 0) {
        return QM_QMACHINED;
    }
#endif
    const fs::path sibling =
        fs::path(self_path()).parent_path().parent_path() / "daemon" / "qmachined";
    if (::access(sibling.c_str(), X_OK) == 0) {
        return sibling.string();
    }
    die("qmachined not found: build it (ninja daemon/qmachined) or set QM_QMACHINED");
}

std::string read_file(const fs::path& p)
{
    std::ifstream in(p, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<std::string> command_line(pid_t pid)
{
    std::ifstream in(fmt::format("/proc/{}/cmdline", pid), std::ios::binary);
    std::vector<std::string> argv;
    for (std::string a; std::getline(in, a, '\0');) {
        argv.push_back(a);
    }
    return argv;
}

pid_t spawn_child(std::vector<std::string> args, const std::string& out, int death_signal,
                  int pass_fd, int as_fd)
{
    std::vector<char*> argv;
    for (auto& a : args) {
        argv.push_back(a.data());
    }
    argv.push_back(nullptr);
    const char* out_path = out.empty() ? "/dev/null" : out.c_str();
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) {
        die(errno_text("fork"));
    }
    if (pid > 0) {
        return pid;
    }
    // The child: async-signal-safe calls only, until exec.
    ::setsid();
    ::prctl(PR_SET_PDEATHSIG, death_signal);
    if (::getppid() != parent) {
        ::_exit(127); // we died before prctl
    }
    for (int sig = 1; sig < NSIG; ++sig) {
        ::signal(sig, SIG_DFL); // SIGPIPE, which we ignore, would stay ignored across exec
    }
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    const int in = ::open("/dev/null", O_RDONLY);
    const int log = ::open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (in < 0 || log < 0 || ::dup2(in, STDIN_FILENO) < 0 || ::dup2(log, STDOUT_FILENO) < 0 ||
        ::dup2(log, STDERR_FILENO) < 0) {
        ::_exit(127);
    }
    // Asio's sockets are not close-on-exec: a QEMU must not hold another's monitor connection.
    int first_closed = 3;
    if (pass_fd >= 0) {
        // dup2 onto itself would keep close-on-exec: move it out of the way first.
        const int moved = pass_fd == as_fd ? ::fcntl(pass_fd, F_DUPFD_CLOEXEC, as_fd + 1) : pass_fd;
        if (moved < 0 || ::dup2(moved, as_fd) < 0) {
            ::_exit(127);
        }
        if (as_fd > 3) {
            ::close_range(3, static_cast<unsigned>(as_fd - 1), 0);
        }
        first_closed = as_fd + 1;
    }
    ::close_range(static_cast<unsigned>(first_closed), ~0U, 0);
    ::execv(argv[0], argv.data());
    ::_exit(127);
}

bool connects(const std::string& path)
{
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::memcpy(sa.sun_path, path.c_str(), std::min(path.size() + 1, sizeof(sa.sun_path) - 1));
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const bool ok =
        fd >= 0 && ::connect(fd, reinterpret_cast<const sockaddr*>(&sa), sizeof(sa)) == 0;
    if (fd >= 0) {
        ::close(fd);
    }
    return ok;
}

//---- CPU time from /proc -----------------------------------------------------------------------

Sched processes_sched(const std::vector<pid_t>& pids)
{
    Sched sum;
    for (const pid_t pid : pids) {
        std::error_code ec;
        for (fs::directory_iterator it(fmt::format("/proc/{}/task", pid), ec), end;
             !ec && it != end; it.increment(ec)) {
            // "<ns on a CPU> <ns waiting to run> <times run>"; zeros when it cannot be read.
            std::ifstream in(it->path() / "schedstat");
            Sched s;
            in >> s.ns >> s.wait_ns >> s.runs;
            sum += s;
        }
    }
    return sum;
}

double cpu_ms(pid_t pid)
{
    return processes_sched({pid}).ms();
}

double thread_cpu_ms()
{
    timespec ts{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) / 1e6;
}

//---- the daemon under test ---------------------------------------------------------------------

std::vector<pid_t> qemus_under(const fs::path& runtime_dir)
{
    const std::string prefix = runtime_dir.string() + "/";
    std::vector<pid_t> out;
    std::error_code ec;
    for (fs::directory_iterator it("/proc", ec), end; !ec && it != end; it.increment(ec)) {
        const std::string name = it->path().filename().string();
        if (name.find_first_not_of("0123456789") != std::string::npos) {
            continue;
        }
        std::error_code link_ec;
        const std::string output = fs::read_symlink(it->path() / "fd" / "1", link_ec).string();
        if (!link_ec && output.starts_with(prefix) &&
            read_file(it->path() / "comm").starts_with("qemu")) {
            out.push_back(static_cast<pid_t>(std::stoi(name)));
        }
    }
    return out;
}

std::size_t kill_qemus_under(const fs::path& runtime_dir)
{
    const auto pids = qemus_under(runtime_dir);
    for (const pid_t p : pids) {
        ::kill(p, SIGKILL);
    }
    return pids.size();
}

std::size_t sockets_under(const fs::path& dir)
{
    std::size_t sockets = 0;
    std::error_code ec;
    for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::end(it);
         it.increment(ec)) {
        sockets += it->is_socket() ? 1 : 0;
    }
    return sockets;
}

Daemon::Daemon(std::string binary, const fs::path& dir)
    : binary_(std::move(binary))
    , runtime_dir_((dir / "r").string())
    , state_dir_((dir / "s").string())
    , log_path_((dir.parent_path() / (dir.filename().string() + ".log")).string())
    , socket_path_(runtime_dir_ + "/qmachined.sock")
{
    // The runtime directory exists before the first start, so that inotify can watch for the
    // socket from the spawn on (the daemon accepts a directory that is private already).
    for (const auto& d : {dir.string(), runtime_dir_}) {
        if (::mkdir(d.c_str(), 0700) != 0 && errno != EEXIST) {
            die(errno_text("mkdir " + d));
        }
    }
}

Daemon::~Daemon()
{
    if (pid_ > 0) {
        try {
            stop(SIGTERM);
        } catch (const std::exception& e) {
            fmt::print(stderr, "stopping qmachined: {}\n", e.what());
        }
    }
    close_watch();
    if (const auto k = kill_leftover_qemus(); k > 0) {
        fmt::print(stderr, "killed {} QEMU(s) left under {}\n", k, runtime_dir_);
    }
}

void Daemon::start(std::string_view policy, std::string_view level,
                   const std::vector<std::string>& extra)
{
    close_watch();
    // Watched before the spawn: the socket is bound under a temporary name and renamed into
    // place, each a directory event, so the wait needs no polling.
    watch_ = ::inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
    if (watch_ < 0 ||
        ::inotify_add_watch(watch_, runtime_dir_.c_str(), IN_CREATE | IN_MOVED_TO) < 0) {
        die(errno_text("inotify on " + runtime_dir_));
    }
    std::vector<std::string> argv{
        binary_,       "--state-dir",      state_dir_,          "--runtime-dir",    runtime_dir_,
        "--log-level", std::string(level), "--shutdown-policy", std::string(policy)};
    argv.insert(argv.end(), extra.begin(), extra.end());
    spawned_wall_ = std::chrono::system_clock::now();
    spawned_ = Clock::now();
    pid_ = spawn_child(std::move(argv), log_path_, SIGTERM);
}

double Daemon::wait_ready()
{
    const auto end = spawned_ + start_deadline;
    for (;;) {
        check_interrupted();
        if (connects(socket_path_)) {
            const double ms = elapsed_ms(spawned_, Clock::now());
            close_watch();
            return ms;
        }
        int status = 0;
        if (::waitpid(pid_, &status, WNOHANG) == pid_) {
            pid_ = -1;
            die("qmachined exited during start-up:\n" + log_tail());
        }
        if (Clock::now() > end) {
            die(fmt::format("qmachined's socket {} did not accept within {} s:\n{}", socket_path_,
                            start_deadline.count(), log_tail()));
        }
        // Woken by the socket's creation or rename; every 20 ms to see whether it died.
        pollfd p{watch_, POLLIN, 0};
        ::poll(&p, 1, 20);
        std::array<char, 4096> drain{};
        while (::read(watch_, drain.data(), drain.size()) > 0) {
        }
    }
}

double Daemon::stop(int signo, std::chrono::seconds deadline)
{
    const auto t0 = Clock::now();
    ::kill(pid_, signo);
    int status = 0;
    for (;;) {
        const pid_t r = ::waitpid(pid_, &status, WNOHANG);
        if (r == pid_ || (r < 0 && errno != EINTR)) {
            break;
        }
        if (Clock::now() - t0 > deadline) {
            ::kill(pid_, SIGKILL);
            ::waitpid(pid_, &status, 0);
            pid_ = -1;
            die(fmt::format("qmachined did not exit within {} s of {} (killed):\n{}",
                            deadline.count(), strsignal(signo), log_tail()));
        }
        // A child we have no other signal from (no sd_notify here): short naps, bounded by the
        // deadline.
        std::this_thread::sleep_for(1ms);
    }
    pid_ = -1;
    const double ms = elapsed_ms(t0, Clock::now());
    if (signo == SIGTERM && (!WIFEXITED(status) || WEXITSTATUS(status) != 0)) {
        die("qmachined did not exit with status 0 after SIGTERM:\n" + log_tail());
    }
    return ms;
}

std::string Daemon::log_tail() const
{
    const std::string all = read_file(log_path_);
    return all.size() > 4000 ? all.substr(all.size() - 4000) : all;
}

void Daemon::close_watch()
{
    if (watch_ >= 0) {
        ::close(watch_);
        watch_ = -1;
    }
}

void teardown(Daemon& daemon, const fs::path& dir, std::size_t machines,
              std::optional<std::size_t> floor_failed, Clock::time_point started)
{
    const double stop_ms = daemon.stop(SIGTERM);
    const std::size_t left = daemon.kill_leftover_qemus();
    const std::size_t sockets = sockets_under(dir);
    fmt::print("teardown: qmachined (shutdown-policy stop-machines) stopped its {} machines and "
               "exited in {:.0f} ms\n  after SIGTERM;{} {} QEMU(s) left{}; {} socket(s) left;\n  "
               "{} (definitions and logs, removed next);\n  load average at end {}; total {:.1f} "
               "s\n",
               machines, stop_ms, floor_failed ? " floor QEMUs quit;" : "", left,
               left > 0 ? " (KILLED)" : "", sockets, leftovers(dir), load_average(),
               std::chrono::duration<double>(Clock::now() - started).count());
    if (floor_failed && *floor_failed > 0) {
        die(fmt::format("floor: {} QEMUs did not quit with status 0", *floor_failed));
    }
    if (left > 0 || sockets > 0) {
        die("the daemon left QEMUs or sockets behind");
    }
}

//---- REST: a Beast client on the unix socket ---------------------------------------------------

Request make_request(http::verb verb, const std::string& target, std::string_view body)
{
    Request req{verb, target, 11};
    req.set(http::field::host, "qmachined");
    if (!body.empty()) {
        req.set(http::field::content_type, "application/json");
        req.body() = std::string(body);
    }
    req.keep_alive(true);
    req.prepare_payload();
    return req;
}

awaitable<expected<Reply>> exchange(Local::socket& socket, beast::flat_buffer& buffer,
                                    const Request& req)
{
    error_code ec;
    co_await http::async_write(socket, req, use_ec(ec));
    if (!ec) {
        http::response<http::string_body> res;
        co_await http::async_read(socket, buffer, res, use_ec(ec));
        if (!ec) {
            co_return Reply{res.result_int(), std::move(res.body())};
        }
    }
    co_return fail(errc::system_error, fmt::format("{} {}: {}", std::string(req.method_string()),
                                                   std::string(req.target()), ec.message()));
}

awaitable<expected<void>> connect(Local::socket& socket, std::string socket_path)
{
    error_code ec;
    co_await socket.async_connect(Local::endpoint(socket_path), use_ec(ec));
    if (ec) {
        co_return fail(errc::connect_failed,
                       fmt::format("connect to {}: {}", socket_path, ec.message()));
    }
    co_return expected<void>{};
}

awaitable<expected<Reply>> request(std::string socket_path, http::verb verb, std::string target,
                                   std::string body)
{
    Local::socket socket(co_await asio::this_coro::executor);
    if (auto c = co_await connect(socket, socket_path); !c) {
        co_return fail(c.error());
    }
    beast::flat_buffer buffer;
    auto r = co_await exchange(socket, buffer, make_request(verb, target, body));
    error_code ec;
    socket.close(ec);
    co_return r;
}

std::string qemu_version_of(const Reply& r)
{
    auto doc = json::parse(r.body);
    const json::Value* q = doc ? json::find(*doc, "qemu") : nullptr;
    if (q == nullptr || !q->IsObject()) {
        return "?";
    }
    return std::string(json::get_string(*q, "version").value_or("?"));
}

std::string none_spec(const std::string& qemu, bool console)
{
    return fmt::format(
        R"({{"binary":{},"machine":"none",{}"shutdown":{{"mode":"quit","timeout_s":10}}}})",
        json::quote(qemu), console ? "" : R"("console":{"enabled":false},)");
}

namespace {

// One connection creating and starting machines first, first + step, ...
awaitable<expected<void>> create_and_start_some(std::string socket_path, std::string spec,
                                                std::shared_ptr<Setup> setup, std::size_t first,
                                                std::size_t step)
{
    Local::socket socket(co_await asio::this_coro::executor);
    if (auto c = co_await connect(socket, socket_path); !c) {
        co_return fail(c.error());
    }
    beast::flat_buffer buffer;
    for (std::size_t i = first; i < setup->names.size(); i += step) {
        const std::string& name = setup->names[i];
        const std::string body = fmt::format(R"({{"name":{},"spec":{}}})", json::quote(name), spec);
        auto created =
            co_await exchange(socket, buffer, make_request(http::verb::post, "/v1/machines", body));
        if (!created) {
            co_return fail(created.error());
        }
        if (created->status != 201) {
            co_return fail(errc::invalid_state,
                           fmt::format("create '{}': {} {}", name, created->status, created->body));
        }
        for (int attempt = 1;; ++attempt) {
            auto started = co_await exchange(
                socket, buffer,
                make_request(http::verb::post, "/v1/machines/" + name + "/start", ""));
            if (!started) {
                co_return fail(started.error());
            }
            auto doc = json::parse(started->body);
            const auto state = doc ? json::get_string(*doc, "state") : std::nullopt;
            const auto pid = doc ? json::get_int(*doc, "pid") : std::nullopt;
            if (started->status == 200 && state == "running" && pid) {
                setup->pids[i] = static_cast<pid_t>(*pid);
                break;
            }
            const std::string why =
                fmt::format("start '{}': {} {}", name, started->status, started->body);
            if (started->status != 502 || attempt == start_attempts) {
                co_return fail(errc::launch_failed, why);
            }
            setup->failed_starts.push_back(why);
        }
    }
    error_code ec;
    socket.close(ec);
    co_return expected<void>{};
}

} // namespace

double create_and_start(asio::io_context& ioc, const std::string& socket_path,
                        const std::string& spec, const std::shared_ptr<Setup>& setup,
                        std::size_t connections)
{
    setup->pids.assign(setup->names.size(), -1);
    const std::size_t c = std::max<std::size_t>(1, std::min(connections, setup->names.size()));
    std::vector<awaitable<expected<void>>> ops;
    for (std::size_t k = 0; k < c; ++k) {
        ops.push_back(create_and_start_some(socket_path, spec, setup, k, c));
    }
    return run_all(ioc, std::move(ops), "REST", "create+start");
}

//---- a bare QEMU -------------------------------------------------------------------------------

BareQemu::~BareQemu()
{
    if (pid > 0) {
        ::kill(pid, SIGKILL);
        int status = 0;
        while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
    }
}

bool BareQemu::reap(std::chrono::milliseconds deadline)
{
    const auto end = Clock::now() + deadline;
    int status = 0;
    while (pid > 0 && Clock::now() < end) {
        const pid_t r = ::waitpid(pid, &status, WNOHANG);
        if (r == pid || (r < 0 && errno != EINTR)) {
            const bool exited = r == pid;
            pid = -1;
            return exited && WIFEXITED(status) && WEXITSTATUS(status) == 0;
        }
        // A child we have no other signal from: short naps, bounded by the deadline.
        std::this_thread::sleep_for(2ms);
    }
    return false;
}

std::vector<std::string> bare_template(std::vector<std::string> argv, const std::string& name)
{
    // The daemon's monitors (libmachine/machine/machine.cpp): "-chardev socket,id=mon-launch,fd=N"
    // (the socket pair it talks over) and "-chardev socket,id=mon,fd=M,server=on,wait=off" (the
    // served one), each followed by its -mon.
    std::vector<std::string> out;
    bool launch_monitor = false;
    for (std::size_t k = 0; k < argv.size(); ++k) {
        const std::string& a = argv[k];
        if (k > 0 && argv[k - 1] == "-chardev" && a.starts_with("socket,id=mon,")) {
            out.pop_back(); // its -chardev
            ++k;            // its "-mon", then "chardev=mon,mode=control"
            if (k + 1 < argv.size() && argv[k] == "-mon" &&
                argv[k + 1].starts_with("chardev=mon,")) {
                ++k;
                continue;
            }
            die("the daemon's served monitor is not followed by its -mon: " +
                proc::format_command_line(argv));
        }
        if (a.find("fd=") != std::string::npos) {
            if (k == 0 || argv[k - 1] != "-chardev" || !a.starts_with("socket,id=mon-launch,fd=")) {
                die("a bare QEMU gets one descriptor, the monitor; qmachined hands over '" + a +
                    "' too: " + proc::format_command_line(argv));
            }
            launch_monitor = true;
        }
        out.push_back(a);
        if (k > 0 && argv[k - 1] == "-name") {
            replace_all(out.back(), name, "@NAME@");
        }
    }
    if (!launch_monitor) {
        die("no launch monitor (-chardev socket,id=mon-launch,fd=N) in qmachined's command line: " +
            proc::format_command_line(argv));
    }
    return out;
}

std::unique_ptr<BareQemu> spawn_bare_qemu(asio::io_context& ioc, std::vector<std::string> argv,
                                          const std::string& name)
{
    int as_fd = -1;
    for (auto& a : argv) {
        replace_all(a, "@NAME@", name);
        if (const auto at = a.find("socket,id=mon-launch,fd="); at == 0) {
            as_fd = std::atoi(a.c_str() + std::strlen("socket,id=mon-launch,fd="));
        }
    }
    if (as_fd < 3) {
        die("a bare QEMU's monitor descriptor must be 3 or more");
    }
    std::array<int, 2> pair{};
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair.data()) != 0) {
        die(errno_text("socketpair"));
    }
    auto q = std::make_unique<BareQemu>();
    q->pid = spawn_child(std::move(argv), "", SIGKILL, pair[1], as_fd);
    ::close(pair[1]);
    q->socket.emplace(ioc, asio::generic::stream_protocol(AF_UNIX, 0), pair[0]);
    return q;
}

awaitable<expected<std::string>> read_reply(BareQemu* q, std::size_t* events)
{
    error_code ec;
    for (;;) {
        auto buffer = asio::dynamic_buffer(q->in);
        const std::size_t n = co_await asio::async_read_until(*q->socket, buffer, '\n', use_ec(ec));
        if (ec) {
            co_return fail(errc::qmp_disconnected, ec.message());
        }
        std::string line = q->in.substr(0, n);
        q->in.erase(0, n);
        if (line.find("\"event\"") == std::string::npos) {
            co_return line;
        }
        if (events != nullptr) {
            ++*events;
        }
    }
}

awaitable<expected<void>> negotiate(BareQemu* q)
{
    auto greeting = co_await read_reply(q);
    if (!greeting || greeting->find("\"QMP\"") == std::string::npos) {
        co_return fail(errc::qmp_protocol, "no QMP greeting");
    }
    error_code ec;
    const std::string_view caps = "{\"execute\":\"qmp_capabilities\"}\n";
    co_await asio::async_write(*q->socket, asio::buffer(caps), use_ec(ec));
    auto reply = co_await read_reply(q);
    if (ec || !reply || reply->find("\"return\"") == std::string::npos) {
        co_return fail(errc::qmp_protocol, "qmp_capabilities failed");
    }
    co_return expected<void>{};
}

double spawn_bare_qemus(asio::io_context& ioc, const std::vector<std::string>& argv,
                        const std::vector<std::string>& names, BareQemus& out)
{
    const auto t0 = Clock::now();
    std::vector<awaitable<expected<void>>> negotiations;
    for (const auto& name : names) {
        out.push_back(spawn_bare_qemu(ioc, argv, name));
        negotiations.push_back(negotiate(out.back().get()));
    }
    run_all(ioc, std::move(negotiations), "floor", "launch+negotiate");
    return elapsed_ms(t0, Clock::now());
}

std::size_t quit_all(BareQemus& qemus)
{
    for (auto& q : qemus) {
        error_code ec;
        const std::string_view quit = "{\"execute\":\"quit\"}\n";
        asio::write(*q->socket, asio::buffer(quit), ec);
    }
    std::size_t failed = 0;
    for (auto& q : qemus) {
        failed += q->reap(10s) ? 0 : 1;
    }
    qemus.clear();
    return failed;
}

} // namespace qm::bench
