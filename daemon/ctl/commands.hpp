// SPDX-License-Identifier: GPL-2.0-or-later
// qmachinectl's commands: their table (name, arguments, options, help) and what each does.
#pragma once

#include <span>
#include <string>
#include <string_view>

#include "daemon/ctl/args.hpp"
#include "daemon/ctl/client.hpp"

namespace qm::ctl {

// Exit statuses (docs/cli.md).
inline constexpr int exit_ok = 0;
inline constexpr int exit_failed = 1;      // the operation failed (the daemon said why)
inline constexpr int exit_usage = 2;       // the command line is wrong
inline constexpr int exit_unreachable = 3; // qmachined cannot be reached

// What a command runs with.
struct Context
{
    Client& client;
    const ParsedArgs& args;
    bool json = false;   // --json: machine-readable output
    bool colour = false; // states in colour
};

struct Command
{
    std::string_view name;
    std::string_view arguments; // "NAME [NAME...]", for the synopsis
    std::size_t min_args = 0;
    std::size_t max_args = 0; // SIZE_MAX: any number
    std::string_view summary; // one line
    std::string_view help;    // the paragraphs after the synopsis
    std::span<const OptionSpec> options;
    int (*run)(Context&);
};

std::span<const Command> commands();
const Command* find_command(std::string_view name);

// The options every command takes.
std::span<const OptionSpec> global_options();

// `qmachinectl --help` and `qmachinectl COMMAND --help`.
std::string program_help();
std::string command_help(const Command& c);

} // namespace qm::ctl
