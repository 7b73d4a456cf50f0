// SPDX-License-Identifier: GPL-2.0-or-later
// qmachined's configuration: the defaults, the config file, the command line (in that order of
// precedence, lowest first), the --help text, and the private directories the daemon runs in.
#include "daemon/config.hpp"

#include "libmachine/asio.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <optional>
#include <string_view>
#include <utility>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace qm::daemon {

namespace {

namespace fs = std::filesystem;

constexpr const char* root_state_dir = "/var/lib/qmachined";
constexpr const char* root_runtime_dir = "/run/qmachined";
constexpr const char* root_image_dir = "/var/lib/qmachined-images";

struct LevelName
{
    std::string_view name;
    spdlog::level::level_enum level;
};
// Our own table: spdlog::level::from_str() turns every unknown word into "off".
constexpr std::array<LevelName, 7> log_levels{{
    {"trace", spdlog::level::trace},
    {"debug", spdlog::level::debug},
    {"info", spdlog::level::info},
    {"warn", spdlog::level::warn},
    {"error", spdlog::level::err},
    {"critical", spdlog::level::critical},
    {"off", spdlog::level::off},
}};

std::string level_list()
{
    std::string out;
    for (const auto& l : log_levels) {
        if (!out.empty()) {
            out += ", ";
        }
        out += l.name;
    }
    return out;
}

std::optional<spdlog::level::level_enum> parse_level(std::string_view s)
{
    for (const auto& l : log_levels) {
        if (l.name == s) {
            return l.level;
        }
    }
    return std::nullopt;
}

std::string errno_text(int err)
{
    char buf[256];
    return ::strerror_r(err, buf, sizeof buf); // the GNU strerror_r: returns the text
}

// "/a/./b/" -> "/a/b": what users see in messages and what the daemon stores.
std::string clean_path(const fs::path& p)
{
    std::string s = p.lexically_normal().string();
    while (s.size() > 1 && s.back() == '/') {
        s.pop_back();
    }
    return s;
}

bool is_absolute(std::string_view s)
{
    return !s.empty() && s.front() == '/';
}

// A set, absolute environment variable; the XDG base directory spec says to ignore relative ones.
std::optional<std::string> absolute_env(const GetEnv& getenv, const char* name)
{
    const char* v = getenv(name);
    if (v == nullptr || !is_absolute(v)) {
        return std::nullopt;
    }
    return std::string(v);
}

// The directory a systemd unit's StateDirectory= or RuntimeDirectory= made ($STATE_DIRECTORY,
// $RUNTIME_DIRECTORY): the unit says where, and the daemon follows. A list (several directories,
// ':'-separated) is not ours to choose from: ignored.
std::optional<std::string> unit_directory(const GetEnv& getenv, const char* name)
{
    auto dir = absolute_env(getenv, name);
    if (!dir || dir->find(':') != std::string::npos) {
        return std::nullopt;
    }
    return clean_path(*dir);
}

expected<std::string> default_state_dir(bool as_root, const GetEnv& getenv)
{
    if (auto unit = unit_directory(getenv, "STATE_DIRECTORY")) {
        return *unit;
    }
    if (as_root) {
        return std::string(root_state_dir);
    }
    if (auto state = absolute_env(getenv, "XDG_STATE_HOME")) {
        return clean_path(fs::path(*state) / "qmachined");
    }
    if (auto home = absolute_env(getenv, "HOME")) {
        return clean_path(fs::path(*home) / ".local/state/qmachined");
    }
    return fail(errc::invalid_argument, "neither XDG_STATE_HOME nor HOME is set; use --state-dir");
}

expected<std::string> default_runtime_dir(bool as_root, const GetEnv& getenv)
{
    if (auto unit = unit_directory(getenv, "RUNTIME_DIRECTORY")) {
        return *unit;
    }
    if (as_root) {
        return std::string(root_runtime_dir);
    }
    if (auto runtime = absolute_env(getenv, "XDG_RUNTIME_DIR")) {
        return clean_path(fs::path(*runtime) / "qmachined");
    }
    return fail(errc::invalid_argument, "XDG_RUNTIME_DIR is not set; use --runtime-dir");
}

std::string_view trim(std::string_view s)
{
    constexpr std::string_view space = " \t\r\v\f";
    const auto first = s.find_first_not_of(space);
    if (first == std::string_view::npos) {
        return {};
    }
    const auto last = s.find_last_not_of(space);
    return s.substr(first, last - first + 1);
}

// The flags' values, before they are laid over the file and the defaults.
struct Flags
{
    std::optional<std::string> state_dir;
    std::optional<std::string> runtime_dir;
    std::optional<spdlog::level::level_enum> log_level;
    std::optional<std::string> config_file;
    // The other settings (rest-*, shutdown-policy, qemu-*, qmp-*), in order, applied over the file.
    std::vector<std::pair<std::string, std::string>> settings;
    bool help = false;
    bool version = false;
};

expected<std::string> absolute_from_flag(std::string_view flag, const std::string& value)
{
    fs::path p(value);
    if (p.is_relative()) {
        std::error_code ec;
        auto cwd = fs::current_path(ec);
        if (ec) {
            return fail(errc::invalid_argument, fmt::format("{}: cannot make '{}' absolute: {}",
                                                            flag, value, ec.message()));
        }
        p = cwd / p;
    }
    return clean_path(p);
}

// The settings beyond the directories and the log level: same key in the file and as a flag.
constexpr std::array<std::string_view, 25> other_settings{
    "rest-socket",          "rest-listen",     "rest-allow-remote", "rest-token-file",
    "rest-max-connections", "rest-max-body",   "rest-request-timeout",
    "rest-max-subscribers", "shutdown-policy", "qemu-user",         "qemu-sandbox",
    "qemu-log-max",         "qmp-allow",       "qmp-deny",          "event-ring",
    "event-queue",          "bus",             "max-machines",      "qmp-timeout",
    "image-dirs",           "machined",        "rest-max-header",   "qmp-max-message",
    "event-rate",           "event-burst",
};

bool is_other_setting(std::string_view key)
{
    return std::find(other_settings.begin(), other_settings.end(), key) != other_settings.end();
}

// Settings whose empty value means something ("qemu-user =": QEMU runs as qmachined's user;
// "qmp-allow =": no command).
bool may_be_empty(std::string_view key)
{
    return key == "qemu-user" || key == "qmp-allow" || key == "qmp-deny" || key == "image-dirs";
}

// A comma-separated list ("a, b,c"; "" is none): each item trimmed and given to `item`, which
// checks it and returns what to keep (or the failure); repeats are kept once.
template <typename Item>
expected<std::vector<std::string>> parse_list(std::string_view value, Item item)
{
    std::vector<std::string> out;
    if (trim(value).empty()) {
        return out;
    }
    for (std::size_t start = 0; start <= value.size();) {
        const std::size_t comma = std::min(value.find(',', start), value.size());
        expected<std::string> kept = item(trim(value.substr(start, comma - start)));
        if (!kept) {
            return fail(std::move(kept).error());
        }
        if (std::find(out.begin(), out.end(), *kept) == out.end()) {
            out.push_back(std::move(*kept));
        }
        start = comma + 1;
    }
    return out;
}

// "/a, /b" -> {"/a", "/b"}; "" -> {}. Absolute directories that a unit file's ReadWritePaths=
// can carry as they are (qmachined-generator writes them there): no white space, quotes,
// backslashes, '%' (a unit file specifier) or control characters.
expected<std::vector<std::string>> parse_dir_list(std::string_view key, std::string_view value)
{
    return parse_list(value, [key](std::string_view dir) -> expected<std::string> {
        if (!is_absolute(dir)) {
            return fail(errc::invalid_argument,
                        fmt::format("{}: '{}' is not an absolute path", key, dir));
        }
        const auto bad = std::find_if(dir.begin(), dir.end(), [](char c) {
            const auto u = static_cast<unsigned char>(c);
            return u <= ' ' || u == 0x7f || c == '"' || c == '\'' || c == '\\' || c == '%';
        });
        if (bad != dir.end()) {
            return fail(errc::invalid_argument,
                        fmt::format("{}: '{}' has a character a directory here may not have "
                                    "(white space, quotes, '\\', '%' or a control character)",
                                    key, dir));
        }
        return clean_path(std::string(dir));
    });
}

struct ShutdownPolicyName
{
    ShutdownPolicy policy;
    std::string_view name;
};
constexpr std::array<ShutdownPolicyName, 2> shutdown_policies{{
    {ShutdownPolicy::leave_running, "leave-running"},
    {ShutdownPolicy::stop_machines, "stop-machines"},
}};

// A user name as useradd(8) makes them, and nothing a shell or a path would read differently.
bool is_user_name(std::string_view s)
{
    return !s.empty() && s.size() <= 256 && s.front() != '-' &&
           std::all_of(s.begin(), s.end(), [](char c) {
               return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                      c == '.' || c == '_' || c == '-';
           });
}

// "a, b,c" -> {"a", "b", "c"}; "" -> {}. Each a QMP command name.
expected<std::vector<std::string>> parse_command_list(std::string_view key, std::string_view value)
{
    return parse_list(value, [key](std::string_view name) -> expected<std::string> {
        if (!valid_qmp_command_name(name)) {
            return fail(errc::invalid_argument,
                        fmt::format("{}: '{}' is not a QMP command name (letters, digits, '-' and "
                                    "'_')",
                                    key, name));
        }
        return std::string(name);
    });
}

expected<std::uint64_t> parse_count(std::string_view key, std::string_view value, std::uint64_t min,
                                    std::uint64_t max)
{
    std::uint64_t n = 0;
    const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
    if (ec != std::errc() || end != value.data() + value.size() || n < min || n > max) {
        return fail(errc::invalid_argument,
                    fmt::format("{}: '{}' is not a whole number from {} to {}", key, value, min, max));
    }
    return n;
}

// One rest-* setting; messages start "<key>: ".
expected<void> apply_setting(Config& c, std::string_view key, const std::string& value)
{
    if (key == "rest-socket") {
        c.rest_socket = value == "none" ? value : clean_path(value);
    } else if (key == "rest-token-file") {
        c.rest_token_file = clean_path(value);
    } else if (key == "rest-listen") {
        if (value != "none") {
            auto parsed = parse_listen_address(value);
            if (!parsed) {
                return fail(errc::invalid_argument, fmt::format("{}: {}", key, parsed.error().message));
            }
        }
        c.rest_listen = value == "none" ? std::string() : value;
    } else if (key == "rest-allow-remote") {
        if (value != "true" && value != "false" && value != "yes" && value != "no") {
            return fail(errc::invalid_argument,
                        fmt::format("{}: '{}' is not true or false", key, value));
        }
        c.rest_allow_remote = value == "true" || value == "yes";
    } else if (key == "rest-max-connections") {
        auto n = parse_count(key, value, 1, 1000000);
        if (!n) {
            return fail(std::move(n).error());
        }
        c.rest_max_connections = *n;
    } else if (key == "max-machines") {
        auto n = parse_count(key, value, 1, 1000000);
        if (!n) {
            return fail(std::move(n).error());
        }
        c.max_machines = *n;
    } else if (key == "qmp-timeout") {
        auto n = parse_count(key, value, 1, 3600);
        if (!n) {
            return fail(std::move(n).error());
        }
        c.qmp_timeout = std::chrono::seconds(*n);
    } else if (key == "bus") {
        if (value.empty()) {
            return fail(errc::invalid_argument,
                        fmt::format("{}: give system, user, none or a D-Bus address", key));
        }
        c.bus = value;
    } else if (key == "rest-max-subscribers") {
        auto n = parse_count(key, value, 1, 1000000);
        if (!n) {
            return fail(std::move(n).error());
        }
        c.rest_max_subscribers = *n;
    } else if (key == "event-ring" || key == "event-queue") {
        auto n = parse_count(key, value, 16, std::uint64_t{1} << 20);
        if (!n) {
            return fail(std::move(n).error());
        }
        (key == "event-ring" ? c.event_ring : c.event_queue) = *n;
    } else if (key == "rest-max-header") {
        auto n = parse_count(key, value, 1024, std::uint64_t{1} << 20);
        if (!n) {
            return fail(std::move(n).error());
        }
        c.rest_max_header = *n;
    } else if (key == "qmp-max-message") {
        auto n = parse_count(key, value, 65536, std::uint64_t{1} << 30);
        if (!n) {
            return fail(std::move(n).error());
        }
        c.qmp_max_message = *n;
    } else if (key == "event-rate" || key == "event-burst") {
        auto n = parse_count(key, value, 1, 1000000);
        if (!n) {
            return fail(std::move(n).error());
        }
        (key == "event-rate" ? c.event_rate : c.event_burst) = static_cast<double>(*n);
    } else if (key == "rest-max-body") {
        auto n = parse_count(key, value, 1024, std::uint64_t{1} << 30);
        if (!n) {
            return fail(std::move(n).error());
        }
        c.rest_max_body = *n;
    } else if (key == "rest-request-timeout") {
        // Seconds, with a fraction if wanted ("0.5"): tests use short ones.
        double secs = 0;
        const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), secs);
        if (ec != std::errc() || end != value.data() + value.size() || !(secs >= 0.05) ||
            secs > 3600) {
            return fail(errc::invalid_argument,
                        fmt::format("{}: '{}' is not a number of seconds from 0.05 to 3600", key,
                                    value));
        }
        c.rest_request_timeout = std::chrono::milliseconds(static_cast<std::int64_t>(secs * 1000));
    } else if (key == "shutdown-policy") {
        const auto it = std::find_if(shutdown_policies.begin(), shutdown_policies.end(),
                                     [&](const ShutdownPolicyName& p) { return p.name == value; });
        if (it == shutdown_policies.end()) {
            return fail(errc::invalid_argument,
                        fmt::format("{}: '{}' is not one of leave-running, stop-machines", key,
                                    value));
        }
        c.shutdown_policy = it->policy;
    } else if (key == "qemu-user") {
        if (!value.empty() && !is_user_name(value)) {
            return fail(errc::invalid_argument,
                        fmt::format("{}: '{}' is not a user name (letters, digits, '.', '_' and "
                                    "'-', not first)",
                                    key, value));
        }
        c.qemu_user = value;
    } else if (key == "qemu-sandbox") {
        if (value != "on" && value != "off") {
            return fail(errc::invalid_argument,
                        fmt::format("{}: '{}' is not on or off", key, value));
        }
        c.qemu_sandbox = value == "on";
    } else if (key == "qemu-log-max") {
        auto n = parse_count(key, value, 0, std::uint64_t{1} << 40);
        if (!n) {
            return fail(std::move(n).error());
        }
        c.qemu_log_max = *n;
    } else if (key == "qmp-allow" || key == "qmp-deny") {
        auto names = parse_command_list(key, value);
        if (!names) {
            return fail(std::move(names).error());
        }
        (key == "qmp-allow" ? c.qmp_allow : c.qmp_deny) = std::move(*names);
    } else if (key == "machined") {
        if (value != "auto" && value != "on" && value != "off") {
            return fail(errc::invalid_argument,
                        fmt::format("{}: '{}' is not one of auto, on, off", key, value));
        }
        c.machined = value;
    } else if (key == "image-dirs") {
        auto dirs = parse_dir_list(key, value);
        if (!dirs) {
            return fail(std::move(dirs).error());
        }
        c.image_dirs = std::move(*dirs);
    }
    return {};
}

expected<Flags> parse_flags(const std::vector<std::string>& args)
{
    Flags flags;
    for (std::size_t i = 0; i < args.size(); ++i) {
        const std::string& arg = args[i];
        if (arg == "-h") {
            flags.help = true;
            continue;
        }
        if (arg.rfind("--", 0) != 0 || arg == "--") {
            if (arg != "--" && arg.size() > 1 && arg.front() == '-') {
                return fail(errc::invalid_argument, fmt::format("unknown option '{}'", arg));
            }
            return fail(errc::invalid_argument, fmt::format("unexpected argument '{}'", arg));
        }
        const auto eq = arg.find('=');
        const std::string name = arg.substr(0, eq);
        std::optional<std::string> value;
        if (eq != std::string::npos) {
            value = arg.substr(eq + 1);
        }

        if (name == "--help" || name == "--version") {
            if (value) {
                return fail(errc::invalid_argument,
                            fmt::format("option '{}' takes no value", name));
            }
            (name == "--help" ? flags.help : flags.version) = true;
            continue;
        }
        if (name == "--rest-allow-remote") {
            flags.settings.emplace_back("rest-allow-remote", value.value_or("true"));
            continue;
        }
        const bool is_setting = is_other_setting(std::string_view(name).substr(2));
        if (name != "--state-dir" && name != "--runtime-dir" && name != "--log-level" &&
            name != "--config" && !is_setting) {
            return fail(errc::invalid_argument, fmt::format("unknown option '{}'", name));
        }
        if (!value) {
            // "--state-dir --log-level debug" is a forgotten value, not a directory named
            // "--log-level" ("--state-dir=-odd" still names one).
            if (i + 1 < args.size() && (args[i + 1].empty() || args[i + 1].front() != '-')) {
                value = args[++i];
            }
        }
        if (!value || (value->empty() && !may_be_empty(std::string_view(name).substr(2)))) {
            return fail(errc::invalid_argument, fmt::format("option '{}' needs a value", name));
        }

        if (name == "--log-level") {
            auto level = parse_level(*value);
            if (!level) {
                return fail(
                    errc::invalid_argument,
                    fmt::format("--log-level: '{}' is not one of {}", *value, level_list()));
            }
            flags.log_level = *level;
            continue;
        }
        if (is_setting) {
            std::string v = *value;
            if (name == "--rest-socket" || name == "--rest-token-file") {
                if (v != "none") {
                    auto abs = absolute_from_flag(name, v);
                    if (!abs) {
                        return fail(std::move(abs).error());
                    }
                    v = std::move(*abs);
                }
            }
            flags.settings.emplace_back(name.substr(2), std::move(v));
            continue;
        }
        auto path = absolute_from_flag(name, *value);
        if (!path) {
            return fail(std::move(path).error());
        }
        if (name == "--state-dir") {
            flags.state_dir = std::move(*path);
        } else if (name == "--runtime-dir") {
            flags.runtime_dir = std::move(*path);
        } else {
            flags.config_file = std::move(*path);
        }
    }
    return flags;
}

} // namespace

const char* to_string(ShutdownPolicy p) noexcept
{
    for (const auto& n : shutdown_policies) {
        if (n.policy == p) {
            return n.name.data();
        }
    }
    return "unknown";
}

QmpPolicy qmp_policy(const Config& config)
{
    QmpPolicy policy;
    policy.allow = config.qmp_allow;
    policy.deny = config.qmp_deny;
    return policy;
}

expected<Config> default_config(bool as_root, const GetEnv& getenv)
{
    auto state = default_state_dir(as_root, getenv);
    if (!state) {
        return fail(std::move(state).error());
    }
    auto runtime = default_runtime_dir(as_root, getenv);
    if (!runtime) {
        return fail(std::move(runtime).error());
    }
    Config config;
    config.state_dir = std::move(*state);
    config.runtime_dir = std::move(*runtime);
    if (as_root) {
        config.image_dirs = {root_image_dir};
    }
    return config;
}

expected<Config> default_config()
{
    return default_config(::geteuid() == 0, [](const char* name) { return std::getenv(name); });
}

expected<CommandLine> parse_command_line(const std::vector<std::string>& args, bool as_root,
                                         const GetEnv& getenv)
{
    auto flags = parse_flags(args);
    if (!flags) {
        return fail(std::move(flags).error());
    }
    CommandLine out;
    out.help = flags->help;
    out.version = flags->version;
    Config& config = out.config;
    if (out.help || out.version) {
        // Nothing else is needed, and nothing else may fail: "--help" works without HOME.
        config.state_dir = flags->state_dir.value_or("");
        config.runtime_dir = flags->runtime_dir.value_or("");
        config.log_level = flags->log_level.value_or(config.log_level);
        config.config_file = flags->config_file.value_or("");
        return out;
    }

    // A default that cannot be computed is an error only when neither the file nor a flag
    // replaces it (a user without XDG_RUNTIME_DIR can still pass --runtime-dir).
    auto state = default_state_dir(as_root, getenv);
    auto runtime = default_runtime_dir(as_root, getenv);
    config.state_dir = state ? *state : std::string();
    config.runtime_dir = runtime ? *runtime : std::string();
    if (as_root) {
        config.image_dirs = {root_image_dir};
    }

    if (flags->config_file) {
        config.config_file = *flags->config_file;
        if (auto applied = apply_config_file(config, config.config_file); !applied) {
            return fail(std::move(applied).error());
        }
    }
    if (flags->state_dir) {
        config.state_dir = *flags->state_dir;
    }
    if (flags->runtime_dir) {
        config.runtime_dir = *flags->runtime_dir;
    }
    if (flags->log_level) {
        config.log_level = *flags->log_level;
        config.log_level_from_flag = true;
    }
    for (const auto& [key, value] : flags->settings) {
        if (auto applied = apply_setting(config, key, value); !applied) {
            return fail(errc::invalid_argument, "--" + applied.error().message);
        }
    }
    if (!config.rest_listen.empty() && !config.rest_allow_remote) {
        auto listen = parse_listen_address(config.rest_listen);
        error_code ec;
        const auto address = asio::ip::make_address(listen->first, ec);
        if (ec || !address.is_loopback()) {
            return fail(errc::invalid_argument,
                        fmt::format("rest-listen: {} is not a loopback address; add "
                                    "--rest-allow-remote to accept connections from other hosts",
                                    listen->first));
        }
    }
    if (config.state_dir.empty()) {
        return fail(std::move(state).error());
    }
    if (config.runtime_dir.empty()) {
        return fail(std::move(runtime).error());
    }
    return out;
}

expected<CommandLine> parse_command_line(const std::vector<std::string>& args)
{
    return parse_command_line(args, ::geteuid() == 0,
                              [](const char* name) { return std::getenv(name); });
}

expected<void> apply_config_text(Config& config, const std::string& text, const std::string& origin)
{
    Config out = config; // `config` is left alone on failure
    std::string_view rest = text;
    for (int line_no = 1; !rest.empty(); ++line_no) {
        const auto nl = rest.find('\n');
        std::string_view line = rest.substr(0, nl);
        rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);

        // A comment starts with '#' at the start of a line or after white space ("a#b" is a value).
        for (std::size_t pos = line.find('#'); pos != std::string_view::npos;
             pos = line.find('#', pos + 1)) {
            if (pos == 0 || line[pos - 1] == ' ' || line[pos - 1] == '\t') {
                line = line.substr(0, pos);
                break;
            }
        }
        line = trim(line);
        if (line.empty()) {
            continue;
        }
        auto bad = [&](const std::string& what) {
            return fail(errc::invalid_argument, fmt::format("{}:{}: {}", origin, line_no, what));
        };
        const auto eq = line.find('=');
        if (eq == std::string_view::npos || trim(line.substr(0, eq)).empty()) {
            return bad(fmt::format("expected 'key = value', got '{}'", line));
        }
        const std::string key(trim(line.substr(0, eq)));
        const std::string value(trim(line.substr(eq + 1)));
        if (key != "state-dir" && key != "runtime-dir" && key != "log-level" &&
            !is_other_setting(key)) {
            return bad(fmt::format("unknown key '{}'", key));
        }
        if (value.empty() && !may_be_empty(key)) {
            return bad(fmt::format("{}: needs a value", key));
        }
        if (is_other_setting(key)) {
            if ((key == "rest-socket" || key == "rest-token-file") && value != "none" &&
                !is_absolute(value)) {
                return bad(fmt::format("{}: '{}' is not an absolute path", key, value));
            }
            if (auto applied = apply_setting(out, key, value); !applied) {
                return bad(applied.error().message);
            }
            continue;
        }
        if (key == "log-level") {
            auto level = parse_level(value);
            if (!level) {
                return bad(fmt::format("log-level: '{}' is not one of {}", value, level_list()));
            }
            out.log_level = *level;
            continue;
        }
        // Relative to what? The daemon's cwd is '/' under systemd and anything by hand: refuse.
        if (!is_absolute(value)) {
            return bad(fmt::format("{}: '{}' is not an absolute path", key, value));
        }
        (key == "state-dir" ? out.state_dir : out.runtime_dir) = clean_path(value);
    }
    config = std::move(out);
    return {};
}

expected<void> apply_config_file(Config& config, const std::string& path)
{
    auto failed = [&](int err) {
        return fail(errc::system_error,
                    fmt::format("cannot read config file '{}': {}", path, errno_text(err)));
    };
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return failed(errno);
    }
    // A configuration file is a few lines; anything near this is a mistake (a disk image?).
    constexpr std::size_t max_size = 1 << 20;
    std::string text;
    char buf[4096];
    for (;;) {
        const ssize_t n = ::read(fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            const int err = errno;
            ::close(fd);
            return failed(err);
        }
        if (n == 0) {
            break;
        }
        text.append(buf, static_cast<std::size_t>(n));
        if (text.size() > max_size) {
            ::close(fd);
            return fail(errc::invalid_argument,
                        fmt::format("config file '{}' is larger than {} bytes", path, max_size));
        }
    }
    ::close(fd);
    return apply_config_text(config, text, path);
}

expected<void> ensure_private_dir(const std::string& path, std::optional<gid_t> group)
{
    if (path.empty()) {
        return fail(errc::invalid_argument, "empty directory name");
    }
    const std::string dir = clean_path(path); // no trailing '/', no "." components
    auto failed = [](const std::string& what, const std::string& path, int err) {
        return fail(errc::system_error,
                    fmt::format("cannot {} '{}': {}", what, path, errno_text(err)));
    };

    // The parents first: each missing one is created 0700 (they hold nothing but our directory).
    const fs::path target(dir);
    fs::path prefix;
    for (auto it = target.begin(); it != target.end(); ++it) {
        prefix /= *it;
        if (std::next(it) == target.end() || *it == "/" || it->empty()) {
            continue;
        }
        if (::mkdir(prefix.c_str(), 0700) == 0) {
            // The umask may have taken bits (even the owner's); say exactly what we mean.
            if (::chmod(prefix.c_str(), 0700) != 0) {
                return failed("set the permissions of", prefix.string(), errno);
            }
            continue;
        }
        const int err = errno;
        struct stat st
        {
        };
        if (err != EEXIST && !(::stat(prefix.c_str(), &st) == 0 && S_ISDIR(st.st_mode))) {
            return failed("create directory", prefix.string(), err);
        }
    }

    bool created = false;
    if (::mkdir(dir.c_str(), 0700) == 0) {
        created = true;
    } else if (errno != EEXIST) {
        return failed("create directory", dir, errno);
    }
    // Checked and changed through one descriptor, so that what is checked is what is changed.
    const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        const int err = errno;
        if (err == ENOTDIR) {
            return fail(errc::system_error, fmt::format("'{}' exists and is not a directory", dir));
        }
        return failed("open directory", dir, err);
    }
    struct stat st
    {
    };
    if (::fstat(fd, &st) != 0) {
        const int err = errno;
        ::close(fd);
        return failed("stat", dir, err);
    }
    const uid_t me = ::geteuid();
    if (st.st_uid != me) {
        ::close(fd);
        // Another user's directory would let them read our sockets or plant definitions.
        return fail(errc::system_error,
                    fmt::format("'{}' is owned by uid {}, not by uid {}", dir, st.st_uid, me));
    }
    if (group && st.st_gid != *group) {
        if (::fchown(fd, static_cast<uid_t>(-1), *group) != 0) {
            const int err = errno;
            ::close(fd);
            return failed("set the group of", dir, err);
        }
    }
    const mode_t wanted = group ? 0710 : 0700;
    const mode_t mode = st.st_mode & 07777;
    if (mode != wanted) {
        if (::fchmod(fd, wanted) != 0) {
            const int err = errno;
            ::close(fd);
            return failed("set the permissions of", dir, err);
        }
        if (!created && (mode & ~wanted & 07777) != 0) {
            spdlog::warn("Tightened the permissions of '{}' from {:04o} to {:04o}", dir, mode,
                         wanted);
        }
    }
    ::close(fd);
    return {};
}

std::string rest_socket_path(const Config& config)
{
    if (config.rest_socket == "none") {
        return {};
    }
    return config.rest_socket.empty() ? config.runtime_dir + "/qmachined.sock" : config.rest_socket;
}

std::string rest_token_path(const Config& config)
{
    return config.rest_token_file.empty() ? config.state_dir + "/rest.token" : config.rest_token_file;
}

expected<std::pair<std::string, std::uint16_t>> parse_listen_address(std::string_view text)
{
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos || colon == 0) {
        return fail(errc::invalid_argument,
                    fmt::format("'{}' is not ADDRESS:PORT (for example 127.0.0.1:8080)", text));
    }
    std::string host(text.substr(0, colon));
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
        host = host.substr(1, host.size() - 2);
    }
    error_code ec;
    asio::ip::make_address(host, ec);
    if (ec) {
        return fail(errc::invalid_argument,
                    fmt::format("'{}' is not an IP address (names are not resolved)", host));
    }
    auto port = parse_count("port", text.substr(colon + 1), 0, 65535);
    if (!port) {
        return fail(errc::invalid_argument, fmt::format("'{}' has no valid port", text));
    }
    return std::pair{host, static_cast<std::uint16_t>(*port)};
}

namespace {

// "add-fd, getfd, ..., migrate to exec:, ..." (the QMP policy's default deny set), wrapped for
// usage(): continuation lines indented as the descriptions are.
std::string denied_list()
{
    constexpr std::size_t width = 72;
    std::string out;
    std::size_t line = 0;
    const auto set = default_denied_qmp_commands();
    for (std::size_t i = 0; i < set.size(); ++i) {
        std::string item(set[i].command);
        item += set[i].exec_uri_only ? " to exec:" : "";
        item += i + 1 < set.size() ? "," : "";
        if (line > 0 && line + 1 + item.size() > width) {
            out += "\n                         ";
            line = 0;
        } else if (line > 0) {
            out += ' ';
            ++line;
        }
        out += item;
        line += item.size();
    }
    return out;
}

} // namespace

std::string usage()
{
    return fmt::format(
        R"(Usage: qmachined [OPTION]...
Supervise QEMU machines: keep their definitions, run them, and serve the API.

Options (each as "--option value" or "--option=value"; the last one given wins):
  --state-dir DIR      keep machine definitions in DIR
                         default: {} as root,
                         else $XDG_STATE_HOME/qmachined ($HOME/.local/state/qmachined)
  --runtime-dir DIR    keep sockets, records and logs of running machines in DIR
                         default: {} as root, else $XDG_RUNTIME_DIR/qmachined
  --log-level LEVEL    log at LEVEL and above: {}
                         default: info
  --config FILE        read options from FILE first ("key = value" lines, the keys are the
                         options below without the dashes, except config, help and version;
                         '#' comments; absolute paths); options given here override it
                         default: none
  --rest-socket PATH   serve the REST API on the unix socket PATH (mode 0660), or "none"
                         default: RUNTIME-DIR/qmachined.sock
  --rest-listen ADDR:PORT
                       also serve it over TCP (each request needs "Authorization: Bearer
                         TOKEN"); a loopback address unless --rest-allow-remote
                         default: none
  --rest-allow-remote  let --rest-listen name any address (the API controls machines:
                         expose it only on a trusted network)
  --rest-token-file FILE
                       the TCP listener's token (generated there, mode 0600, when absent)
                         default: STATE-DIR/rest.token
  --rest-max-connections N
                       open REST connections at most, on each listener (the unix socket
                         and TCP count apart) (default 1024)
  --rest-max-subscribers N
                       open event streams (GET /v1/events) at most (default 1024)
  --rest-max-body BYTES
                       request bodies at most (default 1048576)
  --rest-max-header BYTES
                       a request's line and header fields at most (default 16384)
  --rest-request-timeout SECONDS
                       a request must arrive within this (default 30)
  --shutdown-policy POLICY
                       what qmachined's own stop does to running machines: leave-running
                         (they keep running; the next qmachined takes them over) or
                         stop-machines (each is stopped as its spec's shutdown says)
                         default: leave-running
  --qemu-user USER     run QEMU as USER when qmachined runs as root; "" (an empty value):
                         as qmachined's own user
                         default: qmachined-qemu
  --qemu-sandbox on|off
                       QEMU's seccomp sandbox (-sandbox)
                         default: on
  --qemu-log-max BYTES
                       keep each machine's QEMU output log under BYTES (0: unbounded)
                         default: 1048576
  --bus BUS            the D-Bus to serve org.qmachined1 on: system, user, none or an address
                         (unix:path=...)
                         default: system as root, user otherwise
  --max-machines N     machines that may exist at most (default 4096)
  --qmp-timeout SECONDS
                       the deadline of a QMP passthrough command that names none (default 10);
                         one that overruns it makes qmachined probe the monitor
  --event-ring N       recent events kept for resuming streams and waits (default 4096)
  --event-queue N      events a stream's reader may be behind before it is told it lagged
                         (default 1024)
  --event-rate N       QMP events per second each machine may publish; more are dropped and
                         counted (EVENTS_DROPPED) (default 200)
  --event-burst N      events a machine may publish at once above that rate (default 400)
  --qmp-max-message BYTES
                       the largest QMP message taken from a QEMU; a longer one ends its
                         monitor connection (the machine turns unresponsive) (default 16777216)
  --image-dirs DIR[,DIR]...
                       directories of disk images QEMU may write; under systemd,
                         qmachined-generator makes them writable in the service's sandbox
                         (ProtectSystem=strict): "" (an empty value) for none
                         default: {} as root, none otherwise
  --machined auto|on|off
                       register running machines with systemd-machined (each gets its own
                         machine-NAME.scope; machinectl lists and terminates them): auto does
                         when qmachined runs as root and serves the system bus
                         default: auto
  --qmp-allow CMD[,CMD]...
                       QMP passthrough commands to lift from the default deny set:
                         {}
                         default: none
  --qmp-deny CMD[,CMD]...
                       QMP passthrough commands to deny besides those (wins over --qmp-allow)
                         default: none
  -h, --help           print this help and exit
  --version            print the version and exit

Directories are created with mode 0700 (the runtime directory of a root qmachined: 0710 with
the group qmachined, whose members may then use the REST socket).
Under systemd: $STATE_DIRECTORY and $RUNTIME_DIRECTORY are the default directories, and a REST
socket passed with LISTEN_FDS (qmachined.socket) is used instead of binding one.
)",
        root_state_dir, root_runtime_dir, level_list(), root_image_dir, denied_list());
}

} // namespace qm::daemon
