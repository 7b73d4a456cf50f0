// SPDX-License-Identifier: GPL-2.0-or-later
// RapidJSON helpers: bounded parsing, compact serialisation, typed lookups.
#include "libmachine/json.hpp"

#include <rapidjson/error/en.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <fmt/format.h>

namespace qm::json {
namespace {

// Nesting depth of `text`, counting brackets outside strings, stopping once it passes `limit`.
// RapidJSON's iterative parser does not recurse, but our later walks over the tree do.
bool depth_within(std::string_view text, int limit)
{
    int depth = 0;
    bool in_string = false;
    bool escaped = false;
    for (char c : text) {
        if (in_string) {
            if (escaped) {
                escaped = false;
            } else if (c == '\\') {
                escaped = true;
            } else if (c == '"') {
                in_string = false;
            }
            continue;
        }
        switch (c) {
        case '"': in_string = true; break;
        case '{':
        case '[':
            if (++depth > limit) {
                return false;
            }
            break;
        case '}':
        case ']': --depth; break;
        default: break;
        }
    }
    return true;
}

} // namespace

expected<Document> parse(std::string_view text)
{
    if (!depth_within(text, max_depth)) {
        return fail(errc::invalid_argument,
                    fmt::format("JSON nested deeper than {} levels", max_depth));
    }
    Document doc;
    // Iterative parsing: no recursion on hostile input. Not kParseFullPrecisionFlag: integers are
    // exact without it, and with it RapidJSON 1.1 reads "0e52" as 1.3e33 (UBSan: clz(0)).
    doc.Parse<rapidjson::kParseIterativeFlag>(text.data(), text.size());
    if (doc.HasParseError()) {
        return fail(errc::invalid_argument,
                    fmt::format("invalid JSON at offset {}: {}", doc.GetErrorOffset(),
                                rapidjson::GetParseError_En(doc.GetParseError())));
    }
    return doc;
}

std::string to_string(const Value& v)
{
    rapidjson::StringBuffer buf;
    rapidjson::Writer<rapidjson::StringBuffer> writer(buf);
    v.Accept(writer);
    return {buf.GetString(), buf.GetSize()};
}

const Value* find(const Value& obj, std::string_view key)
{
    if (!obj.IsObject()) {
        return nullptr;
    }
    auto it = obj.FindMember(Value(rapidjson::StringRef(key.data(), key.size())));
    return it == obj.MemberEnd() ? nullptr : &it->value;
}

std::optional<std::string_view> get_string(const Value& obj, std::string_view key)
{
    const Value* v = find(obj, key);
    if (v == nullptr || !v->IsString()) {
        return std::nullopt;
    }
    return std::string_view(v->GetString(), v->GetStringLength());
}

std::optional<std::int64_t> get_int(const Value& obj, std::string_view key)
{
    const Value* v = find(obj, key);
    if (v == nullptr || !v->IsInt64()) {
        return std::nullopt;
    }
    return v->GetInt64();
}

std::string quote(std::string_view s)
{
    rapidjson::StringBuffer buf;
    rapidjson::Writer<rapidjson::StringBuffer> writer(buf);
    writer.String(s.data(), static_cast<rapidjson::SizeType>(s.size()));
    return {buf.GetString(), buf.GetSize()};
}

} // namespace qm::json
