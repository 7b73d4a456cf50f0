// SPDX-License-Identifier: GPL-2.0-or-later
// The D-Bus front end against the real qmachined on a private dbus-daemon, with real QEMU: its
// introspection equals proto/dbus/, the lifecycle through busctl, ObjectManager and
// PropertiesChanged and QmpEvent signals, WaitEvent, 100 concurrent Execute calls, every error
// name a client can meet, and a caller without rights refused with nothing changed.
#include <systemd/sd-bus.h>

#include <grp.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/json.hpp"
#include "tests/dbus/dbus_fixture.hpp"

#ifndef QM_SOURCE_DIR
#error "QM_SOURCE_DIR must be defined by the build"
#endif

namespace qm::test {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

constexpr const char* manager = "/org/qmachined1";
constexpr const char* manager_iface = "org.qmachined1.Manager";
constexpr const char* machine_iface = "org.qmachined1.Machine";
constexpr uid_t nobody = 65534;

// The <interface name="NAME"> block of introspection XML, without comments, one trimmed line
// per line: what the daemon serves and what proto/ says compare equal this way.
std::string interface_block(const std::string& xml, const std::string& name)
{
    const std::string text = std::regex_replace(xml, std::regex("<!--[\\s\\S]*?-->"), "");
    const auto begin = text.find("<interface name=\"" + name + "\">");
    if (begin == std::string::npos) {
        return {};
    }
    const auto end = text.find("</interface>", begin);
    std::istringstream in(text.substr(begin, end - begin));
    std::string out;
    for (std::string line; std::getline(in, line);) {
        const auto first = line.find_first_not_of(" \t");
        if (first == std::string::npos) {
            continue;
        }
        out += line.substr(first, line.find_last_not_of(" \t\r") - first + 1) + "\n";
    }
    return out;
}

class DbusLifecycleTest : public DbusTest
{
protected:
    std::string machine_path(const std::string& name)
    {
        char* path = nullptr;
        EXPECT_GE(sd_bus_path_encode("/org/qmachined1/machine", name.c_str(), &path), 0);
        std::string out(path);
        std::free(path);
        return out;
    }

    // A call that must succeed; its reply (the caller unrefs it).
    sd_bus_message* call(const std::string& path, const char* iface, const char* member,
                         const char* types = nullptr, ...)
    {
        sd_bus_message* m = nullptr;
        sd_bus_message* reply = nullptr;
        sd_bus_error error{};
        EXPECT_GE(sd_bus_message_new_method_call(client(), &m, "org.qmachined1", path.c_str(),
                                                 iface, member),
                  0);
        if (types != nullptr) {
            va_list ap;
            va_start(ap, types);
            EXPECT_GE(sd_bus_message_appendv(m, types, ap), 0);
            va_end(ap);
        }
        const int r = sd_bus_call(client(), m, 60 * 1000000ULL, &error, &reply);
        EXPECT_GE(r, 0) << member << ": " << (error.name ? error.name : "") << ": "
                        << (error.message ? error.message : "");
        sd_bus_error_free(&error);
        sd_bus_message_unref(m);
        return reply;
    }

    std::string string_property(const std::string& path, const char* property)
    {
        char* value = nullptr;
        sd_bus_error error{};
        const int r = sd_bus_get_property_string(client(), "org.qmachined1", path.c_str(),
                                                 machine_iface, property, &error, &value);
        EXPECT_GE(r, 0) << property << ": " << (error.message ? error.message : "");
        sd_bus_error_free(&error);
        std::string out = value != nullptr ? value : "";
        std::free(value);
        return out;
    }

    std::string introspect(const std::string& path)
    {
        sd_bus_message* reply = call(path, "org.freedesktop.DBus.Introspectable", "Introspect");
        const char* xml = nullptr;
        EXPECT_GE(sd_bus_message_read(reply, "s", &xml), 0);
        std::string out = xml != nullptr ? xml : "";
        sd_bus_message_unref(reply);
        return out;
    }

    // Processes the client's bus until `done` holds.
    bool pump_until(const std::function<bool()>& done, std::chrono::milliseconds deadline = 20s)
    {
        const auto end = std::chrono::steady_clock::now() + deadline;
        while (!done()) {
            if (std::chrono::steady_clock::now() >= end) {
                return false;
            }
            if (sd_bus_process(client(), nullptr) > 0) {
                continue;
            }
            sd_bus_wait(client(), 50000);
        }
        return true;
    }

    std::string create_quick(const std::string& name)
    {
        sd_bus_message* reply = call(manager, manager_iface, "CreateMachine", "ss", name.c_str(),
                                     quick_spec().c_str());
        const char* path = nullptr;
        EXPECT_GE(sd_bus_message_read(reply, "o", &path), 0);
        std::string out = path != nullptr ? path : "";
        sd_bus_message_unref(reply);
        return out;
    }
};

TEST_F(DbusLifecycleTest, IntrospectionEqualsTheContractInProto)
{
    ASSERT_NO_FATAL_FAILURE(start_bus_daemon());
    const std::string path = create_quick("intro");
    for (const auto& [object, name] : std::vector<std::pair<std::string, std::string>>{
             {manager, manager_iface}, {path, machine_iface}}) {
        SCOPED_TRACE(name);
        const std::string served = interface_block(introspect(object), name);
        const std::string contract = interface_block(
            read_whole_file(fs::path(QM_SOURCE_DIR) / "proto" / "dbus" / (name + ".xml")), name);
        ASSERT_FALSE(contract.empty());
        EXPECT_EQ(served, contract);
    }
    // The manager is an ObjectManager too.
    EXPECT_NE(introspect(manager).find("org.freedesktop.DBus.ObjectManager"), std::string::npos);
}

TEST_F(DbusLifecycleTest, TheWholeLifecycleThroughBusctl)
{
    ASSERT_NO_FATAL_FAILURE(start_bus_daemon());
    auto ok = [&](std::vector<std::string> args) {
        CommandResult r = busctl(args);
        EXPECT_EQ(r.status, 0) << testing::PrintToString(args) << "\n" << r.err;
        return r.out;
    };
    EXPECT_EQ(ok({"call", "org.qmachined1", manager, manager_iface, "CreateMachine", "ss", "web-1",
                  quick_spec()}),
              "o \"/org/qmachined1/machine/web_2d1\"\n");
    const std::string path = "/org/qmachined1/machine/web_2d1";
    EXPECT_EQ(ok({"get-property", "org.qmachined1", path, machine_iface, "State"}),
              "s \"defined\"\n");
    ok({"call", "org.qmachined1", path, machine_iface, "Start"});
    EXPECT_EQ(ok({"get-property", "org.qmachined1", path, machine_iface, "State"}),
              "s \"running\"\n");
    const std::string pid = ok({"get-property", "org.qmachined1", path, machine_iface, "Pid"});
    EXPECT_NE(pid, "u 0\n");
    EXPECT_EQ(ok({"call", "org.qmachined1", path, machine_iface, "Execute", "ss", "query-status",
                  ""}),
              "s \"{\\\"status\\\":\\\"running\\\",\\\"singlestep\\\":false,\\\"running\\\":true}\"\n");
    ok({"call", "org.qmachined1", path, machine_iface, "Pause"});
    EXPECT_EQ(ok({"get-property", "org.qmachined1", path, machine_iface, "State"}),
              "s \"paused\"\n");
    ok({"call", "org.qmachined1", path, machine_iface, "Resume"});
    ok({"call", "org.qmachined1", manager, manager_iface, "StopMachine", "sst", "web-1", "quit",
        "5000000"});
    EXPECT_EQ(ok({"get-property", "org.qmachined1", path, machine_iface, "State", "StopReason",
                  "ExitCode"}),
              "s \"stopped\"\ns \"host-quit\"\ni 0\n");
    EXPECT_EQ(ok({"call", "org.qmachined1", manager, manager_iface, "ListMachines"}),
              "a(sso) 1 \"web-1\" \"stopped\" \"/org/qmachined1/machine/web_2d1\"\n");
    ok({"call", "org.qmachined1", path, machine_iface, "Restart"});
    // StopAll: every machine with a process, by its spec (quit); nothing left to stop after.
    EXPECT_EQ(ok({"call", "org.qmachined1", manager, manager_iface, "StopAll", "u", "4"}),
              "asa(ss) 1 \"web-1\" 0\n");
    EXPECT_EQ(ok({"get-property", "org.qmachined1", path, machine_iface, "State"}),
              "s \"stopped\"\n");
    EXPECT_EQ(ok({"call", "org.qmachined1", manager, manager_iface, "StopAll", "u", "0"}),
              "asa(ss) 0 0\n");
    ok({"call", "org.qmachined1", path, machine_iface, "Start"});
    ok({"call", "org.qmachined1", path, machine_iface, "Kill"});
    EXPECT_EQ(ok({"get-property", "org.qmachined1", path, machine_iface, "StopReason"}),
              "s \"host-kill\"\n");
    EXPECT_NE(ok({"get-property", "org.qmachined1", path, machine_iface, "Spec"}).find("uuid"),
              std::string::npos);
    ok({"call", "org.qmachined1", manager, manager_iface, "DeleteMachine", "sb", "web-1", "false"});
    EXPECT_EQ(ok({"call", "org.qmachined1", manager, manager_iface, "ListMachines"}),
              "a(sso) 0\n");
    // The REST side sees the same model.
    EXPECT_EQ(MachineDaemonTest::call("GET", "/v1/machines").json()["machines"].Size(), 0U);
    EXPECT_TRUE(qemus().empty());
}

TEST_F(DbusLifecycleTest, SignalsFollowTheModel)
{
    ASSERT_NO_FATAL_FAILURE(start_bus_daemon());
    std::vector<std::string> log; // "Member path detail" in arrival order
    auto on_signal = [](sd_bus_message* m, void* userdata, sd_bus_error*) -> int {
        auto* out = static_cast<std::vector<std::string>*>(userdata);
        std::string line = fmt::format("{} {}", sd_bus_message_get_member(m),
                                       sd_bus_message_get_path(m));
        if (std::string_view(sd_bus_message_get_member(m)) == "QmpEvent") {
            std::uint64_t seq = 0;
            const char* name = nullptr;
            if (sd_bus_message_read(m, "ts", &seq, &name) >= 0) {
                line += std::string(" ") + name;
            }
        }
        out->push_back(line);
        return 0;
    };
    std::vector<sd_bus_slot*> slots;
    for (const char* member : {"InterfacesAdded", "InterfacesRemoved", "PropertiesChanged",
                               "QmpEvent", "MachineNew", "MachineRemoved"}) {
        sd_bus_slot* slot = nullptr;
        ASSERT_GE(sd_bus_match_signal(client(), &slot, "org.qmachined1", nullptr, nullptr, member,
                                      on_signal, &log),
                  0);
        slots.push_back(slot);
    }
    const std::string path = create_quick("sig");
    sd_bus_message_unref(call(path, machine_iface, "Start"));
    sd_bus_message_unref(call(path, machine_iface, "Execute", "ss", "stop", ""));
    sd_bus_message_unref(call(path, machine_iface, "Execute", "ss", "cont", ""));
    sd_bus_message_unref(call(manager, manager_iface, "DeleteMachine", "sb", "sig", 1));
    auto has = [&](const std::string& line) {
        return std::find(log.begin(), log.end(), line) != log.end();
    };
    EXPECT_TRUE(pump_until([&] { return has("InterfacesRemoved " + std::string(manager)); }))
        << testing::PrintToString(log);
    for (const std::string& want :
         {"MachineNew " + std::string(manager), "InterfacesAdded " + std::string(manager),
          "PropertiesChanged " + path, "QmpEvent " + path + " STOP", "QmpEvent " + path + " RESUME",
          "MachineRemoved " + std::string(manager)}) {
        EXPECT_TRUE(has(want)) << want << " not in " << testing::PrintToString(log);
    }
    // In the order things happened: created, changed, gone.
    auto at = [&](const std::string& line) {
        return std::find(log.begin(), log.end(), line) - log.begin();
    };
    EXPECT_LT(at("InterfacesAdded " + std::string(manager)), at("PropertiesChanged " + path));
    EXPECT_LT(at("QmpEvent " + path + " STOP"), at("QmpEvent " + path + " RESUME"));
    EXPECT_LT(at("QmpEvent " + path + " RESUME"), at("InterfacesRemoved " + std::string(manager)));
    for (sd_bus_slot* s : slots) {
        sd_bus_slot_unref(s);
    }
}

TEST_F(DbusLifecycleTest, WaitEventWithAndWithoutSince)
{
    ASSERT_NO_FATAL_FAILURE(start_bus_daemon());
    const std::string path = create_quick("w");
    sd_bus_message_unref(call(path, machine_iface, "Start"));
    std::uint64_t seq = 0;
    sd_bus_error error{};
    ASSERT_GE(sd_bus_get_property_trivial(client(), "org.qmachined1", manager, manager_iface,
                                          "EventSeq", &error, 't', &seq),
              0);
    sd_bus_message_unref(call(path, machine_iface, "Pause"));
    // With since: the STOP the pause caused, found although it came before the call.
    sd_bus_message* reply = call(path, machine_iface, "WaitEvent", "sstt", "STOP", "", seq,
                                 std::uint64_t{5000000});
    const char* event = nullptr;
    ASSERT_GE(sd_bus_message_read(reply, "s", &event), 0);
    auto parsed = json::parse(event);
    ASSERT_TRUE(parsed) << event;
    EXPECT_EQ(json::get_string(*parsed, "event"), "STOP");
    EXPECT_GT(json::get_int(*parsed, "seq").value_or(0), static_cast<std::int64_t>(seq));
    sd_bus_message_unref(reply);
    // Without since: from now on. A match picks the state; the RESUME comes from a second
    // connection while this call waits.
    sd_bus_message* m = nullptr;
    ASSERT_GE(sd_bus_message_new_method_call(client(), &m, "org.qmachined1", path.c_str(),
                                             machine_iface, "WaitEvent"),
              0);
    ASSERT_GE(sd_bus_message_append(m, "sstt", "STATE_CHANGED",
                                    R"({"data": {"state": "running"}})", std::uint64_t{0},
                                    std::uint64_t{20000000}),
              0);
    std::string got;
    sd_bus_slot* slot = nullptr;
    ASSERT_GE(sd_bus_call_async(
                  client(), &slot, m,
                  [](sd_bus_message* r, void* userdata, sd_bus_error*) -> int {
                      const char* s = nullptr;
                      if (!sd_bus_message_is_method_error(r, nullptr) &&
                          sd_bus_message_read(r, "s", &s) >= 0) {
                          *static_cast<std::string*>(userdata) = s;
                      } else {
                          *static_cast<std::string*>(userdata) = "error";
                      }
                      return 0;
                  },
                  &got, 30000000),
              0);
    sd_bus_message_unref(m);
    pump_until([] { return false; }, 300ms); // the wait is in place
    EXPECT_EQ(busctl({"call", "org.qmachined1", path, machine_iface, "Resume"}).status, 0);
    ASSERT_TRUE(pump_until([&] { return !got.empty(); }));
    auto resumed = json::parse(got);
    ASSERT_TRUE(resumed) << got;
    EXPECT_EQ(json::get_string(*json::find(*resumed, "data"), "state"), "running");
    sd_bus_slot_unref(slot);
    sd_bus_error_free(&error);
}

TEST_F(DbusLifecycleTest, HundredConcurrentExecuteCalls)
{
    ASSERT_NO_FATAL_FAILURE(start_bus_daemon());
    const std::string path = create_quick("c");
    sd_bus_message_unref(call(path, machine_iface, "Start"));
    struct State
    {
        int sent = 0;
        int answered = 0;
        int ok = 0;
        int in_flight_at_first_answer = -1;
    } st;
    std::vector<sd_bus_slot*> slots;
    for (int i = 0; i < 100; ++i) {
        sd_bus_slot* slot = nullptr;
        ASSERT_GE(sd_bus_call_method_async(
                      client(), &slot, "org.qmachined1", path.c_str(), machine_iface, "Execute",
                      [](sd_bus_message* r, void* userdata, sd_bus_error*) -> int {
                          auto* s = static_cast<State*>(userdata);
                          if (s->in_flight_at_first_answer < 0) {
                              s->in_flight_at_first_answer = s->sent - s->answered;
                          }
                          ++s->answered;
                          const char* text = nullptr;
                          if (!sd_bus_message_is_method_error(r, nullptr) &&
                              sd_bus_message_read(r, "s", &text) >= 0 &&
                              std::string_view(text).find("\"running\"") != std::string_view::npos) {
                              ++s->ok;
                          }
                          return 0;
                      },
                      &st, "ss", "query-status", ""),
                  0);
        ++st.sent;
        slots.push_back(slot);
    }
    ASSERT_TRUE(pump_until([&] { return st.answered == 100; }, 60s)) << st.answered;
    EXPECT_EQ(st.ok, 100);
    EXPECT_GE(st.in_flight_at_first_answer, 50) << "calls were not in flight together";
    for (sd_bus_slot* s : slots) {
        sd_bus_slot_unref(s);
    }
}

TEST_F(DbusLifecycleTest, EveryErrorNameAClientCanMeet)
{
    ASSERT_NO_FATAL_FAILURE(start_bus_daemon());
    create_quick("e");
    const std::string path = "/org/qmachined1/machine/e";
    auto expect_error = [&](const std::string& object, const std::string& method,
                            std::vector<std::string> args, const std::string& name) {
        CommandResult r = dbus_send(object, method, std::move(args));
        EXPECT_NE(r.status, 0) << method;
        EXPECT_NE(r.err.find("Error " + name + ":"), std::string::npos)
            << method << " wanted " << name << ", got: " << r.err << r.out;
    };
    const std::string m = "org.qmachined1.Manager.";
    const std::string x = "org.qmachined1.Machine.";
    expect_error(manager, m + "GetMachine", {"string:nope"}, "org.qmachined1.Error.NoSuchMachine");
    expect_error(manager, m + "StopAll", {"uint32:257"}, "org.qmachined1.Error.InvalidArgument");
    expect_error(manager, m + "CreateMachine", {"string:e", "string:"}, "org.qmachined1.Error.Exists");
    expect_error(manager, m + "CreateMachine", {"string:a/b", "string:"},
                 "org.qmachined1.Error.InvalidArgument");
    expect_error(manager, m + "CreateMachine", {"string:f", "string:{\"cpus\": \"two\"}"},
                 "org.qmachined1.Error.InvalidArgument");
    expect_error(path, x + "Pause", {}, "org.qmachined1.Error.StateConflict");
    expect_error(path, x + "Stop", {"string:frob", "uint64:0"},
                 "org.qmachined1.Error.InvalidArgument");
    const std::string bad = R"({"binary": "qemu-system-x86_64", "machine": "none",
                                "args": ["-frobnicate"]})";
    EXPECT_EQ(busctl({"call", "org.qmachined1", manager, manager_iface, "CreateMachine", "ss", "bad",
                      bad})
                  .status,
              0);
    expect_error(manager, m + "StartMachine", {"string:bad"}, "org.qmachined1.Error.LaunchFailed");
    EXPECT_EQ(busctl({"call", "org.qmachined1", path, machine_iface, "Start"}).status, 0);
    expect_error(path, x + "Execute", {"string:no-such-command", "string:"},
                 "org.qmachined1.Error.QmpError");
    expect_error(path, x + "Execute", {"string:human-monitor-command", "string:"},
                 "org.qmachined1.Error.Forbidden");
    expect_error(path, x + "WaitEvent",
                 {"string:NO_SUCH_EVENT", "string:", "uint64:0", "uint64:200000"},
                 "org.qmachined1.Error.Timeout");
    // A wrong signature is sd-bus's own answer.
    expect_error(path, x + "Execute", {"int32:1"}, "org.freedesktop.DBus.Error.InvalidArgs");
    CommandResult message = dbus_send(path, x + "Execute", {"string:no-such-command", "string:"});
    EXPECT_NE(message.err.find("CommandNotFound: The command no-such-command has not been found"),
              std::string::npos)
        << message.err;
}

// A new client's first calls wait for its credentials (asked of the bus daemon asynchronously:
// the loop goes on meanwhile), then run in their order, each audited with the uid and pid the
// bus reported.
TEST_F(DbusLifecycleTest, ANewClientsPipelinedCallsRunOnceItsCredentialsAreIn)
{
    ASSERT_NO_FATAL_FAILURE(start_bus_daemon());
    ASSERT_EQ(busctl({"call", "org.qmachined1", manager, manager_iface, "CreateMachine", "ss", "f",
                      quick_spec()})
                  .status,
              0);
    ASSERT_EQ(busctl({"call", "org.qmachined1", manager, manager_iface, "StartMachine", "s", "f"})
                  .status,
              0);
    const std::string path = "/org/qmachined1/machine/f";
    struct State
    {
        int answered = 0;
        std::vector<std::string> problems;
    } st;
    std::vector<sd_bus_slot*> slots;
    auto done = [](sd_bus_message* r, void* userdata, sd_bus_error*) -> int {
        auto* s = static_cast<State*>(userdata);
        ++s->answered;
        if (const sd_bus_error* e = sd_bus_message_get_error(r); e != nullptr) {
            s->problems.push_back(std::string(e->name) + ": " + (e->message ? e->message : ""));
        }
        return 0;
    };
    // Nothing sent on this connection before: every call below reaches the daemon before it
    // knows who the sender is.
    for (int i = 0; i < 20; ++i) {
        sd_bus_slot* slot = nullptr;
        ASSERT_GE(sd_bus_call_method_async(client(), &slot, "org.qmachined1", path.c_str(),
                                           machine_iface, "Execute", done, &st, "ss",
                                           "query-status", ""),
                  0);
        slots.push_back(slot);
    }
    ASSERT_TRUE(pump_until([&] { return st.answered == 20; }, 60s)) << st.answered;
    EXPECT_TRUE(st.problems.empty()) << st.problems.front();
    const char* unique = nullptr;
    ASSERT_GE(sd_bus_get_unique_name(client(), &unique), 0);
    EXPECT_TRUE(daemon().says(fmt::format("op=qmp:query-status machine=f result=ok "
                                          "caller=\"dbus={} uid=0 pid={}\"",
                                          unique, ::getpid())))
        << daemon().output();
    EXPECT_EQ(busctl({"call", "org.qmachined1", manager, manager_iface, "KillMachine", "s", "f"})
                  .status,
              0);
    for (sd_bus_slot* s : slots) {
        sd_bus_slot_unref(s);
    }
}

// The allowed side of the daemon's own check: a caller whose supplementary groups hold the
// group qmachined may do what root may (the bus here is permissive: only the daemon decides).
TEST_F(DbusLifecycleTest, AMemberOfTheGroupQmachinedMayChangeThings)
{
    const group* g = ::getgrnam("qmachined");
    ASSERT_NE(g, nullptr) << "the group qmachined (scripts/deps applies sysusers.d)";
    const std::string gid = std::to_string(g->gr_gid);
    ASSERT_NO_FATAL_FAILURE(start_bus_daemon());
    CommandResult made = dbus_send(manager, "org.qmachined1.Manager.CreateMachine",
                                   {"string:g", "string:" + quick_spec()}, nobody, gid);
    EXPECT_EQ(made.status, 0) << made.err << made.out;
    CommandResult log = dbus_send("/org/qmachined1/machine/g", "org.qmachined1.Machine.GetLog",
                                  {"uint32:10"}, nobody, "100," + gid);
    EXPECT_EQ(log.status, 0) << log.err << log.out;
    CommandResult spec = dbus_send("/org/qmachined1/machine/g",
                                   "org.freedesktop.DBus.Properties.Get",
                                   {"string:org.qmachined1.Machine", "string:Spec"}, nobody, gid);
    EXPECT_NE(spec.out.find("qemu-system-x86_64"), std::string::npos) << spec.err << spec.out;
    CommandResult removed = dbus_send(manager, "org.qmachined1.Manager.DeleteMachine",
                                      {"string:g", "boolean:true"}, nobody, gid);
    EXPECT_EQ(removed.status, 0) << removed.err << removed.out;
    EXPECT_TRUE(daemon().says(fmt::format("op=create machine=g result=ok caller=\"dbus=")))
        << daemon().output();
    EXPECT_TRUE(daemon().says(fmt::format("uid={} ", nobody))) << daemon().output();
    // Without the group, the same caller is refused.
    CommandResult denied = dbus_send(manager, "org.qmachined1.Manager.CreateMachine",
                                     {"string:h", "string:" + quick_spec()}, nobody, "100");
    EXPECT_NE(denied.err.find("org.qmachined1.Error.AccessDenied"), std::string::npos)
        << denied.err << denied.out;
}

TEST_F(DbusLifecycleTest, ACallerWithoutRightsIsDeniedAndNothingChanges)
{
    ASSERT_NO_FATAL_FAILURE(start_bus_daemon());
    create_quick("r");
    const std::string path = "/org/qmachined1/machine/r";
    const std::string denied = "Error org.qmachined1.Error.AccessDenied:";
    auto as_nobody = [&](const std::string& object, const std::string& method,
                         std::vector<std::string> args) {
        return dbus_send(object, method, std::move(args), nobody);
    };
    // Looking is for everyone.
    CommandResult list = as_nobody(manager, "org.qmachined1.Manager.ListMachines", {});
    EXPECT_EQ(list.status, 0) << list.err;
    EXPECT_NE(list.out.find("\"r\""), std::string::npos) << list.out;
    CommandResult state = as_nobody(path, "org.freedesktop.DBus.Properties.Get",
                                    {"string:org.qmachined1.Machine", "string:State"});
    EXPECT_EQ(state.status, 0) << state.err;
    EXPECT_NE(state.out.find("\"defined\""), std::string::npos) << state.out;
    // Changing, running QMP and reading the spec or the log are not.
    for (const auto& [object, method, args] :
         std::vector<std::tuple<std::string, std::string, std::vector<std::string>>>{
             {manager, "org.qmachined1.Manager.CreateMachine", {"string:n", "string:"}},
             {manager, "org.qmachined1.Manager.StartMachine", {"string:r"}},
             {manager, "org.qmachined1.Manager.DeleteMachine", {"string:r", "boolean:true"}},
             {manager, "org.qmachined1.Manager.StopMachine",
              {"string:r", "string:quit", "uint64:1000000"}},
             {manager, "org.qmachined1.Manager.KillMachine", {"string:r"}},
             {manager, "org.qmachined1.Manager.StopAll", {"uint32:4"}},
             {path, "org.qmachined1.Machine.Start", {}},
             {path, "org.qmachined1.Machine.Stop", {"string:quit", "uint64:1000000"}},
             {path, "org.qmachined1.Machine.Kill", {}},
             {path, "org.qmachined1.Machine.Pause", {}},
             {path, "org.qmachined1.Machine.Resume", {}},
             {path, "org.qmachined1.Machine.Restart", {}},
             {path, "org.qmachined1.Machine.Execute", {"string:query-status", "string:"}},
             {path, "org.qmachined1.Machine.GetLog", {"uint32:10"}},
             {path, "org.qmachined1.Machine.WaitEvent",
              {"string:", "string:", "uint64:0", "uint64:1000"}},
             {path, "org.freedesktop.DBus.Properties.Get",
              {"string:org.qmachined1.Machine", "string:Spec"}}}) {
        CommandResult r = as_nobody(object, method, args);
        EXPECT_NE(r.err.find(denied), std::string::npos) << method << ": " << r.err << r.out;
    }
    // Nothing changed: one machine, still defined, no QEMU.
    EXPECT_EQ(busctl({"call", "org.qmachined1", manager, manager_iface, "ListMachines"}).out,
              "a(sso) 1 \"r\" \"defined\" \"/org/qmachined1/machine/r\"\n");
    EXPECT_TRUE(qemus().empty());
    // Each refused mutating call has its audit line, naming the caller.
    for (const char* line :
         {"op=create machine=n result=AccessDenied caller=\"dbus=",
          "op=start machine=r result=AccessDenied", "op=delete machine=r result=AccessDenied",
          "op=qmp:query-status machine=r result=AccessDenied"}) {
        EXPECT_TRUE(daemon().says(line)) << line << "\n" << daemon().output();
    }
    EXPECT_TRUE(daemon().says(fmt::format("uid={} ", nobody))) << daemon().output();
}

// The error names of limits, a hung monitor and a daemon that is stopping.
TEST_F(DbusLifecycleTest, LimitExceededUnresponsiveAndShuttingDown)
{
    ASSERT_NO_FATAL_FAILURE(start_bus_daemon({"--max-machines", "2", "--qmp-timeout", "1"}));
    auto expect_error = [&](const std::string& object, const std::string& method,
                            std::vector<std::string> args, const std::string& name) {
        CommandResult r = dbus_send(object, method, std::move(args));
        EXPECT_NE(r.err.find("Error " + name + ":"), std::string::npos)
            << method << " wanted " << name << ", got: " << r.err << r.out;
    };
    const std::string path = create_quick("h");
    // A stop that takes a while: -machine none has no ACPI, the power button is ignored for 6 s.
    const std::string slow_spec = fmt::format(
        R"({{"binary": {}, "machine": "none", "shutdown": {{"mode": "powerdown", "timeout_s": 6}}}})",
        json::quote(QemuProcess::binary()));
    ASSERT_EQ(busctl({"call", "org.qmachined1", manager, manager_iface, "CreateMachine", "ss",
                      "slow", slow_spec})
                  .status,
              0);
    expect_error(manager, "org.qmachined1.Manager.CreateMachine", {"string:third", "string:"},
                 "org.qmachined1.Error.LimitExceeded");

    // A monitor that stops answering (QEMU stopped with SIGSTOP): the command times out, the
    // probe finds the monitor dead, and QMP is refused until it answers again.
    sd_bus_message_unref(call(path, machine_iface, "Start"));
    std::uint32_t pid = 0;
    sd_bus_error error{};
    ASSERT_GE(sd_bus_get_property_trivial(client(), "org.qmachined1", path.c_str(), machine_iface,
                                          "Pid", &error, 'u', &pid),
              0);
    ASSERT_GT(pid, 0U);
    ASSERT_EQ(::kill(static_cast<pid_t>(pid), SIGSTOP), 0);
    expect_error(path, "org.qmachined1.Machine.Execute", {"string:query-status", "string:"},
                 "org.qmachined1.Error.Timeout");
    EXPECT_TRUE(eventually([&] { return string_property(path, "State") == "unresponsive"; }, 20s));
    expect_error(path, "org.qmachined1.Machine.Execute", {"string:query-status", "string:"},
                 "org.qmachined1.Error.Unresponsive");
    ASSERT_EQ(::kill(static_cast<pid_t>(pid), SIGCONT), 0);
    EXPECT_TRUE(eventually([&] { return string_property(path, "State") == "running"; }, 20s));

    // SIGTERM with stop-machines: while "slow" takes its 6 s, new operations are refused.
    sd_bus_message_unref(call(manager, manager_iface, "StartMachine", "s", "slow"));
    daemon().signal(SIGTERM);
    ASSERT_TRUE(eventually([&] { return daemon().says("stopping every machine"); }, 10s));
    expect_error(manager, "org.qmachined1.Manager.StartMachine", {"string:h"},
                 "org.qmachined1.Error.ShuttingDown");
    EXPECT_EQ(daemon().wait_exit(30s), 0) << daemon().output();
    expect_daemon_gone();
    sd_bus_error_free(&error);
}

// The installed bus policy (systemd/org.qmachined1.conf) is the first fence: another user may
// look but is refused by the bus itself before the daemon sees the call.
class DbusPolicyTest : public DbusLifecycleTest
{
protected:
    DbusPolicyTest() { system_policy_ = true; }
};

TEST_F(DbusPolicyTest, TheInstalledPolicyLetsOthersLookOnly)
{
    ASSERT_NO_FATAL_FAILURE(start_bus_daemon());
    create_quick("p");
    const std::string path = "/org/qmachined1/machine/p";
    CommandResult list = dbus_send(manager, "org.qmachined1.Manager.ListMachines", {}, nobody);
    EXPECT_EQ(list.status, 0) << list.err;
    CommandResult state = dbus_send(path, "org.freedesktop.DBus.Properties.Get",
                                    {"string:org.qmachined1.Machine", "string:State"}, nobody);
    EXPECT_EQ(state.status, 0) << state.err;
    CommandResult start = dbus_send(path, "org.qmachined1.Machine.Start", {}, nobody);
    EXPECT_NE(start.err.find("Error org.freedesktop.DBus.Error.AccessDenied"), std::string::npos)
        << start.err;
    CommandResult create = dbus_send(manager, "org.qmachined1.Manager.CreateMachine",
                                     {"string:q", "string:"}, nobody);
    EXPECT_NE(create.err.find("Error org.freedesktop.DBus.Error.AccessDenied"), std::string::npos)
        << create.err;
    // Root is let through.
    EXPECT_EQ(busctl({"call", "org.qmachined1", path, machine_iface, "Start"}).status, 0);
    EXPECT_EQ(qemus().size(), 1U);
}

} // namespace
} // namespace qm::test
