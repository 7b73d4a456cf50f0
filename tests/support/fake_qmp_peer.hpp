// SPDX-License-Identifier: GPL-2.0-or-later
// A scripted fake QMP server over a socketpair, for what real QEMU cannot be made to do.
#pragma once

#include <cstddef>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "libmachine/asio.hpp"
#include "libmachine/qmp/address.hpp"

namespace qm::test {

// What the peer does when the next command arrives (libvirt's qemuMonitorTest items). Built with
// the chained setters: peer.expect("cont").event_before("RESUME").returns("{}").
struct Expectation
{
    enum class Reply { value, error, none };

    std::string command;
    // When set, the command's "arguments" must equal this JSON (compared parsed; "" = absent).
    std::optional<std::string> arguments;
    Reply reply = Reply::value;
    std::string value = "{}";
    std::string error_class;
    std::string error_desc;
    std::vector<std::string> before; // complete event messages sent before the reply
    std::vector<std::string> after;  // ... and after it
    bool close = false;              // close the connection once all of the above is written

    Expectation& with_arguments(std::string json);
    Expectation& returns(std::string json);
    Expectation& fails(std::string error_class, std::string error_desc);
    // A hung monitor: the command is taken and never answered (reply() can answer it later).
    Expectation& no_reply();
    Expectation& event_before(const std::string& name, const std::string& data_json = "");
    Expectation& event_after(const std::string& name, const std::string& data_json = "");
    Expectation& then_close();
};

// A command as the peer received it.
struct ReceivedCommand
{
    std::string name;
    bool oob = false;      // sent with "exec-oob" rather than "execute"
    std::string id;        // the "id" as JSON text; "" when there was none
    std::string arguments; // the "arguments" as compact JSON; "" when there were none
    std::string raw;       // the line as received, without its line end
    std::vector<int> fds;  // descriptors that came with it (SCM_RIGHTS); the peer owns them
};

// The server end of a socketpair, driven by coroutines on the test's io_context. The client gets
// the other end from take_client_socket(). Everything written (greeting, replies, events, raw
// bytes, close) goes out in the order it was asked for. Commands are answered from a FIFO of
// expectations; a command that does not match the head of the FIFO fails the test (ADD_FAILURE)
// and is answered with a CommandNotFound error so the client does not hang. The destructor fails
// the test if expectations were left unused (unless allow_unused()), closes the socket and every
// received fd. Must be destroyed before the io_context. Loop thread only.
class FakeQmpPeer
{
public:
    explicit FakeQmpPeer(asio::io_context& ioc);
    FakeQmpPeer(const FakeQmpPeer&) = delete;
    FakeQmpPeer& operator=(const FakeQmpPeer&) = delete;
    ~FakeQmpPeer();

    // The client's end of the pair, as the client wants it. Once only.
    qmp::Socket take_client_socket();

    // The greeting of QEMU 7.2 as Debian 12 ships it, offering `capabilities`.
    static std::string qemu_7_2_greeting(const std::vector<std::string>& capabilities);
    static std::string qemu_7_2_greeting();
    // An event message as QEMU writes it (timestamp first); `data_json` "" leaves "data" out.
    static std::string event_json(const std::string& name, const std::string& data_json = "");

    // Sends `greeting` and puts qmp_capabilities (answered with {}) at the head of the script.
    // A greeting that should make the client give up is better sent with write_raw().
    void greet(std::string greeting = qemu_7_2_greeting());
    // Appends an expectation to the script.
    Expectation& expect(std::string command);
    void allow_unused() { check_unused_ = false; }

    // Output, in call order.
    void send_event(const std::string& name, const std::string& data_json = "");
    // Answers the received command at `index` (of commands()) with its id.
    void reply(std::size_t index, const std::string& value_json);
    void reply_error(std::size_t index, const std::string& error_class, const std::string& desc);
    // Bytes as they are (add "\r\n" yourself).
    void write_raw(std::string bytes);
    // Bytes in writes of `chunk` bytes, each read by the client before the next is written, so the
    // client's reads split the stream exactly there.
    void write_split(std::string bytes, std::size_t chunk = 1);
    // Closes the connection once everything queued before it is written.
    void close();
    // Reads nothing more: what the client sends next stays in the socket, and a close() then makes
    // the client's next read fail with ECONNRESET (as after QEMU's quit).
    void stop_reading();
    // Bytes the client sent that the peer has not read.
    std::size_t unread_input();

    const std::vector<ReceivedCommand>& commands() const;
    // Expectations not yet consumed.
    std::size_t remaining() const;
    // The client closed its end (the peer read EOF or a reset).
    bool client_closed() const;
    // Our end is closed (close() ran, or the destructor).
    bool closed() const;
    // Bytes of all writes the peer completed.
    std::size_t bytes_written() const;

    struct State;

private:
    std::shared_ptr<State> s_;
    bool check_unused_ = true;
};

} // namespace qm::test
