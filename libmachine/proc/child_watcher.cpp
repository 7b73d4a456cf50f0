// SPDX-License-Identifier: GPL-2.0-or-later
// One watcher of process exits for a whole io_context: SIGCHLD reaping and pidfds.
#include "libmachine/proc/child_watcher.hpp"

#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <vector>

#include <boost/asio/posix/stream_descriptor.hpp>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace qm::proc {

asio::execution_context::id ChildWatcher::id;

namespace {

// Trap 4: glibc 2.36's <sys/pidfd.h> lacks extern "C"; the system call needs no header.
int pidfd_open(pid_t pid)
{
    return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
}

} // namespace

ExitStatus ExitStatus::from_wait_status(int wstatus)
{
    ExitStatus s;
    if (WIFEXITED(wstatus)) {
        s.kind = Kind::exited;
        s.code = WEXITSTATUS(wstatus);
    } else if (WIFSIGNALED(wstatus)) {
        s.kind = Kind::signaled;
        s.signal = WTERMSIG(wstatus);
        s.core_dumped = WCOREDUMP(wstatus);
    }
    return s;
}

std::string ExitStatus::to_string() const
{
    switch (kind) {
    case Kind::exited: return fmt::format("exited with status {}", code);
    case Kind::signaled:
        return fmt::format("killed by signal {} ({}){}", signal, ::strsignal(signal),
                           core_dumped ? ", core dumped" : "");
    case Kind::unknown: break;
    }
    return "exited, status unknown";
}

// A pidfd and its descriptor; readable once the process has exited.
struct ChildWatcher::PidfdWatch
{
    PidfdWatch(asio::io_context& ioc, int fd) : descriptor(ioc, fd) {}
    asio::posix::stream_descriptor descriptor;
    ExitHandler handler;
};

ChildWatcher::ChildWatcher(asio::execution_context& ctx)
    : asio::execution_context::service(ctx)
    , ioc_(static_cast<asio::io_context&>(ctx))
    , sigchld_(ioc_, SIGCHLD)
{
}

ChildWatcher::~ChildWatcher() = default;

ChildWatcher& ChildWatcher::get(asio::io_context& ioc)
{
    return asio::use_service<ChildWatcher>(ioc);
}

void ChildWatcher::shutdown()
{
    error_code ignored;
    sigchld_.cancel(ignored);
    for (auto& [pid, w] : pidfds_) {
        w->descriptor.close(ignored);
    }
    pidfds_.clear();
    children_.clear();
}

void ChildWatcher::arm()
{
    // Waiting only while there are children keeps an idle io_context free to return from run().
    // SIGCHLD stays registered meanwhile: a signal that arrives between waits is queued by Asio
    // and delivered to the next wait.
    if (armed_ || children_.empty()) {
        return;
    }
    armed_ = true;
    sigchld_.async_wait([this](error_code ec, int /*signo*/) {
        armed_ = false;
        if (ec) {
            return; // cancelled: the io_context is going away
        }
        reap();
        arm();
    });
}

void ChildWatcher::reap()
{
    reap_posted_ = false;
    // Signals coalesce: one SIGCHLD may stand for several exits, so every registered pid is
    // asked (WNOHANG). Only registered pids: another component's children are its own business.
    struct Exit
    {
        pid_t pid;
        ExitStatus status;
        ExitHandler handler;
    };
    std::vector<Exit> exits;
    for (auto it = children_.begin(); it != children_.end();) {
        int wstatus = 0;
        pid_t r = 0;
        do {
            r = ::waitpid(it->first, &wstatus, WNOHANG);
        } while (r < 0 && errno == EINTR);
        if (r == 0) {
            ++it;
            continue;
        }
        ExitStatus status;
        if (r > 0) {
            status = ExitStatus::from_wait_status(wstatus);
        } else {
            // ECHILD: someone else reaped it; all we know is that it is gone.
            spdlog::debug("child {}: waitpid failed: {}", it->first, std::strerror(errno));
        }
        if (it->second) {
            exits.push_back(Exit{it->first, status, std::move(it->second)});
        }
        it = children_.erase(it);
    }
    // Handlers run after the walk: they may watch or forget other pids.
    for (auto& e : exits) {
        e.handler(e.pid, e.status);
    }
    arm();
}

void ChildWatcher::watch(pid_t pid, ExitHandler handler)
{
    children_[pid] = std::move(handler);
    arm();
    // The child may have exited before we were watching it (its SIGCHLD already handled): look
    // once more, from the loop.
    if (!reap_posted_) {
        reap_posted_ = true;
        asio::post(ioc_, [this] { reap(); });
    }
}

expected<void> ChildWatcher::watch_pidfd(pid_t pid, ExitHandler handler)
{
    const int fd = pidfd_open(pid);
    if (fd < 0) {
        return fail(errc::system_error,
                    fmt::format("cannot watch process {}: pidfd_open: {}", pid, std::strerror(errno)));
    }
    watch_pidfd(pid, fd, std::move(handler));
    return {};
}

void ChildWatcher::watch_pidfd(pid_t pid, int fd, ExitHandler handler)
{
    if (auto it = pidfds_.find(pid); it != pidfds_.end()) {
        error_code ignored;
        it->second->descriptor.close(ignored);
        pidfds_.erase(it);
    }
    auto w = std::make_shared<PidfdWatch>(ioc_, fd);
    w->handler = std::move(handler);
    pidfds_[pid] = w;
    w->descriptor.async_wait(asio::posix::stream_descriptor::wait_read,
                             [this, pid, w](error_code ec) {
                                 auto it = pidfds_.find(pid);
                                 if (ec || it == pidfds_.end() || it->second != w) {
                                     return; // forgotten or shut down
                                 }
                                 pidfds_.erase(it);
                                 error_code ignored;
                                 w->descriptor.close(ignored);
                                 if (w->handler) {
                                     w->handler(pid, ExitStatus{});
                                 }
                             });
}

void ChildWatcher::send_signal(pid_t pid, int signal) noexcept
{
    if (auto it = pidfds_.find(pid); it != pidfds_.end()) {
        // Through the pidfd: a process that is not our child may be gone and its pid reused.
        ::syscall(SYS_pidfd_send_signal, it->second->descriptor.native_handle(), signal, nullptr, 0);
        return;
    }
    ::kill(pid, signal);
}

void ChildWatcher::forget(pid_t pid)
{
    if (auto it = children_.find(pid); it != children_.end()) {
        it->second = nullptr; // still reaped when it exits
    }
    if (auto it = pidfds_.find(pid); it != pidfds_.end()) {
        error_code ignored;
        it->second->descriptor.close(ignored);
        pidfds_.erase(it);
    }
}

} // namespace qm::proc
