// SPDX-License-Identifier: GPL-2.0-or-later
// One watcher of process exits for a whole io_context: SIGCHLD reaping for our own children and
// pidfds for processes that are not (machines re-attached after a daemon restart).
#pragma once

#include <sys/types.h>

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"

namespace qm::proc {

// How a process ended.
struct ExitStatus
{
    enum class Kind {
        exited,   // returned from main or called exit(): `code`
        signaled, // killed by `signal`
        unknown,  // not our child (watched by pidfd): the status can't be read
    };
    Kind kind = Kind::unknown;
    int code = -1;
    int signal = 0;
    bool core_dumped = false;

    static ExitStatus from_wait_status(int wstatus);
    bool success() const noexcept { return kind == Kind::exited && code == 0; }
    // "exited with status 0", "killed by signal 9 (Killed)", "exit status unknown"
    std::string to_string() const;
};

// The one owner of SIGCHLD on an io_context (an Asio service: ChildWatcher::get(ioc)).
//
// watch() registers a child of ours; when it exits, the watcher reaps it (waitpid with WNOHANG,
// only for registered pids: other components' children are left alone) and calls the callback
// once, from the loop. watch_pidfd() watches any process through a pidfd (it becomes readable when
// the process exits); its status is then ExitStatus::Kind::unknown, since only a parent can read
// it. Nothing here blocks and nothing polls on a timer.
//
// Loop thread only. Errors: errc::system_error when pidfd_open fails (e.g. no such process).
class ChildWatcher : public asio::execution_context::service
{
public:
    using key_type = ChildWatcher;
    static asio::execution_context::id id; // NOLINT: Asio's service protocol
    using ExitHandler = std::function<void(pid_t, ExitStatus)>;

    explicit ChildWatcher(asio::execution_context& ctx);
    ~ChildWatcher() override;

    // The watcher of this io_context, created on first use (it then installs its SIGCHLD handler:
    // create it before starting children, as Machine does).
    static ChildWatcher& get(asio::io_context& ioc);

    // Watches our child `pid`. If it has already exited, the handler still runs (posted).
    void watch(pid_t pid, ExitHandler handler);
    // Watches any process by pidfd; the handler gets ExitStatus::Kind::unknown.
    expected<void> watch_pidfd(pid_t pid, ExitHandler handler);
    // The same with a pidfd the caller opened (the watcher owns it from now on): open it before
    // checking that `pid` is the expected process, and the check holds for the pidfd.
    void watch_pidfd(pid_t pid, int pidfd, ExitHandler handler);
    // Sends `signal` to a watched process: through its pidfd when it is watched by one (never to
    // a process that reused the pid), else kill(2). Errors are ignored (it may be gone already).
    void send_signal(pid_t pid, int signal) noexcept;
    // Stops watching (the handler will not be called). A watched child is still reaped.
    void forget(pid_t pid);

    std::size_t watched() const noexcept { return children_.size() + pidfds_.size(); }

private:
    struct PidfdWatch;

    void shutdown() override;
    void arm();
    void reap();

    asio::io_context& ioc_;
    asio::signal_set sigchld_;
    // Children whose exit we report; pids whose handler was forgotten but must still be reaped
    // keep an empty handler.
    std::map<pid_t, ExitHandler> children_;
    std::map<pid_t, std::shared_ptr<PidfdWatch>> pidfds_;
    bool reap_posted_ = false;
    bool armed_ = false;
};

} // namespace qm::proc
