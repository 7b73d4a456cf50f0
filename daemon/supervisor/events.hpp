// SPDX-License-Identifier: GPL-2.0-or-later
// The daemon's one event stream: every event gets a daemon-wide sequence number, a bounded replay
// ring keeps the recent ones, subscribers read through bounded queues (and are told when they
// lagged), synchronous listeners see each event as it is published, and a server-side wait finds
// the first matching event after a sequence number (the seed's events_wait, served).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"
#include "libmachine/json.hpp"
#include "libmachine/qmp/message.hpp"

namespace qm::daemon {

// Names of the daemon's own events (QMP events keep QEMU's names).
namespace event_names {
inline constexpr std::string_view machine_created = "MACHINE_CREATED"; // data: {"uuid"}
inline constexpr std::string_view machine_updated = "MACHINE_UPDATED"; // data: {"generation"}
inline constexpr std::string_view machine_removed = "MACHINE_REMOVED"; // data: {}
// data: {"state", "previous", "reason"?: {...stop reason...}, "detail"?: "..."}
inline constexpr std::string_view state_changed = "STATE_CHANGED";
// data: {"pid", "state", "since_us"}: qmachined (re)started and took over a QEMU that had kept
// running; the machine's state is "state" from now on (no STATE_CHANGED for it)
inline constexpr std::string_view machine_reattached = "MACHINE_REATTACHED";
// data: {"attempt": N, "delay_ms": D, "reason": "..."}: the restart policy restarts the machine
// in D ms (attempt N within the crash-loop window)
inline constexpr std::string_view restart_scheduled = "RESTART_SCHEDULED";
// data: {"restarts": N, "window_s": W}: N restarts within W s; the machine is `failed` until
// someone starts it
inline constexpr std::string_view crash_loop = "CRASH_LOOP";
// data: {"count": N, "since_seq": S}: N QMP events of a flooding machine were not published; the
// first of them came after event S
inline constexpr std::string_view events_dropped = "EVENTS_DROPPED";
} // namespace event_names

// One published event. Immutable, cheap to copy (shares its JSON).
class Event
{
public:
    Event();
    // `json` is the whole event object: {"seq", "machine", "event", "data", "timestamp":
    // {"seconds", "microseconds"}, "qmp": bool}.
    explicit Event(std::shared_ptr<const json::Document> json);

    std::uint64_t seq() const;
    std::string_view machine() const;
    std::string_view name() const;
    const json::Value& data() const;
    // true for an event QEMU sent, false for the daemon's own.
    bool is_qmp() const;
    // QEMU's timestamp for QMP events, the daemon's wall clock otherwise (µs since the epoch).
    std::int64_t timestamp_us() const;
    // The whole object, as event_match sees it and as the front ends send it.
    const json::Value& json() const { return *json_; }
    // The object as compact JSON, written once when the event is made (every subscriber,
    // wait and front end shares it).
    const std::string& to_json() const { return *text_; }
    bool valid() const noexcept { return json_ != nullptr; }

private:
    std::shared_ptr<const json::Document> json_;
    std::shared_ptr<const std::string> text_;
    std::uint64_t seq_ = 0; // cached: the ring is indexed by it
};

// Which events a subscriber or a wait wants. Empty machine: any; empty names: any; null match:
// any (else the seed's event_match against Event::json(), e.g. {"data": {"state": "running"}}).
struct EventSelector
{
    std::string machine;
    std::vector<std::string> names;
    json::Document match;

    bool matches(const Event& e) const;
};

// What a subscription yields: an event, or the news that matching events with
// lagged_from <= seq < resume_seq were lost to this subscriber (its queue overflowed, or it asked
// for a sequence number no longer in the ring). Nothing matching from resume_seq on is lost.
struct StreamItem
{
    Event event;                   // valid() unless this is a lag notice
    std::uint64_t lagged_from = 0; // non-zero: a lag notice
    std::uint64_t resume_seq = 0;  // with a lag notice: the next seq this subscriber will see
};

struct EventBusOptions
{
    // The number before the first event's: the daemon's start time in µs since the epoch (the
    // Supervisor sets it), so that numbers keep growing across restarts and a number from an
    // earlier run is recognised as such (its events are lost to the asker: a lag notice, or
    // invalid_state for a wait). 0: numbers start at 1 (tests of the bus alone).
    std::uint64_t seq_base = 0;
    // Recent events kept for resume and waits.
    std::size_t ring_capacity = 4096;
    // Events a subscriber may have waiting before it is told it lagged.
    std::size_t subscriber_queue = 1024;
    // Per machine: QMP events per second allowed on average, and the burst above it. Events beyond
    // are dropped and counted; the count is published as EVENTS_DROPPED once the machine is
    // allowed again (or at the latest after drop_report_interval, by the bus's single timer).
    double qmp_rate_per_s = 200;
    double qmp_burst = 400;
    // The latest an EVENTS_DROPPED is published after a machine's first unreported drop (by the
    // bus's single timer, armed only while some machine has unreported drops).
    std::chrono::milliseconds drop_report_interval = std::chrono::seconds(1);
};

class EventBus;

// A reader of the stream. Owned by its front end (shared_ptr); loop thread only.
//
// A subscription that resumes from a sequence number first reads the bus's ring through a cursor
// (no copies, no queue), and switches to its own queue once it has caught up. The queue holds at
// most EventBusOptions::subscriber_queue items, its last slot kept for a lag notice: when it is
// full, newer events are dropped and one notice says from which number; the subscription goes on
// as soon as the reader makes room. One reader at a time: a second concurrent next() fails with
// errc::invalid_state.
class Subscription : public std::enable_shared_from_this<Subscription>
{
public:
    // The next item (waits for one). errc::invalid_state once close()d or the bus is gone;
    // errc::timeout after `timeout` with nothing (the caller sends a keep-alive).
    awaitable<expected<StreamItem>> next(std::chrono::milliseconds timeout);
    // Items already waiting, without suspending.
    std::optional<StreamItem> try_next();
    void close();
    bool closed() const noexcept { return closed_; }
    // Items in the subscription's own queue (events still to be read from the ring while it
    // resumes are not counted: they take no memory of their own).
    std::size_t queued() const noexcept { return queue_.size(); }

private:
    friend class EventBus;
    struct Waiter;
    explicit Subscription(EventBus* bus, EventSelector selector);
    void deliver(const Event& e, std::size_t limit);
    std::optional<StreamItem> replay_next();
    void wake();

    EventBus* bus_;
    asio::any_io_executor ex_;
    EventSelector selector_;
    std::deque<StreamItem> queue_;
    // The queue's last item is a lag notice still collecting dropped events.
    bool lagging_ = false;
    bool closed_ = false;
    // Resuming: the next sequence number to read from the ring.
    bool replaying_ = false;
    std::uint64_t cursor_ = 0;
    std::shared_ptr<Waiter> waiter_;
};

// The stream. Owned by the supervisor; loop thread only. Every event goes into the ring (they are
// contiguous there: seq first_seq() .. last_seq()). QMP events pass each machine's token bucket
// first; daemon events are never dropped. Errors: errc::timeout and errc::invalid_state from
// wait() and Subscription::next(). Destroying the bus completes pending waits and next() calls
// with errc::invalid_state.
class EventBus
{
public:
    using Listener = std::function<void(const Event&)>;

    EventBus(asio::io_context& ioc, EventBusOptions options = {});
    ~EventBus();
    EventBus(const EventBus&) = delete;
    EventBus& operator=(const EventBus&) = delete;

    // Publishes one of the daemon's own events about `machine` (empty: the daemon itself); `data`
    // must be an object (null becomes {}). Returns its sequence number.
    std::uint64_t publish(std::string_view machine, std::string_view name, const json::Value& data);
    // Publishes a QMP event of `machine` with QEMU's timestamp, subject to the machine's rate
    // limit. Returns its sequence number, or 0 when it was dropped.
    std::uint64_t publish_qmp(std::string_view machine, const qmp::Event& event);
    // Forgets a removed machine's rate-limit state (publishing its pending drop count first).
    void forget_machine(std::string_view machine);

    // The sequence number of the last published event (0 before the first).
    std::uint64_t last_seq() const noexcept { return seq_; }
    // The oldest sequence number still in the ring (last_seq() + 1 when empty).
    std::uint64_t first_seq() const noexcept;
    // Where a `since` starts: 0 and numbers no run gave out mean this run's start.
    std::uint64_t start_of(std::uint64_t since) const noexcept;
    // Events in the ring after `since` (all of them when since < first_seq() - 1) that match.
    std::vector<Event> replay(std::uint64_t since, const EventSelector& selector) const;

    // A new subscriber. Without `since` it sees events published from now on; with it, every
    // matching event with seq > since that the ring still holds first (and a lag notice first when
    // the ring no longer holds seq since + 1: also for a `since` of an earlier run, below this
    // run's first number). 0, and a `since` beyond last_seq() (which no run gave out), mean this
    // run's first event.
    std::shared_ptr<Subscription> subscribe(EventSelector selector,
                                            std::optional<std::uint64_t> since = std::nullopt);

    // Synchronous listeners, called during publish in the order they were added, after the event
    // reached the subscriptions and waits (they must not publish in turn: asserted).
    std::uint64_t listen(Listener listener);
    void unlisten(std::uint64_t id);

    // The first event matching `selector` with seq > since (from the ring, then as published);
    // without `since`, from now on. errc::timeout after `timeout` (a zero timeout only looks in
    // the ring); errc::invalid_state when the ring no longer holds since + 1 (the caller's window
    // is lost: it must re-read state; so for a `since` of an earlier run) or when the bus is
    // destroyed meanwhile. 0 and a `since` beyond last_seq() count as this run's start, as for
    // subscribe(). Any number of waits may be pending; each gets its own first match.
    awaitable<expected<Event>> wait(EventSelector selector, std::optional<std::uint64_t> since,
                                    std::chrono::milliseconds timeout);

    // Counters for metrics and tests.
    std::uint64_t dropped_total() const noexcept { return dropped_total_; }
    std::size_t subscriber_count() const noexcept;

private:
    friend class Subscription;
    // A machine's token bucket for its QMP events, and its drops not yet published.
    struct Limiter
    {
        double tokens = 0;
        std::chrono::steady_clock::time_point refilled{};
        std::uint64_t dropped = 0;
        std::uint64_t since_seq = 0; // last_seq() when the first unreported drop happened
    };
    struct Waiter;
    struct DropReport
    {
        std::string machine;
        std::uint64_t count = 0;
        std::uint64_t since_seq = 0;
    };

    std::uint64_t emit(std::string_view machine, std::string_view name, const json::Value& data,
                       std::int64_t seconds, std::int64_t microseconds, bool qmp);
    std::uint64_t emit_drops(const DropReport& report);
    void append(const Event& e);
    DropReport take_drops(const std::string& machine, Limiter& limiter);
    void flush_drops();
    static std::shared_ptr<const json::Document> compact(const json::Document& doc);
    void arm_flush_timer();
    void disarm_flush_timer();
    std::size_t queue_limit() const noexcept;
    const Event& at(std::uint64_t seq) const { return ring_[seq - first_seq()]; }

    asio::io_context& ioc_;
    EventBusOptions options_;
    std::uint64_t seq_ = 0;
    std::uint64_t base_ = 0; // options_.seq_base: this run's numbers are above it
    std::deque<Event> ring_;
    std::list<std::weak_ptr<Subscription>> subscribers_;
    std::vector<std::pair<std::uint64_t, Listener>> listeners_;
    std::uint64_t next_listener_ = 1;
    bool publishing_ = false;
    std::list<std::shared_ptr<Waiter>> waiters_;
    std::map<std::string, Limiter, std::less<>> limiters_;
    std::size_t machines_with_drops_ = 0;
    std::uint64_t dropped_total_ = 0;
    asio::steady_timer flush_timer_;
    bool flush_armed_ = false;
    std::uint64_t flush_generation_ = 0; // a handler of an older arming does nothing
    std::shared_ptr<int> life_ = std::make_shared<int>(0);
};

} // namespace qm::daemon
