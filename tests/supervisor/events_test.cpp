// SPDX-License-Identifier: GPL-2.0-or-later
// Tests of qm::daemon::EventBus in process (no QEMU): sequence numbers, the event JSON, the ring,
// selectors, subscriptions (resume, lag), server-side waits, listeners, the per-machine rate limit
// and the bus's end. Memory bounds (ring, queues) are asserted along the way.
#include "daemon/supervisor/events.hpp"

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/json.hpp"
#include "libmachine/qmp/message.hpp"
#include "tests/support/loop.hpp"

namespace qm::daemon {
namespace {

using namespace std::chrono_literals;
using test::run_until;
using Clock = std::chrono::steady_clock;

//---- helpers -------------------------------------------------------------------------------------

// Boost 1.74's co_spawn default-constructs the result it hands its completion handler, which
// expected<Event> cannot be: a coroutine stores the result where the test finds it instead.
template <typename T>
awaitable<void> store(awaitable<T> aw, std::shared_ptr<std::optional<T>> out)
{
    T value = co_await std::move(aw);
    out->emplace(std::move(value));
}

// A coroutine started on the loop; its result once done().
template <typename T>
class Async
{
public:
    explicit Async(std::shared_ptr<std::optional<T>> result)
        : result_(std::move(result))
    {}
    bool done() const { return result_->has_value(); }
    T& get() { return **result_; }

private:
    std::shared_ptr<std::optional<T>> result_;
};

template <typename T>
Async<T> spawn(asio::io_context& ioc, awaitable<T> aw)
{
    auto out = std::make_shared<std::optional<T>>();
    asio::co_spawn(ioc, store(std::move(aw), out), [](const std::exception_ptr& e) {
        if (e) {
            ADD_FAILURE() << "a test coroutine threw: " << describe_exception(e);
        }
    });
    return Async<T>(out);
}

json::Document parse(const std::string& text)
{
    auto doc = json::parse(text);
    if (!doc) {
        throw std::invalid_argument("bad JSON in a test: " + text);
    }
    return std::move(*doc);
}

EventSelector sel(std::string machine = {}, std::vector<std::string> names = {},
                  const std::string& match = {})
{
    EventSelector s;
    s.machine = std::move(machine);
    s.names = std::move(names);
    if (!match.empty()) {
        s.match = parse(match);
    }
    return s;
}

// A QMP event as QEMU sends it, through the same decoder the client uses.
qmp::Event qmp_event(const std::string& name, const std::string& data = "{}",
                     std::int64_t seconds = 1700000000, std::int64_t micros = 123456)
{
    auto msg = qmp::decode(
        fmt::format(R"({{"event":"{}","data":{},"timestamp":{{"seconds":{},"microseconds":{}}}}})",
                    name, data, seconds, micros));
    if (!msg || msg->kind != qmp::Message::Kind::event) {
        throw std::invalid_argument("bad QMP event in a test: " + name);
    }
    return qmp::Event(std::move(msg->doc));
}

std::uint64_t publish(EventBus& bus, std::string_view machine, std::string_view name,
                      const std::string& data = "{}")
{
    const json::Document d = parse(data);
    return bus.publish(machine, name, d);
}

// Every item a subscription has ready now.
std::vector<StreamItem> drain(Subscription& sub)
{
    std::vector<StreamItem> out;
    while (auto item = sub.try_next()) {
        out.push_back(std::move(*item));
    }
    return out;
}

// Checks a subscriber's view of an everything-selector stream: events in order without gaps,
// except where a lag notice names the gap exactly. Returns the next seq it expects.
std::uint64_t check_contiguous(const std::vector<StreamItem>& items, std::uint64_t expect)
{
    for (const auto& item : items) {
        if (item.lagged_from != 0) {
            EXPECT_FALSE(item.event.valid());
            EXPECT_EQ(item.lagged_from, expect) << "a lag notice must name the first missed seq";
            EXPECT_GT(item.resume_seq, item.lagged_from);
            expect = item.resume_seq;
        } else {
            EXPECT_TRUE(item.event.valid());
            EXPECT_EQ(item.event.seq(), expect) << "an event was lost or reordered";
            expect = item.event.seq() + 1;
        }
    }
    return expect;
}

// No timer or handler left on the loop: idle machines cost no wake-ups.
bool loop_idle(asio::io_context& ioc)
{
    ioc.restart();
    ioc.poll();
    return ioc.stopped();
}

class EventBusTest : public testing::Test
{
protected:
    void make_bus(EventBusOptions options)
    {
        bus_.reset();
        bus_ = std::make_unique<EventBus>(ioc_, options);
    }
    EventBus& bus() { return *bus_; }

    asio::io_context ioc_{1};
    std::unique_ptr<EventBus> bus_ = std::make_unique<EventBus>(ioc_);
};

//---- sequence numbers, JSON, the ring ------------------------------------------------------------

TEST_F(EventBusTest, SequenceNumbersStartAtOneAndIncrease)
{
    EXPECT_EQ(bus().last_seq(), 0u);
    EXPECT_EQ(bus().first_seq(), 1u);
    EXPECT_EQ(publish(bus(), "a", event_names::machine_created, R"({"uuid":"u"})"), 1u);
    EXPECT_EQ(publish(bus(), "a", event_names::state_changed), 2u);
    EXPECT_EQ(bus().publish_qmp("a", qmp_event("STOP")), 3u);
    EXPECT_EQ(publish(bus(), "", "DAEMON_STARTED"), 4u);
    EXPECT_EQ(bus().last_seq(), 4u);
    EXPECT_EQ(bus().first_seq(), 1u);
    const auto all = bus().replay(0, sel());
    ASSERT_EQ(all.size(), 4u);
    for (std::size_t i = 0; i < all.size(); ++i) {
        EXPECT_EQ(all[i].seq(), i + 1);
    }
}

TEST_F(EventBusTest, DaemonEventJsonShape)
{
    const auto before = std::chrono::duration_cast<std::chrono::microseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count();
    publish(bus(), "vm1", event_names::state_changed,
            R"({"state":"paused","previous":"running","reason":{"kind":"user"}})");
    const auto after = std::chrono::duration_cast<std::chrono::microseconds>(
                           std::chrono::system_clock::now().time_since_epoch())
                           .count();
    const Event e = bus().replay(0, sel()).at(0);
    ASSERT_TRUE(e.valid());
    EXPECT_EQ(e.seq(), 1u);
    EXPECT_EQ(e.machine(), "vm1");
    EXPECT_EQ(e.name(), "STATE_CHANGED");
    EXPECT_FALSE(e.is_qmp());
    EXPECT_EQ(json::get_string(e.data(), "state"), "paused");
    EXPECT_GE(e.timestamp_us(), before);
    EXPECT_LE(e.timestamp_us(), after);

    // The whole object, as the front ends send it.
    const json::Document j = parse(e.to_json());
    ASSERT_TRUE(j.IsObject());
    EXPECT_EQ(j.MemberCount(), 6u);
    EXPECT_EQ(j["seq"].GetUint64(), 1u);
    EXPECT_STREQ(j["machine"].GetString(), "vm1");
    EXPECT_STREQ(j["event"].GetString(), "STATE_CHANGED");
    EXPECT_STREQ(j["data"]["reason"]["kind"].GetString(), "user");
    ASSERT_TRUE(j["timestamp"].IsObject());
    EXPECT_EQ(j["timestamp"]["seconds"].GetInt64() * 1'000'000 +
                  j["timestamp"]["microseconds"].GetInt64(),
              e.timestamp_us());
    EXPECT_GE(j["timestamp"]["microseconds"].GetInt64(), 0);
    EXPECT_LT(j["timestamp"]["microseconds"].GetInt64(), 1'000'000);
    EXPECT_TRUE(j["qmp"].IsFalse());
    EXPECT_EQ(e.to_json().rfind(R"({"seq":1,"machine":"vm1","event":"STATE_CHANGED","data":)", 0),
              0u);

    // null data becomes {}; the daemon's own events have an empty machine.
    publish(bus(), "", "DAEMON_STARTED", "null");
    const Event d = bus().replay(1, sel()).at(0);
    EXPECT_EQ(d.machine(), "");
    EXPECT_TRUE(d.data().IsObject());
    EXPECT_EQ(d.data().MemberCount(), 0u);
}

TEST_F(EventBusTest, QmpEventJsonShape)
{
    bus().publish_qmp("vm2", qmp_event("STOP", R"({"reason":"x"})", 1700000001, 42));
    bus().publish_qmp(
        "vm2", qmp::Event(std::make_shared<json::Document>(
                   parse(R"({"event":"RESUME","timestamp":{"seconds":5,"microseconds":6}})"))));
    const auto all = bus().replay(0, sel());
    ASSERT_EQ(all.size(), 2u);
    const Event& e = all[0];
    EXPECT_EQ(e.machine(), "vm2");
    EXPECT_EQ(e.name(), "STOP");
    EXPECT_TRUE(e.is_qmp());
    EXPECT_EQ(e.timestamp_us(), 1700000001LL * 1'000'000 + 42);
    EXPECT_EQ(e.to_json(), R"({"seq":1,"machine":"vm2","event":"STOP","data":{"reason":"x"},)"
                           R"("timestamp":{"seconds":1700000001,"microseconds":42},"qmp":true})");
    // An event without data gets {}.
    EXPECT_EQ(all[1].to_json(), R"({"seq":2,"machine":"vm2","event":"RESUME","data":{},)"
                                R"("timestamp":{"seconds":5,"microseconds":6},"qmp":true})");
}

TEST_F(EventBusTest, EventOwnsItsData)
{
    // Data built with references to the caller's strings: the event must copy them.
    std::string value = "original";
    std::string key = "key";
    {
        json::Document d;
        d.SetObject();
        json::Value arr(rapidjson::kArrayType);
        arr.PushBack(json::Value(rapidjson::StringRef(value.c_str(), value.size())),
                     d.GetAllocator());
        d.AddMember(json::Value(rapidjson::StringRef(key.c_str(), key.size())),
                    json::Value(rapidjson::StringRef(value.c_str(), value.size())),
                    d.GetAllocator());
        d.AddMember("list", arr, d.GetAllocator());
        bus().publish("a", "X", d);
    }
    value.assign("changed!");
    key.assign("KEY");
    const json::Document j = parse(bus().replay(0, sel()).at(0).to_json());
    EXPECT_STREQ(j["data"]["key"].GetString(), "original");
    EXPECT_STREQ(j["data"]["list"][0].GetString(), "original");
}

TEST_F(EventBusTest, RingEvictsOldestAndReplays)
{
    EventBusOptions o;
    o.ring_capacity = 5;
    make_bus(o);
    for (int i = 0; i < 12; ++i) {
        publish(bus(), i % 2 == 0 ? "a" : "b", "E");
        EXPECT_LE(bus().replay(0, sel()).size(), 5u);
        EXPECT_LE(bus().last_seq() - bus().first_seq() + 1, 5u);
    }
    EXPECT_EQ(bus().first_seq(), 8u);
    EXPECT_EQ(bus().last_seq(), 12u);
    auto all = bus().replay(0, sel());
    ASSERT_EQ(all.size(), 5u);
    EXPECT_EQ(all.front().seq(), 8u);
    EXPECT_EQ(all.back().seq(), 12u);
    auto after10 = bus().replay(10, sel());
    ASSERT_EQ(after10.size(), 2u);
    EXPECT_EQ(after10[0].seq(), 11u);
    auto of_b = bus().replay(0, sel("b"));
    ASSERT_EQ(of_b.size(), 3u); // b has the even numbers
    EXPECT_EQ(of_b[0].seq(), 8u);
    EXPECT_EQ(of_b[2].seq(), 12u);
    EXPECT_TRUE(bus().replay(12, sel()).empty());
}

TEST_F(EventBusTest, SelectorByMachineNamesAndMatch)
{
    publish(bus(), "a", event_names::state_changed, R"({"state":"running","previous":"paused"})");
    publish(bus(), "b", event_names::state_changed, R"({"state":"running"})");
    publish(bus(), "a", event_names::state_changed, R"({"state":"paused"})");
    bus().publish_qmp("a", qmp_event("STOP"));
    bus().publish_qmp("a", qmp_event("RESUME"));

    auto seqs = [&](const EventSelector& s) {
        std::vector<std::uint64_t> out;
        for (const auto& e : bus().replay(0, s)) {
            out.push_back(e.seq());
        }
        return out;
    };
    using V = std::vector<std::uint64_t>;
    EXPECT_EQ(seqs(sel()), (V{1, 2, 3, 4, 5}));
    EXPECT_EQ(seqs(sel("a")), (V{1, 3, 4, 5}));
    EXPECT_EQ(seqs(sel("c")), V{});
    EXPECT_EQ(seqs(sel({}, {"STOP", "RESUME"})), (V{4, 5}));
    EXPECT_EQ(seqs(sel("a", {"STATE_CHANGED"})), (V{1, 3}));
    EXPECT_EQ(seqs(sel({}, {}, R"({"data":{"state":"running"}})")), (V{1, 2}));
    EXPECT_EQ(seqs(sel("a", {}, R"({"data":{"state":"running"}})")), V{1});
    // The seed's rules: {"key": null} asks only that the key exists; {} matches anything.
    EXPECT_EQ(seqs(sel({}, {}, R"({"data":{"previous":null}})")), V{1});
    EXPECT_EQ(seqs(sel({}, {}, "{}")), (V{1, 2, 3, 4, 5}));
    EXPECT_EQ(seqs(sel({}, {}, R"({"qmp":true})")), (V{4, 5}));
    EXPECT_EQ(seqs(sel({}, {}, R"({"seq":3})")), V{3});
}

//---- subscriptions -------------------------------------------------------------------------------

TEST_F(EventBusTest, SubscribeFromNow)
{
    publish(bus(), "a", "OLD");
    auto sub = bus().subscribe(sel());
    EXPECT_EQ(bus().subscriber_count(), 1u);
    EXPECT_FALSE(sub->try_next());
    publish(bus(), "a", "NEW1");
    publish(bus(), "b", "NEW2");
    EXPECT_EQ(sub->queued(), 2u);
    auto items = drain(*sub);
    ASSERT_EQ(items.size(), 2u);
    EXPECT_EQ(items[0].event.name(), "NEW1");
    EXPECT_EQ(items[0].event.seq(), 2u);
    EXPECT_EQ(items[1].event.seq(), 3u);
    EXPECT_EQ(items[0].lagged_from, 0u);

    // A selector filters what is queued.
    auto only_b = bus().subscribe(sel("b"));
    publish(bus(), "a", "X");
    publish(bus(), "b", "Y");
    auto b_items = drain(*only_b);
    ASSERT_EQ(b_items.size(), 1u);
    EXPECT_EQ(b_items[0].event.name(), "Y");

    // A subscription its owner drops is forgotten.
    only_b.reset();
    EXPECT_EQ(bus().subscriber_count(), 1u);
    sub->close();
    EXPECT_TRUE(sub->closed());
    EXPECT_EQ(bus().subscriber_count(), 0u);
    publish(bus(), "a", "Z");
    EXPECT_FALSE(sub->try_next());
    EXPECT_EQ(sub->queued(), 0u);
}

TEST_F(EventBusTest, SubscribeSinceResumesWithoutLoss)
{
    EventBusOptions o;
    o.ring_capacity = 4096;
    o.subscriber_queue = 16; // far fewer than are replayed: the replay must not go through it
    make_bus(o);
    for (int i = 0; i < 3000; ++i) {
        publish(bus(), "a", "E");
    }
    auto sub = bus().subscribe(sel(), 100);
    std::uint64_t expect = 101;
    // Read slowly while more are published: the reader moves from the ring to its queue.
    for (int round = 0; round < 400; ++round) {
        for (int i = 0; i < 10; ++i) {
            publish(bus(), "b", "F");
            EXPECT_LE(sub->queued(), 16u);
        }
        for (int i = 0; i < 12; ++i) {
            auto item = sub->try_next();
            if (!item) {
                break;
            }
            ASSERT_EQ(item->lagged_from, 0u) << "lagged at round " << round;
            ASSERT_EQ(item->event.seq(), expect);
            ++expect;
        }
    }
    expect = check_contiguous(drain(*sub), expect);
    EXPECT_EQ(expect, bus().last_seq() + 1);
    // And it goes on live.
    publish(bus(), "a", "LIVE");
    auto live = drain(*sub);
    ASSERT_EQ(live.size(), 1u);
    EXPECT_EQ(live[0].event.name(), "LIVE");

    // since == last_seq(): from now on; a selector applies to the replay too.
    auto none = bus().subscribe(sel(), bus().last_seq());
    EXPECT_FALSE(none->try_next());
    auto of_a = bus().subscribe(sel("a"), 2990);
    auto a_items = drain(*of_a);
    ASSERT_EQ(a_items.size(), 11u); // 2991..3000 and LIVE
    EXPECT_EQ(a_items.front().event.seq(), 2991u);
    EXPECT_EQ(a_items.back().event.name(), "LIVE");
}

TEST_F(EventBusTest, ResumeThroughNextAcrossManyEvents)
{
    EventBusOptions o;
    o.subscriber_queue = 8;
    make_bus(o);
    for (int i = 0; i < 500; ++i) {
        publish(bus(), "a", "E");
    }
    auto sub = bus().subscribe(sel(), 0);
    // The reader: takes 1000 items with next(), which suspends whenever none is ready.
    auto reader = [](std::shared_ptr<Subscription> s) -> awaitable<std::vector<StreamItem>> {
        std::vector<StreamItem> got;
        while (got.size() < 1000) {
            auto item = co_await s->next(5s);
            if (!item) {
                break;
            }
            got.push_back(std::move(*item));
        }
        co_return got;
    };
    auto r = spawn(ioc_, reader(sub));
    // The writer publishes the other 500 in small bursts the reader keeps up with.
    for (int i = 0; i < 500; i += 5) {
        for (int j = 0; j < 5; ++j) {
            publish(bus(), "a", "E");
        }
        ASSERT_TRUE(run_until(ioc_, [&] { return sub->queued() == 0 || r.done(); }));
    }
    ASSERT_TRUE(run_until(ioc_, [&] { return r.done(); }));
    ASSERT_EQ(r.get().size(), 1000u);
    EXPECT_EQ(check_contiguous(r.get(), 1), 1001u);
}

TEST_F(EventBusTest, LagByQueueOverflow)
{
    EventBusOptions o;
    o.subscriber_queue = 8;
    make_bus(o);
    auto sub = bus().subscribe(sel());
    for (int i = 0; i < 20; ++i) {
        publish(bus(), "a", "E");
        EXPECT_LE(sub->queued(), 8u);
    }
    EXPECT_EQ(sub->queued(), 8u);
    auto items = drain(*sub);
    ASSERT_EQ(items.size(), 8u);
    for (std::size_t i = 0; i < 7; ++i) {
        EXPECT_EQ(items[i].event.seq(), i + 1);
    }
    // Seven events, then one notice: 8..20 were lost, nothing from 21 on will be.
    EXPECT_EQ(items[7].lagged_from, 8u);
    EXPECT_EQ(items[7].resume_seq, 21u);
    EXPECT_FALSE(items[7].event.valid());
    for (int i = 0; i < 5; ++i) {
        publish(bus(), "a", "E");
    }
    EXPECT_EQ(check_contiguous(drain(*sub), 21), 26u);

    // Reading part of a full queue: the subscription goes on as soon as there is room, and the
    // notice names where it resumed.
    for (int i = 0; i < 10; ++i) {
        publish(bus(), "a", "E"); // 26..32 queued, 33 opens a notice, 34, 35 dropped
    }
    std::vector<StreamItem> got;
    got.reserve(10);
    for (int i = 0; i < 2; ++i) {
        got.push_back(*sub->try_next()); // 26, 27
    }
    publish(bus(), "a", "E"); // 36: room for it, the notice says 33..35 were lost
    publish(bus(), "a", "E"); // 37: full again, a new notice
    publish(bus(), "a", "E"); // 38: dropped
    EXPECT_LE(sub->queued(), 8u);
    auto rest = drain(*sub);
    got.insert(got.end(), rest.begin(), rest.end());
    ASSERT_EQ(got.size(), 10u);
    EXPECT_EQ(got[7].lagged_from, 33u);
    EXPECT_EQ(got[7].resume_seq, 36u);
    EXPECT_EQ(got[8].event.seq(), 36u);
    EXPECT_EQ(got[9].lagged_from, 37u);
    EXPECT_EQ(got[9].resume_seq, 39u);
    EXPECT_EQ(check_contiguous(got, 26), 39u);
}

TEST_F(EventBusTest, LagNeverLosesAnythingAfterResume)
{
    // A reader taking random amounts while a writer publishes random bursts: every event is
    // either read, in order, or inside a gap a notice names exactly.
    EventBusOptions o;
    o.subscriber_queue = 32;
    o.ring_capacity = 64;
    make_bus(o);
    auto sub = bus().subscribe(sel());
    std::mt19937 rng(7); // NOLINT(cert-msc51-cpp): reproducible on purpose
    std::uint64_t expect = 1;
    int notices = 0;
    for (int round = 0; round < 2000; ++round) {
        const int burst = static_cast<int>(rng() % 40);
        for (int i = 0; i < burst; ++i) {
            publish(bus(), "a", "E");
            ASSERT_LE(sub->queued(), 32u);
        }
        const int reads = static_cast<int>(rng() % 40);
        std::vector<StreamItem> items;
        for (int i = 0; i < reads; ++i) {
            auto item = sub->try_next();
            if (!item) {
                break;
            }
            notices += item->lagged_from != 0 ? 1 : 0;
            items.push_back(std::move(*item));
        }
        expect = check_contiguous(items, expect);
    }
    expect = check_contiguous(drain(*sub), expect);
    EXPECT_EQ(expect, bus().last_seq() + 1);
    EXPECT_GT(notices, 0);
}

TEST_F(EventBusTest, SlowSubscriberDoesNotHoldBackOthers)
{
    EventBusOptions o;
    o.subscriber_queue = 4;
    make_bus(o);
    auto slow = bus().subscribe(sel());
    auto fast = bus().subscribe(sel());
    std::uint64_t expect = 1;
    for (int i = 0; i < 1000; ++i) {
        publish(bus(), "a", "E");
        expect = check_contiguous(drain(*fast), expect);
        ASSERT_LE(slow->queued(), 4u);
    }
    EXPECT_EQ(expect, 1001u);
    auto items = drain(*slow);
    ASSERT_EQ(items.size(), 4u);
    EXPECT_EQ(items[3].lagged_from, 4u);
    EXPECT_EQ(items[3].resume_seq, 1001u);
}

TEST_F(EventBusTest, LagBySinceOlderThanRing)
{
    EventBusOptions o;
    o.ring_capacity = 10;
    make_bus(o);
    for (int i = 0; i < 30; ++i) {
        publish(bus(), "a", "E");
    }
    auto sub = bus().subscribe(sel(), 5);
    auto items = drain(*sub);
    ASSERT_EQ(items.size(), 11u);
    EXPECT_EQ(items[0].lagged_from, 6u); // first the notice...
    EXPECT_EQ(items[0].resume_seq, 21u);
    EXPECT_EQ(check_contiguous(items, 6), 31u); // ...then what the ring holds
    publish(bus(), "a", "E");
    EXPECT_EQ(check_contiguous(drain(*sub), 31), 32u);

    // A reader still replaying when the ring moves past it is told so too.
    auto slow = bus().subscribe(sel(), 22); // ring: 23..32
    ASSERT_EQ(slow->try_next()->event.seq(), 23u);
    ASSERT_EQ(slow->try_next()->event.seq(), 24u);
    for (int i = 0; i < 15; ++i) {
        publish(bus(), "a", "E"); // 32..46; the ring now holds 37..46
    }
    EXPECT_EQ(slow->queued(), 0u); // replaying readers take no memory of their own
    auto rest = drain(*slow);
    ASSERT_FALSE(rest.empty());
    EXPECT_EQ(rest[0].lagged_from, 25u);
    EXPECT_EQ(rest[0].resume_seq, 37u);
    EXPECT_EQ(check_contiguous(rest, 25), 47u);

    // A since from an earlier run of the daemon (beyond last_seq()) counts as 0.
    auto future = bus().subscribe(sel(), 1000);
    auto f = drain(*future);
    ASSERT_FALSE(f.empty());
    EXPECT_EQ(f[0].lagged_from, 1u);
    EXPECT_EQ(f[0].resume_seq, 37u);
}

TEST_F(EventBusTest, NextWaitsTimesOutAndIsWokenByClose)
{
    auto sub = bus().subscribe(sel());
    // Nothing comes: a timeout (the SSE front end sends a keep-alive).
    const auto t0 = Clock::now();
    auto to = test::run_co(ioc_, sub->next(30ms));
    ASSERT_FALSE(to);
    EXPECT_TRUE(to.error().is(errc::timeout));
    EXPECT_GE(Clock::now() - t0, 30ms);

    // An event published while next() waits wakes it.
    auto a = spawn(ioc_, sub->next(5s));
    ioc_.restart();
    ioc_.poll();
    EXPECT_FALSE(a.done());
    // A second reader at the same time is refused.
    auto second = test::run_co(ioc_, sub->next(5s));
    ASSERT_FALSE(second);
    EXPECT_TRUE(second.error().is(errc::invalid_state));
    publish(bus(), "a", "E");
    ASSERT_TRUE(run_until(
        ioc_, [&] { return a.done(); }, 1s));
    ASSERT_TRUE(a.get());
    EXPECT_EQ(a.get()->event.seq(), 1u);

    // close() wakes a pending next() with invalid_state.
    auto b = spawn(ioc_, sub->next(10s));
    ioc_.restart();
    ioc_.poll();
    EXPECT_FALSE(b.done());
    const auto t1 = Clock::now();
    sub->close();
    ASSERT_TRUE(run_until(
        ioc_, [&] { return b.done(); }, 1s));
    EXPECT_LT(Clock::now() - t1, 1s);
    ASSERT_FALSE(b.get());
    EXPECT_TRUE(b.get().error().is(errc::invalid_state));
    auto c = test::run_co(ioc_, sub->next(10s));
    ASSERT_FALSE(c);
    EXPECT_TRUE(c.error().is(errc::invalid_state));
    EXPECT_TRUE(loop_idle(ioc_));
}

//---- waits ---------------------------------------------------------------------------------------

TEST_F(EventBusTest, WaitFindsInRing)
{
    bus().publish_qmp("a", qmp_event("STOP"));
    bus().publish_qmp("a", qmp_event("RESUME"));
    publish(bus(), "a", event_names::state_changed, R"({"state":"running"})");
    bus().publish_qmp("b", qmp_event("STOP"));

    auto first = test::run_co(ioc_, bus().wait(sel({}, {"STOP"}), 0, 1s));
    ASSERT_TRUE(first);
    EXPECT_EQ(first->seq(), 1u);
    auto after1 = test::run_co(ioc_, bus().wait(sel({}, {"STOP"}), 1, 1s));
    ASSERT_TRUE(after1);
    EXPECT_EQ(after1->seq(), 4u);
    EXPECT_EQ(after1->machine(), "b");
    auto matched =
        test::run_co(ioc_, bus().wait(sel("a", {}, R"({"data":{"state":"running"}})"), 0, 1s));
    ASSERT_TRUE(matched);
    EXPECT_EQ(matched->seq(), 3u);
    // A zero timeout only looks in the ring.
    auto none = test::run_co(ioc_, bus().wait(sel({}, {"SHUTDOWN"}), 0, 0ms));
    ASSERT_FALSE(none);
    EXPECT_TRUE(none.error().is(errc::timeout));
    EXPECT_TRUE(loop_idle(ioc_));
}

TEST_F(EventBusTest, WaitFromNowIgnoresTheRing)
{
    bus().publish_qmp("a", qmp_event("STOP"));
    auto w = spawn(ioc_, bus().wait(sel({}, {"STOP"}), std::nullopt, 5s));
    ioc_.restart();
    ioc_.poll();
    EXPECT_FALSE(w.done()) << "an older matching event in the ring must not be returned";
    bus().publish_qmp("a", qmp_event("RESUME"));
    bus().publish_qmp("b", qmp_event("STOP"));
    ASSERT_TRUE(run_until(
        ioc_, [&] { return w.done(); }, 1s));
    ASSERT_TRUE(w.get());
    EXPECT_EQ(w.get()->seq(), 3u);
    EXPECT_EQ(w.get()->machine(), "b");

    // With since: a match published after since but before the wait started is found.
    auto late = test::run_co(ioc_, bus().wait(sel({}, {"RESUME"}), 1, 1s));
    ASSERT_TRUE(late);
    EXPECT_EQ(late->seq(), 2u);
}

TEST_F(EventBusTest, WaitTimesOut)
{
    publish(bus(), "a", "E");
    const auto t0 = Clock::now();
    auto r = test::run_co(ioc_, bus().wait(sel({}, {"NEVER"}), 0, 50ms));
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::timeout));
    EXPECT_NE(r.error().message.find("NEVER"), std::string::npos) << r.error().message;
    EXPECT_GE(Clock::now() - t0, 50ms);
    // The timed-out wait is gone: publishing afterwards finds no one.
    publish(bus(), "a", "NEVER");
    EXPECT_TRUE(loop_idle(ioc_));
}

TEST_F(EventBusTest, WaitWithSinceOlderThanRingIsInvalid)
{
    EventBusOptions o;
    o.ring_capacity = 5;
    make_bus(o);
    for (int i = 0; i < 10; ++i) {
        publish(bus(), "a", "E");
    }
    ASSERT_EQ(bus().first_seq(), 6u);
    for (std::uint64_t since : {0, 2, 4}) {
        auto r = test::run_co(ioc_, bus().wait(sel(), since, 1s));
        ASSERT_FALSE(r);
        EXPECT_TRUE(r.error().is(errc::invalid_state)) << since;
    }
    // since 5: seq 6 is the oldest kept, so the window is whole.
    auto ok = test::run_co(ioc_, bus().wait(sel(), 5, 1s));
    ASSERT_TRUE(ok);
    EXPECT_EQ(ok->seq(), 6u);
}

TEST_F(EventBusTest, ConcurrentWaits)
{
    std::vector<Async<expected<Event>>> stops;
    std::vector<Async<expected<Event>>> runs;
    for (int i = 0; i < 50; ++i) {
        stops.push_back(spawn(ioc_, bus().wait(sel({}, {"STOP"}), std::nullopt, 5s)));
        runs.push_back(spawn(
            ioc_, bus().wait(sel("b", {}, R"({"data":{"status":"running"}})"), std::nullopt, 5s)));
    }
    auto timeout = spawn(ioc_, bus().wait(sel({}, {"NEVER"}), std::nullopt, 20ms));
    ioc_.restart();
    ioc_.poll();
    publish(bus(), "b", "X", R"({"status":"paused"})");
    bus().publish_qmp("a", qmp_event("STOP"));
    publish(bus(), "b", "X", R"({"status":"running"})");
    bus().publish_qmp("a", qmp_event("STOP"));
    ASSERT_TRUE(run_until(ioc_, [&] {
        for (auto& s : stops) {
            if (!s.done()) {
                return false;
            }
        }
        for (auto& r : runs) {
            if (!r.done()) {
                return false;
            }
        }
        return timeout.done();
    }));
    for (auto& s : stops) {
        ASSERT_TRUE(s.get());
        EXPECT_EQ(s.get()->seq(), 2u); // every waiter gets the first match, none consumes it
    }
    for (auto& r : runs) {
        ASSERT_TRUE(r.get());
        EXPECT_EQ(r.get()->seq(), 3u);
    }
    ASSERT_FALSE(timeout.get());
    EXPECT_TRUE(timeout.get().error().is(errc::timeout));
    EXPECT_TRUE(loop_idle(ioc_));
}

TEST_F(EventBusTest, DestroyedBusCompletesPendingWaitsAndReads)
{
    publish(bus(), "a", "E1");
    auto replaying = bus().subscribe(sel(), 0);
    auto sub = bus().subscribe(sel());
    publish(bus(), "a", "E2");
    std::vector<Async<expected<Event>>> waits;
    waits.reserve(10);
    for (int i = 0; i < 10; ++i) {
        waits.push_back(spawn(ioc_, bus().wait(sel({}, {"NEVER"}), std::nullopt, 10s)));
    }
    auto read = spawn(ioc_, sub->next(10s));
    ioc_.restart();
    ioc_.poll();
    ASSERT_TRUE(read.done()); // an event was queued
    auto pending = spawn(ioc_, sub->next(10s));
    ioc_.restart();
    ioc_.poll();
    EXPECT_FALSE(pending.done());

    bus_.reset();
    ASSERT_TRUE(run_until(
        ioc_,
        [&] {
            for (auto& w : waits) {
                if (!w.done()) {
                    return false;
                }
            }
            return pending.done();
        },
        1s));
    for (auto& w : waits) {
        ASSERT_FALSE(w.get());
        EXPECT_TRUE(w.get().error().is(errc::invalid_state));
    }
    ASSERT_FALSE(pending.get());
    EXPECT_TRUE(pending.get().error().is(errc::invalid_state));
    // The subscriptions outlive the bus harmlessly.
    EXPECT_FALSE(sub->try_next());
    EXPECT_FALSE(replaying->try_next());
    auto after = test::run_co(ioc_, replaying->next(1s));
    ASSERT_FALSE(after);
    EXPECT_TRUE(after.error().is(errc::invalid_state));
    sub->close();
    EXPECT_TRUE(loop_idle(ioc_));
}

//---- listeners -----------------------------------------------------------------------------------

TEST_F(EventBusTest, ListenersAreCalledInOrderAndCanUnlisten)
{
    std::vector<std::string> calls;
    const auto first =
        bus().listen([&](const Event& e) { calls.push_back(fmt::format("1:{}", e.seq())); });
    std::uint64_t self_removing = 0;
    self_removing = bus().listen([&](const Event& e) {
        calls.push_back(fmt::format("2:{}", e.seq()));
        if (e.seq() == 2) {
            bus().unlisten(self_removing); // removing itself while being called
        }
    });
    bus().listen([&](const Event& e) { calls.push_back(fmt::format("3:{}", e.name())); });
    publish(bus(), "a", "A");
    bus().publish_qmp("a", qmp_event("B"));
    publish(bus(), "a", "C");
    bus().unlisten(first);
    publish(bus(), "a", "D");
    bus().unlisten(12345); // unknown: nothing happens
    EXPECT_EQ(calls, (std::vector<std::string>{"1:1", "2:1", "3:A", "1:2", "2:2", "3:B", "1:3",
                                               "3:C", "3:D"}));
}

//---- the rate limit ------------------------------------------------------------------------------

TEST_F(EventBusTest, FloodingMachineIsRateLimited)
{
    EventBusOptions o;
    o.ring_capacity = 2048;
    // So slow that no token comes back during the flood, however slow the build: exact counts.
    o.qmp_rate_per_s = 0.01;
    o.qmp_burst = 400;
    o.drop_report_interval = 200ms;
    make_bus(o);
    std::vector<Event> dropped_notices;
    bus().listen([&](const Event& e) {
        if (e.name() == event_names::events_dropped) {
            dropped_notices.push_back(e);
        }
    });
    auto sub = bus().subscribe(sel());

    const qmp::Event flood = qmp_event("BLOCK_IO_ERROR", R"({"device":"d0"})");
    std::uint64_t published = 0;
    std::uint64_t last_published = 0;
    std::uint64_t first_drop_since = 0;
    std::uint64_t b_published = 0;
    for (int i = 0; i < 10000; ++i) {
        const std::uint64_t seq = bus().publish_qmp("flood", flood);
        if (seq != 0) {
            ++published;
            last_published = seq;
        } else if (first_drop_since == 0) {
            first_drop_since = bus().last_seq();
        }
        if (i % 100 == 0) {
            // Another machine's events all get through, and daemon events are never dropped.
            b_published += bus().publish_qmp("b", qmp_event("RTC_CHANGE")) != 0 ? 1 : 0;
            publish(bus(), "flood", event_names::state_changed);
        }
        ASSERT_LE(sub->queued(), o.subscriber_queue);
    }
    EXPECT_EQ(published, 400u);
    EXPECT_EQ(bus().dropped_total(), 10000 - published);
    EXPECT_EQ(b_published, 100u);
    EXPECT_LE(last_published, bus().last_seq());
    EXPECT_TRUE(dropped_notices.empty()) << "reported before the timer or an allowed event";

    // The ring still holds every event of the other machine.
    auto of_b = bus().replay(0, sel("b"));
    EXPECT_EQ(of_b.size(), 100u);
    EXPECT_EQ(bus().replay(0, sel("flood", {std::string(event_names::state_changed)})).size(),
              100u);
    EXPECT_LE(bus().replay(0, sel()).size(), 2048u);

    // The flush timer reports the drops with their exact count, once.
    ASSERT_TRUE(run_until(
        ioc_, [&] { return !dropped_notices.empty(); }, 5s));
    ASSERT_EQ(dropped_notices.size(), 1u);
    const Event& n = dropped_notices[0];
    EXPECT_EQ(n.machine(), "flood");
    EXPECT_FALSE(n.is_qmp());
    EXPECT_EQ(json::get_int(n.data(), "count"), static_cast<std::int64_t>(10000 - published));
    EXPECT_EQ(json::get_int(n.data(), "since_seq"), static_cast<std::int64_t>(first_drop_since));
    EXPECT_TRUE(loop_idle(ioc_)) << "the flush timer must not stay armed without drops";
    EXPECT_EQ(dropped_notices.size(), 1u);
}

TEST_F(EventBusTest, DropsAreReportedWithTheNextAllowedEvent)
{
    EventBusOptions o;
    o.qmp_rate_per_s = 100;
    o.qmp_burst = 10;
    o.drop_report_interval = 60s; // the timer must not be what reports here
    make_bus(o);
    std::uint64_t reported = 0;
    bus().listen([&](const Event& e) {
        if (e.name() == event_names::events_dropped) {
            reported += static_cast<std::uint64_t>(json::get_int(e.data(), "count").value_or(0));
        }
    });
    const qmp::Event ev = qmp_event("X");
    std::uint64_t published = 0;
    for (int i = 0; i < 50; ++i) {
        published += bus().publish_qmp("a", ev) != 0 ? 1 : 0;
    }
    ASSERT_LT(published, 50u);
    const std::uint64_t dropped = bus().dropped_total();
    EXPECT_EQ(dropped, 50 - published);
    EXPECT_FALSE(loop_idle(ioc_)) << "drops pending: the flush timer is armed";

    // A token comes back within 10 ms (waiting for time to pass is the point here).
    const auto until = Clock::now() + 15ms;
    run_until(ioc_, [&] { return Clock::now() >= until; });
    const std::uint64_t seq = bus().publish_qmp("a", ev);
    ASSERT_NE(seq, 0u);
    auto last = bus().replay(seq - 2, sel());
    ASSERT_EQ(last.size(), 2u);
    EXPECT_EQ(last[0].name(), event_names::events_dropped);
    EXPECT_EQ(last[0].machine(), "a");
    EXPECT_EQ(reported, dropped) << "every drop is reported, exactly";
    if (static_cast<std::int64_t>(reported) ==
        json::get_int(last[0].data(), "count")) { // no token came back mid-flood
        EXPECT_EQ(json::get_int(last[0].data(), "since_seq"), static_cast<std::int64_t>(published));
    }
    EXPECT_EQ(last[1].seq(), seq);
    EXPECT_EQ(last[1].name(), "X");
    // Nothing pending any more: the timer is disarmed.
    EXPECT_TRUE(loop_idle(ioc_));
}

TEST_F(EventBusTest, IdleMachinesCauseNoWakeUps)
{
    for (int m = 0; m < 100; ++m) {
        for (int i = 0; i < 5; ++i) {
            ASSERT_NE(bus().publish_qmp(fmt::format("vm{}", m), qmp_event("RTC_CHANGE")), 0u);
        }
    }
    EXPECT_EQ(bus().dropped_total(), 0u);
    EXPECT_TRUE(loop_idle(ioc_));
}

TEST_F(EventBusTest, ForgetMachinePublishesItsPendingDrops)
{
    EventBusOptions o;
    o.qmp_rate_per_s = 0.001;
    o.qmp_burst = 5;
    o.drop_report_interval = 60s;
    make_bus(o);
    for (int i = 0; i < 20; ++i) {
        bus().publish_qmp("a", qmp_event("X"));
    }
    bus().publish_qmp("b", qmp_event("X"));
    EXPECT_EQ(bus().dropped_total(), 15u);
    const std::uint64_t before = bus().last_seq();
    bus().forget_machine("a");
    ASSERT_EQ(bus().last_seq(), before + 1);
    auto e = bus().replay(before, sel());
    ASSERT_EQ(e.size(), 1u);
    EXPECT_EQ(e[0].name(), event_names::events_dropped);
    EXPECT_EQ(json::get_int(e[0].data(), "count"), 15);
    EXPECT_EQ(json::get_int(e[0].data(), "since_seq"), 5);
    EXPECT_TRUE(loop_idle(ioc_)) << "no machine has pending drops";
    // Forgotten: a machine of that name starts with a full bucket again.
    for (int i = 0; i < 5; ++i) {
        EXPECT_NE(bus().publish_qmp("a", qmp_event("X")), 0u);
    }
    EXPECT_EQ(bus().publish_qmp("a", qmp_event("X")), 0u);
    bus().forget_machine("nobody"); // unknown: nothing happens
    bus().forget_machine("b");      // no drops: nothing published
    EXPECT_EQ(bus().last_seq(), before + 6);
    bus().forget_machine("a");
    EXPECT_EQ(bus().last_seq(), before + 7);
    EXPECT_TRUE(loop_idle(ioc_));
}

TEST_F(EventBusTest, DestroyedBusWithArmedFlushTimer)
{
    EventBusOptions o;
    o.qmp_burst = 1;
    o.qmp_rate_per_s = 0.001;
    o.drop_report_interval = 10ms;
    make_bus(o);
    bus().publish_qmp("a", qmp_event("X"));
    bus().publish_qmp("a", qmp_event("X"));
    EXPECT_EQ(bus().dropped_total(), 1u);
    bus_.reset();
    // The timer's handler runs after the bus is gone and must not touch it.
    ioc_.restart();
    ioc_.run_for(50ms);
    EXPECT_TRUE(loop_idle(ioc_));
}

} // namespace
} // namespace qm::daemon
