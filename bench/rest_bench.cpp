// SPDX-License-Identifier: GPL-2.0-or-later
// rest-bench: QMP passthrough through the real qmachined's REST socket (`POST
// /v1/machines/{name}/qmp`) against direct QMP to QEMU (the floor), with 1 and 32 concurrent
// keep-alive clients over 50 `qemu-system-x86_64 -machine none`. Not a test: it prints figures
// (bench/README.md).
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>

#include "bench/floor.hpp"
#include "bench/stats.hpp"
#include "daemon/rest/beast.hpp" // includes libmachine/asio.hpp first (trap 1)
#include "libmachine/json.hpp"
#include "libmachine/proc/spawn.hpp"
#include "libmachine/qmp/address.hpp"
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
using qm::bench::die;
using qm::bench::percentile;
using Local = asio::local::stream_protocol;
using Request = http::request<http::string_body>;

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
// The daemon's start-up (the REST socket appearing) and its SIGTERM (every machine stopped).
constexpr auto daemon_start_deadline = 10s;
constexpr auto daemon_stop_deadline = 60s;

// `-machine none` with no console, as the issue says; `quit` to stop, because the default
// (`powerdown`, 30 s) does nothing to a machine without ACPI and would make the daemon's SIGTERM
// take 30 s per batch of 16 machines.
constexpr std::string_view spec_template =
    R"({{"binary":{},"machine":"none","console":{{"enabled":false}},)"
    R"("shutdown":{{"mode":"quit","timeout_s":10}}}})";
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

void nap()
{
    // Polling a child process we have no other signal from (no sd_notify here): short naps,
    // bounded by a deadline.
    std::this_thread::sleep_for(2ms);
}

//---- the daemon under test ---------------------------------------------------------------------

// QM_QMACHINED from the environment, else the qmachined this build made (its path is compiled
// in), else ../daemon/qmachined beside this program.
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
        fs::path(qm::bench::self_path()).parent_path().parent_path() / "daemon" / "qmachined";
    if (::access(sibling.c_str(), X_OK) == 0) {
        return sibling.string();
    }
    die("qmachined not found: build it (ninja daemon/qmachined) or set QM_QMACHINED");
}

// The text of /proc/<pid>/cmdline, NUL-separated arguments; empty once the process is gone (or a
// zombie).
std::vector<std::string> command_line(pid_t pid)
{
    std::ifstream in(fmt::format("/proc/{}/cmdline", pid), std::ios::binary);
    std::vector<std::string> argv;
    for (std::string a; std::getline(in, a, '\0');) {
        argv.push_back(a);
    }
    return argv;
}

// What the scheduler counts for threads (schedstat: time on a CPU, and how many times they were
// put on one), summed.
struct Sched
{
    std::uint64_t ns = 0;
    std::uint64_t runs = 0;

    Sched& operator+=(const Sched& o)
    {
        ns += o.ns;
        runs += o.runs;
        return *this;
    }
    Sched operator-(const Sched& o) const { return {ns - o.ns, runs - o.runs}; }
};

// One thread's schedstat: "<ns on a CPU> <ns waiting to run> <times run>"; zeros when it cannot
// be read.
Sched thread_sched(const fs::path& schedstat)
{
    std::ifstream in(schedstat);
    Sched s;
    std::uint64_t waited = 0;
    in >> s.ns >> waited >> s.runs;
    return s;
}

// Summed over every thread of each process of `pids` (threads that already ended are not counted:
// QEMU's and the daemon's live as long as the process).
Sched processes_sched(const std::vector<pid_t>& pids)
{
    Sched sum;
    for (const pid_t pid : pids) {
        std::error_code ec;
        for (fs::directory_iterator it(fmt::format("/proc/{}/task", pid), ec), end;
             !ec && it != end; it.increment(ec)) {
            sum += thread_sched(it->path() / "schedstat");
        }
    }
    return sum;
}

// fork + exec of `argv` (an absolute path first) as qm::proc::spawn starts a QEMU: a session of
// its own (the terminal's ^C reaches only us, and we stop what we started), default signal
// dispositions and an empty mask, stdin from /dev/null, stdout and stderr to `out` (/dev/null
// when empty), no other descriptor of ours. Besides, the kernel sends it `death_signal` should we
// die first (PR_SET_PDEATHSIG, which posix_spawn cannot ask for): nothing of a run outlives the
// benchmark, even SIGKILLed.
pid_t spawn_child(std::vector<std::string> args, const std::string& out, int death_signal)
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
        die(qm::bench::errno_text("fork"));
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
    ::close_range(3, ~0U, 0);
    ::execv(argv[0], argv.data());
    ::_exit(127);
}

// The real qmachined as a child (spawn_child: SIGTERM, which stops its machines, should we die
// without stopping it). Its output goes to a log file, shown when it fails. The destructor stops
// it if it still runs and kills any QEMU of it that outlived it.
class DaemonProcess
{
public:
    DaemonProcess(std::string binary, const fs::path& dir)
        : binary_(std::move(binary))
        , runtime_dir_((dir / "r").string())
        , state_dir_((dir / "s").string())
        , log_path_((dir / "daemon.log").string())
        , socket_path_(runtime_dir_ + "/qmachined.sock")
    {}
    DaemonProcess(const DaemonProcess&) = delete;
    DaemonProcess& operator=(const DaemonProcess&) = delete;
    ~DaemonProcess()
    {
        if (pid_ > 0) {
            try {
                stop();
            } catch (const std::exception& e) {
                fmt::print(stderr, "rest-bench: stopping qmachined: {}\n", e.what());
            }
        }
        kill_leftover_qemus();
    }

    void start()
    {
        pid_ = spawn_child({binary_, "--state-dir", state_dir_, "--runtime-dir", runtime_dir_,
                            "--log-level", "warn", "--shutdown-policy", "stop-machines"},
                           log_path_, SIGTERM);
    }

    // Until the REST socket accepts: it appears only once the daemon can answer (bound under a
    // temporary name, then renamed).
    void wait_ready()
    {
        const auto end = Clock::now() + daemon_start_deadline;
        for (;;) {
            qm::bench::check_interrupted();
            int status = 0;
            if (::waitpid(pid_, &status, WNOHANG) == pid_) {
                pid_ = -1;
                die("qmachined exited during start-up:\n" + log_tail());
            }
            if (connects()) {
                return;
            }
            if (Clock::now() > end) {
                die(fmt::format("qmachined's socket {} did not accept within {} s:\n{}",
                                socket_path_, daemon_start_deadline.count(), log_tail()));
            }
            nap();
        }
    }

    // SIGTERM, then until it has exited (having stopped every machine). Returns the time in ms.
    // Dies when it did not exit with status 0 or left a QEMU behind.
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
            if (Clock::now() - t0 > daemon_stop_deadline) {
                ::kill(pid_, SIGKILL);
                ::waitpid(pid_, &status, 0);
                pid_ = -1;
                die(fmt::format("qmachined did not exit within {} s of SIGTERM (killed)",
                                daemon_stop_deadline.count()));
            }
            nap();
        }
        pid_ = -1;
        const double ms = qm::bench::elapsed_ms(t0, Clock::now());
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            die("qmachined did not exit with status 0 after SIGTERM:\n" + log_tail());
        }
        if (const int left = kill_leftover_qemus(); left > 0) {
            die(fmt::format("qmachined exited leaving {} QEMU(s) running (killed)", left));
        }
        return ms;
    }

    // The QEMUs it started (learnt from the start responses): killed should they outlive it.
    void add_qemu(pid_t pid) { qemus_.push_back(pid); }

    pid_t pid() const noexcept { return pid_; }
    const std::string& socket_path() const noexcept { return socket_path_; }
    const std::string& runtime_dir() const noexcept { return runtime_dir_; }

    std::string log_tail() const
    {
        std::ifstream in(log_path_);
        const std::string all((std::istreambuf_iterator<char>(in)),
                              std::istreambuf_iterator<char>());
        return all.size() > 4000 ? all.substr(all.size() - 4000) : all;
    }

private:
    bool connects() const
    {
        sockaddr_un sa{};
        sa.sun_family = AF_UNIX;
        std::memcpy(sa.sun_path, socket_path_.c_str(),
                    std::min(socket_path_.size() + 1, sizeof(sa.sun_path) - 1));
        const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        const bool ok =
            fd >= 0 && ::connect(fd, reinterpret_cast<const sockaddr*>(&sa), sizeof(sa)) == 0;
        if (fd >= 0) {
            ::close(fd);
        }
        return ok;
    }

    // SIGKILLs every QEMU of ours still running (its command line names our runtime directory: a
    // recycled pid is left alone). Returns how many there were.
    int kill_leftover_qemus()
    {
        int n = 0;
        for (const pid_t q : qemus_) {
            const auto argv = command_line(q);
            const bool ours = std::any_of(argv.begin(), argv.end(), [&](const std::string& a) {
                return a.find(runtime_dir_) != std::string::npos;
            });
            if (ours) {
                ::kill(q, SIGKILL);
                ++n;
            }
        }
        qemus_.clear();
        return n;
    }

    std::string binary_;
    std::string runtime_dir_;
    std::string state_dir_;
    std::string log_path_;
    std::string socket_path_;
    pid_t pid_ = -1;
    std::vector<pid_t> qemus_;
};

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

struct Reply
{
    unsigned status = 0;
    std::string body;
};

// One request and its response on a kept-alive connection.
awaitable<qm::expected<Reply>> exchange(Local::socket& socket, beast::flat_buffer& buffer,
                                        const Request& req)
{
    error_code ec;
    co_await http::async_write(socket, req, use_ec(ec));
    if (!ec) {
        http::response<http::string_body> res;
        co_await http::async_read(socket, buffer, res, use_ec(ec));
        if (!ec) {
            Reply reply;
            reply.status = res.result_int();
            reply.body = std::move(res.body());
            co_return reply;
        }
    }
    co_return qm::fail(qm::errc::system_error,
                       fmt::format("{} {}: {}", std::string(req.method_string()),
                                   std::string(req.target()), ec.message()));
}

// Where the machines' QEMUs are, learnt from the start responses.
struct Started
{
    std::vector<pid_t> pids;
};

// Creates machine `name` and starts it, over a connection of its own. The QEMU's pid goes to
// started->pids[index].
awaitable<qm::expected<void>> create_and_start(std::string socket_path, std::string name,
                                               std::string spec, std::shared_ptr<Started> started,
                                               std::size_t index)
{
    Local::socket socket(co_await asio::this_coro::executor);
    const Local::endpoint endpoint(socket_path);
    error_code ec;
    co_await socket.async_connect(endpoint, use_ec(ec));
    if (ec) {
        co_return qm::fail(qm::errc::connect_failed,
                           fmt::format("connect to {}: {}", socket_path, ec.message()));
    }
    beast::flat_buffer buffer;
    const std::string body = fmt::format(R"({{"name":{},"spec":{}}})", qm::json::quote(name), spec);
    const Request create = make_request(http::verb::post, "/v1/machines", body);
    auto created = co_await exchange(socket, buffer, create);
    if (!created) {
        co_return qm::fail(created.error());
    }
    if (created->status != 201) {
        co_return qm::fail(qm::errc::invalid_state,
                           fmt::format("create '{}': {} {}", name, created->status, created->body));
    }
    const Request start = make_request(http::verb::post, "/v1/machines/" + name + "/start", "");
    auto reply = co_await exchange(socket, buffer, start);
    if (!reply) {
        co_return qm::fail(reply.error());
    }
    auto doc = qm::json::parse(reply->body);
    const auto state = doc ? qm::json::get_string(*doc, "state") : std::nullopt;
    const auto pid = doc ? qm::json::get_int(*doc, "pid") : std::nullopt;
    if (reply->status != 200 || state != "running" || !pid) {
        co_return qm::fail(qm::errc::launch_failed,
                           fmt::format("start '{}': {} {}", name, reply->status, reply->body));
    }
    started->pids[index] = static_cast<pid_t>(*pid);
    socket.close(ec);
    co_return qm::expected<void>{};
}

// One GET on a connection of its own (the version, for the header).
awaitable<qm::expected<Reply>> get(std::string socket_path, std::string target)
{
    Local::socket socket(co_await asio::this_coro::executor);
    const Local::endpoint endpoint(socket_path);
    error_code ec;
    co_await socket.async_connect(endpoint, use_ec(ec));
    if (ec) {
        co_return qm::fail(qm::errc::connect_failed, ec.message());
    }
    beast::flat_buffer buffer;
    const Request req = make_request(http::verb::get, target, "");
    auto r = co_await exchange(socket, buffer, req);
    socket.close(ec);
    co_return r;
}

//---- the floor: QMP straight to QEMU -----------------------------------------------------------

// One QEMU of the floor, on qmachined's own command line: the one of its first machine, with
// -name and the monitor socket rewritten. Spawned as the daemon spawns its QEMUs (spawn_child:
// a session of its own, no shell; SIGKILL should we die), output to /dev/null; like the daemon,
// we listen and QEMU connects. The destructor kills and reaps it if it still runs.
struct FloorQemu
{
    FloorQemu() = default;
    FloorQemu(const FloorQemu&) = delete;
    FloorQemu& operator=(const FloorQemu&) = delete;
    ~FloorQemu()
    {
        if (pid > 0) {
            ::kill(pid, SIGKILL);
            int status = 0;
            while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
            }
        }
    }

    // Until it has exited (true: with status 0), or `deadline` has passed.
    bool reap(std::chrono::milliseconds deadline)
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
            nap();
        }
        return false;
    }

    pid_t pid = -1;
    std::optional<qm::qmp::Listener> listener;
};

void replace_all(std::string& s, std::string_view from, std::string_view to)
{
    for (auto at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) {
        s.replace(at, from.size(), to);
    }
}

// qmachined's command line for machine `name` (read from /proc while it runs), with its monitor
// socket and its name as placeholders: @SOCKET@, @NAME@.
std::vector<std::string> floor_template(std::vector<std::string> argv, const std::string& name)
{
    std::string socket;
    for (std::size_t k = 1; k < argv.size(); ++k) {
        if (argv[k - 1] == "-chardev" && argv[k].find("qemu-monitor.sock") != std::string::npos) {
            const auto at = argv[k].find("path=") + 5;
            socket = argv[k].substr(at, argv[k].find(',', at) - at);
        }
    }
    if (socket.empty()) {
        die("no monitor socket in qmachined's command line: " +
            qm::proc::format_command_line(argv));
    }
    for (std::size_t k = 0; k < argv.size(); ++k) {
        replace_all(argv[k], socket, "@SOCKET@");
        if (k > 0 && argv[k - 1] == "-name") {
            replace_all(argv[k], name, "@NAME@");
        }
    }
    return argv;
}

// Listens on `socket` and spawns the template's QEMU for it.
std::unique_ptr<FloorQemu> spawn_floor_qemu(asio::io_context& ioc, std::vector<std::string> argv,
                                            const std::string& socket, const std::string& name)
{
    auto q = std::make_unique<FloorQemu>();
    auto listener =
        qm::qmp::Listener::open(ioc.get_executor(), qm::qmp::Address::unix_socket(socket));
    if (!listener) {
        die("floor: " + listener.error().message);
    }
    q->listener.emplace(std::move(*listener));
    for (auto& a : argv) {
        replace_all(a, "@SOCKET@", socket);
        replace_all(a, "@NAME@", name);
    }
    q->pid = spawn_child(std::move(argv), "", SIGKILL);
    return q;
}

// A negotiated QMP monitor of one floor QEMU: a raw socket and what was read past the last line.
struct Monitor
{
    std::optional<qm::qmp::Socket> socket;
    std::string in;
};

using Monitors = std::vector<Monitor>;

// The next line from QEMU that is not an event (qmp-spec 2.5: an event may come at any time),
// removed from m.in.
awaitable<qm::expected<std::string>> read_reply(Monitor& m)
{
    error_code ec;
    for (;;) {
        auto buffer = asio::dynamic_buffer(m.in);
        const std::size_t n = co_await asio::async_read_until(*m.socket, buffer, '\n', use_ec(ec));
        if (ec) {
            co_return qm::fail(qm::errc::qmp_disconnected, ec.message());
        }
        std::string line = m.in.substr(0, n);
        m.in.erase(0, n);
        if (line.find("\"event\"") == std::string::npos) {
            co_return line;
        }
    }
}

// Accepts floor QEMU `index`'s monitor connection and negotiates it as any QMP client must: the
// greeting, then qmp_capabilities.
awaitable<qm::expected<void>> negotiate(FloorQemu* qemu, std::shared_ptr<Monitors> monitors,
                                        std::size_t index)
{
    auto socket = co_await qemu->listener->accept(10s);
    if (!socket) {
        co_return qm::fail(socket.error());
    }
    qemu->listener.reset(); // as the daemon does: once QEMU is connected, the socket file goes
    Monitor& m = (*monitors)[index];
    m.socket.emplace(std::move(*socket));
    auto greeting = co_await read_reply(m);
    if (!greeting || greeting->find("\"QMP\"") == std::string::npos) {
        co_return qm::fail(qm::errc::qmp_protocol, "no QMP greeting");
    }
    error_code ec;
    const std::string_view caps = "{\"execute\":\"qmp_capabilities\"}\n";
    co_await asio::async_write(*m.socket, asio::buffer(caps), use_ec(ec));
    auto reply = co_await read_reply(m);
    if (ec || !reply || reply->find("\"return\"") == std::string::npos) {
        co_return qm::fail(qm::errc::qmp_protocol, "qmp_capabilities failed");
    }
    co_return qm::expected<void>{};
}

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
awaitable<void> floor_client(std::shared_ptr<Monitors> monitors, std::vector<std::size_t> mine,
                             std::shared_ptr<Window> w)
{
    const ClientGuard guard(*w);
    error_code ec;
    for (std::size_t i = 0; !w->stopping; ++i) {
        Monitor& m = (*monitors)[mine[i % mine.size()]];
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
    const DaemonProcess& daemon;
    std::shared_ptr<const std::vector<Request>> requests; // machine i's QMP request
    std::shared_ptr<Monitors> monitors;                   // floor QEMU i's monitor
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
            asio::co_spawn(load.ioc, floor_client(load.monitors, std::move(mine), w), on_end);
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
        "  --concurrency LIST  concurrent clients, each at most --machines (default 1,32)\n"
        "QM_QMACHINED names the daemon (default: the one built with this benchmark), QM_QEMU "
        "the QEMU\nbinary (default qemu-system-x86_64 in PATH).\n");
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

std::string qemu_version_of(const Reply& r)
{
    auto doc = qm::json::parse(r.body);
    const qm::json::Value* q = doc ? qm::json::find(*doc, "qemu") : nullptr;
    if (q == nullptr || !q->IsObject()) {
        return "?";
    }
    return std::string(qm::json::get_string(*q, "version").value_or("?"));
}

int run(const Args& args)
{
    const auto started = Clock::now();
    qm::bench::raise_fd_limit();
    // A short directory: the daemon's machine sockets are inside it, and a unix socket's path
    // has at most 107 bytes.
    qm::bench::Env env(fs::temp_directory_path(), "rb");
    const auto machines = static_cast<std::size_t>(args.machines);
    try {
        DaemonProcess daemon(qmachined_binary(), env.dir);
        std::vector<std::unique_ptr<FloorQemu>> floor_qemus;
        auto monitors = std::make_shared<Monitors>(machines);

        // The daemon, its machines, the floor's QEMUs.
        daemon.start();
        daemon.wait_ready();
        const std::string spec = fmt::format(spec_template, qm::json::quote(env.qemu));
        auto pids = std::make_shared<Started>();
        pids->pids.assign(machines, -1);
        std::vector<awaitable<qm::expected<void>>> setups;
        for (std::size_t i = 0; i < machines; ++i) {
            setups.push_back(create_and_start(daemon.socket_path(),
                                              machine_name(static_cast<int>(i)), spec, pids, i));
        }
        double setup_ms = 0;
        try {
            setup_ms = qm::bench::run_all(env.ioc, std::move(setups), "REST", "create+start");
        } catch (...) {
            for (const pid_t p : pids->pids) {
                if (p > 0) {
                    daemon.add_qemu(p);
                }
            }
            throw;
        }
        for (const pid_t p : pids->pids) {
            daemon.add_qemu(p);
        }
        const std::vector<std::string> daemon_argv = command_line(pids->pids.front());
        const auto floor_argv = floor_template(daemon_argv, machine_name(0));
        fs::create_directories(env.dir / "f");
        const auto floor_t0 = Clock::now();
        std::vector<awaitable<qm::expected<void>>> negotiations;
        for (std::size_t i = 0; i < machines; ++i) {
            floor_qemus.push_back(spawn_floor_qemu(
                env.ioc, floor_argv, (env.dir / "f" / fmt::format("{}.sock", i)).string(),
                fmt::format("f{:02}", i)));
            negotiations.push_back(negotiate(floor_qemus.back().get(), monitors, i));
        }
        qm::bench::run_all(env.ioc, std::move(negotiations), "floor", "launch+negotiate");
        const double floor_ms = qm::bench::elapsed_ms(floor_t0, Clock::now());

        const auto version = qm::test::run_co(env.ioc, get(daemon.socket_path(), "/v1/version"));
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
        fmt::print("command line (the floor's QEMUs differ only in -name and the socket):\n  {}\n",
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

        Load load{env.ioc, daemon, nullptr, monitors, machines, pids->pids, {}};
        for (const auto& q : floor_qemus) {
            load.floor_qemus.push_back(q->pid);
        }
        auto requests = std::make_shared<std::vector<Request>>();
        for (std::size_t i = 0; i < machines; ++i) {
            requests->push_back(make_request(
                http::verb::post, "/v1/machines/" + machine_name(static_cast<int>(i)) + "/qmp",
                qmp_body));
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
                    t,
                    [&] { row.rest.add(run_window(load, Side::rest, c, window_warm_up, measure)); },
                    [&] {
                        row.floor.add(run_window(load, Side::floor, c, window_warm_up, measure));
                    });
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
                           r.concurrency, side_name(s), f.p50(), f.p99(), f.rps50(),
                           range_of(f.rps), f.us.size(), q, d, c, q + d + c,
                           100 * percentile(f.busy, 50), percentile(f.qemu_runs, 50));
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
        for (auto& m : *monitors) {
            error_code ec;
            const std::string_view quit = "{\"execute\":\"quit\"}\n";
            asio::write(*m.socket, asio::buffer(quit), ec);
        }
        int floor_failed = 0;
        for (auto& q : floor_qemus) {
            floor_failed += q->reap(10s) ? 0 : 1;
        }
        monitors->clear();
        floor_qemus.clear();
        const double daemon_ms = daemon.stop();
        if (floor_failed > 0) {
            die(fmt::format("floor: {} QEMUs did not quit with status 0", floor_failed));
        }
        // The state directory keeps the definitions (removed with the whole directory next);
        // the runtime directory must hold no socket.
        std::size_t sockets = 0;
        std::error_code ec;
        for (auto it = fs::recursive_directory_iterator(env.dir, ec); !ec && it != fs::end(it);
             it.increment(ec)) {
            sockets += it->is_socket() ? 1 : 0;
        }
        fmt::print("teardown: qmachined stopped its {} machines and exited in {:.0f} ms after "
                   "SIGTERM; floor QEMUs quit;\n  {} sockets left; {} (the definitions, "
                   "removed next);\n  load average at end {}; total {:.1f} s\n",
                   machines, daemon_ms, sockets, qm::bench::leftovers(env.dir),
                   qm::bench::load_average(),
                   std::chrono::duration<double>(Clock::now() - started).count());
        return 0;
    } catch (const std::exception& e) {
        fmt::print(stderr, "rest-bench: {}\n", e.what());
        return 1;
    }
}

} // namespace

int main(int argc, char** argv)
{
    qm::bench::install_signal_handlers();
    Args args;
    using qm::bench::parse_int;
    const std::vector<qm::bench::Option> options{
        {"--machines",
         [&](std::string_view v) {
             args.machines = parse_int("--machines", v, 1);
         }},
        {"--seconds",
         [&](std::string_view v) {
             args.seconds = parse_int("--seconds", v, 1);
         }},
        {"--trials",
         [&](std::string_view v) {
             args.trials = parse_int("--trials", v, 1);
         }},
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
