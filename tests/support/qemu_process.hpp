// SPDX-License-Identifier: GPL-2.0-or-later
// A real `qemu-system-x86_64 -machine none` for tests and the benchmark: its temp dir, its QMP
// monitors (we listen, or QEMU listens; unix or TCP), its log, and its reaping.
#pragma once

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <sys/types.h>

#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"
#include "libmachine/qmp/address.hpp"
#include "libmachine/qmp/client.hpp"

namespace qm::test {

struct QemuOptions
{
    // Who listens on each monitor socket.
    enum class Monitor {
        // The test opens a Listener and QEMU connects to it (the seed's way:
        // `-chardev socket,id=mon,path=P`).
        test_listens,
        // QEMU serves the monitor (`-chardev socket,...,server=on,wait=off`); the test connects,
        // and may reconnect after closing.
        qemu_listens,
    };

    Monitor monitor = Monitor::test_listens;
    // 127.0.0.1 with a free port instead of a unix socket in the temp dir.
    bool tcp = false;
    // How many QMP monitors QEMU gets (mon0, mon1, ...). The benchmark uses two per QEMU.
    int monitors = 1;
    // Start with -S: the machine stays in "prelaunch" until `cont`.
    bool paused = false;
    // Appended to the command line.
    std::vector<std::string> extra_args{};
};

// One QEMU process. The destructor SIGKILLs it if it still runs, reaps it (a blocking waitpid:
// call it once the loop has no more use for the process), closes the listeners and removes the
// temp dir, so nothing is left behind.
//
// Loop thread only; the io_context given to start() must outlive the object. The coroutines
// below need the object to outlive them. Errors: errc::spawn_failed, errc::connect_failed,
// errc::timeout, errc::system_error (temp dir), each with QEMU's log appended where it helps.
class QemuProcess
{
public:
    // QM_QEMU, or "qemu-system-x86_64".
    static std::string binary();
    // Why QEMU cannot be started here (the binary is missing or not executable), or nullopt.
    static std::optional<std::string> unavailable_reason();

    // Creates the temp dir, opens the listeners (test_listens) and spawns QEMU.
    static expected<std::unique_ptr<QemuProcess>> start(asio::io_context& ioc, QemuOptions options);

    QemuProcess(const QemuProcess&) = delete;
    QemuProcess& operator=(const QemuProcess&) = delete;
    ~QemuProcess();

    pid_t pid() const noexcept { return pid_; }
    const std::filesystem::path& dir() const noexcept { return dir_; }
    const std::filesystem::path& log_path() const noexcept { return log_path_; }
    // The whole of QEMU's stdout and stderr so far.
    std::string log() const;
    const std::vector<std::string>& command_line() const noexcept { return argv_; }
    const QemuOptions& options() const noexcept { return options_; }
    // Where monitor `index` is (the listener's address when the test listens).
    const qmp::Address& monitor_address(int index = 0) const { return addresses_.at(index); }

    // The connected socket of monitor `index`: accepted from QEMU (test_listens; the listener is
    // closed afterwards, so this works once) or connected to QEMU, retrying on a loop timer
    // until the socket exists (qemu_listens; works again after the previous connection ended).
    // Gives up early when QEMU exits.
    awaitable<expected<qmp::Socket>> monitor_socket(int index, std::chrono::milliseconds timeout);

    // A client negotiated on monitor `index` (monitor_socket() + Client::start()).
    awaitable<expected<std::shared_ptr<qmp::Client>>>
    attach(qmp::ClientOptions options, int index = 0,
           std::chrono::milliseconds timeout = std::chrono::seconds(10));

    // Reaps QEMU if it has exited (waitpid WNOHANG); true while it runs.
    bool running();
    // Runs the loop (test::run_until) until QEMU exits or `deadline` passes; true if it exited.
    // Not from inside a coroutine.
    bool wait_exit(std::chrono::milliseconds deadline);
    // SIGKILL and reap (blocking). No-op once exited.
    void kill();

    // The raw waitpid status, once reaped.
    std::optional<int> wait_status() const noexcept { return wait_status_; }
    // The exit code when QEMU exited normally.
    std::optional<int> exit_code() const;
    // "exit status 0", "killed by signal 9", "running".
    std::string describe_exit() const;

private:
    QemuProcess(asio::io_context& ioc, QemuOptions options);

    struct ExitWatch
    {
        explicit ExitWatch(const asio::any_io_executor& ex)
            : timer(ex)
        {}
        asio::steady_timer timer;
        bool done = false;
        bool exited = false;
    };

    awaitable<expected<qmp::Socket>> accept_monitor(int index, std::chrono::milliseconds timeout);
    static awaitable<void> close_listener_on_exit(QemuProcess* self,
                                                  std::shared_ptr<ExitWatch> watch, int index);
    awaitable<expected<qmp::Socket>> connect_monitor(int index, std::chrono::milliseconds timeout);
    Error with_log(Error e);

    asio::io_context& ioc_;
    QemuOptions options_;
    std::filesystem::path dir_;
    std::filesystem::path log_path_;
    std::vector<std::string> argv_;
    std::vector<qmp::Address> addresses_;
    std::vector<std::optional<qmp::Listener>> listeners_; // test_listens only
    pid_t pid_ = -1;
    std::optional<int> wait_status_;
};

} // namespace qm::test
