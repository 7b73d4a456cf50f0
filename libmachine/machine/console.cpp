// SPDX-License-Identifier: GPL-2.0-or-later
// qm::Console: the console connection, its ring, its writers, pattern waiters and readers, and the
// bound on QEMU's console log.
#include "libmachine/machine/console.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <exception>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace qm {
namespace {

constexpr std::size_t read_size = 4096;
// A regex sees lines of at most this many bytes (a longer line is cut into pieces this long):
// libstdc++'s regex recurses once per character, so unbounded input could exhaust the stack, and
// the line being written is searched again at every read.
constexpr std::size_t max_regex_line = 4096;
// Longest unix socket path (sun_path is 108 bytes with its NUL).
constexpr std::size_t max_socket_path = 107;

// Copies the file `from` to `to` (replaced) with copy_file_range, falling back to read/write.
bool copy_file(const std::string& from, const std::string& to, mode_t mode, std::string& why)
{
    const int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
    if (in < 0) {
        why = fmt::format("open '{}': {}", from, std::strerror(errno));
        return false;
    }
    const int out = ::open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (out < 0) {
        why = fmt::format("open '{}': {}", to, std::strerror(errno));
        ::close(in);
        return false;
    }
    bool ok = true;
    bool fallback = false;
    for (;;) {
        const ssize_t n = ::copy_file_range(in, nullptr, out, nullptr, std::size_t{1} << 20, 0);
        if (n > 0) {
            continue;
        }
        if (n < 0 && (errno == ENOSYS || errno == EXDEV || errno == EINVAL)) {
            fallback = true;
        } else if (n < 0) {
            why = fmt::format("copy to '{}': {}", to, std::strerror(errno));
            ok = false;
        }
        break;
    }
    if (fallback) {
        std::array<char, 65536> buf{};
        for (;;) {
            const ssize_t n = ::read(in, buf.data(), buf.size());
            if (n <= 0) {
                ok = n == 0;
                break;
            }
            if (::write(out, buf.data(), static_cast<std::size_t>(n)) != n) {
                ok = false;
                break;
            }
        }
        if (!ok) {
            why = fmt::format("copy to '{}': {}", to, std::strerror(errno));
        }
    }
    ::close(in);
    ::close(out);
    return ok;
}

// Searches `text` for the regex; `not_bol` when text does not start at a line's beginning.
bool regex_find(const std::regex& re, std::string_view text, bool not_bol, std::size_t& pos,
                std::size_t& len)
{
    auto flags = std::regex_constants::match_default;
    if (not_bol) {
        flags |= std::regex_constants::match_not_bol;
    }
    std::cmatch m;
    try {
        if (!std::regex_search(text.data(), text.data() + text.size(), m, re, flags)) {
            return false;
        }
    } catch (const std::regex_error&) {
        return false; // too complex for this line: treated as no match
    }
    pos = static_cast<std::size_t>(m.position(0));
    len = static_cast<std::size_t>(m.length(0));
    return true;
}

} // namespace

//---- ConsolePattern ---------------------------------------------------------------------------

ConsolePattern::ConsolePattern(std::string substring)
    : text_(std::move(substring))
{}

ConsolePattern::ConsolePattern(const char* substring)
    : text_(substring)
{}

ConsolePattern::ConsolePattern(std::regex regex, std::string source)
    : text_(std::move(source))
    , regex_(std::move(regex))
{}

expected<ConsolePattern> ConsolePattern::regex(std::string_view expr)
{
    try {
        std::regex re(expr.begin(), expr.end(), std::regex::ECMAScript);
        return ConsolePattern(std::move(re), std::string(expr));
    } catch (const std::regex_error& e) {
        return fail(errc::invalid_argument, fmt::format("bad regex '{}': {}", expr, e.what()));
    }
}

//---- Console ----------------------------------------------------------------------------------

// A wait(): its pattern, where its next search starts and, once found, its match.
struct Console::Waiter
{
    Waiter(const asio::any_io_executor& ex, ConsolePattern p, std::uint64_t from)
        : pattern(std::move(p))
        , next(from)
        , timer(ex)
    {}
    ConsolePattern pattern;
    // Substring: the first offset a match may still start at. Regex: the start of the line (or
    // line piece) being written: every line before it was searched whole.
    std::uint64_t next;
    std::optional<ConsoleMatch> match;
    asio::steady_timer timer;
};

// A write() waiting for its turn or in progress.
struct Console::WriteRequest
{
    WriteRequest(const asio::any_io_executor& ex, std::string b)
        : bytes(std::move(b))
        , timer(ex)
    {}
    std::string bytes;
    bool cancelled = false;
    asio::steady_timer timer;
};

std::shared_ptr<Console> Console::create(const asio::any_io_executor& ex, ConsoleOptions options)
{
    return std::shared_ptr<Console>(new Console(ex, std::move(options)));
}

Console::Console(const asio::any_io_executor& ex, ConsoleOptions options)
    : ex_(ex)
    , options_(std::move(options))
    , socket_(ex)
    , connect_done_(ex)
{}

Console::~Console()
{
    error_code ec;
    socket_.close(ec); // nothing is pending: every coroutine holds a reference
}

awaitable<expected<void>> Console::connect(std::string path)
{
    auto self = shared_from_this();
    if (state_ == State::connecting) {
        error_code ignored;
        co_await connect_done_.async_wait(use_ec(ignored));
        if (state_ != State::connected) {
            co_return fail(errc::connect_failed,
                           fmt::format("cannot connect to the console '{}' (another attempt "
                                       "failed)", path));
        }
        co_return expected<void>{};
    }
    if (state_ != State::idle) {
        co_return fail(errc::invalid_state, "console already connected or closed");
    }
    if (path.size() > max_socket_path) {
        co_return fail(errc::invalid_argument,
                       fmt::format("console socket path '{}' is longer than a unix socket path "
                                   "may be ({} bytes)",
                                   path, max_socket_path));
    }
    state_ = State::connecting;
    connect_done_.expires_at(asio::steady_timer::time_point::max());
    const asio::local::stream_protocol::endpoint endpoint(path);
    error_code ec;
    co_await socket_.async_connect(endpoint, use_ec(ec));
    connect_done_.cancel();
    if (state_ == State::closed) {
        co_return fail(errc::invalid_state, "console closed while connecting");
    }
    if (ec) {
        error_code ignored;
        socket_.close(ignored);
        state_ = State::idle; // may be tried again
        co_return fail(errc::connect_failed,
                       fmt::format("cannot connect to the console '{}': {}", path, ec.message()));
    }
    state_ = State::connected;
    spdlog::debug("console[{}]: connected to {}", options_.name, path);
    check_log(true, 0); // what QEMU logged before we came (or while nobody read) counts too
    asio::co_spawn(ex_, read_loop(), [self](const std::exception_ptr& e) {
        if (!e) {
            return;
        }
        const std::string reason = describe_exception(e);
        spdlog::error("console[{}]: reader coroutine failed: {}", self->options_.name, reason);
        self->why_closed_ = "internal error: " + reason;
        self->close();
    });
    co_return expected<void>{};
}

void Console::close(std::string why)
{
    if (state_ == State::closed) {
        return;
    }
    state_ = State::closed;
    if (!why.empty()) {
        why_closed_ = std::move(why);
    }
    if (why_closed_.empty()) {
        why_closed_ = "the console was closed";
    }
    error_code ec;
    socket_.close(ec); // pending connect, read and write complete with operation_aborted
    for (auto& w : writes_) {
        w->cancelled = true;
        w->timer.cancel();
    }
    writes_.clear();
    wake_all();
    for (ConsoleReader* r : readers_) {
        r->wake();
    }
}

void Console::drain()
{
    if (state_ != State::connected) {
        return;
    }
    error_code ec;
    socket_.non_blocking(true, ec);
    std::array<char, read_size> buf{};
    for (std::size_t got = 0; !ec && got < (std::size_t{1} << 20);) {
        const std::size_t n = socket_.read_some(asio::buffer(buf), ec);
        if (n > 0) {
            on_data(buf.data(), n);
        }
        got += n;
    }
}

awaitable<void> Console::read_loop()
{
    auto self = shared_from_this();
    std::array<char, read_size> buf{};
    for (;;) {
        error_code ec;
        const std::size_t n = co_await socket_.async_read_some(asio::buffer(buf), use_ec(ec));
        if (n > 0 && state_ == State::connected) {
            on_data(buf.data(), n);
        }
        if (ec) {
            if (state_ != State::closed) {
                why_closed_ = ec == asio::error::eof
                                  ? "the console connection ended (QEMU closed it)"
                                  : "the console connection ended: " + ec.message();
                spdlog::debug("console[{}]: {}", options_.name, why_closed_);
                close();
            }
            break;
        }
    }
}

std::uint64_t Console::ring_begin() const noexcept
{
    const std::uint64_t cap = options_.ring_size;
    return std::max(buf_begin_, total_ > cap ? total_ - cap : 0);
}

std::string_view Console::ring_view(std::uint64_t from) const
{
    // Every offset at or past buf_begin_ is in buf_ (the slack may hold a little more than the
    // logical ring: callers pass ring_begin() or later when they mean the ring).
    const std::uint64_t start = std::clamp(from, buf_begin_, total_);
    return std::string_view(buf_).substr(static_cast<std::size_t>(start - buf_begin_));
}

std::string Console::output(std::uint64_t from) const
{
    return std::string(ring_view(std::max(from, ring_begin())));
}

void Console::on_data(const char* data, std::size_t n)
{
    total_ += n;
    log_estimate_ += n;
    for (ConsoleReader* r : readers_) {
        r->take(data, n);
    }
    const std::size_t cap = options_.ring_size;
    if (cap == 0) {
        buf_begin_ = total_;
    } else {
        const std::size_t slack = std::max<std::size_t>(cap / 4, 1);
        if (buf_.capacity() < cap + slack + read_size) {
            buf_.reserve(cap + slack + read_size); // once, at the first byte: never grows again
        }
        buf_.append(data, n);
        // Every waiter sees every byte before any of it can be dropped.
        for (auto& w : waiters_) {
            if (!w->match && search(*w)) {
                w->timer.cancel();
            }
        }
        if (buf_.size() > cap + slack) {
            const std::size_t drop = buf_.size() - cap;
            buf_.erase(0, drop);
            buf_begin_ += drop;
        }
    }
    check_log(false, n);
}

bool Console::search(Waiter& w) const
{
    const std::uint64_t start = std::max(w.next, buf_begin_);
    if (start > total_) {
        return false; // `from` is still ahead of the output
    }
    const std::string_view view = ring_view(start);
    if (!w.pattern.is_regex()) {
        const std::string& needle = w.pattern.text();
        const auto pos = view.find(needle);
        if (pos != std::string_view::npos) {
            w.match = ConsoleMatch{needle, start + pos, start + pos + needle.size()};
            return true;
        }
        // A match may still start in the last needle.size() - 1 bytes.
        const std::uint64_t keep = needle.empty() ? 0 : needle.size() - 1;
        w.next = std::max(start, total_ > keep ? total_ - keep : 0);
        return false;
    }
    const std::regex& re = *w.pattern.compiled();
    // The first piece does not start a line when the ring no longer holds its beginning.
    bool not_bol = start != w.next;
    std::size_t pos = 0;
    for (;;) {
        const auto nl = view.find('\n', pos);
        const std::size_t line_end = std::min(nl, view.size());
        const bool complete = nl != std::string_view::npos && nl - pos <= max_regex_line;
        const bool piece = !complete && line_end - pos >= max_regex_line;
        std::string_view line = view.substr(pos, std::min(line_end - pos, max_regex_line));
        if (!line.empty() && line.back() == '\r') {
            line.remove_suffix(1);
        }
        std::size_t mpos = 0;
        std::size_t mlen = 0;
        if (regex_find(re, line, not_bol, mpos, mlen)) {
            const std::uint64_t begin =
                start + static_cast<std::uint64_t>(line.data() - view.data()) + mpos;
            w.match = ConsoleMatch{std::string(line.substr(mpos, mlen)), begin, begin + mlen};
            return true;
        }
        if (complete) {
            pos = nl + 1;
            not_bol = false;
        } else if (piece) {
            pos += max_regex_line;
            not_bol = true; // the rest of a cut line does not start a line
        } else {
            break; // the line being written: searched again when more arrives
        }
    }
    w.next = start + pos;
    return false;
}

void Console::wake_all()
{
    for (auto& w : waiters_) {
        w->timer.cancel();
    }
}

awaitable<expected<void>> Console::write(std::string bytes)
{
    auto self = shared_from_this();
    if (state_ != State::connected) {
        std::string why = "console not connected";
        if (state_ == State::closed) {
            why = "console: " + why_closed_;
        }
        co_return fail(errc::invalid_state, why);
    }
    auto req = std::make_shared<WriteRequest>(ex_, std::move(bytes));
    writes_.push_back(req);
    // One write at a time on the socket, in call order: wait for the one before to finish.
    while (!req->cancelled && writes_.front() != req) {
        req->timer.expires_at(asio::steady_timer::time_point::max());
        error_code ec;
        co_await req->timer.async_wait(use_ec(ec));
    }
    if (req->cancelled) {
        co_return fail(errc::invalid_state, "console: " + why_closed_);
    }
    error_code ec;
    co_await asio::async_write(socket_, asio::buffer(req->bytes), use_ec(ec));
    if (!writes_.empty() && writes_.front() == req) {
        writes_.pop_front();
        if (!writes_.empty()) {
            writes_.front()->timer.cancel(); // the next one's turn
        }
    }
    if (ec) {
        if (state_ == State::closed || ec == asio::error::operation_aborted) {
            co_return fail(errc::invalid_state, "console: " + why_closed_);
        }
        const std::string why = ec.message();
        why_closed_ = "console write failed: " + why;
        close();
        co_return fail(errc::invalid_state, why_closed_);
    }
    co_return expected<void>{};
}

awaitable<expected<ConsoleMatch>>
Console::wait(ConsolePattern pattern, std::chrono::milliseconds timeout, std::uint64_t from)
{
    auto self = shared_from_this();
    if (options_.ring_size == 0) {
        co_return fail(errc::invalid_state, "console: no ring to search (its size is 0)");
    }
    auto w = std::make_shared<Waiter>(ex_, std::move(pattern), std::max(from, ring_begin()));
    if (search(*w)) {
        co_return std::move(*w->match);
    }
    if (state_ == State::closed) {
        co_return fail(errc::invalid_state, fmt::format("console: no match for '{}': {}",
                                                        w->pattern.text(), why_closed_));
    }
    const auto deadline = timeout == std::chrono::milliseconds::max()
                              ? asio::steady_timer::time_point::max()
                              : asio::steady_timer::clock_type::now() + timeout;
    waiters_.push_back(w);
    while (!w->match && state_ != State::closed &&
           asio::steady_timer::clock_type::now() < deadline) {
        w->timer.expires_at(deadline);
        error_code ec;
        co_await w->timer.async_wait(use_ec(ec));
    }
    waiters_.remove(w);
    if (w->match) {
        co_return std::move(*w->match);
    }
    if (state_ == State::closed) {
        co_return fail(errc::invalid_state, fmt::format("console: no match for '{}': {}",
                                                        w->pattern.text(), why_closed_));
    }
    co_return fail(errc::timeout, fmt::format("console: no match for '{}' within {} ms",
                                              w->pattern.text(), timeout.count()));
}

std::shared_ptr<ConsoleReader> Console::follow(std::size_t limit)
{
    // Not make_shared: the constructor is private.
    std::shared_ptr<ConsoleReader> r(new ConsoleReader(shared_from_this(), limit));
    const std::uint64_t begin = ring_begin();
    const std::uint64_t from = total_ - begin > r->limit_ ? total_ - r->limit_ : begin;
    r->buf_ = output(from);
    r->offset_ = total_ - r->buf_.size();
    readers_.push_back(r.get());
    return r;
}

void Console::check_log(bool force, std::size_t last_read)
{
    if (options_.log_path.empty() || options_.log_max == 0) {
        return;
    }
    if (!force && log_estimate_ <= options_.log_max) {
        return;
    }
    struct stat st
    {
    };
    if (::stat(options_.log_path.c_str(), &st) != 0) {
        log_estimate_ = 0;
        return;
    }
    const auto size = static_cast<std::uint64_t>(st.st_size);
    if (size > options_.log_max) {
        rotate_log(size, st.st_mode & 0666);
        log_estimate_ = 0;
    } else {
        // QEMU writes each buffer to the socket, then to the log: at most the last one it sent,
        // no more than our last read, may be missing from the log yet.
        log_estimate_ = size + last_read;
    }
}

void Console::rotate_log(std::uint64_t size, unsigned mode)
{
    // Synchronous, and bounded: the file is about log_max bytes, copied inside the kernel.
    const std::string old = options_.log_path + ".1";
    std::string why;
    if (!copy_file(options_.log_path, old, static_cast<mode_t>(mode), why)) {
        // The bound matters more than the old output (/run is memory): truncate anyway.
        spdlog::debug("console[{}]: cannot keep the old log: {}", options_.name, why);
    }
    if (::truncate(options_.log_path.c_str(), 0) != 0) {
        spdlog::debug("console[{}]: cannot truncate '{}': {}", options_.name, options_.log_path,
                      std::strerror(errno));
        return;
    }
    ++log_rotations_;
    spdlog::debug("console[{}]: log '{}' reached {} bytes: kept as '{}', truncated", options_.name,
                  options_.log_path, size, old);
}

//---- ConsoleReader ----------------------------------------------------------------------------

ConsoleReader::ConsoleReader(std::shared_ptr<Console> console, std::size_t limit)
    : console_(std::move(console))
    , limit_(std::max<std::size_t>(limit, 1))
    , timer_(console_->ex_)
{}

ConsoleReader::~ConsoleReader()
{
    cancel();
}

void ConsoleReader::cancel()
{
    if (cancelled_) {
        return;
    }
    cancelled_ = true;
    console_->readers_.remove(this);
    std::string().swap(buf_); // its memory goes now, not when the last reference does
    wake();
}

void ConsoleReader::wake()
{
    if (waiting_) {
        timer_.cancel();
    }
}

void ConsoleReader::take(const char* data, std::size_t n)
{
    buf_.append(data, n);
    // As the ring: some slack, so that dropping costs O(1) per byte on average for a reader that
    // stays behind.
    const std::size_t slack = std::max<std::size_t>(limit_ / 4, 1);
    if (buf_.size() > limit_ + slack) {
        const std::size_t drop = buf_.size() - limit_;
        buf_.erase(0, drop);
        offset_ += drop;
        lost_ += drop;
    }
    wake();
}

awaitable<expected<ConsoleChunk>> ConsoleReader::next(std::size_t max,
                                                      std::chrono::milliseconds timeout)
{
    auto self = shared_from_this();
    if (waiting_) {
        co_return fail(errc::invalid_state, "console reader: another next() is pending");
    }
    const auto deadline = timeout == std::chrono::milliseconds::max()
                              ? asio::steady_timer::time_point::max()
                              : asio::steady_timer::clock_type::now() + timeout;
    while (buf_.empty() && lost_ == 0 && !cancelled_ && !console_->is_closed() &&
           asio::steady_timer::clock_type::now() < deadline) {
        waiting_ = true;
        timer_.expires_at(deadline);
        error_code ec;
        co_await timer_.async_wait(use_ec(ec));
        waiting_ = false;
    }
    if (cancelled_) {
        co_return fail(errc::invalid_state, "console reader cancelled");
    }
    if (!buf_.empty() || lost_ > 0) {
        const std::size_t n = max == 0 ? buf_.size() : std::min(max, buf_.size());
        ConsoleChunk chunk;
        chunk.bytes = buf_.substr(0, n);
        chunk.offset = offset_;
        chunk.lost = lost_;
        buf_.erase(0, n);
        offset_ += n;
        lost_ = 0;
        co_return chunk;
    }
    if (console_->is_closed()) {
        co_return fail(errc::invalid_state, "console: " + console_->why_closed_);
    }
    co_return fail(errc::timeout,
                   fmt::format("console: no output within {} ms", timeout.count()));
}

} // namespace qm
