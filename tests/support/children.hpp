// SPDX-License-Identifier: GPL-2.0-or-later
// Blocking waits for a test's own children. The tests run Asio, whose SIGCHLD handler has no
// SA_RESTART: every wait retries on EINTR.
#pragma once

#include <sys/types.h>
#include <sys/wait.h>

#include <cerrno>

namespace qm::test {

// Reaps a child of the test: its wait status, or -1 when it is not ours.
inline int reap(pid_t pid)
{
    int status = 0;
    pid_t r = 0;
    do {
        r = ::waitpid(pid, &status, 0);
    } while (r < 0 && errno == EINTR);
    return r == pid ? status : -1;
}

// Waits until a child of the test has exited, leaving it a zombie (not reaped).
inline bool wait_exited_unreaped(pid_t pid)
{
    siginfo_t info{};
    int r = 0;
    do {
        r = ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT);
    } while (r != 0 && errno == EINTR);
    return r == 0;
}

} // namespace qm::test
