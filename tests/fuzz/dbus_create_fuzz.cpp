// SPDX-License-Identifier: GPL-2.0-or-later
// libFuzzer target for the D-Bus CreateMachine(s name, s spec_json) as the daemon handles it:
// manager.cpp's method_create reads the two strings and hands them to calls.cpp's create_call,
// which runs Supervisor::create and gives the reply's body or the error that Service::set_error
// turns into the D-Bus error.
//
// The input is the name and the spec, split at the first newline or NUL byte (none: the whole
// input is the name, the spec is ""). A D-Bus string holds no NUL and is valid UTF-8: a part that
// is not is refused by the caller's sd-bus before the daemon sees it, so such inputs stop here (the
// strings are appended to a real CreateMachine message, and sd-bus decides; then they are read
// back as method_create reads them).
//
// create_call is called itself, with a real Supervisor (private state and runtime directories,
// on tmpfs when there is one) and a real Service, whose Bus is connected to a socket that hangs up
// during authentication: create_call uses only the Supervisor, and a Service whose bus is gone
// emits no signals (as the daemon's after losing the bus). The Supervisor lives across inputs;
// a machine created by an input is deleted before the next one.
//
// What must hold:
//  - success: the reply body is the machine's object path (a valid one, Service::machine_path);
//    the machine exists, and its spec, in the model and in its definition file, is what parse_spec
//    makes of spec_json ("" is {}; the generated uuid aside when spec_json has none);
//  - failure: the error is InvalidArgument (nothing else can fail here); its D-Bus error name is
//    the error table's, under org.qmachined1.Error., and a reply with it can be built; the message
//    is non-empty printable ASCII.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <spdlog/spdlog.h>
#include <systemd/sd-bus.h>

#include "daemon/dbus/bus.hpp"
#include "daemon/dbus/calls.hpp"
#include "daemon/dbus/service.hpp"
#include "daemon/supervisor/errors.hpp"
#include "daemon/supervisor/spec.hpp"
#include "daemon/supervisor/supervisor.hpp"
#include "libmachine/asio.hpp"
#include "libmachine/json.hpp"
#include "libmachine/proc/child_watcher.hpp"
#include "tests/fuzz/fuzz_loop.hpp"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using BodyWriter = qm::dbus::Service::BodyWriter;

void check(bool ok, const char* what)
{
    if (!ok) {
        std::fprintf(stderr, "dbus_create_fuzz: %s\n", what);
        std::abort();
    }
}

bool printable_ascii(std::string_view s)
{
    for (unsigned char c : s) {
        if (c < 0x20 || c >= 0x7f) {
            return false;
        }
    }
    return true;
}

struct Fixture
{
    qm::asio::io_context ioc{1};
    qm::fuzz::ScratchDir scratch{"qm-dbus-fuzz"};
    const fs::path root = scratch.path();
    std::unique_ptr<qm::daemon::Supervisor> supervisor;
    std::unique_ptr<qm::dbus::Service> service;
    // A client connection of our own (a socketpair nobody reads): CreateMachine messages are built
    // on it, so that sd-bus checks the arguments as a caller's sd-bus would.
    sd_bus* client = nullptr;

    Fixture()
    {
        spdlog::set_level(spdlog::level::off);
        qm::daemon::SupervisorOptions options;
        options.state_dir = (root / "state").string();
        options.runtime_dir = (root / "run").string();
        fs::create_directories(options.state_dir);
        fs::create_directories(options.runtime_dir);
        supervisor = std::make_unique<qm::daemon::Supervisor>(ioc, options);
        check(supervisor->load().has_value(), "the supervisor cannot load");
        open_service();

        int pair[2];
        check(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, pair) == 0,
              "socketpair");
        peer_fd = pair[1];
        check(sd_bus_new(&client) >= 0 && sd_bus_set_fd(client, pair[0], pair[0]) >= 0 &&
                  sd_bus_start(client) >= 0,
              "cannot set up the client bus");
    }

    ~Fixture()
    {
        service.reset();
        supervisor.reset();
        ioc.restart();
        ioc.poll();
        sd_bus_close_unref(client);
        ::close(peer_fd);
    }
    Fixture(const Fixture&) = delete;
    Fixture& operator=(const Fixture&) = delete;

    static Fixture& instance()
    {
        static Fixture f;
        return f;
    }

    // The Service on a Bus (Bus::open, as the daemon's) whose peer accepts and hangs up as soon
    // as the Service has registered its objects: the Bus sees the connection end during the
    // authentication and closes itself.
    void open_service()
    {
        const std::string path = (root / "bus").string();
        const int listener = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        check(path.size() < sizeof addr.sun_path, "the bus path is too long");
        std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
        check(listener >= 0 &&
                  ::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                  ::listen(listener, 1) == 0,
              "cannot listen for the bus");
        auto bus = qm::dbus::Bus::open(ioc, qm::dbus::BusAddress::parse("unix:path=" + path));
        check(bus.has_value(), "Bus::open failed");
        service = std::make_unique<qm::dbus::Service>(ioc, *supervisor, std::move(*bus),
                                                      qm::dbus::ServiceOptions{});
        const int accepted = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
        check(accepted >= 0, "cannot accept the bus connection");
        ::close(accepted);
        ::close(listener);
        ::unlink(path.c_str());
        qm::dbus::Bus& b = service->bus();
        check(run_until([&b] { return b.get() == nullptr; }, 10s),
              "the bus did not see its connection end");
    }

    template <class Done>
    bool run_until(Done done, std::chrono::milliseconds deadline)
    {
        return qm::fuzz::run_until(ioc, done, deadline);
    }

    // Runs `aw` to completion (operations on a defined machine never wait for long).
    template <class T>
    T run(qm::awaitable<T> aw)
    {
        std::optional<T> result;
        std::exception_ptr error;
        bool done = false;
        qm::asio::co_spawn(
            ioc,
            [](qm::awaitable<T> a, std::optional<T>* out) -> qm::awaitable<void> {
                out->emplace(co_await std::move(a));
            }(std::move(aw), &result),
            [&](const std::exception_ptr& e) {
                done = true;
                error = e;
            });
        check(run_until([&] { return done; }, 10s), "an operation did not complete in 10 s");
        if (error) {
            try {
                std::rethrow_exception(error);
            } catch (const std::exception& e) {
                std::fprintf(stderr, "dbus_create_fuzz: an exception escaped: %s\n", e.what());
            }
            std::abort();
        }
        return std::move(*result);
    }

    int peer_fd = -1;
};

// The arguments as method_create gets them: appended to a CreateMachine call by sd-bus (which
// refuses what is not a D-Bus string), sealed, and read back with "ss". nullopt when refused.
std::optional<std::pair<std::string, std::string>>
as_dbus_arguments(Fixture& fx, const std::string& name, const std::string& spec)
{
    if (name.find('\0') != std::string::npos || spec.find('\0') != std::string::npos) {
        return std::nullopt;
    }
    sd_bus_message* m = nullptr;
    int r =
        sd_bus_message_new_method_call(fx.client, &m, qm::dbus::bus_name, qm::dbus::manager_path,
                                       qm::dbus::manager_interface, "CreateMachine");
    check(r >= 0, "cannot build a CreateMachine call");
    std::optional<std::pair<std::string, std::string>> out;
    if (sd_bus_message_append(m, "ss", name.c_str(), spec.c_str()) >= 0) {
        check(sd_bus_message_seal(m, 1, 0) >= 0 && sd_bus_message_rewind(m, 1) >= 0,
              "cannot seal the call");
        const char* n = nullptr;
        const char* s = nullptr;
        check(sd_bus_message_read(m, "ss", &n, &s) >= 0, "cannot read the call back");
        out.emplace(n, s);
    }
    sd_bus_message_unref(m);
    return out;
}

// The reply body create_call gives, written into a method return as Service::run_later does,
// read back: the object path.
std::string reply_path(Fixture& fx, const BodyWriter& body)
{
    sd_bus_message* call = nullptr;
    sd_bus_message* reply = nullptr;
    check(sd_bus_message_new_method_call(fx.client, &call, qm::dbus::bus_name,
                                         qm::dbus::manager_path, qm::dbus::manager_interface,
                                         "CreateMachine") >= 0 &&
              sd_bus_message_seal(call, 2, 0) >= 0 &&
              sd_bus_message_new_method_return(call, &reply) >= 0,
          "cannot build a reply");
    check(static_cast<bool>(body), "a successful create has no reply body");
    check(body(reply) >= 0, "the reply body cannot be written");
    check(sd_bus_message_seal(reply, 3, 0) >= 0 && sd_bus_message_rewind(reply, 1) >= 0,
          "cannot seal the reply");
    const char* path = nullptr;
    check(sd_bus_message_read(reply, "o", &path) >= 0, "the reply is not an object path");
    std::string out(path);
    sd_bus_message_unref(reply);
    sd_bus_message_unref(call);
    return out;
}

void check_created(Fixture& fx, const std::string& name, const std::string& spec_json,
                   const BodyWriter& body)
{
    const std::string path = reply_path(fx, body);
    check(path == qm::dbus::Service::machine_path(name), "the reply is not the machine's path");
    check(sd_bus_object_path_is_valid(path.c_str()) > 0,
          "the machine's path is not an object path");

    auto info = fx.supervisor->inspect(name);
    check(info.has_value(), "a created machine does not exist");
    auto text =
        qm::json::parse(spec_json.empty() ? std::string_view("{}") : std::string_view(spec_json));
    check(text.has_value(), "an accepted spec_json does not parse");
    auto expected = qm::daemon::parse_spec(*text);
    check(expected.has_value(), "an accepted spec does not parse");
    if (qm::json::find(*text, "uuid") == nullptr) {
        expected->uuid = info->spec.uuid; // generated by the create
    }
    check(info->spec == *expected, "the model's spec is not what was parsed");

    std::ifstream f(fs::path(fx.supervisor->options().state_dir) / (name + ".json"),
                    std::ios::binary);
    const std::string file{std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
    auto def = qm::daemon::definition_from_json(file);
    check(def.has_value(), "the definition file does not load");
    check(def->name == name && def->generation == 1 && def->spec == *expected,
          "the definition file is not the machine created");

    auto removed = fx.run(fx.supervisor->remove(name, false));
    check(removed.has_value(), "a created machine cannot be deleted");
    check(fx.supervisor->size() == 0, "a machine is left after the delete");
}

void check_refused(const qm::Error& e)
{
    // Nothing else exists and the directories work: only the arguments can be wrong.
    check(e.is(qm::errc::invalid_argument),
          "a create failed for another reason than its arguments");
    sd_bus_error error{};
    qm::dbus::Service::set_error(e, &error);
    check(sd_bus_error_is_set(&error) > 0, "no D-Bus error is set");
    const std::string_view name(error.name);
    check(name == qm::daemon::error_info(e).dbus_name, "the error name is not the table's");
    check(name.starts_with("org.qmachined1.Error.") && name.size() > 21,
          "the error is not under org.qmachined1.Error.");
    const std::string_view message(error.message != nullptr ? error.message : "");
    check(!message.empty(), "the error message is empty");
    check(printable_ascii(message), "the error message is not printable ASCII");

    Fixture& fx = Fixture::instance();
    sd_bus_message* call = nullptr;
    sd_bus_message* reply = nullptr;
    check(sd_bus_message_new_method_call(fx.client, &call, qm::dbus::bus_name,
                                         qm::dbus::manager_path, qm::dbus::manager_interface,
                                         "CreateMachine") >= 0 &&
              sd_bus_message_seal(call, 4, 0) >= 0,
          "cannot build a call");
    check(sd_bus_message_new_method_error(call, &reply, &error) >= 0,
          "sd-bus refuses the error reply");
    sd_bus_message_unref(reply);
    sd_bus_message_unref(call);
    sd_bus_error_free(&error);
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    Fixture& fx = Fixture::instance();
    const std::string_view input(reinterpret_cast<const char*>(data), size);
    const std::size_t split = input.find_first_of(std::string_view("\n\0", 2));
    const std::string name(input.substr(0, split));
    const std::string spec =
        split == std::string_view::npos ? std::string() : std::string(input.substr(split + 1));
    auto args = as_dbus_arguments(fx, name, spec);
    if (!args) {
        return 0; // the caller's sd-bus refuses it
    }
    check(args->first == name && args->second == spec, "sd-bus changed the arguments");

    auto result = fx.run(qm::dbus::create_call(fx.service.get(), "uid=0 pid=1", name, spec));
    if (std::getenv("QM_FUZZ_TRACE") != nullptr) { // what the seeds reach
        std::fprintf(stderr, "%s\n", result ? "created" : result.error().message.c_str());
    }
    if (result) {
        check_created(fx, name, spec, *result);
    } else {
        check_refused(result.error());
        check(fx.supervisor->size() == 0, "a refused create left a machine");
    }
    check(!qm::asio::has_service<qm::proc::ChildWatcher>(fx.ioc), "a process was started");
    return 0;
}
