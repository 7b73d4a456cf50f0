// SPDX-License-Identifier: GPL-2.0-or-later
// What /proc says of a process.
#include "libmachine/proc/proc_info.hpp"

#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>

#include <fmt/format.h>

namespace qm::proc {
namespace {

expected<std::string> read_proc_file(pid_t pid, std::string_view name)
{
    const std::string path = fmt::format("/proc/{}/{}", pid, name);
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        return fail(errc::system_error,
                    fmt::format("cannot read '{}': {}", path, std::strerror(errno)));
    }
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    return text;
}

} // namespace

expected<std::uint64_t> process_start_time(pid_t pid)
{
    auto stat = read_proc_file(pid, "stat");
    if (!stat) {
        return fail(stat.error());
    }
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so fields are counted
    // from the last ')'. After it come field 3 (state) onwards; starttime is field 22.
    const auto close = stat->rfind(')');
    if (close == std::string::npos) {
        return fail(errc::invalid_argument, fmt::format("/proc/{}/stat: no command name", pid));
    }
    std::istringstream fields(stat->substr(close + 1));
    std::string field;
    for (int n = 3; n < 22; ++n) {
        if (!(fields >> field)) {
            return fail(errc::invalid_argument, fmt::format("/proc/{}/stat: too few fields", pid));
        }
    }
    std::uint64_t start = 0;
    if (!(fields >> start)) {
        return fail(errc::invalid_argument, fmt::format("/proc/{}/stat: bad start time", pid));
    }
    return start;
}

expected<std::vector<std::string>> process_cmdline(pid_t pid)
{
    auto text = read_proc_file(pid, "cmdline");
    if (!text) {
        return fail(text.error());
    }
    std::vector<std::string> argv;
    std::size_t begin = 0;
    while (begin < text->size()) {
        auto end = text->find('\0', begin);
        if (end == std::string::npos) {
            end = text->size();
        }
        argv.push_back(text->substr(begin, end - begin));
        begin = end + 1;
    }
    return argv;
}

expected<int> open_pidfd(pid_t pid)
{
    // Trap 4: glibc 2.36's <sys/pidfd.h> lacks extern "C"; the system call needs no header.
    // pidfds are always close-on-exec.
    const int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (fd < 0) {
        return fail(errc::system_error,
                    fmt::format("pidfd_open({}): {}", pid, std::strerror(errno)));
    }
    return fd;
}

expected<void> pidfd_signal(int pidfd, int signal)
{
    if (::syscall(SYS_pidfd_send_signal, pidfd, signal, nullptr, 0) != 0 && errno != ESRCH) {
        return fail(errc::system_error,
                    fmt::format("pidfd_send_signal({}): {}", signal, std::strerror(errno)));
    }
    return {};
}

std::string hash_command_line(const std::vector<std::string>& argv)
{
    std::uint64_t h = 14695981039346656037ULL;
    auto add = [&h](unsigned char c) {
        h ^= c;
        h *= 1099511628211ULL;
    };
    for (const auto& a : argv) {
        for (char c : a) {
            add(static_cast<unsigned char>(c));
        }
        add(0);
    }
    return fmt::format("{:016x}", h);
}

std::string boot_id()
{
    // Constant until the next boot: read once.
    static const std::string id = [] {
        std::ifstream f("/proc/sys/kernel/random/boot_id");
        std::string line;
        std::getline(f, line);
        return line;
    }();
    return id;
}

} // namespace qm::proc
