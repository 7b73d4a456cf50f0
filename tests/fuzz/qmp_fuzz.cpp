// SPDX-License-Identifier: GPL-2.0-or-later
// libFuzzer target for QMP framing and messages: the bytes are what a QEMU monitor sends.
// The first byte picks how the rest is consumed:
//  - even: the pure layer. The stream is fed to the Framer in chunks of (first byte / 2 + 1)
//    bytes with a small maximum size, and every message is decoded, greeting-parsed, turned into
//    an Event and matched (event_match) against itself and a fixed criterion;
//  - odd: the whole client. The bytes arrive on a socketpair at a qm::qmp::Client that negotiates
//    (its qmp_capabilities has id 1) and has three commands in flight (ids 2, 3, 4; the third
//    with a 1 ms deadline); the loop runs until the client has closed.
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "libmachine/asio.hpp"
#include "libmachine/qmp/client.hpp"
#include "libmachine/qmp/framer.hpp"
#include "libmachine/qmp/message.hpp"

namespace {

using namespace std::chrono_literals;

void exercise_message(std::string_view text)
{
    auto msg = qm::qmp::decode(text);
    if (!msg) {
        return;
    }
    const auto& doc = *msg->doc;
    switch (msg->kind) {
    case qm::qmp::Message::Kind::greeting: (void)qm::qmp::parse_greeting(doc); break;
    case qm::qmp::Message::Kind::error_reply: (void)qm::qmp::command_error("fuzz", doc); break;
    case qm::qmp::Message::Kind::reply: break;
    case qm::qmp::Message::Kind::event: {
        qm::qmp::Event event(msg->doc);
        (void)event.name();
        (void)event.seconds();
        (void)event.microseconds();
        (void)event.to_json();
        (void)qm::qmp::event_match(event.message(), event.data());
        (void)qm::qmp::event_match(doc, doc);
        static const auto filter =
            qm::qmp::EventFilter::with_match("SHUTDOWN", R"({"data": {"guest": null}})");
        (void)filter->matches(event);
        break;
    }
    }
}

void fuzz_framer(const std::uint8_t* data, std::size_t size)
{
    const std::size_t chunk = data[0] / 2 + 1;
    std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
    qm::qmp::Framer framer(1024);
    while (!rest.empty()) {
        const auto piece = rest.substr(0, chunk);
        rest.remove_prefix(piece.size());
        framer.feed(piece);
        for (;;) {
            auto next = framer.next();
            if (!next) {
                return; // too large: the connection would end here
            }
            if (!*next) {
                break;
            }
            exercise_message(**next);
        }
    }
    (void)framer.has_partial();
}

qm::awaitable<void> run_commands(std::shared_ptr<qm::qmp::Client> client, qm::qmp::Socket socket)
{
    auto greeting = co_await client->start(std::move(socket));
    if (!greeting) {
        co_return;
    }
    auto one = [](std::shared_ptr<qm::qmp::Client> c, std::string name,
                  std::chrono::milliseconds timeout) -> qm::awaitable<void> {
        (void)co_await c->execute(std::move(name), {}, {.timeout = timeout});
    };
    auto ex = co_await qm::asio::this_coro::executor;
    qm::asio::co_spawn(ex, one(client, "query-status", 1s), qm::asio::detached);
    qm::asio::co_spawn(ex, one(client, "stop", 1s), qm::asio::detached);
    qm::asio::co_spawn(ex, one(client, "cont", 1ms), qm::asio::detached);
    std::vector<qm::qmp::EventFilter> filters;
    filters.push_back(qm::qmp::EventFilter::named("STOP"));
    (void)co_await client->wait_event(std::move(filters), 1s);
    (void)client->take_events();
}

void fuzz_client(const std::uint8_t* data, std::size_t size)
{
    qm::asio::io_context ioc{1};
    qm::asio::local::stream_protocol::socket ours(ioc);
    qm::asio::local::stream_protocol::socket peer(ioc);
    qm::asio::local::connect_pair(ours, peer);
    // The whole input is written at once (inputs are far below the socket buffer), then the
    // peer hangs up: the client sees exactly these bytes and then EOF.
    (void)::write(peer.native_handle(), data + 1, size - 1);
    peer.close();

    qm::qmp::Socket socket(ioc, qm::asio::generic::stream_protocol(AF_UNIX, SOCK_STREAM),
                           ours.release());
    auto client = qm::qmp::Client::create(ioc.get_executor(),
                                          {.max_message_size = 1024, .greeting_timeout = 1s});
    qm::asio::co_spawn(ioc, run_commands(client, std::move(socket)), qm::asio::detached);
    ioc.run_for(2s);
    client->close();
    ioc.run();
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    if (size < 1) {
        return 0;
    }
    if ((data[0] & 1U) == 0) {
        fuzz_framer(data, size);
    } else {
        fuzz_client(data, size);
    }
    return 0;
}
