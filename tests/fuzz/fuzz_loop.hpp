// SPDX-License-Identifier: GPL-2.0-or-later
// What the fuzz targets that drive a real Supervisor share: running its loop until something is
// done.
#pragma once

#include <chrono>

#include "libmachine/asio.hpp"

namespace qm::fuzz {

// Runs `ioc` until `done` holds or the deadline passes; whether `done`. A loop that runs out of
// work meanwhile is restarted (the next handler may come from a thread: the store's worker).
template <class Done>
bool run_until(asio::io_context& ioc, Done done, std::chrono::milliseconds deadline)
{
    using namespace std::chrono_literals;
    const auto end = std::chrono::steady_clock::now() + deadline;
    ioc.restart();
    while (!done()) {
        const auto now = std::chrono::steady_clock::now();
        if (now >= end) {
            return false;
        }
        ioc.run_one_for(std::chrono::duration_cast<std::chrono::milliseconds>(end - now) + 1ms);
        if (ioc.stopped()) {
            ioc.restart();
        }
    }
    return true;
}

} // namespace qm::fuzz
