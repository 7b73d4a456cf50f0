// SPDX-License-Identifier: GPL-2.0-or-later
// qm::Console against a unix socket the test serves in QEMU's place: the ring and offsets,
// substring and regex waits split at every byte, timeouts, the end of the connection, ordered
// writes, readers following the output (history first, bounded for slow readers, the end, cancel),
// and the bound on the console log (the test appends to the log as QEMU would).
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/asio.hpp"
#include "libmachine/machine/console.hpp"
#include "tests/support/loop.hpp"

namespace qm {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using test::run_co;
using test::run_until;

std::string describe(const Error& e)
{
    return std::string(to_string(static_cast<errc>(e.code.value()))) + ": " + e.message;
}

std::string read_file(const fs::path& path)
{
    std::ifstream f(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// An operation (a wait(), a reader's next()) running on the loop while the test feeds the socket.
template <typename T>
struct Pending
{
    bool done = false;
    std::optional<expected<T>> result;
};

template <typename T>
awaitable<void> store(awaitable<expected<T>> op, std::shared_ptr<Pending<T>> p)
{
    p->result.emplace(co_await std::move(op));
}

class ConsoleTest : public testing::Test
{
protected:
    void TearDown() override
    {
        if (console_) {
            console_->close();
        }
        ioc_.restart();
        ioc_.poll(); // the reader sees its socket closed and lets the console go
        console_.reset();
        for (int fd : {peer_, listen_fd_}) {
            if (fd >= 0) {
                ::close(fd);
            }
        }
        std::error_code ec;
        fs::remove(path_, ec);
        fs::remove(log_, ec);
        fs::remove(log_.string() + ".1", ec);
    }

    // Serves the socket, connects a console with `options` to it and accepts the connection.
    void start(ConsoleOptions options = {})
    {
        listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        ASSERT_GE(listen_fd_, 0);
        sockaddr_un sa{};
        sa.sun_family = AF_UNIX;
        path_.copy(sa.sun_path, sizeof(sa.sun_path) - 1);
        ASSERT_EQ(::bind(listen_fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
        ASSERT_EQ(::listen(listen_fd_, 1), 0);
        options.name = "console-test";
        console_ = Console::create(ioc_.get_executor(), std::move(options));
        auto connected = run_co(ioc_, console_->connect(path_));
        ASSERT_TRUE(connected) << describe(connected.error());
        EXPECT_TRUE(console_->is_connected());
        peer_ = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC); // already queued
        ASSERT_GE(peer_, 0);
    }

    // Writes `bytes` as QEMU would and runs the loop until the console has read them all: each
    // call is one read on the console's side.
    void feed(std::string_view bytes)
    {
        const auto target = console_->offset() + bytes.size();
        ASSERT_EQ(::send(peer_, bytes.data(), bytes.size(), MSG_NOSIGNAL),
                  static_cast<ssize_t>(bytes.size()));
        ASSERT_TRUE(run_until(
            ioc_, [&] { return console_->offset() >= target; }, 10s));
        ASSERT_EQ(console_->offset(), target);
    }

    // Starts `op` and runs the loop until it waits (or completed at once).
    template <typename T>
    std::shared_ptr<Pending<T>> spawn(awaitable<expected<T>> op)
    {
        auto p = std::make_shared<Pending<T>>();
        asio::co_spawn(ioc_, store(std::move(op), p), [p](const std::exception_ptr& e) {
            p->done = true;
            if (e) {
                ADD_FAILURE() << "the console operation threw";
            }
        });
        ioc_.restart();
        ioc_.poll();
        return p;
    }

    std::shared_ptr<Pending<ConsoleMatch>>
    start_wait(ConsolePattern pattern, std::chrono::milliseconds timeout, std::uint64_t from = 0)
    {
        return spawn(console_->wait(std::move(pattern), timeout, from));
    }

    std::shared_ptr<Pending<ConsoleChunk>> start_read(const std::shared_ptr<ConsoleReader>& reader,
                                                      std::size_t max = 0,
                                                      std::chrono::milliseconds timeout = 60s)
    {
        return spawn(reader->next(max, timeout));
    }

    template <typename T>
    expected<T> finish(const std::shared_ptr<Pending<T>>& p, std::chrono::milliseconds deadline = 10s)
    {
        if (!run_until(
                ioc_, [&] { return p->done; }, deadline)) {
            ADD_FAILURE() << "the console operation did not finish";
            return fail(errc::timeout, "test deadline");
        }
        return std::move(*p->result);
    }

    // Everything the peer can read now and until `done(received)` holds.
    std::string receive_until(const std::function<bool(const std::string&)>& done)
    {
        std::string got;
        run_until(
            ioc_,
            [&] {
                char buf[65536];
                for (;;) {
                    const ssize_t n = ::recv(peer_, buf, sizeof(buf), MSG_DONTWAIT);
                    if (n <= 0) {
                        break;
                    }
                    got.append(buf, static_cast<std::size_t>(n));
                }
                return done(got);
            },
            10s);
        return got;
    }

    asio::io_context ioc_{1};
    std::string path_ = (fs::temp_directory_path() / "console-test.sock").string();
    fs::path log_ = fs::temp_directory_path() / "console-test.log";
    int listen_fd_ = -1;
    int peer_ = -1;
    std::shared_ptr<Console> console_;
};

TEST_F(ConsoleTest, RingKeepsTheLastBytesAndTheOffsetCountsEveryByte)
{
    ConsoleOptions options;
    options.ring_size = 16;
    start(options);
    EXPECT_EQ(console_->offset(), 0U);
    EXPECT_EQ(console_->output(), "");
    feed("0123456789");
    EXPECT_EQ(console_->output(), "0123456789");
    feed("abcdefghij");
    EXPECT_EQ(console_->offset(), 20U);
    EXPECT_EQ(console_->ring_begin(), 4U);
    EXPECT_EQ(console_->output(), "456789abcdefghij");
    EXPECT_EQ(console_->output(15), "fghij");
    EXPECT_EQ(console_->output(2), "456789abcdefghij") << "offsets before the ring give the ring";
    EXPECT_EQ(console_->output(25), "");
    // Many reads, each past the slack: the ring is always exactly the last 16 bytes.
    std::string all = "0123456789abcdefghij";
    for (int i = 0; i < 50; ++i) {
        const std::string chunk =
            std::string(static_cast<std::size_t>(i % 7 + 1), static_cast<char>('A' + i % 26));
        feed(chunk);
        all += chunk;
        ASSERT_EQ(console_->output(), all.substr(all.size() - 16)) << "after read " << i;
    }
    EXPECT_EQ(console_->offset(), all.size());
}

TEST_F(ConsoleTest, SubstringSplitAtEveryByteIsFoundAtItsOffsets)
{
    start();
    const std::string text = "[ 1.0] noise\r\nqmtest: ready\r\n";
    const std::string needle = "qmtest: ready";
    for (std::size_t split = 0; split <= text.size(); ++split) {
        const auto from = console_->offset();
        auto p = start_wait(needle, 10s, from);
        ASSERT_FALSE(p->done) << "split " << split;
        if (split > 0) {
            feed(text.substr(0, split));
        }
        if (split < text.size()) {
            feed(text.substr(split));
        }
        auto m = finish(p);
        ASSERT_TRUE(m) << "split " << split << ": " << describe(m.error());
        EXPECT_EQ(m->text, needle);
        EXPECT_EQ(m->begin, from + text.find(needle)) << "split " << split;
        EXPECT_EQ(m->end, m->begin + needle.size());
    }
}

TEST_F(ConsoleTest, RegexSplitAtEveryByteMatchesWithinOneLine)
{
    start();
    auto pattern = ConsolePattern::regex(R"(^qmtest: uptime ([0-9]+)\.[0-9]+$)");
    ASSERT_TRUE(pattern) << describe(pattern.error());
    const std::string text = "qmtest: uptime x\r\nqmtest: uptime 12.5\r\nafter\r\n";
    for (std::size_t split = 0; split <= text.size(); ++split) {
        const auto from = console_->offset();
        auto p = start_wait(*pattern, 10s, from);
        if (split > 0) {
            feed(text.substr(0, split));
        }
        if (split < text.size()) {
            feed(text.substr(split));
        }
        auto m = finish(p);
        ASSERT_TRUE(m) << "split " << split << ": " << describe(m.error());
        EXPECT_EQ(m->text, "qmtest: uptime 12.5") << "split " << split;
        EXPECT_EQ(m->begin, from + text.find("qmtest: uptime 12"));
    }
}

TEST_F(ConsoleTest, RegexDoesNotSpanLinesButMatchesALineStillBeingWritten)
{
    start();
    auto across = ConsolePattern::regex("a.b");
    ASSERT_TRUE(across);
    feed("xa\nbx\n");
    auto none = run_co(ioc_, console_->wait(*across, 50ms));
    ASSERT_FALSE(none);
    EXPECT_TRUE(none.error().is(errc::timeout)) << describe(none.error());
    // A prompt has no newline yet: it matches as soon as it is there.
    auto prompt = ConsolePattern::regex("login: $");
    ASSERT_TRUE(prompt);
    auto p = start_wait(*prompt, 10s);
    feed("debian login");
    EXPECT_FALSE(p->done);
    feed(": ");
    auto m = finish(p);
    ASSERT_TRUE(m) << describe(m.error());
    EXPECT_EQ(m->text, "login: ");
    EXPECT_EQ(m->begin, 6U + 7U);
    // A substring may span lines.
    auto span = run_co(ioc_, console_->wait("a\nb", 1s));
    ASSERT_TRUE(span) << describe(span.error());
    EXPECT_EQ(span->begin, 1U);
}

TEST_F(ConsoleTest, WaitSearchesTheRingFirstAndFromExcludesOlderOutput)
{
    start();
    feed("hello\r\n");
    auto old = run_co(ioc_, console_->wait("hello", 1s));
    ASSERT_TRUE(old) << describe(old.error());
    EXPECT_EQ(old->begin, 0U);
    EXPECT_EQ(old->end, 5U);
    const auto from = console_->offset();
    auto p = start_wait("hello", 10s, from);
    EXPECT_FALSE(p->done) << "the old hello is before `from`";
    feed("hello again\r\n");
    auto m = finish(p);
    ASSERT_TRUE(m) << describe(m.error());
    EXPECT_EQ(m->begin, from);
    // An offset still ahead of the output: only what comes from there on counts.
    const auto ahead = console_->offset() + 3;
    auto later = start_wait("abc", 10s, ahead);
    feed("abcabc");
    auto found = finish(later);
    ASSERT_TRUE(found) << describe(found.error());
    EXPECT_EQ(found->begin, ahead);
    // Waiting again from a match's end finds the next one only.
    auto next = run_co(ioc_, console_->wait("hello", 50ms, m->end));
    ASSERT_FALSE(next);
    EXPECT_TRUE(next.error().is(errc::timeout));
}

TEST_F(ConsoleTest, WaitTimesOutWithTimeoutAfterItsDeadline)
{
    start();
    feed("something else\n");
    const auto start_time = std::chrono::steady_clock::now();
    auto r = run_co(ioc_, console_->wait("never", 100ms));
    const auto elapsed = std::chrono::steady_clock::now() - start_time;
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::timeout)) << describe(r.error());
    EXPECT_NE(r.error().message.find("never"), std::string::npos) << r.error().message;
    EXPECT_GE(elapsed, 100ms);
    // The waiter is gone: later output does not disturb anything.
    feed("never\n");
}

TEST_F(ConsoleTest, TheEndOfTheConnectionFailsPendingWaitsAndWritesAtOnce)
{
    start();
    feed("last words\n");
    auto p = start_wait("never", 60s);
    ::shutdown(peer_, SHUT_RDWR);
    const auto start_time = std::chrono::steady_clock::now();
    auto r = finish(p);
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::invalid_state)) << describe(r.error());
    EXPECT_LT(std::chrono::steady_clock::now() - start_time, 5s);
    EXPECT_TRUE(console_->is_closed());
    EXPECT_EQ(console_->output(), "last words\n") << "the ring stays readable";
    auto w = run_co(ioc_, console_->write("x"));
    ASSERT_FALSE(w);
    EXPECT_TRUE(w.error().is(errc::invalid_state)) << describe(w.error());
    // What the ring holds still matches; anything else fails at once.
    EXPECT_TRUE(run_co(ioc_, console_->wait("last", 1s)));
    auto gone = run_co(ioc_, console_->wait("more", 60s), 5s);
    ASSERT_FALSE(gone);
    EXPECT_TRUE(gone.error().is(errc::invalid_state));
}

TEST_F(ConsoleTest, CloseFailsPendingWaits)
{
    start();
    auto p = start_wait("never", 60s);
    console_->close();
    auto r = finish(p, 5s);
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::invalid_state)) << describe(r.error());
}

TEST_F(ConsoleTest, ConcurrentWritesArriveWholeAndInCallOrder)
{
    start();
    // Bigger than the socket buffers: the first write waits for the peer to read, and the others
    // queue behind it.
    const std::string a(std::size_t{300} * 1024, 'a');
    const std::string b = "b\n";
    const std::string c(std::size_t{300} * 1024, 'c');
    int finished = 0;
    for (const std::string* s : {&a, &b, &c}) {
        asio::co_spawn(ioc_, console_->write(*s),
                       [&](const std::exception_ptr& e, const expected<void>& r) {
                           EXPECT_FALSE(e);
                           EXPECT_TRUE(r) << describe(r.error());
                           ++finished;
                       });
    }
    const std::string want = a + b + c;
    const std::string got =
        receive_until([&](const std::string& s) { return s.size() >= want.size(); });
    EXPECT_TRUE(got == want) << "received " << got.size() << " bytes, not a+b+c in order";
    EXPECT_TRUE(run_until(ioc_, [&] { return finished == 3; }));
}

TEST_F(ConsoleTest, ABadRegexIsInvalidArgument)
{
    auto r = ConsolePattern::regex("(unclosed");
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::invalid_argument)) << describe(r.error());
    EXPECT_NE(r.error().message.find("(unclosed"), std::string::npos);
}

TEST_F(ConsoleTest, RingSizeZeroKeepsNothingButCountsAndRefusesWaits)
{
    ConsoleOptions options;
    options.ring_size = 0;
    start(options);
    feed("qmtest: ready\n");
    EXPECT_EQ(console_->offset(), 14U);
    EXPECT_EQ(console_->output(), "");
    auto r = run_co(ioc_, console_->wait("ready", 1s));
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::invalid_state)) << describe(r.error());
}

TEST_F(ConsoleTest, ReadersGetTheRecentOutputFirstThenEveryByteInOrder)
{
    ConsoleOptions options;
    options.ring_size = 16;
    start(options);
    feed("0123456789abcdefghij");
    auto a = console_->follow(1024);
    auto b = console_->follow(4); // a smaller bound: only the newest 4 bytes of the ring
    EXPECT_EQ(console_->reader_count(), 2U);
    EXPECT_EQ(a->offset(), 4U);
    auto first = finish(start_read(a));
    ASSERT_TRUE(first) << describe(first.error());
    EXPECT_EQ(first->bytes, "456789abcdefghij");
    EXPECT_EQ(first->offset, 4U);
    EXPECT_EQ(first->lost, 0U);
    auto newest = finish(start_read(b));
    ASSERT_TRUE(newest) << describe(newest.error());
    EXPECT_EQ(newest->bytes, "ghij");
    EXPECT_EQ(newest->offset, 16U);
    EXPECT_EQ(newest->lost, 0U) << "the history's start is not a loss";
    b->cancel();
    auto c = console_->follow(1024);
    ASSERT_TRUE(finish(start_read(c))); // its history

    // Then every byte, split at every position, to both readers; `max` bounds a chunk.
    const std::string text = "qmtest: hello\r\nqmtest: ready\r\n";
    for (std::size_t split = 0; split <= text.size(); ++split) {
        SCOPED_TRACE(split);
        const std::uint64_t from = console_->offset();
        auto pending = start_read(a);
        EXPECT_FALSE(pending->done) << "nothing new yet: it waits";
        if (split > 0) {
            feed(text.substr(0, split));
        }
        if (split < text.size()) {
            feed(text.substr(split));
        }
        auto got = finish(pending);
        ASSERT_TRUE(got) << describe(got.error());
        EXPECT_EQ(got->offset, from);
        std::string all = got->bytes;
        while (all.size() < text.size()) {
            auto more = finish(start_read(a));
            ASSERT_TRUE(more) << describe(more.error());
            EXPECT_EQ(more->offset, from + all.size());
            all += more->bytes;
        }
        EXPECT_EQ(all, text);
        std::string small;
        while (small.size() < text.size()) {
            auto piece = finish(start_read(c, 5));
            ASSERT_TRUE(piece) << describe(piece.error());
            ASSERT_LE(piece->bytes.size(), 5U);
            EXPECT_EQ(piece->lost, 0U);
            small += piece->bytes;
        }
        EXPECT_EQ(small, text);
    }
    EXPECT_EQ(a->offset(), console_->offset());
    EXPECT_EQ(c->offset(), console_->offset());
}

TEST_F(ConsoleTest, ANextWithNothingNewTimesOutAndOnlyOneMayWait)
{
    start();
    auto r = console_->follow(1024);
    auto pending = start_read(r, 0, 60s);
    auto second = run_co(ioc_, r->next(0, 1s));
    ASSERT_FALSE(second);
    EXPECT_TRUE(second.error().is(errc::invalid_state)) << describe(second.error());
    feed("x");
    auto got = finish(pending);
    ASSERT_TRUE(got) << describe(got.error());
    EXPECT_EQ(got->bytes, "x");
    const auto t0 = std::chrono::steady_clock::now();
    auto none = run_co(ioc_, r->next(0, 100ms));
    ASSERT_FALSE(none);
    EXPECT_TRUE(none.error().is(errc::timeout)) << describe(none.error());
    EXPECT_GE(std::chrono::steady_clock::now() - t0, 100ms);
}

TEST_F(ConsoleTest, ASlowReaderLosesTheOldestBytesIsToldHowManyAndStaysBounded)
{
    start();
    auto slow = console_->follow(100);
    auto fast = console_->follow(100);
    std::string all;
    std::string fast_got;
    for (int i = 0; i < 200; ++i) {
        const std::string line = fmt::format("line {:03}\n", i); // 9 bytes, one read each
        feed(line);
        all += line;
        // The bound holds whenever the reader falls behind: the limit, its slack, one read.
        ASSERT_LE(slow->pending(), 100U + 25U + 4096U);
        auto f = finish(start_read(fast));
        ASSERT_TRUE(f) << describe(f.error());
        EXPECT_EQ(f->lost, 0U) << "a reader that keeps up loses nothing";
        fast_got += f->bytes;
    }
    EXPECT_EQ(fast_got, all);
    auto got = finish(start_read(slow));
    ASSERT_TRUE(got) << describe(got.error());
    EXPECT_GT(got->lost, 0U);
    EXPECT_GE(got->bytes.size(), 100U);
    EXPECT_EQ(got->offset, got->lost) << "it lost everything before its first byte";
    EXPECT_EQ(got->lost + got->bytes.size(), all.size());
    EXPECT_EQ(got->bytes, all.substr(got->lost));
    // Told once: the next chunk starts where this one ended.
    feed("more");
    auto after = finish(start_read(slow));
    ASSERT_TRUE(after) << describe(after.error());
    EXPECT_EQ(after->lost, 0U);
    EXPECT_EQ(after->bytes, "more");
}

TEST_F(ConsoleTest, AReaderGetsWhatIsLeftThenTheEndWithItsReason)
{
    start();
    auto r = console_->follow(1024);
    auto pending = start_read(r, 3);
    feed("last words");
    console_->close("the machine is stopping");
    auto first = finish(pending);
    ASSERT_TRUE(first) << describe(first.error());
    EXPECT_EQ(first->bytes, "las");
    auto rest = finish(start_read(r));
    ASSERT_TRUE(rest) << describe(rest.error());
    EXPECT_EQ(rest->bytes, "t words");
    auto end = finish(start_read(r));
    ASSERT_FALSE(end);
    EXPECT_TRUE(end.error().is(errc::invalid_state)) << describe(end.error());
    EXPECT_NE(end.error().message.find("the machine is stopping"), std::string::npos)
        << end.error().message;
    EXPECT_EQ(console_->why_closed(), "the machine is stopping");
    // A waiting reader is woken by the end of the connection, as waits are; a reader of a
    // closed console gets the ring first.
    auto late = console_->follow(1024);
    auto ring = finish(start_read(late));
    ASSERT_TRUE(ring) << describe(ring.error());
    EXPECT_EQ(ring->bytes, "last words");
    EXPECT_FALSE(run_co(ioc_, late->next(0, 60s), 5s));
}

TEST_F(ConsoleTest, TheEndOfTheConnectionWakesAWaitingReader)
{
    start();
    auto r = console_->follow(1024);
    auto pending = start_read(r);
    ::shutdown(peer_, SHUT_RDWR);
    auto end = finish(pending, 5s);
    ASSERT_FALSE(end);
    EXPECT_TRUE(end.error().is(errc::invalid_state)) << describe(end.error());
    EXPECT_NE(end.error().message.find("QEMU closed it"), std::string::npos) << end.error().message;
}

TEST_F(ConsoleTest, CancelEndsAPendingNextAndStopsBuffering)
{
    start();
    auto r = console_->follow(1024);
    auto keeps = console_->follow(1024);
    auto pending = start_read(r);
    r->cancel();
    auto end = finish(pending, 5s);
    ASSERT_FALSE(end);
    EXPECT_TRUE(end.error().is(errc::invalid_state)) << describe(end.error());
    EXPECT_TRUE(r->cancelled());
    EXPECT_EQ(console_->reader_count(), 1U);
    feed("after");
    EXPECT_EQ(r->pending(), 0U);
    EXPECT_FALSE(run_co(ioc_, r->next(0, 1s)));
    EXPECT_EQ(keeps->pending(), 5U);
    keeps.reset(); // dropping a reader stops it too
    EXPECT_EQ(console_->reader_count(), 0U);
}

TEST_F(ConsoleTest, RingSizeZeroStillFeedsReadersLive)
{
    ConsoleOptions options;
    options.ring_size = 0;
    start(options);
    feed("before\n");
    auto r = console_->follow(1024);
    EXPECT_EQ(r->offset(), 7U);
    auto pending = start_read(r);
    EXPECT_FALSE(pending->done) << "no history without a ring";
    feed("live\n");
    auto got = finish(pending);
    ASSERT_TRUE(got) << describe(got.error());
    EXPECT_EQ(got->bytes, "live\n");
    EXPECT_EQ(got->offset, 7U);
}

TEST_F(ConsoleTest, ConnectToAMissingSocketFailsAndMayBeRetried)
{
    console_ = Console::create(ioc_.get_executor(), {});
    auto r = run_co(ioc_, console_->connect(path_));
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::connect_failed)) << describe(r.error());
    EXPECT_FALSE(console_->is_connected());
    EXPECT_FALSE(console_->is_closed());
    auto again = run_co(ioc_, console_->connect(path_));
    EXPECT_TRUE(again.error().is(errc::connect_failed)) << "a second attempt is allowed";
}

TEST_F(ConsoleTest, TheLogIsCopiedAndTruncatedPastItsBound)
{
    // The test plays QEMU: the log opened with O_APPEND (logappend=on), every byte written to the
    // log after the socket.
    {
        std::ofstream old(log_, std::ios::binary);
        old << std::string(150, 'o'); // a previous run's log, over the bound already
    }
    const int log = ::open(log_.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
    ASSERT_GE(log, 0);
    ConsoleOptions options;
    options.log_path = log_.string();
    options.log_max = 100;
    start(options);
    EXPECT_EQ(console_->log_rotations(), 1U) << "checked at connect";
    EXPECT_EQ(fs::file_size(log_), 0U);
    EXPECT_EQ(read_file(log_.string() + ".1"), std::string(150, 'o'));

    auto emit = [&](const std::string& s) {
        feed(s);
        ASSERT_EQ(::write(log, s.data(), s.size()), static_cast<ssize_t>(s.size()));
    };
    emit(std::string(60, 'a'));
    emit(std::string(30, 'b'));
    EXPECT_EQ(console_->log_rotations(), 1U) << "90 bytes: under the bound";
    EXPECT_EQ(fs::file_size(log_), 90U);
    // QEMU writes the log after the socket: this read sees 90 bytes on disk, the next one 120.
    emit(std::string(30, 'c'));
    emit("d");
    EXPECT_EQ(console_->log_rotations(), 2U);
    EXPECT_EQ(read_file(log_.string() + ".1"),
              std::string(60, 'a') + std::string(30, 'b') + std::string(30, 'c'));
    // O_APPEND: the writer goes on at the new end, no hole.
    EXPECT_EQ(read_file(log_), "d");
    emit("e");
    EXPECT_EQ(read_file(log_), "de");
    ::close(log);
}

TEST_F(ConsoleTest, ALogThatCannotBeKeptIsStillTruncated)
{
    {
        std::ofstream old(log_, std::ios::binary);
        old << std::string(200, 'o');
    }
    fs::create_directory(log_.string() + ".1"); // the copy cannot be made
    ConsoleOptions options;
    options.log_path = log_.string();
    options.log_max = 100;
    start(options);
    EXPECT_EQ(fs::file_size(log_), 0U);
    EXPECT_EQ(console_->log_rotations(), 1U);
    fs::remove(log_.string() + ".1");
}

} // namespace
} // namespace qm
