// SPDX-License-Identifier: GPL-2.0-or-later
// libFuzzer target for the seed's event_match (libmachine/qmp/message.hpp), which every event
// filter of the daemon runs (REST `match`, events/wait, D-Bus WaitEvent) on what clients send.
// The input is an event and a match, as JSON, separated by the first newline (no newline: a null
// match). What must hold, besides not crashing on any depth or size the parser accepts:
//  - a null match and {} match anything;
//  - an event matches itself (when no object in it repeats a key: the first one is found);
//  - a match that matches still matches with one of its keys left out;
//  - wrapping both in {"k": ...} changes nothing.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "libmachine/json.hpp"
#include "libmachine/qmp/message.hpp"

namespace {

using qm::json::Document;
using qm::json::Value;

void check(bool ok)
{
    if (!ok) {
        std::abort();
    }
}

bool repeats_a_key(const Value& v)
{
    if (v.IsArray()) {
        for (const auto& item : v.GetArray()) {
            if (repeats_a_key(item)) {
                return true;
            }
        }
        return false;
    }
    if (!v.IsObject()) {
        return false;
    }
    for (auto a = v.MemberBegin(); a != v.MemberEnd(); ++a) {
        for (auto b = a + 1; b != v.MemberEnd(); ++b) {
            if (a->name == b->name) {
                return true;
            }
        }
        if (repeats_a_key(a->value)) {
            return true;
        }
    }
    return false;
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    const std::string_view input(reinterpret_cast<const char*>(data), size);
    const std::size_t newline = input.find('\n');
    auto event = qm::json::parse(input.substr(0, newline));
    if (!event) {
        return 0;
    }
    Document match;
    match.SetNull();
    if (newline != std::string_view::npos) {
        auto parsed = qm::json::parse(input.substr(newline + 1));
        if (!parsed) {
            return 0;
        }
        match = std::move(*parsed);
    }
    using qm::qmp::event_match;
    const bool matched = event_match(*event, match);

    Value null_value;
    check(event_match(*event, null_value));
    Value empty(rapidjson::kObjectType);
    check(event_match(*event, empty));
    if (!repeats_a_key(*event)) {
        check(event_match(*event, *event));
    }
    if (matched && match.IsObject() && match.MemberCount() > 0) {
        Document fewer;
        fewer.CopyFrom(match, fewer.GetAllocator());
        fewer.EraseMember(fewer.MemberBegin());
        check(event_match(*event, fewer));
    }
    Document wrapped_event(rapidjson::kObjectType);
    Value e;
    e.CopyFrom(*event, wrapped_event.GetAllocator());
    wrapped_event.AddMember("k", e, wrapped_event.GetAllocator());
    Document wrapped_match(rapidjson::kObjectType);
    Value m;
    m.CopyFrom(match, wrapped_match.GetAllocator());
    wrapped_match.AddMember("k", m, wrapped_match.GetAllocator());
    check(event_match(wrapped_event, wrapped_match) == matched);
    return 0;
}
