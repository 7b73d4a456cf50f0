// SPDX-License-Identifier: GPL-2.0-or-later
// The only place that includes Boost.Asio: every other file includes this header.
#pragma once

// Trap 1: Boost 1.74's asio/awaitable.hpp uses std::exchange without including <utility>.
#include <utility>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/connect_pair.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/system/error_code.hpp>

namespace qm {
namespace asio = boost::asio;
using boost::system::error_code;

template <typename T>
using awaitable = asio::awaitable<T>;

// A completion token for `co_await op(..., use_ec(ec))`: failure is an ordinary outcome, not an
// exception (STYLE.md, async style).
inline auto use_ec(error_code& ec)
{
    return asio::redirect_error(asio::use_awaitable, ec);
}
} // namespace qm
