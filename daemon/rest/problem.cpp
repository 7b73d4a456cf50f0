// SPDX-License-Identifier: GPL-2.0-or-later
// RFC 9457 problem details for the REST front end.
#include "daemon/rest/problem.hpp"

#include <array>

#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include "daemon/supervisor/errors.hpp"

namespace qm::rest {

namespace {

constexpr std::array http_problems{
    HttpProblemInfo{HttpProblem::unauthorized, "Unauthorized", 401, "Authentication required"},
    HttpProblemInfo{HttpProblem::not_found, "NotFound", 404, "No such route"},
    HttpProblemInfo{HttpProblem::method_not_allowed, "MethodNotAllowed", 405,
                    "Method not allowed"},
    HttpProblemInfo{HttpProblem::request_timeout, "RequestTimeout", 408,
                    "The request did not arrive in time"},
    HttpProblemInfo{HttpProblem::payload_too_large, "PayloadTooLarge", 413,
                    "Request body too large"},
    HttpProblemInfo{HttpProblem::unsupported_media_type, "UnsupportedMediaType", 415,
                    "Unsupported media type"},
    HttpProblemInfo{HttpProblem::upgrade_required, "UpgradeRequired", 426, "Upgrade required"},
    HttpProblemInfo{HttpProblem::header_fields_too_large, "HeaderFieldsTooLarge", 431,
                    "Request header too large"},
};

// "spec.console.frob: unknown field" → "spec.console.frob".
std::string field_of(std::string_view message)
{
    if (!message.starts_with("spec")) {
        return {};
    }
    const std::size_t colon = message.find(": ");
    if (colon == std::string_view::npos || message.substr(0, colon).find(' ') != std::string::npos) {
        return {};
    }
    return std::string(message.substr(0, colon));
}

// `s` with every byte sequence that is not UTF-8 replaced by U+FFFD: a detail may quote a name or
// a path the client sent, and the body must stay valid JSON (RFC 8259 8.1).
std::string valid_utf8(std::string_view s)
{
    std::string out;
    out.reserve(s.size());
    std::size_t i = 0;
    while (i < s.size()) {
        const auto c = static_cast<unsigned char>(s[i]);
        std::size_t len = 0;
        unsigned min = 0;
        unsigned cp = 0;
        if (c < 0x80) {
            out.push_back(s[i++]);
            continue;
        }
        if ((c & 0xE0) == 0xC0) {
            len = 2, min = 0x80, cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3, min = 0x800, cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4, min = 0x10000, cp = c & 0x07;
        }
        bool ok = len != 0 && i + len <= s.size();
        for (std::size_t k = 1; ok && k < len; ++k) {
            const auto cc = static_cast<unsigned char>(s[i + k]);
            ok = (cc & 0xC0) == 0x80;
            cp = (cp << 6) | (cc & 0x3F);
        }
        ok = ok && cp >= min && cp <= 0x10FFFF && (cp < 0xD800 || cp > 0xDFFF);
        if (ok) {
            out.append(s.substr(i, len));
            i += len;
        } else {
            out.append("\xEF\xBF\xBD");
            ++i;
        }
    }
    return out;
}

} // namespace

std::span<const HttpProblemInfo> http_problem_table() noexcept
{
    return http_problems;
}

Problem make_problem(const Error& error)
{
    const daemon::ErrorInfo& row = daemon::error_info(error);
    Problem p;
    p.status = row.http_status;
    p.name = row.name;
    p.title = row.title;
    p.detail = error.message;
    if (row.code == errc::invalid_argument) {
        p.field = field_of(error.message);
    }
    p.qmp_class = error.qmp_class;
    p.qmp_desc = error.qmp_desc;
    return p;
}

Problem make_problem(errc code, std::string detail, std::string field)
{
    Problem p = make_problem(Error{make_error_code(code), std::move(detail), {}, {}});
    if (!field.empty()) {
        p.field = std::move(field);
    }
    return p;
}

Problem make_problem(HttpProblem problem, std::string detail)
{
    const HttpProblemInfo& row = http_problems[static_cast<std::size_t>(problem)];
    Problem p;
    p.status = row.http_status;
    p.name = row.name;
    p.title = row.title;
    p.detail = std::move(detail);
    return p;
}

std::string problem_body(const Problem& p)
{
    rapidjson::StringBuffer buf;
    rapidjson::Writer<rapidjson::StringBuffer> w(buf);
    auto str = [&](std::string_view s) {
        w.String(s.data(), static_cast<rapidjson::SizeType>(s.size()));
    };
    w.StartObject();
    str("type");
    str(std::string(problem_type_prefix) + p.name);
    str("title");
    str(p.title);
    str("status");
    w.Int(p.status);
    str("detail");
    str(valid_utf8(p.detail));
    if (!p.field.empty()) {
        str("field");
        str(valid_utf8(p.field));
    }
    if (!p.qmp_class.empty() || !p.qmp_desc.empty()) {
        // QEMU's own words (qmp-spec 2.4.2: the error response's class and desc).
        str("class");
        str(valid_utf8(p.qmp_class));
        str("desc");
        str(valid_utf8(p.qmp_desc));
    }
    w.EndObject();
    return {buf.GetString(), buf.GetSize()};
}

} // namespace qm::rest
