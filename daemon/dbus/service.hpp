// SPDX-License-Identifier: GPL-2.0-or-later
// The D-Bus front end: org.qmachined1 with its Manager object, one Machine object per machine, the
// ObjectManager, and the signals that follow the supervisor's events. Each method translates to one
// Supervisor operation, as the REST handlers do.
#pragma once

#include <systemd/sd-bus.h>

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "daemon/dbus/bus.hpp"
#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"

namespace qm::daemon {
class Supervisor;
class Event;
} // namespace qm::daemon

namespace qm::dbus {

inline constexpr const char* bus_name = "org.qmachined1";
inline constexpr const char* manager_path = "/org/qmachined1";
inline constexpr const char* machine_prefix = "/org/qmachined1/machine";
inline constexpr const char* manager_interface = "org.qmachined1.Manager";
inline constexpr const char* machine_interface = "org.qmachined1.Machine";

struct ServiceOptions
{
    // Besides root and the daemon's own uid, members of this group may do more than look
    // (nullopt: nobody else).
    std::optional<gid_t> admin_group{};
    // Bytes read from the end of a log at most (GetLog).
    std::size_t log_read_limit = 1024 * 1024;
};

// Owned by the daemon (after the supervisor: it listens to its events); loop thread only.
// Registers its objects at construction; start() asks for the bus name (after the re-attach).
// Methods that wait for QEMU keep their call and reply once done; many may be in flight. Errors
// are the D-Bus names of proto/errors.md; a wrong signature is sd-bus's own
// org.freedesktop.DBus.Error.InvalidArgs.
class Service
{
public:
    Service(asio::io_context& ioc, daemon::Supervisor& supervisor, std::unique_ptr<Bus> bus,
            ServiceOptions options);
    ~Service();
    Service(const Service&) = delete;
    Service& operator=(const Service&) = delete;

    // Asks for org.qmachined1: from now on clients find the daemon.
    void start();

    // The object path of machine `name` (sd_bus_path_encode).
    static std::string machine_path(std::string_view name);

    // For the interface files (manager.cpp, machine.cpp).
    daemon::Supervisor& supervisor() noexcept { return supervisor_; }
    const ServiceOptions& options() const noexcept { return options_; }
    Bus& bus() noexcept { return *bus_; }
    // Whether the sender of `m` may change things or read what is not public (root, the daemon's
    // uid, the admin group); else sets org.qmachined1.Error.AccessDenied in `error` and returns
    // false (a negative errno when its credentials cannot be read).
    // A refused mutating call (`op` names it, as the audit line does) is audited too.
    int authorize(sd_bus_message* m, sd_bus_error* error, std::string_view op = {},
                  std::string_view machine = {});
    // For the privileged methods of the vtables (through `credentialed<H>`): runs `handler` at
    // once when the sender's credentials are known, else asks the bus daemon for them
    // (GetConnectionCredentials, asynchronously: the loop never waits for the bus) and runs it
    // when they come, the calls of one sender in their order. Inside `handler`, authorize() then
    // decides without a round trip. Returns what the handler returns, or 1 (answered later).
    int with_credentials(sd_bus_message* m, sd_bus_message_handler_t handler, sd_bus_error* error);
    // Who sent `m`, for audit lines: "dbus=:1.42 uid=1000 pid=4242" (known once authorize() ran).
    std::string caller(sd_bus_message* m) const;
    // Replies to `m` once `work` completes: its value is the reply's body writer (nullptr for an
    // empty reply), its error the D-Bus error. Keeps `m` referenced meanwhile; returns 1 (the
    // method's "I reply later").
    using BodyWriter = std::function<int(sd_bus_message* reply)>;
    int reply_later(sd_bus_message* m, awaitable<expected<BodyWriter>> work);
    // Sets the D-Bus error of `e` (its name from the error table) in `error`; returns its -errno.
    static int set_error(const Error& e, sd_bus_error* error);

private:
    void on_event(const daemon::Event& e);
    awaitable<void> run_later(sd_bus_message* m, awaitable<expected<BodyWriter>> work);

    asio::io_context& ioc_;
    daemon::Supervisor& supervisor_;
    std::unique_ptr<Bus> bus_;
    ServiceOptions options_;
    std::vector<sd_bus_slot*> slots_;
    std::uint64_t listener_ = 0;
    // What the credentials of a unique sender name (":1.42"; never reused on a bus) said.
    struct Peer
    {
        bool allowed = false;
        std::string who;
    };
    using Peers = std::map<std::string, Peer, std::less<>>;
    Peers peers_;
    // Calls that wait for their sender's credentials, per sender, in arrival order; and the
    // GetConnectionCredentials call in flight for each such sender.
    struct Waiting
    {
        sd_bus_message* m;
        sd_bus_message_handler_t handler;
    };
    struct Lookup
    {
        Service* service;
        std::string sender;
        sd_bus_slot* slot = nullptr;
        std::vector<Waiting> calls;
    };
    std::map<std::string, std::unique_ptr<Lookup>, std::less<>> lookups_;
    static int on_credentials(sd_bus_message* reply, void* userdata, sd_bus_error* error);
    void credentials_arrived(Lookup& lookup, sd_bus_message* reply);
    // Who `sender` is and whether it may change things: uid 0 or the daemon's own, or the group
    // qmachined among the groups /proc gives for `pid`.
    Peer verdict(const std::string& sender, uid_t uid, pid_t pid) const;
    // Keeps a verdict (the map is bounded: emptied at 4096 senders).
    Peers::iterator remember(const std::string& sender, Peer peer);
    std::shared_ptr<int> life_ = std::make_shared<int>(0);
};

// A privileged method of a vtable: `H` runs once the sender's credentials are known
// (Service::with_credentials).
template <sd_bus_message_handler_t H>
int credentialed(sd_bus_message* m, void* userdata, sd_bus_error* error)
{
    return static_cast<Service*>(userdata)->with_credentials(m, H, error);
}

// The vtables (manager.cpp, machine.cpp); userdata is the Service.
const sd_bus_vtable* manager_vtable();
const sd_bus_vtable* machine_vtable();

} // namespace qm::dbus
