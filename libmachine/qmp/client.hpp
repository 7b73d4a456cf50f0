// SPDX-License-Identifier: GPL-2.0-or-later
// The asynchronous QMP client: the seed's QEMUMonitorProtocol on an Asio loop it does not own.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"
#include "libmachine/json.hpp"
#include "libmachine/qmp/address.hpp"
#include "libmachine/qmp/framer.hpp"
#include "libmachine/qmp/message.hpp"

namespace qm::qmp {

using namespace std::chrono_literals;

struct ClientOptions
{
    // Name used in debug logs ("vm1"); defaults to the peer's address.
    std::string name{};
    // The largest message accepted (query-qmp-schema is ~200 KiB on QEMU 7.2).
    std::size_t max_message_size = std::size_t{16} << 20;
    // Events kept for pull_event()/wait_event(); the oldest is dropped beyond it. 0 keeps none.
    std::size_t event_queue_limit = 1024;
    // From connect/start to the end of capabilities negotiation (the seed's qmp_timer: 30 s).
    std::chrono::milliseconds greeting_timeout = 30s;
    // Default per-command deadline; milliseconds::max() waits forever.
    std::chrono::milliseconds command_timeout = 60s;
    // Enable out-of-band execution when the server offers it (qmp-spec 2.3.1).
    bool oob = false;
};

struct CallOptions
{
    // Overrides ClientOptions::command_timeout for this call.
    std::optional<std::chrono::milliseconds> timeout{};
    // Send as "exec-oob" (needs oob negotiated): QEMU runs it without waiting for earlier commands.
    bool oob = false;
    // A file descriptor sent with SCM_RIGHTS alongside the command (for getfd, add-fd). The client
    // sends a duplicate; the caller keeps and closes its own. Unix sockets only.
    int fd = -1;
};

// One QMP connection. Created with create() and held by shared_ptr: its reader and writer
// coroutines keep it alive until the connection ends, so close() it when done.
//
// Loop thread only. Every operation completes on the executor given to create(). Errors:
// errc::timeout (greeting, command deadline), errc::qmp_command_failed (an error reply, with
// QEMU's class and desc), errc::qmp_protocol and errc::qmp_message_too_large (the peer broke the
// protocol; the connection is closed), errc::qmp_disconnected / errc::qmp_closed (the connection
// ended; every pending command fails with the reason), errc::invalid_state (not connected),
// errc::invalid_argument (oob not negotiated, fd on a TCP socket, bad arguments),
// errc::connect_failed.
class Client : public std::enable_shared_from_this<Client>
{
public:
    enum class State { idle, negotiating, running, closed };
    using EventHandler = std::function<void(const Event&)>;
    using DisconnectHandler = std::function<void(const Error&)>;

    static std::shared_ptr<Client> create(asio::any_io_executor ex, ClientOptions options = {});

    Client(const Client&) = delete;
    Client& operator=(const Client&) = delete;
    ~Client();

    // Connects to a monitor QEMU serves (server=on) and negotiates capabilities.
    awaitable<expected<Greeting>> connect(Address address);
    // Negotiates over a connected socket: one accepted from a Listener (the seed's way, QEMU
    // connects to us) or one end of a socketpair. Completes once the session is usable.
    awaitable<expected<Greeting>> start(Socket socket);

    // Runs a command and returns its "return" value. `arguments` is an object or null (none).
    awaitable<expected<json::Document>> execute(std::string command,
                                                json::Document arguments = json::Document(),
                                                CallOptions options = {});
    // The same with the arguments as JSON text (errc::invalid_argument if it does not parse).
    awaitable<expected<json::Document>> execute_json(std::string command, std::string arguments,
                                                     CallOptions options = {});

    // Event subscribers are called in arrival order for every event, before the event is queued.
    std::uint64_t subscribe(EventHandler handler);
    void unsubscribe(std::uint64_t id);

    // Pull-style events (the seed's get_qmp_event(s)): the oldest queued event, if any.
    std::optional<Event> pull_event();
    std::vector<Event> take_events();
    void clear_events();
    std::size_t queued_events() const noexcept { return events_.size(); }
    // Events dropped because the queue was full.
    std::uint64_t dropped_events() const noexcept { return dropped_events_; }

    // The seed's events_wait: the first queued event matching any filter (removed from the
    // queue), else the first such event to arrive within `timeout`. A zero timeout only looks at
    // the queue. errc::timeout when none came; the disconnect error when the connection ends.
    awaitable<expected<Event>> wait_event(std::vector<EventFilter> filters,
                                          std::chrono::milliseconds timeout);

    // Called exactly once when the connection ends, whatever ends it (also for close()).
    void on_disconnect(DisconnectHandler handler);
    // Ends the connection (idempotent); pending commands and waits fail with errc::qmp_closed,
    // or with `reason` (e.g. "QEMU exited" from the owner that saw the process end).
    void close();
    void close(Error reason);

    State state() const noexcept { return state_; }
    bool is_connected() const noexcept { return state_ == State::running; }
    const std::optional<Greeting>& greeting() const noexcept { return greeting_; }
    bool oob_enabled() const noexcept { return oob_enabled_; }
    // Why the connection ended; meaningful once state() is closed.
    const Error& close_reason() const noexcept { return close_reason_; }
    std::size_t pending_commands() const noexcept { return pending_.size(); }
    // Replies whose id matched no pending command (late replies after a timeout, foreign ids).
    std::uint64_t dropped_replies() const noexcept { return dropped_replies_; }
    const ClientOptions& options() const noexcept { return options_; }

private:
    struct Pending;
    struct Waiter;
    struct Outgoing
    {
        std::string text;
        int fd = -1; // owned duplicate, closed after sending
    };

    Client(asio::any_io_executor ex, ClientOptions options);

    awaitable<expected<std::string>> read_message();
    awaitable<expected<Greeting>> negotiate();
    awaitable<void> reader();
    awaitable<void> writer();
    awaitable<error_code> send_with_fd(Outgoing& out);
    void handle(std::string_view text);
    void handle_reply(Message& m);
    void handle_event(Event event);
    void enqueue(Outgoing out);
    void disconnect(Error reason);
    void spawn(awaitable<void> (Client::*fn)(), const char* what);
    std::string label() const;
    std::size_t read_size() const;

    asio::any_io_executor ex_;
    ClientOptions options_;
    Socket socket_;
    bool is_unix_ = false;
    State state_ = State::idle;
    Framer framer_;
    std::optional<Greeting> greeting_;
    bool oob_enabled_ = false;
    Error close_reason_;

    std::uint64_t next_id_ = 1;
    std::unordered_map<std::uint64_t, std::shared_ptr<Pending>> pending_;
    std::uint64_t dropped_replies_ = 0;

    // Lists, not deques: libstdc++'s deque allocates 512 bytes while empty, and a supervisor keeps
    // hundreds of idle clients whose queues are empty nearly always.
    std::list<Outgoing> outbox_;
    asio::steady_timer writer_wake_;

    std::vector<std::pair<std::uint64_t, EventHandler>> subscribers_;
    std::uint64_t next_subscriber_ = 1;
    std::list<Event> events_;
    std::uint64_t dropped_events_ = 0;
    std::list<std::shared_ptr<Waiter>> waiters_;

    DisconnectHandler on_disconnect_;
};

const char* to_string(Client::State s) noexcept;

} // namespace qm::qmp
