// SPDX-License-Identifier: GPL-2.0-or-later
// The REST streams over the wire, against the real qmachined and real QEMU: the Server-Sent Events
// stream with each filter, its resume after a disconnect, a slow reader told it lagged, its clean
// end at shutdown; the served waits for events and for console output (the test guest).
#include <algorithm>
#include <chrono>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/json.hpp"
#include "libmachine/qmp/message.hpp"
#include "tests/daemon/machine_daemon.hpp"
#include "tests/rest/sse_client.hpp"
#include "tests/support/guest_image.hpp"

namespace qm::test {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// One event as the stream carried it.
struct Got
{
    std::uint64_t seq = 0;
    std::string name;
    json::Document event;
};

class StreamTest : public MachineDaemonTest
{
protected:
    // Reads events until one with seq >= `until` came, or a lag notice says it was lost; fails
    // the test on a deadline. Lag notices are kept in `lags` (first_missing, resume_seq).
    std::vector<Got> read_until(SseClient& c, std::uint64_t until,
                                std::vector<std::pair<std::uint64_t, std::uint64_t>>* lags = nullptr,
                                std::chrono::milliseconds deadline = 30s)
    {
        std::vector<Got> out;
        const auto end = Clock::now() + deadline;
        std::uint64_t covered = 0; // every seq below it was received or reported lost
        while (covered <= until) {
            auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now());
            auto m = c.next_event(std::max(left, 0ms));
            if (!m) {
                ADD_FAILURE() << "no event up to " << until << " (last "
                              << (out.empty() ? 0 : out.back().seq) << ")";
                break;
            }
            if (m->event == "lagged") {
                auto d = json::parse(m->data);
                EXPECT_TRUE(d && d->IsObject()) << m->data;
                EXPECT_TRUE(m->id.empty()) << "a lag notice has no id";
                if (d && d->IsObject() && lags != nullptr) {
                    lags->emplace_back(json::find(*d, "first_missing")->GetUint64(),
                                       json::find(*d, "resume_seq")->GetUint64());
                    covered = std::max(covered, lags->back().second);
                } else {
                    ADD_FAILURE() << "unexpected lag notice: " << m->data;
                }
                continue;
            }
            Got g;
            g.seq = std::stoull(m->id);
            g.name = m->event;
            auto parsed = json::parse(m->data);
            EXPECT_TRUE(parsed) << m->data;
            if (parsed) {
                g.event = std::move(*parsed);
                EXPECT_EQ(json::get_int(g.event, "seq"), static_cast<std::int64_t>(g.seq));
                EXPECT_EQ(json::get_string(g.event, "event").value_or(""), g.name);
            }
            covered = std::max(covered, g.seq + 1);
            out.push_back(std::move(g));
        }
        return out;
    }

    // The event_seq of an answer.
    std::uint64_t seq_of(const HttpResponse& r)
    {
        return static_cast<std::uint64_t>(json::get_int(r.json(), "event_seq").value_or(0));
    }

    // The daemon's current event number (GET /v1/health): before any event, this run's base.
    std::uint64_t current_seq()
    {
        HttpResponse r = call("GET", "/v1/health");
        EXPECT_EQ(r.status, 200) << r;
        return seq_of(r);
    }

    std::uint64_t act(const std::string& name, const std::string& action)
    {
        HttpResponse r = call("POST", "/v1/machines/" + name + "/" + action);
        EXPECT_EQ(r.status, 200) << action << ": " << r;
        return seq_of(r);
    }

    std::unique_ptr<SseClient> subscribe(const std::string& query,
                                         const std::vector<std::string>& headers = {})
    {
        auto c = std::make_unique<SseClient>(socket_path().string(), "/v1/events" + query, headers);
        EXPECT_EQ(c->error(), "");
        EXPECT_EQ(c->status(), 200) << c->head() << c->body_so_far();
        EXPECT_NE(c->head().find("Content-Type: text/event-stream"), std::string::npos) << c->head();
        // The subscription is in place once its first comment came.
        auto first = c->next(10s);
        EXPECT_TRUE(first && first->comment == " subscribed") << "no ': subscribed' first";
        return c;
    }
};

std::vector<std::uint64_t> seqs(const std::vector<Got>& got)
{
    std::vector<std::uint64_t> out;
    for (const auto& g : got) {
        out.push_back(g.seq);
    }
    return out;
}

TEST_F(StreamTest, StateAndQmpEventsArriveInOrderWithEachFilter)
{
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    const std::uint64_t base = current_seq();
    // This run's numbers start above its start time in µs: they grow across restarts.
    EXPECT_GT(base, 1'700'000'000'000'000U);
    EXPECT_LT(base, 1ULL << 53);
    auto all = subscribe("");
    auto of_a = subscribe("?machine=a");
    auto names = subscribe("?event=STATE_CHANGED&event=STOP");
    auto running = subscribe("?match=%7B%22data%22%3A%7B%22state%22%3A%22running%22%7D%7D");

    ASSERT_EQ(create("a", quick_spec()).status, 201);
    ASSERT_EQ(create("b", quick_spec()).status, 201);
    act("a", "start");
    act("a", "pause");
    act("a", "resume");
    act("b", "start");
    const std::uint64_t last = act("a", "stop");

    // Unfiltered: every event, each sequence number once, in order, none missing.
    const auto everything = read_until(*all, last);
    ASSERT_FALSE(everything.empty());
    for (std::size_t i = 1; i < everything.size(); ++i) {
        EXPECT_EQ(everything[i].seq, everything[i - 1].seq + 1) << "a gap or a repeat";
    }
    EXPECT_EQ(everything.front().seq, base + 1);
    // a's states in the order they happened, and QEMU's own events among them.
    std::vector<std::string> a_states;
    std::set<std::string> a_qmp;
    for (const auto& g : everything) {
        if (json::get_string(g.event, "machine") != "a") {
            continue;
        }
        const json::Value* data = json::find(g.event, "data");
        if (g.name == "STATE_CHANGED" && data != nullptr) {
            a_states.emplace_back(json::get_string(*data, "state").value_or("?"));
        }
        if (json::find(g.event, "qmp")->GetBool()) {
            a_qmp.insert(g.name);
        }
    }
    EXPECT_EQ(a_states, (std::vector<std::string>{"starting", "running", "paused", "running",
                                                  "stopping", "stopped"}));
    EXPECT_TRUE(a_qmp.contains("STOP") && a_qmp.contains("RESUME") && a_qmp.contains("SHUTDOWN"))
        << testing::PrintToString(a_qmp);

    // Each filtered stream is exactly the unfiltered one's matching subsequence.
    auto expect_subsequence = [&](SseClient& c, auto&& wanted, const char* what) {
        std::vector<std::uint64_t> want;
        for (const auto& g : everything) {
            if (wanted(g)) {
                want.push_back(g.seq);
            }
        }
        ASSERT_FALSE(want.empty()) << what;
        EXPECT_EQ(seqs(read_until(c, want.back())), want) << what;
    };
    expect_subsequence(
        *of_a, [](const Got& g) { return json::get_string(g.event, "machine") == "a"; }, "machine=a");
    expect_subsequence(
        *names, [](const Got& g) { return g.name == "STATE_CHANGED" || g.name == "STOP"; },
        "event=STATE_CHANGED&event=STOP");
    expect_subsequence(
        *running,
        [](const Got& g) {
            const json::Value* data = json::find(g.event, "data");
            return data != nullptr && data->IsObject() &&
                   json::get_string(*data, "state") == "running";
        },
        "match state running");
}

TEST_F(StreamTest, ResumeWithLastEventIdAfterADisconnectLosesNothing)
{
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    ASSERT_EQ(create("a", quick_spec()).status, 201);
    auto first = subscribe("?since=0");
    const std::uint64_t started = act("a", "start");
    const auto before = read_until(*first, started);
    const std::uint64_t last_seen = before.back().seq;
    first->close();

    // What happens while the client is away.
    act("a", "pause");
    act("a", "resume");
    const std::uint64_t stopped = act("a", "stop");

    for (const auto& [query, headers] :
         std::vector<std::pair<std::string, std::vector<std::string>>>{
             {"", {fmt::format("Last-Event-ID: {}", last_seen)}},
             {fmt::format("?since={}", last_seen), {}},
             // An EventSource reconnects with its first URL: the header wins over `since`.
             {"?since=0", {fmt::format("Last-Event-ID: {}", last_seen)}}}) {
        SCOPED_TRACE(query + " " + testing::PrintToString(headers));
        auto again = subscribe(query, headers);
        const auto after = read_until(*again, stopped);
        std::vector<std::uint64_t> want;
        for (std::uint64_t s = last_seen + 1; s <= stopped; ++s) {
            want.push_back(s);
        }
        EXPECT_EQ(seqs(after), want);
    }
}

TEST_F(StreamTest, ASlowReaderIsToldWhatItLostAndNothingElseIsLost)
{
    // A reader may be 16 events behind (the default is 1024: the same logic, a longer test).
    ASSERT_NO_FATAL_FAILURE(start_daemon({"--event-queue", "16"}));
    const std::uint64_t base = current_seq();
    auto slow = subscribe("");
    // Daemon events (never rate-limited), from 4 clients at once: more than the socket's buffer
    // and the subscriber's queue hold while the reader does not read.
    std::vector<std::thread> writers;
    for (int w = 0; w < 4; ++w) {
        writers.emplace_back([this, w] {
            asio::io_context ioc{1};
            HttpConnection c(ioc, socket_path());
            ASSERT_FALSE(c.error()) << c.error().message();
            const std::string name = fmt::format("m{}", w);
            for (int i = 0; i < 250; ++i) {
                HttpResponse created = c.request("POST", "/v1/machines",
                                                 fmt::format(R"({{"name": "{}"}})", name));
                ASSERT_EQ(created.status, 201) << created;
                HttpResponse removed = c.request("DELETE", "/v1/machines/" + name);
                ASSERT_EQ(removed.status, 204) << removed;
            }
            c.close();
        });
    }
    for (auto& t : writers) {
        t.join();
    }
    HttpResponse end = create("last", quick_spec());
    ASSERT_EQ(end.status, 201) << end;
    const std::uint64_t last = seq_of(end);
    ASSERT_EQ(last, base + 2001U);

    std::vector<std::pair<std::uint64_t, std::uint64_t>> lags;
    const auto got = read_until(*slow, last, &lags, 60s);
    ASSERT_FALSE(lags.empty()) << "the reader lagged but was not told";
    // Every sequence number from 1 to the last is either received once, in order, or inside a
    // lag notice's range: nothing lost silently, nothing twice.
    std::vector<std::uint64_t> covered = seqs(got);
    for (const auto& [first_missing, resume] : lags) {
        EXPECT_LT(first_missing, resume);
        for (std::uint64_t s = first_missing; s < resume; ++s) {
            covered.push_back(s);
        }
    }
    std::sort(covered.begin(), covered.end());
    std::vector<std::uint64_t> want;
    for (std::uint64_t s = base + 1; s <= last; ++s) {
        want.push_back(s);
    }
    EXPECT_EQ(covered, want);
    const auto received = seqs(got);
    EXPECT_TRUE(std::is_sorted(received.begin(), received.end()));
    // The stream goes on after the lag: the next event comes.
    HttpResponse next = call("DELETE", "/v1/machines/last");
    ASSERT_EQ(next.status, 204) << next;
    auto after = slow->next_event(10s);
    ASSERT_TRUE(after);
    EXPECT_EQ(after->event, "MACHINE_REMOVED");
    EXPECT_EQ(after->id, std::to_string(last + 1));
    // What it lost is still in the ring: a reconnect from the last id it got fetches it.
    auto again = subscribe("", {fmt::format("Last-Event-ID: {}", lags.front().first - 1)});
    const auto refetched = read_until(*again, last + 1);
    EXPECT_EQ(refetched.front().seq, lags.front().first);
    EXPECT_EQ(refetched.back().seq, last + 1);
}

// A client that resumes with a number from the daemon's previous run is told that it lost what
// happened meanwhile, and is never handed this run's events as if they came after its own.
TEST_F(StreamTest, ResumingAcrossADaemonRestartIsToldWhatItLost)
{
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    ASSERT_EQ(create("a", quick_spec()).status, 201);
    const std::uint64_t before = seq_of(create("b", quick_spec()));
    stop_daemon();
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    const std::uint64_t base = current_seq();
    EXPECT_GT(base, before) << "a later run must number above the earlier one";
    // More events in this run than the earlier run had (the old bug: they looked newer).
    for (int i = 0; i < 5; ++i) {
        ASSERT_EQ(create(fmt::format("c{}", i), quick_spec()).status, 201);
    }
    const std::uint64_t last = current_seq();
    auto resumed = subscribe("", {fmt::format("Last-Event-ID: {}", before)});
    std::vector<std::pair<std::uint64_t, std::uint64_t>> lags;
    const auto got = read_until(*resumed, last, &lags);
    ASSERT_EQ(lags.size(), 1U);
    EXPECT_EQ(lags[0].first, before + 1);
    EXPECT_EQ(lags[0].second, base + 1);
    ASSERT_EQ(got.size(), 5U);
    EXPECT_EQ(got.front().seq, base + 1);
    // A wait since the old number: 409, the window is lost.
    HttpResponse w = call("POST", "/v1/machines/a/events/wait",
                          fmt::format(R"({{"since": {}, "timeout_s": 1}})", before));
    EXPECT_EQ(w.status, 409) << w;
}

TEST_F(StreamTest, TheStreamEndsCleanlyWhenTheDaemonStops)
{
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    auto c = subscribe("");
    stop_daemon();
    while (auto m = c->next(5s)) {
    }
    EXPECT_TRUE(c->ended()) << "no last chunk";
}

TEST_F(StreamTest, EventsWaitFindsWhatAnActionCausedAndTimesOutCleanly)
{
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    ASSERT_EQ(create("a", quick_spec()).status, 201);
    const std::uint64_t before = act("a", "start");
    const std::uint64_t stopped = act("a", "stop");

    // The action is over: its events are found in the ring from the seq before it.
    HttpResponse w = call("POST", "/v1/machines/a/events/wait",
                          fmt::format(R"({{"event": "SHUTDOWN", "since": {}}})", before));
    ASSERT_EQ(w.status, 200) << w;
    json::Document d = w.json();
    EXPECT_EQ(json::find(d, "timed_out")->GetBool(), false) << w;
    const json::Value* e = json::find(d, "event");
    ASSERT_NE(e, nullptr) << w;
    EXPECT_EQ(json::get_string(*e, "event"), "SHUTDOWN");
    EXPECT_GT(json::get_int(*e, "seq").value_or(0), static_cast<std::int64_t>(before));
    EXPECT_LE(json::get_int(*e, "seq").value_or(0), static_cast<std::int64_t>(stopped));
    EXPECT_TRUE(qmp::event_match(*e, *json::parse(R"({"data": {"guest": false}})")));

    // Nothing matches after the stop: the wait times out after its timeout, cleanly.
    const auto t0 = Clock::now();
    HttpResponse none = call("POST", "/v1/machines/a/events/wait",
                             fmt::format(R"({{"event": "SHUTDOWN", "since": {}, "timeout_s": 0.3}})",
                                         stopped));
    const auto took = Clock::now() - t0;
    ASSERT_EQ(none.status, 200) << none;
    EXPECT_EQ(json::find(none.json(), "timed_out")->GetBool(), true) << none;
    EXPECT_EQ(json::find(none.json(), "event"), nullptr) << none;
    EXPECT_GE(took, 300ms);
    EXPECT_LT(took, 5s);

    // A wait in progress gets the event an action causes meanwhile.
    HttpConnection waiter(ioc_, socket_path());
    ASSERT_FALSE(waiter.error());
    // (The request is sent from a thread: the test's own calls go on meanwhile.)
    HttpResponse woke;
    std::thread t([&] {
        woke = waiter.request("POST", "/v1/machines/a/events/wait",
                              R"({"event": "STATE_CHANGED", "match": {"data": {"state": "running"}},
                                  "timeout_s": 30})");
    });
    std::this_thread::sleep_for(200ms);
    act("a", "start");
    t.join();
    ASSERT_EQ(woke.status, 200) << woke;
    EXPECT_EQ(json::find(woke.json(), "timed_out")->GetBool(), false) << woke;
}

TEST_F(StreamTest, ConsoleWaitSeesTheGuestAndOffsetsChainWaits)
{
    if (!guest_image().error.empty()) {
        GTEST_SKIP() << guest_image().error;
    }
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    const std::string spec = guest_spec("qmtest.hello=stream-test");
    ASSERT_EQ(create("g", spec).status, 201);
    act("g", "start");

    HttpResponse hello = call("POST", "/v1/machines/g/console/wait",
                              R"({"pattern": "qmtest: hello [a-z]+-test", "timeout_s": 120})");
    ASSERT_EQ(hello.status, 200) << hello;
    json::Document h = hello.json();
    EXPECT_EQ(json::find(h, "timed_out")->GetBool(), false) << hello;
    EXPECT_EQ(json::get_string(h, "match"), "qmtest: hello stream-test") << hello;
    const auto begin = static_cast<std::uint64_t>(json::get_int(h, "begin").value_or(0));
    const auto end = static_cast<std::uint64_t>(json::get_int(h, "end").value_or(0));
    EXPECT_EQ(end - begin, std::string("qmtest: hello stream-test").size());
    const std::string output(json::get_string(h, "output").value_or(""));
    EXPECT_TRUE(output.ends_with("qmtest: hello stream-test")) << output;

    // From the end of that match on: "ready" comes after "hello"; "hello" does not come again.
    HttpResponse ready = call("POST", "/v1/machines/g/console/wait",
                              fmt::format(R"({{"pattern": "qmtest: ready", "from": {},
                                               "timeout_s": 60}})", end));
    ASSERT_EQ(ready.status, 200) << ready;
    EXPECT_GE(json::get_int(ready.json(), "begin").value_or(0), static_cast<std::int64_t>(end));
    const auto after = static_cast<std::uint64_t>(json::get_int(ready.json(), "end").value_or(0));
    HttpResponse again = call("POST", "/v1/machines/g/console/wait",
                              fmt::format(R"({{"pattern": "qmtest: hello", "from": {},
                                               "timeout_s": 0.5}})", after));
    ASSERT_EQ(again.status, 200) << again;
    EXPECT_EQ(json::find(again.json(), "timed_out")->GetBool(), true) << again;
    EXPECT_GE(json::get_int(again.json(), "offset").value_or(0), static_cast<std::int64_t>(after));
    // From 0, the same match at the same offsets.
    HttpResponse from_start = call("POST", "/v1/machines/g/console/wait",
                                   R"({"pattern": "qmtest: hello [a-z]+-test", "timeout_s": 1})");
    EXPECT_EQ(json::get_int(from_start.json(), "begin"), static_cast<std::int64_t>(begin))
        << from_start;
    EXPECT_EQ(act("g", "kill") > 0, true);
}

} // namespace
} // namespace qm::test
