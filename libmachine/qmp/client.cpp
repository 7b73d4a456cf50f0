// SPDX-License-Identifier: GPL-2.0-or-later
// The asynchronous QMP client: session set-up, the reader/writer pair, command correlation,
// events and disconnect handling (qmp-spec, docs/interop/qmp-spec.rst in QEMU).
#include "libmachine/qmp/client.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "libmachine/deadline.hpp"

namespace qm::qmp {
namespace {

// Bytes asked of each read; a message larger than what is buffered grows the read to its size.
// 512 bytes hold a greeting or a typical reply; an idle connection keeps only this (hundreds of
// machines: bench/machine-bench measured ~3.6 KiB per machine less than 4096).
constexpr std::size_t read_chunk = 512;

asio::steady_timer::time_point deadline_after(std::chrono::milliseconds timeout)
{
    if (timeout == std::chrono::milliseconds::max()) {
        return asio::steady_timer::time_point::max();
    }
    return asio::steady_timer::clock_type::now() + timeout;
}

Error make_error(errc code, std::string message)
{
    return Error{make_error_code(code), std::move(message), {}, {}};
}

std::string describe_read_error(const error_code& ec, bool mid_message)
{
    if (ec == asio::error::eof) {
        return mid_message ? "connection closed by QEMU in the middle of a message"
                           : "connection closed by QEMU";
    }
    return fmt::format("{}{}", ec.message(), mid_message ? " (in the middle of a message)" : "");
}

} // namespace

// A command waiting for its reply. The reader or disconnect() sets `result` and cancels `timer`;
// an expiry with no result is the command's deadline.
struct Client::Pending
{
    explicit Pending(const asio::any_io_executor& ex) : timer(ex) {}
    std::string command;
    asio::steady_timer timer;
    std::optional<expected<json::Document>> result;
};

// A wait_event() call waiting for a matching event.
struct Client::Waiter
{
    explicit Waiter(const asio::any_io_executor& ex) : timer(ex) {}
    std::vector<EventFilter> filters;
    asio::steady_timer timer;
    std::optional<expected<Event>> result;
};

const char* to_string(Client::State s) noexcept
{
    switch (s) {
    case Client::State::idle: return "idle";
    case Client::State::negotiating: return "negotiating";
    case Client::State::running: return "running";
    case Client::State::closed: return "closed";
    }
    return "unknown";
}

std::shared_ptr<Client> Client::create(asio::any_io_executor ex, ClientOptions options)
{
    return std::shared_ptr<Client>(new Client(std::move(ex), std::move(options)));
}

Client::Client(asio::any_io_executor ex, ClientOptions options)
    : ex_(std::move(ex))
    , options_(std::move(options))
    , socket_(ex_)
    , framer_(options_.max_message_size)
    , writer_wake_(ex_)
{}

Client::~Client()
{
    for (auto& out : outbox_) {
        if (out.fd >= 0) {
            ::close(out.fd);
        }
    }
}

std::size_t Client::read_size() const
{
    // Grow reads with the message being received, so a 16 MiB message takes ~12 reads, not 4096.
    return std::max(read_chunk, framer_.buffered());
}

std::string Client::label() const
{
    return options_.name.empty() ? std::string("qmp") : options_.name;
}

//---- session set-up ---------------------------------------------------------------------------

awaitable<expected<Greeting>> Client::connect(Address address)
{
    auto self = shared_from_this();
    if (state_ != State::idle) {
        co_return fail(errc::invalid_state, "QMP session already started");
    }
    if (options_.name.empty()) {
        options_.name = address.to_string();
    }
    auto socket = co_await connect_socket(address, options_.greeting_timeout);
    if (!socket) {
        co_return fail(socket.error());
    }
    co_return co_await start(std::move(*socket));
}

awaitable<expected<Greeting>> Client::start(Socket socket)
{
    auto self = shared_from_this();
    if (state_ != State::idle) {
        co_return fail(errc::invalid_state, "QMP session already started");
    }
    socket_ = std::move(socket);
    is_unix_ = socket_.is_open() && socket_.local_endpoint().protocol().family() == AF_UNIX;
    state_ = State::negotiating;

    // The greeting and negotiation share one deadline; expiry closes the socket, which ends the
    // pending read.
    Deadline deadline(ex_, options_.greeting_timeout, [this] {
        error_code ignored;
        socket_.close(ignored);
    });
    auto greeting = co_await negotiate();
    deadline.disarm();
    if (state_ == State::closed) { // close() was called meanwhile
        co_return fail(close_reason_);
    }
    if (deadline.expired()) {
        greeting = fail(errc::timeout,
                        fmt::format("no QMP greeting and negotiation within {} ms",
                                    options_.greeting_timeout.count()));
    }
    if (!greeting) {
        disconnect(greeting.error());
        co_return greeting;
    }
    // qemu.qmp's rule: the reader and writer start only once the session is established.
    state_ = State::running;
    spawn(&Client::reader, "reader");
    spawn(&Client::writer, "writer");
    spdlog::debug("qmp[{}]: connected to QEMU {} ({}), oob {}", label(), greeting->version(),
                  greeting->package, oob_enabled_ ? "on" : "off");
    co_return greeting;
}

awaitable<expected<std::string>> Client::read_message()
{
    for (;;) {
        auto next = framer_.next();
        if (!next) {
            co_return fail(next.error());
        }
        if (*next) {
            co_return std::string(**next);
        }
        error_code ec;
        auto n = co_await socket_.async_read_some(framer_.prepare(read_size()), use_ec(ec));
        if (ec) {
            co_return fail(errc::qmp_disconnected,
                           "before the session was established: " +
                               describe_read_error(ec, framer_.has_partial()));
        }
        framer_.commit(n);
    }
}

awaitable<expected<Greeting>> Client::negotiate()
{
    // QEMU 7.2 can send an event before its greeting: with a monitor socket handed to it
    // (fd=N,server=on) and our connection already waiting in its backlog, a RESUME emitted while
    // the machine starts reaches the connection before the monitor's OPENED handler greets.
    // Such events are delivered like any other; a peer that sends nothing but events is still
    // refused, after a bound.
    constexpr int max_events_before_greeting = 64;
    expected<std::string> text = fail(errc::qmp_protocol, "no message");
    expected<Message> msg = fail(errc::qmp_protocol, "no message");
    for (int events = 0;; ++events) {
        text = co_await read_message();
        if (!text) {
            co_return fail(text.error());
        }
        msg = decode(*text);
        if (!msg) {
            co_return fail(msg.error());
        }
        if (msg->kind != Message::Kind::event || events == max_events_before_greeting) {
            break;
        }
        handle_event(Event(std::move(msg->doc)));
    }
    if (msg->kind != Message::Kind::greeting) {
        co_return fail(errc::qmp_protocol, "expected the QMP greeting, got: " + text->substr(0, 200));
    }
    auto greeting = parse_greeting(*msg->doc);
    if (!greeting) {
        co_return fail(greeting.error());
    }

    // qmp-spec 2.3: ask only for capabilities the server offers.
    const bool want_oob = options_.oob && greeting->offers("oob");
    const std::uint64_t id = next_id_++;
    std::string request =
        fmt::format(R"({{"execute":"qmp_capabilities",{}"id":{}}})" "\n",
                    want_oob ? R"("arguments":{"enable":["oob"]},)" : "", id);
    error_code ec;
    co_await asio::async_write(socket_, asio::buffer(request), use_ec(ec));
    if (ec) {
        co_return fail(errc::qmp_disconnected, "cannot send qmp_capabilities: " + ec.message());
    }
    for (;;) {
        auto reply_text = co_await read_message();
        if (!reply_text) {
            co_return fail(reply_text.error());
        }
        auto reply = decode(*reply_text);
        if (!reply) {
            co_return fail(reply.error());
        }
        switch (reply->kind) {
        case Message::Kind::event: handle_event(Event(std::move(reply->doc))); continue;
        case Message::Kind::greeting:
            co_return fail(errc::qmp_protocol, "a second QMP greeting during negotiation");
        case Message::Kind::error_reply:
            co_return fail(errc::qmp_protocol,
                           "capabilities negotiation failed: " +
                               command_error("qmp_capabilities", *reply->doc).message);
        case Message::Kind::reply:
            if (reply->id != id) {
                co_return fail(errc::qmp_protocol,
                               "unexpected reply during negotiation: " + reply_text->substr(0, 200));
            }
            break;
        }
        break;
    }
    oob_enabled_ = want_oob;
    greeting_ = *greeting;
    co_return greeting;
}

void Client::spawn(awaitable<void> (Client::*fn)(), const char* what)
{
    // The lambda is not the coroutine: it returns one, and its capture of `self` lives in the
    // spawned frame for as long as the coroutine runs (Asio's cpp20 examples).
    asio::co_spawn(
        ex_, [self = shared_from_this(), fn] { return ((*self).*fn)(); },
        [self = shared_from_this(), what](const std::exception_ptr& e) {
            if (!e) {
                return;
            }
            const std::string reason = describe_exception(e);
            spdlog::error("qmp[{}]: {} coroutine failed: {}", self->label(), what, reason);
            self->disconnect(make_error(errc::system_error, "internal error: " + reason));
        });
}

//---- the reader --------------------------------------------------------------------------------

awaitable<void> Client::reader()
{
    while (state_ == State::running) {
        // Messages already buffered (also those that came with the negotiation reply) first.
        while (state_ == State::running) {
            auto next = framer_.next();
            if (!next) {
                disconnect(next.error());
                co_return;
            }
            if (!*next) {
                break;
            }
            handle(**next);
        }
        if (state_ != State::running) {
            co_return;
        }
        error_code ec;
        auto n = co_await socket_.async_read_some(framer_.prepare(read_size()), use_ec(ec));
        if (ec) {
            // After quit QEMU 7.2 resets the connection rather than closing it: the Machine knows
            // whether it asked for that; here it is a disconnect like any other.
            disconnect(make_error(errc::qmp_disconnected,
                                  describe_read_error(ec, framer_.has_partial())));
            co_return;
        }
        framer_.commit(n);
    }
}

void Client::handle(std::string_view text)
{
    auto msg = decode(text);
    if (!msg) {
        spdlog::debug("qmp[{}]: bad message: {}", label(), text.substr(0, 1024));
        disconnect(std::move(msg).error());
        return;
    }
    switch (msg->kind) {
    case Message::Kind::event: handle_event(Event(std::move(msg->doc))); break;
    case Message::Kind::reply:
    case Message::Kind::error_reply: handle_reply(*msg); break;
    case Message::Kind::greeting:
        spdlog::debug("qmp[{}]: unexpected greeting ignored", label());
        break;
    }
}

void Client::handle_reply(Message& m)
{
    if (!m.has_id) {
        if (m.kind == Message::Kind::error_reply) {
            // qmp-spec 2.4.2: an error without id means the server could not parse what it
            // received; the stream can no longer be trusted (qemu.qmp's ServerParseError).
            const Error e = command_error("QMP", *m.doc);
            disconnect(make_error(errc::qmp_protocol,
                                  "QEMU could not parse a command: " + e.qmp_desc));
            return;
        }
        ++dropped_replies_;
        spdlog::debug("qmp[{}]: reply without id dropped", label());
        return;
    }
    auto it = m.id ? pending_.find(*m.id) : pending_.end();
    if (it == pending_.end()) {
        // qmp-spec 2.4: a reply we did not ask for (or whose command timed out) is dropped.
        ++dropped_replies_;
        spdlog::debug("qmp[{}]: reply with unknown id dropped: {}", label(),
                      json::to_string(*m.doc).substr(0, 1024));
        return;
    }
    auto p = std::move(it->second);
    pending_.erase(it);
    if (m.kind == Message::Kind::reply) {
        // Make the "return" value the root of the document without copying it: its memory
        // belongs to the document's allocator, which moves with the document.
        json::Document doc(std::move(*m.doc));
        json::Value ret;
        ret.Swap(doc["return"]);
        static_cast<json::Value&>(doc).Swap(ret);
        p->result = std::move(doc);
    } else {
        Error e = command_error(p->command, *m.doc);
        spdlog::debug("qmp[{}]: {} failed: {}", label(), p->command, json::to_string(*m.doc));
        p->result = fail(std::move(e));
    }
    p->timer.cancel();
}

void Client::handle_event(Event event)
{
    spdlog::debug("qmp[{}]: event {}", label(), event.name());
    // Handlers may subscribe or unsubscribe: index-based, and unsubscribe only clears the slot.
    for (std::size_t i = 0; i < subscribers_.size(); ++i) { // NOLINT(modernize-loop-convert)
        if (subscribers_[i].second) {
            auto handler = subscribers_[i].second; // may be reallocated by the call
            handler(event);
        }
    }
    std::erase_if(subscribers_, [](const auto& s) { return !s.second; });

    for (auto it = waiters_.begin(); it != waiters_.end(); ++it) {
        auto& w = *it;
        const bool match = std::any_of(w->filters.begin(), w->filters.end(),
                                       [&](const EventFilter& f) { return f.matches(event); });
        if (match) {
            // The seed's events_wait consumes the event it returns.
            w->result = std::move(event);
            w->timer.cancel();
            waiters_.erase(it);
            return;
        }
    }
    if (options_.event_queue_limit == 0) {
        return;
    }
    if (events_.size() >= options_.event_queue_limit) {
        events_.pop_front();
        ++dropped_events_;
    }
    events_.push_back(std::move(event));
}

//---- the writer --------------------------------------------------------------------------------

void Client::enqueue(Outgoing out)
{
    outbox_.push_back(std::move(out));
    writer_wake_.cancel();
}

awaitable<void> Client::writer()
{
    while (state_ == State::running) {
        if (outbox_.empty()) {
            error_code ec;
            writer_wake_.expires_at(asio::steady_timer::time_point::max());
            co_await writer_wake_.async_wait(use_ec(ec));
            continue;
        }
        error_code ec;
        if (outbox_.front().fd >= 0) {
            Outgoing out = std::move(outbox_.front());
            outbox_.pop_front();
            ec = co_await send_with_fd(out);
            ::close(out.fd);
        } else {
            // Everything queued goes out in one write: pipelined commands cost one syscall.
            std::string batch = std::move(outbox_.front().text);
            outbox_.pop_front();
            while (!outbox_.empty() && outbox_.front().fd < 0) {
                batch += outbox_.front().text;
                outbox_.pop_front();
            }
            co_await asio::async_write(socket_, asio::buffer(batch), use_ec(ec));
        }
        if (ec && state_ == State::running) {
            disconnect(make_error(errc::qmp_disconnected, "cannot write to QEMU: " + ec.message()));
        }
    }
}

awaitable<error_code> Client::send_with_fd(Outgoing& out)
{
    // SCM_RIGHTS rides on the first byte sent; QEMU keeps the fd for the command it reads next
    // (qmp-spec: getfd, add-fd). This replaces the seed's external socket_scm_helper.
    std::size_t offset = 0;
    bool fd_sent = false;
    while (offset < out.text.size()) {
        iovec iov{out.text.data() + offset, out.text.size() - offset};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
        if (!fd_sent) {
            msg.msg_control = control;
            msg.msg_controllen = sizeof(control);
            cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
            cmsg->cmsg_level = SOL_SOCKET;
            cmsg->cmsg_type = SCM_RIGHTS;
            cmsg->cmsg_len = CMSG_LEN(sizeof(int));
            std::memcpy(CMSG_DATA(cmsg), &out.fd, sizeof(int));
        }
        const ssize_t n = ::sendmsg(socket_.native_handle(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n >= 0) {
            offset += static_cast<std::size_t>(n);
            fd_sent = true;
            continue;
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            co_return error_code(errno, boost::system::system_category());
        }
        error_code ec;
        co_await socket_.async_wait(Socket::wait_write, use_ec(ec));
        if (ec) {
            co_return ec;
        }
    }
    co_return error_code{};
}

//---- commands ----------------------------------------------------------------------------------

awaitable<expected<json::Document>> Client::execute(std::string command, json::Document arguments,
                                                    CallOptions options)
{
    auto self = shared_from_this();
    if (state_ != State::running) {
        if (state_ == State::closed) {
            Error e = close_reason_;
            e.message = command + ": " + e.message;
            co_return fail(std::move(e));
        }
        co_return fail(errc::invalid_state, command + ": QMP session not established");
    }
    if (options.oob && !oob_enabled_) {
        co_return fail(errc::invalid_argument,
                       command + ": out-of-band execution was not negotiated");
    }
    if (!arguments.IsNull() && !arguments.IsObject()) {
        co_return fail(errc::invalid_argument, command + ": arguments must be a JSON object");
    }
    Outgoing out;
    if (options.fd >= 0) {
        if (!is_unix_) {
            co_return fail(errc::invalid_argument,
                           command + ": file descriptors can only be passed over a unix socket");
        }
        out.fd = ::fcntl(options.fd, F_DUPFD_CLOEXEC, 0);
        if (out.fd < 0) {
            co_return fail(errc::system_error,
                           fmt::format("{}: cannot duplicate fd {}: {}", command, options.fd,
                                       std::strerror(errno)));
        }
    }
    const std::uint64_t id = next_id_++;
    out.text = fmt::format(R"({{"{}":{},{}{}"id":{}}})" "\n", options.oob ? "exec-oob" : "execute",
                           json::quote(command), arguments.IsNull() ? "" : R"("arguments":)",
                           arguments.IsNull() ? "" : json::to_string(arguments) + ",", id);
    spdlog::debug("qmp[{}]: -> {}", label(), std::string_view(out.text).substr(0, 1024));

    auto pending = std::make_shared<Pending>(ex_);
    pending->command = command;
    pending_.emplace(id, pending);
    enqueue(std::move(out));

    const auto timeout = options.timeout.value_or(options_.command_timeout);
    pending->timer.expires_at(deadline_after(timeout));
    error_code ec;
    co_await pending->timer.async_wait(use_ec(ec));
    if (pending->result) {
        co_return std::move(*pending->result);
    }
    // The deadline passed. A late reply will find no pending entry and be dropped.
    pending_.erase(id);
    co_return fail(errc::timeout,
                   fmt::format("{}: no reply from QEMU within {} ms", command, timeout.count()));
}

awaitable<expected<json::Document>> Client::execute_json(std::string command, std::string arguments,
                                                         CallOptions options)
{
    json::Document args;
    if (!arguments.empty()) {
        auto parsed = json::parse(arguments);
        if (!parsed) {
            co_return fail(errc::invalid_argument,
                           command + ": bad arguments: " + parsed.error().message);
        }
        args = std::move(*parsed);
    }
    co_return co_await execute(std::move(command), std::move(args), options);
}

//---- events ------------------------------------------------------------------------------------

std::uint64_t Client::subscribe(EventHandler handler)
{
    const std::uint64_t id = next_subscriber_++;
    subscribers_.emplace_back(id, std::move(handler));
    return id;
}

void Client::unsubscribe(std::uint64_t id)
{
    for (auto& s : subscribers_) {
        if (s.first == id) {
            s.second = nullptr;
        }
    }
}

std::optional<Event> Client::pull_event()
{
    if (events_.empty()) {
        return std::nullopt;
    }
    Event e = std::move(events_.front());
    events_.pop_front();
    return e;
}

std::vector<Event> Client::take_events()
{
    std::vector<Event> out(std::make_move_iterator(events_.begin()),
                           std::make_move_iterator(events_.end()));
    events_.clear();
    return out;
}

void Client::clear_events()
{
    events_.clear();
}

awaitable<expected<Event>> Client::wait_event(std::vector<EventFilter> filters,
                                              std::chrono::milliseconds timeout)
{
    auto self = shared_from_this();
    auto matches = [&filters](const Event& e) {
        return std::any_of(filters.begin(), filters.end(),
                           [&](const EventFilter& f) { return f.matches(e); });
    };
    // The seed searches the events it already has before waiting for new ones.
    if (auto it = std::find_if(events_.begin(), events_.end(), matches); it != events_.end()) {
        Event e = std::move(*it);
        events_.erase(it);
        co_return e;
    }
    std::string names;
    for (const auto& f : filters) {
        names += (names.empty() ? "" : "|") + f.name;
    }
    if (timeout.count() <= 0) {
        co_return fail(errc::timeout, fmt::format("no {} event queued", names));
    }
    if (state_ == State::closed) {
        co_return fail(close_reason_);
    }
    auto waiter = std::make_shared<Waiter>(ex_);
    waiter->filters = std::move(filters);
    waiters_.push_back(waiter);
    waiter->timer.expires_at(deadline_after(timeout));
    error_code ec;
    co_await waiter->timer.async_wait(use_ec(ec));
    if (waiter->result) {
        co_return std::move(*waiter->result);
    }
    waiters_.remove(waiter);
    co_return fail(errc::timeout,
                   fmt::format("no {} event within {} ms", names, timeout.count()));
}

//---- the end -----------------------------------------------------------------------------------

void Client::on_disconnect(DisconnectHandler handler)
{
    if (state_ == State::closed) {
        // Already over: report it once, but never from inside the caller's frame.
        asio::post(ex_, [handler = std::move(handler), reason = close_reason_] { handler(reason); });
        return;
    }
    on_disconnect_ = std::move(handler);
}

void Client::close()
{
    disconnect(make_error(errc::qmp_closed, "QMP connection closed"));
}

void Client::close(Error reason)
{
    disconnect(std::move(reason));
}

void Client::disconnect(Error reason)
{
    if (state_ == State::closed) {
        return;
    }
    spdlog::debug("qmp[{}]: disconnected: {}", label(), reason.message);
    state_ = State::closed;
    close_reason_ = std::move(reason);
    error_code ignored;
    socket_.close(ignored);
    writer_wake_.cancel();
    for (auto& out : outbox_) {
        if (out.fd >= 0) {
            ::close(out.fd);
        }
    }
    outbox_.clear();

    // qemu.qmp's rule: every waiter learns of the disconnect; none is left hanging.
    auto pending = std::move(pending_);
    pending_.clear();
    for (auto& [id, p] : pending) {
        Error e = close_reason_;
        e.message = p->command + ": " + e.message;
        p->result = fail(std::move(e));
        p->timer.cancel();
    }
    auto waiters = std::move(waiters_);
    waiters_.clear();
    for (auto& w : waiters) {
        w->result = fail(close_reason_);
        w->timer.cancel();
    }
    if (on_disconnect_) {
        auto handler = std::move(on_disconnect_);
        on_disconnect_ = nullptr;
        handler(close_reason_);
    }
}

} // namespace qm::qmp
