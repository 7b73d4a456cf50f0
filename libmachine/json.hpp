// SPDX-License-Identifier: GPL-2.0-or-later
// RapidJSON helpers: bounded parsing, compact serialisation, typed lookups.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

#include <rapidjson/document.h>

#include "libmachine/expected.hpp"

namespace qm::json {

// RapidJSON's pool allocator starts every document with a 64 KiB chunk. QMP messages are a few
// hundred bytes and hundreds of machines each keep some (queued events, replies in flight), so
// documents here start with 1 KiB chunks and grow in 1 KiB steps (larger values get their own
// chunk). Measured by bench/machine-bench: ~3 KiB less host memory per machine.
class SmallPoolAllocator : public rapidjson::MemoryPoolAllocator<>
{
public:
    static constexpr std::size_t chunk_size = 1024;
    SmallPoolAllocator() : rapidjson::MemoryPoolAllocator<>(chunk_size) {}
    // For documents whose size is known up front (one chunk that fits them exactly).
    explicit SmallPoolAllocator(std::size_t chunk) : rapidjson::MemoryPoolAllocator<>(chunk) {}
};

using Document = rapidjson::GenericDocument<rapidjson::UTF8<>, SmallPoolAllocator>;
using Value = rapidjson::GenericValue<rapidjson::UTF8<>, SmallPoolAllocator>;

// Deepest nesting parse() accepts. QMP's deepest message (query-qmp-schema) nests 5 levels; the
// bound keeps every recursive walk (serialisation, event_match) far from the stack's end.
inline constexpr int max_depth = 128;

// Parses one JSON text (the whole of `text`, nothing after it). Fails with errc::invalid_argument
// and a message naming the offset and RapidJSON's reason, or the nesting limit.
expected<Document> parse(std::string_view text);

// Compact serialisation (no whitespace), as QMP and the logs want it.
std::string to_string(const Value& v);

// Typed member lookup: nullptr/nullopt when `obj` is not an object, has no such member, or the
// member has another type.
const Value* find(const Value& obj, std::string_view key);
std::optional<std::string_view> get_string(const Value& obj, std::string_view key);
std::optional<std::int64_t> get_int(const Value& obj, std::string_view key);

// JSON string escaping of `s` (with the quotes), for building messages without a Document.
std::string quote(std::string_view s);

} // namespace qm::json
