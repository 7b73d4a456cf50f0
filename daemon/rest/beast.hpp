// SPDX-License-Identifier: GPL-2.0-or-later
// The only place that includes Boost.Beast (compiled once, in beast_impl.cpp: trap 7).
#pragma once

#include "libmachine/asio.hpp" // first: trap 1

#include <boost/beast/core/basic_stream.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/verb.hpp>
#include <boost/beast/http/write.hpp>

namespace qm::rest {
namespace beast = boost::beast;
namespace http = boost::beast::http;
} // namespace qm::rest
