// SPDX-License-Identifier: GPL-2.0-or-later
// Starting a child process without a shell.
#include "libmachine/proc/spawn.hpp"

#include <fcntl.h>
#include <spawn.h>
#include <unistd.h>

#include <algorithm>
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
