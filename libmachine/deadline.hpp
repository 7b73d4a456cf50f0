// SPDX-License-Identifier: GPL-2.0-or-later
// Deadline: a timer that runs an action if it fires while an operation is still pending.
#pragma once

#include <chrono>
#include <functional>
#include <memory>

#include "libmachine/asio.hpp"

namespace qm {

// Boost 1.74 has no per-operation cancellation: an operation with a deadline is ended by closing
// or cancelling its I/O object from a timer. A Deadline lives in the frame that awaits the
// operation; destroying it (the operation finished) disarms the action even if the timer's
// completion is already queued, so the action never touches a frame that is gone.
// A timeout of milliseconds::max() never fires. Loop thread only.
class Deadline
{
public:
    Deadline(const asio::any_io_executor& ex, std::chrono::milliseconds timeout,
             std::function<void()> on_expiry)
        : state_(std::make_shared<State>())
        , timer_(ex)
    {
        if (timeout == std::chrono::milliseconds::max()) {
            return;
        }
        state_->on_expiry = std::move(on_expiry);
        timer_.expires_after(timeout);
        timer_.async_wait([state = state_](error_code ec) {
            if (!ec && state->on_expiry) {
                state->expired = true;
                auto action = std::move(state->on_expiry);
                state->on_expiry = nullptr;
                action();
            }
        });
    }
    Deadline(const Deadline&) = delete;
    Deadline& operator=(const Deadline&) = delete;
    ~Deadline() { disarm(); }

    // The operation finished: the action will not run.
    void disarm()
    {
        state_->on_expiry = nullptr;
        timer_.cancel();
    }
    bool expired() const noexcept { return state_->expired; }

private:
    struct State
    {
        std::function<void()> on_expiry;
        bool expired = false;
    };
    std::shared_ptr<State> state_;
    asio::steady_timer timer_;
};

} // namespace qm
