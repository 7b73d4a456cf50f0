// SPDX-License-Identifier: GPL-2.0-or-later
// qmachined: configuration, directories, the one loop, signals, and the supervisor's life.
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "daemon/activation.hpp"
#include "daemon/audit.hpp"
#include "daemon/config.hpp"
#include "daemon/dbus/service.hpp"
#include "daemon/machined.hpp"
#include "daemon/metrics.hpp"
#include "daemon/notify.hpp"
#include "daemon/qemu_version.hpp"
#include "daemon/rest/api.hpp"
#include "daemon/rest/server.hpp"
#include "daemon/supervisor/store.hpp"
#include "daemon/supervisor/supervisor.hpp"
#include "libmachine/proc/proc_info.hpp"
#include "libmachine/asio.hpp"

namespace {

using qm::daemon::Config;

constexpr const char* version = "0.1.0";

void setup_logging(spdlog::level::level_enum level)
{
    auto logger = spdlog::stderr_color_mt("qmachined");
    // Under systemd the journal stamps each line; elsewhere the time helps.
    logger->set_formatter(qm::daemon::make_log_formatter(std::getenv("JOURNAL_STREAM") == nullptr));
    spdlog::set_default_logger(logger);
    spdlog::set_level(level);
}

// Hundreds of machines need thousands of descriptors (monitor, console, log, clients).
void raise_fd_limit()
{
    rlimit rl{};
    if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        const auto old = rl.rlim_cur;
        rl.rlim_cur = rl.rlim_max;
        if (::setrlimit(RLIMIT_NOFILE, &rl) == 0) {
            spdlog::debug("Raised the open file limit from {} to {}", old, rl.rlim_max);
        }
    }
}

// Closes the passed sockets on an early return (before the daemon takes them).
struct ActivatedGuard
{
    qm::daemon::ActivatedSockets* sockets;
    ~ActivatedGuard()
    {
        for (int fd : {sockets->unix_fd, sockets->tcp_fd}) {
            if (fd >= 0) {
                ::close(fd);
            }
        }
    }
};

// Image directories QEMU cannot reach are a mistake found now rather than at a machine's start.
void check_image_dirs(const Config& config)
{
    for (const std::string& dir : config.image_dirs) {
        struct stat st {};
        if (::stat(dir.c_str(), &st) != 0) {
            spdlog::warn("Image directory '{}' (image-dirs): {}", dir, std::strerror(errno));
        } else if (!S_ISDIR(st.st_mode)) {
            spdlog::warn("Image directory '{}' (image-dirs) is not a directory", dir);
        } else {
            spdlog::debug("Image directory '{}'", dir);
        }
    }
}

// One daemon per runtime directory: a second one would fight the first over every machine.
int lock_runtime_dir(const std::string& dir)
{
    const std::string path = dir + "/qmachined.lock";
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        spdlog::critical("Failed to open '{}': {}", path, std::strerror(errno));
        return -1;
    }
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
        spdlog::critical("Another qmachined already runs with the runtime directory '{}'", dir);
        ::close(fd);
        return -1;
    }
    return fd;
}

// The credentials QEMU runs with: the configured user's when qmachined runs as root, else
// qmachined's own (nullopt). errc::invalid_argument when the user does not exist, is root or is
// a member of `admin_group` (qmachined's own group: a QEMU taken over by its guest could then
// drive qmachined through its REST socket and D-Bus API).
qm::expected<void> resolve_qemu_user(const Config& config, qm::daemon::SupervisorOptions& options,
                                     std::optional<gid_t> admin_group)
{
    if (::geteuid() != 0 || config.qemu_user.empty()) {
        if (!config.qemu_user.empty()) {
            spdlog::debug("Not root: QEMU runs as qmachined's own user, not '{}'",
                          config.qemu_user);
        } else if (::geteuid() == 0) {
            spdlog::warn("qemu-user is empty: QEMU runs as root");
        }
        return {};
    }
    std::vector<char> buf(16384);
    passwd pw{};
    passwd* found = nullptr;
    const int rc = ::getpwnam_r(config.qemu_user.c_str(), &pw, buf.data(), buf.size(), &found);
    if (rc != 0 || found == nullptr) {
        return qm::fail(qm::errc::invalid_argument,
                        fmt::format("QEMU's user '{}' does not exist: create it (useradd --system "
                                    "--no-create-home --shell /usr/sbin/nologin {}) or set "
                                    "qemu-user", config.qemu_user, config.qemu_user));
    }
    if (pw.pw_uid == 0) {
        return qm::fail(qm::errc::invalid_argument,
                        fmt::format("qemu-user '{}' is root: QEMU must not run as root",
                                    config.qemu_user));
    }
    // getgrouplist(3) asks every NSS source; nss-systemd asks every userdb service, among them
    // systemd-machined's (io.systemd.Machine: the users of containers, never QEMU's): a machined
    // that does not answer would hold qmachined's start for varlink's 45 s. Not asked.
    const char* bypass = std::getenv("SYSTEMD_BYPASS_USERDB");
    const std::optional<std::string> saved =
        bypass != nullptr ? std::optional<std::string>(bypass) : std::nullopt;
    const std::string machine_userdb = "io.systemd.Machine";
    ::setenv("SYSTEMD_BYPASS_USERDB",
             (saved && !saved->empty() ? *saved + ":" + machine_userdb : machine_userdb).c_str(), 1);
    int count = 64;
    std::vector<gid_t> groups(static_cast<std::size_t>(count));
    if (::getgrouplist(pw.pw_name, pw.pw_gid, groups.data(), &count) < 0) {
        groups.resize(static_cast<std::size_t>(count));
        ::getgrouplist(pw.pw_name, pw.pw_gid, groups.data(), &count);
    }
    groups.resize(static_cast<std::size_t>(std::max(count, 0)));
    if (saved) {
        ::setenv("SYSTEMD_BYPASS_USERDB", saved->c_str(), 1);
    } else {
        ::unsetenv("SYSTEMD_BYPASS_USERDB");
    }
    if (admin_group && (pw.pw_gid == *admin_group ||
                        std::find(groups.begin(), groups.end(), *admin_group) != groups.end())) {
        return qm::fail(qm::errc::invalid_argument,
                        fmt::format("qemu-user '{}' is a member of the group qmachined, whose "
                                    "members control qmachined: a QEMU taken over by its guest "
                                    "could drive every machine. Remove it from the group (gpasswd "
                                    "-d {} qmachined) or set another qemu-user",
                                    config.qemu_user, config.qemu_user));
    }
    options.qemu_uid = pw.pw_uid;
    options.qemu_gid = pw.pw_gid;
    options.qemu_groups = std::move(groups);
    spdlog::info("QEMU runs as '{}' (uid {}, gid {})", config.qemu_user, pw.pw_uid, pw.pw_gid);
    return {};
}

// A REST listener on a non-loopback address (rest-allow-remote): said loudly.
void warn_remote(const std::string& where)
{
    spdlog::warn("REST listens on {}, which is not a loopback address (--rest-allow-remote): "
                 "anyone who can reach it and holds the token controls every machine, over plain "
                 "HTTP",
                 where);
}

qm::rest::ApiOptions api_options(const Config& config)
{
    qm::rest::ApiOptions options;
    options.daemon_version = version;
    options.max_subscribers = config.rest_max_subscribers;
    return options;
}

class Daemon
{
public:
    Daemon(qm::asio::io_context& ioc, Config config, qm::daemon::SupervisorOptions options,
           qm::daemon::NotifyEnvironment notify, qm::daemon::ActivatedSockets activated,
           std::optional<gid_t> admin_group)
        : ioc_(ioc), config_(std::move(config)), activated_(std::move(activated)),
          admin_group_(admin_group), notifier_(ioc, std::move(notify)),
          supervisor_(ioc, std::move(options)), api_(supervisor_, api_options(config_)),
          signals_(ioc, SIGTERM, SIGINT, SIGHUP)
    {
        open_bus();
        qm::daemon::register_process_metrics(supervisor_.metrics(), version);
    }

    int run()
    {
        // The keep-alive runs from the start: re-attaching hundreds of machines takes a while.
        notifier_.start_watchdog();
        watch_status();
        auto loaded = supervisor_.load();
        if (!loaded) {
            spdlog::critical("Failed to start: {}", loaded.error().message);
            return 1;
        }
        // A socket left by a daemon that died (we hold the runtime directory's lock: it is not
        // another one's) goes now, so that the socket's existence keeps meaning "ready". A socket
        // the service manager passed is the manager's: it exists before we are ready, and
        // connections wait in its backlog until we accept.
        if (const auto path = qm::daemon::rest_socket_path(config_);
            !path.empty() && activated_.unix_fd < 0) {
            struct stat st {};
            if (::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
                ::unlink(path.c_str());
                spdlog::info("Removed the stale socket '{}' of an earlier qmachined", path);
            }
        }
        wait_signal();
        notifier_.status("Starting: re-attaching the machines that kept running");
        // QEMUs that kept running while the daemon was down are taken over before anyone is
        // served: the socket appears when every machine's state is known again.
        qm::asio::co_spawn(ioc_, supervisor_.reattach(), [this](const std::exception_ptr& e) {
            if (e) {
                spdlog::critical("Failed to re-attach the machines: {}",
                                 qm::describe_exception(e));
                rc_ = 1;
                ioc_.stop();
                return;
            }
            reattached_ = true;
            if (pending_signal_ != 0) {
                on_signal(pending_signal_); // now every machine can be stopped
                return;
            }
            ready();
        });
        ioc_.run();
        spdlog::info("qmachined exits");
        return rc_;
    }

private:
    // The D-Bus front end, its objects registered at once; its name is asked for once the
    // daemon is ready. No reachable bus is logged and REST goes on.
    void open_bus()
    {
        std::string which = config_.bus;
        if (which.empty()) {
            which = ::geteuid() == 0 ? "system" : "user";
        }
        if (which == "none") {
            spdlog::info("D-Bus: not served (bus none)");
            return;
        }
        const auto address = qm::dbus::BusAddress::parse(which);
        auto bus = qm::dbus::Bus::open(ioc_, address);
        if (!bus) {
            spdlog::warn("D-Bus: not served: {}", bus.error().message);
            return;
        }
        qm::dbus::ServiceOptions options;
        if (const group* g = ::getgrnam("qmachined"); g != nullptr) {
            options.admin_group = g->gr_gid;
        }
        dbus_.emplace(ioc_, supervisor_, std::move(*bus), options);
        spdlog::info("D-Bus: connected to {}", address.describe());
        serves_system_bus_ = address.kind == qm::dbus::BusAddress::Kind::system;
    }

    // systemd-machined: through the system bus the front end serves, or one of its own when
    // asked for (machined = on) with another bus.
    void start_machined()
    {
        const bool wanted = config_.machined == "on" ||
                            (config_.machined == "auto" && ::geteuid() == 0 && serves_system_bus_);
        if (!wanted) {
            spdlog::debug("machined: not registering machines (machined = {})", config_.machined);
            return;
        }
        qm::dbus::Bus* bus = serves_system_bus_ && dbus_ ? &dbus_->bus() : nullptr;
        if (bus == nullptr) {
            auto own = qm::dbus::Bus::open(ioc_, qm::dbus::BusAddress::parse("system"));
            if (!own) {
                spdlog::info("machined: no system bus ({}): machines are not registered",
                             own.error().message);
                return;
            }
            machined_bus_ = std::move(*own);
            bus = machined_bus_.get();
        }
        machined_.emplace(ioc_, supervisor_, *bus);
        machined_->start();
    }

    void ready()
    {
        if (stopping_) {
            return; // a signal came during the re-attach
        }
        auto serving = serve();
        if (!serving) {
            spdlog::critical("Failed to start: {}", serving.error().message);
            notifier_.status("Failed to start: " + serving.error().message);
            rc_ = 1;
            done_ = true;
            signals_.cancel();
            supervisor_.detach_all(); // what runs keeps running for the next start
            ioc_.stop();
            return;
        }
        if (dbus_) {
            dbus_->start();
        }
        start_machined();
        autostart_once_per_boot();
        probe_qemu();
        spdlog::info("qmachined {} ready: state '{}', runtime '{}', {} machine(s)", version,
                     config_.state_dir, config_.runtime_dir, supervisor_.size());
        notifier_.ready(status_text());
    }

    // Machines with autostart start with the first qmachined of a boot, as libvirt does: a
    // daemon restarted later (an upgrade, Restart=on-failure after a crash) must not start again
    // what an operator stopped. The runtime directory's `autostarted` holds the boot id of the
    // last autostart.
    void autostart_once_per_boot()
    {
        const std::string boot = qm::proc::boot_id();
        const std::string marker = config_.runtime_dir + "/autostarted";
        std::string last;
        if (std::FILE* f = std::fopen(marker.c_str(), "re"); f != nullptr) {
            char buf[64] = {};
            const std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
            std::fclose(f);
            last.assign(buf, n);
            while (!last.empty() && (last.back() == '\n' || last.back() == ' ')) {
                last.pop_back();
            }
        }
        if (!boot.empty() && last == boot) {
            spdlog::info("Autostart: done already in this boot ({}): machines stopped since stay "
                         "stopped",
                         marker);
            return;
        }
        if (auto written = qm::daemon::write_file_atomic(config_.runtime_dir, "autostarted",
                                                         boot + "\n");
            !written) {
            spdlog::warn("Autostart: cannot record it: {}", written.error().message);
        }
        supervisor_.autostart();
    }

    // STATUS= follows the machine counts: every event that can change them marks the status
    // stale; the notifier reads it again (at most once a second).
    void watch_status()
    {
        notifier_.set_status_source([this] { return status_text(); });
        if (!notifier_.enabled()) {
            return;
        }
        supervisor_.events().listen([this](const qm::daemon::Event& e) {
            namespace names = qm::daemon::event_names;
            const std::string_view name = e.name();
            if (name == names::state_changed || name == names::machine_created ||
                name == names::machine_removed || name == names::machine_reattached) {
                notifier_.status_changed();
            }
        });
    }

    std::string status_text() const
    {
        std::string text = qm::daemon::machine_count_status(supervisor_.count_by_state());
        if (stopping_ && stop_machines_) {
            text = "Stopping the machines before exit; " + text;
        }
        return text;
    }

    // Machines with a QEMU process.
    std::size_t machines_with_process() const
    {
        std::size_t n = 0;
        for (const auto& [state, count] : supervisor_.count_by_state()) {
            const auto s = qm::machine_state_from_string(state);
            if (s && qm::has_process(*s)) {
                n += count;
            }
        }
        return n;
    }

    // The REST listeners: the unix socket appears only now, when the daemon can answer.
    qm::expected<void> serve()
    {
        qm::rest::ServerOptions options;
        options.unix_path = qm::daemon::rest_socket_path(config_);
        options.unix_group = admin_group_;
        if (activated_.unix_fd >= 0) {
            if (activated_.unix_path != options.unix_path) {
                spdlog::info("REST: serving the unix socket '{}' the service manager passed "
                             "instead of '{}'",
                             activated_.unix_path, options.unix_path);
            }
            options.unix_fd = std::exchange(activated_.unix_fd, -1);
            options.unix_path = activated_.unix_path;
        }
        options.max_connections = config_.rest_max_connections;
        options.max_body = config_.rest_max_body;
        options.max_header = config_.rest_max_header;
        options.request_timeout = config_.rest_request_timeout;
        options.server_header = fmt::format("qmachined/{}", version);
        if (activated_.tcp_fd >= 0) {
            if (!config_.rest_listen.empty()) {
                spdlog::info("REST: serving the TCP socket {} the service manager passed instead "
                             "of rest-listen {}",
                             activated_.tcp_address, config_.rest_listen);
            }
            options.tcp_fd = std::exchange(activated_.tcp_fd, -1);
            if (!activated_.tcp_loopback) { // allowed: main() refused it otherwise
                warn_remote(activated_.tcp_address + " (passed by the service manager)");
            }
            auto token = qm::rest::load_or_create_token(qm::daemon::rest_token_path(config_));
            if (!token) {
                return qm::fail(token.error());
            }
            options.token = std::move(*token);
        } else if (!config_.rest_listen.empty()) {
            auto listen = qm::daemon::parse_listen_address(config_.rest_listen);
            if (!listen) {
                return qm::fail(listen.error());
            }
            options.tcp.emplace(qm::asio::ip::make_address(listen->first), listen->second);
            auto token = qm::rest::load_or_create_token(qm::daemon::rest_token_path(config_));
            if (!token) {
                return qm::fail(token.error());
            }
            options.token = std::move(*token);
            const auto address = options.tcp->address();
            if (!address.is_loopback()) {
                warn_remote(address.to_string());
            }
        }
        // The server counts its requests and connections in the supervisor's registry, which
        // GET /metrics renders.
        server_.emplace(ioc_, api_, std::move(options), supervisor_.metrics());
        return server_->listen();
    }

    void probe_qemu()
    {
        qm::asio::co_spawn(ioc_, qm::daemon::probe_qemu_version("qemu-system-x86_64"),
                           [this](const std::exception_ptr& e,
                                  qm::expected<qm::rest::QemuVersion> v) {
                               if (e) {
                                   spdlog::warn("Failed to ask QEMU for its version: {}",
                                                qm::describe_exception(e));
                               } else if (!v) {
                                   spdlog::warn("Failed to ask QEMU for its version: {}",
                                                v.error().message);
                               } else {
                                   spdlog::info("QEMU: {}", v->text);
                                   api_.set_qemu_version(std::move(*v));
                               }
                           });
    }

    void wait_signal()
    {
        signals_.async_wait([this](const qm::error_code& ec, int signo) {
            if (ec) {
                return;
            }
            on_signal(signo);
            if (!done_) {
                wait_signal();
            }
        });
    }

    void on_signal(int signo)
    {
        if (signo == SIGHUP) {
            reload();
            return;
        }
        if (stopping_) {
            spdlog::warn("Received {} while shutting down: still stopping the machines",
                         strsignal(signo));
            return;
        }
        if (!reattached_ && stop_machines_) {
            // Machines being taken over are not stoppable yet: stop them once they are.
            if (pending_signal_ == 0) {
                spdlog::info("Received {} during the re-attach: stopping the machines once it is "
                             "done", strsignal(signo));
                pending_signal_ = signo;
            }
            return;
        }
        stopping_ = true;
        if (!stop_machines_) {
            // shutdown-policy leave-running (the default, as libvirt): the machines outlive us
            // and the next start re-attaches them.
            spdlog::info("Received {}: leaving the machines running, exiting", strsignal(signo));
            notifier_.stopping(fmt::format("Exiting, leaving {} machine(s) running",
                                           machines_with_process()));
            supervisor_.detach_all();
            finish();
            return;
        }
        spdlog::info("Received {}: stopping every machine, then exiting", strsignal(signo));
        notifier_.stopping(fmt::format("Stopping {} machine(s) before exit",
                                       machines_with_process()));
        // Requests still get answers while the machines stop (operations: 503 ShuttingDown).
        if (server_) {
            server_->drain();
        }
        qm::asio::co_spawn(ioc_, supervisor_.shutdown(), [this](const std::exception_ptr& e) {
            if (e) {
                spdlog::error("Failed to shut down cleanly: {}", qm::describe_exception(e));
            }
            finish();
        });
    }

    // The end: the REST server closes (event streams end with their last chunk), the loop runs
    // until its connections are gone, at most a second, then stops.
    void finish()
    {
        if (server_) {
            server_->close();
        }
        machined_.reset(); // it uses a bus
        dbus_.reset();
        machined_bus_.reset();
        done_ = true;
        signals_.cancel();
        finish_deadline_ = std::chrono::steady_clock::now() + std::chrono::seconds(1);
        wait_for_connections();
    }

    void wait_for_connections()
    {
        if (!server_ || server_->connections() == 0 ||
            std::chrono::steady_clock::now() >= finish_deadline_) {
            ioc_.stop();
            return;
        }
        finish_timer_.expires_after(std::chrono::milliseconds(5));
        finish_timer_.async_wait([this](qm::error_code) { wait_for_connections(); });
    }

    // SIGHUP: the configuration file again. The log level applies at once; the directories are
    // fixed for the daemon's life (machines live in them).
    void reload()
    {
        if (config_.config_file.empty()) {
            spdlog::info("Received SIGHUP: no configuration file to re-read");
            return;
        }
        Config fresh = config_;
        auto applied = qm::daemon::apply_config_file(fresh, config_.config_file);
        if (!applied) {
            spdlog::error("Failed to reload '{}': {}", config_.config_file,
                          applied.error().message);
            return;
        }
        if (fresh.state_dir != config_.state_dir || fresh.runtime_dir != config_.runtime_dir) {
            spdlog::warn("Reloaded '{}': directory changes take effect at the next start",
                         config_.config_file);
        }
        // The command line wins over the file, at start and at every reload.
        if (!config_.log_level_from_flag) {
            config_.log_level = fresh.log_level;
            spdlog::set_level(fresh.log_level);
        }
        spdlog::info("Reloaded '{}' (log level {}{})", config_.config_file,
                     spdlog::level::to_string_view(config_.log_level),
                     config_.log_level_from_flag ? ", from --log-level" : "");
    }

    qm::asio::io_context& ioc_;
    Config config_;
    qm::daemon::ActivatedSockets activated_; // handed to the REST server when it serves
    std::optional<gid_t> admin_group_;       // the group qmachined, for a root daemon
    // Before the supervisor: its event listener may run while the supervisor is destroyed.
    qm::daemon::Notifier notifier_;
    qm::daemon::Supervisor supervisor_;
    qm::rest::Api api_;
    std::optional<qm::rest::Server> server_;
    std::optional<qm::dbus::Service> dbus_;
    bool serves_system_bus_ = false;
    std::unique_ptr<qm::dbus::Bus> machined_bus_; // machined = on without serving the system bus
    // After the buses: its calls are freed with their slots when a bus goes.
    std::optional<qm::daemon::MachinedRegistrar> machined_;
    qm::asio::signal_set signals_;
    qm::asio::steady_timer finish_timer_{ioc_};
    std::chrono::steady_clock::time_point finish_deadline_{};
    bool stopping_ = false;
    bool done_ = false;
    bool reattached_ = false; // reattach() completed
    int pending_signal_ = 0;  // a SIGTERM/SIGINT that came during it (stop-machines)
    bool stop_machines_ = config_.shutdown_policy == qm::daemon::ShutdownPolicy::stop_machines;
    int rc_ = 0;
};

} // namespace

int main(int argc, char** argv)
{
    std::vector<std::string> args(argv + 1, argv + argc);
    auto cl = qm::daemon::parse_command_line(args);
    if (!cl) {
        std::fprintf(stderr, "qmachined: %s\nTry 'qmachined --help'.\n",
                     cl.error().message.c_str());
        return 2;
    }
    if (cl->help) {
        std::fputs(qm::daemon::usage().c_str(), stdout);
        return 0;
    }
    if (cl->version) {
        std::printf("qmachined %s\n", version);
        return 0;
    }
    Config config = cl->config;
    setup_logging(config.log_level);
    // Read (and removed from the environment QEMU inherits) before anything is started.
    auto notify = qm::daemon::take_notify_environment();
    std::signal(SIGPIPE, SIG_IGN); // a client gone mid-write is an error code, not a death
    // The same for socket activation's LISTEN_*: the sockets are ours from here on.
    auto activated = qm::daemon::take_activated_sockets();
    if (!activated) {
        spdlog::critical("Failed to start: {}", activated.error().message);
        return 1;
    }
    ActivatedGuard activated_guard{&*activated};
    // A TCP socket from the manager follows rest-listen's rule: loopback only, unless
    // rest-allow-remote (then said loudly when it is served, as for rest-listen).
    if (activated->tcp_fd >= 0 && !activated->tcp_loopback && !config.rest_allow_remote) {
        spdlog::critical("Failed to start: socket activation: the TCP socket {} is not on a "
                         "loopback address; add --rest-allow-remote to accept connections from "
                         "other hosts",
                         activated->tcp_address);
        return 1;
    }
    raise_fd_limit();
    // The group qmachined (sysusers.d) administers a root daemon: its members reach the REST
    // socket (0660, group qmachined) through the runtime directory (0710, group qmachined), and
    // call the D-Bus API.
    std::optional<gid_t> admin_group;
    if (::geteuid() == 0) {
        if (const group* g = ::getgrnam("qmachined"); g != nullptr) {
            admin_group = g->gr_gid;
        }
    }
    for (const std::string* dir : {&config.state_dir, &config.runtime_dir}) {
        auto made = qm::daemon::ensure_private_dir(
            *dir, dir == &config.runtime_dir ? admin_group : std::nullopt);
        if (!made) {
            spdlog::critical("Failed to prepare '{}': {}", *dir, made.error().message);
            return 1;
        }
    }
    check_image_dirs(config);
    const int lock_fd = lock_runtime_dir(config.runtime_dir);
    if (lock_fd < 0) {
        return 1;
    }
    qm::daemon::SupervisorOptions options;
    options.state_dir = config.state_dir;
    options.runtime_dir = config.runtime_dir;
    options.sandbox = config.qemu_sandbox;
    options.qmp_policy = qm::daemon::qmp_policy(config);
    options.qemu_log_max = config.qemu_log_max;
    options.max_machines = config.max_machines;
    options.qmp_timeout = config.qmp_timeout;
    options.events.ring_capacity = config.event_ring;
    options.events.subscriber_queue = config.event_queue;
    options.events.qmp_rate_per_s = config.event_rate;
    options.events.qmp_burst = config.event_burst;
    options.qmp_max_message = config.qmp_max_message;
    if (auto user = resolve_qemu_user(config, options, admin_group); !user) {
        spdlog::critical("Failed to start: {}", user.error().message);
        ::close(lock_fd);
        return 1;
    }
    if (!config.qemu_sandbox) {
        spdlog::warn("qemu-sandbox is off: QEMU runs without its seccomp sandbox");
    }

    int rc = 0;
    {
        qm::asio::io_context ioc{1};
        Daemon daemon(ioc, config, std::move(options), std::move(notify),
                      std::exchange(*activated, {}), admin_group);
        rc = daemon.run();
    }
    ::close(lock_fd);
    return rc;
}
