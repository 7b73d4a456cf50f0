// SPDX-License-Identifier: GPL-2.0-or-later
// The live serial console as a WebSocket (RFC 6455) over a connection the session handed over:
// the handshake, console output out as binary messages, a writer's messages in, the close codes.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "daemon/rest/stream.hpp"
#include "libmachine/asio.hpp"

namespace qm::daemon {
class ConsoleSession;
}

namespace qm::rest {

using namespace std::chrono_literals;

struct ConsoleStreamOptions
{
    // The newest bytes of the ring a client gets first, and the most the daemon buffers for a
    // client that falls behind: past it the oldest are dropped for that client, with a notice.
    std::size_t history = std::size_t{256} * 1024;
    // Output goes out in binary messages of at most this many bytes.
    std::size_t message_bytes = std::size_t{16} * 1024;
    // The largest message a writer may send (larger: Beast closes with 1009).
    std::size_t max_input = std::size_t{64} * 1024;
    // The longest one message may take to reach the client: one that stops reading is dropped
    // (without a close frame: nothing more can be written to it).
    std::chrono::milliseconds write_timeout = 30s;
    // A client that sends nothing is pinged after half this time and dropped after all of it.
    std::chrono::milliseconds idle_timeout = 60s;
    // The longest the closing handshake may take.
    std::chrono::milliseconds close_timeout = 5s;
};

// How qmachined closes a console WebSocket (RFC 6455 7.4.1; 4000-4999 are the application's,
// 7.4.2: 4409 echoes HTTP's 409 Conflict).
enum class ConsoleClose : std::uint16_t {
    ended = 1000,         // the console ended (the machine stops, QEMU exited): the reason says
    shutting_down = 1001, // qmachined goes down
    read_only = 1008,     // a reader sent data
    too_big = 1009,       // a writer's message over max_input (Beast sends it)
    writer_busy = 4409,   // another client writes to this console
};

// `reason` cut to what a close frame carries (123 bytes: a control frame's 125 less the code,
// RFC 6455 5.5), never inside a UTF-8 sequence.
std::string close_reason_text(std::string_view reason);

// Answers the handshake in `c.request`, then serves `session` until the console ends, the client
// goes or closes, or the server closes (c.stop: 1001). A handshake Beast refuses is answered with a
// problem body (400 InvalidArgument; 426 UpgradeRequired for another version than 13). Output
// goes out as binary messages; a client that fell behind gets the text notice
// {"lost": N, "offset": M} before the bytes from M on. A writer's messages go to the console in
// order, one at a time (the next is read once the console took the last).
awaitable<void> serve_console(StreamConnection& c, std::shared_ptr<daemon::ConsoleSession> session,
                              ConsoleStreamOptions options);

// Answers the handshake, then closes at once with `code` and `reason`: a refusal that a browser's
// WebSocket reports (it shows no HTTP status of a refused handshake).
awaitable<void> refuse_console(StreamConnection& c, ConsoleClose code, std::string reason,
                               ConsoleStreamOptions options);

} // namespace qm::rest
