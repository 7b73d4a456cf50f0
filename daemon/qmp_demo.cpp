// SPDX-License-Identifier: GPL-2.0-or-later
// qmachined-qmp-demo: what scripts/run starts until the daemon exists. Launches
// `qemu-system-x86_64 -machine none` with its monitor connecting to a socket we listen on (the
// seed's way), negotiates QMP through libmachine's client, prints the greeting and query-status,
// then asks QEMU to quit and reaps it.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "libmachine/asio.hpp"
#include "libmachine/proc/spawn.hpp"
#include "libmachine/qmp/address.hpp"
#include "libmachine/qmp/client.hpp"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

struct Demo
{
    std::string qemu = "qemu-system-x86_64";
    fs::path dir;
    pid_t pid = -1;
    int status = 1;
};

qm::awaitable<void> run(Demo& demo)
{
    auto ex = co_await qm::asio::this_coro::executor;
    const auto socket_path = (demo.dir / "qmp.sock").string();
    auto listener = qm::qmp::Listener::open(ex, qm::qmp::Address::unix_socket(socket_path));
    if (!listener) {
        fmt::print(stderr, "Failed to listen on '{}': {}\n", socket_path, listener.error().message);
        co_return;
    }
    std::vector<std::string> argv{demo.qemu, "-display", "none", "-nodefaults", "-machine", "none"};
    argv.emplace_back("-chardev");
    argv.emplace_back("socket,id=mon," + listener->address().chardev_options());
    argv.emplace_back("-mon");
    argv.emplace_back("chardev=mon,mode=control");
    const auto log_path = (demo.dir / "qemu.log").string();
    fmt::print("$ {}\n", qm::proc::format_command_line(argv));
    auto pid = qm::proc::spawn(argv, {.log_path = log_path});
    if (!pid) {
        fmt::print(stderr, "Failed to launch QEMU: {}\n", pid.error().message);
        co_return;
    }
    demo.pid = *pid;

    auto socket = co_await listener->accept(10s);
    listener->close();
    if (!socket) {
        fmt::print(stderr, "QEMU did not connect: {}\n", socket.error().message);
        co_return;
    }
    auto client = qm::qmp::Client::create(ex, {.name = "demo"});
    auto greeting = co_await client->start(std::move(*socket));
    if (!greeting) {
        fmt::print(stderr, "QMP negotiation failed: {}\n", greeting.error().message);
        co_return;
    }
    fmt::print("greeting: QEMU {} ({}), capabilities [{}]\n", greeting->version(),
               greeting->package, fmt::join(greeting->capabilities, ", "));
    auto status = co_await client->execute("query-status");
    if (!status) {
        fmt::print(stderr, "query-status failed: {}\n", status.error().message);
        client->close();
        co_return;
    }
    fmt::print("query-status: {}\n", qm::json::to_string(*status));
    auto quit = co_await client->execute("quit");
    fmt::print("quit: {}\n", quit ? "accepted" : quit.error().message);
    std::vector<qm::qmp::EventFilter> filters;
    filters.push_back(qm::qmp::EventFilter::named("SHUTDOWN"));
    auto shutdown = co_await client->wait_event(std::move(filters), 5s);
    if (shutdown) {
        fmt::print("event: {}\n", shutdown->to_json());
    }
    client->close();
    demo.status = 0;
}

} // namespace

int main(int argc, char** argv)
{
    spdlog::set_level(std::getenv("QM_DEBUG") != nullptr ? spdlog::level::debug
                                                           : spdlog::level::info);
    Demo demo;
    if (argc > 1) {
        demo.qemu = argv[1];
    }
    std::string templ = (fs::temp_directory_path() / "qmachined-demo.XXXXXX").string();
    if (::mkdtemp(templ.data()) == nullptr) {
        std::perror("mkdtemp");
        return 1;
    }
    demo.dir = templ;

    qm::asio::io_context ioc{1};
    qm::asio::co_spawn(ioc, run(demo), [](const std::exception_ptr& e) {
        if (e) {
            std::rethrow_exception(e);
        }
    });
    ioc.run();

    if (demo.pid > 0) {
        // The demo's one blocking call, after the loop has finished: reap QEMU.
        int wstatus = 0;
        ::kill(demo.pid, demo.status == 0 ? 0 : SIGKILL);
        ::waitpid(demo.pid, &wstatus, 0);
        fmt::print("QEMU exited: {}\n",
                   WIFEXITED(wstatus) ? fmt::format("status {}", WEXITSTATUS(wstatus))
                                      : fmt::format("signal {}", WTERMSIG(wstatus)));
    }
    std::error_code ec;
    fs::remove_all(demo.dir, ec);
    return demo.status;
}
