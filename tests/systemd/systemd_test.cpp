// SPDX-License-Identifier: GPL-2.0-or-later
// qmachined as systemd runs it, without systemd as PID 1: socket activation through
// systemd-socket-activate (the REST unix socket and a TCP socket passed with LISTEN_FDS, the first
// connection answered, and only once the machines that kept running are re-attached; a passed
// descriptor that is not a listening stream socket refused), and `systemctl restart` done the way
// the installed unit's KillMode= says (SIGTERM to the main process only, for KillMode=process):
// the machines, their processes and their sockets survive it and the next daemon takes them over.
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/json.hpp"
#include "tests/daemon/machine_daemon.hpp"
#include "tests/daemon/notify_listener.hpp"
#include "tests/support/daemon_process.hpp"

namespace qm::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

constexpr const char* socket_activate = "/usr/bin/systemd-socket-activate";

// The value of `key` in the [Service] section of a unit file ("" when absent).
std::string unit_setting(const fs::path& unit, const std::string& key)
{
    std::string value;
    bool in_service = false;
    for (const auto& line : lines_with(read_whole_file(unit), "")) {
        if (line.starts_with("[")) {
            in_service = line == "[Service]";
        } else if (in_service && line.starts_with(key + "=")) {
            value = line.substr(key.size() + 1); // the last one wins, as in systemd
        }
    }
    return value;
}

// The files (sockets included) under `dir`, with their inode numbers: a socket that was removed
// and bound again has another one.
std::map<std::string, ino_t> files_under(const fs::path& dir)
{
    std::map<std::string, ino_t> out;
    std::error_code ec;
    for (const auto& e : fs::recursive_directory_iterator(dir, ec)) {
        struct stat st {};
        if (::lstat(e.path().c_str(), &st) == 0 && !S_ISDIR(st.st_mode)) {
            out[fs::relative(e.path(), dir).string()] = st.st_ino;
        }
    }
    return out;
}

class SystemdTest : public MachineDaemonTest
{
protected:
    void SetUp() override
    {
        MachineDaemonTest::SetUp();
        if (HasFatalFailure() || IsSkipped()) {
            return;
        }
        ASSERT_TRUE(fs::exists(socket_activate)) << "systemd-socket-activate (package systemd)";
        listener_ = std::make_unique<NotifyListener>((root_ / "notify.sock").string());
        ASSERT_EQ(listener_->error(), "");
    }

    void TearDown() override
    {
        // A socket the manager passed is the manager's: the daemon leaves it; so does the test
        // until here.
        if (activated_ && !daemon_) {
            std::error_code ec;
            fs::remove(socket_path(), ec);
        }
        MachineDaemonTest::TearDown();
    }

    // qmachined behind systemd-socket-activate on its default socket path (or a TCP address),
    // with a NOTIFY_SOCKET, under the default shutdown policy (leave-running): the manager
    // binds the socket now; qmachined starts on the first connection.
    void start_activated(const std::vector<std::string>& listen, bool datagram = false,
                         const std::vector<std::string>& extra = {})
    {
        ASSERT_FALSE(daemon_);
        fs::create_directories(runtime_);
        fs::permissions(runtime_, fs::perms::owner_all);
        std::vector<std::string> args;
        if (datagram) {
            args.push_back("--datagram");
        }
        for (const auto& l : listen) {
            args.insert(args.end(), {"-l", l});
        }
        args.insert(args.end(), {"-E", "NOTIFY_SOCKET=" + listener_->address(), QM_QMACHINED,
                                 "--state-dir", state_.string(), "--runtime-dir",
                                 runtime_.string(), "--bus", "none"});
        args.insert(args.end(), extra.begin(), extra.end());
        leave_running_ = true;
        activated_ = true;
        daemon_ = std::make_unique<DaemonProcess>(
            socket_activate, args, root_ / ("daemon" + std::to_string(++runs_) + ".out"));
        ASSERT_TRUE(eventually([&] { return daemon_->says("Listening on"); }, 10s))
            << daemon_->output();
    }

    // qmachined itself runs (systemd-socket-activate executed it in its own process).
    bool daemon_executed()
    {
        return read_whole_file(fmt::format("/proc/{}/cmdline", daemon_->pid()))
                   .starts_with(QM_QMACHINED);
    }

    std::unique_ptr<NotifyListener> listener_;
    bool activated_ = false;
};

TEST_F(SystemdTest, SocketActivatedDaemonAnswersTheFirstConnectionOnceMachinesAreReattached)
{
    // A machine left running by an earlier daemon (leave-running).
    ASSERT_NO_FATAL_FAILURE(start_default_daemon());
    ASSERT_EQ(create("a", quick_spec(true)).status, 201);
    const pid_t qemu = start_machine("a");
    ASSERT_GT(qemu, 0);
    daemon().signal(SIGTERM);
    ASSERT_EQ(daemon().wait_exit(10s), 0) << daemon().output();
    daemon_.reset();
    ASSERT_TRUE(alive(qemu));

    ASSERT_NO_FATAL_FAILURE(start_activated({socket_path().string()}));
    // Nothing runs before a client comes; then the first connection gets its answer from a
    // daemon that has taken the machine over (it waited in the manager's backlog).
    std::this_thread::sleep_for(200ms);
    EXPECT_FALSE(daemon_executed());
    EXPECT_FALSE(listener_->wait_for("READY=1", 10ms));
    HttpResponse first = call("GET", "/v1/machines/a");
    EXPECT_EQ(first.status, 200) << first << daemon().output();
    EXPECT_EQ(first.str("state"), "running") << first;
    EXPECT_EQ(json::get_int(first.json(), "pid").value_or(-1), qemu) << first;
    EXPECT_TRUE(daemon_executed());
    auto ready = listener_->wait_for("READY=1", 10s);
    ASSERT_TRUE(ready) << listener_->history();
    EXPECT_EQ(ready->pid, daemon().pid()); // NotifyAccess=main: from the main process
    EXPECT_EQ(field(ready->text, "STATUS"), "1 machine: 1 running") << ready->text;
    EXPECT_TRUE(daemon().says("passed by the service manager")) << daemon().output();
    // QEMU runs on; the daemon never bound a socket of its own.
    EXPECT_TRUE(alive(qemu));

    // The next connections too; at SIGTERM the daemon leaves the manager's socket where it is.
    EXPECT_EQ(call("GET", "/v1/health").status, 200);
    const auto inode = files_under(runtime_).at("qmachined.sock");
    daemon().signal(SIGTERM);
    EXPECT_TRUE(listener_->wait_for("STOPPING=1", 10s)) << listener_->history();
    ASSERT_EQ(daemon().wait_exit(10s), 0) << daemon().output();
    daemon_.reset();
    EXPECT_EQ(files_under(runtime_).count("qmachined.sock"), 1U) << "the manager's socket was removed";
    EXPECT_EQ(files_under(runtime_)["qmachined.sock"], inode);
    EXPECT_TRUE(alive(qemu)); // leave-running
}

// A free TCP port on `address` (the kernel's choice, released for the manager to bind); 0 when
// none could be had.
unsigned free_port(in_addr_t address)
{
    const int probe = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(address);
    socklen_t len = sizeof addr;
    unsigned port = 0;
    if (::bind(probe, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
        ::getsockname(probe, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
        port = ntohs(addr.sin_port);
    }
    ::close(probe);
    return port;
}

TEST_F(SystemdTest, TcpSocketFromTheManagerNeedsTheToken)
{
    const unsigned port = free_port(INADDR_LOOPBACK);
    ASSERT_NE(port, 0U);

    ASSERT_NO_FATAL_FAILURE(
        start_activated({socket_path().string(), fmt::format("127.0.0.1:{}", port)}));
    const asio::ip::tcp::endpoint ep(asio::ip::make_address("127.0.0.1"),
                                     static_cast<unsigned short>(port));
    {
        HttpConnection c(ioc_, ep);
        ASSERT_FALSE(c.error()) << c.error().message();
        HttpResponse r = c.request("GET", "/v1/machines");
        EXPECT_EQ(r.status, 401) << r << daemon().output();
    }
    // The token the daemon made (the state directory's rest.token) opens it; the unix socket
    // needs none.
    const std::string token = read_whole_file(state_ / "rest.token");
    ASSERT_FALSE(token.empty());
    std::string bare = token;
    while (!bare.empty() && (bare.back() == '\n' || bare.back() == ' ')) {
        bare.pop_back();
    }
    {
        HttpConnection c(ioc_, ep);
        HttpResponse r = c.request("GET", "/v1/machines", {}, {{"Authorization", "Bearer " + bare}});
        EXPECT_EQ(r.status, 200) << r;
    }
    EXPECT_EQ(call("GET", "/v1/machines").status, 200);
    EXPECT_TRUE(listener_->wait_for("READY=1", 10s)) << listener_->history();
}

TEST_F(SystemdTest, TcpSocketFromTheManagerIsLoopbackOnlyUnlessAllowRemote)
{
    // A free port on every address (0.0.0.0), which the loopback reaches too.
    const unsigned port = free_port(INADDR_ANY);
    ASSERT_NE(port, 0U);
    const asio::ip::tcp::endpoint ep(asio::ip::make_address("127.0.0.1"),
                                     static_cast<unsigned short>(port));
    const std::string any = fmt::format("0.0.0.0:{}", port);

    // Without --rest-allow-remote: as rest-listen 0.0.0.0 would be, refused before anything.
    ASSERT_NO_FATAL_FAILURE(start_activated({any}));
    {
        HttpConnection c(ioc_, ep);
        HttpResponse r = c.request("GET", "/v1/health");
        EXPECT_NE(r.status, 200) << r;
    }
    EXPECT_EQ(daemon().wait_exit(10s), 1) << daemon().output();
    EXPECT_TRUE(daemon().says(fmt::format("the TCP socket 0.0.0.0:{} is not on a loopback address; "
                                          "add --rest-allow-remote",
                                          port)))
        << daemon().output();
    EXPECT_FALSE(fs::exists(state_ / "rest.token"));
    EXPECT_FALSE(listener_->wait_for("READY=1", 10ms));
    daemon_.reset();

    // With it: served (with the token), and said loudly.
    ASSERT_NO_FATAL_FAILURE(start_activated({any}, false, {"--rest-allow-remote"}));
    {
        HttpConnection c(ioc_, ep);
        ASSERT_FALSE(c.error()) << c.error().message();
        HttpResponse r = c.request("GET", "/v1/machines");
        EXPECT_EQ(r.status, 401) << r << daemon().output();
    }
    EXPECT_TRUE(listener_->wait_for("READY=1", 10s)) << listener_->history();
    EXPECT_TRUE(daemon().says(fmt::format("warning: REST listens on 0.0.0.0:{} (passed by the "
                                          "service manager), which is not a loopback address",
                                          port)))
        << daemon().output();
}

TEST_F(SystemdTest, PassedDescriptorThatIsNotAStreamSocketIsRefused)
{
    // A datagram socket: the manager starts the daemon at the first datagram.
    ASSERT_NO_FATAL_FAILURE(start_activated({socket_path().string()}, true));
    const int s = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un to{};
    to.sun_family = AF_UNIX;
    const std::string path = socket_path().string();
    std::copy(path.begin(), path.end(), to.sun_path);
    ASSERT_EQ(::sendto(s, "x", 1, 0, reinterpret_cast<sockaddr*>(&to), sizeof to), 1)
        << std::strerror(errno);
    ::close(s);
    EXPECT_EQ(daemon().wait_exit(10s), 1) << daemon().output();
    EXPECT_TRUE(daemon().says("socket activation: descriptor 3")) << daemon().output();
    EXPECT_TRUE(daemon().says("is not a listening stream socket")) << daemon().output();
    // It stopped before touching anything: no lock, no state directory.
    EXPECT_FALSE(fs::exists(runtime_ / "qmachined.lock"));
    EXPECT_FALSE(fs::exists(state_));
    EXPECT_FALSE(listener_->wait_for("READY=1", 10ms));
    daemon_.reset();
}

// LimitNOFILE=1024:524288 in the unit: qmachined raises its soft limit to the hard one.
TEST_F(SystemdTest, RaisesItsDescriptorLimitToTheHardOne)
{
    std::vector<std::string> args{"--nofile=1024:8192", QM_QMACHINED};
    const auto own = daemon_args();
    args.insert(args.end(), own.begin(), own.end());
    daemon_ = std::make_unique<DaemonProcess>("/usr/bin/prlimit", args, root_ / "limit.out");
    ASSERT_TRUE(eventually([&] { return accepts_connections(socket_path()); }, 30s))
        << daemon_->output();
    std::string limit;
    for (const auto& line : lines_with(read_whole_file(fmt::format("/proc/{}/limits",
                                                                   daemon_->pid())),
                                       "Max open files")) {
        limit = line;
    }
    EXPECT_NE(limit.find("8192                 8192"), std::string::npos) << limit;
}

// `systemctl restart qmachined` as the installed unit's KillMode= has systemd do it: "process"
// signals the main process only; "mixed" SIGTERMs it and SIGKILLs the rest of the cgroup (here:
// the daemon's children, its QEMUs); "control-group" SIGTERMs every process. Then a new daemon
// starts on the same socket.
TEST_F(SystemdTest, RestartUnderTheUnitsKillModeKeepsEveryMachine)
{
    const fs::path unit = fs::path(QM_BUILD_ROOT) / "systemd" / "qmachined.service";
    const std::string kill_mode = unit_setting(unit, "KillMode");
    ASSERT_FALSE(kill_mode.empty()) << unit << " names no KillMode=";
    EXPECT_EQ(unit_setting(unit, "RuntimeDirectoryPreserve"), "yes");

    ASSERT_NO_FATAL_FAILURE(start_activated({socket_path().string()}));
    ASSERT_EQ(create("a", quick_spec(true)).status, 201);
    ASSERT_EQ(create("b", quick_spec(false)).status, 201);
    const pid_t a = start_machine("a");
    const pid_t b = start_machine("b");
    ASSERT_TRUE(listener_->wait_for("READY=1", 10s)) << listener_->history();
    const auto files_before = files_under(runtime_ / "m");
    ASSERT_GE(files_before.size(), 4U); // per machine at least its monitor socket and log

    // The stop.
    const pid_t main_pid = daemon().pid();
    const std::vector<pid_t> cgroup = children_of(main_pid);
    ASSERT_EQ(std::set<pid_t>(cgroup.begin(), cgroup.end()), (std::set<pid_t>{a, b}));
    if (kill_mode == "control-group") {
        for (pid_t p : cgroup) {
            ::kill(p, SIGTERM);
        }
    }
    daemon().signal(SIGTERM);
    ASSERT_EQ(daemon().wait_exit(10s), 0) << daemon().output();
    if (kill_mode == "mixed" || kill_mode == "control-group") {
        for (pid_t p : cgroup) {
            ::kill(p, SIGKILL);
        }
    }
    daemon_.reset();

    // The start: the same machines, processes and sockets, taken over.
    ASSERT_NO_FATAL_FAILURE(start_activated({socket_path().string()}));
    HttpResponse list = call("GET", "/v1/machines");
    ASSERT_EQ(list.status, 200) << list << daemon().output();
    for (const auto& [name, pid] : {std::pair{"a", a}, std::pair{"b", b}}) {
        auto m = machine(name);
        EXPECT_EQ(json::get_string(m, "state").value_or("?"), "running")
            << name << " after a restart with KillMode=" << kill_mode;
        EXPECT_EQ(json::get_int(m, "pid").value_or(-1), pid) << name;
        EXPECT_TRUE(alive(pid)) << name;
    }
    EXPECT_EQ(files_under(runtime_ / "m"), files_before) << "a machine's file was replaced";
    // Each answers QMP through its kept monitor.
    HttpResponse q = call("POST", "/v1/machines/a/qmp", R"({"execute": "query-status"})");
    EXPECT_EQ(q.status, 200) << q;
    EXPECT_TRUE(daemon().says("Re-attached 'a'")) << daemon().output();
    EXPECT_TRUE(daemon().says("Re-attached 'b'")) << daemon().output();
}

} // namespace
} // namespace qm::test
