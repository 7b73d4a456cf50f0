// SPDX-License-Identifier: GPL-2.0-or-later
// The cli suite: the real qmachinectl against the real qmachined (DaemonFixture): every command,
// its --json output parsed, the exit status of each kind of failure (1 operation, 2 usage, 3 no
// daemon), --help everywhere, edit through $EDITOR, and the console through a pseudo-terminal
// with the test guest.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/json.hpp"
#include "tests/daemon/machine_daemon.hpp"
#include "tests/support/daemon_process.hpp"
#include "tests/support/guest_image.hpp"

#ifndef QM_QMACHINECTL
#error "QM_QMACHINECTL (the client under test) must be defined by the build"
#endif

namespace qm::test {

// For gtest's messages (found by ADL: CommandResult is in qm::test).
std::ostream& operator<<(std::ostream& os, const CommandResult& r)
{
    return os << "exit " << r.status << "\nstdout:\n" << r.out << "\nstderr:\n" << r.err;
}

namespace {

const std::vector<std::string> all_commands{
    "list",    "show",   "create", "edit",   "start", "stop", "kill",    "pause",   "resume",
    "restart", "delete", "qmp",    "events", "wait",  "log",  "console", "version", "help"};

// Runs qmachinectl with `args` (no daemon options added).
CommandResult ctl_raw(const std::vector<std::string>& args, std::chrono::milliseconds d = 60s)
{
    std::vector<std::string> argv{QM_QMACHINECTL};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_command(argv, d);
}

json::Document parse_json(const std::string& text)
{
    auto doc = json::parse(text);
    EXPECT_TRUE(doc) << "not JSON: " << text;
    return doc ? std::move(*doc) : json::Document();
}

// The JSON lines of `text` (an object on each).
std::vector<json::Document> json_lines(const std::string& text)
{
    std::vector<json::Document> out;
    for (const auto& line : lines_with(text, "{")) {
        out.push_back(parse_json(line));
    }
    return out;
}

std::string s(const json::Value& v, std::string_view key)
{
    return std::string(json::get_string(v, key).value_or("<none>"));
}

// ---- without a daemon ------------------------------------------------------------------------

TEST(CliUsage, HelpForEveryCommandExitsZero)
{
    for (const auto& c : all_commands) {
        const auto r = ctl_raw({c, "--help"});
        EXPECT_EQ(r.status, 0) << c << ": " << r;
        EXPECT_NE(r.out.find("Usage: qmachinectl " + c), std::string::npos) << r;
        const auto h = ctl_raw({"help", c});
        EXPECT_EQ(h.status, 0) << h;
        EXPECT_EQ(h.out, r.out);
    }
    const auto top = ctl_raw({"--help"});
    EXPECT_EQ(top.status, 0);
    for (const auto& c : all_commands) {
        EXPECT_NE(top.out.find("  " + c + " "), std::string::npos) << c << " missing in\n"
                                                                   << top.out;
    }
    EXPECT_NE(top.out.find("Exit status"), std::string::npos);
    const auto v = ctl_raw({"--version"});
    EXPECT_EQ(v.status, 0);
    EXPECT_EQ(v.out, "qmachinectl 0.1.0\n");
}

TEST(CliUsage, BadUsageExitsTwo)
{
    const std::vector<std::vector<std::string>> cases{
        {},
        {"frob"},
        {"list", "--frob"},
        {"list", "extra"},
        {"show"},
        {"show", "a", "b"},
        {"qmp", "a"},
        {"qmp", "a", "query-status", "[1]"},
        {"qmp", "a", "query-status", "--timeout", "x"},
        {"stop", "a", "--mode", "gently"},
        {"stop", "a", "--timeout", "-1"},
        {"create", "a", "--cpus", "0"},
        {"create", "a", "--memory", "lots"},
        {"log", "a", "--tail", "x"},
        {"wait", "a"},
        {"wait", "a", "SHUTDOWN", "--console", "x"},
        {"wait", "a", "SHUTDOWN", "--match", "[]"},
        {"events", "--since", "-3"},
        {"console", "a", "--escape", "q"},
        {"--socket", "/s", "--url", "http://127.0.0.1:1", "list"},
        {"--url", "https://127.0.0.1:1", "list"},
        {"--socket"},
        {"help", "frob"},
    };
    for (const auto& args : cases) {
        const auto r = ctl_raw(args);
        EXPECT_EQ(r.status, 2) << testing::PrintToString(args) << ": " << r;
        EXPECT_FALSE(r.err.empty()) << testing::PrintToString(args);
        EXPECT_TRUE(r.out.empty()) << testing::PrintToString(args) << ": " << r;
    }
    EXPECT_NE(ctl_raw({"list", "--frob"}).err.find("unknown option '--frob'"), std::string::npos);
    EXPECT_NE(ctl_raw({"frob"}).err.find("unknown command 'frob'"), std::string::npos);
}

TEST(CliUsage, NoDaemonExitsThree)
{
    const std::string sock = "/nonexistent/qmachined.sock";
    const std::vector<std::vector<std::string>> cases{
        {"list"},
        {"show", "a"},
        {"create", "a"},
        {"edit", "a"},
        {"start", "a"},
        {"stop", "a"},
        {"kill", "a"},
        {"pause", "a"},
        {"resume", "a"},
        {"restart", "a"},
        {"delete", "a"},
        {"qmp", "a", "query-status"},
        {"events"},
        {"events", "-f"},
        {"wait", "a", "x"},
        {"log", "a"},
        {"log", "a", "--console", "-f"},
        {"console", "a"},
        {"version"},
    };
    for (const auto& args : cases) {
        std::vector<std::string> argv{"--socket", sock};
        argv.insert(argv.end(), args.begin(), args.end());
        const auto r = ctl_raw(argv);
        EXPECT_EQ(r.status, 3) << testing::PrintToString(args) << ": " << r;
        EXPECT_NE(r.err.find("cannot reach qmachined at " + sock), std::string::npos) << r;
    }
    // TCP: nobody listens on port 1.
    const auto tcp = ctl_raw({"--url", "http://127.0.0.1:1", "--token", "t", "list"});
    EXPECT_EQ(tcp.status, 3) << tcp;
    EXPECT_NE(tcp.err.find("http://127.0.0.1:1"), std::string::npos) << tcp;
}

TEST(CliUsage, DefaultSocketIsTheDaemonsForAUser)
{
    // A user (not root) with XDG_RUNTIME_DIR: the daemon's own default, as daemon/config.cpp
    // picks it (setpriv runs qmachinectl as nobody when the test runs as root). Unless a system
    // qmachined runs here: then a user without a daemon of their own is sent to it.
    std::vector<std::string> user{"env", "XDG_RUNTIME_DIR=/nonexistent-xdg", QM_QMACHINECTL,
                                  "list"};
    if (::geteuid() == 0) {
        user.insert(user.begin(), {"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"});
    }
    const bool system_daemon = std::filesystem::exists("/run/qmachined/qmachined.sock");
    const auto r = run_command(user);
    if (system_daemon) {
        EXPECT_EQ(r.err.find("/nonexistent-xdg"), std::string::npos) << r;
    } else {
        EXPECT_EQ(r.status, 3) << r;
        EXPECT_NE(r.err.find("/nonexistent-xdg/qmachined/qmachined.sock"), std::string::npos) << r;
    }
    const auto no_xdg = run_command({"env", "-u", "XDG_RUNTIME_DIR", QM_QMACHINECTL, "list"});
    if (::geteuid() == 0) {
        // Root: the system socket, whatever the environment.
        if (!system_daemon) {
            EXPECT_EQ(no_xdg.status, 3) << no_xdg;
            EXPECT_NE(no_xdg.err.find("/run/qmachined/qmachined.sock"), std::string::npos)
                << no_xdg;
        }
    } else if (!system_daemon) {
        EXPECT_EQ(no_xdg.status, 3) << no_xdg;
        EXPECT_NE(no_xdg.err.find("XDG_RUNTIME_DIR is not set"), std::string::npos) << no_xdg;
    }
}

// ---- with a daemon ---------------------------------------------------------------------------

class CliTest : public MachineDaemonTest
{
protected:
    void SetUp() override
    {
        MachineDaemonTest::SetUp();
        if (HasFatalFailure() || IsSkipped()) {
            return;
        }
        ASSERT_NO_FATAL_FAILURE(start_daemon());
    }

    std::vector<std::string> argv(const std::vector<std::string>& args) const
    {
        std::vector<std::string> a{QM_QMACHINECTL, "--socket", socket_path().string()};
        a.insert(a.end(), args.begin(), args.end());
        return a;
    }

    CommandResult ctl(const std::vector<std::string>& args, std::chrono::milliseconds d = 120s)
    {
        return run_command(argv(args), d);
    }

    // Runs the command and parses its stdout as one JSON document; it must exit 0.
    json::Document ctl_json(const std::vector<std::string>& args)
    {
        std::vector<std::string> a = args;
        a.push_back("--json");
        const auto r = ctl(a);
        EXPECT_EQ(r.status, 0) << testing::PrintToString(args) << ": " << r;
        return parse_json(r.out);
    }

    std::filesystem::path write_spec(const std::string& name, const std::string& spec)
    {
        const auto p = root_ / (name + ".json");
        write_whole_file(p, spec);
        return p;
    }

    // qmachinectl running in the background (events -f, log -f), its output in a file.
    std::unique_ptr<DaemonProcess> background(const std::string& name,
                                              const std::vector<std::string>& args)
    {
        auto a = argv(args);
        const std::string program = a.front();
        a.erase(a.begin());
        return std::make_unique<DaemonProcess>(program, a, root_ / (name + ".out"));
    }
};

TEST_F(CliTest, LifecycleWithJson)
{
    const auto spec = write_spec("a", quick_spec());
    json::Document created = ctl_json({"create", "a", "--spec", spec.string()});
    EXPECT_EQ(s(created, "name"), "a");
    EXPECT_EQ(s(created, "state"), "defined");
    EXPECT_EQ(json::get_int(created, "generation"), 1);

    // From the options alone, and options over a file.
    json::Document b =
        ctl_json({"create", "b", "--binary", QemuProcess::binary(), "--machine", "none", "--cpus",
                  "1", "--memory", "64", "--arg", "-nodefaults", "--arg", "-no-user-config"});
    const json::Value& bspec = *json::find(b, "spec");
    EXPECT_EQ(s(bspec, "machine"), "none");
    EXPECT_EQ(json::get_int(bspec, "cpus"), 1);
    EXPECT_EQ(json::get_int(bspec, "memory_mib"), 64);
    EXPECT_EQ(json::to_string(*json::find(bspec, "args")), R"(["-nodefaults","-no-user-config"])");
    json::Document c =
        ctl_json({"create", "c", "--spec", spec.string(), "--cpus", "3", "--autostart"});
    EXPECT_EQ(json::get_int(*json::find(c, "spec"), "cpus"), 3);
    EXPECT_TRUE(json::find(*json::find(c, "spec"), "autostart")->GetBool());

    // Human output: no colour when stdout is not a terminal.
    const auto human = ctl({"create", "d", "--spec", spec.string()});
    EXPECT_EQ(human.status, 0) << human;
    EXPECT_EQ(human.out, "Created d (defined).\n");

    json::Document list = ctl_json({"list"});
    const auto& machines = *json::find(list, "machines");
    ASSERT_EQ(machines.Size(), 4u);
    EXPECT_EQ(s(machines[0], "name"), "a");
    const auto names = ctl({"list", "--names"});
    EXPECT_EQ(names.out, "a\nb\nc\nd\n");
    const auto table = ctl({"list"});
    EXPECT_EQ(table.status, 0);
    EXPECT_TRUE(table.out.starts_with("NAME  STATE    SINCE  PID  CPUS  MEMORY  OPERATION\n"))
        << table.out;
    EXPECT_NE(table.out.find("b     defined  "), std::string::npos) << table.out;
    EXPECT_EQ(table.out.find('\x1b'), std::string::npos);

    json::Document started = ctl_json({"start", "a"});
    EXPECT_EQ(s(started, "state"), "running");
    const auto pid = json::get_int(started, "pid");
    ASSERT_TRUE(pid);
    json::Document shown = ctl_json({"show", "a"});
    EXPECT_EQ(json::get_int(shown, "pid"), pid);
    const auto show_text = ctl({"show", "a"});
    EXPECT_NE(show_text.out.find("State: running since"), std::string::npos) << show_text.out;
    EXPECT_NE(show_text.out.find(fmt::format("PID: {}", *pid)), std::string::npos);

    json::Document status = ctl_json({"qmp", "a", "query-status"});
    EXPECT_EQ(s(*json::find(status, "return"), "status"), "running");
    EXPECT_TRUE(json::get_int(status, "event_seq"));
    const auto human_qmp = ctl({"qmp", "a", "query-status"});
    EXPECT_EQ(parse_json(human_qmp.out).HasMember("status"), true) << human_qmp;
    json::Document with_args =
        ctl_json({"qmp", "a", "qom-get", R"({"path": "/machine", "property": "type"})"});
    EXPECT_TRUE(json::find(with_args, "return")) << json::to_string(with_args);

    EXPECT_EQ(s(ctl_json({"pause", "a"}), "state"), "paused");
    EXPECT_EQ(s(ctl_json({"resume", "a"}), "state"), "running");
    json::Document restarted = ctl_json({"restart", "a"});
    EXPECT_EQ(s(restarted, "state"), "running");
    EXPECT_NE(json::get_int(restarted, "pid"), pid);
    json::Document stopped = ctl_json({"stop", "a", "--mode", "quit", "--timeout", "5"});
    EXPECT_EQ(s(stopped, "state"), "stopped");
    EXPECT_EQ(s(*json::find(stopped, "stop_reason"), "kind"), "host-quit");

    // Several machines at once; the human lines.
    const auto both = ctl({"start", "a", "b"});
    EXPECT_EQ(both.status, 0) << both;
    EXPECT_NE(both.out.find("Started a: running, pid "), std::string::npos) << both;
    EXPECT_NE(both.out.find("Started b: running, pid "), std::string::npos) << both;
    json::Document killed = ctl_json({"kill", "b"});
    EXPECT_EQ(s(*json::find(killed, "stop_reason"), "kind"), "host-kill");

    // stop --all: every machine with a process, each by its spec (a and d quit at once).
    ASSERT_EQ(ctl({"start", "d"}).status, 0);
    const auto all = ctl({"stop", "--all", "--concurrency", "2"});
    EXPECT_EQ(all.status, 0) << all;
    EXPECT_EQ(all.out, "Stopped 2 machines.\n") << all;
    EXPECT_EQ(s(ctl_json({"show", "a"}), "state"), "stopped");
    EXPECT_EQ(s(ctl_json({"show", "d"}), "state"), "stopped");
    json::Document none = ctl_json({"stop", "--all"});
    EXPECT_EQ(json::find(none, "stopped")->Size(), 0u);
    for (const auto& bad : std::vector<std::vector<std::string>>{
             {"stop", "--all", "a"}, {"stop", "--all", "--mode", "quit"}, {"stop"},
             {"stop", "a", "--concurrency", "2"}, {"stop", "--all", "--concurrency", "0"}}) {
        const auto r = ctl(bad);
        EXPECT_EQ(r.status, 2) << testing::PrintToString(bad) << r;
    }
    ASSERT_EQ(ctl({"start", "a"}).status, 0);

    // A running machine is not deleted without --force.
    const auto refused = ctl({"delete", "a"});
    EXPECT_EQ(refused.status, 1) << refused;
    EXPECT_NE(refused.err.find("Failed to delete 'a': "), std::string::npos) << refused;
    json::Document deleted = ctl_json({"delete", "--force", "a"});
    EXPECT_EQ(s(deleted, "name"), "a");
    EXPECT_TRUE(json::find(deleted, "deleted")->GetBool());
    const auto more = ctl({"delete", "b", "c", "d"});
    EXPECT_EQ(more.status, 0) << more;
    EXPECT_EQ(more.out, "Deleted b.\nDeleted c.\nDeleted d.\n");
    EXPECT_EQ(ctl({"list"}).out, "No machines.\n");
    EXPECT_EQ(json::find(ctl_json({"list"}), "machines")->Size(), 0u);
}

TEST_F(CliTest, OperationFailuresExitOneWithTheProblemsDetail)
{
    const std::string unknown = "no machine named 'ghost'";
    const std::vector<std::vector<std::string>> cases{
        {"show", "ghost"},
        {"start", "ghost"},
        {"stop", "ghost"},
        {"kill", "ghost"},
        {"pause", "ghost"},
        {"resume", "ghost"},
        {"restart", "ghost"},
        {"delete", "ghost"},
        {"qmp", "ghost", "query-status"},
        {"log", "ghost"},
        {"log", "ghost", "--console"},
        {"wait", "ghost", "SHUTDOWN"},
        {"wait", "ghost", "--console", "x"},
        {"edit", "ghost"},
        {"console", "ghost"},
        {"log", "ghost", "--console", "-f"},
    };
    for (const auto& args : cases) {
        const auto r = ctl(args);
        EXPECT_EQ(r.status, 1) << testing::PrintToString(args) << ": " << r;
        EXPECT_NE(r.err.find(unknown), std::string::npos) << testing::PrintToString(args) << r;
    }
    // Invalid spec, a taken name, a bad filter, QEMU's refusal, the QMP policy.
    const auto spec = write_spec("q", quick_spec());
    EXPECT_EQ(ctl({"create", "q", "--spec", spec.string()}).status, 0);
    const auto taken = ctl({"create", "q", "--spec", spec.string()});
    EXPECT_EQ(taken.status, 1) << taken;
    EXPECT_NE(taken.err.find("Failed to create 'q': "), std::string::npos) << taken;
    const auto bad = ctl({"create", "bad", "--spec", spec.string(), "--arg", "-qmp"});
    EXPECT_EQ(bad.status, 1) << bad;
    EXPECT_NE(bad.err.find("spec.args[0]"), std::string::npos) << bad;
    const auto nofile = ctl({"create", "x", "--spec", (root_ / "none.json").string()});
    EXPECT_EQ(nofile.status, 1) << nofile;
    const auto bad_name = ctl({"show", "a/b"});
    EXPECT_EQ(bad_name.status, 1) << bad_name;
    const auto stopped_qmp = ctl({"qmp", "q", "query-status"});
    EXPECT_EQ(stopped_qmp.status, 1) << stopped_qmp;
    const auto no_console = ctl({"console", "q"});
    EXPECT_EQ(no_console.status, 1) << no_console;
    EXPECT_NE(no_console.err.find("Failed to attach to the console of 'q': "), std::string::npos)
        << no_console;
    const auto filter = ctl({"events", "--event", "not a name!"});
    EXPECT_EQ(filter.status, 1) << filter;
    start_machine("q");
    const auto unknown_cmd = ctl({"qmp", "q", "no-such-command"});
    EXPECT_EQ(unknown_cmd.status, 1) << unknown_cmd;
    EXPECT_NE(unknown_cmd.err.find("The command no-such-command has not been found"),
              std::string::npos)
        << unknown_cmd;
    const auto denied = ctl({"qmp", "q", "human-monitor-command", R"({"command-line": "info"})"});
    EXPECT_EQ(denied.status, 1) << denied;
    EXPECT_NE(denied.err.find("denied by qmachined's policy"), std::string::npos) << denied;
    ::setenv("EDITOR", "false", 1); // never reached: refused before the editor opens
    const auto running_edit = ctl({"edit", "q"});
    ::unsetenv("EDITOR");
    EXPECT_EQ(running_edit.status, 1) << running_edit;
    EXPECT_NE(running_edit.err.find("Failed to edit 'q': it is running; stop it first"),
              std::string::npos)
        << running_edit;
}

TEST_F(CliTest, EditSendsTheChangedSpecWithItsGeneration)
{
    const auto spec = write_spec("e", quick_spec());
    ASSERT_EQ(ctl({"create", "e", "--spec", spec.string()}).status, 0);
    ::unsetenv("VISUAL");
    ::setenv("EDITOR", R"(sed -i -e "s/\"cpus\": 1,/\"cpus\": 3,/")", 1);
    json::Document edited = ctl_json({"edit", "e"});
    EXPECT_EQ(json::get_int(edited, "generation"), 2);
    EXPECT_EQ(json::get_int(*json::find(edited, "spec"), "cpus"), 3);
    EXPECT_EQ(json::get_int(*json::find(machine("e"), "spec"), "cpus"), 3);

    // An editor that changes nothing: nothing is sent.
    ::setenv("EDITOR", "true", 1);
    const auto same = ctl({"edit", "e"});
    EXPECT_EQ(same.status, 0) << same;
    EXPECT_EQ(same.out, "e: nothing changed.\n");
    EXPECT_EQ(json::get_int(machine("e"), "generation"), 2);

    // An editor that fails: nothing is sent.
    ::setenv("EDITOR", "false", 1);
    EXPECT_EQ(ctl({"edit", "e"}).status, 1);

    // An invalid edit: the daemon's detail, and the edit kept in its file.
    ::setenv("EDITOR", R"(sed -i -e "s/\"cpus\": 3,/\"cpus\": 0,/")", 1);
    const auto invalid = ctl({"edit", "e"});
    EXPECT_EQ(invalid.status, 1) << invalid;
    EXPECT_NE(invalid.err.find("spec.cpus"), std::string::npos) << invalid;
    const std::string kept = "Your edit is kept in ";
    const auto at = invalid.err.find(kept);
    ASSERT_NE(at, std::string::npos) << invalid;
    const std::string file =
        invalid.err.substr(at + kept.size(), invalid.err.find('\n', at) - at - kept.size());
    EXPECT_NE(read_whole_file(file).find("\"cpus\": 0,"), std::string::npos);
    std::filesystem::remove(file);

    // Someone else updated it meanwhile: 412, nothing overwritten. The outer edit's editor runs
    // another edit (cpus 3 -> 5) before it saves its own change (cpus 3 -> 4).
    const std::string inner_editor = R"(sed -i -e "s/\"cpus\": 3,/\"cpus\": 5,/")";
    const std::string sneak = fmt::format("VISUAL= EDITOR='{}' {} --socket {} edit e >/dev/null; "
                                          "sed -i -e 's/\"cpus\": 3,/\"cpus\": 4,/'",
                                          inner_editor, QM_QMACHINECTL, socket_path().string());
    ::setenv("VISUAL", sneak.c_str(), 1);
    const auto stale = ctl({"edit", "e"});
    ::unsetenv("VISUAL");
    ::unsetenv("EDITOR");
    EXPECT_EQ(stale.status, 1) << stale;
    EXPECT_NE(stale.err.find("changed while you edited it"), std::string::npos) << stale;
    const auto at2 = stale.err.find(kept);
    ASSERT_NE(at2, std::string::npos) << stale;
    std::filesystem::remove(
        stale.err.substr(at2 + kept.size(), stale.err.find('\n', at2) - at2 - kept.size()));
    EXPECT_EQ(json::get_int(*json::find(machine("e"), "spec"), "cpus"), 5);
    EXPECT_EQ(json::get_int(machine("e"), "generation"), 3);
}

TEST_F(CliTest, EventsAndWait)
{
    const auto spec = write_spec("a", quick_spec());
    json::Document created = ctl_json({"create", "a", "--spec", spec.string()});
    const auto first = json::get_int(created, "event_seq"); // this run's first event
    json::Document started = ctl_json({"start", "a"});
    const auto seq = json::get_int(started, "event_seq");
    ASSERT_TRUE(seq);

    // Without --follow: what the ring holds, then it exits.
    const auto all = ctl({"events", "--json"});
    ASSERT_EQ(all.status, 0) << all;
    const auto events = json_lines(all.out);
    ASSERT_GE(events.size(), 3u) << all.out;
    EXPECT_EQ(s(events[0], "event"), "MACHINE_CREATED");
    EXPECT_EQ(json::get_int(events[0], "seq"), first);
    EXPECT_EQ(json::get_int(events.back(), "seq"), seq);
    const auto filtered =
        json_lines(ctl({"events", "--json", "--machine", "a", "--event", "STATE_CHANGED", "--match",
                        R"({"data": {"state": "running"}})"})
                       .out);
    ASSERT_EQ(filtered.size(), 1u);
    EXPECT_EQ(s(*json::find(filtered[0], "data"), "previous"), "starting");
    const auto since =
        json_lines(ctl({"events", "--json", "--since", std::to_string(*seq - 1)}).out);
    ASSERT_EQ(since.size(), 1u);
    EXPECT_EQ(json::get_int(since[0], "seq"), seq);
    const auto human = ctl({"events", "--event", "MACHINE_CREATED"});
    EXPECT_NE(human.out.find("  a  MACHINE_CREATED  {\"uuid\":"), std::string::npos) << human;

    // --follow: live until SIGINT, which ends it with 0.
    auto follower = background("follow", {"events", "--follow", "--json", "--machine", "a"});
    // Subscribed once the daemon counts it (GET /metrics).
    ASSERT_TRUE(eventually(
        [&] {
            return call("GET", "/metrics").body.find("\nqmachined_event_subscribers 1\n") !=
                   std::string::npos;
        },
        10s));
    const auto paused = json::get_int(ctl_json({"pause", "a"}), "event_seq");
    ASSERT_TRUE(paused);
    EXPECT_TRUE(follower->wait_for_output("\"STOP\"", 20s)) << follower->output();
    follower->signal(SIGINT);
    EXPECT_EQ(follower->wait_exit(10s), 0) << follower->output();
    const auto followed = json_lines(follower->output());
    ASSERT_FALSE(followed.empty());
    EXPECT_GT(json::get_int(followed[0], "seq"), seq) << "--follow starts from now";

    // wait: an event already published (with --since), one that comes, one that does not.
    json::Document waited =
        ctl_json({"wait", "a", "STATE_CHANGED", "--since", std::to_string(*seq - 1), "--match",
                  R"({"data": {"state": "running"}})"});
    EXPECT_FALSE(json::find(waited, "timed_out")->GetBool());
    EXPECT_EQ(json::get_int(*json::find(waited, "event"), "seq"), seq);
    // Events after the pause's event_seq: the RESUME counts whether the wait began before it
    // was published or after.
    auto resume_waiter = background(
        "wait", {"wait", "a", "RESUME", "--timeout", "60", "--since", std::to_string(*paused)});
    EXPECT_EQ(ctl({"resume", "a"}).status, 0);
    EXPECT_EQ(resume_waiter->wait_exit(30s), 0) << resume_waiter->output();
    EXPECT_NE(resume_waiter->output().find("  a  RESUME  {}"), std::string::npos)
        << resume_waiter->output();
    const auto timeout = ctl({"wait", "a", "SHUTDOWN", "--timeout", "0.2"});
    EXPECT_EQ(timeout.status, 1) << timeout;
    EXPECT_NE(timeout.err.find("Timed out waiting for SHUTDOWN on 'a'"), std::string::npos);
    const auto timeout_json = ctl({"wait", "a", "SHUTDOWN", "--timeout", "0.2", "--json"});
    EXPECT_EQ(timeout_json.status, 1);
    EXPECT_TRUE(json::find(parse_json(timeout_json.out), "timed_out")->GetBool());
    json::Document any = ctl_json({"wait", "a", "any", "--since", "0"});
    EXPECT_EQ(s(*json::find(any, "event"), "event"), "MACHINE_CREATED");
}

TEST_F(CliTest, LogAndVersion)
{
    const auto spec = write_spec("a", quick_spec());
    ASSERT_EQ(ctl({"create", "a", "--spec", spec.string()}).status, 0);
    const auto empty = ctl({"log", "a"});
    EXPECT_EQ(empty.status, 0) << empty;
    EXPECT_EQ(empty.out, "");
    // log -f follows QEMU's log from a run to the next: the machine w's QEMU warns at start.
    ASSERT_EQ(ctl({"create", "w", "--spec", spec.string(), "--arg", "-global", "--arg",
                   "nonexistent.prop=1"})
                  .status,
              0);
    auto follower = background("logf", {"log", "w", "-f"});
    start_machine("w");
    EXPECT_TRUE(follower->wait_for_output("invalid class name", 20s)) << follower->output();
    const auto log = ctl({"log", "w", "--tail", "1"});
    EXPECT_EQ(log.status, 0) << log;
    EXPECT_EQ(log.out, call("GET", "/v1/machines/w/log?tail=1").body);
    EXPECT_NE(log.out.find("invalid class name"), std::string::npos) << log;
    follower->signal(SIGINT);
    EXPECT_EQ(follower->wait_exit(10s), 0) << follower->output();
    EXPECT_EQ(lines_with(follower->output(), "invalid class name").size(), 1u)
        << follower->output();

    json::Document version = ctl_json({"version"});
    EXPECT_EQ(s(version, "qmachinectl"), "0.1.0");
    EXPECT_EQ(s(*json::find(version, "qmachined"), "api"), "v1");
    const auto text = ctl({"version"});
    EXPECT_TRUE(text.out.starts_with("qmachinectl 0.1.0\nqmachined   0.1.0 (API v1)\n")) << text;
}

TEST_F(CliTest, TcpWithTheToken)
{
    stop_daemon();
    asio::io_context ioc;
    asio::ip::tcp::acceptor a(ioc, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
    const auto port = a.local_endpoint().port();
    a.close();
    ASSERT_NO_FATAL_FAILURE(start_daemon({"--rest-listen", fmt::format("127.0.0.1:{}", port)}));
    const std::string url = fmt::format("http://127.0.0.1:{}", port);
    const std::string token_file = (state_ / "rest.token").string();
    const auto ok = ctl_raw({"--url", url, "--token-file", token_file, "list", "--json"});
    EXPECT_EQ(ok.status, 0) << ok;
    EXPECT_EQ(parse_json(ok.out).HasMember("machines"), true);
    const auto token = read_whole_file(token_file);
    const auto inline_token =
        ctl_raw({"version", "--url", url, "--token", token.substr(0, token.find('\n'))});
    EXPECT_EQ(inline_token.status, 0) << inline_token;
    const auto wrong = ctl_raw({"--url", url, "--token", "wrong", "list"});
    EXPECT_EQ(wrong.status, 1) << wrong;
    EXPECT_FALSE(wrong.err.empty());
}

TEST_F(CliTest, BashCompletesCommandsOptionsAndMachineNames)
{
    const auto spec = write_spec("a", quick_spec());
    ASSERT_EQ(ctl({"create", "alpha", "--spec", spec.string()}).status, 0);
    ASSERT_EQ(ctl({"create", "beta", "--spec", spec.string()}).status, 0);
    const std::string sock = socket_path().string();
    // What the completion function offers for `words` (the last one is being completed).
    const auto complete = [&](const std::vector<std::string>& words) {
        std::string list;
        for (const auto& w : words) {
            list += "'" + w + "' ";
        }
        const std::string script = fmt::format(
            "source '{}/daemon/ctl/qmachinectl.bash' && PATH='{}':\"$PATH\" && COMP_WORDS=({}) && "
            "COMP_CWORD={} && _qmachinectl && printf '%s\\n' \"${{COMPREPLY[@]}}\" | sort",
            QM_SOURCE_DIR, std::filesystem::path(QM_QMACHINECTL).parent_path().string(), list,
            words.size() - 1);
        const auto r = run_command({"bash", "-c", script});
        EXPECT_EQ(r.status, 0) << r;
        return r.out;
    };
    EXPECT_EQ(complete({"qmachinectl", "st"}), "start\nstop\n");
    EXPECT_EQ(complete({"qmachinectl", "--socket", sock, "start", ""}), "alpha\nbeta\n");
    EXPECT_EQ(complete({"qmachinectl", "--socket", sock, "show", "b"}), "beta\n");
    EXPECT_EQ(complete({"qmachinectl", "--socket", sock, "show", "beta", ""}), "\n");
    EXPECT_EQ(complete({"qmachinectl", "--socket", sock, "stop", "alpha", "--mode", ""}),
              "powerdown\nquit\n");
    EXPECT_NE(complete({"qmachinectl", "--socket", sock, "stop", "--"}).find("--timeout\n"),
              std::string::npos);
    EXPECT_EQ(complete({"qmachinectl", "--socket", sock, "wait", "alpha", "SH"}), "SHUTDOWN\n");
    EXPECT_EQ(complete({"qmachinectl", "--socket", sock, "events", "--machine", "al"}), "alpha\n");
    EXPECT_EQ(complete({"qmachinectl", "--js"}), "--json\n");
}

// ---- the console through a pseudo-terminal, with the test guest -------------------------------

// qmachinectl on a pseudo-terminal of the test's: the test holds both ends, so it can read the
// terminal's attributes while the client runs and after it exited.
class PtyProcess
{
public:
    explicit PtyProcess(const std::vector<std::string>& argv)
    {
        winsize ws{24, 80, 0, 0};
        if (::openpty(&master_, &slave_, nullptr, nullptr, &ws) != 0) {
            throw std::runtime_error(std::string("openpty: ") + std::strerror(errno));
        }
        ::fcntl(master_, F_SETFD, FD_CLOEXEC);
        ::fcntl(slave_, F_SETFD, FD_CLOEXEC);
        pid_ = ::fork();
        if (pid_ == 0) {
            ::setsid();
            ::ioctl(slave_, TIOCSCTTY, 0);
            ::dup2(slave_, 0);
            ::dup2(slave_, 1);
            ::dup2(slave_, 2);
            ::close_range(3, ~0U, 0);
            std::vector<char*> cargv;
            for (const auto& a : argv) {
                cargv.push_back(const_cast<char*>(a.c_str())); // NOLINT: execv's signature
            }
            cargv.push_back(nullptr);
            ::execv(cargv[0], cargv.data());
            ::_exit(127);
        }
    }
    ~PtyProcess()
    {
        if (pid_ > 0 && !status_) {
            ::kill(pid_, SIGKILL);
            int st = 0;
            ::waitpid(pid_, &st, 0);
        }
        ::close(master_);
        ::close(slave_);
    }
    PtyProcess(const PtyProcess&) = delete;
    PtyProcess& operator=(const PtyProcess&) = delete;

    pid_t pid() const { return pid_; }
    int slave() const { return slave_; }
    const std::string& output() const { return output_; }

    void type(const std::string& bytes)
    {
        ASSERT_EQ(::write(master_, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
    }

    // Reads what the client writes until `text` appears in it or the deadline passes.
    bool wait_output(const std::string& text, std::chrono::milliseconds deadline = 30s)
    {
        const auto end = std::chrono::steady_clock::now() + deadline;
        while (output_.find(text) == std::string::npos) {
            const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                end - std::chrono::steady_clock::now());
            if (left.count() <= 0) {
                return false;
            }
            pollfd p{master_, POLLIN, 0};
            if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) {
                continue;
            }
            char buf[4096];
            const ssize_t n = ::read(master_, buf, sizeof buf);
            if (n <= 0) {
                return false;
            }
            output_.append(buf, static_cast<std::size_t>(n));
        }
        return true;
    }

    std::optional<int> wait_exit(std::chrono::milliseconds deadline = 10s)
    {
        eventually(
            [&] {
                wait_output("\x01never\x01", 10ms); // drain, so the client never blocks on writing
                int st = 0;
                if (::waitpid(pid_, &st, WNOHANG) == pid_) {
                    status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
                }
                return status_.has_value();
            },
            deadline);
        return status_;
    }

private:
    int master_ = -1;
    int slave_ = -1;
    pid_t pid_ = -1;
    std::optional<int> status_;
    std::string output_;
};

bool same_termios(const termios& a, const termios& b)
{
    return a.c_iflag == b.c_iflag && a.c_oflag == b.c_oflag && a.c_cflag == b.c_cflag &&
           a.c_lflag == b.c_lflag &&
           std::equal(std::begin(a.c_cc), std::end(a.c_cc), std::begin(b.c_cc));
}

TEST_F(CliTest, ConsoleOnATerminalWithTheGuest)
{
    if (!guest_image().error.empty()) {
        GTEST_SKIP() << guest_image().error;
    }
    ASSERT_EQ(create("g", guest_spec()).status, 201);
    start_machine("g");
    const auto ready = ctl({"wait", "g", "--console", "qmtest: ready", "--timeout", "120"});
    ASSERT_EQ(ready.status, 0) << ready;
    EXPECT_EQ(ready.out, "qmtest: ready\n");
    // The console log file follows the console (the wait may match a line still being written).
    CommandResult log;
    EXPECT_TRUE(eventually(
        [&] {
            log = ctl({"log", "g", "--console"});
            return log.out.find("qmtest: ready\r\n") != std::string::npos;
        },
        10s))
        << log;
    EXPECT_EQ(log.status, 0) << log;

    // A watcher (log --console -f: the console WebSocket, read-only) sees what the writer makes
    // the guest say, and ends by itself (0) when the machine stops.
    auto watcher = background("watch", {"log", "g", "--console", "-f"});
    EXPECT_TRUE(watcher->wait_for_output("qmtest: ready", 30s)) << watcher->output();

    {
        PtyProcess term(argv({"console", "g"}));
        termios before{};
        ASSERT_EQ(::tcgetattr(term.slave(), &before), 0);
        ASSERT_TRUE(term.wait_output("Escape character is '^]'.")) << term.output();
        termios during{};
        ASSERT_EQ(::tcgetattr(term.slave(), &during), 0);
        EXPECT_EQ(during.c_lflag & (ICANON | ECHO | ISIG), 0u) << "raw mode while attached";
        term.type("echo hello-cli\r");
        EXPECT_TRUE(term.wait_output("qmtest: hello-cli")) << term.output();
        // A second writer is refused while this one is attached (4409): exit 1, said why.
        const auto second = ctl({"console", "g"}, 30s);
        EXPECT_EQ(second.status, 1) << second;
        EXPECT_NE(second.err.find("another client is writing"), std::string::npos) << second;
        term.type("\x1d");
        EXPECT_EQ(term.wait_exit(), 0) << term.output();
        termios after{};
        ASSERT_EQ(::tcgetattr(term.slave(), &after), 0);
        EXPECT_TRUE(same_termios(before, after)) << "the terminal was not restored";
    }
    EXPECT_TRUE(watcher->wait_for_output("qmtest: hello-cli", 30s)) << watcher->output();

    // SIGTERM while attached: the terminal is restored too (exit 128 + 15).
    {
        PtyProcess term(argv({"console", "g"}));
        termios before{};
        ASSERT_EQ(::tcgetattr(term.slave(), &before), 0);
        ASSERT_TRUE(term.wait_output("Escape character")) << term.output();
        ::kill(term.pid(), SIGTERM);
        EXPECT_EQ(term.wait_exit(), 128 + SIGTERM) << term.output();
        termios after{};
        ASSERT_EQ(::tcgetattr(term.slave(), &after), 0);
        EXPECT_TRUE(same_termios(before, after)) << "the terminal was not restored";
    }

    // The machine stops: the console closes (1000) and the watcher exits 0.
    EXPECT_EQ(ctl({"stop", "g", "--mode", "quit"}).status, 0);
    EXPECT_EQ(watcher->wait_exit(30s), 0) << watcher->output();
}

} // namespace
} // namespace qm::test
