// SPDX-License-Identifier: GPL-2.0-or-later
// A front end's hold on a machine's live console: its reader and the machine's writer place.
#include "daemon/supervisor/console_session.hpp"

#include <fmt/format.h>

namespace qm::daemon {

ConsoleSession::ConsoleSession(std::string machine, std::shared_ptr<Console> console,
                               std::shared_ptr<ConsoleReader> reader,
                               std::shared_ptr<ConsoleWriterPlace> place)
    : machine_(std::move(machine))
    , console_(std::move(console))
    , reader_(std::move(reader))
    , place_(std::move(place))
{}

ConsoleSession::~ConsoleSession()
{
    release_writer();
    reader_->cancel();
}

expected<void> ConsoleSession::claim_writer()
{
    if (place_->holder != nullptr && place_->holder != this) {
        return fail(errc::invalid_state,
                    fmt::format("another client is writing to the console of '{}'", machine_));
    }
    place_->holder = this;
    return {};
}

void ConsoleSession::release_writer() noexcept
{
    if (place_->holder == this) {
        place_->holder = nullptr;
    }
}

awaitable<expected<void>> ConsoleSession::write(std::string bytes)
{
    if (!is_writer()) {
        co_return fail(errc::invalid_state,
                       fmt::format("this client does not write to the console of '{}'", machine_));
    }
    // The run this session follows: after a restart its output ended, and so do its writes.
    auto console = console_;
    co_return co_await console->write(std::move(bytes));
}

} // namespace qm::daemon
