// SPDX-License-Identifier: GPL-2.0-or-later
// A request from Beast's parser to the Api: limits, header checks, read failures, conversion.
#include "daemon/rest/http_request.hpp"

#include <cctype>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include <fmt/format.h>

namespace qm::rest {

std::string_view sv(beast::string_view s)
{
    return {s.data(), s.size()};
}

bool iequals(std::string_view a, std::string_view b)
{
    if (a.size() != b.size()) {
        return false;
    }
    for (std::size_t i = 0; i < a.size(); ++i) {
        if (std::tolower(static_cast<unsigned char>(a[i])) !=
            std::tolower(static_cast<unsigned char>(b[i]))) {
            return false;
        }
    }
    return true;
}

void limit_parser(RequestParser& parser, const RequestLimits& limits, bool needs_token)
{
    parser.header_limit(static_cast<std::uint32_t>(limits.max_header));
    if (needs_token) {
        // Not boost::none: Beast 1.74 compares `len > body_limit_` with the optional, and a none
        // optional is less than every length.
        parser.body_limit(std::numeric_limits<std::uint64_t>::max());
    } else {
        parser.body_limit(limits.max_body);
    }
}

error_code check_header(const RequestParser& parser)
{
    const auto& head = parser.get();
    if (head.find(http::field::transfer_encoding) != head.end() && !parser.chunked()) {
        return http::error::bad_transfer_encoding;
    }
    if (head.version() >= 11 && head.find(http::field::host) == head.end()) {
        return http::error::bad_field;
    }
    return {};
}

error_code admit_body(RequestParser& parser, const RequestLimits& limits)
{
    const auto length = parser.content_length();
    if (length && *length > limits.max_body) {
        return http::error::body_limit;
    }
    // No body byte is parsed yet (the header read stops at its end): the whole limit is left.
    parser.body_limit(limits.max_body);
    return {};
}

std::optional<Problem> read_problem(const error_code& ec, const RequestLimits& limits)
{
    if (ec == http::error::body_limit) {
        return make_problem(HttpProblem::payload_too_large,
                            fmt::format("the body is larger than {} bytes", limits.max_body));
    }
    if (ec == http::error::header_limit) {
        return make_problem(
            HttpProblem::header_fields_too_large,
            fmt::format("the request header is larger than {} bytes", limits.max_header));
    }
    if (ec.category() == http::make_error_code(http::error::bad_target).category() &&
        ec != http::error::end_of_stream && ec != http::error::partial_message) {
        return make_problem(errc::invalid_argument, "malformed HTTP request: " + ec.message());
    }
    return std::nullopt;
}

Request to_request(http::request<http::string_body>& msg, daemon::Caller caller)
{
    Request request;
    request.method = std::string(msg.method_string());
    request.target = std::string(msg.target());
    request.content_type = std::string(msg[http::field::content_type]);
    if (auto it = msg.find(http::field::if_match); it != msg.end()) {
        request.if_match = std::string(it->value());
    }
    request.body = std::move(msg.body());
    if (auto it = msg.find("Last-Event-ID"); it != msg.end()) {
        request.last_event_id = std::string(it->value());
    }
    request.websocket = iequals(sv(msg[http::field::upgrade]), "websocket");
    request.caller = std::move(caller);
    return request;
}

} // namespace qm::rest
