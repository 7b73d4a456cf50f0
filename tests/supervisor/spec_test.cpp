// SPDX-License-Identifier: GPL-2.0-or-later
// Tests of daemon/supervisor/spec: machine names, spec validation against
// proto/machine.schema.json (messages naming the field), defaults, uuids, round trips and the
// definition file format.
#include "daemon/supervisor/spec.hpp"

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <rapidjson/document.h>
#include <rapidjson/schema.h>

namespace qm::daemon {
namespace {

std::string read_file(const std::string& path)
{
    std::ifstream f(path, std::ios::binary);
    std::ostringstream s;
    s << f.rdbuf();
    return s.str();
}

// The message of a failed parse_spec, or "OK" so that a wrong acceptance shows in the diff.
std::string spec_error(std::string_view text)
{
    auto spec = parse_spec(text);
    if (spec.has_value()) {
        return "OK";
    }
    EXPECT_TRUE(spec.error().is(errc::invalid_argument)) << spec.error().message;
    return spec.error().message;
}

MachineSpec parse_ok(std::string_view text)
{
    auto spec = parse_spec(text);
    EXPECT_TRUE(spec.has_value()) << text << ": " << spec.error().message;
    return spec.has_value() ? *spec : MachineSpec{};
}

bool has_control_characters(std::string_view s)
{
    for (unsigned char c : s) {
        if (c < 0x20 || c == 0x7f) {
            return true;
        }
    }
    return false;
}

// xxxxxxxx-xxxx-4xxx-[89ab]xxx-xxxxxxxxxxxx, lower-case hex (not std::regex: GCC 12 with the
// sanitizers warns inside <regex>).
bool is_v4_uuid(const std::string& s)
{
    if (s.size() != 36) {
        return false;
    }
    for (std::size_t i = 0; i < s.size(); ++i) {
        const char c = s[i];
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-') {
                return false;
            }
        } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
            return false;
        }
    }
    return s[14] == '4' && (s[19] == '8' || s[19] == '9' || s[19] == 'a' || s[19] == 'b');
}

// --- Names --------------------------------------------------------------------------------------

TEST(SpecName, ValidNames)
{
    for (const std::string& name :
         std::vector<std::string>{"a", "A-1.b_c", "0", "web01", "x..y", std::string(64, 'n')}) {
        SCOPED_TRACE(name);
        auto r = validate_name(name);
        EXPECT_TRUE(r.has_value()) << r.error().message;
    }
}

TEST(SpecName, InvalidNames)
{
    struct Case
    {
        std::string name;
        std::string message;
    };
    const std::vector<Case> cases{
        {"", "machine name must not be empty"},
        {std::string(65, 'n'),
         "machine name '" + std::string(65, 'n') + "' is longer than 64 characters"},
        {"../x", "machine name '../x' may contain only letters, digits, '_', '.' and '-'"},
        {"a/b", "machine name 'a/b' may contain only letters, digits, '_', '.' and '-'"},
        {".hidden", "machine name '.hidden' must start with a letter or a digit"},
        {"-x", "machine name '-x' must start with a letter or a digit"},
        {"_x", "machine name '_x' must start with a letter or a digit"},
        {"a b", "machine name 'a b' may contain only letters, digits, '_', '.' and '-'"},
        {"a\n", "machine name 'a\\n' may contain only letters, digits, '_', '.' and '-'"},
        {"a\x01", "machine name 'a\\x01' may contain only letters, digits, '_', '.' and '-'"},
        {std::string("a\0b", 3),
         "machine name 'a\\x00b' may contain only letters, digits, '_', '.' and '-'"},
        {"caf\xc3\xa9",
         "machine name 'caf\\xc3\\xa9' may contain only letters, digits, '_', '.' and '-'"},
        {"..", "machine name '..' must start with a letter or a digit"},
        {".", "machine name '.' must start with a letter or a digit"},
        {"a\x1b[2J", "machine name 'a\\x1b[2J' may contain only letters, digits, '_', '.' and '-'"},
    };
    for (const auto& c : cases) {
        SCOPED_TRACE(c.name);
        auto r = validate_name(c.name);
        ASSERT_FALSE(r.has_value());
        EXPECT_TRUE(r.error().is(errc::invalid_argument));
        EXPECT_EQ(r.error().message, c.message);
        EXPECT_FALSE(has_control_characters(r.error().message));
    }
}

TEST(SpecName, HugeNameIsNotEchoedWhole)
{
    auto r = validate_name(std::string(1000000, 'x'));
    ASSERT_FALSE(r.has_value());
    EXPECT_LT(r.error().message.size(), 200U);
}

// --- Defaults and uuids -------------------------------------------------------------------------

TEST(Spec, EmptySpecGetsDefaults)
{
    const MachineSpec spec = parse_ok("{}");
    EXPECT_TRUE(is_v4_uuid(spec.uuid)) << spec.uuid;
    EXPECT_EQ(spec.binary, "qemu-system-x86_64");
    EXPECT_FALSE(spec.machine.has_value());
    EXPECT_FALSE(spec.memory_mib.has_value());
    EXPECT_EQ(spec.cpus, 1U);
    EXPECT_TRUE(spec.args.empty());
    EXPECT_TRUE(spec.console.enabled);
    EXPECT_EQ(spec.console.ring_size, 65536U);
    EXPECT_EQ(spec.console.log_size, 1048576U);
    EXPECT_EQ(spec.shutdown.mode, ShutdownModeSpec::powerdown);
    EXPECT_EQ(spec.shutdown.timeout_s, 30U);
    EXPECT_EQ(spec.restart.policy, RestartPolicy::no);
    EXPECT_EQ(spec.restart.max_restarts, 5U);
    EXPECT_EQ(spec.restart.window_s, 300U);
    EXPECT_EQ(spec.restart.backoff_initial_ms, 1000U);
    EXPECT_EQ(spec.restart.backoff_max_ms, 60000U);
    EXPECT_FALSE(spec.autostart);

    MachineSpec expected;
    expected.uuid = spec.uuid;
    EXPECT_EQ(spec, expected);
}

TEST(Spec, EmptySubObjectsGetDefaults)
{
    const MachineSpec spec =
        parse_ok(R"({"console": {}, "shutdown": {}, "restart": {}, "args": []})");
    MachineSpec expected;
    expected.uuid = spec.uuid;
    EXPECT_EQ(spec, expected);
}

// The schema's "default"s are documentation; they must say what the code does.
TEST(Spec, SchemaDefaultsAreTheCodesDefaults)
{
    rapidjson::Document schema;
    schema.Parse(spec_schema().data(), spec_schema().size());
    ASSERT_FALSE(schema.HasParseError());
    const MachineSpec spec = parse_ok("{}");
    const json::Document written = spec_to_json(spec);

    int checked = 0;
    const auto compare = [&](const rapidjson::Value& properties, const json::Value& actual,
                             const std::string& where, const auto& self) -> void {
        for (const auto& p : properties.GetObject()) {
            const std::string name = p.name.GetString();
            std::string path = where;
            path += "." + name;
            SCOPED_TRACE(path);
            if (p.value.HasMember("properties")) {
                ASSERT_TRUE(actual.HasMember(name.c_str()));
                self(p.value["properties"], actual[name.c_str()], path, self);
                continue;
            }
            if (!p.value.HasMember("default")) {
                continue;
            }
            ASSERT_TRUE(actual.HasMember(name.c_str()));
            const rapidjson::Value& def = p.value["default"];
            const json::Value& got = actual[name.c_str()];
            if (def.IsString()) {
                EXPECT_EQ(std::string(got.GetString()), def.GetString());
            } else if (def.IsBool()) {
                EXPECT_EQ(got.GetBool(), def.GetBool());
            } else if (def.IsUint64()) {
                EXPECT_EQ(got.GetUint64(), def.GetUint64());
            } else if (def.IsArray()) {
                EXPECT_EQ(got.Size(), def.Size());
            } else {
                ADD_FAILURE() << "unexpected default type";
            }
            ++checked;
        }
    };
    compare(schema["properties"], written, "spec", compare);
    EXPECT_EQ(checked, 14);
}

TEST(Spec, UuidIsGeneratedWhenAbsent)
{
    const MachineSpec a = parse_ok("{}");
    const MachineSpec b = parse_ok("{}");
    EXPECT_TRUE(is_v4_uuid(a.uuid)) << a.uuid;
    EXPECT_TRUE(is_v4_uuid(b.uuid)) << b.uuid;
    EXPECT_NE(a.uuid, b.uuid);
}

TEST(Spec, GeneratedUuidsAreRandomV4)
{
    std::vector<std::string> seen;
    for (int i = 0; i < 100; ++i) {
        const std::string u = generate_uuid();
        EXPECT_TRUE(is_v4_uuid(u)) << u;
        for (const auto& s : seen) {
            EXPECT_NE(s, u);
        }
        seen.push_back(u);
    }
}

TEST(Spec, UuidIsKeptInLowerCase)
{
    EXPECT_EQ(parse_ok(R"({"uuid": "0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0"})").uuid,
              "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
    EXPECT_EQ(parse_ok(R"({"uuid": "00000000-0000-0000-0000-000000000000"})").uuid,
              "00000000-0000-0000-0000-000000000000");
}

TEST(Spec, MalformedUuidsAreRejected)
{
    const std::string msg =
        "spec.uuid: must be a string matching "
        "^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$";
    for (const char* bad :
         {R"("")", R"("not-a-uuid")", R"("{0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0}")",
          R"("0f1e2d3c4b5a69788796a5b4c3d2e1f0")", R"("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f")",
          R"("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f00")", R"("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fg")",
          R"(" 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")", "7"}) {
        SCOPED_TRACE(bad);
        EXPECT_EQ(spec_error(std::string(R"({"uuid": )") + bad + "}"), msg);
    }
}

// --- Wrong types, unknown fields ----------------------------------------------------------------

struct Case
{
    std::string json;
    std::string message;
};

void expect_errors(const std::vector<Case>& cases)
{
    for (const auto& c : cases) {
        SCOPED_TRACE(c.json);
        const std::string message = spec_error(c.json);
        EXPECT_EQ(message, c.message);
        EXPECT_FALSE(has_control_characters(message));
    }
}

TEST(Spec, WrongTypesNameTheField)
{
    expect_errors({
        {"[]", "spec: must be an object"},
        {"null", "spec: must be an object"},
        {R"("x")", "spec: must be an object"},
        {R"({"binary": 1})", "spec.binary: must be a string of 1 to 4096 bytes"},
        {R"({"machine": true})", "spec.machine: must be a string of 1 to 256 bytes"},
        {R"({"memory_mib": "1024"})", "spec.memory_mib: must be an integer between 1 and 16777216"},
        {R"({"cpus": "2"})", "spec.cpus: must be an integer between 1 and 1024"},
        {R"({"cpus": 1.5})", "spec.cpus: must be an integer between 1 and 1024"},
        {R"({"cpus": 2.0})", "spec.cpus: must be an integer between 1 and 1024"},
        {R"({"cpus": true})", "spec.cpus: must be an integer between 1 and 1024"},
        {R"({"cpus": [1]})", "spec.cpus: must be an integer between 1 and 1024"},
        {R"({"args": "-m 1G"})", "spec.args: must be an array of at most 256 strings"},
        {R"({"args": {}})", "spec.args: must be an array of at most 256 strings"},
        {R"({"args": ["-m", "1G", "-S", 3]})", "spec.args[3]: must be a string of 1 to 4096 bytes"},
        {R"({"args": [["-m"]]})", "spec.args[0]: must be a string of 1 to 4096 bytes"},
        {R"({"console": true})", "spec.console: must be an object"},
        {R"({"console": {"enabled": 1}})", "spec.console.enabled: must be true or false"},
        {R"({"console": {"enabled": "true"}})", "spec.console.enabled: must be true or false"},
        {R"({"console": {"ring_size": "64k"}})",
         "spec.console.ring_size: must be an integer between 0 and 67108864"},
        {R"({"console": {"log_size": 1e3}})",
         "spec.console.log_size: must be an integer between 0 and 1073741824"},
        {R"({"shutdown": "quit"})", "spec.shutdown: must be an object"},
        {R"({"shutdown": {"mode": 1}})",
         R"(spec.shutdown.mode: must be one of "powerdown", "quit")"},
        {R"({"shutdown": {"mode": "halt"}})",
         R"(spec.shutdown.mode: must be one of "powerdown", "quit")"},
        {R"({"shutdown": {"mode": "QUIT"}})",
         R"(spec.shutdown.mode: must be one of "powerdown", "quit")"},
        {R"({"shutdown": {"timeout_s": "30"}})",
         "spec.shutdown.timeout_s: must be an integer between 0 and 3600"},
        {R"({"restart": []})", "spec.restart: must be an object"},
        {R"({"restart": {"policy": "on_failure"}})",
         R"(spec.restart.policy: must be one of "no", "on-failure", "always")"},
        {R"({"restart": {"policy": false}})",
         R"(spec.restart.policy: must be one of "no", "on-failure", "always")"},
        {R"({"restart": {"max_restarts": "5"}})",
         "spec.restart.max_restarts: must be an integer between 0 and 1000"},
        {R"({"restart": {"window_s": 1.5}})",
         "spec.restart.window_s: must be an integer between 1 and 86400"},
        {R"({"restart": {"backoff_initial_ms": "1s"}})",
         "spec.restart.backoff_initial_ms: must be an integer between 0 and 3600000"},
        {R"({"restart": {"backoff_max_ms": {}}})",
         "spec.restart.backoff_max_ms: must be an integer between 0 and 3600000"},
        {R"({"autostart": "yes"})", "spec.autostart: must be true or false"},
        {R"({"autostart": 0})", "spec.autostart: must be true or false"},
    });
}

// No field takes null: each one named, whatever its type.
TEST(Spec, NullIsWrongForEveryField)
{
    const std::vector<std::string> fields{
        "uuid",
        "binary",
        "machine",
        "memory_mib",
        "cpus",
        "args",
        "console",
        "shutdown",
        "restart",
        "autostart",
        "console.enabled",
        "console.ring_size",
        "console.log_size",
        "shutdown.mode",
        "shutdown.timeout_s",
        "restart.policy",
        "restart.max_restarts",
        "restart.window_s",
        "restart.backoff_initial_ms",
        "restart.backoff_max_ms",
    };
    for (const auto& field : fields) {
        SCOPED_TRACE(field);
        const auto dot = field.find('.');
        const std::string text = dot == std::string::npos
                                     ? R"({")" + field + R"(": null})"
                                     : R"({")" + field.substr(0, dot) + R"(": {")" +
                                           field.substr(dot + 1) + R"(": null}})";
        const std::string message = spec_error(text);
        EXPECT_EQ(message.rfind("spec." + field + ": must be ", 0), 0U) << message;
    }
}

TEST(Spec, UnknownFieldsAreNamed)
{
    expect_errors({
        {R"({"frobnicate": 1})", "spec.frobnicate: unknown field"},
        {R"({"cpus": 2, "memory": 1024})", "spec.memory: unknown field"},
        {R"({"console": {"frob": true}})", "spec.console.frob: unknown field"},
        {R"({"shutdown": {"mode": "quit", "force": true}})", "spec.shutdown.force: unknown field"},
        {R"({"restart": {"policy": "always", "delay": 1}})", "spec.restart.delay: unknown field"},
        {R"({"CPUS": 2})", "spec.CPUS: unknown field"},
        {R"({"": 2})", R"(spec[""]: unknown field)"},
        {R"({"a b": 2})", R"(spec["a b"]: unknown field)"},
        {R"({"a.b": 2})", R"(spec["a.b"]: unknown field)"},
        {R"({"a/b~c": 2})", R"(spec["a/b~c"]: unknown field)"},
        {R"({"x\u0001\n": 2})", R"(spec["x\x01\n"]: unknown field)"},
        {R"({"cpus\u0000": 2})", R"(spec["cpus\x00"]: unknown field)"},
        {R"({"console": {"3": 1}})", "spec.console.3: unknown field"},
    });
}

TEST(Spec, DuplicateFieldsAreRejected)
{
    expect_errors({
        {R"({"cpus": 1, "cpus": 2})", "spec.cpus: appears more than once"},
        {R"({"console": {"enabled": true, "enabled": false}})",
         "spec.console.enabled: appears more than once"},
    });
}

// --- Bounds -------------------------------------------------------------------------------------

TEST(Spec, NumericBounds)
{
    struct Bound
    {
        std::string field; // "cpus" or "console.ring_size"
        std::int64_t min;
        std::int64_t max;
    };
    const std::vector<Bound> bounds{
        {"memory_mib", 1, 16777216},
        {"cpus", 1, 1024},
        {"console.ring_size", 0, 67108864},
        {"console.log_size", 0, 1073741824},
        {"shutdown.timeout_s", 0, 3600},
        {"restart.max_restarts", 0, 1000},
        {"restart.window_s", 1, 86400},
        {"restart.backoff_initial_ms", 0, 3600000},
        {"restart.backoff_max_ms", 0, 3600000},
    };
    const auto text = [](const std::string& field, const std::string& value) {
        const auto dot = field.find('.');
        if (dot == std::string::npos) {
            return R"({")" + field + R"(": )" + value + "}";
        }
        // Keep backoff_max_ms >= backoff_initial_ms out of the way of the bound under test.
        std::string extra;
        if (field == "restart.backoff_max_ms") {
            extra = R"(, "backoff_initial_ms": 0)";
        } else if (field == "restart.backoff_initial_ms") {
            extra = R"(, "backoff_max_ms": 3600000)";
        }
        return R"({")" + field.substr(0, dot) + R"(": {")" + field.substr(dot + 1) + R"(": )" +
               value + extra + "}}";
    };
    for (const auto& b : bounds) {
        SCOPED_TRACE(b.field);
        const std::string message = "spec." + b.field + ": must be an integer between " +
                                    std::to_string(b.min) + " and " + std::to_string(b.max);
        EXPECT_EQ(spec_error(text(b.field, std::to_string(b.min))), "OK");
        EXPECT_EQ(spec_error(text(b.field, std::to_string(b.max))), "OK");
        EXPECT_EQ(spec_error(text(b.field, std::to_string(b.min - 1))), message);
        EXPECT_EQ(spec_error(text(b.field, std::to_string(b.max + 1))), message);
        EXPECT_EQ(spec_error(text(b.field, "-9223372036854775808")), message);
        EXPECT_EQ(spec_error(text(b.field, "18446744073709551615")), message);
        EXPECT_EQ(spec_error(text(b.field, "1e30")), message);
    }
    EXPECT_EQ(parse_ok(R"({"memory_mib": 16777216})").memory_mib, 16777216U);
    EXPECT_EQ(parse_ok(R"({"console": {"log_size": 1073741824}})").console.log_size, 1073741824U);
}

TEST(Spec, StringBoundsAreInBytes)
{
    const auto with = [](const std::string& field, const std::string& value) {
        return R"({")" + field + R"(": ")" + value + R"("})";
    };
    EXPECT_EQ(spec_error(with("binary", "")), "spec.binary: must be a string of 1 to 4096 bytes");
    EXPECT_EQ(spec_error(with("binary", std::string(4096, 'b'))), "OK");
    EXPECT_EQ(spec_error(with("binary", std::string(4097, 'b'))),
              "spec.binary: must be a string of 1 to 4096 bytes");
    EXPECT_EQ(spec_error(with("machine", "")), "spec.machine: must be a string of 1 to 256 bytes");
    EXPECT_EQ(spec_error(with("machine", std::string(256, 'm'))), "OK");
    EXPECT_EQ(spec_error(with("machine", std::string(257, 'm'))),
              "spec.machine: must be a string of 1 to 256 bytes");

    // 200 two-byte characters: 200 code points (the schema's count) but 400 bytes.
    std::string e_acute;
    for (int i = 0; i < 200; ++i) {
        e_acute += "\xc3\xa9";
    }
    EXPECT_EQ(spec_error(with("machine", e_acute.substr(0, 256))), "OK");
    EXPECT_EQ(spec_error(with("machine", e_acute)),
              "spec.machine: must be a string of 1 to 256 bytes");
    // Invalid UTF-8 (RapidJSON's length check skips it): the byte bound still holds.
    EXPECT_EQ(spec_error(with("machine", std::string(300, '\xff'))),
              "spec.machine: must be a string of 1 to 256 bytes");
}

std::string args_json(const std::vector<std::string>& args)
{
    std::string out = R"({"args": [)";
    for (std::size_t i = 0; i < args.size(); ++i) {
        out += (i == 0 ? "" : ",") + json::quote(args[i]);
    }
    return out + "]}";
}

TEST(Spec, ArgsBounds)
{
    EXPECT_EQ(parse_ok(args_json(std::vector<std::string>(256, "-S"))).args.size(), 256U);
    EXPECT_EQ(spec_error(args_json(std::vector<std::string>(257, "-S"))),
              "spec.args: must have at most 256 items");
    EXPECT_EQ(spec_error(args_json({"-S", ""})),
              "spec.args[1]: must be a string of 1 to 4096 bytes");
    EXPECT_EQ(parse_ok(args_json({std::string(4096, 'a')})).args[0].size(), 4096U);
    EXPECT_EQ(spec_error(args_json({"-S", std::string(4097, 'a')})),
              "spec.args[1]: must be a string of 1 to 4096 bytes");
    std::string long_utf8;
    for (int i = 0; i < 2049; ++i) {
        long_utf8 += "\xc3\xa9";
    }
    EXPECT_EQ(spec_error(args_json({long_utf8})),
              "spec.args[0]: must be a string of 1 to 4096 bytes");
}

TEST(Spec, NulBytesAreRejected)
{
    expect_errors({
        {R"({"binary": "qemu\u0000-x"})", "spec.binary: must not contain NUL bytes"},
        {R"({"machine": "\u0000"})", "spec.machine: must not contain NUL bytes"},
        {R"({"args": ["-S", "-append", "a\u0000b"]})", "spec.args[2]: must not contain NUL bytes"},
        // The validator's regex stops at the NUL and sees a good uuid.
        {R"({"uuid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\u0000junk"})",
         "spec.uuid: must not contain NUL bytes"},
    });
}

TEST(Spec, BackoffMaxIsNotBelowInitial)
{
    EXPECT_EQ(spec_error(R"({"restart": {"backoff_initial_ms": 5000, "backoff_max_ms": 4999}})"),
              "spec.restart.backoff_max_ms: must not be less than backoff_initial_ms (5000)");
    EXPECT_EQ(spec_error(R"({"restart": {"backoff_max_ms": 999}})"),
              "spec.restart.backoff_max_ms: must not be less than backoff_initial_ms (1000)");
    EXPECT_EQ(spec_error(R"({"restart": {"backoff_initial_ms": 5000, "backoff_max_ms": 5000}})"),
              "OK");
}

// --- Managed arguments --------------------------------------------------------------------------

TEST(Spec, ManagedArgsAreRefused)
{
    for (const std::string option : {"daemonize", "qmp", "qmp-pretty", "monitor", "mon", "name",
                                     "runas", "chroot", "pidfile", "sandbox", "uuid", "add-fd",
                                     "readconfig", "writeconfig", "set"}) {
        for (const std::string dashes : {"-", "--"}) {
            const std::string arg = dashes + option;
            SCOPED_TRACE(arg);
            EXPECT_EQ(spec_error(args_json({"-nographic", "-m", "64", arg, "x"})),
                      "spec.args[3]: '" + arg + "' is managed by qmachined");
            EXPECT_EQ(spec_error(args_json({arg})),
                      "spec.args[0]: '" + arg + "' is managed by qmachined");
        }
    }
    EXPECT_EQ(spec_error(args_json({"-daemonize"})),
              "spec.args[0]: '-daemonize' is managed by qmachined");
}

// Options refused for some values: -incoming exec: (runs a program on the host) and a -chardev
// with one of qmachined's own ids (mon, console). The error names the value's index.
TEST(Spec, ManagedValuesAreRefused)
{
    struct Case
    {
        std::vector<std::string> args;
        std::string message;
    };
    const std::vector<Case> cases{
        {{"-incoming", "exec:cat /etc/shadow"},
         "spec.args[1]: '-incoming exec:' is managed by qmachined"},
        {{"-S", "--incoming", "exec:"}, "spec.args[2]: '--incoming exec:' is managed by qmachined"},
        {{"-chardev", "socket,id=mon,path=/x"},
         "spec.args[1]: chardev id 'mon' is reserved for qmachined"},
        {{"-m", "64", "-S", "-nographic", "--chardev", "socket,path=/x,server=on,id=mon"},
         "spec.args[5]: chardev id 'mon' is reserved for qmachined"},
        {{"-chardev", "id=console,backend=null"},
         "spec.args[1]: chardev id 'console' is reserved for qmachined"},
        {{"-chardev", "null,id=console"},
         "spec.args[1]: chardev id 'console' is reserved for qmachined"},
        // An id given twice: whichever QEMU takes, a reserved one is refused.
        {{"-chardev", "null,id=mine,id=mon"},
         "spec.args[1]: chardev id 'mon' is reserved for qmachined"},
        {{"-chardev", "file,,x,id=mon,path=/x"},
         "spec.args[1]: chardev id 'mon' is reserved for qmachined"},
        {{"-chardev", "null,id=mon-launch"},
         "spec.args[1]: chardev id 'mon-launch' is reserved for qmachined"},
        // A human monitor multiplexed onto a device: outside the QMP policy.
        {{"-serial", "mon:unix:/tmp/hmp,server=on,wait=off"},
         "spec.args[1]: '-serial mon:' (a monitor) is managed by qmachined"},
        {{"-m", "64", "--parallel", "mon:stdio"},
         "spec.args[3]: '--parallel mon:' (a monitor) is managed by qmachined"},
        {{"-virtioconsole", "mon:null"},
         "spec.args[1]: '-virtioconsole mon:' (a monitor) is managed by qmachined"},
        {{"-debugcon", "mon:stdio"},
         "spec.args[1]: '-debugcon mon:' (a monitor) is managed by qmachined"},
    };
    for (const auto& c : cases) {
        SCOPED_TRACE(testing::PrintToString(c.args));
        EXPECT_EQ(spec_error(args_json(c.args)), c.message);
        auto r = parse_spec(args_json(c.args));
        ASSERT_FALSE(r);
        EXPECT_TRUE(r.error().is(errc::invalid_argument));
    }
}

TEST(Spec, NearMissesOfManagedValuesPass)
{
    for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
             {"-incoming", "tcp:127.0.0.1:4444"},
             {"-incoming", "defer"},
             {"-incoming", "unix:/run/x.sock,exec:"},
             {"-append", "exec:x"},
             {"-chardev", "socket,id=monitor2,path=/x"},
             {"-chardev", "socket,id=mon2,path=/x"},
             {"-chardev", "socket,id=console0,path=/x"},
             {"-chardev", "socket,id=xmon,path=/x"},
             {"-chardev", "socket,id=Mon,path=/x"},
             {"-chardev", "null,id=c1,path=mon"},
             // ",," is a comma inside the path: there is no id=mon option.
             {"-chardev", "file,id=log,path=/x,,id=mon"},
             {"-chardev", "mon"},
             {"-device", "isa-serial,chardev=mon2"},
             // A device on a character device that is no monitor.
             {"-serial", "unix:/tmp/s,server=on,wait=off"},
             {"-serial", "chardev:mon2"},
             {"-parallel", "none"},
             {"-append", "mon:x"},
             {"-S", "-chardev"},
             {"-incoming"},
         }) {
        SCOPED_TRACE(testing::PrintToString(args));
        EXPECT_EQ(parse_ok(args_json(args)).args, args);
    }
}

TEST(Spec, OtherArgsPass)
{
    const std::vector<std::string> args{
        "-nographic",  "-m",
        "64",          "--S",
        "daemonize",   "name",
        "-named",      "-qmpx",
        "-monitors",   "---daemonize",
        "-",           "--",
        "-smp",        "2",
        "-append",     "console=ttyS0 quiet",
        "$(rm -rf /)",
    };
    EXPECT_EQ(parse_ok(args_json(args)).args, args);
}

// --- Round trips --------------------------------------------------------------------------------

MachineSpec full_spec()
{
    MachineSpec s;
    s.uuid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    s.binary = "/usr/local/bin/qemu-system-aarch64";
    s.machine = "virt,gic-version=3";
    s.memory_mib = 2048;
    s.cpus = 4;
    s.args = {"-nographic", "-append", R"(console=ttyAMA0 "quoted" \)", "caf\xc3\xa9"};
    s.console = {false, 0, 1073741824};
    s.shutdown = {ShutdownModeSpec::quit, 0};
    s.restart = {RestartPolicy::on_failure, 0, 86400, 0, 3600000};
    s.autostart = true;
    return s;
}

TEST(Spec, SpecToJsonWritesEveryField)
{
    const json::Document doc = spec_to_json(full_spec());
    EXPECT_EQ(
        json::to_string(doc),
        R"({"uuid":"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0","binary":"/usr/local/bin/qemu-system-aarch64",)"
        R"("machine":"virt,gic-version=3","memory_mib":2048,"cpus":4,)"
        R"("args":["-nographic","-append","console=ttyAMA0 \"quoted\" \\","café"],)"
        R"("console":{"enabled":false,"ring_size":0,"log_size":1073741824},)"
        R"("shutdown":{"mode":"quit","timeout_s":0},)"
        R"("restart":{"policy":"on-failure","max_restarts":0,"window_s":86400,"backoff_initial_ms":0,"backoff_max_ms":3600000},)"
        R"("autostart":true})");
}

TEST(Spec, OptionalFieldsAreWrittenOnlyWhenSet)
{
    MachineSpec s;
    s.uuid = generate_uuid();
    const json::Document doc = spec_to_json(s);
    EXPECT_FALSE(doc.HasMember("machine"));
    EXPECT_FALSE(doc.HasMember("memory_mib"));
    for (const char* always :
         {"uuid", "binary", "cpus", "args", "console", "shutdown", "restart", "autostart"}) {
        EXPECT_TRUE(doc.HasMember(always)) << always;
    }
}

TEST(Spec, RoundTrips)
{
    std::vector<MachineSpec> specs{full_spec(), parse_ok("{}")};
    MachineSpec s = full_spec();
    s.machine.reset();
    s.restart.policy = RestartPolicy::always;
    s.shutdown.mode = ShutdownModeSpec::powerdown;
    specs.push_back(s);
    s.restart.policy = RestartPolicy::no;
    s.memory_mib.reset();
    s.args.clear();
    specs.push_back(s);

    for (const auto& spec : specs) {
        SCOPED_TRACE(spec.uuid);
        const json::Document doc = spec_to_json(spec);
        auto again = parse_spec(doc);
        ASSERT_TRUE(again.has_value()) << again.error().message;
        EXPECT_EQ(*again, spec);
        auto from_text = parse_spec(json::to_string(doc));
        ASSERT_TRUE(from_text.has_value()) << from_text.error().message;
        EXPECT_EQ(*from_text, spec);
    }
}

TEST(Spec, SpecToJsonIntoAMember)
{
    json::Document doc;
    doc.SetObject();
    json::Value member;
    spec_to_json(full_spec(), member, doc.GetAllocator());
    doc.AddMember("spec", member, doc.GetAllocator());
    auto again = parse_spec(doc["spec"]);
    ASSERT_TRUE(again.has_value()) << again.error().message;
    EXPECT_EQ(*again, full_spec());
}

TEST(Spec, EnumNames)
{
    EXPECT_STREQ(to_string(ShutdownModeSpec::powerdown), "powerdown");
    EXPECT_STREQ(to_string(ShutdownModeSpec::quit), "quit");
    EXPECT_STREQ(to_string(RestartPolicy::no), "no");
    EXPECT_STREQ(to_string(RestartPolicy::on_failure), "on-failure");
    EXPECT_STREQ(to_string(RestartPolicy::always), "always");
}

TEST(Spec, InvalidJsonText)
{
    for (const char* bad : {"", "{", "{} {}", R"({"cpus": })", "nul"}) {
        SCOPED_TRACE(bad);
        const std::string message = spec_error(bad);
        EXPECT_EQ(message.rfind("spec: invalid JSON", 0), 0U) << message;
    }
}

// --- Definitions --------------------------------------------------------------------------------

Definition full_definition()
{
    return {"web-01", 7, full_spec()};
}

TEST(Definition, RoundTrips)
{
    const std::string text = definition_to_json(full_definition());
    auto def = definition_from_json(text);
    ASSERT_TRUE(def.has_value()) << def.error().message;
    EXPECT_EQ(*def, full_definition());
    // Written the same way again: the store can compare files.
    EXPECT_EQ(definition_to_json(*def), text);
}

TEST(Definition, IsReadableJsonWithFormatFirst)
{
    const std::string text = definition_to_json(full_definition());
    EXPECT_EQ(
        text.rfind(
            "{\n  \"format\": 1,\n  \"name\": \"web-01\",\n  \"generation\": 7,\n  \"spec\": {", 0),
        0U)
        << text;
    EXPECT_EQ(text.back(), '\n');
    auto doc = json::parse(text);
    ASSERT_TRUE(doc.has_value()) << doc.error().message;
    auto spec = parse_spec((*doc)["spec"]);
    ASSERT_TRUE(spec.has_value()) << spec.error().message;
    EXPECT_EQ(*spec, full_spec());
}

std::string definition_error(const std::string& text)
{
    auto def = definition_from_json(text);
    if (def.has_value()) {
        return "OK";
    }
    EXPECT_TRUE(def.error().is(errc::invalid_argument));
    return def.error().message;
}

TEST(Definition, FormatErrors)
{
    const std::string spec = R"("spec": {"uuid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"})";
    EXPECT_EQ(definition_error(R"({"format": 1, "name": "web", "generation": 1, )" + spec + "}"),
              "OK");
    EXPECT_EQ(definition_error(R"({"format": 2, "name": "web", "generation": 1, )" + spec + "}"),
              "definition: format 2 is newer than this qmachined understands (format 1 and older)");
    // A newer format is reported as such even when the rest looks nothing like format 1.
    EXPECT_EQ(definition_error(R"({"format": 3, "machines": []})"),
              "definition: format 3 is newer than this qmachined understands (format 1 and older)");
    EXPECT_EQ(definition_error(R"({"name": "web", "generation": 1, )" + spec + "}"),
              R"(definition: missing "format")");
    EXPECT_EQ(definition_error(R"({"format": "1", "name": "web", "generation": 1, )" + spec + "}"),
              R"(definition: "format" must be an integer >= 1, not "1")");
    EXPECT_EQ(definition_error(R"({"format": 0, "name": "web", "generation": 1, )" + spec + "}"),
              R"(definition: "format" must be an integer >= 1, not 0)");
    EXPECT_EQ(definition_error(R"({"format": 1.5, "name": "web", "generation": 1, )" + spec + "}"),
              R"(definition: "format" must be an integer >= 1, not 1.5)");
    EXPECT_EQ(definition_error(R"({"format": 1, "name": "web", "generation": 1, "owner": "x", )" +
                               spec + "}"),
              R"(definition: unknown field "owner")");
    EXPECT_EQ(definition_error("[]"), "definition: must be a JSON object");
    EXPECT_EQ(definition_error("{").rfind("definition: invalid JSON", 0), 0U);
}

TEST(Definition, NameErrors)
{
    const std::string rest =
        R"("generation": 1, "spec": {"uuid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"}})";
    EXPECT_EQ(definition_error(R"({"format": 1, )" + rest),
              R"(definition: "name" must be a string)");
    EXPECT_EQ(definition_error(R"({"format": 1, "name": 5, )" + rest),
              R"(definition: "name" must be a string)");
    EXPECT_EQ(definition_error(R"({"format": 1, "name": "../x", )" + rest),
              "definition: machine name '../x' may contain only letters, digits, '_', '.' and '-'");
    EXPECT_EQ(definition_error(R"({"format": 1, "name": "", )" + rest),
              "definition: machine name must not be empty");
}

TEST(Definition, GenerationErrors)
{
    const std::string spec = R"("spec": {"uuid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"})";
    const std::string message = R"(definition of 'web': "generation" must be an integer >= 1)";
    for (const char* bad : {"0", "-1", "\"1\"", "1.0", "null"}) {
        SCOPED_TRACE(bad);
        EXPECT_EQ(definition_error(std::string(R"({"format": 1, "name": "web", "generation": )") +
                                   bad + ", " + spec + "}"),
                  message);
    }
    EXPECT_EQ(definition_error(R"({"format": 1, "name": "web", )" + spec + "}"), message);
    auto big = definition_from_json(
        R"({"format": 1, "name": "web", "generation": 18446744073709551615, )" + spec + "}");
    ASSERT_TRUE(big.has_value()) << big.error().message;
    EXPECT_EQ(big->generation, UINT64_MAX);
}

TEST(Definition, SpecErrors)
{
    const std::string head = R"({"format": 1, "name": "web", "generation": 3)";
    EXPECT_EQ(definition_error(head + "}"), R"(definition of 'web': missing "spec")");
    EXPECT_EQ(
        definition_error(
            head + R"(, "spec": {"cpus": 0, "uuid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"}})"),
        "definition of 'web': spec.cpus: must be an integer between 1 and 1024");
    EXPECT_EQ(definition_error(head + R"(, "spec": []})"),
              "definition of 'web': spec: must be an object");
    // A stored spec keeps its uuid; a new one on every load would change the machine's identity.
    EXPECT_EQ(definition_error(head + R"(, "spec": {"cpus": 2}})"),
              "definition of 'web': spec.uuid: missing");
}

// --- The schema itself --------------------------------------------------------------------------

TEST(Schema, EmbeddedTextIsTheFileOnDisk)
{
    const std::string on_disk = read_file(QM_SOURCE_DIR "/proto/machine.schema.json");
    ASSERT_FALSE(on_disk.empty());
    EXPECT_EQ(spec_schema(), on_disk);
}

// The JSON Schema draft-04 meta-schema (http://json-schema.org/draft-04/schema), verbatim.
constexpr std::string_view draft04_meta_schema = R"({
    "id": "http://json-schema.org/draft-04/schema#",
    "$schema": "http://json-schema.org/draft-04/schema#",
    "description": "Core schema meta-schema",
    "definitions": {
        "schemaArray": {"type": "array", "minItems": 1, "items": { "$ref": "#" }},
        "positiveInteger": {"type": "integer", "minimum": 0},
        "positiveIntegerDefault0": {"allOf": [ { "$ref": "#/definitions/positiveInteger" }, { "default": 0 } ]},
        "simpleTypes": {"enum": [ "array", "boolean", "integer", "null", "number", "object", "string" ]},
        "stringArray": {"type": "array", "items": { "type": "string" }, "minItems": 1, "uniqueItems": true}
    },
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "$schema": {"type": "string"},
        "title": {"type": "string"},
        "description": {"type": "string"},
        "default": {},
        "multipleOf": {"type": "number", "minimum": 0, "exclusiveMinimum": true},
        "maximum": {"type": "number"},
        "exclusiveMaximum": {"type": "boolean", "default": false},
        "minimum": {"type": "number"},
        "exclusiveMinimum": {"type": "boolean", "default": false},
        "maxLength": { "$ref": "#/definitions/positiveInteger" },
        "minLength": { "$ref": "#/definitions/positiveIntegerDefault0" },
        "pattern": {"type": "string", "format": "regex"},
        "additionalItems": {"anyOf": [{ "type": "boolean" }, { "$ref": "#" }], "default": {}},
        "items": {"anyOf": [{ "$ref": "#" }, { "$ref": "#/definitions/schemaArray" }], "default": {}},
        "maxItems": { "$ref": "#/definitions/positiveInteger" },
        "minItems": { "$ref": "#/definitions/positiveIntegerDefault0" },
        "uniqueItems": {"type": "boolean", "default": false},
        "maxProperties": { "$ref": "#/definitions/positiveInteger" },
        "minProperties": { "$ref": "#/definitions/positiveIntegerDefault0" },
        "required": { "$ref": "#/definitions/stringArray" },
        "additionalProperties": {"anyOf": [{ "type": "boolean" }, { "$ref": "#" }], "default": {}},
        "definitions": {"type": "object", "additionalProperties": { "$ref": "#" }, "default": {}},
        "properties": {"type": "object", "additionalProperties": { "$ref": "#" }, "default": {}},
        "patternProperties": {"type": "object", "additionalProperties": { "$ref": "#" }, "default": {}},
        "dependencies": {"type": "object",
            "additionalProperties": {"anyOf": [{ "$ref": "#" }, { "$ref": "#/definitions/stringArray" }]}},
        "enum": {"type": "array", "minItems": 1, "uniqueItems": true},
        "type": {"anyOf": [
            { "$ref": "#/definitions/simpleTypes" },
            {"type": "array", "items": { "$ref": "#/definitions/simpleTypes" }, "minItems": 1, "uniqueItems": true}
        ]},
        "format": { "type": "string" },
        "allOf": { "$ref": "#/definitions/schemaArray" },
        "anyOf": { "$ref": "#/definitions/schemaArray" },
        "oneOf": { "$ref": "#/definitions/schemaArray" },
        "not": { "$ref": "#" }
    },
    "dependencies": {
        "exclusiveMaximum": [ "maximum" ],
        "exclusiveMinimum": [ "minimum" ]
    },
    "default": {}
})";

bool valid_draft04(std::string_view schema_text)
{
    rapidjson::Document meta;
    meta.Parse(draft04_meta_schema.data(), draft04_meta_schema.size());
    EXPECT_FALSE(meta.HasParseError());
    const rapidjson::SchemaDocument meta_schema(meta);
    rapidjson::Document schema;
    schema.Parse(schema_text.data(), schema_text.size());
    if (schema.HasParseError()) {
        return false;
    }
    rapidjson::SchemaValidator validator(meta_schema);
    return schema.Accept(validator);
}

TEST(Schema, IsDraft04)
{
    rapidjson::Document schema;
    schema.Parse(spec_schema().data(), spec_schema().size());
    ASSERT_FALSE(schema.HasParseError());
    EXPECT_STREQ(schema["$schema"].GetString(), "http://json-schema.org/draft-04/schema#");
    const rapidjson::SchemaDocument compiled(schema); // RapidJSON accepts it
    EXPECT_TRUE(valid_draft04(spec_schema()));
    // The meta-schema check has teeth.
    EXPECT_FALSE(valid_draft04(R"({"type": "integr"})"));
    EXPECT_FALSE(valid_draft04(R"({"properties": {"a": {"minLength": -1}}})"));
    EXPECT_FALSE(valid_draft04(R"({"properties": {"a": {"enum": []}}})"));
}

// The schema is the user's documentation: every property says what it is, and every object is
// closed (unknown fields are errors).
TEST(Schema, EveryPropertyIsDescribedAndEveryObjectClosed)
{
    rapidjson::Document schema;
    schema.Parse(spec_schema().data(), spec_schema().size());
    ASSERT_FALSE(schema.HasParseError());
    int properties = 0;
    const auto walk = [&](const rapidjson::Value& node, const std::string& where,
                          const auto& self) -> void {
        SCOPED_TRACE(where);
        ASSERT_TRUE(node.IsObject());
        ASSERT_TRUE(node.HasMember("description"));
        EXPECT_GT(node["description"].GetStringLength(), 10U);
        ASSERT_TRUE(node.HasMember("type"));
        if (std::string(node["type"].GetString()) == "object") {
            ASSERT_TRUE(node.HasMember("additionalProperties"));
            EXPECT_TRUE(node["additionalProperties"].IsFalse());
            ASSERT_TRUE(node.HasMember("properties"));
            for (const auto& p : node["properties"].GetObject()) {
                ++properties;
                self(p.value, where + "." + p.name.GetString(), self);
            }
        }
        if (node.HasMember("items")) {
            self(node["items"], where + "[]", self);
        }
    };
    walk(schema, "spec", walk);
    EXPECT_EQ(properties, 20);
}

} // namespace
} // namespace qm::daemon
