// SPDX-License-Identifier: GPL-2.0-or-later
// qmachined's configuration: defaults for root and users, every flag in both spellings, the
// config file and its precedence, the --help text, and ensure_private_dir.
#include "daemon/config.hpp"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>

namespace qm::daemon {
namespace {

namespace fs = std::filesystem;

std::string describe(const Error& e)
{
    return std::string(to_string(static_cast<errc>(e.code.value()))) + ": " + e.message;
}

// An environment made of `vars` only.
GetEnv env(std::map<std::string, std::string> vars)
{
    auto table = std::make_shared<const std::map<std::string, std::string>>(std::move(vars));
    return [table](const char* name) -> const char* {
        auto it = table->find(name);
        return it == table->end() ? nullptr : it->second.c_str();
    };
}

const GetEnv user_env = env({{"HOME", "/home/u"}, {"XDG_RUNTIME_DIR", "/run/user/1000"}});

expected<CommandLine> parse(const std::vector<std::string>& args, const GetEnv& getenv = user_env)
{
    return parse_command_line(args, false, getenv);
}

// The message of a failure that must happen.
std::string error_of(const expected<CommandLine>& r)
{
    EXPECT_FALSE(r);
    return r ? std::string("(no error)") : r.error().message;
}

unsigned mode_of(const fs::path& path)
{
    struct stat st
    {
    };
    EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
    return st.st_mode & 07777;
}

std::string cwd_join(const std::string& rel)
{
    return (fs::current_path() / rel).lexically_normal().string();
}

TEST(DefaultConfigTest, Root)
{
    auto c = default_config(true, env({{"HOME", "/root"}, {"XDG_STATE_HOME", "/elsewhere"}}));
    ASSERT_TRUE(c) << describe(c.error());
    EXPECT_EQ(c->state_dir, "/var/lib/qmachined");
    EXPECT_EQ(c->runtime_dir, "/run/qmachined");
    EXPECT_EQ(c->log_level, spdlog::level::info);
    EXPECT_EQ(c->config_file, "");
}

TEST(DefaultConfigTest, UserWithXdgStateHome)
{
    auto c = default_config(false, env({{"HOME", "/home/u"},
                                        {"XDG_STATE_HOME", "/home/u/state/"},
                                        {"XDG_RUNTIME_DIR", "/run/user/1000"}}));
    ASSERT_TRUE(c) << describe(c.error());
    EXPECT_EQ(c->state_dir, "/home/u/state/qmachined");
    EXPECT_EQ(c->runtime_dir, "/run/user/1000/qmachined");
}

TEST(DefaultConfigTest, UserWithoutXdgStateHome)
{
    auto c = default_config(false, user_env);
    ASSERT_TRUE(c) << describe(c.error());
    EXPECT_EQ(c->state_dir, "/home/u/.local/state/qmachined");
    EXPECT_EQ(c->runtime_dir, "/run/user/1000/qmachined");
}

TEST(DefaultConfigTest, RelativeXdgPathsAreIgnored)
{
    // The XDG base directory spec: a relative path in these variables is invalid and ignored.
    auto c = default_config(false, env({{"HOME", "/home/u"},
                                        {"XDG_STATE_HOME", "state"},
                                        {"XDG_RUNTIME_DIR", "/run/user/1000"}}));
    ASSERT_TRUE(c) << describe(c.error());
    EXPECT_EQ(c->state_dir, "/home/u/.local/state/qmachined");
    auto r = default_config(false, env({{"HOME", "/home/u"}, {"XDG_RUNTIME_DIR", "run"}}));
    EXPECT_FALSE(r);
}

TEST(DefaultConfigTest, UserWithoutRuntimeDirFails)
{
    auto c = default_config(false, env({{"HOME", "/home/u"}}));
    ASSERT_FALSE(c);
    EXPECT_TRUE(c.error().is(errc::invalid_argument)) << describe(c.error());
    EXPECT_EQ(c.error().message, "XDG_RUNTIME_DIR is not set; use --runtime-dir");
}

TEST(DefaultConfigTest, UserWithoutHomeFails)
{
    auto c = default_config(false, env({{"XDG_RUNTIME_DIR", "/run/user/1000"}}));
    ASSERT_FALSE(c);
    EXPECT_TRUE(c.error().is(errc::invalid_argument)) << describe(c.error());
    EXPECT_NE(c.error().message.find("--state-dir"), std::string::npos) << c.error().message;
}

TEST(DefaultConfigTest, PlainOverloadUsesTheProcess)
{
    auto plain = default_config();
    auto by_hand = default_config(::geteuid() == 0, [](const char* n) { return std::getenv(n); });
    ASSERT_EQ(plain.has_value(), by_hand.has_value());
    if (plain) {
        EXPECT_EQ(plain->state_dir, by_hand->state_dir);
        EXPECT_EQ(plain->runtime_dir, by_hand->runtime_dir);
    } else {
        EXPECT_EQ(plain.error().message, by_hand.error().message);
    }
}

TEST(CommandLineTest, NoArgumentsGiveTheDefaults)
{
    auto r = parse({});
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_FALSE(r->help);
    EXPECT_FALSE(r->version);
    EXPECT_EQ(r->config.state_dir, "/home/u/.local/state/qmachined");
    EXPECT_EQ(r->config.runtime_dir, "/run/user/1000/qmachined");
    EXPECT_EQ(r->config.log_level, spdlog::level::info);
    EXPECT_EQ(r->config.config_file, "");

    auto root = parse_command_line({}, true, env({}));
    ASSERT_TRUE(root) << describe(root.error());
    EXPECT_EQ(root->config.state_dir, "/var/lib/qmachined");
    EXPECT_EQ(root->config.runtime_dir, "/run/qmachined");
}

TEST(CommandLineTest, DirectoryFlagsInBothSpellings)
{
    for (const auto& args : std::vector<std::vector<std::string>>{
             {"--state-dir", "/s", "--runtime-dir", "/r/"},
             {"--state-dir=/s", "--runtime-dir=/r/"},
             {"--state-dir=/s", "--runtime-dir", "/r"},
             {"--state-dir", "/x", "--state-dir=/s", "--runtime-dir", "/r"}, // the last wins
         }) {
        auto r = parse(args);
        ASSERT_TRUE(r) << describe(r.error()) << " " << testing::PrintToString(args);
        EXPECT_EQ(r->config.state_dir, "/s") << testing::PrintToString(args);
        EXPECT_EQ(r->config.runtime_dir, "/r") << testing::PrintToString(args);
    }
}

TEST(CommandLineTest, RelativeDirectoriesAreMadeAbsolute)
{
    auto r = parse({"--state-dir", "rel/s", "--runtime-dir=./r"});
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(r->config.state_dir, cwd_join("rel/s"));
    EXPECT_EQ(r->config.runtime_dir, cwd_join("r"));
}

TEST(CommandLineTest, LogLevelInBothSpellings)
{
    const std::vector<std::pair<std::string, spdlog::level::level_enum>> levels = {
        {"trace", spdlog::level::trace}, {"debug", spdlog::level::debug},
        {"info", spdlog::level::info},   {"warn", spdlog::level::warn},
        {"error", spdlog::level::err},   {"critical", spdlog::level::critical},
        {"off", spdlog::level::off},
    };
    for (const auto& [name, level] : levels) {
        auto spaced = parse({"--log-level", name});
        ASSERT_TRUE(spaced) << name << ": " << describe(spaced.error());
        EXPECT_EQ(spaced->config.log_level, level) << name;
        auto joined = parse({"--log-level=" + name});
        ASSERT_TRUE(joined) << name << ": " << describe(joined.error());
        EXPECT_EQ(joined->config.log_level, level) << name;
    }
}

TEST(CommandLineTest, HelpAndVersion)
{
    // They need nothing else: no HOME, no XDG_RUNTIME_DIR, no config file.
    for (const char* help : {"--help", "-h"}) {
        auto r = parse({help, "--config", "/does/not/exist"}, env({}));
        ASSERT_TRUE(r) << describe(r.error());
        EXPECT_TRUE(r->help);
        EXPECT_FALSE(r->version);
    }
    auto v = parse({"--version"}, env({}));
    ASSERT_TRUE(v) << describe(v.error());
    EXPECT_TRUE(v->version);
    EXPECT_FALSE(v->help);

    EXPECT_EQ(error_of(parse({"--help=yes"})), "option '--help' takes no value");
    EXPECT_EQ(error_of(parse({"--version=2"})), "option '--version' takes no value");
}

TEST(CommandLineTest, UnknownOptionsAndArguments)
{
    EXPECT_EQ(error_of(parse({"--frob"})), "unknown option '--frob'");
    EXPECT_EQ(error_of(parse({"--frob=1"})), "unknown option '--frob'");
    EXPECT_EQ(error_of(parse({"-x"})), "unknown option '-x'");
    EXPECT_EQ(error_of(parse({"--state-dir", "/s", "extra"})), "unexpected argument 'extra'");
    EXPECT_EQ(error_of(parse({"--"})), "unexpected argument '--'");
    auto r = parse({"--frob"});
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::invalid_argument));
}

TEST(CommandLineTest, MissingValues)
{
    for (const char* flag : {"--state-dir", "--runtime-dir", "--log-level", "--config"}) {
        const std::string want = std::string("option '") + flag + "' needs a value";
        EXPECT_EQ(error_of(parse({flag})), want);
        EXPECT_EQ(error_of(parse({std::string(flag) + "="})), want);
        // A flag where the value should be is a forgotten value, not the value.
        EXPECT_EQ(error_of(parse({flag, "--help"})), want);
    }
}

TEST(CommandLineTest, BadLogLevel)
{
    EXPECT_EQ(error_of(parse({"--log-level", "loud"})),
              "--log-level: 'loud' is not one of trace, debug, info, warn, error, critical, off");
    EXPECT_NE(error_of(parse({"--log-level=INFO"})).find("'INFO'"), std::string::npos);
}

TEST(CommandLineTest, AFlagReplacesAMissingDefault)
{
    // A user without XDG_RUNTIME_DIR can still run the daemon by naming the directory.
    const auto no_runtime = env({{"HOME", "/home/u"}});
    EXPECT_EQ(error_of(parse({}, no_runtime)), "XDG_RUNTIME_DIR is not set; use --runtime-dir");
    auto r = parse({"--runtime-dir", "/tmp/q"}, no_runtime);
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(r->config.runtime_dir, "/tmp/q");
    EXPECT_EQ(r->config.state_dir, "/home/u/.local/state/qmachined");

    auto none = parse({"--runtime-dir", "/tmp/q"}, env({}));
    ASSERT_FALSE(none);
    EXPECT_NE(none.error().message.find("--state-dir"), std::string::npos);
}

TEST(ConfigTextTest, KeysCommentsAndBlankLines)
{
    Config c;
    c.state_dir = "/default/state";
    const std::string text = "# qmachined.conf\n"
                             "\n"
                             "   \t\n"
                             "state-dir = /srv/q/state/   # where definitions live\n"
                             "runtime-dir=/run/q\r\n"
                             "  log-level   =   debug  \n"
                             "#log-level = off\n"
                             "  # indented comment";
    auto r = apply_config_text(c, text, "q.conf");
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(c.state_dir, "/srv/q/state");
    EXPECT_EQ(c.runtime_dir, "/run/q");
    EXPECT_EQ(c.log_level, spdlog::level::debug);
}

TEST(ConfigTextTest, HashInsideAValueIsPartOfIt)
{
    Config c;
    ASSERT_TRUE(apply_config_text(c, "state-dir = /srv/a#b\n", "q.conf"));
    EXPECT_EQ(c.state_dir, "/srv/a#b");
}

TEST(ConfigTextTest, EmptyTextChangesNothing)
{
    Config c;
    c.state_dir = "/s";
    ASSERT_TRUE(apply_config_text(c, "", "q.conf"));
    EXPECT_EQ(c.state_dir, "/s");
}

TEST(ConfigTextTest, ErrorsNameTheLine)
{
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"# c\n\nfrob = 1\n", "/etc/q.conf:3: unknown key 'frob'"},
        {"config = /etc/other.conf\n", "/etc/q.conf:1: unknown key 'config'"},
        {"state-dir = /ok\nruntime-dir = run/q\n",
         "/etc/q.conf:2: runtime-dir: 'run/q' is not an absolute path"},
        {"state-dir = relative\n", "/etc/q.conf:1: state-dir: 'relative' is not an absolute path"},
        {"log-level = loud\n", "/etc/q.conf:1: log-level: 'loud' is not one of trace, debug, info, "
                               "warn, error, critical, off"},
        {"\nstate-dir /s\n", "/etc/q.conf:2: expected 'key = value', got 'state-dir /s'"},
        {"= /s\n", "/etc/q.conf:1: expected 'key = value', got '= /s'"},
        {"state-dir =   # nothing\n", "/etc/q.conf:1: state-dir: needs a value"},
        {"--state-dir = /s\n", "/etc/q.conf:1: unknown key '--state-dir'"},
    };
    for (const auto& [text, message] : cases) {
        Config c;
        c.state_dir = "/before";
        auto r = apply_config_text(c, text, "/etc/q.conf");
        ASSERT_FALSE(r) << text;
        EXPECT_TRUE(r.error().is(errc::invalid_argument)) << describe(r.error());
        EXPECT_EQ(r.error().message, message);
        EXPECT_EQ(c.state_dir, "/before") << "a failed file changes nothing: " << text;
    }
}

class ConfigFileTest : public testing::Test
{
protected:
    void SetUp() override
    {
        std::string templ = (fs::temp_directory_path() / "config.XXXXXX").string();
        ASSERT_NE(::mkdtemp(templ.data()), nullptr);
        dir_ = templ;
    }
    void TearDown() override
    {
        std::error_code ec;
        // ensure_private_dir tests may leave 0700/0000 trees: make them removable first.
        for (auto it = fs::recursive_directory_iterator(dir_, ec); !ec && it != fs::end(it);
             it.increment(ec)) {
            if (it->is_directory() && !it->is_symlink()) {
                fs::permissions(it->path(), fs::perms::owner_all, fs::perm_options::add, ec);
            }
        }
        fs::remove_all(dir_, ec);
    }

    std::string write(const std::string& name, const std::string& text)
    {
        const auto path = dir_ / name;
        std::ofstream(path) << text;
        return path.string();
    }

    fs::path dir_;
};

TEST_F(ConfigFileTest, FileUnderFlagsOverDefaults)
{
    const auto file = write("q.conf", "state-dir = /file/state\n"
                                      "runtime-dir = /file/run\n"
                                      "log-level = warn\n");
    auto from_file = parse({"--config", file});
    ASSERT_TRUE(from_file) << describe(from_file.error());
    EXPECT_EQ(from_file->config.state_dir, "/file/state");
    EXPECT_EQ(from_file->config.runtime_dir, "/file/run");
    EXPECT_EQ(from_file->config.log_level, spdlog::level::warn);
    EXPECT_EQ(from_file->config.config_file, file);

    // Flags win, wherever they stand relative to --config.
    auto flags = parse({"--log-level=debug", "--config=" + file, "--state-dir", "/flag/state"});
    ASSERT_TRUE(flags) << describe(flags.error());
    EXPECT_EQ(flags->config.state_dir, "/flag/state");
    EXPECT_EQ(flags->config.runtime_dir, "/file/run");
    EXPECT_EQ(flags->config.log_level, spdlog::level::debug);

    // What the file leaves out comes from the defaults.
    const auto partial = write("partial.conf", "log-level = error\n");
    auto p = parse({"--config", partial});
    ASSERT_TRUE(p) << describe(p.error());
    EXPECT_EQ(p->config.state_dir, "/home/u/.local/state/qmachined");
    EXPECT_EQ(p->config.log_level, spdlog::level::err);
}

TEST_F(ConfigFileTest, FileReplacesAMissingDefault)
{
    const auto file = write("q.conf", "runtime-dir = /file/run\n");
    auto r = parse({"--config", file}, env({{"HOME", "/home/u"}}));
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(r->config.runtime_dir, "/file/run");
}

TEST_F(ConfigFileTest, ErrorsInTheFileNameItAndTheLine)
{
    const auto file = write("q.conf", "log-level = info\nwhat = ever\n");
    EXPECT_EQ(error_of(parse({"--config", file})), file + ":2: unknown key 'what'");
}

TEST_F(ConfigFileTest, UnreadableFile)
{
    const auto missing = (dir_ / "missing.conf").string();
    auto r = parse({"--config", missing});
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::system_error)) << describe(r.error());
    EXPECT_EQ(r.error().message,
              "cannot read config file '" + missing + "': No such file or directory");

    Config c;
    auto d = apply_config_file(c, dir_.string());
    ASSERT_FALSE(d);
    EXPECT_TRUE(d.error().is(errc::system_error)) << describe(d.error());
    EXPECT_NE(d.error().message.find("Is a directory"), std::string::npos) << d.error().message;
}

TEST_F(ConfigFileTest, RelativeConfigFlagIsMadeAbsolute)
{
    auto r = parse({"--config", "no-such.conf"});
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message.find("'" + cwd_join("no-such.conf") + "'"), std::string::npos)
        << r.error().message;
}

TEST_F(ConfigFileTest, EnsurePrivateDirCreatesNestedDirectories0700)
{
    const auto target = dir_ / "a" / "b" / "c";
    auto r = ensure_private_dir(target.string());
    ASSERT_TRUE(r) << describe(r.error());
    for (const auto& p : {dir_ / "a", dir_ / "a" / "b", target}) {
        EXPECT_TRUE(fs::is_directory(p)) << p;
        EXPECT_EQ(mode_of(p), 0700u) << p;
    }
    // Again: nothing to do, still fine.
    EXPECT_TRUE(ensure_private_dir(target.string() + "/"));
    EXPECT_EQ(mode_of(target), 0700u);
}

TEST_F(ConfigFileTest, EnsurePrivateDirIgnoresTheUmask)
{
    const mode_t old = ::umask(0777);
    auto r = ensure_private_dir((dir_ / "x" / "y").string());
    ::umask(old);
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(mode_of(dir_ / "x"), 0700u);
    EXPECT_EQ(mode_of(dir_ / "x" / "y"), 0700u);
}

TEST_F(ConfigFileTest, EnsurePrivateDirTightensLoosePermissions)
{
    // Capture spdlog's output to see the warning.
    auto sink = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(16);
    sink->set_pattern("%l %v");
    auto previous = spdlog::default_logger();
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("config_test", sink));

    const auto loose = dir_ / "loose";
    fs::create_directory(loose);
    ::chmod(loose.c_str(), 0755);
    auto r = ensure_private_dir(loose.string());
    const auto first = sink->last_formatted();

    const auto strict = dir_ / "strict";
    fs::create_directory(strict);
    ::chmod(strict.c_str(), 0500); // too strict to work in: fixed, but no warning
    auto s = ensure_private_dir(strict.string());
    const auto second = sink->last_formatted();
    spdlog::set_default_logger(previous);

    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(mode_of(loose), 0700u);
    ASSERT_EQ(first.size(), 1u);
    EXPECT_EQ(first[0].substr(0, first[0].find_last_not_of("\r\n") + 1),
              "warning Tightened the permissions of '" + loose.string() + "' from 0755 to 0700");

    ASSERT_TRUE(s) << describe(s.error());
    EXPECT_EQ(mode_of(strict), 0700u);
    EXPECT_EQ(second.size(), 1u); // still only the first warning
}

TEST_F(ConfigFileTest, EnsurePrivateDirRefusesAFile)
{
    const auto file = write("plain", "x");
    auto r = ensure_private_dir(file);
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::system_error)) << describe(r.error());
    EXPECT_EQ(r.error().message, "'" + file + "' exists and is not a directory");

    // A file where a parent should be.
    auto below = ensure_private_dir(file + "/sub/dir");
    ASSERT_FALSE(below);
    EXPECT_NE(below.error().message.find(file + "/sub"), std::string::npos)
        << below.error().message;
    EXPECT_NE(below.error().message.find("Not a directory"), std::string::npos)
        << below.error().message;
}

TEST_F(ConfigFileTest, EnsurePrivateDirRefusesAnotherUsersDirectory)
{
    std::string other_dir;
    uid_t other = 0;
    if (::geteuid() == 0) {
        other_dir = (dir_ / "theirs").string();
        fs::create_directory(other_dir);
        other = 65534; // nobody
        ASSERT_EQ(::chown(other_dir.c_str(), other, other), 0);
        ::chmod(other_dir.c_str(), 0755);
    } else {
        other_dir = "/"; // root's: refused before anything is changed
    }
    auto r = ensure_private_dir(other_dir);
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::system_error)) << describe(r.error());
    EXPECT_EQ(r.error().message, "'" + other_dir + "' is owned by uid " + std::to_string(other) +
                                     ", not by uid " + std::to_string(::geteuid()));
    if (::geteuid() == 0) {
        EXPECT_EQ(mode_of(other_dir), 0755u); // left alone
    }
}

TEST_F(ConfigFileTest, EnsurePrivateDirFollowsASymlinkToADirectory)
{
    fs::create_directory(dir_ / "real");
    ::chmod((dir_ / "real").c_str(), 0700);
    fs::create_directory_symlink(dir_ / "real", dir_ / "link");
    auto r = ensure_private_dir((dir_ / "link").string());
    EXPECT_TRUE(r) << describe(r.error());
}

TEST(RestSettingsTest, DefaultsFollowTheDirectories)
{
    auto r = parse({"--state-dir", "/s", "--runtime-dir", "/r"});
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(rest_socket_path(r->config), "/r/qmachined.sock");
    EXPECT_EQ(rest_token_path(r->config), "/s/rest.token");
    EXPECT_EQ(r->config.rest_listen, "");
    EXPECT_FALSE(r->config.rest_allow_remote);
    EXPECT_EQ(r->config.rest_max_connections, 1024u);
    EXPECT_EQ(r->config.rest_max_body, 1024u * 1024u);
    EXPECT_EQ(r->config.rest_request_timeout, std::chrono::milliseconds(30000));
}

TEST(RestSettingsTest, FlagsInBothSpellings)
{
    auto r = parse({"--rest-socket=/x/api.sock", "--rest-listen", "127.0.0.1:8080",
                    "--rest-token-file", "tok", "--rest-max-connections=10",
                    "--rest-max-body", "4096", "--rest-request-timeout=0.5"});
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(rest_socket_path(r->config), "/x/api.sock");
    EXPECT_EQ(r->config.rest_listen, "127.0.0.1:8080");
    EXPECT_EQ(rest_token_path(r->config), cwd_join("tok"));
    EXPECT_EQ(r->config.rest_max_connections, 10u);
    EXPECT_EQ(r->config.rest_max_body, 4096u);
    EXPECT_EQ(r->config.rest_request_timeout, std::chrono::milliseconds(500));
    auto none = parse({"--rest-socket", "none"});
    ASSERT_TRUE(none);
    EXPECT_EQ(none->config.rest_max_header, 16u * 1024u);
    EXPECT_EQ(none->config.qmp_max_message, 16u << 20);
    EXPECT_EQ(none->config.event_rate, 200.0);
    EXPECT_EQ(none->config.event_burst, 400.0);
    auto limits = parse({"--rest-max-header=2048", "--qmp-max-message", "65536",
                         "--event-rate=10", "--event-burst", "20"});
    ASSERT_TRUE(limits) << describe(limits.error());
    EXPECT_EQ(limits->config.rest_max_header, 2048u);
    EXPECT_EQ(limits->config.qmp_max_message, 65536u);
    EXPECT_EQ(limits->config.event_rate, 10.0);
    EXPECT_EQ(limits->config.event_burst, 20.0);
    none = parse({"--rest-socket", "none"});
    ASSERT_TRUE(none);
    EXPECT_EQ(rest_socket_path(none->config), "");
}

TEST(RestSettingsTest, RemoteAddressesNeedTheirOwnFlag)
{
    EXPECT_EQ(error_of(parse({"--rest-listen", "0.0.0.0:8080"})),
              "rest-listen: 0.0.0.0 is not a loopback address; add --rest-allow-remote to accept "
              "connections from other hosts");
    auto allowed = parse({"--rest-listen", "0.0.0.0:8080", "--rest-allow-remote"});
    ASSERT_TRUE(allowed) << describe(allowed.error());
    EXPECT_TRUE(allowed->config.rest_allow_remote);
    EXPECT_TRUE(parse({"--rest-listen", "[::1]:8080"}));
}

TEST(RestSettingsTest, BadValuesAreRefusedWithTheirKey)
{
    const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
        {{"--rest-listen", "localhost:80"},
         "--rest-listen: 'localhost' is not an IP address (names are not resolved)"},
        {{"--rest-listen", "127.0.0.1"},
         "--rest-listen: '127.0.0.1' is not ADDRESS:PORT (for example 127.0.0.1:8080)"},
        {{"--rest-listen", "127.0.0.1:70000"}, "--rest-listen: '127.0.0.1:70000' has no valid port"},
        {{"--rest-max-connections", "0"},
         "--rest-max-connections: '0' is not a whole number from 1 to 1000000"},
        {{"--rest-max-body", "12x"},
         "--rest-max-body: '12x' is not a whole number from 1024 to 1073741824"},
        {{"--rest-request-timeout", "0"},
         "--rest-request-timeout: '0' is not a number of seconds from 0.05 to 3600"},
        {{"--rest-allow-remote=maybe"}, "--rest-allow-remote: 'maybe' is not true or false"},
        {{"--rest-max-header", "512"},
         "--rest-max-header: '512' is not a whole number from 1024 to 1048576"},
        {{"--qmp-max-message", "1k"},
         "--qmp-max-message: '1k' is not a whole number from 65536 to 1073741824"},
        {{"--event-rate", "0"}, "--event-rate: '0' is not a whole number from 1 to 1000000"},
        {{"--event-burst=-1"}, "--event-burst: '-1' is not a whole number from 1 to 1000000"},
    };
    for (const auto& [args, message] : cases) {
        EXPECT_EQ(error_of(parse(args)), message);
    }
}

TEST(RestSettingsTest, TheFileTakesTheSameKeys)
{
    Config c;
    const std::string text = "rest-socket = /run/q/api.sock\n"
                             "rest-listen = 127.0.0.1:9000\n"
                             "rest-max-body = 2048\n"
                             "rest-allow-remote = no\n";
    auto r = apply_config_text(c, text, "q.conf");
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(c.rest_socket, "/run/q/api.sock");
    EXPECT_EQ(c.rest_listen, "127.0.0.1:9000");
    EXPECT_EQ(c.rest_max_body, 2048u);
    auto bad = apply_config_text(c, "rest-token-file = tok\n", "q.conf");
    ASSERT_FALSE(bad);
    EXPECT_EQ(bad.error().message, "q.conf:1: rest-token-file: 'tok' is not an absolute path");
    auto bad_number = apply_config_text(c, "rest-max-connections = -1\n", "q.conf");
    ASSERT_FALSE(bad_number);
    EXPECT_EQ(bad_number.error().message,
              "q.conf:1: rest-max-connections: '-1' is not a whole number from 1 to 1000000");
}

TEST(MachineSettingsTest, Defaults)
{
    auto r = parse({});
    ASSERT_TRUE(r) << describe(r.error());
    const Config& c = r->config;
    EXPECT_EQ(c.shutdown_policy, ShutdownPolicy::leave_running);
    EXPECT_EQ(c.qemu_user, "qmachined-qemu");
    EXPECT_TRUE(c.qemu_sandbox);
    EXPECT_EQ(c.qemu_log_max, 1048576u);
    EXPECT_TRUE(c.qmp_allow.empty());
    EXPECT_TRUE(c.qmp_deny.empty());
    const QmpPolicy policy = qmp_policy(c);
    EXPECT_TRUE(policy.allow.empty());
    EXPECT_TRUE(policy.deny.empty());
    EXPECT_STREQ(to_string(ShutdownPolicy::leave_running), "leave-running");
    EXPECT_STREQ(to_string(ShutdownPolicy::stop_machines), "stop-machines");
}

TEST(MachineSettingsTest, FlagsInBothSpellings)
{
    for (const auto& args : std::vector<std::vector<std::string>>{
             {"--shutdown-policy", "stop-machines", "--qemu-user", "kvm", "--qemu-sandbox", "off",
              "--qemu-log-max", "0", "--qmp-allow", "human-monitor-command,getfd", "--qmp-deny",
              "quit"},
             {"--shutdown-policy=stop-machines", "--qemu-user=kvm", "--qemu-sandbox=off",
              "--qemu-log-max=0", "--qmp-allow=human-monitor-command, getfd", "--qmp-deny=quit"},
         }) {
        SCOPED_TRACE(testing::PrintToString(args));
        auto r = parse(args);
        ASSERT_TRUE(r) << describe(r.error());
        const Config& c = r->config;
        EXPECT_EQ(c.shutdown_policy, ShutdownPolicy::stop_machines);
        EXPECT_EQ(c.qemu_user, "kvm");
        EXPECT_FALSE(c.qemu_sandbox);
        EXPECT_EQ(c.qemu_log_max, 0u);
        EXPECT_EQ(c.qmp_allow, (std::vector<std::string>{"human-monitor-command", "getfd"}));
        EXPECT_EQ(c.qmp_deny, (std::vector<std::string>{"quit"}));
    }
    auto on = parse({"--qemu-sandbox", "on", "--shutdown-policy", "leave-running",
                     "--qemu-log-max", "4096", "--qemu-user", "qemu_2.x"});
    ASSERT_TRUE(on) << describe(on.error());
    EXPECT_TRUE(on->config.qemu_sandbox);
    EXPECT_EQ(on->config.shutdown_policy, ShutdownPolicy::leave_running);
    EXPECT_EQ(on->config.qemu_log_max, 4096u);
    EXPECT_EQ(on->config.qemu_user, "qemu_2.x");
}

TEST(MachineSettingsTest, EmptyValuesWhereTheyMeanSomething)
{
    // An empty qemu-user: QEMU runs as qmachined's own user; an empty list: no command.
    for (const auto& args : std::vector<std::vector<std::string>>{
             {"--qemu-user=", "--qmp-allow=", "--qmp-deny="},
             {"--qemu-user", "", "--qmp-allow", "", "--qmp-deny", ""},
             {"--qmp-allow=getfd", "--qmp-deny", "quit", "--qemu-user=", "--qmp-allow", " ",
              "--qmp-deny="},
         }) {
        SCOPED_TRACE(testing::PrintToString(args));
        auto r = parse(args);
        ASSERT_TRUE(r) << describe(r.error());
        EXPECT_EQ(r->config.qemu_user, "");
        EXPECT_TRUE(r->config.qmp_allow.empty());
        EXPECT_TRUE(r->config.qmp_deny.empty());
    }
    // A missing value is still missing, and the other keys need one.
    for (const char* flag : {"--qemu-user", "--qmp-allow", "--qmp-deny", "--shutdown-policy",
                             "--qemu-sandbox", "--qemu-log-max"}) {
        const std::string want = std::string("option '") + flag + "' needs a value";
        EXPECT_EQ(error_of(parse({flag})), want);
        EXPECT_EQ(error_of(parse({flag, "--log-level", "info"})), want);
    }
    for (const char* flag : {"--shutdown-policy", "--qemu-sandbox", "--qemu-log-max"}) {
        EXPECT_EQ(error_of(parse({std::string(flag) + "="})),
                  std::string("option '") + flag + "' needs a value");
    }
}

TEST(MachineSettingsTest, TheLastFlagWins)
{
    auto r = parse({"--qmp-allow", "human-monitor-command", "--qmp-allow", "getfd,add-fd",
                    "--qmp-deny=quit", "--qmp-deny=stop", "--shutdown-policy=stop-machines",
                    "--shutdown-policy=leave-running", "--qemu-user=a", "--qemu-user=b"});
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(r->config.qmp_allow, (std::vector<std::string>{"getfd", "add-fd"}));
    EXPECT_EQ(r->config.qmp_deny, (std::vector<std::string>{"stop"}));
    EXPECT_EQ(r->config.shutdown_policy, ShutdownPolicy::leave_running);
    EXPECT_EQ(r->config.qemu_user, "b");
    // A name given twice in one list counts once.
    auto twice = parse({"--qmp-deny", "quit,stop,quit"});
    ASSERT_TRUE(twice) << describe(twice.error());
    EXPECT_EQ(twice->config.qmp_deny, (std::vector<std::string>{"quit", "stop"}));
}

TEST(MachineSettingsTest, BadValuesAreRefusedWithTheirKey)
{
    const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
        {{"--shutdown-policy", "stop"},
         "--shutdown-policy: 'stop' is not one of leave-running, stop-machines"},
        {{"--shutdown-policy=Leave-Running"},
         "--shutdown-policy: 'Leave-Running' is not one of leave-running, stop-machines"},
        {{"--qemu-sandbox", "yes"}, "--qemu-sandbox: 'yes' is not on or off"},
        {{"--qemu-sandbox=ON"}, "--qemu-sandbox: 'ON' is not on or off"},
        {{"--qemu-log-max", "1M"},
         "--qemu-log-max: '1M' is not a whole number from 0 to 1099511627776"},
        {{"--qemu-log-max", "1099511627777"},
         "--qemu-log-max: '1099511627777' is not a whole number from 0 to 1099511627776"},
        {{"--qemu-log-max=1.5"},
         "--qemu-log-max: '1.5' is not a whole number from 0 to 1099511627776"},
        {{"--qemu-user", "qemu user"},
         "--qemu-user: 'qemu user' is not a user name (letters, digits, '.', '_' and '-', not "
         "first)"},
        {{"--qemu-user=a/b"},
         "--qemu-user: 'a/b' is not a user name (letters, digits, '.', '_' and '-', not first)"},
        {{"--qemu-user=-x"},
         "--qemu-user: '-x' is not a user name (letters, digits, '.', '_' and '-', not first)"},
        {{"--qmp-allow", "human-monitor-command;getfd"},
         "--qmp-allow: 'human-monitor-command;getfd' is not a QMP command name (letters, digits, "
         "'-' and '_')"},
        {{"--qmp-allow", "getfd,,add-fd"},
         "--qmp-allow: '' is not a QMP command name (letters, digits, '-' and '_')"},
        {{"--qmp-deny", "quit,"},
         "--qmp-deny: '' is not a QMP command name (letters, digits, '-' and '_')"},
        {{"--qmp-deny", "system reset"},
         "--qmp-deny: 'system reset' is not a QMP command name (letters, digits, '-' and '_')"},
    };
    for (const auto& [args, message] : cases) {
        auto r = parse(args);
        ASSERT_FALSE(r) << testing::PrintToString(args);
        EXPECT_TRUE(r.error().is(errc::invalid_argument)) << describe(r.error());
        EXPECT_EQ(r.error().message, message);
    }
}

TEST_F(ConfigFileTest, MachineSettingsFromTheFileUnderTheFlags)
{
    const auto file = write("q.conf", "shutdown-policy = stop-machines\n"
                                      "qemu-user =   # QEMU as qmachined's own user\n"
                                      "qemu-sandbox = off\n"
                                      "qemu-log-max = 65536\n"
                                      "qmp-allow = human-monitor-command, migrate\n"
                                      "qmp-deny = quit\n");
    auto r = parse({"--config", file});
    ASSERT_TRUE(r) << describe(r.error());
    const Config& c = r->config;
    EXPECT_EQ(c.shutdown_policy, ShutdownPolicy::stop_machines);
    EXPECT_EQ(c.qemu_user, "");
    EXPECT_FALSE(c.qemu_sandbox);
    EXPECT_EQ(c.qemu_log_max, 65536u);
    EXPECT_EQ(c.qmp_allow, (std::vector<std::string>{"human-monitor-command", "migrate"}));
    EXPECT_EQ(c.qmp_deny, (std::vector<std::string>{"quit"}));

    // The policy those make.
    const QmpPolicy policy = qmp_policy(c);
    EXPECT_EQ(policy.allow, c.qmp_allow);
    EXPECT_EQ(policy.deny, c.qmp_deny);
    EXPECT_TRUE(policy.check("human-monitor-command", nullptr));
    auto quit = policy.check("quit", nullptr);
    ASSERT_FALSE(quit);
    EXPECT_TRUE(quit.error().is(errc::forbidden));
    EXPECT_FALSE(policy.check("getfd", nullptr));

    // Flags win.
    auto flags = parse({"--config", file, "--qmp-allow=", "--qemu-user", "nobody",
                        "--shutdown-policy=leave-running"});
    ASSERT_TRUE(flags) << describe(flags.error());
    EXPECT_TRUE(flags->config.qmp_allow.empty());
    EXPECT_EQ(flags->config.qmp_deny, (std::vector<std::string>{"quit"}));
    EXPECT_EQ(flags->config.qemu_user, "nobody");
    EXPECT_EQ(flags->config.shutdown_policy, ShutdownPolicy::leave_running);
    EXPECT_FALSE(flags->config.qemu_sandbox);
}

TEST(MachineSettingsTest, BadValuesInTheFileNameTheLine)
{
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"shutdown-policy = never\n",
         "q.conf:1: shutdown-policy: 'never' is not one of leave-running, stop-machines"},
        {"# c\nqemu-sandbox = 1\n", "q.conf:2: qemu-sandbox: '1' is not on or off"},
        {"qemu-sandbox =\n", "q.conf:1: qemu-sandbox: needs a value"},
        {"qemu-log-max = -1\n",
         "q.conf:1: qemu-log-max: '-1' is not a whole number from 0 to 1099511627776"},
        {"qmp-allow = human-monitor-command getfd\n",
         "q.conf:1: qmp-allow: 'human-monitor-command getfd' is not a QMP command name (letters, "
         "digits, '-' and '_')"},
        {"qemu-user = a b\n",
         "q.conf:1: qemu-user: 'a b' is not a user name (letters, digits, '.', '_' and '-', not "
         "first)"},
    };
    for (const auto& [text, message] : cases) {
        Config c;
        auto r = apply_config_text(c, text, "q.conf");
        ASSERT_FALSE(r) << text;
        EXPECT_TRUE(r.error().is(errc::invalid_argument)) << describe(r.error());
        EXPECT_EQ(r.error().message, message);
        EXPECT_EQ(c.qemu_user, "qmachined-qemu") << "a failed file changes nothing: " << text;
    }
}

// systemd's StateDirectory= and RuntimeDirectory= say where (one directory each; a list is not
// ours to choose from); for root and for a user.
TEST(DefaultConfigTest, UnitDirectoriesFromTheServiceManager)
{
    for (bool root : {true, false}) {
        auto c = default_config(root, env({{"HOME", "/home/u"},
                                           {"XDG_RUNTIME_DIR", "/run/user/1000"},
                                           {"STATE_DIRECTORY", "/var/lib/other/"},
                                           {"RUNTIME_DIRECTORY", "/run/other"}}));
        ASSERT_TRUE(c) << describe(c.error());
        EXPECT_EQ(c->state_dir, "/var/lib/other");
        EXPECT_EQ(c->runtime_dir, "/run/other");
    }
    auto listed = default_config(true, env({{"STATE_DIRECTORY", "/var/lib/a:/var/lib/b"},
                                            {"RUNTIME_DIRECTORY", "relative"}}));
    ASSERT_TRUE(listed) << describe(listed.error());
    EXPECT_EQ(listed->state_dir, "/var/lib/qmachined");
    EXPECT_EQ(listed->runtime_dir, "/run/qmachined");
}

TEST(MachineSettingsTest, ImageDirectories)
{
    // The default: root's image directory; none for a user.
    auto root = parse_command_line({}, true, env({}));
    ASSERT_TRUE(root) << describe(root.error());
    EXPECT_EQ(root->config.image_dirs, std::vector<std::string>{"/var/lib/qmachined-images"});
    auto user = parse({});
    ASSERT_TRUE(user) << describe(user.error());
    EXPECT_TRUE(user->config.image_dirs.empty());

    auto r = parse({"--image-dirs", " /srv/images/ , /home/vm//disks,/srv/images"});
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(r->config.image_dirs, (std::vector<std::string>{"/srv/images", "/home/vm/disks"}));
    auto none = parse_command_line({"--image-dirs="}, true, env({}));
    ASSERT_TRUE(none) << describe(none.error());
    EXPECT_TRUE(none->config.image_dirs.empty());

    // What a unit file's ReadWritePaths= could not carry as it is.
    for (const auto& [value, why] : std::vector<std::pair<std::string, std::string>>{
             {"images", "'images' is not an absolute path"},
             {"/srv/my images", "'/srv/my images' has a character"},
             {"/srv/100%", "'/srv/100%' has a character"},
             {"/srv/\"x\"", "has a character"},
             {"/srv/a\\b", "has a character"},
             {"/srv/a\tb", "has a character"},
             {"/srv/a,", "'' is not an absolute path"}}) {
        auto bad = parse({"--image-dirs", value});
        EXPECT_NE(error_of(bad).find("--image-dirs: " + std::string()), std::string::npos)
            << value << ": " << error_of(bad);
        EXPECT_NE(error_of(bad).find(why), std::string::npos) << value << ": " << error_of(bad);
    }
    Config c = parse({})->config;
    auto file = apply_config_text(c, "image-dirs = /a, /b\n", "q.conf");
    ASSERT_TRUE(file) << describe(file.error());
    EXPECT_EQ(c.image_dirs, (std::vector<std::string>{"/a", "/b"}));
    auto bad_file = apply_config_text(c, "\nimage-dirs = /a b\n", "q.conf");
    ASSERT_FALSE(bad_file);
    EXPECT_NE(bad_file.error().message.find("q.conf:2: image-dirs: '/a b'"), std::string::npos)
        << bad_file.error().message;
}

TEST(MachineSettingsTest, LogLevelFlagIsRemembered)
{
    auto r = parse({"--log-level", "warn"});
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_TRUE(r->config.log_level_from_flag);
    auto d = parse({});
    ASSERT_TRUE(d) << describe(d.error());
    EXPECT_FALSE(d->config.log_level_from_flag);
}

// The runtime directory of a root daemon: 0710 with the administrators' group.
TEST_F(ConfigFileTest, EnsurePrivateDirWithAGroup)
{
    const auto shared = dir_ / "shared";
    const gid_t group = ::getegid() == 0 ? 4242 : ::getegid(); // root may give any group
    auto r = ensure_private_dir(shared.string(), group);
    ASSERT_TRUE(r) << describe(r.error());
    struct stat st {};
    ASSERT_EQ(::stat(shared.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0710u);
    EXPECT_EQ(st.st_gid, group);
    // Looser bits go; without the group it is private again.
    ::chmod(shared.c_str(), 0775);
    ASSERT_TRUE(ensure_private_dir(shared.string(), group));
    EXPECT_EQ(mode_of(shared), 0710u);
    ASSERT_TRUE(ensure_private_dir(shared.string()));
    EXPECT_EQ(mode_of(shared), 0700u);
}

TEST(UsageTest, MentionsEveryFlagAndTheDefaults)
{
    const std::string text = usage();
    for (const char* word : {"--state-dir",
                             "--runtime-dir",
                             "--log-level",
                             "--config",
                             "--help",
                             "-h",
                             "--version",
                             "--rest-socket",
                             "--rest-listen",
                             "--rest-allow-remote",
                             "--rest-token-file",
                             "--rest-max-connections",
                             "--rest-max-body",
                             "--rest-request-timeout",
                             "--shutdown-policy",
                             "leave-running",
                             "stop-machines",
                             "--qemu-user",
                             "qmachined-qemu",
                             "--qemu-sandbox",
                             "--qemu-log-max",
                             "1048576",
                             "--qmp-allow",
                             "--qmp-deny",
                             "human-monitor-command",
                             "getfd",
                             "add-fd",
                             "migrate-incoming to exec:",
                             "/var/lib/qmachined",
                             "/run/qmachined",
                             "$XDG_STATE_HOME/qmachined",
                             "$HOME/.local/state/qmachined",
                             "$XDG_RUNTIME_DIR/qmachined",
                             "trace",
                             "debug",
                             "info",
                             "warn",
                             "error",
                             "critical",
                             "off",
                             "0700"}) {
        EXPECT_NE(text.find(word), std::string::npos) << word;
    }
    // Every line fits a terminal.
    std::size_t start = 0;
    while (start < text.size()) {
        const auto end = text.find('\n', start);
        const auto line = text.substr(start, end - start);
        EXPECT_LE(line.size(), 100u) << line;
        start = end == std::string::npos ? text.size() : end + 1;
    }
}

} // namespace
} // namespace qm::daemon
