// SPDX-License-Identifier: GPL-2.0-or-later
// Audit lines: describing callers and writing one grep-able line per mutating call.
#include "daemon/audit.hpp"

#include <sys/socket.h>

#include <fmt/format.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/spdlog.h>

namespace qm::daemon {
namespace {

constexpr std::size_t max_value_length = 256;

bool needs_quotes(std::string_view v)
{
    if (v.empty()) {
        return true;
    }
    for (unsigned char c : v) {
        if (c <= 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '=') {
            return true;
        }
    }
    return false;
}

// ` key=value`, the value quoted and escaped when needed.
void append_field(std::string& out, std::string_view key, std::string_view value)
{
    out += ' ';
    out += key;
    out += '=';
    const bool cut = value.size() > max_value_length;
    value = value.substr(0, max_value_length);
    if (!needs_quotes(value)) {
        out += value;
        out += cut ? "..." : "";
        return;
    }
    out += '"';
    for (unsigned char c : value) {
        switch (c) {
        case '"':
            out += "\\\"";
            break;
        case '\\':
            out += "\\\\";
            break;
        case '\n':
            out += "\\n";
            break;
        case '\r':
            out += "\\r";
            break;
        case '\t':
            out += "\\t";
            break;
        default:
            if (c < 0x20 || c >= 0x7f) {
                out += fmt::format("\\x{:02x}", c);
            } else {
                out += static_cast<char>(c);
            }
        }
    }
    out += cut ? "...\"" : "\"";
}

} // namespace

Caller unix_caller(uid_t uid, pid_t pid)
{
    return Caller{fmt::format("uid={} pid={}", uid, pid)};
}

Caller unix_socket_caller(int fd)
{
    struct ucred cred
    {
    };
    socklen_t len = sizeof cred;
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || len != sizeof cred) {
        return Caller{"uid=? pid=?"};
    }
    return unix_caller(cred.uid, cred.pid);
}

Caller tcp_caller(std::string_view address, std::uint16_t port)
{
    if (address.find(':') != std::string_view::npos) {
        return Caller{fmt::format("tcp=[{}]:{} token", address, port)};
    }
    return Caller{fmt::format("tcp={}:{} token", address, port)};
}

std::string audit_line(const Caller& caller, std::string_view op, std::string_view machine,
                       std::string_view result)
{
    std::string out = "audit:";
    append_field(out, "op", op);
    append_field(out, "machine", machine);
    append_field(out, "result", result);
    append_field(out, "caller", caller.description);
    return out;
}

void audit(const Caller& caller, std::string_view op, std::string_view machine,
           std::string_view result)
{
    spdlog::info("{}", audit_line(caller, op, machine, result));
}

namespace {

// The %* flag of the log pattern: the message, its control bytes escaped.
class EscapedMessage final : public spdlog::custom_flag_formatter
{
public:
    void format(const spdlog::details::log_msg& msg, const std::tm&,
                spdlog::memory_buf_t& dest) override
    {
        const std::string_view text(msg.payload.data(), msg.payload.size());
        std::size_t plain = 0; // start of the run of bytes copied as they are
        for (std::size_t i = 0; i < text.size(); ++i) {
            const auto c = static_cast<unsigned char>(text[i]);
            if ((c >= 0x20 && c != 0x7f) || c == '\t') {
                continue;
            }
            dest.append(text.data() + plain, text.data() + i);
            if (c == '\n') {
                dest.append(std::string_view("\\n"));
            } else if (c == '\r') {
                dest.append(std::string_view("\\r"));
            } else {
                fmt::format_to(std::back_inserter(dest), "\\x{:02x}", c);
            }
            plain = i + 1;
        }
        dest.append(text.data() + plain, text.data() + text.size());
    }

    std::unique_ptr<spdlog::custom_flag_formatter> clone() const override
    {
        return std::make_unique<EscapedMessage>();
    }
};

} // namespace

std::unique_ptr<spdlog::formatter> make_log_formatter(bool with_time)
{
    auto f = std::make_unique<spdlog::pattern_formatter>();
    f->add_flag<EscapedMessage>('*');
    f->set_pattern(with_time ? "%Y-%m-%d %H:%M:%S.%e %l: %*" : "%l: %*");
    return f;
}

} // namespace qm::daemon
