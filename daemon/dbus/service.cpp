// SPDX-License-Identifier: GPL-2.0-or-later
// The D-Bus front end's plumbing: objects, credentials, replies sent later, signals from events.
#include "daemon/dbus/service.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "daemon/audit.hpp"
#include "daemon/supervisor/errors.hpp"
#include "daemon/supervisor/events.hpp"
#include "daemon/supervisor/supervisor.hpp"

namespace qm::dbus {

namespace {

// The machine a path under machine_prefix names, if it is one (sd_bus_path_decode).
std::optional<std::string> machine_of(const char* path)
{
    char* name = nullptr;
    if (sd_bus_path_decode(path, machine_prefix, &name) <= 0 || name == nullptr) {
        return std::nullopt;
    }
    std::string out(name);
    std::free(name);
    return out;
}

// sd-bus's fallback lookup: the object exists while the machine does.
int find_machine(sd_bus*, const char* path, const char*, void* userdata, void** found,
                 sd_bus_error*)
{
    auto* service = static_cast<Service*>(userdata);
    auto name = machine_of(path);
    if (!name || !service->supervisor().inspect(*name)) {
        return 0;
    }
    *found = service;
    return 1;
}

// Every machine's path, for introspection and GetManagedObjects.
int enumerate_machines(sd_bus*, const char*, void* userdata, char*** nodes, sd_bus_error*)
{
    auto* service = static_cast<Service*>(userdata);
    const auto machines = service->supervisor().list();
    auto** out = static_cast<char**>(std::calloc(machines.size() + 1, sizeof(char*)));
    if (out == nullptr) {
        return -ENOMEM;
    }
    std::size_t n = 0;
    for (const auto& m : machines) {
        out[n] = ::strdup(Service::machine_path(m.name).c_str());
        if (out[n] == nullptr) {
            for (std::size_t i = 0; i < n; ++i) {
                std::free(out[i]);
            }
            std::free(out);
            return -ENOMEM;
        }
        ++n;
    }
    *nodes = out;
    return 1;
}

} // namespace

Service::Service(asio::io_context& ioc, daemon::Supervisor& supervisor, std::unique_ptr<Bus> bus,
                 ServiceOptions options)
    : ioc_(ioc), supervisor_(supervisor), bus_(std::move(bus)), options_(std::move(options))
{
    sd_bus* b = bus_->get();
    // Each slot keeps a reference to the bus: kept here, released in the destructor. (The call
    // is made before its slot is read: an argument list has no order of evaluation.)
    auto add = [this](int r, sd_bus_slot* slot, const char* what) {
        if (r < 0) {
            spdlog::error("D-Bus: cannot add {}: {}", what, std::strerror(-r));
            return;
        }
        slots_.push_back(slot);
    };
    sd_bus_slot* slot = nullptr;
    int r = sd_bus_add_object_vtable(b, &slot, manager_path, manager_interface, manager_vtable(),
                                     this);
    add(r, slot, "the Manager");
    slot = nullptr;
    r = sd_bus_add_fallback_vtable(b, &slot, machine_prefix, machine_interface, machine_vtable(),
                                   find_machine, this);
    add(r, slot, "the Machine objects");
    slot = nullptr;
    r = sd_bus_add_node_enumerator(b, &slot, machine_prefix, enumerate_machines, this);
    add(r, slot, "the machine enumerator");
    slot = nullptr;
    r = sd_bus_add_object_manager(b, &slot, manager_path);
    add(r, slot, "the ObjectManager");
    listener_ = supervisor_.events().listen([this](const daemon::Event& e) { on_event(e); });
}

Service::~Service()
{
    supervisor_.events().unlisten(listener_);
    for (auto& [sender, lookup] : lookups_) {
        sd_bus_slot_unref(lookup->slot);
        for (const Waiting& w : lookup->calls) {
            sd_bus_message_unref(w.m); // unanswered: the bus goes with us
        }
    }
    lookups_.clear();
    for (sd_bus_slot* s : slots_) {
        sd_bus_slot_unref(s);
    }
    bus_->close();
}

void Service::start()
{
    bus_->request_name(bus_name);
}

std::string Service::machine_path(std::string_view name)
{
    char* path = nullptr;
    const std::string n(name);
    if (sd_bus_path_encode(machine_prefix, n.c_str(), &path) < 0 || path == nullptr) {
        return std::string(machine_prefix) + "/_";
    }
    std::string out(path);
    std::free(path);
    return out;
}

int Service::set_error(const Error& e, sd_bus_error* error)
{
    const auto& info = daemon::error_info(e);
    const std::string name(info.dbus_name);
    std::string message = e.message;
    if (!e.qmp_class.empty()) {
        // QMP's own class and description, as the REST problem's `class` and `desc`.
        message = fmt::format("{}: {}", e.qmp_class, e.qmp_desc);
    }
    return sd_bus_error_set(error, name.c_str(), message.c_str());
}

int Service::authorize(sd_bus_message* m, sd_bus_error* error, std::string_view op,
                       std::string_view machine)
{
    const char* sender = sd_bus_message_get_sender(m);
    const std::string key = sender != nullptr ? sender : "";
    auto it = peers_.find(key);
    if (it == peers_.end() || key.empty()) {
        // Only where with_credentials() could not run first (the Spec property's getter, which
        // must answer at once): a synchronous round trip to the bus daemon, once per client
        // connection; the verdict is remembered (unique names are never reused on a bus).
        // The call waits in ppoll(), which a signal (SIGCHLD when a QEMU exits) interrupts:
        // sd-bus then gives up with -EINTR; ask again.
        // Bounded: a bus daemon that does not answer stalls the loop 1 s at most, not sd-bus's
        // default 25 s.
        sd_bus* b = bus_->get();
        std::uint64_t usual_timeout = 0;
        const bool bounded = sd_bus_get_method_call_timeout(b, &usual_timeout) >= 0 &&
                             sd_bus_set_method_call_timeout(b, 1000000) >= 0;
        sd_bus_creds* creds = nullptr;
        int r = -EINTR;
        for (int attempt = 0; attempt < 5 && r == -EINTR; ++attempt) {
            r = sd_bus_query_sender_creds(m,
                                          SD_BUS_CREDS_UID | SD_BUS_CREDS_EUID |
                                              SD_BUS_CREDS_PID | SD_BUS_CREDS_AUGMENT,
                                          &creds);
        }
        if (bounded) {
            sd_bus_set_method_call_timeout(b, usual_timeout);
        }
        if (r < 0) {
            return sd_bus_error_set_errnof(error, -r, "cannot read the caller's credentials: %s",
                                           std::strerror(-r));
        }
        uid_t uid = 0;
        if (sd_bus_creds_get_euid(creds, &uid) < 0 && sd_bus_creds_get_uid(creds, &uid) < 0) {
            uid = static_cast<uid_t>(-1);
        }
        pid_t pid = 0;
        (void)sd_bus_creds_get_pid(creds, &pid);
        sd_bus_creds_unref(creds);
        it = remember(key, verdict(key, uid, pid));
    }
    if (!it->second.allowed) {
        if (!op.empty()) {
            daemon::audit(daemon::Caller{it->second.who}, op, machine, "AccessDenied");
        }
        return sd_bus_error_set(error, "org.qmachined1.Error.AccessDenied",
                                "only root, qmachined's user and the qmachined group may do this");
    }
    return 1;
}

Service::Peers::iterator Service::remember(const std::string& sender, Peer peer)
{
    if (peers_.size() >= 4096) {
        peers_.clear(); // bounded; a verdict costs one more round trip to find again
    }
    return peers_.insert_or_assign(sender, std::move(peer)).first;
}

Service::Peer Service::verdict(const std::string& sender, uid_t uid, pid_t pid) const
{
    Peer peer;
    peer.allowed = uid == 0 || uid == ::geteuid();
    if (!peer.allowed && options_.admin_group && pid > 0) {
        // The groups from /proc (as SD_BUS_CREDS_AUGMENT reads them): the bus daemon of Debian
        // 12 (dbus 1.14) does not report them.
        sd_bus_creds* creds = nullptr;
        if (sd_bus_creds_new_from_pid(&creds, pid,
                                      SD_BUS_CREDS_GID | SD_BUS_CREDS_SUPPLEMENTARY_GIDS) >= 0) {
            gid_t gid = 0;
            if (sd_bus_creds_get_gid(creds, &gid) >= 0 && gid == *options_.admin_group) {
                peer.allowed = true;
            }
            const gid_t* gids = nullptr;
            const int n = sd_bus_creds_get_supplementary_gids(creds, &gids);
            for (int i = 0; i < n && !peer.allowed; ++i) {
                peer.allowed = gids[i] == *options_.admin_group;
            }
            sd_bus_creds_unref(creds);
        }
    }
    peer.who = fmt::format("dbus={} uid={} pid={}", sender,
                           uid == static_cast<uid_t>(-1) ? std::string("?") : std::to_string(uid),
                           pid);
    return peer;
}

int Service::with_credentials(sd_bus_message* m, sd_bus_message_handler_t handler,
                              sd_bus_error* error)
{
    const char* sender = sd_bus_message_get_sender(m);
    if (sender == nullptr || peers_.contains(std::string_view(sender))) {
        return handler(m, this, error); // known (or a direct connection: authorize() decides)
    }
    auto it = lookups_.find(std::string_view(sender));
    if (it == lookups_.end()) {
        auto lookup = std::make_unique<Lookup>();
        lookup->service = this;
        lookup->sender = sender;
        const int r = sd_bus_call_method_async(
            bus_->get(), &lookup->slot, "org.freedesktop.DBus", "/org/freedesktop/DBus",
            "org.freedesktop.DBus", "GetConnectionCredentials", &Service::on_credentials,
            lookup.get(), "s", sender);
        if (r < 0) {
            return sd_bus_error_set_errnof(error, -r, "cannot read the caller's credentials: %s",
                                           std::strerror(-r));
        }
        it = lookups_.emplace(lookup->sender, std::move(lookup)).first;
    }
    it->second->calls.push_back(Waiting{sd_bus_message_ref(m), handler});
    return 1;
}

int Service::on_credentials(sd_bus_message* reply, void* userdata, sd_bus_error*)
{
    auto* lookup = static_cast<Lookup*>(userdata);
    Service* self = lookup->service;
    auto node = self->lookups_.extract(lookup->sender);
    if (node.empty()) {
        return 0;
    }
    std::unique_ptr<Lookup> owned = std::move(node.mapped());
    self->credentials_arrived(*owned, reply);
    sd_bus_slot_unref(owned->slot);
    owned->slot = nullptr;
    return 0;
}

void Service::credentials_arrived(Lookup& lookup, sd_bus_message* reply)
{
    std::optional<uid_t> uid;
    pid_t pid = 0;
    std::string problem;
    if (const sd_bus_error* e = sd_bus_message_get_error(reply); e != nullptr) {
        problem = e->message != nullptr ? e->message : (e->name != nullptr ? e->name : "error");
    } else if (sd_bus_message_enter_container(reply, 'a', "{sv}") >= 0) {
        while (sd_bus_message_enter_container(reply, 'e', "sv") > 0) {
            const char* key = nullptr;
            std::uint32_t value = 0;
            if (sd_bus_message_read(reply, "s", &key) < 0) {
                break;
            }
            const std::string_view k = key != nullptr ? key : "";
            if ((k == "UnixUserID" || k == "ProcessID") &&
                sd_bus_message_read(reply, "v", "u", &value) >= 0) {
                if (k == "UnixUserID") {
                    uid = static_cast<uid_t>(value);
                } else {
                    pid = static_cast<pid_t>(value);
                }
            } else {
                sd_bus_message_skip(reply, "v");
            }
            sd_bus_message_exit_container(reply);
        }
        sd_bus_message_exit_container(reply);
    }
    if (!uid && problem.empty()) {
        problem = "the bus did not say the caller's uid";
    }
    if (problem.empty()) {
        remember(lookup.sender, verdict(lookup.sender, *uid, pid));
    }
    for (const Waiting& w : lookup.calls) {
        sd_bus_error error{};
        int r = 0;
        if (problem.empty()) {
            sd_bus_message_rewind(w.m, 1);
            r = w.handler(w.m, this, &error);
        } else {
            r = sd_bus_error_setf(&error, SD_BUS_ERROR_ACCESS_DENIED,
                                  "cannot read the caller's credentials: %s", problem.c_str());
        }
        if (sd_bus_error_is_set(&error)) {
            sd_bus_reply_method_error(w.m, &error);
        } else if (r < 0) {
            sd_bus_reply_method_errno(w.m, r, nullptr);
        }
        sd_bus_error_free(&error);
        sd_bus_message_unref(w.m);
    }
    lookup.calls.clear();
    bus_->schedule();
}

std::string Service::caller(sd_bus_message* m) const
{
    const char* sender = sd_bus_message_get_sender(m);
    if (auto it = peers_.find(sender != nullptr ? sender : ""); it != peers_.end()) {
        return it->second.who;
    }
    return fmt::format("dbus={}", sender != nullptr ? sender : "?");
}

int Service::reply_later(sd_bus_message* m, awaitable<expected<BodyWriter>> work)
{
    sd_bus_message_ref(m);
    asio::co_spawn(ioc_, run_later(m, std::move(work)), [](const std::exception_ptr& e) {
        if (e) {
            spdlog::error("Failed to answer a D-Bus call: {}", describe_exception(e));
        }
    });
    return 1;
}

awaitable<void> Service::run_later(sd_bus_message* m, awaitable<expected<BodyWriter>> work)
{
    const std::weak_ptr<int> life = life_;
    expected<BodyWriter> result = fail(errc::internal, "no answer");
    try {
        result = co_await std::move(work);
    } catch (const std::exception& e) {
        result = fail(errc::internal, e.what());
    }
    if (life.expired()) {
        sd_bus_message_unref(m);
        co_return; // the front end is gone with its bus: nobody to answer
    }
    int r = 0;
    if (!result) {
        sd_bus_error error{}; // SD_BUS_ERROR_NULL is a C compound literal (clang: -Wc99-extensions)
        set_error(result.error(), &error);
        r = sd_bus_reply_method_error(m, &error);
        sd_bus_error_free(&error);
    } else if (!*result) {
        r = sd_bus_reply_method_return(m, nullptr);
    } else {
        sd_bus_message* reply = nullptr;
        r = sd_bus_message_new_method_return(m, &reply);
        if (r >= 0) {
            r = (*result)(reply);
        }
        if (r >= 0) {
            r = sd_bus_send(nullptr, reply, nullptr);
        }
        sd_bus_message_unref(reply);
    }
    if (r < 0) {
        spdlog::debug("D-Bus: cannot answer {}.{}: {}", sd_bus_message_get_interface(m),
                      sd_bus_message_get_member(m), std::strerror(-r));
    }
    sd_bus_message_unref(m);
    bus_->schedule();
}

void Service::on_event(const daemon::Event& e)
{
    sd_bus* b = bus_->get();
    if (b == nullptr || e.machine().empty()) {
        return;
    }
    const std::string name(e.machine());
    const std::string path = machine_path(name);
    const std::string_view event = e.name();
    if (event == daemon::event_names::machine_created) {
        sd_bus_emit_signal(b, manager_path, manager_interface, "MachineNew", "so", name.c_str(),
                           path.c_str());
        sd_bus_emit_interfaces_added(b, path.c_str(), machine_interface, nullptr);
    } else if (event == daemon::event_names::machine_removed) {
        sd_bus_emit_signal(b, manager_path, manager_interface, "MachineRemoved", "so", name.c_str(),
                           path.c_str());
        sd_bus_emit_interfaces_removed(b, path.c_str(), machine_interface, nullptr);
    } else if (e.is_qmp()) {
        const std::string data = json::to_string(e.data());
        sd_bus_emit_signal(b, path.c_str(), machine_interface, "QmpEvent", "tsst", e.seq(),
                           std::string(event).c_str(), data.c_str(),
                           static_cast<std::uint64_t>(e.timestamp_us()));
    } else {
        // A state change, an update, a re-attach, a scheduled restart: the properties that
        // follow the model (those flagged to emit changes).
        sd_bus_emit_properties_changed_strv(b, path.c_str(), machine_interface, nullptr);
    }
    bus_->schedule();
}

} // namespace qm::dbus
