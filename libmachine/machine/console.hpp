// SPDX-License-Identifier: GPL-2.0-or-later
// qm::Console: one connection to a machine's console socket (the seed's ConsoleSocket): draining
// into a bounded ring, writing, waiting for a pattern, followers of the live output
// (ConsoleReader), and bounding QEMU's console log.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

// GCC 12 at -O1 with sanitizers calls std::function members of libstdc++'s regex automaton
// "maybe uninitialized" (a false positive inside <regex>, where the diagnostic is located).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <regex>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"

namespace qm {

// What wait() looks for: a plain substring, or an ECMAScript regular expression.
//
// A substring may span lines. A regex is searched within one line at a time: a line is the text
// after a "\n" up to (not including) the next "\r\n" or "\n", so ^ and $ are line anchors. The
// line still being written counts too (a prompt without a newline matches as soon as it is
// there), so a $ may match the end of a line that is not finished yet. A search that starts at an
// offset treats that offset as a line start. Lines longer than 4 KiB are searched in 4 KiB pieces
// (libstdc++'s regex recurses per character; and a guest writing one endless line must not make
// every byte cost more).
class ConsolePattern
{
public:
    // Implicit from text: `wait_console("login:")` is a substring wait.
    ConsolePattern(std::string substring); // NOLINT(google-explicit-constructor)
    ConsolePattern(const char* substring); // NOLINT(google-explicit-constructor)
    // From a compiled regex; `source` is only for messages ("no match for ...").
    ConsolePattern(std::regex regex, std::string source);
    // Compiles `expr` (ECMAScript); errc::invalid_argument with std::regex's reason when bad.
    static expected<ConsolePattern> regex(std::string_view expr);

    bool is_regex() const noexcept { return regex_.has_value(); }
    // The substring, or the regex's source.
    const std::string& text() const noexcept { return text_; }
    const std::optional<std::regex>& compiled() const noexcept { return regex_; }

private:
    std::string text_;
    std::optional<std::regex> regex_;
};

// Where a wait() matched, in console offsets (bytes since the connection started).
struct ConsoleMatch
{
    // The matched text (for a regex, the whole match).
    std::string text;
    // Offsets of its first byte and one past its last: wait again from `end` for what follows.
    std::uint64_t begin = 0;
    std::uint64_t end = 0;
};

// What ConsoleReader::next() returns: the next bytes of the output, in order.
struct ConsoleChunk
{
    std::string bytes;
    // The console offset of bytes' first byte.
    std::uint64_t offset = 0;
    // Bytes of output the reader missed right before `offset`: it fell behind by more than its
    // bound, and the oldest were dropped for it. 0 unless it reads too slowly.
    std::uint64_t lost = 0;
};

class Console;

// A follower of a console's live output (Console::follow()), for a client that watches it: it gets
// every byte the console receives from its creation on, after the newest bytes the ring held then.
// Its own buffer is bounded: a reader that falls more than `limit` bytes behind loses the oldest
// (next() says how many) rather than holding the console's memory hostage. Any number of readers
// may follow one console; each costs nothing while it keeps up. Created by shared_ptr and held by
// its user, who calls cancel() when done (or drops it). Loop thread only; one next() at a time.
//
// Errors: errc::invalid_state (the console ended and every byte was read, with its reason; the
// reader was cancelled; a second concurrent next()), errc::timeout (next()).
class ConsoleReader : public std::enable_shared_from_this<ConsoleReader>
{
public:
    ~ConsoleReader();
    ConsoleReader(const ConsoleReader&) = delete;
    ConsoleReader& operator=(const ConsoleReader&) = delete;

    // The bytes waiting for this reader, at most `max` (0: all of them), and how many it lost
    // before them; waits for output when none is waiting, at most `timeout` (milliseconds::max():
    // for ever). Bytes received before the console ended are given before the end is reported.
    awaitable<expected<ConsoleChunk>>
    next(std::size_t max, std::chrono::milliseconds timeout = std::chrono::milliseconds::max());
    // Stops following: a pending next() completes with errc::invalid_state, and so does every
    // later call. Idempotent.
    void cancel();
    bool cancelled() const noexcept { return cancelled_; }
    // The console offset of the next byte next() returns.
    std::uint64_t offset() const noexcept { return offset_; }
    // Bytes waiting for this reader.
    std::size_t pending() const noexcept { return buf_.size(); }

private:
    friend class Console;
    ConsoleReader(std::shared_ptr<Console> console, std::size_t limit);
    // The console received `n` bytes.
    void take(const char* data, std::size_t n);
    void wake();

    std::shared_ptr<Console> console_;
    std::size_t limit_;
    // Bytes [offset_, offset_ + buf_.size()) of the output, not yet returned.
    std::string buf_;
    std::uint64_t offset_ = 0;
    std::uint64_t lost_ = 0;
    bool cancelled_ = false;
    bool waiting_ = false;
    asio::steady_timer timer_;
};

struct ConsoleOptions
{
    // For debug messages.
    std::string name{};
    // How many of the most recent bytes output() keeps; 0 keeps none (wait() is then refused).
    // The memory held is at most ring_size + ring_size / 4 + one read (4 KiB), allocated at the
    // first byte: the slack makes dropping old bytes cost O(1) per byte on average.
    std::size_t ring_size = std::size_t{64} * 1024;
    // QEMU's logfile= for this console ("" = none) and its bound (0 = unbounded): see Console.
    std::string log_path{};
    std::uint64_t log_max = std::uint64_t{1024} * 1024;
};

// One connection to a console socket that QEMU serves (server=on,wait=off). Created and held by
// shared_ptr (its reader coroutine keeps it alive until the connection ends): close() it when
// done. Loop thread only.
//
// Once connected it reads everything the guest writes (so the guest never waits for a reader)
// into the ring and counts it: offset() is the number of bytes received since connect(), and
// grows monotonically. wait() searches from an offset: the bytes still in the ring when it is
// called, then every byte that arrives, each looked at once, as it arrives (no byte can scroll
// out of the ring unseen). A match longer than the ring may be missed.
//
// The log bound: QEMU writes the log itself (logfile=, appended with O_APPEND) and cannot bound
// it, so the reader does. It counts what it reads (QEMU logs the same bytes, each buffer just
// after sending it) and, once the log may exceed log_max, checks its size and, if over, copies it
// to "<log>.1" (replacing an older one) and truncates it to 0, logrotate's copytruncate: QEMU's
// O_APPEND writes then continue at offset 0 without holes. Renaming would not do: QEMU would keep
// writing to the renamed file. At most 2 × log_max stays on disk; bytes QEMU writes between the
// copy and the truncation (a few microseconds) are lost from the log, never from the ring. A log
// that grows while nobody reads the console is bounded at the next connect or read.
//
// Errors: errc::connect_failed (connect), errc::invalid_state (not connected, closed, the
// connection ended before a match, no ring), errc::timeout (wait), errc::invalid_argument (regex).
// ConsoleReader has its own.
class Console : public std::enable_shared_from_this<Console>
{
public:
    static std::shared_ptr<Console> create(const asio::any_io_executor& ex, ConsoleOptions options);
    Console(const Console&) = delete;
    Console& operator=(const Console&) = delete;
    ~Console();

    // Connects to the unix socket at `path` and starts draining it. The log is bounded at once.
    // A call while another connects completes with that attempt's outcome.
    awaitable<expected<void>> connect(std::string path);
    // Ends the connection (idempotent). Pending writes and waits fail with errc::invalid_state
    // (saying `why`, when given: "the machine is stopping"); readers get what they have not read
    // yet, then the same; the ring stays readable.
    void close(std::string why = {});
    bool is_connected() const noexcept { return state_ == State::connected; }
    // Closed for good (by close(), or the connection ended): a new connection needs a new Console.
    bool is_closed() const noexcept { return state_ == State::closed; }
    // Why it closed ("the machine is stopping", "QEMU exited", ...); empty while it is not.
    const std::string& why_closed() const noexcept { return why_closed_; }
    // Reads what the socket already holds, without waiting (at most 1 MiB): the last words of a
    // peer that has gone, before close().
    void drain();

    // Writes `bytes` to the guest, in call order with other writes. Completes once the socket
    // took every byte (at once, unless QEMU stopped reading: the guest is not reading its UART).
    awaitable<expected<void>> write(std::string bytes);

    // The ring's bytes from offset `from` on (all of it by default).
    std::string output(std::uint64_t from = 0) const;
    // Bytes received so far; the ring holds [ring_begin(), offset()).
    std::uint64_t offset() const noexcept { return total_; }
    std::uint64_t ring_begin() const noexcept;

    // Waits until `pattern` matches the output from offset `from` on (see the class comment), at
    // most `timeout` (milliseconds::max(): for ever).
    awaitable<expected<ConsoleMatch>>
    wait(ConsolePattern pattern, std::chrono::milliseconds timeout, std::uint64_t from = 0);

    // A new follower of the output (see ConsoleReader): its first bytes are the newest the ring
    // holds now (at most `limit`), then everything that arrives. It buffers at most about `limit`
    // bytes (limit + limit / 4 + one read) for a reader that falls behind. Allowed in every state:
    // a closed console's reader gets the ring, then the end.
    std::shared_ptr<ConsoleReader> follow(std::size_t limit);
    std::size_t reader_count() const noexcept { return readers_.size(); }

    // How many times the log was rotated (for tests and statistics).
    unsigned log_rotations() const noexcept { return log_rotations_; }

private:
    friend class ConsoleReader;
    enum class State { idle, connecting, connected, closed };
    struct Waiter;
    struct WriteRequest;

    Console(const asio::any_io_executor& ex, ConsoleOptions options);

    awaitable<void> read_loop();
    void on_data(const char* data, std::size_t n);
    void wake_all();
    bool search(Waiter& w) const;
    void check_log(bool force, std::size_t last_read);
    void rotate_log(std::uint64_t size, unsigned mode);
    std::string_view ring_view(std::uint64_t from) const;

    asio::any_io_executor ex_;
    ConsoleOptions options_;
    asio::local::stream_protocol::socket socket_;
    State state_ = State::idle;
    std::string why_closed_;
    // Cancelled when a connect() ends: what a second caller waits on.
    asio::steady_timer connect_done_;

    // The ring: buf_ holds bytes [buf_begin_, total_); the logical ring is its last ring_size.
    std::string buf_;
    std::uint64_t buf_begin_ = 0;
    std::uint64_t total_ = 0;

    // Bytes the log may have gained since its size was last looked at.
    std::uint64_t log_estimate_ = 0;
    unsigned log_rotations_ = 0;

    std::list<std::shared_ptr<Waiter>> waiters_;
    std::list<std::shared_ptr<WriteRequest>> writes_; // not a deque: nothing allocated while empty
    // The readers following the output (each removes itself when cancelled or destroyed; each
    // holds the console alive).
    std::list<ConsoleReader*> readers_;
};

} // namespace qm
