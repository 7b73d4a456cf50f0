// SPDX-License-Identifier: GPL-2.0-or-later
// A machine's name and spec: validation against proto/machine.schema.json, defaults, and the
// versioned definition file format ({"format": 1, ...}) the store keeps.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "libmachine/expected.hpp"
#include "libmachine/json.hpp"

namespace qm::daemon {

// The current definition file format; load_definition() migrates older ones (none yet).
inline constexpr int definition_format = 1;

// A name matches [A-Za-z0-9][A-Za-z0-9_.-]{0,63}: it can never be "..", contain a '/', a control
// character or a space, so it is safe as a file name in the state directory.
// errc::invalid_argument with a message saying what is wrong ("machine name '../x' may contain
// only ..."; the name is quoted with control characters escaped).
expected<void> validate_name(std::string_view name);

enum class ShutdownModeSpec { powerdown, quit };
enum class RestartPolicy { no, on_failure, always };

const char* to_string(ShutdownModeSpec m) noexcept;
const char* to_string(RestartPolicy p) noexcept;

struct ConsoleSpec
{
    bool enabled = true;
    // Bytes of recent output kept in memory (0: none).
    std::uint64_t ring_size = std::uint64_t{64} * 1024;
    // Bound of the console log file (0: no log file).
    std::uint64_t log_size = std::uint64_t{1024} * 1024;

    bool operator==(const ConsoleSpec&) const = default;
};

struct ShutdownSpec
{
    ShutdownModeSpec mode = ShutdownModeSpec::powerdown;
    // The whole graceful part of a stop; after it, SIGKILL.
    std::uint32_t timeout_s = 30;

    bool operator==(const ShutdownSpec&) const = default;
};

struct RestartSpec
{
    RestartPolicy policy = RestartPolicy::no;
    // Crash-loop limit: at most max_restarts restarts within window_s, then `failed`.
    std::uint32_t max_restarts = 5;
    std::uint32_t window_s = 300;
    // Backoff between attempts: initial, doubling up to max.
    std::uint32_t backoff_initial_ms = 1000;
    std::uint32_t backoff_max_ms = 60000;

    bool operator==(const RestartSpec&) const = default;
};

// A machine spec with every default filled in (what parse_spec returns and spec_to_json writes).
struct MachineSpec
{
    std::string uuid;                          // lower-case 8-4-4-4-12 hex; generated when absent
    std::string binary = "qemu-system-x86_64"; // path or PATH-searched name
    std::optional<std::string> machine{};      // -machine value
    std::optional<std::uint32_t> memory_mib{}; // -m value
    std::uint32_t cpus = 1;                    // -smp value
    std::vector<std::string> args{};           // extra arguments, never through a shell
    ConsoleSpec console{};
    ShutdownSpec shutdown{};
    RestartSpec restart{};
    bool autostart = false;

    // Field by field (parse_spec(spec_to_json(s)) == s).
    bool operator==(const MachineSpec&) const = default;
};

// Validates `spec` (a JSON object) against proto/machine.schema.json (embedded at build time)
// and returns it with defaults filled in; a missing uuid is generated (random v4).
// errc::invalid_argument naming the field and the rule: "spec.cpus: must be an integer between 1
// and 1024", "spec.console.frob: unknown field", "spec.args[3]: '-daemonize' is managed by
// qmachined", "spec: must be an object".
expected<MachineSpec> parse_spec(const json::Value& spec);
// The same from JSON text (parse errors are errc::invalid_argument too).
expected<MachineSpec> parse_spec(std::string_view json_text);

// The spec as JSON, every field present (what GET shows and what the store writes).
json::Document spec_to_json(const MachineSpec& spec);
// Writes it into `out` (an object member value) with `alloc`.
void spec_to_json(const MachineSpec& spec, json::Value& out, json::Document::AllocatorType& alloc);

// The schema text (proto/machine.schema.json as built in).
std::string_view spec_schema();

// A random v4 uuid, lower case.
std::string generate_uuid();

// A definition as the store keeps it: {"format": 1, "name": ..., "generation": N, "spec": {...}}.
struct Definition
{
    std::string name;
    std::uint64_t generation = 1;
    MachineSpec spec;

    bool operator==(const Definition&) const = default;
};

std::string definition_to_json(const Definition& def);
// errc::invalid_argument for a file that is not a valid definition (bad JSON, unknown format,
// name invalid, spec invalid), with the reason.
expected<Definition> definition_from_json(std::string_view text);

} // namespace qm::daemon
