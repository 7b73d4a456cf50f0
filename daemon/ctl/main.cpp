// SPDX-License-Identifier: GPL-2.0-or-later
// qmachinectl: the command line client of qmachined. Parses the command line, finds the daemon
// (the socket the daemon picks by default: daemon/config.cpp), runs the command.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <unistd.h>

#include <fmt/format.h>

#include "daemon/config.hpp"
#include "daemon/ctl/args.hpp"
#include "daemon/ctl/client.hpp"
#include "daemon/ctl/commands.hpp"
#include "daemon/ctl/output.hpp"

namespace {

using namespace qm::ctl;

constexpr const char* system_socket_fallback = "/run/qmachined/qmachined.sock";

int usage(std::string_view message)
{
    std::fprintf(stderr, "qmachinectl: %.*s\nTry 'qmachinectl --help'.\n",
                 static_cast<int>(message.size()), message.data());
    return exit_usage;
}

std::string trimmed(std::string s)
{
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) {
        s.pop_back();
    }
    return s;
}

// Where qmachined is, from --socket, --url (and its token), or the daemon's own default.
qm::expected<Endpoint> find_endpoint(const ParsedArgs& args)
{
    if (args.has("socket") && args.has("url")) {
        return qm::fail(qm::errc::invalid_argument, "--socket and --url exclude each other");
    }
    if (auto socket = args.last("socket")) {
        Endpoint e;
        e.unix_path = *socket;
        return e;
    }
    if (auto url = args.last("url")) {
        auto e = parse_url(*url);
        if (!e) {
            return e;
        }
        if (auto token = args.last("token")) {
            e->token = *token;
        } else {
            std::string file;
            if (auto f = args.last("token-file")) {
                file = *f;
            } else if (auto config = qm::daemon::default_config()) {
                file = qm::daemon::rest_token_path(*config); // the daemon's, when we may read it
            }
            std::ifstream in(file);
            if (in) {
                e->token = trimmed(std::string(std::istreambuf_iterator<char>(in), {}));
            } else if (args.has("token-file")) {
                return qm::fail(qm::errc::invalid_argument,
                                fmt::format("--token-file: cannot read '{}'", file));
            }
        }
        return e;
    }
    // The socket the daemon uses with its defaults (root: the system one; a user: under
    // $XDG_RUNTIME_DIR). A user without a daemon of their own is sent to the system one.
    Endpoint e;
    auto config = qm::daemon::default_config();
    if (config) {
        e.unix_path = qm::daemon::rest_socket_path(*config);
    }
    std::error_code ec;
    if (::geteuid() != 0 && (!config || !std::filesystem::exists(e.unix_path, ec)) &&
        std::filesystem::exists(system_socket_fallback, ec)) {
        e.unix_path = system_socket_fallback;
    }
    if (e.unix_path.empty()) {
        // "XDG_RUNTIME_DIR is not set; use --runtime-dir": the daemon's advice, not ours.
        const std::string& why = config.error().message;
        return qm::fail(qm::errc::connect_failed,
                        fmt::format("cannot find qmachined's socket: {}; use --socket PATH",
                                    why.substr(0, why.find(';'))));
    }
    return e;
}

int run(const std::vector<std::string>& args)
{
    const auto global = global_options();
    const std::size_t at = find_command(args, global);
    const std::string name = at < args.size() ? args[at] : std::string();
    const Command* command = name.empty() ? nullptr : find_command(name);
    if (!name.empty() && command == nullptr) {
        return usage(fmt::format("unknown command '{}'", name));
    }
    std::vector<std::string> rest(args.begin(), args.end());
    if (at < rest.size()) {
        rest.erase(rest.begin() + static_cast<std::ptrdiff_t>(at));
    }
    std::vector<std::span<const OptionSpec>> tables{global};
    if (command != nullptr) {
        tables.push_back(command->options);
    }
    auto parsed = parse_args(rest, tables);
    if (!parsed) {
        return usage(parsed.error().message);
    }
    if (command == nullptr) {
        if (parsed->has("version")) {
            std::printf("qmachinectl %s\n", QM_VERSION);
            return exit_ok;
        }
        if (parsed->has("help")) {
            std::fputs(program_help().c_str(), stdout);
            return exit_ok;
        }
        std::fputs(program_help().c_str(), stderr);
        return exit_usage;
    }
    if (parsed->has("help")) {
        std::fputs(command_help(*command).c_str(), stdout);
        return exit_ok;
    }
    if (command->name == "help") {
        if (parsed->positional.empty()) {
            std::fputs(program_help().c_str(), stdout);
            return exit_ok;
        }
        const Command* about = find_command(parsed->positional[0]);
        if (about == nullptr) {
            return usage(fmt::format("unknown command '{}'", parsed->positional[0]));
        }
        std::fputs(command_help(*about).c_str(), stdout);
        return exit_ok;
    }
    const auto n = parsed->positional.size();
    if (n < command->min_args || n > command->max_args) {
        std::string what = command->arguments.empty() ? std::string("no arguments")
                                                      : std::string(command->arguments);
        return usage(
            fmt::format("'{}' takes {}{}", command->name, what,
                        n < command->min_args ? "" : fmt::format(", not {} arguments", n)));
    }
    auto endpoint = find_endpoint(*parsed);
    if (!endpoint) {
        if (endpoint.error().is(qm::errc::connect_failed)) {
            std::fprintf(stderr, "qmachinectl: %s\n", endpoint.error().message.c_str());
            return exit_unreachable;
        }
        return usage(endpoint.error().message);
    }
    Client client(std::move(*endpoint));
    Context context{client, *parsed};
    context.json = parsed->has("json");
    context.colour = want_colour(::isatty(STDOUT_FILENO) == 1, std::getenv("NO_COLOR"));
    const int status = command->run(context);
    std::fflush(stdout);
    return status;
}

} // namespace

int main(int argc, char** argv)
{
    // A closed pipe (qmachinectl events | head) is a write error, not a death by SIGPIPE (which
    // would leave a console's terminal raw).
    std::signal(SIGPIPE, SIG_IGN);
    std::vector<std::string> args(argv + 1, argv + argc);
    try {
        return run(args);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "qmachinectl: internal error: %s\n", e.what());
        return exit_failed;
    }
}
