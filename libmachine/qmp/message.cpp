// SPDX-License-Identifier: GPL-2.0-or-later
// QMP messages: classification, the greeting, events and event_match.
#include "libmachine/qmp/message.hpp"

#include <fmt/format.h>

namespace qm::qmp {
namespace {

const json::Value null_value;

bool equal_values(const json::Value& a, const json::Value& b)
{
    // Python compares 1 == 1.0 as equal; RapidJSON's operator== does too for numbers.
    return a == b;
}

int version_part(const json::Value& qemu, std::string_view key)
{
    auto v = json::get_int(qemu, key);
    return v ? static_cast<int>(*v) : -1;
}

} // namespace

bool Greeting::offers(std::string_view capability) const
{
    for (const auto& c : capabilities) {
        if (c == capability) {
            return true;
        }
    }
    return false;
}

std::string Greeting::version() const
{
    return fmt::format("{}.{}.{}", major, minor, micro);
}

Event::Event(std::shared_ptr<const json::Document> message) : message_(std::move(message)) {}

std::string_view Event::name() const
{
    return json::get_string(*message_, "event").value_or("");
}

const json::Value& Event::data() const
{
    const json::Value* d = json::find(*message_, "data");
    return d != nullptr ? *d : null_value;
}

std::int64_t Event::seconds() const
{
    const json::Value* ts = json::find(*message_, "timestamp");
    return ts != nullptr ? json::get_int(*ts, "seconds").value_or(0) : 0;
}

std::int64_t Event::microseconds() const
{
    const json::Value* ts = json::find(*message_, "timestamp");
    return ts != nullptr ? json::get_int(*ts, "microseconds").value_or(0) : 0;
}

expected<Message> decode(std::string_view text)
{
    auto parsed = json::parse(text);
    if (!parsed) {
        return fail(errc::qmp_protocol, "malformed QMP message: " + parsed.error().message);
    }
    Message m;
    m.doc = std::make_shared<json::Document>(std::move(*parsed));
    const json::Document& d = *m.doc;
    if (!d.IsObject()) {
        return fail(errc::qmp_protocol, "QMP message is not a JSON object");
    }
    if (const json::Value* id = json::find(d, "id"); id != nullptr) {
        m.has_id = true;
        if (id->IsUint64()) {
            m.id = id->GetUint64();
        }
    }
    if (json::find(d, "return") != nullptr) {
        m.kind = Message::Kind::reply;
    } else if (const json::Value* e = json::find(d, "error"); e != nullptr) {
        if (!e->IsObject()) {
            return fail(errc::qmp_protocol, "QMP error reply whose \"error\" is not an object");
        }
        m.kind = Message::Kind::error_reply;
    } else if (const json::Value* ev = json::find(d, "event"); ev != nullptr) {
        if (!ev->IsString()) {
            return fail(errc::qmp_protocol, "QMP event whose \"event\" is not a string");
        }
        m.kind = Message::Kind::event;
    } else if (json::find(d, "QMP") != nullptr) {
        m.kind = Message::Kind::greeting;
    } else {
        return fail(errc::qmp_protocol, "unknown QMP message: " + std::string(text.substr(0, 200)));
    }
    return m;
}

expected<Greeting> parse_greeting(const json::Value& msg)
{
    const json::Value* qmp = json::find(msg, "QMP");
    const json::Value* version = qmp != nullptr ? json::find(*qmp, "version") : nullptr;
    const json::Value* qemu = version != nullptr ? json::find(*version, "qemu") : nullptr;
    const json::Value* caps = qmp != nullptr ? json::find(*qmp, "capabilities") : nullptr;
    if (qemu == nullptr || !qemu->IsObject() || caps == nullptr || !caps->IsArray()) {
        return fail(errc::qmp_protocol,
                    "bad QMP greeting: " + json::to_string(msg).substr(0, 200));
    }
    Greeting g;
    g.major = version_part(*qemu, "major");
    g.minor = version_part(*qemu, "minor");
    g.micro = version_part(*qemu, "micro");
    g.package = std::string(json::get_string(*version, "package").value_or(""));
    for (const auto& c : caps->GetArray()) {
        if (c.IsString()) {
            g.capabilities.emplace_back(c.GetString(), c.GetStringLength());
        }
    }
    return g;
}

Error command_error(std::string_view command, const json::Value& msg)
{
    Error e;
    e.code = make_error_code(errc::qmp_command_failed);
    const json::Value* err = json::find(msg, "error");
    if (err != nullptr) {
        e.qmp_class = std::string(json::get_string(*err, "class").value_or(""));
        e.qmp_desc = std::string(json::get_string(*err, "desc").value_or(""));
    }
    e.message = fmt::format("{}: {}", command,
                            e.qmp_desc.empty() ? std::string("command failed") : e.qmp_desc);
    return e;
}

bool event_match(const json::Value& event, const json::Value& match)
{
    if (match.IsNull()) {
        return true;
    }
    if (match.IsObject()) {
        if (match.MemberCount() == 0) {
            return true; // the seed's loop over no keys: {} matches anything
        }
        if (!event.IsObject()) {
            return false;
        }
        for (const auto& m : match.GetObject()) {
            auto it = event.FindMember(m.name);
            if (it == event.MemberEnd() || !event_match(it->value, m.value)) {
                return false;
            }
        }
        return true;
    }
    return equal_values(event, match);
}

EventFilter EventFilter::named(std::string name)
{
    EventFilter f;
    f.name = std::move(name);
    return f;
}

expected<EventFilter> EventFilter::with_match(std::string name, std::string_view match_json)
{
    auto parsed = json::parse(match_json);
    if (!parsed) {
        return fail(errc::invalid_argument, "bad match criteria: " + parsed.error().message);
    }
    EventFilter f;
    f.name = std::move(name);
    f.match = std::move(*parsed);
    return f;
}

bool EventFilter::matches(const Event& e) const
{
    return (name.empty() || e.name() == name) && event_match(e.message(), match);
}

} // namespace qm::qmp
