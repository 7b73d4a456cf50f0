// SPDX-License-Identifier: GPL-2.0-or-later
// qmachinectl's command line parsing: options by table, positional arguments, numbers.
#include "daemon/ctl/args.hpp"

#include <charconv>
#include <cmath>
#include <cstdlib>

#include <fmt/format.h>

namespace qm::ctl {

namespace {

const OptionSpec* find_long(std::span<const std::span<const OptionSpec>> tables,
                            std::string_view name)
{
    for (const auto& table : tables) {
        for (const auto& spec : table) {
            if (spec.name == name) {
                return &spec;
            }
        }
    }
    return nullptr;
}

const OptionSpec* find_short(std::span<const std::span<const OptionSpec>> tables, char c)
{
    for (const auto& table : tables) {
        for (const auto& spec : table) {
            if (spec.short_name != 0 && spec.short_name == c) {
                return &spec;
            }
        }
    }
    return nullptr;
}

bool is_option(std::string_view arg)
{
    return arg.size() > 1 && arg.front() == '-';
}

} // namespace

bool ParsedArgs::has(std::string_view name) const
{
    for (const auto& [n, v] : options) {
        if (n == name) {
            return true;
        }
    }
    return false;
}

std::optional<std::string> ParsedArgs::last(std::string_view name) const
{
    std::optional<std::string> out;
    for (const auto& [n, v] : options) {
        if (n == name) {
            out = v;
        }
    }
    return out;
}

std::vector<std::string> ParsedArgs::all(std::string_view name) const
{
    std::vector<std::string> out;
    for (const auto& [n, v] : options) {
        if (n == name) {
            out.push_back(v);
        }
    }
    return out;
}

expected<ParsedArgs> parse_args(std::span<const std::string> args,
                                std::span<const std::span<const OptionSpec>> tables)
{
    ParsedArgs out;
    bool options_end = false;
    for (std::size_t i = 0; i < args.size(); ++i) {
        const std::string& arg = args[i];
        if (options_end || !is_option(arg)) {
            out.positional.push_back(arg);
            continue;
        }
        if (arg == "--") {
            options_end = true;
            continue;
        }
        const OptionSpec* spec = nullptr;
        std::optional<std::string> inline_value;
        std::string shown; // the option as the user wrote it
        if (arg.starts_with("--")) {
            const auto eq = arg.find('=');
            const std::string name = arg.substr(2, eq == std::string::npos ? eq : eq - 2);
            shown = "--" + name;
            spec = find_long(tables, name);
            if (eq != std::string::npos) {
                inline_value = arg.substr(eq + 1);
            }
        } else {
            shown = arg.substr(0, 2);
            spec = find_short(tables, arg[1]);
            if (arg.size() > 2) {
                inline_value = arg.substr(2);
            }
            if (spec != nullptr && !spec->takes_value() && inline_value) {
                return fail(
                    errc::invalid_argument,
                    fmt::format("unknown option '{}' (short options cannot be combined)", arg));
            }
        }
        if (spec == nullptr) {
            return fail(errc::invalid_argument, fmt::format("unknown option '{}'", shown));
        }
        std::string value;
        if (spec->takes_value()) {
            if (inline_value) {
                value = *inline_value;
            } else if (i + 1 < args.size()) {
                value = args[++i];
            } else {
                return fail(errc::invalid_argument,
                            fmt::format("option '{}' needs a value ({})", shown, spec->value_name));
            }
        } else if (inline_value) {
            return fail(errc::invalid_argument, fmt::format("option '{}' takes no value", shown));
        }
        out.options.emplace_back(std::string(spec->name), std::move(value));
    }
    return out;
}

std::size_t find_command(std::span<const std::string> args, std::span<const OptionSpec> global)
{
    for (std::size_t i = 0; i < args.size(); ++i) {
        const std::string& arg = args[i];
        if (arg == "--") {
            return i + 1;
        }
        if (!is_option(arg)) {
            return i;
        }
        if (arg.find('=') != std::string::npos) {
            continue;
        }
        for (const auto& spec : global) {
            const bool named = arg.starts_with("--") ? arg.substr(2) == spec.name
                                                     : arg.size() == 2 && arg[1] == spec.short_name;
            if (named && spec.takes_value()) {
                ++i; // its value
                break;
            }
        }
    }
    return args.size();
}

expected<std::int64_t> parse_integer(std::string_view what, std::string_view text, std::int64_t min,
                                     std::int64_t max)
{
    std::int64_t n = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
    if (ec != std::errc() || end != text.data() + text.size() || n < min || n > max) {
        return fail(
            errc::invalid_argument,
            fmt::format("{}: '{}' is not a whole number from {} to {}", what, text, min, max));
    }
    return n;
}

expected<double> parse_seconds(std::string_view what, std::string_view text, double min, double max)
{
    const std::string s(text);
    char* end = nullptr;
    const double d = std::strtod(s.c_str(), &end);
    if (s.empty() || end != s.c_str() + s.size() || !std::isfinite(d) || d < min || d > max) {
        return fail(
            errc::invalid_argument,
            fmt::format("{}: '{}' is not a number of seconds from {} to {}", what, text, min, max));
    }
    return d;
}

} // namespace qm::ctl
