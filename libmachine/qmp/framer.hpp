// SPDX-License-Identifier: GPL-2.0-or-later
// QMP framing: splits a byte stream into messages at '\n' (QEMU ends each with CRLF), bounded.
#pragma once

#include <cstddef>
#include <optional>
#include <string_view>
#include <vector>

#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"

namespace qm::qmp {

// Owned by one reader; no I/O of its own. Bytes go in with prepare()/commit() (read straight into
// the buffer) or feed(); complete messages come out of next(). A message is the text before '\n'
// with one trailing '\r' removed; blank lines are skipped. A message longer than `max_size` bytes
// is an error (errc::qmp_message_too_large), and the framer is then unusable.
class Framer
{
public:
    explicit Framer(std::size_t max_size);

    // A writable buffer of at least `n` bytes at the end of the pending data; commit() what was
    // written into it. Invalidates views returned by next().
    asio::mutable_buffer prepare(std::size_t n);
    void commit(std::size_t n);
    void feed(std::string_view bytes);

    // The next complete message, nullopt when more bytes are needed. The view stays valid until
    // the next prepare()/feed().
    expected<std::optional<std::string_view>> next();

    // True when bytes of an unfinished message are buffered (a peer closing now closes mid-message).
    bool has_partial() const noexcept;
    // Bytes buffered and not yet returned.
    std::size_t buffered() const noexcept { return end_ - begin_; }
    std::size_t max_size() const noexcept { return max_size_; }

private:
    std::vector<char> buf_;
    std::size_t begin_ = 0; // first byte not yet returned
    std::size_t scan_ = 0;  // where the search for '\n' resumes
    std::size_t end_ = 0;   // end of valid data
    std::size_t max_size_;
};

} // namespace qm::qmp
