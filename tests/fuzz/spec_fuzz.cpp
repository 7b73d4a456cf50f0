// SPDX-License-Identifier: GPL-2.0-or-later
// libFuzzer target for machine specs, names and definition files: the bytes are what a client
// sends as a spec (REST body, D-Bus argument) or what a definition file in the state directory
// holds. Each input is tried as all three. What must hold:
//  - an accepted spec or definition round-trips (written, read again, equal);
//  - a refused one has a non-empty message of printable ASCII only (names and fields are escaped,
//    so nothing a client sends can put control characters into a log line or a reply);
//  - an accepted name is 1 to 64 bytes of [A-Za-z0-9_.-] not starting with '.', '_' or '-'.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "daemon/supervisor/spec.hpp"

namespace {

void check(bool ok)
{
    if (!ok) {
        std::abort();
    }
}

void check_message(const qm::Error& e)
{
    check(e.is(qm::errc::invalid_argument));
    check(!e.message.empty());
    for (unsigned char c : e.message) {
        check(c >= 0x20 && c < 0x7f);
    }
}

void fuzz_name(std::string_view text)
{
    auto r = qm::daemon::validate_name(text);
    if (!r) {
        check_message(r.error());
        return;
    }
    check(!text.empty() && text.size() <= 64);
    check(text != "." && text != ".." && text.find('/') == std::string_view::npos);
    check(text.front() != '.' && text.front() != '-' && text.front() != '_');
}

void fuzz_spec(std::string_view text)
{
    auto spec = qm::daemon::parse_spec(text);
    if (!spec) {
        check_message(spec.error());
        return;
    }
    const qm::json::Document doc = qm::daemon::spec_to_json(*spec);
    auto again = qm::daemon::parse_spec(doc);
    check(again.has_value() && *again == *spec);
    auto from_text = qm::daemon::parse_spec(qm::json::to_string(doc));
    check(from_text.has_value() && *from_text == *spec);
}

void fuzz_definition(std::string_view text)
{
    auto def = qm::daemon::definition_from_json(text);
    if (!def) {
        check_message(def.error());
        return;
    }
    const std::string written = qm::daemon::definition_to_json(*def);
    auto again = qm::daemon::definition_from_json(written);
    check(again.has_value() && *again == *def);
    check(qm::daemon::definition_to_json(*again) == written);
}

} // namespace

// NOLINTNEXTLINE(readability-identifier-naming): libFuzzer's entry point
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    fuzz_name(text);
    fuzz_spec(text);
    fuzz_definition(text);
    return 0;
}
