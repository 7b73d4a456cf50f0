// SPDX-License-Identifier: GPL-2.0-or-later
// Starting a child process without a shell.
#include "libmachine/proc/spawn.hpp"

#include <fcntl.h>
#include <grp.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <csignal>
#include <cstring>

#include <fmt/format.h>

extern char** environ; // NOLINT(readability-redundant-declaration): POSIX leaves it undeclared

namespace qm::proc {
namespace {

bool needs_quotes(const std::string& s)
{
    return s.empty() || s.find_first_of(" \t\n'\"\\$`*?[]{}()<>|&;#~") != std::string::npos;
}

// argv[0] as execve() needs it: a name without '/' is searched in PATH (as posix_spawnp does),
// here in the parent, since the child of fork() may only make async-signal-safe calls.
std::string resolve_program(const std::string& name)
{
    if (name.find('/') != std::string::npos) {
        return name;
    }
    const char* path = ::getenv("PATH");
    std::string_view dirs = path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin";
    while (true) {
        const auto colon = dirs.find(':');
        std::string dir(dirs.substr(0, colon));
        std::string candidate = (dir.empty() ? std::string(".") : dir) + "/" + name;
        if (::access(candidate.c_str(), X_OK) == 0) {
            return candidate;
        }
        if (colon == std::string_view::npos) {
            break;
        }
        dirs.remove_prefix(colon + 1);
    }
    return name; // execve fails with ENOENT, reported as for posix_spawnp
}

// What the child of spawn_with_credentials() reports through its pipe when a step fails.
struct ChildFailure
{
    int step; // index into child_steps
    int error;
};
constexpr std::array<const char*, 7> child_steps{
    "open /dev/null or the log", "redirect descriptors", "start a session",
    "set the supplementary groups", "set the group id", "set the user id", "exec",
};

// fork + exec for a child with other credentials (posix_spawn cannot change them). Between fork
// and exec only async-signal-safe calls: the daemon's other state is not to be trusted there.
expected<pid_t> spawn_with_credentials(const std::vector<std::string>& argv, char* const* args,
                                       const SpawnOptions& options, const std::vector<int>& staged,
                                       int first_free)
{
    const std::string program = resolve_program(argv[0]);
    int report[2];
    if (::pipe2(report, O_CLOEXEC) != 0) {
        return fail(errc::spawn_failed,
                    fmt::format("cannot start '{}': pipe: {}", argv[0], std::strerror(errno)));
    }
    // The pipe may have got numbers the inherited descriptors go to (3, 4, ... are often free
    // here): the child's dup2 would replace its write end and its close_range would take
    // inherited descriptors above it. Above them, it crosses neither.
    for (int& end : report) {
        if (end >= first_free) {
            continue;
        }
        const int high = ::fcntl(end, F_DUPFD_CLOEXEC, first_free);
        const int err = errno;
        ::close(end);
        end = high;
        if (high < 0) {
            for (int fd : report) {
                if (fd >= 0) {
                    ::close(fd);
                }
            }
            return fail(errc::spawn_failed,
                        fmt::format("cannot start '{}': pipe: {}", argv[0], std::strerror(err)));
        }
    }
    const char* log = options.log_path.empty() ? "/dev/null" : options.log_path.c_str();
    sigset_t all;
    sigset_t old;
    sigfillset(&all);
    // No signal handler of ours may run in the child between fork and exec.
    ::pthread_sigmask(SIG_SETMASK, &all, &old);
    const pid_t pid = ::fork();
    if (pid == 0) {
        auto die = [&](int step) {
            const ChildFailure f{step, errno};
            (void)!::write(report[1], &f, sizeof f);
            ::_exit(127);
        };
        // Default dispositions for every signal, then an empty mask (as POSIX_SPAWN_SETSIGDEF).
        struct sigaction dfl {};
        dfl.sa_handler = SIG_DFL;
        for (int sig = 1; sig < NSIG; ++sig) {
            ::sigaction(sig, &dfl, nullptr);
        }
        const int in = ::open("/dev/null", O_RDONLY);
        const int out = options.log_fd >= 0
                            ? options.log_fd
                            : ::open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (in < 0 || out < 0) {
            die(0);
        }
        if (::dup2(in, STDIN_FILENO) < 0 || ::dup2(out, STDOUT_FILENO) < 0 ||
            ::dup2(STDOUT_FILENO, STDERR_FILENO) < 0) {
            die(1);
        }
        for (std::size_t i = 0; i < staged.size(); ++i) {
            if (::dup2(staged[i], inherited_fd_number(i)) < 0) {
                die(1);
            }
        }
        // Nothing else crosses exec, except the report pipe (O_CLOEXEC) until exec succeeds.
        const int keep = report[1];
        for (int fd = first_free; fd < keep; ++fd) {
            ::close(fd);
        }
        ::syscall(SYS_close_range, static_cast<unsigned>(keep) + 1, ~0U, 0);
        if (options.new_session && ::setsid() < 0) {
            die(2);
        }
        if (options.uid || options.gid || !options.groups.empty()) {
            if (::setgroups(options.groups.size(), options.groups.data()) != 0) {
                die(3);
            }
        }
        if (options.gid && ::setresgid(*options.gid, *options.gid, *options.gid) != 0) {
            die(4);
        }
        if (options.uid && ::setresuid(*options.uid, *options.uid, *options.uid) != 0) {
            die(5);
        }
        sigset_t none;
        sigemptyset(&none);
        ::sigprocmask(SIG_SETMASK, &none, nullptr);
        ::execve(program.c_str(), args, environ);
        die(6);
    }
    const int fork_errno = errno;
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    ::close(report[1]);
    if (pid < 0) {
        ::close(report[0]);
        return fail(errc::spawn_failed,
                    fmt::format("cannot start '{}': fork: {}", argv[0], std::strerror(fork_errno)));
    }
    // Blocks only until exec or the child's failure: the pipe closes at exec.
    ChildFailure failure{};
    ssize_t n;
    do {
        n = ::read(report[0], &failure, sizeof failure);
    } while (n < 0 && errno == EINTR);
    ::close(report[0]);
    if (n == static_cast<ssize_t>(sizeof failure)) {
        int status = 0;
        while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        const auto step = static_cast<std::size_t>(failure.step);
        return fail(errc::spawn_failed,
                    fmt::format("cannot start '{}': {}: {}", argv[0],
                                step < child_steps.size() ? child_steps[step] : "?",
                                std::strerror(failure.error)));
    }
    return pid;
}

} // namespace

std::string format_command_line(const std::vector<std::string>& argv)
{
    std::string out;
    for (const auto& a : argv) {
        if (!out.empty()) {
            out += ' ';
        }
        if (!needs_quotes(a)) {
            out += a;
            continue;
        }
        out += '\'';
        for (char c : a) {
            if (c == '\'') {
                out += "'\\''";
            } else {
                out += c;
            }
        }
        out += '\'';
    }
    return out;
}

expected<pid_t> spawn(const std::vector<std::string>& argv, const SpawnOptions& options)
{
    if (argv.empty()) {
        return fail(errc::invalid_argument, "empty command line");
    }
    std::vector<char*> args;
    args.reserve(argv.size() + 1);
    for (const auto& a : argv) {
        args.push_back(const_cast<char*>(a.c_str())); // NOLINT: posix_spawn's signature
    }
    args.push_back(nullptr);

    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attr;
    // Inherited descriptors go to 3, 4, ... in the child. They are first duplicated above every
    // target number, so that no dup2 target overwrites a source still to be copied.
    const int first_free = inherited_fd_number(options.inherit_fds.size());
    std::vector<int> staged;
    auto close_staged = [&staged] {
        for (int fd : staged) {
            ::close(fd);
        }
    };
    for (int fd : options.inherit_fds) {
        const int high = ::fcntl(fd, F_DUPFD_CLOEXEC, std::max(first_free, 10));
        if (high < 0) {
            const int err = errno;
            close_staged();
            return fail(errc::spawn_failed, fmt::format("cannot pass fd {} to '{}': {}", fd,
                                                        argv[0], std::strerror(err)));
        }
        staged.push_back(high);
    }

    if (options.uid || options.gid || !options.groups.empty()) {
        auto pid = spawn_with_credentials(argv, args.data(), options, staged, first_free);
        close_staged();
        return pid;
    }

    posix_spawn_file_actions_init(&actions);
    posix_spawnattr_init(&attr);
    posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    if (options.log_fd >= 0) {
        posix_spawn_file_actions_adddup2(&actions, options.log_fd, STDOUT_FILENO);
    } else {
        const char* log = options.log_path.empty() ? "/dev/null" : options.log_path.c_str();
        posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log,
                                         O_WRONLY | O_CREAT | O_APPEND, 0600);
    }
    posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
    for (std::size_t i = 0; i < staged.size(); ++i) {
        // dup2 to another number gives a descriptor without FD_CLOEXEC: the child keeps it.
        posix_spawn_file_actions_adddup2(&actions, staged[i], inherited_fd_number(i));
    }
    // Nothing else crosses exec, even a descriptor someone forgot to open with O_CLOEXEC.
    posix_spawn_file_actions_addclosefrom_np(&actions, first_free);
    // Children start with default signal dispositions and an empty mask, whatever ours are.
    sigset_t all;
    sigset_t none;
    sigfillset(&all);
    sigemptyset(&none);
    posix_spawnattr_setsigdefault(&attr, &all);
    posix_spawnattr_setsigmask(&attr, &none);
    short flags = POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK;
    if (options.new_session) {
        flags |= POSIX_SPAWN_SETSID;
    }
    posix_spawnattr_setflags(&attr, flags);

    pid_t pid = -1;
    const int rc = argv[0].find('/') == std::string::npos
                       ? posix_spawnp(&pid, args[0], &actions, &attr, args.data(), environ)
                       : posix_spawn(&pid, args[0], &actions, &attr, args.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    close_staged();
    if (rc != 0) {
        return fail(errc::spawn_failed,
                    fmt::format("cannot start '{}': {}", argv[0], std::strerror(rc)));
    }
    return pid;
}

} // namespace qm::proc
