// SPDX-License-Identifier: GPL-2.0-or-later
// The event stream: sequence numbers, the replay ring, subscriptions with bounded queues,
// listeners, server-side waits and the per-machine rate limit on QMP events.
#include "daemon/supervisor/events.hpp"

#include <algorithm>
#include <cassert>
#include <utility>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace qm::daemon {
namespace {

const json::Value null_value;

asio::steady_timer::time_point deadline_after(std::chrono::milliseconds timeout)
{
    if (timeout == std::chrono::milliseconds::max()) {
        return asio::steady_timer::time_point::max();
    }
    return asio::steady_timer::clock_type::now() + timeout;
}

json::Value string_value(std::string_view s, json::Document::AllocatorType& a)
{
    return {s.data(), static_cast<rapidjson::SizeType>(s.size()), a};
}

// A deep copy that owns every string. RapidJSON 1.1's copying constructor keeps const strings
// (StringRef) as references into the source, which may not outlive the event; the depth is that of
// the source (json::parse bounds it for QMP events).
json::Value deep_copy(const json::Value& v, json::Document::AllocatorType& a)
{
    switch (v.GetType()) {
    case rapidjson::kObjectType: {
        json::Value out(rapidjson::kObjectType);
        for (const auto& m : v.GetObject()) {
            out.AddMember(json::Value(m.name.GetString(), m.name.GetStringLength(), a),
                          deep_copy(m.value, a), a);
        }
        return out;
    }
    case rapidjson::kArrayType: {
        json::Value out(rapidjson::kArrayType);
        out.Reserve(v.Size(), a);
        for (const auto& item : v.GetArray()) {
            out.PushBack(deep_copy(item, a), a);
        }
        return out;
    }
    case rapidjson::kStringType:
        return {v.GetString(), v.GetStringLength(), a};
    default:
        return {v, a}; // null, bool, number: no memory of their own
    }
}

// What a wait or a lag message calls the events it looked for: "STOP|RESUME", or "matching".
std::string describe(const EventSelector& selector)
{
    std::string names;
    for (const auto& n : selector.names) {
        names += (names.empty() ? "" : "|") + n;
    }
    if (names.empty()) {
        names = "matching";
    }
    if (!selector.machine.empty()) {
        names += fmt::format(" event of '{}'", selector.machine);
    } else {
        names += " event";
    }
    return names;
}

} // namespace

//---- Event ---------------------------------------------------------------------------------------

namespace {
const std::shared_ptr<const std::string>& null_text()
{
    static const auto text = std::make_shared<const std::string>("null");
    return text;
}
} // namespace

Event::Event()
    : text_(null_text())
{}

Event::Event(std::shared_ptr<const json::Document> json)
    : json_(std::move(json))
{
    if (json_ != nullptr) {
        const json::Value* seq = json::find(*json_, "seq");
        seq_ = seq != nullptr && seq->IsUint64() ? seq->GetUint64() : 0;
        text_ = std::make_shared<const std::string>(json::to_string(*json_));
    } else {
        text_ = null_text();
    }
}

std::uint64_t Event::seq() const
{
    return seq_;
}

std::string_view Event::machine() const
{
    return json_ != nullptr ? json::get_string(*json_, "machine").value_or("") : "";
}

std::string_view Event::name() const
{
    return json_ != nullptr ? json::get_string(*json_, "event").value_or("") : "";
}

const json::Value& Event::data() const
{
    const json::Value* d = json_ != nullptr ? json::find(*json_, "data") : nullptr;
    return d != nullptr ? *d : null_value;
}

bool Event::is_qmp() const
{
    const json::Value* q = json_ != nullptr ? json::find(*json_, "qmp") : nullptr;
    return q != nullptr && q->IsBool() && q->GetBool();
}

std::int64_t Event::timestamp_us() const
{
    const json::Value* ts = json_ != nullptr ? json::find(*json_, "timestamp") : nullptr;
    if (ts == nullptr) {
        return 0;
    }
    return json::get_int(*ts, "seconds").value_or(0) * 1'000'000 +
           json::get_int(*ts, "microseconds").value_or(0);
}

bool EventSelector::matches(const Event& e) const
{
    if (!machine.empty() && e.machine() != machine) {
        return false;
    }
    if (!names.empty() && std::find(names.begin(), names.end(), e.name()) == names.end()) {
        return false;
    }
    return qmp::event_match(e.json(), match);
}

//---- Subscription --------------------------------------------------------------------------------

// A next() call waiting for an item: deliver() and close() cancel the timer to wake it; an expiry
// is its deadline.
struct Subscription::Waiter
{
    explicit Waiter(const asio::any_io_executor& ex)
        : timer(ex)
    {}
    asio::steady_timer timer;
};

Subscription::Subscription(EventBus* bus, EventSelector selector)
    : bus_(bus)
    , ex_(bus->ioc_.get_executor())
    , selector_(std::move(selector))
{}

void Subscription::deliver(const Event& e, std::size_t limit)
{
    if (closed_ || !selector_.matches(e)) {
        return;
    }
    if (replaying_) {
        // The event is in the ring already; the cursor will reach it.
        wake();
        return;
    }
    // Events may fill limit - 1 slots: the last one is kept for a lag notice, so the queue never
    // holds more than `limit` items.
    if (lagging_) {
        if (queue_.size() + 1 >= limit) {
            return; // still no room: the open notice covers this event too
        }
        // Room again: the notice is complete, and this is the first event after the gap.
        queue_.back().resume_seq = e.seq();
        lagging_ = false;
    } else if (queue_.size() + 1 >= limit) {
        StreamItem notice;
        notice.lagged_from = e.seq();
        queue_.push_back(std::move(notice));
        lagging_ = true;
        wake();
        return;
    }
    StreamItem item;
    item.event = e;
    queue_.push_back(std::move(item));
    wake();
}

std::optional<StreamItem> Subscription::replay_next()
{
    while (replaying_) {
        const std::uint64_t first = bus_->first_seq();
        if (cursor_ < first) {
            // The ring has moved past the reader (or never held what it asked for).
            StreamItem notice;
            notice.lagged_from = cursor_;
            notice.resume_seq = first;
            cursor_ = first;
            return notice;
        }
        if (cursor_ > bus_->last_seq()) {
            // Caught up: from now on deliver() queues what is published.
            replaying_ = false;
            break;
        }
        const Event& e = bus_->at(cursor_);
        ++cursor_;
        if (selector_.matches(e)) {
            StreamItem item;
            item.event = e;
            return item;
        }
    }
    return std::nullopt;
}

std::optional<StreamItem> Subscription::try_next()
{
    if (closed_ || bus_ == nullptr) {
        return std::nullopt;
    }
    if (replaying_) {
        if (auto item = replay_next()) {
            return item;
        }
    }
    if (queue_.empty()) {
        return std::nullopt;
    }
    StreamItem item = std::move(queue_.front());
    queue_.pop_front();
    if (item.lagged_from != 0 && lagging_ && queue_.empty()) {
        // The reader reached the open notice: nothing after it was dropped, and the next
        // matching event published will be queued.
        item.resume_seq = bus_->last_seq() + 1;
        lagging_ = false;
    }
    return item;
}

awaitable<expected<StreamItem>> Subscription::next(std::chrono::milliseconds timeout)
{
    auto self = shared_from_this();
    const auto deadline = deadline_after(timeout);
    for (;;) {
        if (closed_) {
            co_return fail(errc::invalid_state, "the subscription is closed");
        }
        if (bus_ == nullptr) {
            co_return fail(errc::invalid_state, "the event stream is gone");
        }
        if (auto item = try_next()) {
            co_return std::move(*item);
        }
        if (waiter_ != nullptr) {
            co_return fail(errc::invalid_state, "another read of this subscription is pending");
        }
        if (asio::steady_timer::clock_type::now() >= deadline) {
            co_return fail(errc::timeout, fmt::format("no event within {} ms", timeout.count()));
        }
        auto waiter = std::make_shared<Waiter>(ex_);
        waiter->timer.expires_at(deadline);
        waiter_ = waiter;
        error_code ec;
        co_await waiter->timer.async_wait(use_ec(ec));
        waiter_.reset();
        // Woken (cancelled) or expired: either way the loop looks again; an expiry with nothing
        // to read ends in the timeout above.
    }
}

void Subscription::close()
{
    if (closed_) {
        return;
    }
    closed_ = true;
    queue_.clear();
    lagging_ = false;
    replaying_ = false;
    wake();
}

void Subscription::wake()
{
    if (waiter_ != nullptr) {
        waiter_->timer.cancel();
    }
}

//---- EventBus ------------------------------------------------------------------------------------

// A wait() call. publish() sets `result` and cancels the timer; the destructor does the same with
// an error; an expiry with no result is the deadline.
struct EventBus::Waiter
{
    explicit Waiter(const asio::any_io_executor& ex)
        : timer(ex)
    {}
    EventSelector selector;
    asio::steady_timer timer;
    std::optional<expected<Event>> result;
};

EventBus::EventBus(asio::io_context& ioc, EventBusOptions options)
    : ioc_(ioc)
    , options_(options)
    , flush_timer_(ioc)
{
    options_.ring_capacity = std::max<std::size_t>(options_.ring_capacity, 1);
    options_.qmp_burst = std::max(options_.qmp_burst, 1.0);
    options_.qmp_rate_per_s = std::max(options_.qmp_rate_per_s, 0.0);
    seq_ = base_ = options_.seq_base;
}

std::uint64_t EventBus::start_of(std::uint64_t since) const noexcept
{
    return since == 0 || since > seq_ ? base_ : since;
}

EventBus::~EventBus()
{
    // Handlers and coroutines still pending check the token before touching the bus.
    life_.reset();
    for (auto& weak : subscribers_) {
        if (auto sub = weak.lock()) {
            sub->bus_ = nullptr;
            sub->queue_.clear();
            sub->lagging_ = false;
            sub->replaying_ = false;
            sub->wake();
        }
    }
    for (auto& w : waiters_) {
        w->result = fail(errc::invalid_state, "the event stream was closed");
        w->timer.cancel();
    }
}

std::size_t EventBus::queue_limit() const noexcept
{
    // One slot for events and one for a lag notice at least.
    return std::max<std::size_t>(options_.subscriber_queue, 2);
}

std::uint64_t EventBus::first_seq() const noexcept
{
    return ring_.empty() ? seq_ + 1 : ring_.front().seq();
}

std::size_t EventBus::subscriber_count() const noexcept
{
    return static_cast<std::size_t>(std::count_if(subscribers_.begin(), subscribers_.end(),
                                                  [](const std::weak_ptr<Subscription>& w) {
                                                      auto sub = w.lock();
                                                      return sub != nullptr && !sub->closed();
                                                  }));
}

std::uint64_t EventBus::emit(std::string_view machine, std::string_view name,
                             const json::Value& data, std::int64_t seconds,
                             std::int64_t microseconds, bool qmp)
{
    auto doc = std::make_shared<json::Document>();
    auto& a = doc->GetAllocator();
    const std::uint64_t seq = ++seq_;
    doc->SetObject();
    doc->AddMember("seq", json::Value(seq), a);
    doc->AddMember("machine", string_value(machine, a), a);
    doc->AddMember("event", string_value(name, a), a);
    json::Value d = data.IsNull() ? json::Value(rapidjson::kObjectType) : deep_copy(data, a);
    doc->AddMember("data", d, a);
    json::Value ts(rapidjson::kObjectType);
    ts.AddMember("seconds", json::Value(static_cast<std::int64_t>(seconds)), a);
    ts.AddMember("microseconds", json::Value(static_cast<std::int64_t>(microseconds)), a);
    doc->AddMember("timestamp", ts, a);
    doc->AddMember("qmp", json::Value(qmp), a);
    append(Event(compact(*doc)));
    return seq;
}

// The ring keeps thousands of events: each is re-parsed into one allocation that fits it. Built
// with AddMember, an event takes ~2.3 KiB (1 KiB pool chunks, 16 members reserved per object);
// parsed, objects get exactly their members and the pool one chunk of about the text's size.
std::shared_ptr<const json::Document> EventBus::compact(const json::Document& doc)
{
    struct Holder
    {
        explicit Holder(std::size_t chunk) : allocator(chunk), doc(&allocator) {}
        json::SmallPoolAllocator allocator;
        json::Document doc;
    };
    const std::string text = json::to_string(doc);
    auto holder = std::make_shared<Holder>(text.size() * 2 + 128);
    holder->doc.Parse<rapidjson::kParseIterativeFlag>(text.data(), text.size());
    assert(!holder->doc.HasParseError());
    return std::shared_ptr<const json::Document>(holder, &holder->doc);
}

void EventBus::append(const Event& e)
{
    assert(!publishing_ && "a listener must not publish");
    publishing_ = true;

    ring_.push_back(e);
    while (ring_.size() > options_.ring_capacity) {
        ring_.pop_front();
    }

    const std::size_t limit = queue_limit();
    for (auto it = subscribers_.begin(); it != subscribers_.end();) {
        auto sub = it->lock();
        if (sub == nullptr || sub->closed()) {
            it = subscribers_.erase(it);
            continue;
        }
        sub->deliver(e, limit);
        ++it;
    }

    // Every pending wait gets its own first match (cancelling only schedules its resumption).
    for (auto it = waiters_.begin(); it != waiters_.end();) {
        auto& w = *it;
        if (w->selector.matches(e)) {
            w->result = e;
            w->timer.cancel();
            it = waiters_.erase(it);
        } else {
            ++it;
        }
    }

    // Listeners last: they may unlisten (or listen) while called, so by index, and a removed one
    // only leaves an empty slot until the loop is over.
    for (std::size_t i = 0; i < listeners_.size(); ++i) { // NOLINT(modernize-loop-convert)
        if (listeners_[i].second) {
            auto listener = listeners_[i].second; // the vector may grow during the call
            listener(e);
        }
    }
    std::erase_if(listeners_, [](const auto& l) { return !l.second; });
    publishing_ = false;
}

std::uint64_t EventBus::publish(std::string_view machine, std::string_view name,
                                const json::Value& data)
{
    const auto now = std::chrono::duration_cast<std::chrono::microseconds>(
                         std::chrono::system_clock::now().time_since_epoch())
                         .count();
    return emit(machine, name, data, now / 1'000'000, now % 1'000'000, false);
}

std::uint64_t EventBus::publish_qmp(std::string_view machine, const qmp::Event& event)
{
    const auto now = std::chrono::steady_clock::now();
    auto it = limiters_.find(machine);
    if (it == limiters_.end()) {
        Limiter fresh;
        fresh.tokens = options_.qmp_burst;
        fresh.refilled = now;
        it = limiters_.emplace(std::string(machine), fresh).first;
    }
    Limiter& lim = it->second;
    const std::chrono::duration<double> elapsed = now - lim.refilled;
    lim.tokens =
        std::min(options_.qmp_burst, lim.tokens + elapsed.count() * options_.qmp_rate_per_s);
    lim.refilled = now;

    if (lim.tokens < 1.0) {
        if (lim.dropped == 0) {
            lim.since_seq = seq_;
            ++machines_with_drops_;
        }
        ++lim.dropped;
        ++dropped_total_;
        arm_flush_timer();
        return 0;
    }
    lim.tokens -= 1.0;
    if (lim.dropped > 0) {
        // The machine is allowed again: its drop count goes first, then the event.
        const DropReport report = take_drops(it->first, lim);
        emit_drops(report);
    }
    return emit(machine, event.name(), event.data(), event.seconds(), event.microseconds(), true);
}

EventBus::DropReport EventBus::take_drops(const std::string& machine, Limiter& limiter)
{
    DropReport report;
    report.machine = machine;
    report.count = limiter.dropped;
    report.since_seq = limiter.since_seq;
    limiter.dropped = 0;
    limiter.since_seq = 0;
    if (report.count > 0 && --machines_with_drops_ == 0) {
        disarm_flush_timer();
    }
    return report;
}

std::uint64_t EventBus::emit_drops(const DropReport& report)
{
    spdlog::debug("events: {} QMP events of '{}' dropped by the rate limit", report.count,
                  report.machine);
    json::Document data;
    data.SetObject();
    data.AddMember("count", json::Value(report.count), data.GetAllocator());
    data.AddMember("since_seq", json::Value(report.since_seq), data.GetAllocator());
    return publish(report.machine, event_names::events_dropped, data);
}

void EventBus::forget_machine(std::string_view machine)
{
    auto it = limiters_.find(machine);
    if (it == limiters_.end()) {
        return;
    }
    const DropReport report = take_drops(it->first, it->second);
    limiters_.erase(it);
    if (report.count > 0) {
        emit_drops(report);
    }
}

void EventBus::arm_flush_timer()
{
    if (flush_armed_) {
        return;
    }
    flush_armed_ = true;
    const std::uint64_t generation = ++flush_generation_;
    flush_timer_.expires_after(options_.drop_report_interval);
    flush_timer_.async_wait(
        [this, life = std::weak_ptr<int>(life_), generation](const error_code& ec) {
            if (ec || life.expired()) {
                return;
            }
            if (generation != flush_generation_) {
                return; // expired just before a disarm or re-arm: that one decides
            }
            flush_armed_ = false;
            flush_drops();
        });
}

void EventBus::disarm_flush_timer()
{
    if (!flush_armed_) {
        return;
    }
    flush_armed_ = false;
    ++flush_generation_;
    flush_timer_.cancel();
}

void EventBus::flush_drops()
{
    // Collect first: publishing runs listeners, and the map must not change under the loop.
    std::vector<DropReport> reports;
    for (auto& [machine, lim] : limiters_) {
        if (lim.dropped > 0) {
            reports.push_back(take_drops(machine, lim));
        }
    }
    for (const auto& r : reports) {
        emit_drops(r);
    }
}

std::vector<Event> EventBus::replay(std::uint64_t since, const EventSelector& selector) const
{
    std::vector<Event> out;
    for (const auto& e : ring_) {
        if (e.seq() > since && selector.matches(e)) {
            out.push_back(e);
        }
    }
    return out;
}

std::shared_ptr<Subscription> EventBus::subscribe(EventSelector selector,
                                                  std::optional<std::uint64_t> since)
{
    auto sub = std::shared_ptr<Subscription>(new Subscription(this, std::move(selector)));
    if (since) {
        const std::uint64_t from = start_of(*since);
        if (from < seq_) {
            sub->replaying_ = true;
            sub->cursor_ = from + 1;
        }
    }
    subscribers_.push_back(sub);
    return sub;
}

std::uint64_t EventBus::listen(Listener listener)
{
    const std::uint64_t id = next_listener_++;
    listeners_.emplace_back(id, std::move(listener));
    return id;
}

void EventBus::unlisten(std::uint64_t id)
{
    for (auto& l : listeners_) {
        if (l.first == id) {
            l.second = nullptr;
        }
    }
    if (!publishing_) {
        std::erase_if(listeners_, [](const auto& l) { return !l.second; });
    }
}

awaitable<expected<Event>> EventBus::wait(EventSelector selector,
                                          std::optional<std::uint64_t> since,
                                          std::chrono::milliseconds timeout)
{
    // The bus may be destroyed while this waits: after the co_await, `this` is touched only while
    // the token says it is alive.
    const std::weak_ptr<int> life = life_;
    const std::string what = describe(selector);
    if (since) {
        const std::uint64_t from = start_of(*since);
        if (from + 1 < first_seq()) {
            co_return fail(errc::invalid_state,
                           fmt::format("events after {} are no longer kept (the oldest is {})",
                                       from, first_seq()));
        }
        for (std::uint64_t s = from + 1; s <= seq_; ++s) {
            const Event& e = at(s);
            if (selector.matches(e)) {
                co_return e;
            }
        }
    }
    if (timeout.count() <= 0) {
        co_return fail(errc::timeout, fmt::format("no {} yet", what));
    }
    auto waiter = std::make_shared<Waiter>(ioc_.get_executor());
    waiter->selector = std::move(selector);
    waiter->timer.expires_at(deadline_after(timeout));
    waiters_.push_back(waiter);
    error_code ec;
    co_await waiter->timer.async_wait(use_ec(ec));
    if (waiter->result) {
        co_return std::move(*waiter->result);
    }
    if (life.expired()) {
        co_return fail(errc::invalid_state, "the event stream was closed");
    }
    waiters_.remove(waiter);
    co_return fail(errc::timeout, fmt::format("no {} within {} ms", what, timeout.count()));
}

} // namespace qm::daemon
