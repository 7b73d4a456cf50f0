// SPDX-License-Identifier: GPL-2.0-or-later
// The real qmachined under a benchmark, and what the benchmarks that run it share: the daemon as a
// child (started, waited for, stopped, its QEMUs found and killed), a Beast client for its REST
// socket, machines created and started over it, CPU time from /proc, and a bare QEMU on the
// daemon's own command line driven straight over QMP (the floor beside the daemon).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <sys/types.h>

#include "daemon/rest/beast.hpp" // includes libmachine/asio.hpp first (trap 1)
#include "libmachine/expected.hpp"
#include "libmachine/qmp/address.hpp"

namespace qm::bench {

using Local = asio::local::stream_protocol;
using Request = rest::http::request<rest::http::string_body>;

//---- processes ---------------------------------------------------------------------------------

// QM_QMACHINED from the environment, else the qmachined this build made (its path is compiled
// in), else ../daemon/qmachined beside this program.
std::string qmachined_binary();

// The end of the usage text of a benchmark that runs qmachined.
inline constexpr std::string_view environment_usage =
    "QM_QMACHINED names the daemon (default: the one built with this benchmark), QM_QEMU the "
    "QEMU\nbinary (default qemu-system-x86_64 in PATH).\n";

std::string read_file(const std::filesystem::path& p);

// The arguments of /proc/<pid>/cmdline; empty once the process is gone (or a zombie).
std::vector<std::string> command_line(pid_t pid);

// fork + exec of `args` (an absolute path first) as qm::proc::spawn starts a QEMU: a session of
// its own (the terminal's ^C reaches only us, and we stop what we started), default signal
// dispositions and an empty mask, stdin from /dev/null, stdout and stderr to `out` (/dev/null
// when empty), no other descriptor of ours but `pass_fd`, which becomes descriptor `as_fd`.
// Besides, the kernel sends it `death_signal` should we die first (PR_SET_PDEATHSIG, which
// posix_spawn cannot ask for): nothing of a run outlives the benchmark, even SIGKILLed.
pid_t spawn_child(std::vector<std::string> args, const std::string& out, int death_signal,
                  int pass_fd = -1, int as_fd = -1);

// Whether a unix stream socket at `path` accepts a connection now.
bool connects(const std::string& path);

//---- CPU time from /proc -----------------------------------------------------------------------

// What the scheduler counts for threads (schedstat: time on a CPU, kernel time included, in ns;
// how many times they were put on one; time runnable but waiting for a CPU, in ns), summed.
struct Sched
{
    std::uint64_t ns = 0;
    std::uint64_t runs = 0;
    std::uint64_t wait_ns = 0;

    Sched& operator+=(const Sched& o)
    {
        ns += o.ns;
        runs += o.runs;
        wait_ns += o.wait_ns;
        return *this;
    }
    Sched operator-(const Sched& o) const
    {
        return {ns - o.ns, runs - o.runs, wait_ns - o.wait_ns};
    }
    double ms() const { return static_cast<double>(ns) / 1e6; }
    double wait_ms() const { return static_cast<double>(wait_ns) / 1e6; }
};

// Summed over every thread of each process of `pids` (threads that already ended are not counted:
// QEMU's and the daemon's live as long as the process); nothing for a process that is gone.
Sched processes_sched(const std::vector<pid_t>& pids);

// CPU time of every thread of `pid` so far, in ms.
double cpu_ms(pid_t pid);

// CPU time of the calling thread so far, in ms.
double thread_cpu_ms();

//---- the daemon under test ---------------------------------------------------------------------

// The QEMUs a daemon started under `runtime_dir`: their output goes to "<runtime>/m/<id>/qemu.log"
// (their command lines name no path: they get their sockets as descriptors). The daemon itself
// writes elsewhere.
std::vector<pid_t> qemus_under(const std::filesystem::path& runtime_dir);

// SIGKILLs them; returns how many there were.
std::size_t kill_qemus_under(const std::filesystem::path& runtime_dir);

// The unix sockets below `dir`.
std::size_t sockets_under(const std::filesystem::path& dir);

// qmachined on a state and runtime directory of its own (`dir`/s, `dir`/r), started and stopped
// as often as a benchmark likes: forked by spawn_child (SIGTERM should we die, which stops its
// machines under stop-machines), its output in `dir`.log, truncated at each start. The destructor
// stops one still running (SIGTERM, SIGKILL after the stop deadline) and kills any QEMU of it that
// is left: whatever the way out, no QEMU of a run outlives it.
class Daemon
{
public:
    Daemon(std::string binary, const std::filesystem::path& dir);
    Daemon(const Daemon&) = delete;
    Daemon& operator=(const Daemon&) = delete;
    ~Daemon();

    // Spawns it with `--shutdown-policy policy --log-level level` and `extra`; wait_ready() next.
    void start(std::string_view policy, std::string_view level,
               const std::vector<std::string>& extra = {});

    // Until its REST socket accepts a connection (it appears only once the daemon can answer:
    // bound under a temporary name, then renamed, after every machine is re-attached); returns
    // the time since the spawn, in ms. Dies when it exits or does not get there in time.
    double wait_ready();

    // Sends `signo` and waits until it has exited; returns the time in ms. After SIGTERM it must
    // exit with status 0.
    double stop(int signo, std::chrono::seconds deadline = std::chrono::seconds(120));

    // SIGKILLs every QEMU still running under its runtime directory; returns how many.
    std::size_t kill_leftover_qemus() { return kill_qemus_under(runtime_dir_); }

    // The end of its log, for error messages.
    std::string log_tail() const;

    pid_t pid() const noexcept { return pid_; }
    const std::string& socket_path() const noexcept { return socket_path_; }
    const std::string& runtime_dir() const noexcept { return runtime_dir_; }
    const std::string& log_path() const noexcept { return log_path_; }
    std::chrono::system_clock::time_point spawned_wall() const noexcept { return spawned_wall_; }

private:
    void close_watch();

    std::string binary_;
    std::string runtime_dir_;
    std::string state_dir_;
    std::string log_path_;
    std::string socket_path_;
    pid_t pid_ = -1;
    int watch_ = -1;
    std::chrono::steady_clock::time_point spawned_{};
    std::chrono::system_clock::time_point spawned_wall_{};
};

// The end of a run: SIGTERM to `daemon` (started with shutdown-policy stop-machines, so that it
// stops its `machines` machines), which must exit with status 0 and leave no QEMU (one left is
// killed) and no socket under `dir`. Prints a line on what it took and what was left (`started`:
// when the run began); dies when anything was left, or when `floor_failed` (the bare QEMUs of the
// run that did not quit with status 0, if it had any) is not 0.
void teardown(Daemon& daemon, const std::filesystem::path& dir, std::size_t machines,
              std::optional<std::size_t> floor_failed,
              std::chrono::steady_clock::time_point started);

//---- REST: a Beast client on the unix socket ---------------------------------------------------

Request make_request(rest::http::verb verb, const std::string& target, std::string_view body);

struct Reply
{
    unsigned status = 0;
    std::string body;
};

// One request and its response on a kept-alive connection.
awaitable<expected<Reply>> exchange(Local::socket& socket, rest::beast::flat_buffer& buffer,
                                    const Request& req);

// Connects `socket` to the daemon's REST socket; errc::connect_failed.
awaitable<expected<void>> connect(Local::socket& socket, std::string socket_path);

// One request on a connection of its own.
awaitable<expected<Reply>> request(std::string socket_path, rest::http::verb verb,
                                   std::string target, std::string body);

// QEMU's version from GET /v1/version's answer; "?" when it has none.
std::string qemu_version_of(const Reply& r);

// The spec of a `-machine none` QEMU (`qemu`, an absolute path), with or without its console;
// `quit` to stop, because the default (`powerdown`, 30 s) does nothing to a machine without ACPI
// and would make the daemon's SIGTERM take 30 s per batch of 16 machines.
std::string none_spec(const std::string& qemu, bool console);

// What creating and starting machines saw: each machine's name (given) and QEMU pid, and the
// starts that failed and were tried again.
struct Setup
{
    std::vector<std::string> names;
    std::vector<pid_t> pids;
    std::vector<std::string> failed_starts;
};

// Creates (`spec`) and starts every machine of `setup` over `connections` keep-alive connections
// at once; returns the time it took, in ms. A start that fails with 502 is tried again (up to 3
// times in all) and counted in failed_starts: the benchmarks measure something else.
double create_and_start(asio::io_context& ioc, const std::string& socket_path,
                        const std::string& spec, const std::shared_ptr<Setup>& setup,
                        std::size_t connections);

//---- a bare QEMU: the daemon's command line, QMP straight to it --------------------------------

// A QEMU started as qmachined starts one, without qmachined: the command line of one of its
// machines with another -name, and the monitor the daemon talks to at launch (a socket pair,
// handed over as a descriptor) connected to us instead; the one QEMU serves for a daemon that
// attaches after a restart is left out. Output to /dev/null; SIGKILL should we die. The destructor
// kills and reaps it if it still runs.
struct BareQemu
{
    BareQemu() = default;
    BareQemu(const BareQemu&) = delete;
    BareQemu& operator=(const BareQemu&) = delete;
    ~BareQemu();

    // Until it has exited (true: with status 0), or `deadline` has passed.
    bool reap(std::chrono::milliseconds deadline);

    pid_t pid = -1;
    std::optional<qmp::Socket> socket;
    std::string in; // read past the last line
};

// qmachined's command line for machine `name` (as /proc shows it while the machine runs), with
// the name as a placeholder and the served monitor left out. Dies when it hands QEMU any other
// descriptor (a console, say) than the launch monitor.
std::vector<std::string> bare_template(std::vector<std::string> argv, const std::string& name);

std::unique_ptr<BareQemu> spawn_bare_qemu(asio::io_context& ioc, std::vector<std::string> argv,
                                          const std::string& name);

using BareQemus = std::vector<std::unique_ptr<BareQemu>>;

// Spawns one bare QEMU per name on `argv` (a bare_template) into `out` and negotiates them all at
// once; returns the time it took, in ms.
double spawn_bare_qemus(asio::io_context& ioc, const std::vector<std::string>& argv,
                        const std::vector<std::string>& names, BareQemus& out);

// Sends each of `qemus` `quit` and reaps it; returns how many did not exit with status 0 within
// 10 s (killed). `qemus` is empty after.
std::size_t quit_all(BareQemus& qemus);

// The next line from QEMU that is not an event (qmp-spec 2.5: an event may come at any time),
// removed from q.in; events before it are counted in `*events` when given.
awaitable<expected<std::string>> read_reply(BareQemu* q, std::size_t* events = nullptr);

// Negotiates as any QMP client must: the greeting, then qmp_capabilities.
awaitable<expected<void>> negotiate(BareQemu* q);

} // namespace qm::bench
