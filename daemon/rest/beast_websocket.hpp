// SPDX-License-Identifier: GPL-2.0-or-later
// Boost.Beast's WebSocket, apart from beast.hpp: its templates are heavy, and only the console
// stream (and its tests) need them. Compiled parts: beast_impl.cpp, as the rest of Beast (trap 7).
#pragma once

#include "daemon/rest/beast.hpp" // first: trap 1

#include <boost/beast/core/buffers_to_string.hpp>
#include <boost/beast/websocket/error.hpp>
#include <boost/beast/websocket/rfc6455.hpp>
#include <boost/beast/websocket/stream.hpp>

namespace qm::rest {
namespace websocket = boost::beast::websocket;
} // namespace qm::rest
