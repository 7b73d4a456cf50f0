// SPDX-License-Identifier: GPL-2.0-or-later
// The supervisor in-process with real QEMU (-machine none): the lifecycle, every cell of
// proto/states.md, stop reasons, deadlines and the unresponsive state, names, persistence,
// autostart, events and waits, the daemon's shutdown, and 200 machines on one thread.
#include <sys/stat.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "daemon/supervisor/errors.hpp"
#include "tests/supervisor/supervisor_fixture.hpp"

#ifndef QM_SOURCE_DIR
#error "QM_SOURCE_DIR must be defined by the build"
#endif

namespace qm::test {
namespace {

using daemon::StopReason;

class SupervisorTest : public SupervisorFixture
{
protected:
    // A QEMU behind a gate: the wrapper fails at once while "<gate>/fail" exists, and waits for
    // "<gate>/go" before it execs QEMU (so a start can be held in `starting`).
    std::string gated_spec(const std::string& name, bool open = true)
    {
        const fs::path gate = root_ / ("gate-" + name);
        fs::create_directories(gate);
        const fs::path script = gate / "qemu";
        write_file(script, fmt::format("#!/bin/sh\n"
                                       "if [ -e '{0}/fail' ]; then echo 'gate: told to fail' >&2; "
                                       "exit 1; fi\n"
                                       "while [ ! -e '{0}/go' ]; do sleep 0.01; done\n"
                                       "exec '{1}' \"$@\"\n",
                                       gate.string(), QemuProcess::binary()));
        fs::permissions(script, fs::perms::owner_all);
        if (open) {
            write_file(gate / "go", "");
        }
        return fmt::format(R"({{"binary": {}, "machine": "none", "console": {{"enabled": false}},
                               "shutdown": {{"mode": "quit", "timeout_s": 60}}}})",
                           json::quote(script.string()));
    }
    void open_gate(const std::string& name) { write_file(root_ / ("gate-" + name) / "go", ""); }
    void close_gate(const std::string& name)
    {
        std::error_code ec;
        fs::remove(root_ / ("gate-" + name) / "go", ec);
    }
    void fail_gate(const std::string& name, bool fail)
    {
        if (fail) {
            write_file(root_ / ("gate-" + name) / "fail", "");
        } else {
            std::error_code ec;
            fs::remove(root_ / ("gate-" + name) / "fail", ec);
        }
    }

    // An operation running in the background; its result once done.
    template <typename T>
    struct Pending
    {
        std::shared_ptr<std::optional<expected<T>>> result =
            std::make_shared<std::optional<expected<T>>>();
        bool done() const { return result->has_value(); }
    };
    template <typename T>
    Pending<T> spawn(awaitable<expected<T>> op)
    {
        Pending<T> p;
        asio::co_spawn(ioc_, store(std::move(op), p.result), [](const std::exception_ptr& e) {
            if (e) {
                ADD_FAILURE() << "operation threw: " << describe_exception(e);
            }
        });
        return p;
    }
    template <typename T>
    static awaitable<void> store(awaitable<expected<T>> op,
                                 std::shared_ptr<std::optional<expected<T>>> out)
    {
        auto r = co_await std::move(op);
        out->emplace(std::move(r));
    }

    pid_t pid_of(const std::string& name)
    {
        auto m = info(name);
        EXPECT_TRUE(m.pid.has_value()) << name << " has no process";
        return m.pid.value_or(-1);
    }
};

//---- the lifecycle --------------------------------------------------------------------------------

TEST_F(SupervisorTest, CreateStartQmpPauseResumeStopDelete)
{
    open_supervisor();
    const auto seq0 = sup_->events().last_seq();
    auto created = create("vm1", none_spec());
    ASSERT_TRUE(created) << describe(created.error());
    EXPECT_EQ(created->machine.state, MachineState::defined);
    EXPECT_EQ(created->machine.generation, 1U);
    EXPECT_EQ(created->machine.id.size(), 12U);
    EXPECT_EQ(created->machine.spec.uuid.size(), 36U);
    EXPECT_TRUE(fs::exists(root_ / "state" / "vm1.json"));
    EXPECT_GT(created->seq, seq0);

    auto started = start("vm1");
    ASSERT_TRUE(started) << describe(started.error());
    EXPECT_EQ(started->machine.state, MachineState::running);
    ASSERT_TRUE(started->machine.pid.has_value());
    const pid_t pid = *started->machine.pid;
    EXPECT_FALSE(process_gone(pid));
    EXPECT_EQ(started->machine.qemu_status, "running");
    // The runtime directory is named by the id, never by the name.
    EXPECT_EQ(started->machine.runtime_dir,
              (root_ / "run" / "m" / started->machine.id).string());
    EXPECT_TRUE(fs::exists(started->machine.log_path));

    auto status = qmp("vm1", "query-status");
    ASSERT_TRUE(status) << describe(status.error());
    EXPECT_EQ(json::get_string(status->value, "status").value_or(""), "running");
    EXPECT_GE(status->seq, started->seq);

    auto bad = qmp("vm1", "no-such-command");
    ASSERT_FALSE(bad);
    EXPECT_TRUE(bad.error().is(errc::qmp_command_failed)) << describe(bad.error());
    EXPECT_EQ(bad.error().qmp_class, "CommandNotFound");

    auto paused = pause("vm1");
    ASSERT_TRUE(paused) << describe(paused.error());
    EXPECT_EQ(paused->machine.state, MachineState::paused);
    // The event the pause caused has a sequence number the result covers.
    daemon::EventSelector stop_event;
    stop_event.machine = "vm1";
    stop_event.names = {"STOP"};
    auto seen = sup_->events().replay(started->seq, stop_event);
    ASSERT_EQ(seen.size(), 1U);
    EXPECT_LE(seen[0].seq(), paused->seq);
    EXPECT_TRUE(seen[0].is_qmp());

    auto resumed = resume("vm1");
    ASSERT_TRUE(resumed) << describe(resumed.error());
    EXPECT_EQ(resumed->machine.state, MachineState::running);

    auto stopped = stop("vm1");
    ASSERT_TRUE(stopped) << describe(stopped.error());
    EXPECT_EQ(stopped->machine.state, MachineState::stopped);
    EXPECT_EQ(stopped->machine.stop_reason.kind, StopReason::Kind::host_quit);
    EXPECT_EQ(stopped->machine.exit_code, 0);
    EXPECT_FALSE(stopped->machine.pid.has_value());
    EXPECT_TRUE(process_gone(pid));
    EXPECT_EQ(files_ending(root_ / "run", ".sock"), std::vector<std::string>{});

    EXPECT_EQ(states_since("vm1", seq0),
              (std::vector<std::string>{"starting", "running", "paused", "running", "stopping",
                                        "stopped"}));

    auto removed = remove("vm1");
    ASSERT_TRUE(removed) << describe(removed.error());
    EXPECT_FALSE(fs::exists(root_ / "state" / "vm1.json"));
    EXPECT_FALSE(fs::exists(stopped->machine.runtime_dir));
    auto gone = sup_->inspect("vm1");
    ASSERT_FALSE(gone);
    EXPECT_TRUE(gone.error().is(errc::no_such_machine));
    EXPECT_TRUE(sup_->list().empty());
}

TEST_F(SupervisorTest, PowerdownOnAMachineWithoutAGuestEndsWithQuit)
{
    open_supervisor();
    // -machine none has no ACPI: system_powerdown fails and the ladder goes on with quit.
    ASSERT_TRUE(create("p", none_spec().replace(none_spec().find("\"quit\""), 6, "\"powerdown\"")));
    ASSERT_TRUE(start("p"));
    auto stopped = stop("p");
    ASSERT_TRUE(stopped) << describe(stopped.error());
    EXPECT_EQ(stopped->machine.state, MachineState::stopped);
    EXPECT_EQ(stopped->machine.stop_reason.kind, StopReason::Kind::host_quit);
}

//---- proto/states.md, cell by cell ----------------------------------------------------------------

struct Cell
{
    enum class Kind { ok, ok_to, noop, join_to, gone, error };
    Kind kind = Kind::ok;
    MachineState to = MachineState::defined;
    std::string error;
    std::string text;
};

// The table of proto/states.md: state -> op -> cell.
std::map<std::string, std::map<std::string, Cell>> read_states_table()
{
    std::map<std::string, std::map<std::string, Cell>> table;
    std::istringstream in(read_file(std::string(QM_SOURCE_DIR) + "/proto/states.md"));
    std::string line;
    std::vector<std::string> ops;
    auto split = [](const std::string& l) {
        std::vector<std::string> cells;
        std::string cell;
        for (std::size_t i = 1; i < l.size(); ++i) {
            if (l[i] == '|') {
                const auto b = cell.find_first_not_of(' ');
                const auto e = cell.find_last_not_of(' ');
                cells.push_back(b == std::string::npos ? "" : cell.substr(b, e - b + 1));
                cell.clear();
            } else {
                cell += l[i];
            }
        }
        return cells;
    };
    while (std::getline(in, line)) {
        if (line.rfind("| state | create |", 0) == 0) {
            auto header = split(line);
            ops.assign(header.begin() + 1, header.end());
            std::getline(in, line); // | --- |
            continue;
        }
        if (ops.empty()) {
            continue;
        }
        if (line.rfind("| ", 0) != 0) {
            break;
        }
        auto cells = split(line);
        for (std::size_t i = 1; i < cells.size() && i - 1 < ops.size(); ++i) {
            Cell c;
            c.text = cells[i];
            const std::string& t = cells[i];
            const auto arrow = t.find(" → ");
            const std::string head = t.substr(0, arrow);
            const std::string to = arrow == std::string::npos ? "" : t.substr(arrow + 5);
            if (head == "ok" && to.empty()) {
                c.kind = Cell::Kind::ok;
            } else if (head == "ok" && to == "gone") {
                c.kind = Cell::Kind::gone;
            } else if (head == "ok" || head == "join") {
                c.kind = head == "ok" ? Cell::Kind::ok_to : Cell::Kind::join_to;
                auto s = machine_state_from_string(to);
                EXPECT_TRUE(s.has_value()) << "unknown state in proto/states.md: " << t;
                c.to = s.value_or(MachineState::defined);
            } else if (head == "noop") {
                c.kind = Cell::Kind::noop;
            } else {
                c.kind = Cell::Kind::error;
                c.error = head;
            }
            table[cells[0]][ops[i - 1]] = c;
        }
    }
    return table;
}

errc errc_named(const std::string& name)
{
    for (const auto& row : daemon::error_table()) {
        if (row.name == name) {
            return row.code;
        }
    }
    ADD_FAILURE() << "proto/states.md names an error that is not in the table: " << name;
    return errc::internal;
}

TEST_F(SupervisorTest, EveryCellOfTheStatesTable)
{
    const auto table = read_states_table();
    const std::vector<std::string> states{"defined", "starting", "running", "paused", "stopping",
                                          "stopped", "crashed", "failed", "unresponsive"};
    const std::vector<std::string> ops{"create", "update", "delete", "start", "stop",
                                       "kill", "pause", "resume", "restart", "qmp"};
    ASSERT_EQ(table.size(), states.size()) << "proto/states.md: one row per state";
    for (const auto& s : states) {
        ASSERT_TRUE(table.contains(s)) << "proto/states.md has no row for " << s;
        ASSERT_EQ(table.at(s).size(), ops.size()) << "row " << s;
    }
    options_.qmp_timeout = 10s;
    open_supervisor();
    int n = 0;
    for (const auto& s : states) {
        const MachineState target = *machine_state_from_string(s);
        for (const auto& op : ops) {
            const Cell& cell = table.at(s).at(op);
            SCOPED_TRACE(fmt::format("state {} × {}: expected '{}'", s, op, cell.text));
            const std::string name = fmt::format("c{}", n++);
            const std::string spec = gated_spec(name, target != MachineState::starting);
            ASSERT_TRUE(create(name, spec));

            //-- bring the machine to the state
            std::optional<Pending<OpResult>> background;
            pid_t stopped_pid = -1; // SIGSTOPped: SIGCONT it to release
            switch (target) {
            case MachineState::defined: break;
            case MachineState::starting:
                background = spawn(sup_->start(name));
                ASSERT_TRUE(wait_state(name, MachineState::starting));
                break;
            case MachineState::running: ASSERT_TRUE(start(name)); break;
            case MachineState::paused:
                ASSERT_TRUE(start(name));
                ASSERT_TRUE(pause(name));
                break;
            case MachineState::stopping: {
                ASSERT_TRUE(start(name));
                stopped_pid = pid_of(name);
                ::kill(stopped_pid, SIGSTOP);
                background = spawn(sup_->stop(name));
                ASSERT_TRUE(wait_state(name, MachineState::stopping));
                break;
            }
            case MachineState::stopped:
                ASSERT_TRUE(start(name));
                ASSERT_TRUE(stop(name));
                break;
            case MachineState::crashed: {
                ASSERT_TRUE(start(name));
                ::kill(pid_of(name), SIGKILL);
                ASSERT_TRUE(wait_state(name, MachineState::crashed));
                break;
            }
            case MachineState::failed: {
                fail_gate(name, true);
                auto r = start(name);
                ASSERT_FALSE(r);
                EXPECT_TRUE(r.error().is(errc::launch_failed)) << describe(r.error());
                fail_gate(name, false);
                break;
            }
            case MachineState::unresponsive: {
                ASSERT_TRUE(start(name));
                stopped_pid = pid_of(name);
                ::kill(stopped_pid, SIGSTOP);
                auto r = qmp(name, "query-status", "null", 100ms);
                ASSERT_FALSE(r);
                EXPECT_TRUE(r.error().is(errc::timeout)) << describe(r.error());
                ASSERT_TRUE(wait_state(name, MachineState::unresponsive));
                break;
            }
            }
            ASSERT_EQ(state(name), target);
            const auto generation = info(name).generation;

            //-- the operation
            Pending<OpResult> result;
            Pending<std::uint64_t> removed;
            Pending<daemon::QmpResult> qmp_result;
            bool is_remove = false;
            bool is_qmp = false;
            if (op == "create") {
                result = spawn(sup_->create(name, parse_json(spec)));
            } else if (op == "update") {
                result = spawn(sup_->update(name, parse_json(spec), generation));
            } else if (op == "delete") {
                is_remove = true;
                removed = spawn(sup_->remove(name, false));
            } else if (op == "start") {
                result = spawn(sup_->start(name));
            } else if (op == "stop") {
                result = spawn(sup_->stop(name));
            } else if (op == "kill") {
                result = spawn(sup_->kill(name));
            } else if (op == "pause") {
                result = spawn(sup_->pause(name));
            } else if (op == "resume") {
                result = spawn(sup_->resume(name));
            } else if (op == "restart") {
                result = spawn(sup_->restart(name));
            } else {
                is_qmp = true;
                json::Document no_args;
                qmp_result = spawn(sup_->qmp(name, "query-status", std::move(no_args)));
            }
            auto finished = [&] {
                return is_remove ? removed.done() : is_qmp ? qmp_result.done() : result.done();
            };
            // What waits for the state to resolve (a join) is released once it is seen waiting.
            if (!run_until(ioc_, finished, 300ms)) {
                open_gate(name);
                if (stopped_pid > 0) {
                    ::kill(stopped_pid, SIGCONT);
                }
            }
            ASSERT_TRUE(run_until(ioc_, finished, 60s)) << "the operation never completed";

            //-- the outcome
            std::optional<Error> error;
            if (is_remove && !removed.result->value()) {
                error = removed.result->value().error();
            } else if (is_qmp && !qmp_result.result->value()) {
                error = qmp_result.result->value().error();
            } else if (!is_remove && !is_qmp && !result.result->value()) {
                error = result.result->value().error();
            }
            switch (cell.kind) {
            case Cell::Kind::error:
                ASSERT_TRUE(error.has_value()) << "succeeded";
                EXPECT_TRUE(error->is(errc_named(cell.error))) << describe(*error);
                if (target != MachineState::starting && target != MachineState::stopping) {
                    EXPECT_EQ(state(name), target);
                }
                break;
            case Cell::Kind::gone: {
                ASSERT_FALSE(error.has_value()) << describe(*error);
                auto m = sup_->inspect(name);
                EXPECT_FALSE(m.has_value());
                EXPECT_FALSE(fs::exists(root_ / "state" / (name + ".json")));
                break;
            }
            case Cell::Kind::ok:
            case Cell::Kind::noop:
                ASSERT_FALSE(error.has_value()) << describe(*error);
                EXPECT_EQ(state(name), target);
                break;
            case Cell::Kind::ok_to:
            case Cell::Kind::join_to:
                ASSERT_FALSE(error.has_value()) << describe(*error);
                EXPECT_EQ(state(name), cell.to);
                break;
            }

            //-- clean up
            open_gate(name);
            if (stopped_pid > 0) {
                ::kill(stopped_pid, SIGCONT);
            }
            if (background) {
                ASSERT_TRUE(run_until(ioc_, [&] { return background->done(); }, 60s));
            }
            if (sup_->inspect(name)) {
                auto gone = remove(name, true);
                ASSERT_TRUE(gone) << describe(gone.error());
            }
        }
    }
    EXPECT_TRUE(sup_->list().empty());
    EXPECT_EQ(files_ending(root_ / "run", ".sock"), std::vector<std::string>{});
}

TEST_F(SupervisorTest, ForcedDeleteKillsTheProcessFirst)
{
    open_supervisor();
    ASSERT_TRUE(create("f", none_spec()));
    ASSERT_TRUE(start("f"));
    const pid_t pid = pid_of("f");
    auto refused = remove("f");
    ASSERT_FALSE(refused);
    EXPECT_TRUE(refused.error().is(errc::invalid_state)) << describe(refused.error());
    auto removed = remove("f", true);
    ASSERT_TRUE(removed) << describe(removed.error());
    EXPECT_TRUE(run_until(ioc_, [&] { return process_gone(pid); }));
    EXPECT_FALSE(sup_->inspect("f"));
}

//---- stop reasons -------------------------------------------------------------------------------

TEST_F(SupervisorTest, ExitsNobodyAskedForCarryTheirReason)
{
    open_supervisor();
    for (const char* n : {"sigkill", "sigterm", "quit", "killop"}) {
        ASSERT_TRUE(create(n, none_spec()));
        ASSERT_TRUE(start(n));
    }
    // A signal from outside: crashed, with the signal.
    ::kill(pid_of("sigkill"), SIGKILL);
    ASSERT_TRUE(wait_state("sigkill", MachineState::crashed));
    auto m = info("sigkill");
    EXPECT_EQ(m.stop_reason.kind, StopReason::Kind::signal);
    EXPECT_EQ(m.stop_reason.signal, SIGKILL);
    EXPECT_EQ(m.exit_signal, SIGKILL);

    // SIGTERM makes QEMU shut down cleanly (SHUTDOWN reason host-signal, exit 0): stopped.
    ::kill(pid_of("sigterm"), SIGTERM);
    ASSERT_TRUE(wait_state("sigterm", MachineState::stopped));
    EXPECT_EQ(info("sigterm").stop_reason.kind, StopReason::Kind::signal);

    // quit through the passthrough: host-quit.
    auto q = qmp("quit", "quit");
    ASSERT_TRUE(q) << describe(q.error());
    ASSERT_TRUE(wait_state("quit", MachineState::stopped));
    EXPECT_EQ(info("quit").stop_reason.kind, StopReason::Kind::host_quit);

    // kill: host-kill, stopped (not crashed).
    auto k = kill("killop");
    ASSERT_TRUE(k) << describe(k.error());
    EXPECT_EQ(k->machine.state, MachineState::stopped);
    EXPECT_EQ(k->machine.stop_reason.kind, StopReason::Kind::host_kill);

    // Each one can start again.
    for (const char* n : {"sigkill", "sigterm", "quit", "killop"}) {
        auto again = start(n);
        ASSERT_TRUE(again) << n << ": " << describe(again.error());
        EXPECT_EQ(again->machine.stop_reason.kind, StopReason::Kind::none);
    }
}

TEST_F(SupervisorTest, ALaunchFailureSaysWhyWithTheCommandLineAndQemusOutput)
{
    open_supervisor();
    ASSERT_TRUE(create("bad", none_spec(R"(, "args": ["-frobnicate"])")));
    auto r = start("bad");
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::launch_failed)) << describe(r.error());
    const auto m = info("bad");
    EXPECT_EQ(m.state, MachineState::failed);
    EXPECT_EQ(m.stop_reason.kind, StopReason::Kind::launch_failed);
    EXPECT_NE(m.stop_reason.detail.find("-frobnicate"), std::string::npos) << m.stop_reason.detail;
    EXPECT_NE(m.stop_reason.detail.find("invalid option"), std::string::npos)
        << m.stop_reason.detail;

    ASSERT_TRUE(create("missing", R"({"binary": "/nonexistent/qemu", "machine": "none"})"));
    auto r2 = start("missing");
    ASSERT_FALSE(r2);
    EXPECT_TRUE(r2.error().is(errc::launch_failed)) << describe(r2.error());
    EXPECT_EQ(state("missing"), MachineState::failed);
    EXPECT_EQ(files_ending(root_ / "run", ".sock"), std::vector<std::string>{});
}

//---- deadlines ------------------------------------------------------------------------------------

TEST_F(SupervisorTest, AHungQemuBecomesUnresponsiveWithoutStallingAnythingElse)
{
    open_supervisor();
    ASSERT_TRUE(create("hung", none_spec()));
    ASSERT_TRUE(create("fine", none_spec()));
    ASSERT_TRUE(start("hung"));
    ASSERT_TRUE(start("fine"));
    const pid_t pid = pid_of("hung");
    ::kill(pid, SIGSTOP);

    // A command overruns its deadline: Timeout, then the probe finds the monitor silent.
    auto slow = qmp("hung", "query-status", "null", 200ms);
    ASSERT_FALSE(slow);
    EXPECT_TRUE(slow.error().is(errc::timeout)) << describe(slow.error());
    ASSERT_TRUE(wait_state("hung", MachineState::unresponsive, 5s));

    // Meanwhile: list and inspect answer from the model (they never touch the loop), the other
    // machine answers QMP, and new commands to the hung one fail at once.
    EXPECT_EQ(sup_->list().size(), 2U);
    auto fine = qmp("fine", "query-status");
    ASSERT_TRUE(fine) << describe(fine.error());
    auto refused = qmp("hung", "query-status");
    ASSERT_FALSE(refused);
    EXPECT_TRUE(refused.error().is(errc::unresponsive)) << describe(refused.error());

    // It answers again: running.
    ::kill(pid, SIGCONT);
    ASSERT_TRUE(wait_state("hung", MachineState::running, 10s));
    auto back = qmp("hung", "query-status");
    ASSERT_TRUE(back) << describe(back.error());

    // Hung again, then stopped: SIGKILL at once (no graceful step can work).
    ::kill(pid, SIGSTOP);
    ASSERT_FALSE(qmp("hung", "query-status", "null", 100ms));
    ASSERT_TRUE(wait_state("hung", MachineState::unresponsive, 5s));
    auto stopped = stop("hung");
    ASSERT_TRUE(stopped) << describe(stopped.error());
    EXPECT_EQ(stopped->machine.stop_reason.kind, StopReason::Kind::host_kill);
}

//---- names ----------------------------------------------------------------------------------------

TEST_F(SupervisorTest, BadNamesAreRefusedAndNothingIsWritten)
{
    open_supervisor();
    const std::vector<std::string> bad{"",        "../evil", "a/b",      "..",
                                       ".",       "-x",      "a b",      std::string("a\0b", 3),
                                       "a\nb",    "a\x1b",   std::string(65, 'a'), "é"};
    for (const auto& name : bad) {
        auto r = create(name, none_spec());
        ASSERT_FALSE(r) << "accepted '" << name << "'";
        EXPECT_TRUE(r.error().is(errc::invalid_argument)) << describe(r.error());
        auto s = start(name);
        ASSERT_FALSE(s);
        EXPECT_TRUE(s.error().is(errc::invalid_argument)) << describe(s.error());
    }
    EXPECT_TRUE(fs::is_empty(root_ / "state"));
    EXPECT_FALSE(fs::exists(root_ / "evil.json"));
    ASSERT_TRUE(create(std::string(64, 'a'), none_spec()));
    auto missing = start("nobody");
    ASSERT_FALSE(missing);
    EXPECT_TRUE(missing.error().is(errc::no_such_machine));
    auto dup = create(std::string(64, 'a'), none_spec());
    ASSERT_FALSE(dup);
    EXPECT_TRUE(dup.error().is(errc::exists));
}

TEST_F(SupervisorTest, BadSpecsAreRefusedNamingTheField)
{
    open_supervisor();
    auto r = create("s", R"({"cpus": "two"})");
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::invalid_argument));
    EXPECT_NE(r.error().message.find("cpus"), std::string::npos) << r.error().message;
    auto u = create("s", R"({"frobnicate": 1})");
    ASSERT_FALSE(u);
    EXPECT_NE(u.error().message.find("frobnicate"), std::string::npos) << u.error().message;
    EXPECT_TRUE(sup_->list().empty());
}

//---- updates and generations ---------------------------------------------------------------------

TEST_F(SupervisorTest, UpdatesNeedTheCurrentGenerationAndNoProcess)
{
    open_supervisor();
    auto c = create("u", none_spec());
    ASSERT_TRUE(c);
    const std::string uuid = c->machine.spec.uuid;
    auto u1 = update("u", none_spec(R"(, "cpus": 1, "memory_mib": 64)"), 1);
    ASSERT_TRUE(u1) << describe(u1.error());
    EXPECT_EQ(u1->machine.generation, 2U);
    EXPECT_EQ(u1->machine.spec.memory_mib, 64U);
    EXPECT_EQ(u1->machine.spec.uuid, uuid); // kept when the new spec has none
    auto stale = update("u", none_spec(), 1);
    ASSERT_FALSE(stale);
    EXPECT_TRUE(stale.error().is(errc::stale_generation)) << describe(stale.error());
    ASSERT_TRUE(start("u"));
    auto busy = update("u", none_spec(), 2);
    ASSERT_FALSE(busy);
    EXPECT_TRUE(busy.error().is(errc::invalid_state));
    // The running process got the memory of generation 2.
    auto mem = qmp("u", "query-memory-size-summary");
    ASSERT_TRUE(mem) << describe(mem.error());
    EXPECT_EQ(json::get_int(mem->value, "base-memory").value_or(0), 64 << 20);
}

//---- persistence ----------------------------------------------------------------------------------

TEST_F(SupervisorTest, DefinitionsSurviveARestartAndCorruptFilesAreSetAside)
{
    open_supervisor();
    ASSERT_TRUE(create("keep", none_spec()));
    ASSERT_TRUE(update("keep", none_spec(R"(, "memory_mib": 32)"), 1));
    const auto uuid = info("keep").spec.uuid;
    shutdown_supervisor();

    write_file(root_ / "state" / "torn.json", R"({"format": 1, "name": "torn", "gener)");
    write_file(root_ / "state" / "other.json",
               R"({"format": 1, "name": "someone-else", "generation": 1, "spec": {}})");
    open_supervisor();
    ASSERT_EQ(problems_.size(), 2U);
    auto keep = info("keep");
    EXPECT_EQ(keep.generation, 2U);
    EXPECT_EQ(keep.spec.uuid, uuid);
    EXPECT_EQ(keep.spec.memory_mib, 32U);
    EXPECT_EQ(sup_->list().size(), 1U);
    EXPECT_FALSE(fs::exists(root_ / "state" / "torn.json"));
    EXPECT_EQ(files_ending(root_ / "state", ".json").size(), 1U);
    int aside = 0;
    for (const auto& f : fs::directory_iterator(root_ / "state")) {
        aside += f.path().filename().string().find(".corrupt-") != std::string::npos ? 1 : 0;
    }
    EXPECT_EQ(aside, 2);
    // It still starts.
    ASSERT_TRUE(start("keep"));
}

TEST_F(SupervisorTest, AutostartMachinesStartWithTheSupervisor)
{
    open_supervisor();
    ASSERT_TRUE(create("auto", none_spec(R"(, "autostart": true)")));
    ASSERT_TRUE(create("manual", none_spec()));
    shutdown_supervisor();
    open_supervisor();
    sup_->autostart();
    ASSERT_TRUE(wait_state("auto", MachineState::running));
    EXPECT_EQ(state("manual"), MachineState::defined);
}

//---- events and waits -----------------------------------------------------------------------------

TEST_F(SupervisorTest, WaitsFindEventsAfterASequenceNumberOrFromNow)
{
    open_supervisor();
    ASSERT_TRUE(create("w", none_spec()));
    auto started = start("w");
    ASSERT_TRUE(started);
    auto paused = pause("w");
    ASSERT_TRUE(paused);

    // With `since` before the pause: the STOP it caused, from the ring.
    daemon::EventSelector stop_sel;
    stop_sel.names = {"STOP"};
    auto found = run_co(ioc_, sup_->wait_event("w", std::move(stop_sel), started->seq, 1s));
    ASSERT_TRUE(found) << describe(found.error());
    EXPECT_EQ(found->name(), "STOP");
    EXPECT_EQ(found->machine(), "w");

    // Without it: only what comes next.
    daemon::EventSelector stop_sel2;
    stop_sel2.names = {"STOP"};
    auto none = run_co(ioc_, sup_->wait_event("w", std::move(stop_sel2), std::nullopt, 200ms));
    ASSERT_FALSE(none);
    EXPECT_TRUE(none.error().is(errc::timeout));

    // A wait for a state with match, satisfied by a later operation.
    daemon::EventSelector running;
    running.names = {std::string(daemon::event_names::state_changed)};
    running.match = parse_json(R"({"data": {"state": "running"}})");
    auto waiting = spawn(sup_->wait_event("w", std::move(running), paused->seq, 10s));
    auto resumed = resume("w");
    ASSERT_TRUE(resumed);
    ASSERT_TRUE(run_until(ioc_, [&] { return waiting.done(); }));
    ASSERT_TRUE(waiting.result->value()) << describe(waiting.result->value().error());
    EXPECT_LE(waiting.result->value()->seq(), resumed->seq);

    auto unknown = run_co(ioc_, sup_->wait_event("nobody", daemon::EventSelector{}, 0, 1s));
    ASSERT_FALSE(unknown);
    EXPECT_TRUE(unknown.error().is(errc::no_such_machine));
}

//---- the daemon's shutdown ------------------------------------------------------------------------

TEST_F(SupervisorTest, ShutdownStopsEveryMachineAndRefusesNewOperations)
{
    open_supervisor();
    std::vector<pid_t> pids;
    for (int i = 0; i < 5; ++i) {
        const auto name = fmt::format("s{}", i);
        ASSERT_TRUE(create(name, none_spec()));
        ASSERT_TRUE(start(name));
        pids.push_back(pid_of(name));
    }
    run_co(ioc_, sup_->shutdown(), 60s);
    for (pid_t pid : pids) {
        EXPECT_TRUE(run_until(ioc_, [&] { return process_gone(pid); }));
    }
    for (const auto& m : sup_->list()) {
        EXPECT_EQ(m.state, MachineState::stopped) << m.name;
        EXPECT_EQ(m.stop_reason.kind, StopReason::Kind::host_quit) << m.name;
    }
    auto refused = start("s0");
    ASSERT_FALSE(refused);
    EXPECT_TRUE(refused.error().is(errc::shutting_down));
    auto refused_create = create("new", none_spec());
    ASSERT_FALSE(refused_create);
    EXPECT_TRUE(refused_create.error().is(errc::shutting_down));
    sup_.reset();
}

TEST_F(SupervisorTest, StopAllStopsNAtATimeEachByItsOwnSpec)
{
    // What qmachined-guests.service asks at the host's shutdown (POST /v1/stop-all): every machine
    // stopped as its own spec says, `concurrency` at a time. Four QEMUs are SIGSTOPped (a guest
    // that does not go down): their quit is not answered, and each is killed at its own
    // timeout_s (1 or 2 s); two stop at once with quit.
    open_supervisor();
    struct Want
    {
        const char* name;
        bool hung;
        int timeout_s;
    };
    const std::vector<Want> wants = {{"h1", true, 1}, {"h2", true, 2}, {"q1", false, 10},
                                     {"h3", true, 1}, {"q2", false, 10}, {"h4", true, 1}};
    std::vector<pid_t> hung;
    for (const auto& w : wants) {
        ASSERT_TRUE(create(w.name, fmt::format(R"({{"binary": {}, "machine": "none",
            "console": {{"enabled": false}}, "shutdown": {{"mode": "quit", "timeout_s": {}}}}})",
                                                json::quote(QemuProcess::binary()), w.timeout_s)));
        ASSERT_TRUE(start(w.name));
        if (w.hung) {
            hung.push_back(pid_of(w.name));
            ASSERT_EQ(::kill(hung.back(), SIGSTOP), 0);
        }
    }
    const auto since = sup_->events().last_seq();
    const auto started = std::chrono::steady_clock::now();
    auto result = run_co(ioc_, sup_->stop_all(2), 60s);
    const auto took = std::chrono::steady_clock::now() - started;
    EXPECT_EQ(result.stopped.size(), wants.size());
    EXPECT_TRUE(result.failed.empty());
    // Never more than two stopping at once, and two at once at some point.
    daemon::EventSelector sel;
    sel.names = {std::string(daemon::event_names::state_changed)};
    std::size_t stopping = 0;
    std::size_t most = 0;
    for (const auto& e : sup_->events().replay(since, sel)) {
        const auto state = json::get_string(e.data(), "state").value_or("");
        const auto previous = json::get_string(e.data(), "previous").value_or("");
        if (state == "stopping") {
            most = std::max(most, ++stopping);
        } else if (previous == "stopping") {
            --stopping;
        }
    }
    EXPECT_EQ(most, 2U);
    EXPECT_EQ(stopping, 0U);
    // Hung: 1 + 2 + 1 + 1 s of timeouts, two lanes: at least 2.5 s; one at a time would be 5.
    EXPECT_GE(took, 2500ms);
    EXPECT_LT(took, 4800ms);
    for (const auto& w : wants) {
        const auto m = info(w.name);
        EXPECT_EQ(m.state, MachineState::stopped) << w.name;
        EXPECT_EQ(m.stop_reason.kind, w.hung ? StopReason::Kind::host_kill
                                             : StopReason::Kind::host_quit)
            << w.name << ": " << m.stop_reason.detail;
    }
    for (pid_t pid : hung) {
        EXPECT_TRUE(run_until(ioc_, [&] { return process_gone(pid); })) << pid;
    }
}

//---- many machines on one thread -------------------------------------------------------------------

TEST_F(SupervisorTest, TwoHundredMachinesOnOneThread)
{
    constexpr int n = 200;
    open_supervisor();
    for (int i = 0; i < n; ++i) {
        ASSERT_TRUE(create(fmt::format("m{:03}", i), none_spec()));
    }
    std::vector<Pending<OpResult>> starts;
    starts.reserve(n);
    for (int i = 0; i < n; ++i) {
        starts.push_back(spawn(sup_->start(fmt::format("m{:03}", i))));
    }
    ASSERT_TRUE(run_until(ioc_, [&] {
        return std::all_of(starts.begin(), starts.end(), [](const auto& p) { return p.done(); });
    }, 180s));
    std::set<pid_t> pids;
    for (auto& p : starts) {
        ASSERT_TRUE(p.result->value()) << describe(p.result->value().error());
        pids.insert(*p.result->value()->machine.pid);
    }
    EXPECT_EQ(pids.size(), static_cast<std::size_t>(n));
    const auto listed = sup_->list();
    ASSERT_EQ(listed.size(), static_cast<std::size_t>(n));
    for (const auto& m : listed) {
        EXPECT_EQ(m.state, MachineState::running) << m.name;
    }
    EXPECT_EQ(sup_->count_by_state().at("running"), static_cast<std::size_t>(n));
    // Every one answers QMP.
    std::vector<Pending<daemon::QmpResult>> queries;
    for (int i = 0; i < n; ++i) {
        json::Document no_args;
        queries.push_back(spawn(sup_->qmp(fmt::format("m{:03}", i), "query-status",
                                          std::move(no_args))));
    }
    ASSERT_TRUE(run_until(ioc_, [&] {
        return std::all_of(queries.begin(), queries.end(), [](const auto& p) { return p.done(); });
    }, 60s));
    for (auto& q : queries) {
        EXPECT_TRUE(q.result->value());
    }
    // And stop in the daemon's shutdown, at most 16 at a time.
    run_co(ioc_, sup_->shutdown(), 180s);
    for (pid_t pid : pids) {
        EXPECT_TRUE(process_gone(pid)) << pid;
    }
    sup_.reset();
}

} // namespace
} // namespace qm::test
