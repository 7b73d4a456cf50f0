// SPDX-License-Identifier: GPL-2.0-or-later
// Programs as children of a test: qmachined with its output in a file, a command run to completion
// with its output captured (curl, qmachinectl), and what /proc says about a process (its children,
// its open descriptors, who mentions a path). Header only: the daemon, D-Bus, REST and CLI suites
// share it.
#pragma once

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ; // NOLINT: POSIX declares it nowhere in a header

namespace qm::test {

using namespace std::chrono_literals;

inline std::string read_whole_file(const std::filesystem::path& p)
{
    std::ifstream f(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

inline void write_whole_file(const std::filesystem::path& p, const std::string& s)
{
    std::ofstream f(p, std::ios::binary | std::ios::trunc);
    f << s;
}

// Polls `done` every 5 ms until it holds or `deadline` passes; returns done(). For another
// process's state: there is no loop of ours whose handlers could say it changed.
template <typename F>
bool eventually(F done, std::chrono::milliseconds deadline = 30s)
{
    const auto end = std::chrono::steady_clock::now() + deadline;
    while (!done()) {
        if (std::chrono::steady_clock::now() >= end) {
            return false;
        }
        std::this_thread::sleep_for(5ms);
    }
    return true;
}

// Calls `f(pid, dir)` for every process in /proc.
template <typename F>
void for_each_process(F f)
{
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator("/proc", ec)) {
        const auto name = e.path().filename().string();
        if (name.find_first_not_of("0123456789") == std::string::npos) {
            f(static_cast<pid_t>(std::stoi(name)), e.path());
        }
    }
}

// The children of `pid` (from /proc/*/stat), sorted.
inline std::vector<pid_t> children_of(pid_t pid)
{
    std::vector<pid_t> out;
    for_each_process([&](pid_t child, const std::filesystem::path& dir) {
        const std::string stat = read_whole_file(dir / "stat");
        const auto close = stat.rfind(')');
        int ppid = 0;
        char state = 0;
        if (close != std::string::npos &&
            std::sscanf(stat.c_str() + close + 1, " %c %d", &state, &ppid) == 2 && ppid == pid) {
            out.push_back(child);
        }
    });
    std::sort(out.begin(), out.end());
    return out;
}

// The processes whose command line or standard output mentions `text` (a temp dir: every QEMU a
// daemon started writes its output to "<runtime>/m/<id>/qemu.log", though its command line names
// no path: it gets its sockets as descriptors), sorted.
inline std::vector<pid_t> processes_mentioning(std::string_view text)
{
    std::vector<pid_t> out;
    for_each_process([&](pid_t pid, const std::filesystem::path& dir) {
        std::error_code ec;
        const auto output = std::filesystem::read_symlink(dir / "fd" / "1", ec).string();
        if (read_whole_file(dir / "cmdline").find(text) != std::string::npos ||
            output.find(text) != std::string::npos) {
            out.push_back(pid);
        }
    });
    std::sort(out.begin(), out.end());
    return out;
}

// Whether a unix stream socket at `path` accepts a connection now (one left by a dead process
// exists but refuses).
inline bool accepts_connections(const std::filesystem::path& path)
{
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
    const bool ok = ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0;
    ::close(fd);
    return ok;
}

// How many descriptors `pid` has open (0 when it is gone).
inline std::size_t fd_count(pid_t pid)
{
    std::size_t n = 0;
    std::error_code ec;
    for (std::filesystem::directory_iterator it("/proc/" + std::to_string(pid) + "/fd", ec), end;
         !ec && it != end; it.increment(ec)) {
        ++n;
    }
    return n;
}

// How many connected sockets /proc/net/unix shows bound to `path`: a server's accepted
// connections on its listening socket (the listener itself is unconnected; clients are unbound).
// The address is the one bound, so `path.<anything>` counts too (a socket bound under a temporary
// name and renamed into place, as qmachined does).
inline std::size_t unix_connections(const std::filesystem::path& path)
{
    std::ifstream f("/proc/net/unix");
    std::string line;
    std::getline(f, line); // the header
    std::size_t n = 0;
    const std::string want = path.string();
    while (std::getline(f, line)) {
        // Num RefCount Protocol Flags Type St Inode Path
        char num[32];
        unsigned refs = 0, proto = 0, flags = 0, type = 0, st = 0;
        unsigned long inode = 0;
        int used = 0;
        if (std::sscanf(line.c_str(), "%31s %x %x %x %x %x %lu %n", num, &refs, &proto, &flags,
                        &type, &st, &inode, &used) >= 7 &&
            used > 0 && st == 3) {
            const std::string_view bound =
                std::string_view(line).substr(static_cast<std::size_t>(used));
            if (bound == want || (bound.starts_with(want) && bound[want.size()] == '.')) {
                ++n;
            }
        }
    }
    return n;
}

// Spawns `argv` (no shell; PATH searched) with stdin from /dev/null, stdout and stderr as given
// (the descriptors are dup'ed; -1: /dev/null; `output` and `error` may be equal) and no other
// descriptor of ours. Throws std::runtime_error when it cannot be spawned.
inline pid_t spawn_process(const std::vector<std::string>& argv, int output, int error)
{
    posix_spawn_file_actions_t actions;
    ::posix_spawn_file_actions_init(&actions);
    ::posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    for (const auto& [from, to] : {std::pair{output, 1}, std::pair{error, 2}}) {
        if (from < 0) {
            ::posix_spawn_file_actions_addopen(&actions, to, "/dev/null", O_WRONLY, 0);
        } else {
            ::posix_spawn_file_actions_adddup2(&actions, from, to);
        }
    }
    // The test's sockets (Asio opens them without O_CLOEXEC) must not live on in the child.
    ::posix_spawn_file_actions_addclosefrom_np(&actions, 3);
    std::vector<char*> cargv;
    for (const auto& a : argv) {
        cargv.push_back(const_cast<char*>(a.c_str())); // NOLINT: posix_spawn's signature
    }
    cargv.push_back(nullptr);
    pid_t pid = -1;
    const int rc = ::posix_spawnp(&pid, cargv[0], &actions, nullptr, cargv.data(), environ);
    ::posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) {
        throw std::runtime_error("cannot spawn " + argv.at(0) + ": " + std::strerror(rc));
    }
    return pid;
}

// What a command run to completion did.
struct CommandResult
{
    // WEXITSTATUS, 128 + the signal, or -1 when it ran past the deadline (it is killed then).
    int status = -1;
    std::string out;
    std::string err;
};

// Runs `argv` to completion (or `deadline`: SIGKILL), capturing stdout and stderr.
inline CommandResult run_command(const std::vector<std::string>& argv,
                                 std::chrono::milliseconds deadline = 60s)
{
    int out_pipe[2];
    int err_pipe[2];
    if (::pipe2(out_pipe, O_CLOEXEC) != 0) {
        throw std::runtime_error(std::string("pipe2: ") + std::strerror(errno));
    }
    if (::pipe2(err_pipe, O_CLOEXEC) != 0) {
        ::close(out_pipe[0]);
        ::close(out_pipe[1]);
        throw std::runtime_error(std::string("pipe2: ") + std::strerror(errno));
    }
    pid_t pid = -1;
    try {
        pid = spawn_process(argv, out_pipe[1], err_pipe[1]);
    } catch (...) {
        for (int fd : {out_pipe[0], out_pipe[1], err_pipe[0], err_pipe[1]}) {
            ::close(fd);
        }
        throw;
    }
    ::close(out_pipe[1]);
    ::close(err_pipe[1]);
    CommandResult result;
    pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
    std::string* sinks[2] = {&result.out, &result.err};
    const auto end = std::chrono::steady_clock::now() + deadline;
    bool timed_out = false;
    while (fds[0].fd >= 0 || fds[1].fd >= 0) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            end - std::chrono::steady_clock::now());
        if (left.count() <= 0) {
            timed_out = true;
            break;
        }
        if (::poll(fds, 2, static_cast<int>(left.count())) < 0 && errno != EINTR) {
            break;
        }
        for (int i = 0; i < 2; ++i) {
            if (fds[i].fd < 0 || fds[i].revents == 0) {
                continue;
            }
            char buf[65536];
            const ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
            if (n > 0) {
                sinks[i]->append(buf, static_cast<std::size_t>(n));
            } else if (n == 0 || errno != EINTR) {
                ::close(fds[i].fd);
                fds[i].fd = -1;
            }
        }
    }
    for (const auto& p : fds) {
        if (p.fd >= 0) {
            ::close(p.fd);
        }
    }
    if (timed_out) {
        ::kill(pid, SIGKILL);
    }
    int st = 0;
    while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    if (!timed_out) {
        result.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    }
    return result;
}

// One qmachined (or another long-running program) with its stdout and stderr in a file. The
// destructor SIGKILLs and reaps it if the test did not wait for its exit.
class DaemonProcess
{
public:
    // `program` is QM_QMACHINED in the daemon's suites.
    DaemonProcess(const std::string& program, const std::vector<std::string>& args,
                  const std::filesystem::path& output)
        : output_(output)
    {
        std::vector<std::string> argv{program};
        argv.insert(argv.end(), args.begin(), args.end());
        const int fd = ::open(output.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0) {
            throw std::runtime_error("cannot create " + output.string() + ": " +
                                     std::strerror(errno));
        }
        try {
            pid_ = spawn_process(argv, fd, fd);
        } catch (...) {
            ::close(fd);
            throw;
        }
        ::close(fd);
    }
    DaemonProcess(const DaemonProcess&) = delete;
    DaemonProcess& operator=(const DaemonProcess&) = delete;
    ~DaemonProcess()
    {
        if (pid_ > 0 && !status_) {
            ::kill(pid_, SIGKILL);
            int st = 0;
            ::waitpid(pid_, &st, 0);
        }
    }

    pid_t pid() const { return pid_; }
    std::string output() const { return read_whole_file(output_); }
    bool says(const std::string& text) const { return output().find(text) != std::string::npos; }
    bool wait_for_output(const std::string& text, std::chrono::milliseconds d = 30s) const
    {
        return eventually([&] { return says(text); }, d);
    }
    void signal(int signo) const { ::kill(pid_, signo); }
    // Reaps it if it has exited; true while it runs.
    bool running()
    {
        if (!status_) {
            int st = 0;
            if (::waitpid(pid_, &st, WNOHANG) == pid_) {
                status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            }
        }
        return !status_;
    }
    // The exit status (WEXITSTATUS, or 128 + signal), once it exited within `d`.
    std::optional<int> wait_exit(std::chrono::milliseconds d = 60s)
    {
        eventually([&] { return !running(); }, d);
        return status_;
    }

private:
    std::filesystem::path output_;
    pid_t pid_ = -1;
    std::optional<int> status_;
};

} // namespace qm::test
