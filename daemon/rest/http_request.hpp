// SPDX-License-Identifier: GPL-2.0-or-later
// A request from Beast's parser to the Api, apart from I/O: the parser's limits, the checks of a
// request's header, the answer to a request that could not be read, and Beast's message turned into
// rest::Request. The session (server.cpp) runs them between its reads; the rest fuzz target runs
// them on bytes.
#pragma once

#include <cstddef>
#include <optional>
#include <string_view>

#include "daemon/audit.hpp"
#include "daemon/rest/api.hpp"
#include "daemon/rest/beast.hpp"
#include "daemon/rest/problem.hpp"

namespace qm::rest {

using RequestParser = http::request_parser<http::string_body>;

// Beast 1.74 speaks boost::string_view.
std::string_view sv(beast::string_view s);
// Equal but for the case of ASCII letters (header values, the authorization scheme).
bool iequals(std::string_view a, std::string_view b);

// What a request may hold (the server's: ServerOptions).
struct RequestLimits
{
    std::size_t max_header;
    std::size_t max_body;
};

// A parser for the next request of a connection. On a listener that needs the token, the body
// limit is lifted until admit_body(): an anonymous client learns nothing but 401 (Beast refuses a
// Content-Length over the limit as soon as the header ends, before the token could be checked).
void limit_parser(RequestParser& parser, const RequestLimits& limits, bool needs_token);

// Once the header is read: http::error::bad_transfer_encoding when a Transfer-Encoding's last
// coding is not chunked (RFC 9112 6.3: the body's length is unknown, a request smuggling vector),
// http::error::bad_field for HTTP/1.1 without Host (RFC 9112 3.2); no error otherwise.
error_code check_header(const RequestParser& parser);

// Once the header is read and the token checked, before the body is: http::error::body_limit when
// the Content-Length is over max_body; otherwise the body is limited to max_body (a chunked one is
// cut there) and no error.
error_code admit_body(RequestParser& parser, const RequestLimits& limits);

// The answer to a request that failed to be read (the connection is closed after it): 413 for a
// body over the limit, 431 for a header over it, 400 for what Beast's parser (or check_header)
// refuses. nullopt when there is nobody to answer: the peer closed (end of stream, a partial
// message) or the socket failed. (Timeouts and the token are the session's own.)
std::optional<Problem> read_problem(const error_code& ec, const RequestLimits& limits);

// The Api's request of a message read whole; the body is moved out of `msg`.
Request to_request(http::request<http::string_body>& msg, daemon::Caller caller);

} // namespace qm::rest
