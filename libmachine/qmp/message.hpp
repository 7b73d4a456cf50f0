// SPDX-License-Identifier: GPL-2.0-or-later
// QMP messages: classifying what the server sends (greeting, reply, event), the greeting, events,
// and the seed's event_match rules. Pure functions, no I/O (qmp-spec, docs/interop/qmp-spec.rst).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "libmachine/expected.hpp"
#include "libmachine/json.hpp"

namespace qm::qmp {

// QEMU's greeting: {"QMP": {"version": {"qemu": {"major", "minor", "micro"}, "package"},
// "capabilities": [...]}} (qmp-spec 2.2).
struct Greeting
{
    int major = 0;
    int minor = 0;
    int micro = 0;
    std::string package;
    std::vector<std::string> capabilities;

    bool offers(std::string_view capability) const;
    std::string version() const; // "7.2.22"
};

// An event as QEMU sent it: {"event": NAME, "data": {...}, "timestamp": {"seconds", "microseconds"}}
// (qmp-spec 2.5). Immutable and cheap to copy: copies share the parsed message.
class Event
{
public:
    explicit Event(std::shared_ptr<const json::Document> message);

    std::string_view name() const;
    // The "data" member, or a null value when there is none.
    const json::Value& data() const;
    // The whole message, as event_match sees it.
    const json::Value& message() const { return *message_; }
    std::int64_t seconds() const;
    std::int64_t microseconds() const;
    std::string to_json() const { return json::to_string(*message_); }

private:
    std::shared_ptr<const json::Document> message_;
};

// What the server sent, classified by its keys (qmp-spec 2.2-2.5).
struct Message
{
    enum class Kind { greeting, reply, error_reply, event };

    Kind kind = Kind::reply;
    std::shared_ptr<json::Document> doc;
    // The "id" of a reply when it is a non-negative integer (the only ids this client sends).
    std::optional<std::uint64_t> id;
    // A reply or error reply carrying any "id" at all (even one not ours).
    bool has_id = false;
};

// Parses and classifies one message. Fails with errc::qmp_protocol on malformed JSON, a
// non-object, or an object that is none of the four kinds.
expected<Message> decode(std::string_view text);

// Reads a greeting from a decoded greeting message; errc::qmp_protocol when its shape is wrong.
expected<Greeting> parse_greeting(const json::Value& msg);

// The error of an error reply: "<command>: <desc>" with QMP's class and desc.
Error command_error(std::string_view command, const json::Value& msg);

// The seed's QEMUMachine.event_match: does `event` match the criteria `match`?
// - a null `match` matches anything;
// - an object `match` matches when every key is present in `event` and its value matches
//   recursively (so {"foo": null} only asks that "foo" exists, and {} matches anything);
// - anything else matches when equal (numbers by value).
bool event_match(const json::Value& event, const json::Value& match);

// One (name, match) pair of the seed's events_wait. `match` is null when absent; an empty name
// matches any event.
struct EventFilter
{
    std::string name;
    json::Document match;

    static EventFilter named(std::string name);
    // The criteria as JSON text; errc::invalid_argument when it does not parse.
    static expected<EventFilter> with_match(std::string name, std::string_view match_json);

    bool matches(const Event& e) const;
};

} // namespace qm::qmp
