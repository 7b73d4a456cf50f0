// SPDX-License-Identifier: GPL-2.0-or-later
// qm::Machine: the QEMUMachine port. Launch, the shutdown ladder, run state from events and the
// process, QMP in both of the seed's flavours, events, log and files.
#include "libmachine/machine/machine.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "libmachine/proc/spawn.hpp"

namespace qm {
namespace {

namespace fs = std::filesystem;

constexpr std::size_t max_io_log = std::size_t{64} * 1024;
constexpr auto hard_kill_wait = 60s; // the seed's _hard_shutdown waits 60 s after SIGKILL
// With pass_sockets, the -add-fd set of the console log (QEMU opens "/dev/fdset/N").
constexpr int console_log_fdset = 999;
// With pass_sockets, the chardev of the monitor the launching daemon talks to (the served one is
// "mon"); daemon/supervisor/spec.cpp reserves both ids.
constexpr std::string_view launch_monitor_id = "mon-launch";
unsigned machine_counter = 0;        // loop thread only, like everything here

Error make_error(errc code, std::string message)
{
    return Error{make_error_code(code), std::move(message), {}, {}};
}

// QEMU option values double their commas (QemuOpts).
std::string opt_escape(std::string_view s)
{
    std::string out;
    out.reserve(s.size());
    for (char c : s) {
        out += c;
        if (c == ',') {
            out += ',';
        }
    }
    return out;
}

// The seed's conv_keys: argument names with underscores become dashes (top level only).
json::Document convert_keys(json::Document args)
{
    if (!args.IsObject()) {
        return args;
    }
    for (auto& m : args.GetObject()) {
        std::string key(m.name.GetString(), m.name.GetStringLength());
        if (key.find('_') != std::string::npos) {
            std::replace(key.begin(), key.end(), '_', '-');
            m.name.SetString(key.c_str(), static_cast<rapidjson::SizeType>(key.size()),
                             args.GetAllocator());
        }
    }
    return args;
}

// What a QMP event says about the run state. Sorted by name: looked up with a binary search
// (libvirt's qemuMonitorJSON event table).
struct EventRule
{
    std::string_view event;
    MachineState state;
    std::string_view qemu_status;
};
constexpr std::array<EventRule, 6> event_rules{{
    {"GUEST_PANICKED", MachineState::paused, "guest-panicked"},
    {"RESUME", MachineState::running, "running"},
    {"SHUTDOWN", MachineState::stopping, "shutdown"},
    {"STOP", MachineState::paused, "paused"},
    {"SUSPEND", MachineState::paused, "suspended"},
    {"WAKEUP", MachineState::running, "running"},
}};
static_assert(std::is_sorted(event_rules.begin(), event_rules.end(),
                             [](const auto& a, const auto& b) { return a.event < b.event; }),
              "event_rules is searched by bisection: keep it sorted");

const EventRule* find_rule(std::string_view event)
{
    auto it = std::lower_bound(event_rules.begin(), event_rules.end(), event,
                               [](const EventRule& r, std::string_view e) { return r.event < e; });
    return it != event_rules.end() && it->event == event ? &*it : nullptr;
}

} // namespace

const char* to_string(ShutdownStep step) noexcept
{
    switch (step) {
    case ShutdownStep::none: return "none";
    case ShutdownStep::exited: return "exited";
    case ShutdownStep::guest_poweroff: return "guest-poweroff";
    case ShutdownStep::quit: return "quit";
    case ShutdownStep::kill: return "kill";
    }
    return "none";
}

// A coroutine waiting for a predicate over the machine's state; woken at every state change.
struct Machine::StateWaiter
{
    explicit StateWaiter(asio::io_context& ioc) : timer(ioc) {}
    asio::steady_timer timer;
};

Machine::Machine(asio::io_context& ioc, MachineConfig config)
    : ioc_(ioc)
    , config_(std::move(config))
    // Installs the SIGCHLD handler now, before any child of ours can exit.
    , watcher_(proc::ChildWatcher::get(ioc))
{
    if (config_.name.empty()) {
        config_.name = fmt::format("qemu-{}-{}", ::getpid(), ++machine_counter);
    }
}

Machine::~Machine()
{
    life_.reset(); // callbacks still queued see the machine is gone
    if (pid_ > 0 && !exit_status_) {
        watcher_.send_signal(pid_, SIGKILL);
        watcher_.forget(pid_); // still reaped when it exits: no zombie
    }
    if (client_) {
        client_->close();
    }
    if (console_) {
        console_->close();
    }
    listener_.reset();
    for (int fd : pass_fds_) {
        ::close(fd);
    }
    for (const auto& f : remove_files_) {
        ::unlink(f.c_str());
    }
    if (!temp_dir_.empty()) {
        std::error_code ec;
        fs::remove_all(temp_dir_, ec);
    }
}

//---- configuration ----------------------------------------------------------------------------

void Machine::set_machine(std::string machine_type)
{
    machine_type_ = std::move(machine_type);
}

void Machine::add_args(const std::vector<std::string>& args)
{
    config_.args.insert(config_.args.end(), args.begin(), args.end());
}

void Machine::set_console(std::optional<std::string> device_type, int console_index)
{
    console_set_ = true;
    console_device_type_ = std::move(device_type);
    console_index_ = std::max(console_index, 0);
}

void Machine::set_qmp_monitor(bool enabled)
{
    qmp_set_ = enabled;
}

void Machine::add_monitor_null()
{
    config_.args.emplace_back("-monitor");
    config_.args.emplace_back("null");
}

expected<void> Machine::add_fd(int fd, int fdset, std::string opaque, std::string opts)
{
    const int dup = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (dup < 0) {
        return fail(errc::invalid_argument,
                    fmt::format("cannot pass fd {}: {}", fd, std::strerror(errno)));
    }
    const int child_fd = proc::inherited_fd_number(pass_fds_.size());
    pass_fds_.push_back(dup);
    std::string value = fmt::format("fd={},set={},opaque={}", child_fd, fdset, opt_escape(opaque));
    if (!opts.empty()) {
        value += "," + opts;
    }
    config_.args.emplace_back("-add-fd");
    config_.args.push_back(std::move(value));
    return {};
}

std::string Machine::console_socket_path()
{
    const std::string& dir = config_.sock_dir.empty() ? config_.base_temp_dir : config_.sock_dir;
    return fmt::format("{}/{}-console.sock", dir, file_prefix());
}

expected<qmp::Address> Machine::monitor_address()
{
    if (config_.monitor_address) {
        return *config_.monitor_address;
    }
    const std::string& dir = config_.sock_dir.empty() ? config_.base_temp_dir : config_.sock_dir;
    return qmp::Address::unix_socket(fmt::format("{}/{}-monitor.sock", dir, file_prefix()));
}

std::vector<std::string> Machine::base_args() const
{
    std::vector<std::string> args{"-display", "none", "-vga", "none"};
    // Beyond the seed: `ps` and QEMU's own messages say which machine a process is.
    args.emplace_back("-name");
    args.push_back(fmt::format("guest={},process=qemu:{}", opt_escape(config_.name),
                               opt_escape(config_.name)));
    // With pass_sockets, the descriptors launch() hands over follow the -add-fd ones, in this
    // order: the launch monitor, the served monitor, the console, the console log.
    std::size_t next_fd = pass_fds_.size();
    if (qmp_set_ && config_.pass_sockets) {
        // Two monitors. The launching daemon talks to QEMU over a connected socket pair: QEMU
        // greets it as soon as its monitor is set up, with no connection racing QEMU's start-up
        // (QEMU 7.2 loses the greeting of a connection to a served monitor that arrives while
        // the monitor is being set up: ~1 in 1000 starts). The served one waits for a daemon
        // that attaches after a restart, when QEMU is long set up.
        args.emplace_back("-chardev");
        args.push_back(fmt::format("socket,id={},fd={}", launch_monitor_id,
                                   proc::inherited_fd_number(next_fd++)));
        args.emplace_back("-mon");
        args.push_back(fmt::format("chardev={},mode=control", launch_monitor_id));
        args.emplace_back("-chardev");
        args.push_back(fmt::format("socket,id=mon,fd={},server=on,wait=off",
                                   proc::inherited_fd_number(next_fd++)));
        args.emplace_back("-mon");
        args.emplace_back("chardev=mon,mode=control");
    } else if (qmp_set_) {
        auto addr = const_cast<Machine*>(this)->monitor_address(); // NOLINT: pure computation
        std::string where = addr->kind == qmp::Address::Kind::unix_path
                                ? "path=" + opt_escape(addr->path)
                                : addr->chardev_options();
        args.emplace_back("-chardev");
        args.push_back("socket,id=mon," + where);
        args.emplace_back("-mon");
        args.emplace_back("chardev=mon,mode=control");
    }
    if (machine_type_) {
        args.emplace_back("-machine");
        args.push_back(*machine_type_);
    }
    for (int i = 0; i < console_index_; ++i) {
        args.emplace_back("-serial");
        args.emplace_back("null");
    }
    if (console_set_) {
        std::string chardev;
        if (config_.pass_sockets) {
            chardev = fmt::format("socket,id=console,fd={},server=on,wait=off",
                                  proc::inherited_fd_number(next_fd++));
            if (!config_.console_log.empty()) {
                // QEMU appends all guest output to the log it got as a descriptor (an fd set).
                args.emplace_back("-add-fd");
                args.push_back(fmt::format("fd={},set={},opaque=console-log",
                                           proc::inherited_fd_number(next_fd++),
                                           console_log_fdset));
                chardev += fmt::format(",logfile=/dev/fdset/{},logappend=on", console_log_fdset);
            }
        } else {
            chardev = "socket,id=console,path=" +
                      opt_escape(const_cast<Machine*>(this)->console_socket_path()) + // NOLINT
                      ",server=on,wait=off";
            if (!config_.console_log.empty()) {
                // QEMU itself appends all guest output to the file, reader connected or not.
                chardev += ",logfile=" + opt_escape(config_.console_log) + ",logappend=on";
            }
        }
        args.emplace_back("-chardev");
        args.push_back(std::move(chardev));
        if (console_device_type_) {
            args.emplace_back("-device");
            args.push_back(*console_device_type_ + ",chardev=console");
        } else {
            args.emplace_back("-serial");
            args.emplace_back("chardev:console");
        }
    }
    return args;
}

std::vector<std::string> Machine::full_args() const
{
    std::vector<std::string> argv = config_.wrapper;
    argv.push_back(config_.binary);
    auto base = base_args();
    argv.insert(argv.end(), base.begin(), base.end());
    argv.insert(argv.end(), config_.args.begin(), config_.args.end());
    return argv;
}

//---- files ------------------------------------------------------------------------------------

expected<std::string> Machine::temp_dir()
{
    if (temp_dir_.empty()) {
        std::string templ = config_.base_temp_dir + "/qemu-machine-XXXXXX";
        if (::mkdtemp(templ.data()) == nullptr) {
            return fail(errc::system_error,
                        fmt::format("cannot create a temporary directory in '{}': {}",
                                    config_.base_temp_dir, std::strerror(errno)));
        }
        temp_dir_ = templ;
    }
    return temp_dir_;
}

expected<std::string> Machine::log_dir()
{
    if (!config_.log_dir.empty()) {
        return config_.log_dir;
    }
    return temp_dir();
}

void Machine::load_io_log()
{
    iolog_.clear();
    if (log_path_.empty()) {
        return;
    }
    // Bounded: a chatty QEMU must not make cleanup read megabytes on the loop.
    std::ifstream f(log_path_, std::ios::binary | std::ios::ate);
    if (!f) {
        return;
    }
    const auto size = static_cast<std::size_t>(f.tellg());
    const std::size_t start = size > max_io_log ? size - max_io_log : 0;
    f.seekg(static_cast<std::streamoff>(start));
    iolog_.resize(size - start);
    f.read(iolog_.data(), static_cast<std::streamsize>(iolog_.size()));
    iolog_.resize(static_cast<std::size_t>(f.gcount()));
}

//---- state ------------------------------------------------------------------------------------

void Machine::set_state(MachineState s)
{
    const bool changed = s != state_;
    state_ = s;
    for (auto& w : waiters_) {
        w->timer.cancel();
    }
    if (changed) {
        spdlog::debug("machine[{}]: state {}", config_.name, to_string(s));
        if (on_state_change_) {
            on_state_change_(s);
        }
    }
}

void Machine::set_qemu_status(std::string_view status)
{
    qemu_status_ = std::string(status);
    if (!has_process(state_) || state_ == MachineState::stopping) {
        return;
    }
    if (status == "running") {
        set_state(MachineState::running);
    } else if (status == "shutdown") {
        set_state(MachineState::stopping);
    } else {
        // prelaunch, paused, suspended, inmigrate, io-error, guest-panicked, ...: not running.
        set_state(MachineState::paused);
    }
}

void Machine::handle_event(const qmp::Event& event)
{
    if (event.name() == "SHUTDOWN") {
        // Which step ended the process: the guest itself, or a quit (ours or anyone's).
        const json::Value* guest = json::find(event.data(), "guest");
        guest_shutdown_ = guest != nullptr && guest->IsBool() && guest->GetBool();
        shutdown_reason_ = std::string(json::get_string(event.data(), "reason").value_or(""));
    }
    const EventRule* rule = find_rule(event.name());
    if (rule == nullptr || !has_process(state_)) {
        return;
    }
    qemu_status_ = std::string(rule->qemu_status);
    if (state_ == MachineState::stopping && rule->state != MachineState::stopping) {
        return; // on the way out: a late STOP does not bring the machine back
    }
    set_state(rule->state);
}

void Machine::handle_exit(const proc::ExitStatus& status)
{
    exit_status_ = status;
    spdlog::debug("machine[{}]: QEMU (pid {}) {}", config_.name, pid_, status.to_string());
    if (listener_) {
        listener_->close(); // a launch still waiting for QEMU to connect gives up now
    }
    if (client_) {
        client_->close(make_error(errc::qmp_disconnected, "QEMU " + status.to_string()));
    }
    const bool asked = shutting_down_ || quit_issued_ || user_killed_;
    const bool our_signal = status.kind == proc::ExitStatus::Kind::signaled &&
                            ((user_killed_ || shutting_down_) && status.signal == SIGKILL);
    bool crashed = false;
    switch (status.kind) {
    case proc::ExitStatus::Kind::signaled:
        crashed = !our_signal && !(shutting_down_ && status.signal == SIGTERM);
        break;
    case proc::ExitStatus::Kind::exited: crashed = status.code != 0 && !asked; break;
    case proc::ExitStatus::Kind::unknown:
        // Not our child (attached): QEMU says SHUTDOWN before every orderly exit, so an exit
        // nobody asked for without one is a crash.
        crashed = !asked && shutdown_reason_.empty();
        break;
    }
    if (launching_) {
        for (auto& w : waiters_) {
            w->timer.cancel();
        }
    } else {
        set_state(crashed ? MachineState::crashed : MachineState::stopped);
    }
    if (on_exit_) {
        on_exit_(status);
    }
}

awaitable<bool> Machine::wait_until(std::function<bool()> done, std::chrono::milliseconds timeout)
{
    if (done()) {
        co_return true;
    }
    const auto deadline = timeout == std::chrono::milliseconds::max()
                              ? asio::steady_timer::time_point::max()
                              : asio::steady_timer::clock_type::now() + timeout;
    auto waiter = std::make_shared<StateWaiter>(ioc_);
    waiters_.push_back(waiter);
    bool ok = false;
    for (;;) {
        waiter->timer.expires_at(deadline);
        error_code ec;
        co_await waiter->timer.async_wait(use_ec(ec));
        if (done()) {
            ok = true;
            break;
        }
        if (asio::steady_timer::clock_type::now() >= deadline) {
            break;
        }
    }
    waiters_.remove(waiter);
    co_return ok;
}

awaitable<bool> Machine::wait_for_exit(std::chrono::milliseconds timeout)
{
    std::function<bool()> exited = [this] { return exit_status_.has_value(); };
    const bool ok = co_await wait_until(std::move(exited), timeout);
    co_return ok;
}

bool Machine::is_running() const noexcept
{
    return pid_ > 0 && !exit_status_;
}

std::optional<pid_t> Machine::pid() const noexcept
{
    return is_running() ? std::optional<pid_t>(pid_) : std::nullopt;
}

std::optional<int> Machine::exitcode() const noexcept
{
    if (!exit_status_) {
        return std::nullopt;
    }
    switch (exit_status_->kind) {
    case proc::ExitStatus::Kind::exited: return exit_status_->code;
    case proc::ExitStatus::Kind::signaled: return -exit_status_->signal;
    case proc::ExitStatus::Kind::unknown: break;
    }
    return std::nullopt;
}

//---- launch -----------------------------------------------------------------------------------

awaitable<expected<void>> Machine::launch()
{
    if (launched_ || launching_) {
        co_return fail(errc::invalid_state, "VM already launched");
    }
    iolog_.clear();
    full_args_.clear();
    last_shutdown_step_ = ShutdownStep::none;
    qmp_lost_reason_.clear();
    launching_ = true;
    auto result = co_await do_launch();
    if (!result) {
        // The seed's launch(): clean up, then expose the command line and the output.
        if (pid_ > 0 && !exit_status_) {
            user_killed_ = true;
            watcher_.send_signal(pid_, SIGKILL);
            co_await wait_for_exit(hard_kill_wait);
        }
        post_shutdown();
        launching_ = false;
        set_state(MachineState::failed);
        Error e = launch_error(std::move(result).error());
        spdlog::debug("machine[{}]: launch failed: {}", config_.name, e.message);
        co_return fail(std::move(e));
    }
    launching_ = false;
    launched_ = true;
    co_return result;
}

void Machine::begin_run()
{
    // What one process (launched or attached) learns about itself starts from nothing.
    quit_issued_ = false;
    console_later_ = false;
    user_killed_ = false;
    sigkill_sent_ = false;
    guest_shutdown_ = false;
    shutdown_reason_.clear();
    exit_status_.reset();
    qemu_status_.clear();
    if (console_set_) {
        // A fresh connection, ring and offset per run; the last one's ring stays readable
        // until now.
        ConsoleOptions console_options;
        console_options.name = config_.name;
        console_options.ring_size = config_.console_ring_size;
        console_options.log_path = config_.console_log;
        console_options.log_max = config_.console_log_max;
        console_ = Console::create(ioc_.get_executor(), std::move(console_options));
    }
}

Error Machine::launch_error(Error e) const
{
    if (!full_args_.empty()) {
        e.message += "\nCommand line: " + proc::format_command_line(full_args_);
    }
    std::string_view out(iolog_);
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) {
        out.remove_suffix(1);
    }
    if (!out.empty()) {
        e.message += "\nOutput: " + std::string(out);
    }
    return e;
}

awaitable<expected<void>> Machine::do_launch()
{
    auto ex = ioc_.get_executor();
    // _pre_launch: the monitor socket first (QEMU connects to it), then the log file.
    // With pass_sockets: the descriptors QEMU gets (monitor, console, console log), closed here
    // once QEMU has its copies; the socket files stay until cleanup.
    std::vector<int> handed;
    auto close_handed = [&handed] {
        for (int fd : handed) {
            ::close(fd);
        }
        handed.clear();
    };
    std::optional<qmp::Socket> launch_monitor; // with pass_sockets: our end of the pair
    if (qmp_set_ && config_.pass_sockets) {
        int pair[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
            co_return fail(errc::system_error,
                           fmt::format("cannot make the monitor's socket pair: {}",
                                       std::strerror(errno)));
        }
        error_code ec;
        launch_monitor.emplace(ex);
        launch_monitor->assign(asio::generic::stream_protocol(AF_UNIX, 0), pair[0], ec);
        if (ec) {
            ::close(pair[0]);
            ::close(pair[1]);
            co_return fail(errc::system_error,
                           fmt::format("cannot use the monitor's socket pair: {}", ec.message()));
        }
        handed.push_back(pair[1]);
    }
    if (qmp_set_) {
        auto address = monitor_address();
        if (config_.pass_sockets && address->kind != qmp::Address::Kind::unix_path) {
            co_return fail(errc::invalid_argument,
                           "a monitor served by QEMU needs a unix socket address");
        }
        auto listener = qmp::Listener::open(ex, *address);
        if (!listener) {
            co_return fail(listener.error());
        }
        if (config_.pass_sockets) {
            handed.push_back(listener->release());
            remove_files_.push_back(address->path);
        } else {
            listener_ = std::move(*listener);
        }
    }
    if (console_set_) {
        const auto path = console_socket_path();
        if (path.size() >= 108) {
            close_handed();
            co_return fail(errc::invalid_argument,
                           fmt::format("console socket path '{}' is longer than a unix socket "
                                       "path may be (107 bytes)", path));
        }
        if (config_.pass_sockets) {
            auto listener = qmp::Listener::open(ex, qmp::Address::unix_socket(path));
            if (!listener) {
                close_handed();
                co_return fail(listener.error());
            }
            handed.push_back(listener->release());
            if (!config_.console_log.empty()) {
                const int log = ::open(config_.console_log.c_str(),
                                       O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600);
                if (log < 0) {
                    const int err = errno;
                    close_handed();
                    ::unlink(path.c_str());
                    co_return fail(errc::system_error,
                                   fmt::format("cannot open the console log '{}': {}",
                                               config_.console_log, std::strerror(err)));
                }
                handed.push_back(log);
            }
        }
        remove_files_.push_back(path);
    }
    auto dir = log_dir();
    if (!dir) {
        co_return fail(dir.error());
    }
    log_path_ = fmt::format("{}/{}.log", *dir, file_prefix());
    const int log_fd = ::open(log_path_.c_str(),
                              // O_APPEND either way: whoever bounds the log may truncate it
                              // under QEMU's feet.
                              O_WRONLY | O_CREAT | O_CLOEXEC | O_APPEND | O_NOFOLLOW |
                                  (config_.log_append ? 0 : O_TRUNC),
                              0600);
    if (log_fd < 0) {
        close_handed();
        co_return fail(errc::system_error, fmt::format("cannot open the log '{}': {}", log_path_,
                                                       std::strerror(errno)));
    }

    full_args_ = full_args();
    spdlog::debug("machine[{}]: launch command: {}", config_.name,
                  proc::format_command_line(full_args_));
    begin_run();
    proc::SpawnOptions spawn_options;
    spawn_options.log_fd = log_fd;
    spawn_options.inherit_fds = pass_fds_;
    spawn_options.inherit_fds.insert(spawn_options.inherit_fds.end(), handed.begin(),
                                     handed.end());
    spawn_options.uid = config_.run_as_uid;
    spawn_options.gid = config_.run_as_gid;
    spawn_options.groups = config_.run_as_groups;
    auto pid = proc::spawn(full_args_, spawn_options);
    ::close(log_fd);
    close_handed(); // QEMU has its own copies; ours would keep the sockets alive after QEMU
    if (!pid) {
        co_return fail(pid.error());
    }
    pid_ = *pid;
    set_state(MachineState::starting);
    watcher_.watch(pid_, [this, life = std::weak_ptr<int>(life_)](pid_t, proc::ExitStatus s) {
        if (!life.expired()) {
            handle_exit(s);
        }
    });
    if (on_spawn_) {
        on_spawn_(pid_);
    }

    if (!qmp_set_) {
        set_state(MachineState::running); // nothing tells us otherwise without a monitor
        co_return expected<void>{};
    }

    if (launch_monitor) {
        // If QEMU exits first, its end of the pair closes and the greeting wait ends at once,
        // usually before we hear of the exit: wait for it a moment, to say how QEMU ended.
        auto negotiated = co_await negotiate(std::move(*launch_monitor), config_.qmp_timer);
        if (!negotiated && !exit_status_ && !negotiated.error().is(errc::timeout)) {
            co_await wait_for_exit(std::chrono::milliseconds(1000));
            if (exit_status_) {
                co_return fail(errc::spawn_failed,
                               "QEMU " + exit_status_->to_string() + " before its QMP greeting");
            }
        }
        co_return negotiated;
    }
    // _post_launch: accept QEMU's connection. If QEMU exits first, handle_exit closes the
    // listener and the accept ends at once.
    auto socket = co_await listener_->accept(config_.qmp_timer);
    listener_.reset(); // QEMU is connected (or gone): the socket file is not needed any more
    if (!socket) {
        if (exit_status_) {
            co_return fail(errc::spawn_failed,
                           "QEMU " + exit_status_->to_string() + " before connecting to QMP");
        }
        co_return fail(socket.error());
    }
    auto negotiated = co_await negotiate(std::move(*socket), config_.qmp_timer);
    if (!negotiated) {
        co_return fail(negotiated.error());
    }
    co_return expected<void>{};
}

awaitable<expected<void>> Machine::negotiate(qmp::Socket socket,
                                             std::chrono::milliseconds greeting_timeout)
{
    auto ex = ioc_.get_executor();
    qmp::ClientOptions client_options;
    client_options.name = config_.name;
    client_options.greeting_timeout = greeting_timeout;
    client_options.event_queue_limit = config_.event_queue_limit;
    client_options.max_message_size = config_.qmp_max_message;
    client_ = qmp::Client::create(ex, std::move(client_options));
    client_->subscribe([this, life = std::weak_ptr<int>(life_)](const qmp::Event& e) {
        if (!life.expired()) {
            handle_event(e);
            if (on_event_) {
                on_event_(e);
            }
        }
    });
    auto greeting = co_await client_->start(std::move(socket));
    if (!greeting) {
        if (exit_status_) {
            co_return fail(errc::spawn_failed,
                           "QEMU " + exit_status_->to_string() + " during QMP negotiation");
        }
        co_return fail(greeting.error());
    }
    if (!console_later_) {
        if (auto console = co_await connect_console(); !console) {
            co_return fail(console.error());
        }
    }
    client_->on_disconnect([this, life = std::weak_ptr<int>(life_)](const Error& e) {
        if (life.expired() || exit_status_ || quit_issued_ || shutting_down_ ||
            state_ == MachineState::stopping) {
            return;
        }
        spdlog::debug("machine[{}]: QMP lost: {}", config_.name, e.message);
        auto grace = std::make_shared<asio::steady_timer>(ioc_, std::chrono::seconds(1));
        grace->async_wait([this, life, grace, why = e.message](error_code) {
            if (life.expired() || exit_status_ || quit_issued_ || shutting_down_) {
                return;
            }
            if (has_process(state_)) {
                qmp_lost_reason_ = why;
                set_state(MachineState::unresponsive);
            }
        });
    });
    // Events are the truth about the run state; the initial state is asked once.
    auto status = co_await client_->execute("query-status");
    if (status) {
        if (auto s = json::get_string(*status, "status")) {
            set_qemu_status(*s);
        }
    } else if (exit_status_) {
        co_return fail(errc::spawn_failed,
                       "QEMU " + exit_status_->to_string() + " right after QMP negotiation");
    }
    co_return expected<void>{};
}

awaitable<expected<void>> Machine::connect_console()
{
    if (!console_) {
        co_return expected<void>{};
    }
    // QEMU creates every -chardev before it starts its monitors, so once it has greeted us the
    // console socket exists. Output before this moment is in the log only.
    auto console = console_;
    std::string path = console_socket_path();
    co_return co_await console->connect(std::move(path));
}

//---- attach, detach ---------------------------------------------------------------------------

awaitable<expected<void>> Machine::attach(AttachOptions options)
{
    if (launched_ || launching_) {
        if (options.pidfd >= 0) {
            ::close(options.pidfd);
        }
        co_return fail(errc::invalid_state, "VM already launched");
    }
    if (!qmp_set_ || !config_.pass_sockets) {
        if (options.pidfd >= 0) {
            ::close(options.pidfd);
        }
        co_return fail(errc::invalid_state, "attach needs a monitor served by QEMU");
    }
    iolog_.clear();
    last_shutdown_step_ = ShutdownStep::none;
    qmp_lost_reason_.clear();
    begin_run();
    console_later_ = options.console_later;
    full_args_ = std::move(options.argv);
    pid_ = options.pid;
    launching_ = true;
    auto dir = log_dir();
    if (dir) {
        log_path_ = fmt::format("{}/{}.log", *dir, file_prefix());
    }
    auto on_exit = [this, life = std::weak_ptr<int>(life_)](pid_t, proc::ExitStatus s) {
        if (!life.expired()) {
            handle_exit(s);
        }
    };
    if (options.pidfd >= 0) {
        watcher_.watch_pidfd(pid_, options.pidfd, on_exit);
    } else if (auto watched = watcher_.watch_pidfd(pid_, on_exit); !watched) {
        launching_ = false;
        pid_ = -1;
        co_return fail(watched.error());
    }
    auto address = monitor_address();
    remove_files_.push_back(address->path);
    if (console_set_) {
        remove_files_.push_back(console_socket_path());
    }
    set_state(MachineState::starting);
    expected<void> result;
    auto socket = co_await qmp::connect_socket(*address, config_.qmp_timer);
    if (!socket) {
        result = fail(socket.error());
    } else {
        result = co_await negotiate(std::move(*socket), config_.qmp_timer);
    }
    launching_ = false;
    launched_ = true;
    if (!result) {
        if (exit_status_) {
            // It exited meanwhile: handle_exit saw launching_ and left the state to us.
            set_state(MachineState::crashed);
            co_return fail(errc::spawn_failed, "QEMU exited while attaching: " +
                                                   result.error().message);
        }
        // The process lives on without an answering monitor: shutdown() can still kill it.
        if (client_) {
            client_->close();
        }
        set_state(MachineState::unresponsive);
        co_return fail(result.error());
    }
    if (exit_status_) {
        set_state(MachineState::crashed);
        co_return fail(errc::spawn_failed, "QEMU exited while attaching");
    }
    co_return expected<void>{};
}

void Machine::detach() noexcept
{
    if (!launched_ && !launching_) {
        return;
    }
    // No callback runs for what follows: the process is not ending, we are leaving.
    state_ = MachineState::defined;
    if (pid_ > 0 && !exit_status_) {
        watcher_.forget(pid_);
    }
    pid_ = -1;
    for (auto& w : waiters_) {
        w->timer.cancel();
    }
    if (client_) {
        client_->close();
    }
    if (console_) {
        console_->close("the machine was let go (QEMU keeps running)");
    }
    listener_.reset();
    remove_files_.clear(); // QEMU still serves its sockets
    launched_ = false;
}

//---- shutdown ---------------------------------------------------------------------------------

void Machine::early_cleanup()
{
    // The seed closes its console socket first: QEMU may block writing to a console nobody
    // reads while we wait for it to exit. (Ours is always drained, but a reader that stops
    // reading for any reason must not hold up the shutdown.) Once QEMU is gone, what it wrote
    // last is still in our socket: read it into the ring first.
    if (console_) {
        if (exit_status_) {
            console_->drain();
        }
        console_->close(exit_status_ ? "QEMU exited" : "the machine is stopping");
    }
}

awaitable<expected<void>> Machine::soft_shutdown(std::chrono::milliseconds timeout, bool has_quit)
{
    early_cleanup();
    const auto start = asio::steady_timer::clock_type::now();
    if (client_ && client_->is_connected()) {
        if (!has_quit) {
            quit_issued_ = true;
            qmp::CallOptions call;
            call.timeout = timeout;
            auto r = co_await client_->execute("quit", {}, call);
            // QEMU 7.2 resets the connection right after quit's reply, and we may see the
            // process exit before the reply: a disconnect here is the expected end.
            if (!r && !r.error().is(errc::qmp_disconnected) && !r.error().is(errc::qmp_closed)) {
                co_return fail(r.error());
            }
        }
    } else if (!has_quit && !exit_status_ && pid_ > 0) {
        // No monitor to ask (as upstream): ask politely with SIGTERM (the quit step).
        quit_issued_ = true;
        watcher_.send_signal(pid_, SIGTERM);
    }
    auto left = timeout;
    if (timeout != std::chrono::milliseconds::max()) {
        const auto spent = std::chrono::duration_cast<std::chrono::milliseconds>(
            asio::steady_timer::clock_type::now() - start);
        left = std::max(timeout - spent, std::chrono::milliseconds(0));
    }
    spdlog::debug("machine[{}]: waiting (timeout={} ms) for QEMU (pid {}) to terminate",
                  config_.name, left.count(), pid_);
    const bool exited = co_await wait_for_exit(left);
    if (!exited) {
        co_return fail(errc::timeout,
                       fmt::format("QEMU did not exit within {} ms", timeout.count()));
    }
    co_return expected<void>{};
}

ShutdownStep Machine::exit_step() const
{
    if (guest_shutdown_) {
        return ShutdownStep::guest_poweroff;
    }
    if (quit_issued_ || shutdown_reason_ == "host-qmp-quit") {
        return ShutdownStep::quit;
    }
    return ShutdownStep::exited;
}

awaitable<bool> Machine::powerdown_guest(std::chrono::milliseconds timeout)
{
    // The guest's step: press the power button and give the guest `timeout` to power off. The
    // console stays open and drained meanwhile: what the guest says on its way down is kept.
    if (exit_status_ || !client_ || !client_->is_connected()) {
        co_return false; // gone already, or no monitor to press the button with: the quit step
    }
    const auto start = asio::steady_timer::clock_type::now();
    auto client = client_;
    qmp::CallOptions call;
    call.timeout = timeout;
    json::Document no_arguments;
    auto r = co_await client->execute("system_powerdown", std::move(no_arguments), call);
    if (!r) {
        spdlog::debug("machine[{}]: system_powerdown: {}", config_.name, r.error().message);
        // A reply lost to the exit of a guest that powered off at once is still a power-off.
        if (!r.error().is(errc::qmp_disconnected) && !r.error().is(errc::qmp_closed)) {
            co_return false;
        }
    }
    auto left = timeout;
    if (timeout != std::chrono::milliseconds::max()) {
        const auto spent = std::chrono::duration_cast<std::chrono::milliseconds>(
            asio::steady_timer::clock_type::now() - start);
        left = std::max(timeout - spent, std::chrono::milliseconds(0));
    }
    spdlog::debug("machine[{}]: waiting (timeout={} ms) for the guest to power off",
                  config_.name, left.count());
    // Its SHUTDOWN event (guest: true) is enough: under -no-shutdown QEMU then stays, and quit
    // ends it.
    std::function<bool()> off = [this] { return exit_status_.has_value() || guest_shutdown_; };
    const bool done = co_await wait_until(std::move(off), left);
    co_return done;
}

awaitable<expected<void>> Machine::hard_shutdown()
{
    early_cleanup();
    if (!exit_status_ && pid_ > 0) {
        sigkill_sent_ = true;
        watcher_.send_signal(pid_, SIGKILL);
    }
    const bool exited = co_await wait_for_exit(hard_kill_wait);
    if (!exited) {
        co_return fail(errc::timeout, "QEMU did not exit within 60 s of SIGKILL");
    }
    co_return expected<void>{};
}

awaitable<expected<void>> Machine::shutdown(ShutdownOptions options)
{
    if (launching_) {
        // A shutdown during launch kills the process; launch() then fails and cleans up.
        user_killed_ = true;
        if (pid_ > 0 && !exit_status_) {
            watcher_.send_signal(pid_, SIGKILL);
        }
        last_shutdown_step_ = ShutdownStep::kill;
        std::function<bool()> launch_over = [this] { return !launching_; };
        co_await wait_until(std::move(launch_over), std::chrono::milliseconds::max());
        co_return expected<void>{};
    }
    if (!launched_) {
        co_return expected<void>{}; // not launched, or already shut down: nothing to do
    }
    if (shutting_down_) {
        // A second caller waits for the first one's cleanup.
        std::function<bool()> cleaned_up = [this] { return !launched_; };
        co_await wait_until(std::move(cleaned_up), std::chrono::milliseconds::max());
        co_return expected<void>{};
    }
    shutting_down_ = true;
    if (has_process(state_)) {
        set_state(MachineState::stopping);
    }
    expected<void> result;
    bool guest_step_ended_it = false;
    if (options.hard) {
        user_killed_ = true;
        result = co_await hard_shutdown();
    } else {
        if (options.mode == ShutdownMode::powerdown && !options.has_quit) {
            const bool guest_off = co_await powerdown_guest(options.powerdown_timeout);
            guest_step_ended_it = guest_off && exit_status_.has_value();
        }
        expected<void> soft;
        if (!guest_step_ended_it) {
            // The quit step: at once, after the guest's time ran out, or to end a QEMU whose
            // guest powered off but that stays (-no-shutdown).
            soft = co_await soft_shutdown(options.timeout, options.has_quit);
        }
        if (!soft) {
            spdlog::debug("machine[{}]: graceful shutdown failed ({}), falling back to hard "
                          "shutdown", config_.name, soft.error().message);
            // The hard step's own failure (no exit 60 s after SIGKILL) is only logged: the
            // caller learns that the graceful step failed, as the seed's AbnormalShutdown says.
            auto hard = co_await hard_shutdown();
            if (!hard) {
                spdlog::debug("machine[{}]: {}", config_.name, hard.error().message);
            }
            result = fail(errc::abnormal_shutdown,
                          "Could not perform graceful shutdown: " + soft.error().message);
        }
    }
    if (sigkill_sent_) {
        last_shutdown_step_ = ShutdownStep::kill;
    } else if (guest_step_ended_it) {
        last_shutdown_step_ = ShutdownStep::guest_poweroff;
    } else {
        last_shutdown_step_ = exit_step();
    }
    spdlog::debug("machine[{}]: shut down by step {}", config_.name,
                  to_string(last_shutdown_step_));
    post_shutdown();
    shutting_down_ = false;
    set_state(state_); // wake callers waiting for the cleanup
    co_return result;
}

void Machine::kill_now() noexcept
{
    if (pid_ > 0 && !exit_status_) {
        user_killed_ = true;
        sigkill_sent_ = true;
        watcher_.send_signal(pid_, SIGKILL);
    }
}

awaitable<expected<void>> Machine::kill()
{
    ShutdownOptions options;
    options.hard = true;
    co_return co_await shutdown(options);
}

awaitable<expected<void>> Machine::wait(std::chrono::milliseconds timeout)
{
    ShutdownOptions options;
    options.has_quit = true;
    options.timeout = timeout;
    co_return co_await shutdown(options);
}

void Machine::post_shutdown()
{
    early_cleanup();
    if (client_) {
        client_->close(); // its queued events stay readable until the next launch
    }
    listener_.reset();
    load_io_log();
    if (!temp_dir_.empty()) {
        std::error_code ec;
        fs::remove_all(temp_dir_, ec);
        temp_dir_.clear();
        if (config_.log_dir.empty()) {
            log_path_.clear(); // it was inside the temporary directory
        }
    }
    for (const auto& f : remove_files_) {
        ::unlink(f.c_str());
    }
    remove_files_.clear();
    if (exit_status_ && exit_status_->kind == proc::ExitStatus::Kind::signaled &&
        !(user_killed_ && exit_status_->signal == SIGKILL)) {
        // The seed warns here; this is the one message the library logs above debug.
        spdlog::warn("qemu received signal {}; command: \"{}\"", exit_status_->signal,
                     proc::format_command_line(full_args_));
    }
    user_killed_ = false;
    launched_ = false;
    quit_issued_ = false;
}

//---- pause / resume ---------------------------------------------------------------------------

awaitable<expected<void>> Machine::pause(std::chrono::milliseconds timeout)
{
    auto r = co_await cmd("stop");
    if (!r) {
        co_return fail(r.error());
    }
    // The STOP event, not the reply, says the guest is stopped (it may come before the reply).
    std::function<bool()> stopped = [this] { return state_ != MachineState::running; };
    const bool seen = co_await wait_until(std::move(stopped), timeout);
    if (!seen) {
        co_return fail(errc::timeout, fmt::format("no STOP event within {} ms", timeout.count()));
    }
    if (state_ != MachineState::paused) {
        co_return fail(errc::invalid_state,
                       fmt::format("machine is {} after stop", to_string(state_)));
    }
    co_return expected<void>{};
}

awaitable<expected<void>> Machine::resume(std::chrono::milliseconds timeout)
{
    auto r = co_await cmd("cont");
    if (!r) {
        co_return fail(r.error());
    }
    std::function<bool()> resumed = [this] { return state_ != MachineState::paused; };
    const bool seen = co_await wait_until(std::move(resumed), timeout);
    if (!seen) {
        co_return fail(errc::timeout, fmt::format("no RESUME event within {} ms", timeout.count()));
    }
    if (state_ != MachineState::running) {
        co_return fail(errc::invalid_state,
                       fmt::format("machine is {} after cont", to_string(state_)));
    }
    co_return expected<void>{};
}

//---- QMP --------------------------------------------------------------------------------------

awaitable<expected<json::Document>> Machine::cmd(std::string command, json::Document arguments,
                                                 bool conv_keys)
{
    if (!client_ || !client_->is_connected()) {
        co_return fail(errc::invalid_state,
                       command + ": attempt to access QMP with no connection");
    }
    auto client = client_; // keeps the client alive across a relaunch
    // GCC 12 destroys temporaries of a conditional inside a co_await expression twice: the
    // arguments are prepared in a statement of their own.
    if (conv_keys) {
        arguments = convert_keys(std::move(arguments));
    }
    co_return co_await client->execute(std::move(command), std::move(arguments));
}

awaitable<expected<json::Document>> Machine::command(std::string command, json::Document arguments,
                                                     bool conv_keys)
{
    co_return co_await cmd(std::move(command), std::move(arguments), conv_keys);
}

awaitable<expected<json::Document>> Machine::qmp(std::string command, json::Document arguments,
                                                 bool conv_keys)
{
    auto r = co_await cmd(command, std::move(arguments), conv_keys);
    json::Document response(rapidjson::kObjectType);
    auto& alloc = response.GetAllocator();
    if (r) {
        json::Value ret;
        ret.CopyFrom(*r, alloc);
        response.AddMember("return", ret, alloc);
        co_return response;
    }
    if (!r.error().is(errc::qmp_command_failed)) {
        co_return fail(r.error());
    }
    json::Value err(rapidjson::kObjectType);
    err.AddMember("class", json::Value(r.error().qmp_class.c_str(), alloc), alloc);
    err.AddMember("desc", json::Value(r.error().qmp_desc.c_str(), alloc), alloc);
    response.AddMember("error", err, alloc);
    co_return response;
}

awaitable<expected<void>> Machine::send_fd(int fd, std::string name)
{
    if (!client_ || !client_->is_connected()) {
        co_return fail(errc::invalid_state, "getfd: attempt to access QMP with no connection");
    }
    auto client = client_;
    json::Document args(rapidjson::kObjectType);
    args.AddMember("fdname", json::Value(name.c_str(), args.GetAllocator()), args.GetAllocator());
    qmp::CallOptions call;
    call.fd = fd;
    auto r = co_await client->execute("getfd", std::move(args), call);
    if (!r) {
        co_return fail(r.error());
    }
    co_return expected<void>{};
}

//---- console ----------------------------------------------------------------------------------

awaitable<expected<void>> Machine::ensure_console()
{
    if (!console_set_) {
        co_return fail(errc::invalid_state, "the machine has no console (set_console())");
    }
    if (!console_) {
        co_return fail(errc::invalid_state, "console: the machine was not launched");
    }
    if (console_->is_connected() || console_->is_closed() || !is_running()) {
        co_return expected<void>{}; // the operation itself says what is wrong, if anything
    }
    // Without a QMP monitor launch() could not know when the socket exists, and attach() may have
    // left it for later: connect now.
    auto console = console_;
    std::string path = console_socket_path();
    co_return co_await console->connect(std::move(path));
}

awaitable<expected<void>> Machine::console_write(std::string bytes)
{
    auto ready = co_await ensure_console();
    if (!ready) {
        co_return fail(ready.error());
    }
    auto console = console_;
    co_return co_await console->write(std::move(bytes));
}

std::string Machine::console_output(std::uint64_t from) const
{
    return console_ ? console_->output(from) : std::string();
}

std::uint64_t Machine::console_offset() const noexcept
{
    return console_ ? console_->offset() : 0;
}

awaitable<expected<ConsoleMatch>> Machine::wait_console(ConsolePattern pattern,
                                                        std::chrono::milliseconds timeout,
                                                        std::uint64_t from)
{
    auto ready = co_await ensure_console();
    if (!ready) {
        co_return fail(ready.error());
    }
    auto console = console_;
    co_return co_await console->wait(std::move(pattern), timeout, from);
}

//---- events -----------------------------------------------------------------------------------

std::optional<qmp::Event> Machine::get_qmp_event()
{
    return client_ ? client_->pull_event() : std::nullopt;
}

awaitable<expected<qmp::Event>> Machine::get_qmp_event(std::chrono::milliseconds wait)
{
    std::vector<qmp::EventFilter> any;
    any.push_back(qmp::EventFilter::named("")); // an empty name matches every event
    co_return co_await events_wait(std::move(any), wait);
}

std::vector<qmp::Event> Machine::get_qmp_events()
{
    return client_ ? client_->take_events() : std::vector<qmp::Event>{};
}

awaitable<expected<std::vector<qmp::Event>>> Machine::get_qmp_events(std::chrono::milliseconds wait)
{
    auto events = get_qmp_events();
    if (!events.empty() || wait.count() <= 0) {
        co_return events;
    }
    auto first = co_await get_qmp_event(wait);
    if (!first) {
        co_return fail(first.error());
    }
    events.push_back(std::move(*first));
    auto rest = get_qmp_events();
    events.insert(events.end(), std::make_move_iterator(rest.begin()),
                  std::make_move_iterator(rest.end()));
    co_return events;
}

awaitable<expected<qmp::Event>> Machine::event_wait(std::string name,
                                                   std::chrono::milliseconds timeout,
                                                   json::Document match)
{
    std::vector<qmp::EventFilter> filters;
    filters.push_back(qmp::EventFilter::named(std::move(name)));
    filters.back().match = std::move(match);
    co_return co_await events_wait(std::move(filters), timeout);
}

awaitable<expected<qmp::Event>> Machine::events_wait(std::vector<qmp::EventFilter> events,
                                                    std::chrono::milliseconds timeout)
{
    if (!client_) {
        co_return fail(errc::invalid_state, "no QMP connection to wait for events on");
    }
    auto client = client_;
    co_return co_await client->wait_event(std::move(events), timeout);
}

} // namespace qm
