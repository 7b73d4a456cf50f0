// SPDX-License-Identifier: GPL-2.0-or-later
// Test helpers for driving the loop: run until a predicate holds (no sleeps), run a coroutine to
// completion and get its result.
#pragma once

#include <chrono>
#include <exception>
#include <functional>
#include <optional>
#include <stdexcept>

#include "libmachine/asio.hpp"

namespace qm::test {

using namespace std::chrono_literals;

// Runs `ioc` until `done()` holds or `deadline` passes; returns done(). Restarts a stopped ioc.
inline bool run_until(asio::io_context& ioc, const std::function<bool()>& done,
                      std::chrono::milliseconds deadline = 10s)
{
    const auto end = std::chrono::steady_clock::now() + deadline;
    ioc.restart();
    while (!done()) {
        if (std::chrono::steady_clock::now() >= end) {
            return false;
        }
        // Wake at least every 10 ms to re-check the deadline when no handler is ready.
        ioc.run_one_for(10ms);
        if (ioc.stopped()) {
            ioc.restart();
        }
    }
    return true;
}

namespace detail {
// Asio 1.74's co_spawn hands a default-constructed T to its handler when the coroutine throws, so
// results are passed out through an optional instead (expected<Event> has no default).
template <typename T>
awaitable<void> store_result(awaitable<T> aw, std::optional<T>* out)
{
    out->emplace(co_await std::move(aw));
}
} // namespace detail

// Runs the coroutine `aw` on `ioc` until it completes (or `deadline` passes: throws) and returns
// its result. Exceptions from the coroutine are rethrown.
template <typename T>
T run_co(asio::io_context& ioc, awaitable<T> aw, std::chrono::milliseconds deadline = 10s)
{
    std::optional<T> result;
    std::exception_ptr error;
    bool finished = false;
    asio::co_spawn(ioc, detail::store_result(std::move(aw), &result),
                   [&](const std::exception_ptr& e) {
                       finished = true;
                       error = e;
                   });
    if (!run_until(ioc, [&] { return finished; }, deadline)) {
        throw std::runtime_error("coroutine did not finish before the deadline");
    }
    if (error) {
        std::rethrow_exception(error);
    }
    return std::move(*result);
}

inline void run_co(asio::io_context& ioc, awaitable<void> aw, std::chrono::milliseconds deadline = 10s)
{
    std::exception_ptr error;
    bool finished = false;
    asio::co_spawn(ioc, std::move(aw), [&](const std::exception_ptr& e) {
        finished = true;
        error = e;
    });
    if (!run_until(ioc, [&] { return finished; }, deadline)) {
        throw std::runtime_error("coroutine did not finish before the deadline");
    }
    if (error) {
        std::rethrow_exception(error);
    }
}

} // namespace qm::test
