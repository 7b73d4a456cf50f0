// SPDX-License-Identifier: GPL-2.0-or-later
// A front end's hold on a machine's live serial console (Supervisor::console_attach()): a follower
// of its output and, for one session per machine at a time, the right to write to it.
#pragma once

#include <memory>
#include <string>

#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"
#include "libmachine/machine/console.hpp"

namespace qm::daemon {

class ConsoleSession;

// Which session writes to a machine's console. One per machine, shared by the machine's entry and
// its sessions: a session that outlives its machine's removal still finds it.
struct ConsoleWriterPlace
{
    const ConsoleSession* holder = nullptr;
};

// One client's view of one run of a machine's console: it reads through its own ConsoleReader
// (the ring's newest bytes first, then everything live) and, once claim_writer() succeeded, writes
// to that run's console (never to a later run's). Owned by the front end (shared_ptr, held for as
// long as the client is attached); loop thread only. Destroying it cancels its reader and gives
// the writer place back. Errors: errc::invalid_state (another session writes; this one is not the
// writer; the console ended).
class ConsoleSession
{
public:
    ConsoleSession(std::string machine, std::shared_ptr<Console> console,
                   std::shared_ptr<ConsoleReader> reader, std::shared_ptr<ConsoleWriterPlace> place);
    ~ConsoleSession();
    ConsoleSession(const ConsoleSession&) = delete;
    ConsoleSession& operator=(const ConsoleSession&) = delete;

    const std::string& machine() const noexcept { return machine_; }
    // The output, as ConsoleReader::next() gives it.
    ConsoleReader& reader() noexcept { return *reader_; }
    // Why the console ended ("the machine is stopping", "QEMU exited"); empty while it runs.
    const std::string& why_ended() const noexcept { return console_->why_closed(); }

    // Makes this session the machine's one writer (again: a no-op). Fails while another session
    // holds the place, naming the machine.
    expected<void> claim_writer();
    bool is_writer() const noexcept { return place_->holder == this; }
    // Gives the place back (the destructor does too).
    void release_writer() noexcept;
    // Writes `bytes` to the guest, as Console::write() (complete once the socket took them).
    awaitable<expected<void>> write(std::string bytes);

private:
    std::string machine_;
    std::shared_ptr<Console> console_;
    std::shared_ptr<ConsoleReader> reader_;
    std::shared_ptr<ConsoleWriterPlace> place_;
};

} // namespace qm::daemon
