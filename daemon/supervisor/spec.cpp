// SPDX-License-Identifier: GPL-2.0-or-later
// Machine names, specs (validated against the embedded proto/machine.schema.json, then the
// checks a schema cannot express) and the definition file format.
#include "daemon/supervisor/spec.hpp"

#include <algorithm>
#include <array>
#include <cstddef>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <rapidjson/document.h>
#include <rapidjson/pointer.h>
#include <rapidjson/prettywriter.h>
#include <rapidjson/schema.h>
#include <rapidjson/stringbuffer.h>

namespace qm::daemon::detail {
// Generated from proto/machine.schema.json by daemon/embed_text.py.
std::string_view machine_schema_json();
} // namespace qm::daemon::detail

namespace qm::daemon {
namespace {

constexpr std::size_t max_name_length = 64;
// Longest quoted name or field in a message; a hostile 1 MB name is not echoed whole.
constexpr std::size_t max_quoted_length = 100;

// `s` for a message: printable ASCII as it is, everything else escaped (\n, \t, \xNN), so a
// name with control characters cannot forge log lines or terminal sequences.
std::string printable(std::string_view s)
{
    std::string out;
    for (unsigned char c : s) {
        if (out.size() >= max_quoted_length) {
            out += "...";
            break;
        }
        switch (c) {
        case '\n':
            out += "\\n";
            break;
        case '\r':
            out += "\\r";
            break;
        case '\t':
            out += "\\t";
            break;
        case '\\':
            out += "\\\\";
            break;
        default:
            if (c < 0x20 || c >= 0x7f) {
                out += fmt::format("\\x{:02x}", c);
            } else {
                out += static_cast<char>(c);
            }
        }
    }
    return out;
}

bool is_alnum(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

bool is_name_char(char c)
{
    return is_alnum(c) || c == '_' || c == '.' || c == '-';
}

// --- The schema --------------------------------------------------------------------------------

// proto/machine.schema.json, parsed and compiled once. The parsed document stays alive beside the
// compiled one: error messages read the failing schema node (its bounds, its enum) from it.
class CompiledSchema
{
public:
    CompiledSchema()
        : doc_(parse_text(detail::machine_schema_json()))
        , schema_(doc_)
    {}

    const rapidjson::Document& doc() const { return doc_; }
    const rapidjson::SchemaDocument& schema() const { return schema_; }

private:
    static rapidjson::Document parse_text(std::string_view text)
    {
        rapidjson::Document doc;
        doc.Parse(text.data(), text.size());
        if (doc.HasParseError() || !doc.IsObject()) {
            // A build that embedded a broken schema is a bug (spec_test parses the file).
            throw std::logic_error("the embedded proto/machine.schema.json is not a JSON object");
        }
        return doc;
    }

    rapidjson::Document doc_;
    rapidjson::SchemaDocument schema_;
};

const CompiledSchema& compiled_schema()
{
    static const CompiledSchema schema;
    return schema;
}

const rapidjson::Value* schema_member(const rapidjson::Value& node, std::string_view key)
{
    if (!node.IsObject()) {
        return nullptr;
    }
    auto it = node.FindMember(rapidjson::Value(rapidjson::StringRef(key.data(), key.size())));
    return it == node.MemberEnd() ? nullptr : &it->value;
}

std::string number_text(const rapidjson::Value& v)
{
    if (v.IsUint64()) {
        return fmt::format("{}", v.GetUint64());
    }
    if (v.IsInt64()) {
        return fmt::format("{}", v.GetInt64());
    }
    if (v.IsNumber()) {
        return fmt::format("{}", v.GetDouble());
    }
    return "?";
}

std::string schema_string(const rapidjson::Value* v)
{
    return v != nullptr && v->IsString() ? std::string(v->GetString(), v->GetStringLength())
                                         : std::string();
}

// "between 1 and 1024", ">= 1", "<= 5" or "" for a node's minimum/maximum.
std::string range_text(const rapidjson::Value& node)
{
    const rapidjson::Value* min = schema_member(node, "minimum");
    const rapidjson::Value* max = schema_member(node, "maximum");
    if (min != nullptr && max != nullptr) {
        return fmt::format(" between {} and {}", number_text(*min), number_text(*max));
    }
    if (min != nullptr) {
        return " >= " + number_text(*min);
    }
    if (max != nullptr) {
        return " <= " + number_text(*max);
    }
    return {};
}

// What a value must be to satisfy schema `node`, as a noun phrase: "an integer between 1 and
// 1024", "one of \"no\", \"on-failure\", \"always\"", "a string of 1 to 4096 bytes". Lengths
// are in bytes: check_values() enforces them on bytes, which is stricter than the schema's
// code points.
std::string describe(const rapidjson::Value& node)
{
    if (const rapidjson::Value* values = schema_member(node, "enum");
        values != nullptr && values->IsArray()) {
        std::string out = "one of ";
        for (rapidjson::SizeType i = 0; i < values->Size(); ++i) {
            const rapidjson::Value& v = (*values)[i];
            out += i == 0 ? "" : ", ";
            out +=
                v.IsString() ? json::quote({v.GetString(), v.GetStringLength()}) : number_text(v);
        }
        return out;
    }
    const std::string type = schema_string(schema_member(node, "type"));
    if (type == "integer" || type == "number") {
        return (type == "integer" ? "an integer" : "a number") + range_text(node);
    }
    if (type == "string") {
        if (const rapidjson::Value* pattern = schema_member(node, "pattern")) {
            return "a string matching " + schema_string(pattern);
        }
        const rapidjson::Value* min = schema_member(node, "minLength");
        const rapidjson::Value* max = schema_member(node, "maxLength");
        if (min != nullptr && max != nullptr) {
            return fmt::format("a string of {} to {} bytes", number_text(*min), number_text(*max));
        }
        if (max != nullptr) {
            return fmt::format("a string of at most {} bytes", number_text(*max));
        }
        if (min != nullptr) {
            return fmt::format("a string of at least {} bytes", number_text(*min));
        }
        return "a string";
    }
    if (type == "boolean") {
        return "true or false";
    }
    if (type == "object") {
        return "an object";
    }
    if (type == "array") {
        std::string out = "an array";
        if (const rapidjson::Value* max = schema_member(node, "maxItems")) {
            out += " of at most " + number_text(*max);
        } else {
            out += " of";
        }
        const rapidjson::Value* items = schema_member(node, "items");
        const std::string item_type =
            items != nullptr ? schema_string(schema_member(*items, "type")) : std::string();
        out += item_type.empty() ? " items" : " " + item_type + "s";
        return out;
    }
    if (type == "null") {
        return "null";
    }
    return "valid here";
}

// What each schema keyword's failure means, in the user's words. {what} is describe() of the
// failing schema node, {N} the keyword's own value, {missing} the first missing required field.
// Sorted by keyword. A keyword not here (allOf, anyOf, oneOf, not, dependencies, ...; the schema
// uses none of them) gets a generic message naming it.
struct Wording
{
    std::string_view keyword;
    std::string_view text;
};
constexpr std::array<Wording, 16> wordings{{
    {"additionalProperties", "unknown field"},
    {"enum", "must be {what}"},
    {"items", "has too many items"},
    {"maxItems", "must have at most {N} items"},
    {"maxLength", "must be {what}"},
    {"maxProperties", "must have at most {N} fields"},
    {"maximum", "must be {what}"},
    {"minItems", "must have at least {N} items"},
    {"minLength", "must be {what}"},
    {"minProperties", "must have at least {N} fields"},
    {"minimum", "must be {what}"},
    {"multipleOf", "must be a multiple of {N}"},
    {"pattern", "must be {what}"},
    {"required", "missing required field {missing}"},
    {"type", "must be {what}"},
    {"uniqueItems", "must not contain the same item twice"},
}};

void replace_all(std::string& s, std::string_view from, const std::string& to)
{
    for (std::size_t at = s.find(from); at != std::string::npos;
         at = s.find(from, at + to.size())) {
        s.replace(at, from.size(), to);
    }
}

// Appends a member step to a field path: ".cpus", or ["odd name"] for names that are not plain.
void append_member(std::string& path, std::string_view name)
{
    const bool plain = !name.empty() && name.size() <= max_quoted_length &&
                       std::all_of(name.begin(), name.end(),
                                   [](char c) { return is_alnum(c) || c == '_' || c == '-'; });
    if (plain) {
        path += '.';
        path += name;
    } else {
        path += "[\"" + printable(name) + "\"]";
    }
}

// The first of `node`'s required fields missing from `object`, quoted.
std::string first_missing(const rapidjson::Value& node, const json::Value* object)
{
    const rapidjson::Value* required = schema_member(node, "required");
    if (required == nullptr || !required->IsArray()) {
        return {};
    }
    for (const auto& r : required->GetArray()) {
        if (r.IsString() &&
            (object == nullptr ||
             json::find(*object, {r.GetString(), r.GetStringLength()}) == nullptr)) {
            return "\"" + printable({r.GetString(), r.GetStringLength()}) + "\"";
        }
    }
    return {};
}

// Turns the validator's verdict into "spec.console.frob: unknown field": the document pointer
// becomes the field path (array indexes as [N], told apart from members named "3" by walking
// the instance), the keyword picks the wording, the schema pointer gives the bounds.
std::string schema_error(const rapidjson::SchemaValidator& validator, const json::Value& instance)
{
    const auto& schema = compiled_schema();
    const std::string_view keyword =
        validator.GetInvalidSchemaKeyword() != nullptr ? validator.GetInvalidSchemaKeyword() : "";

    std::string path = "spec";
    const json::Value* at = &instance;
    const auto doc_pointer = validator.GetInvalidDocumentPointer();
    for (std::size_t i = 0; i < doc_pointer.GetTokenCount(); ++i) {
        const auto& token = doc_pointer.GetTokens()[i];
        const std::string_view name(token.name, token.length);
        if (at != nullptr && at->IsArray()) {
            path += "[" + std::string(name) + "]";
            at = token.index < at->Size() ? &(*at)[token.index] : nullptr;
        } else {
            append_member(path, name);
            at = at != nullptr ? json::find(*at, name) : nullptr;
        }
    }

    const rapidjson::Value* node = validator.GetInvalidSchemaPointer().Get(schema.doc());
    static const rapidjson::Value empty(rapidjson::kObjectType);
    if (node == nullptr) {
        node = &empty;
    }

    auto wording = std::find_if(wordings.begin(), wordings.end(),
                                [&](const Wording& w) { return w.keyword == keyword; });
    std::string text =
        wording != wordings.end()
            ? std::string(wording->text)
            : fmt::format("does not match the schema (keyword '{}')", printable(keyword));
    if (const rapidjson::Value* n = schema_member(*node, keyword); n != nullptr) {
        replace_all(text, "{N}", number_text(*n));
    }
    replace_all(text, "{missing}", first_missing(*node, at));
    // Last: describe() quotes schema text (a pattern's "{8}") that must not be substituted.
    replace_all(text, "{what}", describe(*node));
    return path + ": " + text;
}

// --- Checks beyond the schema ------------------------------------------------------------------

// What the schema cannot say: strings without NUL bytes (the validator's regex stops at the first
// NUL, and QEMU's argv could not carry one), lengths in bytes rather than code points, and no
// field twice (RapidJSON keeps duplicates; which one would count is anybody's guess). Runs after
// the schema accepted `v`, so every member has a schema node and objects have few members.
expected<void> check_values(const json::Value& v, const rapidjson::Value& node,
                            const std::string& path)
{
    if (v.IsString()) {
        const std::string_view s(v.GetString(), v.GetStringLength());
        if (s.find('\0') != std::string_view::npos) {
            return fail(errc::invalid_argument, path + ": must not contain NUL bytes");
        }
        const rapidjson::Value* max = schema_member(node, "maxLength");
        if (max != nullptr && max->IsUint64() && s.size() > max->GetUint64()) {
            return fail(errc::invalid_argument, path + ": must be " + describe(node));
        }
        return {};
    }
    if (v.IsArray()) {
        const rapidjson::Value* items = schema_member(node, "items");
        for (rapidjson::SizeType i = 0; i < v.Size(); ++i) {
            if (items != nullptr) {
                if (auto r = check_values(v[i], *items, fmt::format("{}[{}]", path, i)); !r) {
                    return r;
                }
            }
        }
        return {};
    }
    if (v.IsObject()) {
        const rapidjson::Value* properties = schema_member(node, "properties");
        std::vector<std::string_view> seen;
        for (const auto& m : v.GetObject()) {
            const std::string_view name(m.name.GetString(), m.name.GetStringLength());
            std::string member_path = path;
            append_member(member_path, name);
            if (std::find(seen.begin(), seen.end(), name) != seen.end()) {
                return fail(errc::invalid_argument, member_path + ": appears more than once");
            }
            seen.push_back(name);
            const rapidjson::Value* sub =
                properties != nullptr ? schema_member(*properties, name) : nullptr;
            if (sub != nullptr) {
                if (auto r = check_values(m.value, *sub, member_path); !r) {
                    return r;
                }
            }
        }
    }
    return {};
}

// Options qmachined sets itself, or that would take the machine out of its hands. Sorted (looked
// up with binary_search), without the leading dashes.
constexpr std::array<std::string_view, 15> managed_options{
    "add-fd",      // passes host descriptors to QEMU: qmachined owns fd passing
    "chroot",      // changes QEMU's root: qmachined decides where QEMU runs
    "daemonize",   // QEMU would detach from its supervisor
    "mon",         // a second monitor, outside the QMP policy
    "monitor",     // the same
    "name",        // qmachined names the process (and its guest) itself
    "pidfile",     // writes a file on the host wherever the spec says
    "qmp",         // a second QMP monitor, outside the QMP policy
    "qmp-pretty",  // the same
    "readconfig",  // a file's [mon] and [chardev] sections: monitors outside the QMP policy
    "runas",       // changes QEMU's user: qmachined decides who QEMU runs as
    "sandbox",     // qmachined sets QEMU's seccomp sandbox; a spec must not relax it
    "set",         // edits any option group, qmachined's own monitor and console chardevs too
    "uuid",        // the spec's uuid field is the machine's identity; qmachined passes it
    "writeconfig", // writes the whole configuration, qmachined's part included, to a file
};
static_assert(std::is_sorted(managed_options.begin(), managed_options.end()));

// Chardev ids qmachined uses for its own chardevs (the QMP monitor, the serial console): a spec's
// chardev with one of them would take their place or make QEMU refuse the duplicate. "mon-launch"
// is the monitor of the daemon that launched QEMU (libmachine/machine/machine.cpp).
constexpr std::array<std::string_view, 3> reserved_chardev_ids{"console", "mon", "mon-launch"};

// Every value of `key` in a QemuOpts string ("socket,id=mon,path=/x"): options are separated by
// ',', and ",," is a comma inside a value (qemu-options.hx, QemuOpts), so "path=/x,,id=mon" has no
// id.
std::vector<std::string> opts_values(std::string_view opts, std::string_view key)
{
    std::vector<std::string> out;
    std::string item;
    for (std::size_t i = 0; i <= opts.size(); ++i) {
        if (i < opts.size() && opts[i] == ',' && i + 1 < opts.size() && opts[i + 1] == ',') {
            item += ',';
            ++i;
            continue;
        }
        if (i == opts.size() || opts[i] == ',') {
            if (item.size() > key.size() && item.starts_with(key) && item[key.size()] == '=') {
                out.push_back(item.substr(key.size() + 1));
            }
            item.clear();
            continue;
        }
        item += opts[i];
    }
    return out;
}

expected<void> check_args(const std::vector<std::string>& args)
{
    for (std::size_t i = 0; i < args.size(); ++i) {
        std::string_view option = args[i];
        // QEMU treats --foo as -foo (lookup_opt() in softmmu/vl.c).
        if (option.starts_with("--")) {
            option.remove_prefix(2);
        } else if (option.starts_with('-')) {
            option.remove_prefix(1);
        } else {
            continue;
        }
        if (std::binary_search(managed_options.begin(), managed_options.end(), option)) {
            return fail(
                errc::invalid_argument,
                fmt::format("spec.args[{}]: '{}' is managed by qmachined", i, printable(args[i])));
        }
        // Options refused for some values only; the error names the value's index.
        if (i + 1 >= args.size()) {
            continue;
        }
        const std::string_view value = args[i + 1];
        // "exec:" migrates from the output of a shell command run on the host (migration.c).
        if (option == "incoming" && value.starts_with("exec:")) {
            return fail(errc::invalid_argument,
                        fmt::format("spec.args[{}]: '{} exec:' is managed by qmachined", i + 1,
                                    printable(args[i])));
        }
        // "mon:" multiplexes a human monitor (HMP) onto the device's character device: a
        // monitor outside the QMP policy (human-monitor-command by another door).
        if ((option == "serial" || option == "parallel" || option == "virtioconsole" ||
             option == "debugcon") &&
            value.starts_with("mon:")) {
            return fail(errc::invalid_argument,
                        fmt::format("spec.args[{}]: '{} mon:' (a monitor) is managed by qmachined",
                                    i + 1, printable(args[i])));
        }
        if (option == "chardev") {
            for (const auto& id : opts_values(value, "id")) {
                if (std::find(reserved_chardev_ids.begin(), reserved_chardev_ids.end(), id) !=
                    reserved_chardev_ids.end()) {
                    return fail(errc::invalid_argument,
                                fmt::format("spec.args[{}]: chardev id '{}' is reserved for "
                                            "qmachined",
                                            i + 1, printable(id)));
                }
            }
        }
    }
    return {};
}

// --- Reading and writing -----------------------------------------------------------------------

struct ShutdownModeName
{
    ShutdownModeSpec mode;
    std::string_view name;
};
constexpr std::array<ShutdownModeName, 2> shutdown_mode_names{{
    {ShutdownModeSpec::powerdown, "powerdown"},
    {ShutdownModeSpec::quit, "quit"},
}};

struct RestartPolicyName
{
    RestartPolicy policy;
    std::string_view name;
};
constexpr std::array<RestartPolicyName, 3> restart_policy_names{{
    {RestartPolicy::no, "no"},
    {RestartPolicy::on_failure, "on-failure"},
    {RestartPolicy::always, "always"},
}};

// Readers for a spec the schema accepted: a present member has the right type and range.
void read(const json::Value& obj, std::string_view key, std::uint32_t& out)
{
    if (const json::Value* v = json::find(obj, key)) {
        out = static_cast<std::uint32_t>(v->GetUint64());
    }
}
void read(const json::Value& obj, std::string_view key, std::uint64_t& out)
{
    if (const json::Value* v = json::find(obj, key)) {
        out = v->GetUint64();
    }
}
void read(const json::Value& obj, std::string_view key, bool& out)
{
    if (const json::Value* v = json::find(obj, key)) {
        out = v->GetBool();
    }
}
void read(const json::Value& obj, std::string_view key, std::string& out)
{
    if (auto s = json::get_string(obj, key)) {
        out = std::string(*s);
    }
}

MachineSpec read_spec(const json::Value& spec)
{
    MachineSpec out;
    read(spec, "uuid", out.uuid);
    if (out.uuid.empty()) {
        out.uuid = generate_uuid();
    }
    // The schema allows either case; one spelling is kept so that uuids compare as strings.
    std::transform(out.uuid.begin(), out.uuid.end(), out.uuid.begin(), [](char c) {
        return c >= 'A' && c <= 'F' ? static_cast<char>(c - 'A' + 'a') : c;
    });
    read(spec, "binary", out.binary);
    if (auto m = json::get_string(spec, "machine")) {
        out.machine = std::string(*m);
    }
    if (const json::Value* m = json::find(spec, "memory_mib")) {
        out.memory_mib = static_cast<std::uint32_t>(m->GetUint64());
    }
    read(spec, "cpus", out.cpus);
    if (const json::Value* args = json::find(spec, "args")) {
        for (const auto& a : args->GetArray()) {
            out.args.emplace_back(a.GetString(), a.GetStringLength());
        }
    }
    if (const json::Value* c = json::find(spec, "console")) {
        read(*c, "enabled", out.console.enabled);
        read(*c, "ring_size", out.console.ring_size);
        read(*c, "log_size", out.console.log_size);
    }
    if (const json::Value* s = json::find(spec, "shutdown")) {
        if (auto mode = json::get_string(*s, "mode")) {
            for (const auto& m : shutdown_mode_names) {
                if (m.name == *mode) {
                    out.shutdown.mode = m.mode;
                }
            }
        }
        read(*s, "timeout_s", out.shutdown.timeout_s);
    }
    if (const json::Value* r = json::find(spec, "restart")) {
        if (auto policy = json::get_string(*r, "policy")) {
            for (const auto& p : restart_policy_names) {
                if (p.name == *policy) {
                    out.restart.policy = p.policy;
                }
            }
        }
        read(*r, "max_restarts", out.restart.max_restarts);
        read(*r, "window_s", out.restart.window_s);
        read(*r, "backoff_initial_ms", out.restart.backoff_initial_ms);
        read(*r, "backoff_max_ms", out.restart.backoff_max_ms);
    }
    read(spec, "autostart", out.autostart);
    return out;
}

json::Value string_value(std::string_view s, json::Document::AllocatorType& alloc)
{
    return {s.data(), static_cast<rapidjson::SizeType>(s.size()), alloc};
}

} // namespace

expected<void> validate_name(std::string_view name)
{
    if (name.empty()) {
        return fail(errc::invalid_argument, "machine name must not be empty");
    }
    if (name.size() > max_name_length) {
        return fail(errc::invalid_argument,
                    fmt::format("machine name '{}' is longer than {} characters", printable(name),
                                max_name_length));
    }
    if (!std::all_of(name.begin(), name.end(), is_name_char)) {
        return fail(
            errc::invalid_argument,
            fmt::format("machine name '{}' may contain only letters, digits, '_', '.' and '-'",
                        printable(name)));
    }
    // With the rule above this also excludes ".", ".." and hidden files in the state directory.
    if (!is_alnum(name.front())) {
        return fail(
            errc::invalid_argument,
            fmt::format("machine name '{}' must start with a letter or a digit", printable(name)));
    }
    return {};
}

const char* to_string(ShutdownModeSpec m) noexcept
{
    for (const auto& n : shutdown_mode_names) {
        if (n.mode == m) {
            return n.name.data();
        }
    }
    return "unknown";
}

const char* to_string(RestartPolicy p) noexcept
{
    for (const auto& n : restart_policy_names) {
        if (n.policy == p) {
            return n.name.data();
        }
    }
    return "unknown";
}

expected<MachineSpec> parse_spec(const json::Value& spec)
{
    const auto& schema = compiled_schema();
    rapidjson::SchemaValidator validator(schema.schema());
    if (!spec.Accept(validator)) {
        return fail(errc::invalid_argument, schema_error(validator, spec));
    }
    if (auto r = check_values(spec, schema.doc(), "spec"); !r) {
        return fail(std::move(r).error());
    }
    MachineSpec out = read_spec(spec);
    if (auto r = check_args(out.args); !r) {
        return fail(std::move(r).error());
    }
    if (out.restart.backoff_max_ms < out.restart.backoff_initial_ms) {
        return fail(
            errc::invalid_argument,
            fmt::format(
                "spec.restart.backoff_max_ms: must not be less than backoff_initial_ms ({})",
                out.restart.backoff_initial_ms));
    }
    return out;
}

expected<MachineSpec> parse_spec(std::string_view json_text)
{
    auto doc = json::parse(json_text);
    if (!doc) {
        return fail(errc::invalid_argument, "spec: " + doc.error().message);
    }
    return parse_spec(static_cast<const json::Value&>(*doc));
}

json::Document spec_to_json(const MachineSpec& spec)
{
    json::Document doc;
    spec_to_json(spec, doc, doc.GetAllocator());
    return doc;
}

void spec_to_json(const MachineSpec& spec, json::Value& out, json::Document::AllocatorType& alloc)
{
    out.SetObject();
    out.AddMember("uuid", string_value(spec.uuid, alloc), alloc);
    out.AddMember("binary", string_value(spec.binary, alloc), alloc);
    if (spec.machine) {
        out.AddMember("machine", string_value(*spec.machine, alloc), alloc);
    }
    if (spec.memory_mib) {
        out.AddMember("memory_mib", *spec.memory_mib, alloc);
    }
    out.AddMember("cpus", spec.cpus, alloc);
    json::Value args(rapidjson::kArrayType);
    for (const auto& a : spec.args) {
        args.PushBack(string_value(a, alloc), alloc);
    }
    out.AddMember("args", args, alloc);

    json::Value console(rapidjson::kObjectType);
    console.AddMember("enabled", spec.console.enabled, alloc);
    console.AddMember("ring_size", spec.console.ring_size, alloc);
    console.AddMember("log_size", spec.console.log_size, alloc);
    out.AddMember("console", console, alloc);

    json::Value shutdown(rapidjson::kObjectType);
    shutdown.AddMember("mode", rapidjson::StringRef(to_string(spec.shutdown.mode)), alloc);
    shutdown.AddMember("timeout_s", spec.shutdown.timeout_s, alloc);
    out.AddMember("shutdown", shutdown, alloc);

    json::Value restart(rapidjson::kObjectType);
    restart.AddMember("policy", rapidjson::StringRef(to_string(spec.restart.policy)), alloc);
    restart.AddMember("max_restarts", spec.restart.max_restarts, alloc);
    restart.AddMember("window_s", spec.restart.window_s, alloc);
    restart.AddMember("backoff_initial_ms", spec.restart.backoff_initial_ms, alloc);
    restart.AddMember("backoff_max_ms", spec.restart.backoff_max_ms, alloc);
    out.AddMember("restart", restart, alloc);

    out.AddMember("autostart", spec.autostart, alloc);
}

std::string_view spec_schema()
{
    return detail::machine_schema_json();
}

std::string generate_uuid()
{
    std::random_device random;
    std::array<std::uint8_t, 16> b{};
    for (std::size_t i = 0; i < b.size(); i += 4) {
        const std::uint32_t r = random();
        for (std::size_t j = 0; j < 4; ++j) {
            b[i + j] = static_cast<std::uint8_t>(r >> (8 * j));
        }
    }
    // RFC 4122 4.4: version 4 (random), variant 10xx.
    b[6] = static_cast<std::uint8_t>((b[6] & 0x0f) | 0x40);
    b[8] = static_cast<std::uint8_t>((b[8] & 0x3f) | 0x80);
    return fmt::format("{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-"
                       "{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
                       b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11],
                       b[12], b[13], b[14], b[15]);
}

std::string definition_to_json(const Definition& def)
{
    json::Document doc;
    auto& alloc = doc.GetAllocator();
    doc.SetObject();
    doc.AddMember("format", definition_format, alloc);
    doc.AddMember("name", string_value(def.name, alloc), alloc);
    doc.AddMember("generation", def.generation, alloc);
    json::Value spec;
    spec_to_json(def.spec, spec, alloc);
    doc.AddMember("spec", spec, alloc);

    // Indented: the files are for people too (an administrator reading the state directory).
    rapidjson::StringBuffer buf;
    rapidjson::PrettyWriter<rapidjson::StringBuffer> writer(buf);
    writer.SetIndent(' ', 2);
    doc.Accept(writer);
    return std::string(buf.GetString(), buf.GetSize()) + "\n";
}

expected<Definition> definition_from_json(std::string_view text)
{
    auto parsed = json::parse(text);
    if (!parsed) {
        return fail(errc::invalid_argument, "definition: " + parsed.error().message);
    }
    const json::Value& doc = *parsed;
    if (!doc.IsObject()) {
        return fail(errc::invalid_argument, "definition: must be a JSON object");
    }

    // The format first: a newer file may have any shape, and the message must say why it is
    // refused rather than which field looks odd.
    const json::Value* format = json::find(doc, "format");
    if (format == nullptr) {
        return fail(errc::invalid_argument, "definition: missing \"format\"");
    }
    if (!format->IsInt64() || format->GetInt64() < 1) {
        return fail(errc::invalid_argument, "definition: \"format\" must be an integer >= 1, not " +
                                                printable(json::to_string(*format)));
    }
    if (format->GetInt64() > definition_format) {
        return fail(errc::invalid_argument,
                    fmt::format("definition: format {} is newer than this qmachined understands "
                                "(format {} and older)",
                                format->GetInt64(), definition_format));
    }

    for (const auto& m : doc.GetObject()) {
        const std::string_view key(m.name.GetString(), m.name.GetStringLength());
        if (key != "format" && key != "name" && key != "generation" && key != "spec") {
            return fail(errc::invalid_argument,
                        fmt::format("definition: unknown field \"{}\"", printable(key)));
        }
    }

    Definition def;
    auto name = json::get_string(doc, "name");
    if (!name) {
        return fail(errc::invalid_argument, "definition: \"name\" must be a string");
    }
    if (auto r = validate_name(*name); !r) {
        return fail(errc::invalid_argument, "definition: " + r.error().message);
    }
    def.name = std::string(*name);
    const std::string what = fmt::format("definition of '{}'", def.name);

    const json::Value* generation = json::find(doc, "generation");
    if (generation == nullptr || !generation->IsUint64() || generation->GetUint64() < 1) {
        return fail(errc::invalid_argument, what + ": \"generation\" must be an integer >= 1");
    }
    def.generation = generation->GetUint64();

    const json::Value* spec = json::find(doc, "spec");
    if (spec == nullptr) {
        return fail(errc::invalid_argument, what + ": missing \"spec\"");
    }
    // A stored spec keeps its uuid: generating one here would give the machine a new identity
    // each time the file is read.
    if (spec->IsObject() && json::find(*spec, "uuid") == nullptr) {
        return fail(errc::invalid_argument, what + ": spec.uuid: missing");
    }
    auto parsed_spec = parse_spec(*spec);
    if (!parsed_spec) {
        return fail(errc::invalid_argument, what + ": " + parsed_spec.error().message);
    }
    def.spec = std::move(*parsed_spec);
    return def;
}

} // namespace qm::daemon
