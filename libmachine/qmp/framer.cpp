// SPDX-License-Identifier: GPL-2.0-or-later
// QMP framing: splits a byte stream into messages at '\n' (QEMU ends each with CRLF), bounded.
#include "libmachine/qmp/framer.hpp"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

namespace qm::qmp {
namespace {

constexpr std::size_t idle_capacity = std::size_t{64} * 1024;

bool is_blank(std::string_view s)
{
    return std::all_of(s.begin(), s.end(), [](char c) { return c == ' ' || c == '\t' || c == '\r'; });
}

} // namespace

Framer::Framer(std::size_t max_size) : max_size_(max_size) {}

asio::mutable_buffer Framer::prepare(std::size_t n)
{
    if (begin_ == end_) {
        begin_ = scan_ = end_ = 0;
        if (buf_.size() > idle_capacity) {
            // A large message has been handled: give its memory back (hundreds of clients idle).
            std::vector<char>().swap(buf_);
        }
    } else if (begin_ > 0 && buf_.size() - end_ < n) {
        // Move the unfinished message to the front rather than growing the buffer.
        std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
        scan_ -= begin_;
        end_ -= begin_;
        begin_ = 0;
    }
    if (buf_.size() - end_ < n) {
        buf_.resize(end_ + n);
    }
    return asio::buffer(buf_.data() + end_, n);
}

void Framer::commit(std::size_t n)
{
    end_ = std::min(end_ + n, buf_.size());
}

void Framer::feed(std::string_view bytes)
{
    if (bytes.empty()) {
        return; // memcpy's pointers must not be null, even for 0 bytes (an empty buffer has none)
    }
    auto dst = prepare(bytes.size());
    std::memcpy(dst.data(), bytes.data(), bytes.size());
    commit(bytes.size());
}

expected<std::optional<std::string_view>> Framer::next()
{
    for (;;) {
        const char* base = buf_.data();
        const void* nl = scan_ < end_ ? std::memchr(base + scan_, '\n', end_ - scan_) : nullptr;
        if (nl == nullptr) {
            scan_ = end_;
            // A trailing '\r' may be the first half of the message's CRLF: not message bytes.
            std::size_t partial = end_ - begin_;
            if (partial > 0 && buf_[end_ - 1] == '\r') {
                --partial;
            }
            if (partial > max_size_) {
                return fail(errc::qmp_message_too_large,
                            fmt::format("QMP message exceeds {} bytes", max_size_));
            }
            return std::optional<std::string_view>{};
        }
        const auto pos = static_cast<std::size_t>(static_cast<const char*>(nl) - base);
        std::string_view line(base + begin_, pos - begin_);
        begin_ = scan_ = pos + 1;
        if (!line.empty() && line.back() == '\r') {
            line.remove_suffix(1);
        }
        if (line.size() > max_size_) {
            return fail(errc::qmp_message_too_large,
                        fmt::format("QMP message of {} bytes exceeds {} bytes", line.size(),
                                    max_size_));
        }
        if (is_blank(line)) {
            continue;
        }
        return std::optional<std::string_view>{line};
    }
}

bool Framer::has_partial() const noexcept
{
    return !is_blank(std::string_view(buf_.data() + begin_, end_ - begin_));
}

} // namespace qm::qmp
