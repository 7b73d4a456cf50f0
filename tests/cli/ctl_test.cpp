// SPDX-License-Identifier: GPL-2.0-or-later
// qmachinectl's pure parts without a daemon: the option parser, the URL, the escape key, the
// table, ages, the SSE parser (split at every byte) and the log increments.
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "daemon/ctl/args.hpp"
#include "daemon/ctl/client.hpp"
#include "daemon/ctl/commands.hpp"
#include "daemon/ctl/console.hpp"
#include "daemon/ctl/output.hpp"

namespace qm::ctl {
namespace {

constexpr OptionSpec table[] = {
    {"socket", 0, "PATH", ""},
    {"json", 0, "", ""},
    {"follow", 'f', "", ""},
    {"tail", 'n', "LINES", ""},
};

expected<ParsedArgs> parse(std::vector<std::string> args)
{
    const std::span<const OptionSpec> tables[] = {table};
    return parse_args(args, tables);
}

TEST(CtlArgs, OptionsAnywhereAndTheirValues)
{
    auto p = parse({"--socket", "/s", "a", "--json", "-n", "5", "b", "--tail=7", "-n3", "-f"});
    ASSERT_TRUE(p) << p.error().message;
    EXPECT_EQ(p->positional, (std::vector<std::string>{"a", "b"}));
    EXPECT_EQ(p->last("socket"), "/s");
    EXPECT_TRUE(p->has("json"));
    EXPECT_TRUE(p->has("follow"));
    EXPECT_EQ(p->all("tail"), (std::vector<std::string>{"5", "7", "3"}));
    EXPECT_EQ(p->last("tail"), "3");
    EXPECT_FALSE(p->has("frob"));
}

TEST(CtlArgs, DoubleDashEndsOptionsAndDashIsPositional)
{
    auto p = parse({"-", "--", "--json", "-f"});
    ASSERT_TRUE(p);
    EXPECT_EQ(p->positional, (std::vector<std::string>{"-", "--json", "-f"}));
    EXPECT_TRUE(p->options.empty());
}

TEST(CtlArgs, Mistakes)
{
    EXPECT_EQ(parse({"--frob"}).error().message, "unknown option '--frob'");
    EXPECT_EQ(parse({"-x"}).error().message, "unknown option '-x'");
    EXPECT_EQ(parse({"--socket"}).error().message, "option '--socket' needs a value (PATH)");
    EXPECT_EQ(parse({"--json=yes"}).error().message, "option '--json' takes no value");
    EXPECT_FALSE(parse({"-fx"}));
}

TEST(CtlArgs, FindCommandSkipsGlobalValues)
{
    const std::vector<std::string> args{"--socket", "list", "--json", "show", "x"};
    EXPECT_EQ(find_command(args, table), 3u);
    const std::vector<std::string> none{"--json"};
    EXPECT_EQ(find_command(none, table), 1u);
    const std::vector<std::string> eq{"--socket=/s", "list"};
    EXPECT_EQ(find_command(eq, table), 1u);
}

TEST(CtlArgs, Numbers)
{
    EXPECT_EQ(*parse_integer("--cpus", "4", 1, 8), 4);
    EXPECT_EQ(parse_integer("--cpus", "9", 1, 8).error().message,
              "--cpus: '9' is not a whole number from 1 to 8");
    EXPECT_FALSE(parse_integer("--cpus", "4x", 1, 8));
    EXPECT_FALSE(parse_integer("--cpus", "", 1, 8));
    EXPECT_DOUBLE_EQ(*parse_seconds("--timeout", "1.5", 0, 10), 1.5);
    EXPECT_FALSE(parse_seconds("--timeout", "nan", 0, 10));
    EXPECT_FALSE(parse_seconds("--timeout", "11", 0, 10));
    EXPECT_FALSE(parse_seconds("--timeout", "1s", 0, 10));
}

TEST(CtlClient, Urls)
{
    auto e = parse_url("http://127.0.0.1:8080");
    ASSERT_TRUE(e);
    EXPECT_EQ(e->host, "127.0.0.1");
    EXPECT_EQ(e->port, "8080");
    EXPECT_EQ(e->describe(), "http://127.0.0.1:8080");
    e = parse_url("http://[::1]:9/");
    ASSERT_TRUE(e);
    EXPECT_EQ(e->host, "::1");
    EXPECT_EQ(e->describe(), "http://[::1]:9");
    EXPECT_EQ(parse_url("http://localhost")->port, "80");
    for (const char* bad : {"https://a:1", "a:1", "http://:1", "http://a:0", "http://a:x",
                            "http://a:1/v1", "http://[::1"}) {
        EXPECT_FALSE(parse_url(bad)) << bad;
    }
}

TEST(CtlClient, ProblemDetail)
{
    Response r;
    r.status = 404;
    r.body =
        R"({"type":"urn:qmachined:error:NoSuchMachine","status":404,"detail":"no machine named 'x'"})";
    EXPECT_EQ(problem_detail(r), "no machine named 'x'");
    EXPECT_EQ(problem_name(r), "NoSuchMachine");
    r.status = 502;
    r.body = "<html>";
    EXPECT_EQ(problem_detail(r), "HTTP 502 Bad Gateway");
    EXPECT_EQ(problem_name(r), "");
}

TEST(CtlConsole, EscapeKeys)
{
    EXPECT_EQ(parse_escape("^]"), '\x1d');
    EXPECT_EQ(parse_escape("^a"), '\x01');
    EXPECT_EQ(parse_escape("^A"), '\x01');
    EXPECT_EQ(parse_escape("none"), '\0');
    EXPECT_EQ(parse_escape("x"), std::nullopt);
    EXPECT_EQ(parse_escape("^1"), std::nullopt);
}

TEST(CtlOutput, TableAlignsIgnoringColour)
{
    Table t({"NAME", "STATE"});
    t.add_row({"web1", "running"}, {std::nullopt, coloured_state("running", true)});
    t.add_row({"a-much-longer-name", "stopped"});
    EXPECT_EQ(t.render(), "NAME                STATE\n"
                          "web1                \x1b[32mrunning\x1b[0m\n"
                          "a-much-longer-name  stopped\n");
}

TEST(CtlOutput, ColourOnlyOnATerminalWithoutNoColor)
{
    EXPECT_TRUE(want_colour(true, nullptr));
    EXPECT_TRUE(want_colour(true, ""));
    EXPECT_FALSE(want_colour(true, "1"));
    EXPECT_FALSE(want_colour(false, nullptr));
    EXPECT_EQ(coloured_state("running", false), "running");
    EXPECT_EQ(coloured_state("defined", true), "defined");
    EXPECT_EQ(coloured_state("failed", true), "\x1b[1;31mfailed\x1b[0m");
}

TEST(CtlOutput, Ages)
{
    constexpr std::int64_t s = 1000000;
    EXPECT_EQ(age(0, 5 * s), "5s");
    EXPECT_EQ(age(0, 125 * s), "2m");
    EXPECT_EQ(age(0, 3600 * s), "1h");
    EXPECT_EQ(age(0, 3660 * s), "1h 1m");
    EXPECT_EQ(age(0, 90000 * s), "1d 1h");
    EXPECT_EQ(age(10 * s, 0), "0s"); // a clock that went back
}

TEST(CtlOutput, SseSplitAtEveryByte)
{
    const std::string stream =
        ": subscribed\n\nid: 3\nevent: STATE_CHANGED\ndata: {\"seq\":3}\n\n"
        ": keep-alive\r\n\r\nevent: lagged\r\ndata: {\"a\":1}\r\ndata: x\r\n\r\n"
        "data:plain\r\rid: 9\n";
    for (std::size_t split = 0; split <= stream.size(); ++split) {
        SseParser p;
        auto got = p.feed(std::string_view(stream).substr(0, split));
        auto more = p.feed(std::string_view(stream).substr(split));
        got.insert(got.end(), more.begin(), more.end());
        ASSERT_EQ(got.size(), 3u) << split;
        EXPECT_EQ(got[0].id, "3");
        EXPECT_EQ(got[0].event, "STATE_CHANGED");
        EXPECT_EQ(got[0].data, "{\"seq\":3}");
        EXPECT_EQ(got[1].event, "lagged");
        EXPECT_EQ(got[1].data, "{\"a\":1}\nx");
        EXPECT_EQ(got[2].event, "message");
        EXPECT_EQ(got[2].data, "plain");
    }
}

TEST(CtlOutput, LogIncrements)
{
    EXPECT_EQ(log_increment("", "abc"), "abc");
    EXPECT_EQ(log_increment("abc", "abcdef"), "def");
    EXPECT_EQ(log_increment("abc", "abc"), "");
    // The window moved (the log is over the answer's 1 MiB): the old answer's last 4 KiB are
    // inside the new one.
    std::string block;
    for (int i = 0; block.size() < 4096; ++i) {
        block += std::to_string(i) + "\n";
    }
    block.resize(4096);
    EXPECT_EQ(log_increment(std::string(100, 'x') + block, block.substr(0) + "new\n"), "new\n");
    // A new run's log.
    EXPECT_EQ(log_increment("old run\n", "new\n"), "new\n");
}

std::string source_file(const std::string& path)
{
    std::ifstream f(std::string(QM_SOURCE_DIR) + "/" + path);
    return std::string(std::istreambuf_iterator<char>(f), {});
}

// `word` stands alone in `text` (between white space, quotes or commas).
bool has_word(const std::string& text, const std::string& word)
{
    const auto apart = [](char c) {
        return c == ' ' || c == '\n' || c == '"' || c == ',';
    };
    for (auto at = text.find(word); at != std::string::npos; at = text.find(word, at + 1)) {
        const bool before = at == 0 || apart(text[at - 1]);
        const bool after = at + word.size() == text.size() || apart(text[at + word.size()]);
        if (before && after) {
            return true;
        }
    }
    return false;
}

// docs/cli.md and the bash completion know every command and option of the table.
TEST(CtlCommands, DocumentedAndCompleted)
{
    const std::string doc = source_file("docs/cli.md");
    const std::string bash = source_file("daemon/ctl/qmachinectl.bash");
    ASSERT_FALSE(doc.empty());
    ASSERT_FALSE(bash.empty());
    for (const auto& c : commands()) {
        const std::string name(c.name);
        if (name != "help") {
            std::string headings; // the "### " lines
            for (std::size_t at = doc.find("\n### "); at != std::string::npos;
                 at = doc.find("\n### ", at + 1)) {
                headings += doc.substr(at, doc.find('\n', at + 1) - at);
            }
            EXPECT_TRUE(has_word(headings, name)) << name << " in docs/cli.md";
        }
        EXPECT_TRUE(has_word(bash, name)) << name << " in the completion";
        EXPECT_NE(command_help(c).find("Usage: qmachinectl " + name), std::string::npos);
        for (const auto& o : c.options) {
            const std::string option = "--" + std::string(o.name);
            EXPECT_NE(doc.find(option), std::string::npos)
                << option << " of " << name << " in docs/cli.md";
            EXPECT_NE(bash.find(option), std::string::npos)
                << option << " of " << name << " in the completion";
            EXPECT_NE(command_help(c).find(option), std::string::npos);
        }
    }
    for (const auto& o : global_options()) {
        const std::string option = "--" + std::string(o.name);
        EXPECT_NE(doc.find(option), std::string::npos) << option << " in docs/cli.md";
        EXPECT_NE(bash.find(option), std::string::npos) << option << " in the completion";
    }
}

} // namespace
} // namespace qm::ctl
