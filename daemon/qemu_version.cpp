// SPDX-License-Identifier: GPL-2.0-or-later
// Asking the QEMU binary for its version without blocking the loop.
#include "daemon/qemu_version.hpp"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include <boost/asio/posix/stream_descriptor.hpp>
#include <fmt/format.h>

#include "libmachine/deadline.hpp"
#include "libmachine/proc/child_watcher.hpp"
#include "libmachine/proc/spawn.hpp"

namespace qm::daemon {

using namespace std::chrono_literals;

std::string parse_qemu_version(std::string_view text)
{
    const std::string_view line = text.substr(0, text.find('\n'));
    constexpr std::string_view marker = "version ";
    const auto at = line.find(marker);
    if (at == std::string_view::npos) {
        return {};
    }
    std::string_view rest = line.substr(at + marker.size());
    std::size_t n = 0;
    while (n < rest.size() && (std::isdigit(static_cast<unsigned char>(rest[n])) || rest[n] == '.')) {
        ++n;
    }
    return std::string(rest.substr(0, n));
}

awaitable<expected<rest::QemuVersion>> probe_qemu_version(std::string binary)
{
    auto executor = co_await asio::this_coro::executor;
    auto& ioc = static_cast<asio::io_context&>(asio::query(executor, asio::execution::context));
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) {
        co_return fail(errc::system_error, fmt::format("pipe2: {}", std::strerror(errno)));
    }
    proc::SpawnOptions options;
    options.log_fd = fds[1];
    std::vector<std::string> argv{binary, "--version"};
    auto& watcher = proc::ChildWatcher::get(ioc);
    auto pid = proc::spawn(argv, options);
    ::close(fds[1]);
    if (!pid) {
        ::close(fds[0]);
        co_return fail(pid.error());
    }
    watcher.watch(*pid, [](pid_t, proc::ExitStatus) {});
    asio::posix::stream_descriptor out(ioc, fds[0]);
    std::string text;
    {
        const pid_t child = *pid;
        Deadline deadline(executor, 10s, [&out, child] {
            ::kill(child, SIGKILL);
            error_code ignored;
            out.close(ignored);
        });
        char buf[512];
        while (text.size() < 4096) {
            error_code ec;
            const std::size_t n = co_await out.async_read_some(asio::buffer(buf), use_ec(ec));
            text.append(buf, n);
            if (ec) {
                break;
            }
        }
        if (deadline.expired()) {
            co_return fail(errc::timeout, fmt::format("'{} --version' did not answer in 10 s", binary));
        }
    }
    rest::QemuVersion v;
    v.binary = binary;
    v.text = text.substr(0, text.find('\n'));
    v.version = parse_qemu_version(text);
    if (v.version.empty()) {
        co_return fail(errc::invalid_argument,
                       fmt::format("'{} --version' printed no version: '{}'", binary, v.text.substr(0, 200)));
    }
    co_return v;
}

} // namespace qm::daemon
