// SPDX-License-Identifier: GPL-2.0-or-later
// A scripted fake QMP server over a socketpair, for what real QEMU cannot be made to do.
#include "tests/support/fake_qmp_peer.hpp"

#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <utility>

#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/json.hpp"

namespace qm::test {

//---- expectations -------------------------------------------------------------------------------

Expectation& Expectation::with_arguments(std::string json)
{
    arguments = std::move(json);
    return *this;
}

Expectation& Expectation::returns(std::string json)
{
    reply = Reply::value;
    value = std::move(json);
    return *this;
}

Expectation& Expectation::fails(std::string cls, std::string desc)
{
    reply = Reply::error;
    error_class = std::move(cls);
    error_desc = std::move(desc);
    return *this;
}

Expectation& Expectation::no_reply()
{
    reply = Reply::none;
    return *this;
}

Expectation& Expectation::event_before(const std::string& name, const std::string& data_json)
{
    before.push_back(FakeQmpPeer::event_json(name, data_json));
    return *this;
}

Expectation& Expectation::event_after(const std::string& name, const std::string& data_json)
{
    after.push_back(FakeQmpPeer::event_json(name, data_json));
    return *this;
}

Expectation& Expectation::then_close()
{
    close = true;
    return *this;
}

//---- the peer's state, shared with its coroutines ----------------------------------------------

struct FakeQmpPeer::State
{
    explicit State(asio::io_context& ioc)
        : ex(ioc.get_executor())
        , socket(ioc)
        , wake(ioc)
    {}

    struct Output
    {
        std::string bytes;
        std::size_t chunk = 0; // 0: one write
        bool close = false;
    };

    asio::any_io_executor ex;
    asio::local::stream_protocol::socket socket;
    int client_fd = -1; // the other end, until taken
    asio::steady_timer wake;
    std::deque<Output> outbox;
    std::deque<Expectation> script;
    std::vector<ReceivedCommand> commands;
    std::vector<int> fds;         // every fd received, owned
    std::vector<int> pending_fds; // received, not yet attached to a complete command
    std::string inbuf;
    bool client_closed = false;
    bool closed = false;
    bool reading = true;
    std::size_t written = 0;

    void enqueue(Output out)
    {
        outbox.push_back(std::move(out));
        wake.cancel();
    }
    void send_line(std::string line) { enqueue(Output{std::move(line) + "\r\n", 0, false}); }
    void close_socket()
    {
        closed = true;
        error_code ignored;
        socket.close(ignored);
        wake.cancel();
    }
    // Bytes written and not yet read by the client (0 once it has read everything).
    int unread()
    {
        // Unix stream sockets charge what is sent to the sender until the receiver has read it.
        int n = 0;
        if (closed || ::ioctl(socket.native_handle(), SIOCOUTQ, &n) < 0) {
            return 0;
        }
        return n;
    }

    void on_line(std::string_view line);
    void answer(const ReceivedCommand& cmd, const Expectation& e);
};

namespace {

std::string reply_json(const std::string& id, const std::string& body)
{
    // QEMU's member order: the payload first, then the id (absent when the command had none).
    return id.empty() ? fmt::format("{{{}}}", body) : fmt::format("{{{}, \"id\": {}}}", body, id);
}

std::string return_body(const std::string& value_json)
{
    return fmt::format(R"("return": {})", value_json);
}

std::string error_body(const std::string& cls, const std::string& desc)
{
    return fmt::format(R"("error": {{"class": {}, "desc": {}}})", json::quote(cls),
                       json::quote(desc));
}

bool same_json(const std::string& a, const std::string& b)
{
    if (a.empty() || b.empty()) {
        return a.empty() && b.empty();
    }
    auto pa = json::parse(a);
    auto pb = json::parse(b);
    return pa && pb && *pa == *pb;
}

} // namespace

void FakeQmpPeer::State::on_line(std::string_view line)
{
    if (!line.empty() && line.back() == '\r') {
        line.remove_suffix(1);
    }
    if (line.empty()) {
        return;
    }
    ReceivedCommand cmd;
    cmd.raw = std::string(line);
    cmd.fds = std::move(pending_fds);
    pending_fds.clear();
    auto doc = json::parse(line);
    if (!doc || !doc->IsObject()) {
        ADD_FAILURE() << "fake QMP peer: the client sent something that is not a JSON object: "
                      << cmd.raw;
        commands.push_back(std::move(cmd));
        return;
    }
    if (auto name = json::get_string(*doc, "execute")) {
        cmd.name = std::string(*name);
    } else if (auto oob_name = json::get_string(*doc, "exec-oob")) {
        cmd.name = std::string(*oob_name);
        cmd.oob = true;
    } else {
        ADD_FAILURE() << "fake QMP peer: the client sent a message with neither \"execute\" nor "
                         "\"exec-oob\": "
                      << cmd.raw;
    }
    if (const json::Value* id = json::find(*doc, "id")) {
        cmd.id = json::to_string(*id);
    }
    if (const json::Value* args = json::find(*doc, "arguments")) {
        cmd.arguments = json::to_string(*args);
    }
    commands.push_back(cmd);

    if (script.empty() || script.front().command != cmd.name) {
        ADD_FAILURE() << "fake QMP peer: unexpected command \"" << cmd.name << "\" (expected "
                      << (script.empty() ? std::string("none") : '"' + script.front().command + '"')
                      << "): " << cmd.raw;
        send_line(reply_json(cmd.id, error_body("CommandNotFound", "The command " + cmd.name +
                                                                       " has not been found")));
        return;
    }
    Expectation e = std::move(script.front());
    script.pop_front();
    if (e.arguments && !same_json(*e.arguments, cmd.arguments)) {
        ADD_FAILURE() << "fake QMP peer: \"" << cmd.name << "\" came with arguments "
                      << (cmd.arguments.empty() ? "(none)" : cmd.arguments) << ", expected "
                      << (e.arguments->empty() ? "(none)" : *e.arguments);
    }
    answer(cmd, e);
}

void FakeQmpPeer::State::answer(const ReceivedCommand& cmd, const Expectation& e)
{
    for (const auto& ev : e.before) {
        send_line(ev);
    }
    switch (e.reply) {
    case Expectation::Reply::value:
        send_line(reply_json(cmd.id, return_body(e.value)));
        break;
    case Expectation::Reply::error:
        send_line(reply_json(cmd.id, error_body(e.error_class, e.error_desc)));
        break;
    case Expectation::Reply::none:
        break;
    }
    for (const auto& ev : e.after) {
        send_line(ev);
    }
    if (e.close) {
        enqueue(Output{{}, 0, true});
    }
}

namespace {

// Reads with recvmsg (not async_read_some) so that descriptors sent with SCM_RIGHTS arrive.
awaitable<void> read_loop(std::shared_ptr<FakeQmpPeer::State> s)
{
    for (;;) {
        error_code ec;
        co_await s->socket.async_wait(asio::socket_base::wait_read, use_ec(ec));
        if (ec || s->closed || !s->reading) {
            co_return;
        }
        char buf[4096];
        iovec iov{buf, sizeof(buf)};
        alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 16)] = {};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control;
        msg.msg_controllen = sizeof(control);
        const ssize_t n =
            ::recvmsg(s->socket.native_handle(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
                continue;
            }
            s->client_closed = true; // ECONNRESET and friends
            co_return;
        }
        for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (std::size_t i = 0; i < count; ++i) {
                    int fd = -1;
                    std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                    s->fds.push_back(fd);
                    s->pending_fds.push_back(fd);
                }
            }
        }
        if ((msg.msg_flags & MSG_CTRUNC) != 0) {
            ADD_FAILURE() << "fake QMP peer: control data truncated (too many fds in one message)";
        }
        if (n == 0) {
            s->client_closed = true;
            co_return;
        }
        s->inbuf.append(buf, static_cast<std::size_t>(n));
        std::size_t nl = 0;
        while ((nl = s->inbuf.find('\n')) != std::string::npos) {
            std::string line = s->inbuf.substr(0, nl);
            s->inbuf.erase(0, nl + 1);
            s->on_line(line);
            if (s->closed) {
                co_return;
            }
        }
    }
}

awaitable<void> write_loop(std::shared_ptr<FakeQmpPeer::State> s)
{
    while (!s->closed) {
        if (s->outbox.empty()) {
            error_code ec;
            s->wake.expires_at(asio::steady_timer::time_point::max());
            co_await s->wake.async_wait(use_ec(ec));
            continue;
        }
        FakeQmpPeer::State::Output out = std::move(s->outbox.front());
        s->outbox.pop_front();
        if (out.close) {
            s->close_socket();
            co_return;
        }
        const std::size_t chunk = out.chunk == 0 ? out.bytes.size() : out.chunk;
        for (std::size_t off = 0; off < out.bytes.size() && !s->closed; off += chunk) {
            const std::size_t len = std::min(chunk, out.bytes.size() - off);
            error_code ec;
            co_await asio::async_write(s->socket, asio::buffer(out.bytes.data() + off, len),
                                       use_ec(ec));
            if (ec) {
                break; // the client is gone; what it did not read is lost, as with QEMU
            }
            s->written += len;
            if (out.chunk != 0) {
                // Yield to the loop until the client has read this piece: its next read then
                // starts exactly at the next piece. Not a sleep: the client's read is what ends it.
                while (!s->closed && s->unread() > 0) {
                    co_await asio::post(s->ex, asio::use_awaitable);
                }
            }
        }
    }
}

void log_failure(const std::exception_ptr& e, const char* what)
{
    if (!e) {
        return;
    }
    try {
        std::rethrow_exception(e);
    } catch (const std::exception& ex) {
        ADD_FAILURE() << "fake QMP peer: " << what << " failed: " << ex.what();
    }
}

} // namespace

//---- the peer -----------------------------------------------------------------------------------

FakeQmpPeer::FakeQmpPeer(asio::io_context& ioc)
    : s_(std::make_shared<State>(ioc))
{
    int sv[2] = {-1, -1};
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        throw std::runtime_error(std::string("socketpair: ") + std::strerror(errno));
    }
    s_->socket.assign(asio::local::stream_protocol(), sv[0]);
    s_->client_fd = sv[1];
    asio::co_spawn(ioc, read_loop(s_),
                   [](const std::exception_ptr& e) { log_failure(e, "reader"); });
    asio::co_spawn(ioc, write_loop(s_),
                   [](const std::exception_ptr& e) { log_failure(e, "writer"); });
}

FakeQmpPeer::~FakeQmpPeer()
{
    if (check_unused_ && !s_->script.empty()) {
        ADD_FAILURE() << "fake QMP peer: " << s_->script.size()
                      << " expected command(s) never came, the first: \""
                      << s_->script.front().command << '"';
    }
    s_->close_socket();
    s_->outbox.clear();
    if (s_->client_fd >= 0) {
        ::close(s_->client_fd);
        s_->client_fd = -1;
    }
    for (int fd : s_->fds) {
        ::close(fd);
    }
    s_->fds.clear();
    s_->pending_fds.clear();
}

qmp::Socket FakeQmpPeer::take_client_socket()
{
    if (s_->client_fd < 0) {
        throw std::logic_error("fake QMP peer: the client socket was already taken");
    }
    const int fd = std::exchange(s_->client_fd, -1);
    return {s_->ex, asio::generic::stream_protocol(AF_UNIX, SOCK_STREAM), fd};
}

std::string FakeQmpPeer::qemu_7_2_greeting(const std::vector<std::string>& capabilities)
{
    std::string caps;
    for (const auto& c : capabilities) {
        caps += (caps.empty() ? "" : ", ") + json::quote(c);
    }
    // What qemu-system-x86_64 7.2.22 from Debian 12 sends, member order included.
    return fmt::format(
        R"({{"QMP": {{"version": {{"qemu": {{"micro": 22, "minor": 2, "major": 7}}, )"
        R"("package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}}, "capabilities": [{}]}}}})",
        caps);
}

std::string FakeQmpPeer::qemu_7_2_greeting()
{
    return qemu_7_2_greeting({"oob"});
}

std::string FakeQmpPeer::event_json(const std::string& name, const std::string& data_json)
{
    const auto now = std::chrono::system_clock::now().time_since_epoch();
    const auto us = std::chrono::duration_cast<std::chrono::microseconds>(now).count();
    std::string data = data_json.empty() ? std::string() : ", \"data\": " + data_json;
    return fmt::format(R"({{"timestamp": {{"seconds": {}, "microseconds": {}}}, "event": {}{}}})",
                       us / 1000000, us % 1000000, json::quote(name), data);
}

void FakeQmpPeer::greet(std::string greeting)
{
    Expectation caps;
    caps.command = "qmp_capabilities";
    s_->script.push_front(std::move(caps));
    s_->send_line(std::move(greeting));
}

Expectation& FakeQmpPeer::expect(std::string command)
{
    Expectation e;
    e.command = std::move(command);
    s_->script.push_back(std::move(e));
    return s_->script.back(); // deque: references stay valid as the script grows and shrinks
}

void FakeQmpPeer::send_event(const std::string& name, const std::string& data_json)
{
    s_->send_line(event_json(name, data_json));
}

void FakeQmpPeer::reply(std::size_t index, const std::string& value_json)
{
    s_->send_line(reply_json(s_->commands.at(index).id, return_body(value_json)));
}

void FakeQmpPeer::reply_error(std::size_t index, const std::string& error_class,
                              const std::string& desc)
{
    s_->send_line(reply_json(s_->commands.at(index).id, error_body(error_class, desc)));
}

void FakeQmpPeer::write_raw(std::string bytes)
{
    s_->enqueue(State::Output{std::move(bytes), 0, false});
}

void FakeQmpPeer::write_split(std::string bytes, std::size_t chunk)
{
    s_->enqueue(State::Output{std::move(bytes), chunk == 0 ? 1 : chunk, false});
}

void FakeQmpPeer::close()
{
    s_->enqueue(State::Output{{}, 0, true});
}

void FakeQmpPeer::stop_reading()
{
    s_->reading = false;
}

std::size_t FakeQmpPeer::unread_input()
{
    int n = 0;
    if (s_->closed || ::ioctl(s_->socket.native_handle(), FIONREAD, &n) < 0) {
        return 0;
    }
    return static_cast<std::size_t>(n);
}

const std::vector<ReceivedCommand>& FakeQmpPeer::commands() const
{
    return s_->commands;
}

std::size_t FakeQmpPeer::remaining() const
{
    return s_->script.size();
}

bool FakeQmpPeer::client_closed() const
{
    return s_->client_closed;
}

bool FakeQmpPeer::closed() const
{
    return s_->closed;
}

std::size_t FakeQmpPeer::bytes_written() const
{
    return s_->written;
}

} // namespace qm::test
