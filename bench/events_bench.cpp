// SPDX-License-Identifier: GPL-2.0-or-later
// events-bench: the real qmachined's event stream (`GET /v1/events`, Server-Sent Events) fanned
// out to 50 subscribers while 20 machines make 10,000 events (QMP stop/cont through REST): none
// lost, the time and the daemon's CPU, against the same stop/cont sent straight to bare QEMUs (the
// floor); meanwhile the QMP latency of an unrelated machine through REST, idle and during the
// fan-out, against a bare QEMU asked directly. Not a test: it prints figures (bench/README.md).
#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <stop_token>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <fmt/format.h>

#include "bench/daemon.hpp" // includes libmachine/asio.hpp first (trap 1)
#include "bench/floor.hpp"
#include "bench/stats.hpp"
#include "libmachine/json.hpp"
#include "libmachine/proc/spawn.hpp"
#include "tests/support/loop.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;
namespace asio = qm::asio;
namespace beast = qm::rest::beast;
namespace http = qm::rest::http;
using qm::awaitable;
using qm::error_code;
using qm::use_ec;
using qm::bench::BareQemu;
using qm::bench::BareQemus;
using qm::bench::Daemon;
using qm::bench::die;
using qm::bench::elapsed_ms;
using qm::bench::errno_text;
using qm::bench::make_request;
using qm::bench::percentile;
using qm::bench::processes_sched;
using qm::bench::Request;
using Local = asio::local::stream_protocol;

// The issue's target: the probe machine's QMP latency through REST during the fan-out at most this
// many times its idle latency.
constexpr double latency_target = 2.0;
// What a stop + cont pair publishes: QEMU's STOP and RESUME, and the daemon's STATE_CHANGED
// paused and running.
constexpr std::uint64_t events_per_pair = 4;
constexpr std::uint64_t qmp_events_per_pair = 2;
// The daemon's limit on each machine's QMP events (daemon/supervisor/events.hpp,
// EventBusOptions: 200/s on average, bursts of 400; beyond it they are dropped and EVENTS_DROPPED
// is published). The sources keep 10 % below both, so that every event they cause is published.
constexpr double qmp_rate_per_s = 200 * 0.9;
constexpr double qmp_burst = 400 * 0.9;
// The probe: unrecorded at first (its connection, caches), then the idle window.
constexpr auto probe_warm_up = 100ms;
constexpr auto idle_window = 1000ms;
// The probe's answer or a subscriber's handshake; only a hang reaches it.
constexpr int io_timeout_ms = 10000;
// Connections creating and starting the machines at set-up.
constexpr std::size_t setup_connections = 8;

constexpr std::string_view stop_body = R"({"execute":"stop"})";
constexpr std::string_view cont_body = R"({"execute":"cont"})";
constexpr std::string_view probe_name = "probe";

struct Args
{
    int subscribers = 50;
    int events = 10000;
    int sources = 20;
    int trials = 3;
    int rate = 0; // events/s of all sources together; 0: as fast as they go
};

std::string source_name(std::size_t i)
{
    return fmt::format("s{:02}", i);
}

const char* verdict(bool pass)
{
    return pass ? "PASS" : "FAIL";
}

// A descriptor of ours, closed with it.
class Fd
{
public:
    explicit Fd(int fd = -1)
        : fd_(fd)
    {}
    Fd(Fd&& o) noexcept
        : fd_(std::exchange(o.fd_, -1))
    {}
    Fd& operator=(Fd&& o) noexcept
    {
        std::swap(fd_, o.fd_);
        return *this;
    }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd()
    {
        if (fd_ >= 0) {
            ::close(fd_);
        }
    }
    int get() const noexcept { return fd_; }

private:
    int fd_;
};

// A blocking connection to the unix socket at `path`.
Fd connect_unix(const std::string& path)
{
    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::memcpy(sa.sun_path, path.c_str(), std::min(path.size() + 1, sizeof(sa.sun_path) - 1));
    if (fd.get() < 0 ||
        ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&sa), sizeof(sa)) != 0) {
        die(errno_text("connect to " + path));
    }
    return fd;
}

// Writes all of `bytes` (the socket may be nonblocking: Asio makes its own so); false on failure.
bool send_all(int fd, std::string_view bytes)
{
    while (!bytes.empty()) {
        const ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
        if (n > 0) {
            bytes.remove_prefix(static_cast<std::size_t>(n));
        } else if (n < 0 && errno == EAGAIN) {
            pollfd p{fd, POLLOUT, 0};
            ::poll(&p, 1, io_timeout_ms);
        } else if (n < 0 && errno != EINTR) {
            return false;
        }
    }
    return true;
}

// Appends what `fd` has to `in`, waiting for it up to the I/O timeout (blocking or not, the
// socket never blocks us longer); false at EOF, on an error or after the timeout.
bool recv_some(int fd, std::string& in)
{
    std::array<char, 16384> buf{};
    for (;;) {
        pollfd p{fd, POLLIN, 0};
        const int ready = ::poll(&p, 1, io_timeout_ms);
        if (ready == 0) {
            return false;
        }
        const ssize_t n = ready < 0 ? -1 : ::recv(fd, buf.data(), buf.size(), 0);
        if (n > 0) {
            in.append(buf.data(), static_cast<std::size_t>(n));
            return true;
        }
        if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
            return false;
        }
    }
}

//---- the sources: stop/cont pairs, paced below the daemon's rate limit -------------------------

// One source's pace: its share of its machine's QMP event budget, as the daemon counts it (a token
// bucket, full at first, with the margins above; kept across trials as the daemon keeps its own),
// and with --rate its schedule (a pair every `interval`, from the trial's start).
struct Bucket
{
    double tokens = qmp_burst;
    Clock::time_point at = Clock::now();
    std::size_t waits = 0; // times a source waited for its budget
    Clock::duration interval{};
    Clock::time_point next{};

    // Takes `n` QMP events; returns how long to wait before causing them (zero when they fit).
    Clock::duration take(double n)
    {
        const auto now = Clock::now();
        tokens = std::min(qmp_burst, tokens + std::chrono::duration<double>(now - at).count() *
                                                  qmp_rate_per_s);
        at = now;
        tokens -= n;
        if (tokens >= 0) {
            return Clock::duration::zero();
        }
        ++waits;
        return std::chrono::duration_cast<Clock::duration>(
            std::chrono::duration<double>(-tokens / qmp_rate_per_s));
    }
};

using Buckets = std::vector<Bucket>;

// Starts the sources' schedules now, spread over one interval: an even stream of events, not
// bursts of one pair from every source at once.
void start_schedules(Buckets& buckets)
{
    const auto now = Clock::now();
    for (std::size_t k = 0; k < buckets.size(); ++k) {
        buckets[k].next =
            now + buckets[k].interval * static_cast<long>(k) / static_cast<long>(buckets.size());
    }
}

// Waits for source `index`'s turn (with --rate) and budget for one more pair.
awaitable<void> pace(std::shared_ptr<Buckets> buckets, std::size_t index)
{
    Bucket& b = (*buckets)[index];
    asio::steady_timer timer(co_await asio::this_coro::executor);
    error_code ec;
    if (b.interval > Clock::duration::zero()) {
        // A source that fell behind goes on from now, without a burst to catch up.
        const auto at = std::max(b.next, Clock::now());
        b.next = at + b.interval;
        timer.expires_at(at);
        co_await timer.async_wait(use_ec(ec));
    }
    if (const auto wait = b.take(qmp_events_per_pair); wait > Clock::duration::zero()) {
        timer.expires_after(wait);
        co_await timer.async_wait(use_ec(ec));
    }
}

// `pairs` stop/cont pairs on machine `name` through REST QMP passthrough, over one keep-alive
// connection, each request when the previous answer arrived.
awaitable<qm::expected<void>> rest_source(std::string socket_path, std::string name,
                                          std::size_t pairs, std::shared_ptr<Buckets> buckets,
                                          std::size_t index)
{
    Local::socket socket(co_await asio::this_coro::executor);
    if (auto c = co_await qm::bench::connect(socket, socket_path); !c) {
        co_return qm::fail(c.error());
    }
    beast::flat_buffer buffer;
    const std::string target = "/v1/machines/" + name + "/qmp";
    const std::array<Request, 2> requests{make_request(http::verb::post, target, stop_body),
                                          make_request(http::verb::post, target, cont_body)};
    for (std::size_t i = 0; i < pairs; ++i) {
        co_await pace(buckets, index);
        for (const Request& req : requests) {
            auto reply = co_await qm::bench::exchange(socket, buffer, req);
            if (!reply) {
                co_return qm::fail(reply.error());
            }
            if (reply->status != 200 || !reply->body.starts_with("{\"return\":")) {
                co_return qm::fail(qm::errc::qmp_protocol,
                                   fmt::format("{} {}: {} {}", target, req.body(), reply->status,
                                               reply->body.substr(0, 300)));
            }
        }
    }
    error_code ec;
    socket.close(ec);
    co_return qm::expected<void>{};
}

// The floor's source: the same pairs written straight to bare QEMU `index`'s monitor; each reply
// read to '\n', the STOP and RESUME before it counted. It must see exactly one event per command.
awaitable<qm::expected<void>> floor_source(std::shared_ptr<BareQemus> floors, std::size_t index,
                                           std::size_t pairs, std::shared_ptr<Buckets> buckets)
{
    BareQemu* q = (*floors)[index].get();
    std::size_t events = 0;
    error_code ec;
    for (std::size_t i = 0; i < pairs; ++i) {
        co_await pace(buckets, index);
        for (const std::string_view line :
             {"{\"execute\":\"stop\"}\n", "{\"execute\":\"cont\"}\n"}) {
            co_await asio::async_write(*q->socket, asio::buffer(line), use_ec(ec));
            if (ec) {
                co_return qm::fail(qm::errc::qmp_disconnected, "floor: write: " + ec.message());
            }
            auto reply = co_await qm::bench::read_reply(q, &events);
            if (!reply) {
                co_return qm::fail(reply.error());
            }
            if (reply->find("\"return\"") == std::string::npos) {
                co_return qm::fail(qm::errc::qmp_command_failed, "floor: " + reply->substr(0, 300));
            }
        }
    }
    if (events < qmp_events_per_pair * pairs) {
        // QEMU 7.2 sends STOP and RESUME before the replies; were one late, it comes before the
        // reply to one more command.
        const std::string_view status = "{\"execute\":\"query-status\"}\n";
        co_await asio::async_write(*q->socket, asio::buffer(status), use_ec(ec));
        auto reply = co_await qm::bench::read_reply(q, &events);
        if (ec || !reply) {
            co_return qm::fail(qm::errc::qmp_disconnected, "floor: query-status failed");
        }
    }
    if (events != qmp_events_per_pair * pairs) {
        co_return qm::fail(qm::errc::qmp_protocol,
                           fmt::format("floor: {} events for {} stop/cont pairs", events, pairs));
    }
    co_return qm::expected<void>{};
}

//---- the subscribers: SSE over chunked HTTP/1.1, one epoll loop --------------------------------

// The sequence numbers one fan-out publishes, first to last (0: not known yet). Set by the main
// thread before the first source request, read by the subscribers' thread.
struct Expected
{
    std::atomic<std::uint64_t> first{0};
    std::atomic<std::uint64_t> last{0};
};

// The kinds of message the fan-out may bring.
enum class Kind { none, stop, resume, state_changed, lagged, other };

Kind kind_of(std::string_view name)
{
    if (name == "STOP") {
        return Kind::stop;
    }
    if (name == "RESUME") {
        return Kind::resume;
    }
    if (name == "STATE_CHANGED") {
        return Kind::state_changed;
    }
    return name == "lagged" ? Kind::lagged : Kind::other;
}

// One subscriber: its connection, the decoders, and what it saw of the fan-out.
struct Subscriber
{
    enum class Chunk { size, data, crlf };

    Fd fd;
    // HTTP/1.1 chunked coding (RFC 9112 7.1): received and not yet decoded; the decoder's state.
    std::string raw;
    Chunk chunk = Chunk::size;
    std::size_t chunk_left = 0;
    bool ended = false; // the last chunk came
    // Server-Sent Events (WHATWG HTML 9.2.6): decoded text not yet parsed (a partial line), and
    // the message being parsed.
    std::string text;
    bool subscribed = false; // ": subscribed" came
    std::optional<std::uint64_t> id;
    Kind kind = Kind::none;
    std::string name; // of a message that is not one of the fan-out's
    std::string data; // ditto
    // The fan-out.
    std::uint64_t next = 0;                // the id expected next
    std::uint64_t early = 0;               // events before it (none expected either)
    std::array<std::uint64_t, 3> counts{}; // STOP, RESUME, STATE_CHANGED
    bool done = false;                     // it got the last event, and every one before it
    Clock::time_point done_at{};
    std::string error; // the first thing wrong; the rest of its stream is not read

    bool finished() const { return done || !error.empty(); }
};

// Decodes what `s.raw` holds of the chunked body into `s.text`.
void dechunk(Subscriber& s)
{
    std::size_t at = 0;
    bool more = true;
    while (more && at < s.raw.size() && s.error.empty() && !s.ended) {
        switch (s.chunk) {
        case Subscriber::Chunk::size: {
            const auto eol = s.raw.find("\r\n", at);
            if (eol == std::string::npos) {
                more = false;
                break;
            }
            std::size_t n = 0;
            const char* b = s.raw.data() + at;
            const auto [end, ec] = std::from_chars(b, s.raw.data() + eol, n, 16);
            if (ec != std::errc{} || (end != s.raw.data() + eol && *end != ';')) {
                s.error =
                    "bad chunk size line: " + s.raw.substr(at, std::min<std::size_t>(eol - at, 40));
                break;
            }
            at = eol + 2;
            s.ended = n == 0;
            s.chunk_left = n;
            s.chunk = Subscriber::Chunk::data;
            break;
        }
        case Subscriber::Chunk::data: {
            const std::size_t n = std::min(s.chunk_left, s.raw.size() - at);
            s.text.append(s.raw, at, n);
            at += n;
            s.chunk_left -= n;
            if (s.chunk_left == 0) {
                s.chunk = Subscriber::Chunk::crlf;
            }
            break;
        }
        case Subscriber::Chunk::crlf:
            if (s.raw.size() - at < 2) {
                more = false;
                break;
            }
            if (s.raw.compare(at, 2, "\r\n") != 0) {
                s.error = "a chunk does not end with CRLF";
                break;
            }
            at += 2;
            s.chunk = Subscriber::Chunk::size;
            break;
        }
    }
    s.raw.erase(0, at);
}

// A message has ended (a blank line): checks it against the fan-out's sequence numbers.
void dispatch(Subscriber& s, std::uint64_t first, std::uint64_t last, Clock::time_point now)
{
    const std::optional<std::uint64_t> id = std::exchange(s.id, std::nullopt);
    const Kind kind = std::exchange(s.kind, Kind::none);
    if (kind == Kind::lagged) {
        s.error = "lagged: " + s.data;
        return;
    }
    if (!id) {
        if (kind != Kind::none) {
            s.error = "an event without id: " + s.name;
        }
        return; // comments only
    }
    if (first == 0 || *id < first) {
        ++s.early;
        return;
    }
    if (s.next == 0) {
        s.next = first;
    }
    if (*id != s.next) {
        s.error = fmt::format("expected id {}, got {} ({} missing or out of order)", s.next, *id,
                              *id > s.next ? *id - s.next : 0);
        return;
    }
    ++s.next;
    switch (kind) {
    case Kind::stop:
        ++s.counts[0];
        break;
    case Kind::resume:
        ++s.counts[1];
        break;
    case Kind::state_changed:
        ++s.counts[2];
        break;
    default:
        s.error = fmt::format("an event the fan-out does not cause: id {} {} {}", *id, s.name,
                              s.data.substr(0, 200));
        return;
    }
    if (*id == last) {
        s.done = true;
        s.done_at = now;
    }
}

// Parses the complete lines of `s.text`.
void parse(Subscriber& s, std::uint64_t first, std::uint64_t last, Clock::time_point now)
{
    std::size_t at = 0;
    while (s.error.empty() && !s.done) {
        const auto nl = s.text.find('\n', at);
        if (nl == std::string::npos) {
            break;
        }
        std::string_view line(s.text.data() + at, nl - at);
        at = nl + 1;
        if (line.ends_with('\r')) {
            line.remove_suffix(1);
        }
        if (line.empty()) {
            dispatch(s, first, last, now);
        } else if (line.front() == ':') {
            s.subscribed = s.subscribed || line == ": subscribed"; // a comment
        } else if (line.starts_with("id: ")) {
            std::uint64_t v = 0;
            const auto [end, ec] = std::from_chars(line.data() + 4, line.data() + line.size(), v);
            if (ec != std::errc{} || end != line.data() + line.size()) {
                s.error = "bad id line: " + std::string(line);
            }
            s.id = v;
        } else if (line.starts_with("event: ")) {
            s.kind = kind_of(line.substr(7));
            if (s.kind == Kind::lagged || s.kind == Kind::other) {
                s.name = line.substr(7);
            }
        } else if (line.starts_with("data: ") &&
                   (s.kind == Kind::lagged || s.kind == Kind::other)) {
            s.data = line.substr(6); // the fan-out's own events are known by their id and name
        }
    }
    s.text.erase(0, at);
}

// Reads what `s` has; false at EOF or on an error.
bool drain(Subscriber& s)
{
    std::array<char, 65536> buf{};
    for (;;) {
        const ssize_t n = ::recv(s.fd.get(), buf.data(), buf.size(), 0);
        if (n > 0) {
            s.raw.append(buf.data(), static_cast<std::size_t>(n));
            continue;
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        return n < 0 && errno == EAGAIN;
    }
}

// `n` subscribers of GET /v1/events (no filter), each connected, its answer's head read and
// ": subscribed" seen, then made nonblocking for the epoll loop.
std::vector<Subscriber> subscribe(const std::string& socket_path, std::size_t n)
{
    const std::string_view get = "GET /v1/events HTTP/1.1\r\nHost: qmachined\r\n"
                                 "Accept: text/event-stream\r\n\r\n";
    std::vector<Subscriber> subs(n);
    for (auto& s : subs) {
        s.fd = connect_unix(socket_path);
        if (!send_all(s.fd.get(), get)) {
            die(errno_text("subscriber: send"));
        }
    }
    for (auto& s : subs) {
        std::string head;
        std::size_t end = std::string::npos;
        while ((end = head.find("\r\n\r\n")) == std::string::npos) {
            if (!recv_some(s.fd.get(), head)) {
                die("subscriber: no answer to GET /v1/events");
            }
        }
        if (!head.starts_with("HTTP/1.1 200 ") ||
            head.find("\r\nTransfer-Encoding: chunked\r\n") == std::string::npos) {
            die("GET /v1/events: " + head.substr(0, std::min<std::size_t>(end, 300)));
        }
        s.raw = head.substr(end + 4);
        for (;;) {
            dechunk(s);
            parse(s, 0, 0, Clock::now());
            if (s.subscribed || !s.error.empty() || s.ended) {
                break;
            }
            if (!recv_some(s.fd.get(), s.raw)) {
                die("subscriber: the stream ended before ': subscribed'");
            }
        }
        if (!s.subscribed) {
            die("subscriber: " + (s.error.empty() ? std::string("the stream ended") : s.error));
        }
        ::fcntl(s.fd.get(), F_SETFL, ::fcntl(s.fd.get(), F_GETFL) | O_NONBLOCK);
    }
    return subs;
}

// The subscribers' thread: one epoll loop over every stream until each has the last event (or
// went wrong), `stop` is asked for, or the deadline. Returns its CPU time, ms.
double read_subscribers(std::vector<Subscriber>& subs, const Expected& expected,
                        const std::stop_token& stop)
{
    const double cpu0 = qm::bench::thread_cpu_ms();
    const Fd epoll(::epoll_create1(EPOLL_CLOEXEC));
    for (std::size_t i = 0; i < subs.size(); ++i) {
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = i;
        ::epoll_ctl(epoll.get(), EPOLL_CTL_ADD, subs[i].fd.get(), &ev);
    }
    std::size_t finished = 0;
    const auto deadline = Clock::now() + qm::bench::op_deadline;
    std::array<epoll_event, 64> events{};
    while (finished < subs.size() && !stop.stop_requested() && qm::bench::interrupted == 0 &&
           Clock::now() < deadline) {
        const int n = ::epoll_wait(epoll.get(), events.data(), static_cast<int>(events.size()), 50);
        for (int k = 0; k < n; ++k) {
            Subscriber& s = subs[events[static_cast<std::size_t>(k)].data.u64];
            const bool open = drain(s);
            const auto now = Clock::now();
            // Loaded after the read: the first of the fan-out's events is published after the main
            // thread stored them.
            const std::uint64_t first = expected.first.load(std::memory_order_acquire);
            const std::uint64_t last = expected.last.load(std::memory_order_acquire);
            dechunk(s);
            parse(s, first, last, now);
            if (!s.finished() && (!open || s.ended)) {
                s.error = s.ended ? "the stream ended" : "the connection closed";
            }
            if (s.finished()) {
                ++finished;
                ::epoll_ctl(epoll.get(), EPOLL_CTL_DEL, s.fd.get(), nullptr);
            }
        }
    }
    return qm::bench::thread_cpu_ms() - cpu0;
}

//---- the probe: query-status through REST and straight to a bare QEMU, in turn ------------------

struct Sample
{
    Clock::time_point t0;
    Clock::time_point t1;

    double us() const { return std::chrono::duration<double, std::micro>(t1 - t0).count(); }
};

struct Probe
{
    std::vector<Sample> rest;
    std::vector<Sample> floor;
    std::string error;
};

// One request at a time, alternating: `query-status` through REST on a keep-alive connection
// (POST /v1/machines/probe/qmp, the answer read by Content-Length) and as one line straight to the
// bare QEMU's monitor (its reply read to '\n', events skipped). Both are read by the same plain
// code (poll, recv), in a thread of their own so that the subscribers' work does not delay them.
void run_probe(int rest_fd, BareQemu* floor_qemu, Probe& out, const std::stop_token& stop)
{
    const std::string body = R"({"execute":"query-status"})";
    const std::string request =
        fmt::format("POST /v1/machines/{}/qmp HTTP/1.1\r\nHost: qmachined\r\nContent-Type: "
                    "application/json\r\nContent-Length: {}\r\n\r\n{}",
                    probe_name, body.size(), body);
    const std::string_view line = "{\"execute\":\"query-status\"}\n";
    const int floor_fd = floor_qemu->socket->native_handle();
    std::string& floor_in = floor_qemu->in;
    std::string rest_in;
    while (!stop.stop_requested() && qm::bench::interrupted == 0) {
        auto t0 = Clock::now();
        if (!send_all(rest_fd, request)) {
            out.error = errno_text("probe: REST send");
            return;
        }
        std::size_t head_end = std::string::npos;
        std::size_t length = 0;
        for (;;) {
            if (head_end == std::string::npos &&
                (head_end = rest_in.find("\r\n\r\n")) != std::string::npos) {
                const auto at = rest_in.find("\r\nContent-Length: ");
                if (at == std::string::npos || at > head_end) {
                    out.error = "probe: an answer without Content-Length";
                    return;
                }
                if (std::from_chars(rest_in.data() + at + 18, rest_in.data() + head_end, length)
                        .ec != std::errc{}) {
                    out.error = "probe: a bad Content-Length";
                    return;
                }
            }
            if (head_end != std::string::npos && rest_in.size() >= head_end + 4 + length) {
                break;
            }
            if (!recv_some(rest_fd, rest_in)) {
                out.error = "probe: no REST answer";
                return;
            }
        }
        auto t1 = Clock::now();
        const std::string_view answer(rest_in.data(), head_end + 4 + length);
        if (!answer.starts_with("HTTP/1.1 200 ") ||
            answer.substr(head_end + 4).find("\"return\"") == std::string_view::npos) {
            out.error = "probe: " + std::string(answer.substr(0, 300));
            return;
        }
        rest_in.erase(0, answer.size());
        out.rest.push_back({t0, t1});

        t0 = Clock::now();
        if (!send_all(floor_fd, line)) {
            out.error = errno_text("probe: floor send");
            return;
        }
        for (;;) {
            const auto nl = floor_in.find('\n');
            if (nl != std::string::npos) {
                const std::string_view reply(floor_in.data(), nl);
                const bool event = reply.find("\"event\"") != std::string_view::npos;
                const bool ok = reply.find("\"return\"") != std::string_view::npos;
                floor_in.erase(0, nl + 1);
                if (event) {
                    continue; // qmp-spec 2.5: an event may come at any time
                }
                if (!ok) {
                    out.error = "probe: the floor's query-status failed";
                    return;
                }
                break;
            }
            if (!recv_some(floor_fd, floor_in)) {
                out.error = "probe: no reply from the floor's QEMU";
                return;
            }
        }
        t1 = Clock::now();
        out.floor.push_back({t0, t1});
    }
}

// The latencies (µs) of the samples wholly inside [from, to].
std::vector<double> within(const std::vector<Sample>& v, Clock::time_point from,
                           Clock::time_point to)
{
    std::vector<double> out;
    for (const Sample& s : v) {
        if (s.t0 >= from && s.t1 <= to) {
            out.push_back(s.us());
        }
    }
    return out;
}

//---- one trial of each side --------------------------------------------------------------------

// Everything the trials need.
struct Context
{
    asio::io_context& ioc;
    const Daemon& daemon;
    std::size_t subscribers = 0;
    std::vector<std::size_t> pairs; // per source
    std::uint64_t events = 0;       // events_per_pair x the pairs
    std::vector<pid_t> source_qemus;
    std::shared_ptr<Buckets> rest_buckets;
    std::shared_ptr<BareQemus> floors; // the floor's sources
    std::shared_ptr<Buckets> floor_buckets;
    std::vector<pid_t> floor_qemus;
    BareQemu* floor_probe = nullptr;
};

// One fan-out's figures.
struct FanoutRun
{
    double ms = 0;             // first source request -> every subscriber has the last event
    double sources_ms = 0;     // first source request -> the sources' last answer
    double first_done_ms = 0;  // ... -> the first subscriber with every event
    double daemon_cpu_ms = 0;  // qmachined, every thread, from the first request to the end
    double daemon_wait_ms = 0; // ... runnable, waiting for a CPU
    double daemon_runs = 0;    // ... times put on a CPU
    double probe_cpu_ms = 0;   // of which the probe's REST requests, at their idle cost
    double qemu_cpu_ms = 0;    // the sources' QEMUs
    double readers_cpu_ms = 0;
    double sources_cpu_ms = 0;         // this process's loop (the sources' REST clients)
    std::size_t waits = 0;             // times a source waited for its budget
    std::vector<std::string> failures; // subscribers that did not get every event
    std::vector<double> rest_idle;
    std::vector<double> rest_busy;
    std::vector<double> floor_idle;
    std::vector<double> floor_busy;
};

// The event_seq of an answer about the probe machine: the last sequence number published.
std::uint64_t current_seq(Context& ctx)
{
    auto reply = qm::test::run_co(
        ctx.ioc, qm::bench::request(ctx.daemon.socket_path(), http::verb::get,
                                    fmt::format("/v1/machines/{}", probe_name), ""));
    std::optional<std::int64_t> seq;
    if (reply && reply->status == 200) {
        auto doc = qm::json::parse(reply->body);
        seq = doc ? qm::json::get_int(*doc, "event_seq") : std::nullopt;
    }
    if (!seq) {
        die("GET /v1/machines/probe: no event_seq: " +
            (reply ? reply->body.substr(0, 300) : reply.error().message));
    }
    return static_cast<std::uint64_t>(*seq);
}

std::size_t total_waits(const Buckets& b)
{
    std::size_t n = 0;
    for (const auto& x : b) {
        n += x.waits;
    }
    return n;
}

FanoutRun fanout_trial(Context& ctx)
{
    FanoutRun r;
    // Declared before the threads that use them: destroyed after the threads are joined.
    std::vector<Subscriber> subs = subscribe(ctx.daemon.socket_path(), ctx.subscribers);
    const Fd rest_fd = connect_unix(ctx.daemon.socket_path());
    Expected expected;
    Probe probe;
    const pid_t daemon_pid = ctx.daemon.pid();

    const auto probe_t0 = Clock::now();
    std::jthread prober(
        [&](const std::stop_token& st) { run_probe(rest_fd.get(), ctx.floor_probe, probe, st); });
    double readers_cpu = 0;
    std::jthread readers(
        [&](const std::stop_token& st) { readers_cpu = read_subscribers(subs, expected, st); });

    // The idle window: 50 subscribers connected, no event; only the probe.
    std::this_thread::sleep_until(probe_t0 + probe_warm_up);
    const auto idle_from = Clock::now();
    const auto idle_cpu0 = processes_sched({daemon_pid});
    std::this_thread::sleep_until(idle_from + idle_window);
    const auto idle_to = Clock::now();
    const auto idle_cpu = processes_sched({daemon_pid}) - idle_cpu0;
    qm::bench::check_interrupted();

    // The fan-out.
    const std::uint64_t seq0 = current_seq(ctx);
    expected.first.store(seq0 + 1, std::memory_order_release);
    expected.last.store(seq0 + ctx.events, std::memory_order_release);
    const std::size_t waits0 = total_waits(*ctx.rest_buckets);
    std::vector<awaitable<qm::expected<void>>> sources;
    for (std::size_t i = 0; i < ctx.pairs.size(); ++i) {
        if (ctx.pairs[i] > 0) {
            sources.push_back(rest_source(ctx.daemon.socket_path(), source_name(i), ctx.pairs[i],
                                          ctx.rest_buckets, i));
        }
    }
    const auto daemon0 = processes_sched({daemon_pid});
    const auto qemu0 = processes_sched(ctx.source_qemus);
    const double self0 = qm::bench::thread_cpu_ms();
    start_schedules(*ctx.rest_buckets);
    const auto t0 = Clock::now();
    r.sources_ms = qm::bench::run_all(ctx.ioc, std::move(sources), "REST", "stop/cont");
    r.sources_cpu_ms = qm::bench::thread_cpu_ms() - self0;
    readers.join();
    const auto joined = Clock::now();
    const auto daemon_sched = processes_sched({daemon_pid}) - daemon0;
    r.daemon_cpu_ms = daemon_sched.ms();
    r.daemon_wait_ms = daemon_sched.wait_ms();
    r.daemon_runs = static_cast<double>(daemon_sched.runs);
    r.qemu_cpu_ms = (processes_sched(ctx.source_qemus) - qemu0).ms();
    r.readers_cpu_ms = readers_cpu;
    prober.request_stop();
    prober.join();
    qm::bench::check_interrupted();
    if (!probe.error.empty()) {
        die(probe.error);
    }
    r.waits = total_waits(*ctx.rest_buckets) - waits0;

    // Every subscriber must have every event from the first to the last, in order, and nothing
    // else: no lagged notice, no EVENTS_DROPPED.
    const std::uint64_t pairs = ctx.events / events_per_pair;
    Clock::time_point last_done{};
    Clock::time_point first_done = Clock::time_point::max();
    for (std::size_t k = 0; k < subs.size(); ++k) {
        const Subscriber& s = subs[k];
        std::string why = s.error;
        if (why.empty() && !s.done) {
            why = fmt::format("got {} of {} events", s.next == 0 ? 0 : s.next - (seq0 + 1),
                              ctx.events);
        }
        if (why.empty() &&
            (s.counts[0] != pairs || s.counts[1] != pairs || s.counts[2] != 2 * pairs)) {
            why = fmt::format("{} STOP, {} RESUME, {} STATE_CHANGED for {} pairs", s.counts[0],
                              s.counts[1], s.counts[2], pairs);
        }
        if (why.empty() && s.early > 0) {
            why = fmt::format("{} events before the first source request", s.early);
        }
        if (!why.empty()) {
            r.failures.push_back(fmt::format("subscriber {}: {}", k, why));
            continue;
        }
        last_done = std::max(last_done, s.done_at);
        first_done = std::min(first_done, s.done_at);
    }
    const auto end = r.failures.empty() ? last_done : joined;
    r.ms = elapsed_ms(t0, end);
    r.first_done_ms = r.failures.size() < subs.size() ? elapsed_ms(t0, first_done) : r.ms;

    // The probe's samples: idle, and during the fan-out (from the first source request until the
    // last subscriber had everything); its REST requests' share of the daemon's CPU meanwhile, at
    // their idle cost.
    r.rest_idle = within(probe.rest, idle_from, idle_to);
    r.floor_idle = within(probe.floor, idle_from, idle_to);
    r.rest_busy = within(probe.rest, t0, end);
    r.floor_busy = within(probe.floor, t0, end);
    if (!r.rest_idle.empty()) {
        const double per_request = idle_cpu.ms() / static_cast<double>(r.rest_idle.size());
        std::size_t during = 0;
        for (const Sample& s : probe.rest) {
            during += s.t0 >= t0 && s.t0 < joined ? 1 : 0;
        }
        r.probe_cpu_ms = per_request * static_cast<double>(during);
    }
    return r;
}

struct FloorRun
{
    double ms = 0;
    double qemu_cpu_ms = 0;
};

// The same pairs straight to the floor's bare QEMUs: how fast QEMU makes these events at all.
FloorRun floor_trial(Context& ctx)
{
    std::vector<awaitable<qm::expected<void>>> sources;
    for (std::size_t i = 0; i < ctx.pairs.size(); ++i) {
        if (ctx.pairs[i] > 0) {
            sources.push_back(floor_source(ctx.floors, i, ctx.pairs[i], ctx.floor_buckets));
        }
    }
    const auto qemu0 = processes_sched(ctx.floor_qemus);
    FloorRun r;
    start_schedules(*ctx.floor_buckets);
    r.ms = qm::bench::run_all(ctx.ioc, std::move(sources), "floor", "stop/cont");
    r.qemu_cpu_ms = (processes_sched(ctx.floor_qemus) - qemu0).ms();
    return r;
}

//---- figures -----------------------------------------------------------------------------------

struct Series
{
    std::vector<double> v;

    void add(double x) { v.push_back(x); }
    double p50() const { return percentile(v, 50); }
    std::string range() const
    {
        const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
        return fmt::format("{:.0f}-{:.0f}", *lo, *hi);
    }
};

// Latencies pooled over trials.
struct Latency
{
    std::vector<double> us;

    void add(const std::vector<double>& v) { us.insert(us.end(), v.begin(), v.end()); }
    double p50() const { return percentile(us, 50); }
    double p99() const { return percentile(us, 99); }
};

//---- main --------------------------------------------------------------------------------------

void usage()
{
    fmt::print(
        "usage: events-bench [--subscribers N] [--events N] [--sources N] [--trials N] [--rate N]\n"
        "  --subscribers N  SSE subscribers of GET /v1/events (default 50)\n"
        "  --events N       events per fan-out at least; 4 per stop/cont pair (default 10000)\n"
        "  --sources N      machines making the events, and as many floor QEMUs (default 20)\n"
        "  --trials N       interleaved fan-out/floor trials, after a warm-up of each (default 3)\n"
        "  --rate N         events/s of all sources together, both sides (default 0: as fast as\n"
        "                   they go, within the daemon's QMP event limit)\n");
    fmt::print("{}", qm::bench::environment_usage);
}

int run(const Args& args)
{
    const auto started = Clock::now();
    qm::bench::raise_fd_limit();
    // A short directory: the machines' sockets are inside it, and a unix socket's path has at
    // most 107 bytes.
    qm::bench::Env env(fs::temp_directory_path(), "eb");
    const auto n_sources = static_cast<std::size_t>(args.sources);
    const auto n_subs = static_cast<std::size_t>(args.subscribers);
    const std::uint64_t pairs =
        (static_cast<std::uint64_t>(args.events) + events_per_pair - 1) / events_per_pair;
    Daemon daemon(qm::bench::qmachined_binary(), env.dir / "d");
    // The floor's sources f00... and, last, its probe.
    auto floors = std::make_shared<BareQemus>();

    // The daemon, the sources and the probe machine; the floor's QEMUs.
    daemon.start("stop-machines", "warn");
    daemon.wait_ready();
    const std::string spec = qm::bench::none_spec(env.qemu, false);
    auto setup = std::make_shared<qm::bench::Setup>();
    for (std::size_t i = 0; i < n_sources; ++i) {
        setup->names.push_back(source_name(i));
    }
    setup->names.emplace_back(probe_name);
    const double setup_ms =
        qm::bench::create_and_start(env.ioc, daemon.socket_path(), spec, setup, setup_connections);
    const std::vector<std::string> daemon_argv = qm::bench::command_line(setup->pids.back());
    const auto floor_argv = qm::bench::bare_template(daemon_argv, std::string(probe_name));
    std::vector<std::string> floor_names;
    for (std::size_t i = 0; i < n_sources; ++i) {
        floor_names.push_back(fmt::format("f{:02}", i));
    }
    floor_names.emplace_back("fprobe");
    const double floor_ms = qm::bench::spawn_bare_qemus(env.ioc, floor_argv, floor_names, *floors);

    Context ctx{env.ioc, daemon, n_subs,  {}, pairs * events_per_pair, {},
                nullptr, floors, nullptr, {}, floors->back().get()};
    for (std::size_t i = 0; i < n_sources; ++i) {
        ctx.pairs.push_back(pairs / n_sources + (i < pairs % n_sources ? 1 : 0));
        ctx.source_qemus.push_back(setup->pids[i]);
        ctx.floor_qemus.push_back((*floors)[i]->pid);
    }
    ctx.rest_buckets = std::make_shared<Buckets>(n_sources);
    ctx.floor_buckets = std::make_shared<Buckets>(n_sources);
    if (args.rate > 0) {
        // Each source makes 1/sources of the events, 4 a pair.
        const auto interval =
            std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(
                static_cast<double>(n_sources * events_per_pair) / args.rate));
        for (auto* buckets : {ctx.rest_buckets.get(), ctx.floor_buckets.get()}) {
            for (auto& b : *buckets) {
                b.interval = interval;
            }
        }
    }

    const auto version = qm::test::run_co(
        env.ioc, qm::bench::request(daemon.socket_path(), http::verb::get, "/v1/version", ""));
    const std::string qemu_version = version ? qm::bench::qemu_version_of(*version) : "?";
    const std::uint64_t delivered = ctx.events * n_subs;
    fmt::print("events-bench: qmachined {}\n  QEMU {} -machine none, {} CPUs; {} subscribers, "
               "{} events per fan-out ({} stop/cont pairs\n  over {} source machines), {} "
               "trials\n",
               qm::bench::qmachined_binary(), qemu_version, std::thread::hardware_concurrency(),
               n_subs, ctx.events, pairs, n_sources, args.trials);
    fmt::print("temporary directory {} ({}); load average at start {}\n", env.dir.string(),
               qm::bench::fs_type(env.dir), qm::bench::load_average());
    fmt::print("set-up, not compared: {} machines created and started over REST ({} "
               "connections) in {:.0f} ms;\n  {} floor QEMUs launched and negotiated in {:.0f} "
               "ms{}\n",
               setup->names.size(), setup_connections, setup_ms, n_sources + 1, floor_ms,
               setup->failed_starts.empty()
                   ? ""
                   : fmt::format("; {} start(s) failed and were tried again: {}",
                                 setup->failed_starts.size(),
                                 setup->failed_starts.front().substr(0, 300)));
    fmt::print("command line (the floor's QEMUs differ only in -name, and talk QMP over a socket "
               "pair to this\nprocess as qmachined's do to it, without the served monitor):\n  "
               "{}\n",
               qm::proc::format_command_line(daemon_argv));
    fmt::print(
        "fan-out = {} subscribers of GET /v1/events (raw unix sockets, one epoll thread: chunked "
        "HTTP and\n          SSE decoded, every id checked) while {} Beast clients send POST "
        "/v1/machines/sNN/qmp\n          stop then cont, each when the previous answer came "
        "(4 events a pair: STOP, RESUME,\n          STATE_CHANGED x2), kept under the daemon's "
        "QMP event limit (<= {:.0f}/s, bursts <= {:.0f}) per\n          machine; {}\nfloor   = the "
        "same pairs as lines "
        "straight to {} bare QEMUs' monitors, each STOP and RESUME read once\nprobe   = "
        "query-status, one at a time in a thread of its own, alternately through REST to "
        "machine\n          '{}' (idle, not a source) and straight to a bare QEMU: {} ms idle "
        "(subscribers\n          connected) after {} ms unrecorded, then during the fan-out\n"
        "Trials alternate which of fan-out and floor goes first, after a warm-up of each.\n\n",
        n_subs, n_sources, qmp_rate_per_s, qmp_burst,
        args.rate > 0 ? fmt::format("paced at {} events/s in all (--rate)", args.rate)
                      : std::string("otherwise as fast as they go"),
        n_sources, probe_name, idle_window.count(), probe_warm_up.count());
    std::fflush(stdout);

    std::vector<FanoutRun> runs;
    std::vector<FloorRun> floor_runs;
    std::vector<std::string> failures; // the warm-up's too
    auto fanout_side = [&](bool record) {
        FanoutRun r = fanout_trial(ctx);
        failures.insert(failures.end(), r.failures.begin(), r.failures.end());
        if (record) {
            runs.push_back(std::move(r));
        }
    };
    auto floor_side = [&](bool record) {
        FloorRun r = floor_trial(ctx);
        if (record) {
            floor_runs.push_back(r);
        }
    };
    fanout_side(false);
    floor_side(false);
    for (int t = 0; t < args.trials; ++t) {
        qm::bench::interleaved(
            t, [&] { fanout_side(true); }, [&] { floor_side(true); });
    }

    // One figure of every recorded trial; latencies pooled over them.
    auto series = [&](double FanoutRun::*figure) {
        Series out;
        for (const auto& r : runs) {
            out.add(r.*figure);
        }
        return out;
    };
    auto pooled = [&](std::vector<double> FanoutRun::*samples) {
        Latency out;
        for (const auto& r : runs) {
            out.add(r.*samples);
        }
        return out;
    };
    const Series fan_ms = series(&FanoutRun::ms);
    const Series sources_ms = series(&FanoutRun::sources_ms);
    const Series first_done_ms = series(&FanoutRun::first_done_ms);
    const Series daemon_cpu = series(&FanoutRun::daemon_cpu_ms);
    const Series daemon_wait = series(&FanoutRun::daemon_wait_ms);
    const Series daemon_runs = series(&FanoutRun::daemon_runs);
    const Series probe_cpu = series(&FanoutRun::probe_cpu_ms);
    const Series qemu_cpu = series(&FanoutRun::qemu_cpu_ms);
    const Series readers_cpu = series(&FanoutRun::readers_cpu_ms);
    const Series sources_cpu = series(&FanoutRun::sources_cpu_ms);
    const Latency rest_idle = pooled(&FanoutRun::rest_idle);
    const Latency rest_busy = pooled(&FanoutRun::rest_busy);
    const Latency floor_idle = pooled(&FanoutRun::floor_idle);
    const Latency floor_busy = pooled(&FanoutRun::floor_busy);
    Series floor_run_ms;
    Series floor_qemu_cpu;
    for (const auto& r : floor_runs) {
        floor_run_ms.add(r.ms);
        floor_qemu_cpu.add(r.qemu_cpu_ms);
    }
    std::size_t waits = 0;
    for (const auto& r : runs) {
        waits += r.waits;
    }

    const double rate = static_cast<double>(delivered) / (fan_ms.p50() / 1e3);
    const double floor_rate =
        static_cast<double>(pairs * qmp_events_per_pair) / (floor_run_ms.p50() / 1e3);
    const double net_cpu = daemon_cpu.p50() - probe_cpu.p50();
    const double us_per_event = net_cpu * 1e3 / static_cast<double>(delivered);
    auto row = [](std::string_view what, const Series& x) {
        fmt::print("  {:<56} {:>7.0f} {:>11}\n", what, x.p50(), x.range());
    };
    fmt::print("{:<58} {:>7} {:>11}\n",
               fmt::format("fan-out, ms (median of {} trials, range)", args.trials), "p50",
               "range");
    row(fmt::format("first source request -> all {} have the last event", n_subs), fan_ms);
    row("first source request -> the sources' last answer", sources_ms);
    row("first source request -> the first subscriber with all", first_done_ms);
    row(fmt::format("floor: the same {} pairs straight to {} QEMUs", pairs, n_sources),
        floor_run_ms);
    fmt::print("delivered: {} x {} = {} events in {:.0f} ms = {:.0f} events/s; the floor made {} "
               "QMP events\n  in {:.0f} ms = {:.0f}/s (read once each); fan-out / floor time = "
               "{:.2f}x\n",
               n_subs, ctx.events, delivered, fan_ms.p50(), rate, pairs * qmp_events_per_pair,
               floor_run_ms.p50(), floor_rate, fan_ms.p50() / floor_run_ms.p50());
    fmt::print("sources: {:.0f} events/s made through REST{}; they waited {} times for their QMP "
               "event budget\n  over the recorded trials\n",
               static_cast<double>(ctx.events) / (sources_ms.p50() / 1e3),
               args.rate > 0 ? fmt::format(" (--rate {})", args.rate) : std::string(), waits);
    fmt::print("CPU during the fan-out, ms (median trial; schedstat, every thread, kernel time "
               "included):\n  qmachined {:.0f} (of which ~{:.0f} the probe's REST requests, at "
               "their idle cost) -> {:.2f} us per\n  delivered event; it waited {:.0f} ms for a "
               "CPU and was put on one {:.0f} times ({:.0f}% busy,\n  {:.0f}% waiting for a CPU); "
               "the {} source QEMUs {:.0f} (the floor's {:.0f}); this process:\n  subscribers' "
               "thread {:.0f}, sources' loop {:.0f}\n",
               daemon_cpu.p50(), probe_cpu.p50(), us_per_event, daemon_wait.p50(),
               daemon_runs.p50(), 100 * daemon_cpu.p50() / fan_ms.p50(),
               100 * daemon_wait.p50() / fan_ms.p50(), n_sources, qemu_cpu.p50(),
               floor_qemu_cpu.p50(), readers_cpu.p50(), sources_cpu.p50());

    const double rest_p50_ratio = rest_busy.p50() / rest_idle.p50();
    const double rest_p99_ratio = rest_busy.p99() / rest_idle.p99();
    const double floor_p50_ratio = floor_busy.p50() / floor_idle.p50();
    const double floor_p99_ratio = floor_busy.p99() / floor_idle.p99();
    fmt::print("\nprobe query-status, us (pooled over trials)   idle p50    p99  samples   fan-out "
               "p50    p99  samples   ratio p50   p99\n");
    auto probe_row = [](std::string_view what, const Latency& idle, const Latency& busy) {
        fmt::print("  {:<42} {:>7.0f} {:>6.0f} {:>8} {:>14.0f} {:>6.0f} {:>8} {:>10.2f}x "
                   "{:>5.2f}x\n",
                   what, idle.p50(), idle.p99(), idle.us.size(), busy.p50(), busy.p99(),
                   busy.us.size(), busy.p50() / idle.p50(), busy.p99() / idle.p99());
    };
    probe_row("REST, machine 'probe' through qmachined", rest_idle, rest_busy);
    probe_row("floor, a bare QEMU asked directly", floor_idle, floor_busy);
    fmt::print("  REST - floor: idle p50 {:+.0f} us, during the fan-out p50 {:+.0f} us (the "
               "daemon's own share)\n",
               rest_idle.p50() - floor_idle.p50(), rest_busy.p50() - floor_busy.p50());

    const bool none_lost = failures.empty();
    const bool p50_pass = rest_p50_ratio <= latency_target;
    const bool p99_pass = rest_p99_ratio <= latency_target;
    fmt::print("\ntargets (issue): {} events to {} subscribers, none lost; the probe's REST "
               "latency during the fan-out\n  <= {:.0f}x its idle latency\n",
               ctx.events, n_subs, latency_target);
    fmt::print("  none lost ({} fan-outs with the warm-up, every subscriber every id in order, "
               "no lagged): {}\n",
               args.trials + 1, verdict(none_lost));
    for (std::size_t k = 0; k < std::min<std::size_t>(failures.size(), 5); ++k) {
        fmt::print("    {}\n", failures[k]);
    }
    fmt::print("  REST p50 {:.0f} / {:.0f} us = {:.2f}x {} | REST p99 {:.0f} / {:.0f} us = {:.2f}x "
               "{}\n  (the floor's QEMU, same moments: p50 {:.2f}x, p99 {:.2f}x)\n",
               rest_busy.p50(), rest_idle.p50(), rest_p50_ratio, verdict(p50_pass), rest_busy.p99(),
               rest_idle.p99(), rest_p99_ratio, verdict(p99_pass), floor_p50_ratio,
               floor_p99_ratio);

    auto lat_json = [](const Latency& l) {
        return fmt::format(R"({{"p50_us":{:.1f},"p99_us":{:.1f},"samples":{}}})", l.p50(), l.p99(),
                           l.us.size());
    };
    fmt::print("\nJSON "
               R"({{"bench":"events-bench","qemu":{},"subscribers":{},"events":{},"sources":{},)"
               R"("trials":{},"rate":{},"targets":{{"latency_ratio":{:.1f}}},)"
               R"("fanout_ms":{:.1f},"sources_ms":{:.1f},"delivered_per_s":{:.0f},)"
               R"("floor_ms":{:.1f},"fanout_floor_ratio":{:.3f},"pacing_waits":{},)"
               R"("daemon_cpu_ms":{:.1f},"daemon_cpu_wait_ms":{:.1f},"probe_cpu_ms":{:.1f},)"
               R"("daemon_us_per_delivered_event":{:.3f},)"
               R"("source_qemu_cpu_ms":{:.1f},"floor_qemu_cpu_ms":{:.1f},)"
               R"("probe":{{"rest_idle":{},"rest_fanout":{},"floor_idle":{},"floor_fanout":{}}},)"
               R"("rest_p50_ratio":{:.3f},"rest_p99_ratio":{:.3f},"floor_p50_ratio":{:.3f},)"
               R"("floor_p99_ratio":{:.3f},"lost":{},)"
               R"("pass":{{"none_lost":{},"p50":{},"p99":{}}}}})"
               "\n",
               qm::json::quote(qemu_version), n_subs, ctx.events, n_sources, args.trials, args.rate,
               latency_target, fan_ms.p50(), sources_ms.p50(), rate, floor_run_ms.p50(),
               fan_ms.p50() / floor_run_ms.p50(), waits, daemon_cpu.p50(), daemon_wait.p50(),
               probe_cpu.p50(), us_per_event, qemu_cpu.p50(), floor_qemu_cpu.p50(),
               lat_json(rest_idle), lat_json(rest_busy), lat_json(floor_idle), lat_json(floor_busy),
               rest_p50_ratio, rest_p99_ratio, floor_p50_ratio, floor_p99_ratio, failures.size(),
               none_lost, p50_pass, p99_pass);
    fmt::print("\nverdicts: none lost {}, probe p50 {}, probe p99 {}\n", verdict(none_lost),
               verdict(p50_pass), verdict(p99_pass));
    std::fflush(stdout);

    // Teardown: the floor's QEMUs quit over QMP; the daemon gets SIGTERM and stops its machines.
    const std::size_t floor_failed = qm::bench::quit_all(*floors);
    qm::bench::teardown(daemon, env.dir, setup->names.size(), floor_failed, started);
    return 0;
}

} // namespace

int main(int argc, char** argv)
{
    qm::bench::install_signal_handlers();
    Args args;
    using qm::bench::int_option;
    const std::vector<qm::bench::Option> options{
        int_option("--subscribers", args.subscribers, 1),
        int_option("--events", args.events, 1),
        int_option("--sources", args.sources, 1),
        int_option("--trials", args.trials, 1),
        int_option("--rate", args.rate, 0),
    };
    return qm::bench::bench_main("events-bench", argc, argv, options, usage,
                                 [&] { return run(args); });
}
