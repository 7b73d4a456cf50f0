// SPDX-License-Identifier: GPL-2.0-or-later
// Tests of daemon/supervisor/qmp_policy: the default deny set, exec: URIs of migrate and
// migrate-incoming, qmp-allow and qmp-deny, the messages, and command name validation.
#include "daemon/supervisor/qmp_policy.hpp"

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "libmachine/json.hpp"

namespace qm::daemon {
namespace {

// "OK" or "<errc>: <message>" of checking `command` with `arguments` (JSON text; empty: none).
std::string verdict(const QmpPolicy& policy, const std::string& command,
                    const std::string& arguments = {})
{
    std::optional<json::Document> args;
    if (!arguments.empty()) {
        auto parsed = json::parse(arguments);
        EXPECT_TRUE(parsed) << arguments;
        if (!parsed) {
            return "bad test JSON";
        }
        args = std::move(*parsed);
    }
    auto r = policy.check(command, args ? &static_cast<const json::Value&>(*args) : nullptr);
    if (r) {
        return "OK";
    }
    return std::string(to_string(static_cast<errc>(r.error().code.value()))) + ": " +
           r.error().message;
}

TEST(QmpPolicy, DefaultDenySetIsSortedAndAsDocumented)
{
    const auto set = default_denied_qmp_commands();
    std::vector<std::string> names;
    for (const auto& d : set) {
        names.emplace_back(d.command);
        EXPECT_FALSE(d.why.empty()) << d.command;
        EXPECT_TRUE(valid_qmp_command_name(d.command)) << d.command;
    }
    EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
    EXPECT_EQ(names, (std::vector<std::string>{"add-fd", "getfd", "human-monitor-command",
                                               "migrate", "migrate-incoming"}));
}

TEST(QmpPolicy, DefaultDeniesWhatGivesTheHostAway)
{
    const QmpPolicy policy;
    struct Case
    {
        std::string command;
        std::string arguments;
        std::string want;
    };
    const std::vector<Case> cases{
        {"human-monitor-command", R"({"command-line": "info version"})",
         "forbidden: QMP command 'human-monitor-command' is denied by qmachined's policy "
         "(qmp-allow lifts it)"},
        {"human-monitor-command", "",
         "forbidden: QMP command 'human-monitor-command' is denied by qmachined's policy "
         "(qmp-allow lifts it)"},
        {"getfd", R"({"fdname": "x"})",
         "forbidden: QMP command 'getfd' is denied by qmachined's policy (qmp-allow lifts it)"},
        {"add-fd", "",
         "forbidden: QMP command 'add-fd' is denied by qmachined's policy (qmp-allow lifts it)"},
        {"migrate", R"({"uri": "exec:cat > /tmp/x"})",
         "forbidden: QMP command 'migrate' with an exec: URI is denied by qmachined's policy: it "
         "runs a program on the host (qmp-allow lifts it)"},
        {"migrate-incoming", R"({"uri": "exec:sh -c id"})",
         "forbidden: QMP command 'migrate-incoming' with an exec: URI is denied by qmachined's "
         "policy: it runs a program on the host (qmp-allow lifts it)"},
        // QEMU 8.2+ spells it as a channel.
        {"migrate", R"({"channels": [{"channel-type": "main", "addr": {"transport": "exec",
                        "args": ["sh", "-c", "id"]}}]})",
         "forbidden: QMP command 'migrate' with an exec: URI is denied by qmachined's policy: it "
         "runs a program on the host (qmp-allow lifts it)"},
    };
    for (const auto& c : cases) {
        SCOPED_TRACE(c.command + " " + c.arguments);
        EXPECT_EQ(verdict(policy, c.command, c.arguments), c.want);
    }
}

TEST(QmpPolicy, NearMissesPass)
{
    const QmpPolicy policy;
    for (const auto& [command, arguments] : std::vector<std::pair<std::string, std::string>>{
             {"query-status", ""},
             {"query-status", "{}"},
             {"stop", ""},
             {"quit", ""},
             {"migrate", R"({"uri": "tcp:127.0.0.1:4444"})"},
             {"migrate", R"({"uri": "unix:/run/x.sock"})"},
             {"migrate", R"({"uri": " exec:x"})"}, // QEMU matches the prefix exactly
             {"migrate", R"({"uri": "EXEC:x"})"},
             {"migrate", ""},
             {"migrate", R"({"uri": 5})"},
             {"migrate", R"({"channels": [{"addr": {"transport": "socket"}}]})"},
             {"migrate",
              R"({"channels": {"addr": {"transport": "exec"}}})"}, // not a list: QEMU refuses it
             {"migrate-incoming", R"({"uri": "defer"})"},
             {"migrate-set-parameters", R"({"uri": "exec:x"})"},
             {"migrate_incoming", R"({"uri": "exec:x"})"}, // no such command: QEMU refuses it
             {"human_monitor_command", ""},
             {"Human-Monitor-Command", ""},
             {"closefd", R"({"fdname": "x"})"},
             {"remove-fd", R"({"fdset-id": 1})"},
             {"query-fdsets", ""},
         }) {
        SCOPED_TRACE(command + " " + arguments);
        EXPECT_EQ(verdict(policy, command, arguments), "OK");
    }
}

TEST(QmpPolicy, AllowLiftsADefault)
{
    QmpPolicy policy;
    policy.allow = {"human-monitor-command", "migrate"};
    EXPECT_EQ(verdict(policy, "human-monitor-command", R"({"command-line": "info version"})"),
              "OK");
    EXPECT_EQ(verdict(policy, "migrate", R"({"uri": "exec:cat > /dev/null"})"), "OK");
    // Only what is named.
    EXPECT_NE(verdict(policy, "getfd"), "OK");
    EXPECT_NE(verdict(policy, "migrate-incoming", R"({"uri": "exec:true"})"), "OK");
    // Allowing a command that is not denied changes nothing.
    policy.allow.push_back("query-status");
    EXPECT_EQ(verdict(policy, "query-status"), "OK");
}

TEST(QmpPolicy, DenyAddsCommandsAndWinsOverAllow)
{
    QmpPolicy policy;
    policy.deny = {"quit", "system_reset"};
    EXPECT_EQ(verdict(policy, "quit"),
              "forbidden: QMP command 'quit' is denied by qmachined's policy (qmp-deny)");
    EXPECT_EQ(verdict(policy, "system_reset"),
              "forbidden: QMP command 'system_reset' is denied by qmachined's policy (qmp-deny)");
    EXPECT_EQ(verdict(policy, "query-status"), "OK");
    EXPECT_EQ(verdict(policy, "system-reset"), "OK");
    // The default set still holds.
    EXPECT_NE(verdict(policy, "getfd"), "OK");

    policy.allow = {"human-monitor-command", "quit"};
    policy.deny = {"human-monitor-command", "quit"};
    EXPECT_EQ(verdict(policy, "human-monitor-command"),
              "forbidden: QMP command 'human-monitor-command' is denied by qmachined's policy "
              "(qmp-deny)");
    EXPECT_EQ(verdict(policy, "quit"),
              "forbidden: QMP command 'quit' is denied by qmachined's policy (qmp-deny)");
}

TEST(QmpPolicy, CommandNames)
{
    for (const char* good : {"query-status", "device_add", "x", "A-Z_0-9"}) {
        EXPECT_TRUE(valid_qmp_command_name(good)) << good;
    }
    for (const char* bad : {"", "query status", "a,b", "a.b", "caf\xc3\xa9", "x\n", "'q'"}) {
        EXPECT_FALSE(valid_qmp_command_name(bad)) << bad;
    }
}

} // namespace
} // namespace qm::daemon
