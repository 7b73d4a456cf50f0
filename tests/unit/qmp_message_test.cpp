// SPDX-License-Identifier: GPL-2.0-or-later
// Tests of libmachine/qmp/message: classification, ids, the greeting, command errors, events,
// event_match (the seed's docstring examples) and EventFilter.
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "libmachine/json.hpp"
#include "libmachine/qmp/message.hpp"

namespace qm::qmp {
namespace {

const char* const greeting_text =
    R"({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, )"
    R"("package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}})";

// Test input is known-good JSON; plain RapidJSON keeps the analyzer's view of the allocator simple.
json::Document parse(const std::string& text)
{
    json::Document doc;
    doc.Parse(text.data(), text.size());
    EXPECT_FALSE(doc.HasParseError()) << text;
    return doc;
}

Message decoded(const std::string& text)
{
    auto m = decode(text);
    EXPECT_TRUE(m.has_value()) << text << ": " << (m ? "" : m.error().message);
    return m ? std::move(*m) : Message{};
}

void expect_protocol_error(const std::string& text)
{
    auto m = decode(text);
    ASSERT_FALSE(m.has_value()) << "decoded: " << text;
    EXPECT_TRUE(m.error().is(errc::qmp_protocol)) << text << ": " << m.error().message;
    EXPECT_FALSE(m.error().message.empty());
}

//---- decode -------------------------------------------------------------------------------------

TEST(QmpMessage, DecodeClassifiesGreeting)
{
    auto m = decoded(greeting_text);
    EXPECT_EQ(m.kind, Message::Kind::greeting);
    EXPECT_FALSE(m.has_id);
    ASSERT_TRUE(m.doc);
    EXPECT_TRUE(m.doc->IsObject());
}

TEST(QmpMessage, DecodeClassifiesReply)
{
    auto m = decoded(R"({"return": {"status": "running", "running": true}, "id": 7})");
    EXPECT_EQ(m.kind, Message::Kind::reply);
    EXPECT_TRUE(m.has_id);
    EXPECT_EQ(m.id, 7U);
    // "return" may be any JSON value, not only an object.
    EXPECT_EQ(decoded(R"({"return": [], "id": 1})").kind, Message::Kind::reply);
    EXPECT_EQ(decoded(R"({"return": 5, "id": 1})").kind, Message::Kind::reply);
}

TEST(QmpMessage, DecodeClassifiesErrorReply)
{
    auto m = decoded(R"({"error": {"class": "GenericError", "desc": "nope"}, "id": 3})");
    EXPECT_EQ(m.kind, Message::Kind::error_reply);
    EXPECT_EQ(m.id, 3U);
}

TEST(QmpMessage, DecodeClassifiesEvent)
{
    auto m =
        decoded(R"({"timestamp": {"seconds": 1700000000, "microseconds": 5}, "event": "STOP"})");
    EXPECT_EQ(m.kind, Message::Kind::event);
    EXPECT_FALSE(m.has_id);
}

TEST(QmpMessage, DecodeRejectsMalformedJson)
{
    expect_protocol_error(R"({"return": )");
    expect_protocol_error(R"({"return": {}})"
                          "x");
    expect_protocol_error("");
    expect_protocol_error("{'return': {}}");
}

TEST(QmpMessage, DecodeRejectsNonObjects)
{
    expect_protocol_error("[]");
    expect_protocol_error(R"("return")");
    expect_protocol_error("42");
    expect_protocol_error("null");
}

TEST(QmpMessage, DecodeRejectsUnknownObjects)
{
    expect_protocol_error("{}");
    expect_protocol_error(R"({"id": 1})");
    expect_protocol_error(R"({"foo": "bar"})");
}

TEST(QmpMessage, DecodeRejectsMisshapenKinds)
{
    expect_protocol_error(R"({"error": "GenericError", "id": 1})");
    expect_protocol_error(R"({"event": 5})");
}

TEST(QmpMessage, Ids)
{
    EXPECT_EQ(decoded(R"({"return": {}, "id": 0})").id, 0U);
    auto huge = decoded(R"({"return": {}, "id": 18446744073709551615})");
    EXPECT_EQ(huge.id, 18446744073709551615ULL);

    // Ids this client never sends: present (has_id) but not ours (no id).
    for (const char* text : {R"({"return": {}, "id": -1})", R"({"return": {}, "id": "abc"})",
                             R"({"return": {}, "id": 1.5})", R"({"return": {}, "id": null})",
                             R"({"return": {}, "id": [1]})",
                             R"({"error": {"class": "GenericError", "desc": "x"}, "id": "x"})"}) {
        SCOPED_TRACE(text);
        auto m = decoded(text);
        EXPECT_TRUE(m.has_id);
        EXPECT_FALSE(m.id.has_value());
    }

    auto none = decoded(R"({"return": {}})");
    EXPECT_FALSE(none.has_id);
    EXPECT_FALSE(none.id.has_value());
}

TEST(QmpMessage, DeepNestingIsRejected)
{
    // json::max_depth (128) levels in all, the message object included, is fine; one more is not.
    auto nested = [](int depth) {
        return R"({"return": )" + std::string(depth - 1, '[') + std::string(depth - 1, ']') + "}";
    };
    auto ok = decode(nested(json::max_depth));
    EXPECT_TRUE(ok.has_value()) << ok.error().message;
    expect_protocol_error(nested(json::max_depth + 1));
    expect_protocol_error(std::string(100000, '[') + std::string(100000, ']'));
}

//---- the greeting -------------------------------------------------------------------------------

TEST(QmpMessage, ParseGreeting)
{
    auto doc = parse(greeting_text);
    auto g = parse_greeting(doc);
    ASSERT_TRUE(g.has_value()) << g.error().message;
    EXPECT_EQ(g->major, 7);
    EXPECT_EQ(g->minor, 2);
    EXPECT_EQ(g->micro, 22);
    EXPECT_EQ(g->version(), "7.2.22");
    EXPECT_EQ(g->package, "Debian 1:7.2+dfsg-7+deb12u18+b3");
    EXPECT_EQ(g->capabilities, (std::vector<std::string>{"oob"}));
    EXPECT_TRUE(g->offers("oob"));
    EXPECT_FALSE(g->offers("oo"));
}

TEST(QmpMessage, ParseGreetingWithoutCapabilitiesOrPackage)
{
    auto doc = parse(R"({"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 8}}, )"
                     R"("capabilities": []}})");
    auto g = parse_greeting(doc);
    ASSERT_TRUE(g.has_value()) << g.error().message;
    EXPECT_EQ(g->version(), "8.0.0");
    EXPECT_TRUE(g->package.empty());
    EXPECT_TRUE(g->capabilities.empty());
    EXPECT_FALSE(g->offers("oob"));
}

TEST(QmpMessage, ParseGreetingRejectsBadShapes)
{
    for (const char* text : {
             R"({"QMP": {}})",
             R"({"QMP": 5})",
             R"({"QMP": {"version": {"qemu": 7}, "capabilities": []}})",
             R"({"QMP": {"version": {}, "capabilities": []}})",
             R"({"QMP": {"version": {"qemu": {"major": 7}}}})",
             R"({"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": "oob"}})",
             R"({"return": {}})",
         }) {
        SCOPED_TRACE(text);
        auto doc = parse(text);
        auto g = parse_greeting(doc);
        ASSERT_FALSE(g.has_value());
        EXPECT_TRUE(g.error().is(errc::qmp_protocol)) << g.error().message;
    }
}

//---- command errors -----------------------------------------------------------------------------

TEST(QmpMessage, CommandError)
{
    auto doc =
        parse(R"({"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}, "id": 2})");
    Error e = command_error("device_del", doc);
    EXPECT_TRUE(e.is(errc::qmp_command_failed));
    EXPECT_EQ(e.qmp_class, "DeviceNotFound");
    EXPECT_EQ(e.qmp_desc, "Device 'x' not found");
    EXPECT_EQ(e.message, "device_del: Device 'x' not found");
}

TEST(QmpMessage, CommandErrorWithoutDesc)
{
    auto doc = parse(R"({"error": {"class": "GenericError"}, "id": 2})");
    Error e = command_error("stop", doc);
    EXPECT_TRUE(e.is(errc::qmp_command_failed));
    EXPECT_EQ(e.qmp_class, "GenericError");
    EXPECT_EQ(e.qmp_desc, "");
    EXPECT_EQ(e.message, "stop: command failed");
}

//---- events -------------------------------------------------------------------------------------

TEST(QmpMessage, EventAccessors)
{
    auto doc = std::make_shared<json::Document>(
        parse(R"({"timestamp": {"seconds": 1700000000, "microseconds": 123456}, )"
              R"("event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}})"));
    Event e(doc);
    EXPECT_EQ(e.name(), "SHUTDOWN");
    EXPECT_EQ(e.seconds(), 1700000000);
    EXPECT_EQ(e.microseconds(), 123456);
    ASSERT_TRUE(e.data().IsObject());
    EXPECT_EQ(json::get_string(e.data(), "reason"), "host-qmp-quit");
    EXPECT_EQ(e.to_json(),
              R"({"timestamp":{"seconds":1700000000,"microseconds":123456},)"
              R"("event":"SHUTDOWN","data":{"guest":false,"reason":"host-qmp-quit"}})");
    // Copies share the parsed message (the copy is the point of this line).
    const Event copy = e; // NOLINT(performance-unnecessary-copy-initialization)
    EXPECT_EQ(&copy.message(), &e.message());
}

TEST(QmpMessage, EventWithoutDataOrTimestamp)
{
    Event e(std::make_shared<json::Document>(parse(R"({"event": "RESUME"})")));
    EXPECT_EQ(e.name(), "RESUME");
    EXPECT_TRUE(e.data().IsNull());
    EXPECT_EQ(e.seconds(), 0);
    EXPECT_EQ(e.microseconds(), 0);
}

//---- event_match ---------------------------------------------------------------------------------

bool matches(const std::string& event, const std::string& match)
{
    return event_match(parse(event), parse(match));
}

// The examples of the seed's QEMUMachine.event_match docstring, exactly.
TEST(QmpEventMatch, SeedDocstringExamples)
{
    // "null matches any object"
    EXPECT_TRUE(matches(R"({"foo": {"bar": 1}})", "null"));
    EXPECT_TRUE(matches(R"({})", "null"));
    // {"foo": null} matches {"foo": {"bar": 1}}
    EXPECT_TRUE(matches(R"({"foo": {"bar": 1}})", R"({"foo": null})"));
    // {"foo": null} matches {"foo": 5}
    EXPECT_TRUE(matches(R"({"foo": 5})", R"({"foo": null})"));
    // {"foo": {"abc": null}} does not match {"foo": {"bar": 1}}
    EXPECT_FALSE(matches(R"({"foo": {"bar": 1}})", R"({"foo": {"abc": null}})"));
    // {"foo": {"rab": 2}} matches {"foo": {"bar": 1, "rab": 2}}
    EXPECT_TRUE(matches(R"({"foo": {"bar": 1, "rab": 2}})", R"({"foo": {"rab": 2}})"));
}

TEST(QmpEventMatch, EmptyObjectMatchesAnything)
{
    EXPECT_TRUE(matches(R"({"foo": 1})", "{}"));
    EXPECT_TRUE(matches("{}", "{}"));
    EXPECT_TRUE(matches("5", "{}"));
    EXPECT_TRUE(matches("null", "{}"));
}

TEST(QmpEventMatch, MissingKeyOrNonObjectDoesNotMatch)
{
    EXPECT_FALSE(matches(R"({"bar": 1})", R"({"foo": null})"));
    EXPECT_FALSE(matches("5", R"({"foo": null})"));
    EXPECT_FALSE(matches(R"({"foo": 5})", R"({"foo": {"bar": null}})"));
}

TEST(QmpEventMatch, ScalarsMatchByEquality)
{
    EXPECT_TRUE(matches(R"({"foo": "x"})", R"({"foo": "x"})"));
    EXPECT_FALSE(matches(R"({"foo": "x"})", R"({"foo": "y"})"));
    EXPECT_TRUE(matches(R"({"foo": true})", R"({"foo": true})"));
    EXPECT_FALSE(matches(R"({"foo": true})", R"({"foo": false})"));
    EXPECT_FALSE(matches(R"({"foo": "1"})", R"({"foo": 1})"));
    EXPECT_TRUE(matches(R"({"foo": [1, 2]})", R"({"foo": [1, 2]})"));
    EXPECT_FALSE(matches(R"({"foo": [1, 2]})", R"({"foo": [1]})"));
    EXPECT_TRUE(matches("3", "3"));
    EXPECT_FALSE(matches("3", "4"));
}

TEST(QmpEventMatch, NumbersCompareByValue)
{
    EXPECT_TRUE(matches(R"({"foo": 1})", R"({"foo": 1.0})"));
    EXPECT_TRUE(matches(R"({"foo": 1.0})", R"({"foo": 1})"));
    EXPECT_FALSE(matches(R"({"foo": 1})", R"({"foo": 1.5})"));
    EXPECT_TRUE(matches(R"({"foo": -2})", R"({"foo": -2.0})"));
}

TEST(QmpEventMatch, NestedCriteriaOnWholeEvent)
{
    const std::string ev = R"({"timestamp": {"seconds": 1, "microseconds": 2}, )"
                           R"("event": "BLOCK_JOB_COMPLETED", )"
                           R"("data": {"device": "drive0", "type": "mirror", "len": 1024}})";
    EXPECT_TRUE(matches(ev, R"({"data": {"device": "drive0"}})"));
    EXPECT_TRUE(matches(ev, R"({"event": "BLOCK_JOB_COMPLETED", "data": {"len": 1024.0}})"));
    EXPECT_FALSE(matches(ev, R"({"data": {"device": "drive1"}})"));
    EXPECT_FALSE(matches(ev, R"({"data": {"device": "drive0", "offset": null}})"));
}

//---- EventFilter --------------------------------------------------------------------------------

Event make_event(const std::string& text)
{
    return Event(std::make_shared<json::Document>(parse(text)));
}

TEST(QmpEventFilter, NamedMatchesByNameOnly)
{
    auto f = EventFilter::named("STOP");
    EXPECT_TRUE(f.match.IsNull());
    EXPECT_TRUE(f.matches(make_event(R"({"event": "STOP"})")));
    EXPECT_TRUE(f.matches(make_event(R"({"event": "STOP", "data": {"x": 1}})")));
    EXPECT_FALSE(f.matches(make_event(R"({"event": "RESUME"})")));
}

TEST(QmpEventFilter, WithMatch)
{
    auto f = EventFilter::with_match("DEVICE_DELETED", R"({"data": {"device": "nic1"}})");
    ASSERT_TRUE(f.has_value()) << f.error().message;
    EXPECT_EQ(f->name, "DEVICE_DELETED");
    EXPECT_TRUE(f->matches(make_event(
        R"({"event": "DEVICE_DELETED", "data": {"device": "nic1", "path": "/machine/x"}})")));
    EXPECT_FALSE(
        f->matches(make_event(R"({"event": "DEVICE_DELETED", "data": {"device": "nic2"}})")));
    EXPECT_FALSE(f->matches(make_event(R"({"event": "OTHER", "data": {"device": "nic1"}})")));
}

TEST(QmpEventFilter, WithMatchRejectsBadJson)
{
    for (const char* bad : {R"({"data": )", "{data: 1}", "", "[1,]"}) {
        SCOPED_TRACE(bad);
        auto f = EventFilter::with_match("STOP", bad);
        ASSERT_FALSE(f.has_value());
        EXPECT_TRUE(f.error().is(errc::invalid_argument)) << f.error().message;
    }
}

} // namespace
} // namespace qm::qmp
