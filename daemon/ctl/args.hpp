// SPDX-License-Identifier: GPL-2.0-or-later
// qmachinectl's command line: options by table ("--name value", "--name=value", "-n value"),
// positional arguments, "--" to end the options. Pure functions: no I/O.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "libmachine/expected.hpp"

namespace qm::ctl {

struct OptionSpec
{
    std::string_view name;       // "socket" for --socket
    char short_name = 0;         // 'f' for -f; 0: none
    std::string_view value_name; // "PATH"; empty: a flag without a value
    std::string_view help;

    bool takes_value() const { return !value_name.empty(); }
};

struct ParsedArgs
{
    std::vector<std::string> positional;
    // Every option given, in order: its long name and its value ("" for a flag).
    std::vector<std::pair<std::string, std::string>> options;

    bool has(std::string_view name) const;
    // The last value given (the last of a repeated option wins).
    std::optional<std::string> last(std::string_view name) const;
    std::vector<std::string> all(std::string_view name) const;
};

// Parses `args` by the option tables (options may come anywhere, before or after positional
// arguments; "--" ends them; "-" is positional). errc::invalid_argument with a message for the
// user: "unknown option '--frob'", "option '--socket' needs a value", "option '--json' takes no
// value".
expected<ParsedArgs> parse_args(std::span<const std::string> args,
                                std::span<const std::span<const OptionSpec>> tables);

// The position of the first positional argument in `args` when only `global` options may come
// before it (their values skipped); args.size() when there is none.
std::size_t find_command(std::span<const std::string> args, std::span<const OptionSpec> global);

// A whole number within [min, max], for an option's or argument's value; errc::invalid_argument
// "--timeout: 'x' is not a whole number from 0 to 86400".
expected<std::int64_t> parse_integer(std::string_view what, std::string_view text, std::int64_t min,
                                     std::int64_t max);
// A number of seconds (fractions allowed) within (0 or min, max]: "1.5".
expected<double> parse_seconds(std::string_view what, std::string_view text, double min,
                               double max);

} // namespace qm::ctl
