// SPDX-License-Identifier: GPL-2.0-or-later
#include "daemon/machined.hpp"

#include <array>
#include <cstdlib>
#include <cstring>
#include <utility>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "daemon/dbus/bus.hpp"
#include "daemon/supervisor/events.hpp"
#include "daemon/supervisor/supervisor.hpp"
#include "libmachine/json.hpp"

namespace qm::daemon {

namespace {

bool ldh(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-';
}

// "47925f21-2c16-4c9f-b3de-0859858c87be" -> 16 bytes; nullopt for anything else.
std::optional<std::array<std::uint8_t, 16>> uuid_bytes(std::string_view uuid)
{
    std::array<std::uint8_t, 16> out{};
    std::size_t n = 0;
    int high = -1;
    for (char c : uuid) {
        if (c == '-') {
            continue;
        }
        int v = -1;
        if (c >= '0' && c <= '9') {
            v = c - '0';
        } else if (c >= 'a' && c <= 'f') {
            v = c - 'a' + 10;
        } else if (c >= 'A' && c <= 'F') {
            v = c - 'A' + 10;
        }
        if (v < 0 || n >= out.size()) {
            return std::nullopt;
        }
        if (high < 0) {
            high = v;
        } else {
            out[n++] = static_cast<std::uint8_t>(high << 4 | v);
            high = -1;
        }
    }
    if (n != out.size() || high >= 0) {
        return std::nullopt;
    }
    return out;
}

// Errors that say machined is not there to ask (or will never let us).
bool means_absent(std::string_view name)
{
    return name == "org.freedesktop.DBus.Error.ServiceUnknown" ||
           name == "org.freedesktop.DBus.Error.NameHasNoOwner" ||
           name == "org.freedesktop.DBus.Error.AccessDenied" ||
           name == "org.freedesktop.systemd1.NoSuchUnit" ||
           name == "org.freedesktop.systemd1.UnitMasked" ||
           name == "org.freedesktop.DBus.Error.UnknownMethod" ||
           name.starts_with("org.freedesktop.DBus.Error.Spawn."); // activation failed
}

} // namespace

bool machined_name_valid(std::string_view name)
{
    if (name.empty() || name.size() > 64) {
        return false;
    }
    std::size_t start = 0;
    while (start <= name.size()) {
        const std::size_t dot = std::min(name.find('.', start), name.size());
        const std::string_view label = name.substr(start, dot - start);
        if (label.empty() || label.front() == '-' || label.back() == '-') {
            return false;
        }
        for (char c : label) {
            if (!ldh(c)) {
                return false;
            }
        }
        start = dot + 1;
    }
    return true;
}

// One CreateMachine in flight: what its reply is about. Freed with its slot (a reply, or the bus
// going away), so a registrar destroyed meanwhile is never called.
struct MachinedRegistrar::Call
{
    std::weak_ptr<int> life;
    MachinedRegistrar* self;
    std::string name;
    pid_t pid;
    int attempt;
};

MachinedRegistrar::MachinedRegistrar(asio::io_context& ioc, Supervisor& supervisor,
                                     dbus::Bus& bus, MachinedOptions options)
    : ioc_(ioc), supervisor_(supervisor), bus_(bus), options_(std::move(options))
{}

MachinedRegistrar::~MachinedRegistrar()
{
    if (listener_ != 0) {
        supervisor_.events().unlisten(listener_);
    }
}

void MachinedRegistrar::start()
{
    listener_ = supervisor_.events().listen([this](const Event& e) { on_event(e); });
    for (const MachineInfo& m : supervisor_.list()) {
        if (m.pid && (m.state == MachineState::running || m.state == MachineState::paused)) {
            register_machine(m.name);
        }
    }
}

void MachinedRegistrar::on_event(const Event& e)
{
    namespace names = event_names;
    const std::string name(e.machine());
    const std::string_view event = e.name();
    if (event == names::machine_removed) {
        asked_.erase(name);
        return;
    }
    const bool reattached = event == names::machine_reattached;
    if (!reattached && event != names::state_changed) {
        return;
    }
    const auto state = json::get_string(e.data(), "state").value_or("");
    if (state == "running" || state == "paused") {
        // A new QEMU (started running, or paused with -S), or one re-attached; a resume or a
        // pause of a registered one is asked for already (register_machine knows its pid).
        register_machine(name);
    } else if (state == "stopped" || state == "crashed" || state == "failed" ||
               state == "defined") {
        // machined forgets a machine once its scope is empty.
        asked_.erase(name);
    }
}

void MachinedRegistrar::register_machine(const std::string& name, int attempt)
{
    if (availability_ == Availability::absent) {
        return;
    }
    auto info = supervisor_.inspect(name);
    if (!info || !info->pid) {
        return;
    }
    const pid_t pid = *info->pid;
    if (auto it = asked_.find(name); it != asked_.end() && it->second == pid) {
        return; // asked already for this process
    }
    if (!machined_name_valid(name)) {
        spdlog::info("machined: '{}' is not a valid machine name for systemd-machined (a host "
                     "name: letters, digits, '-' and '.'): not registered",
                     name);
        return;
    }
    const auto id = uuid_bytes(info->spec.uuid);
    if (!id) {
        spdlog::warn("machined: '{}' has no valid uuid: not registered", name);
        return;
    }
    asked_[name] = pid;

    sd_bus_message* m = nullptr;
    int r = sd_bus_message_new_method_call(bus_.get(), &m, "org.freedesktop.machine1",
                                           "/org/freedesktop/machine1",
                                           "org.freedesktop.machine1.Manager", "CreateMachine");
    if (r >= 0) {
        r = sd_bus_message_append(m, "s", name.c_str());
    }
    if (r >= 0) {
        r = sd_bus_message_append_array(m, 'y', id->data(), id->size());
    }
    const std::string description = fmt::format("QEMU machine {} (qmachined)", name);
    if (r >= 0) {
        r = sd_bus_message_append(m, "ssus", "qmachined", "vm", static_cast<std::uint32_t>(pid),
                                  "");
    }
    if (r >= 0) {
        r = sd_bus_message_open_container(m, 'a', "(sv)");
    }
    if (r >= 0) {
        r = sd_bus_message_append(m, "(sv)", "Description", "s", description.c_str());
    }
    if (r >= 0 && !options_.scope_before.empty()) {
        r = sd_bus_message_append(m, "(sv)", "Before", "as", 1, options_.scope_before.c_str());
    }
    if (r >= 0) {
        r = sd_bus_message_close_container(m);
    }
    auto* call = new Call{life_, this, name, pid, attempt};
    sd_bus_slot* slot = nullptr;
    if (r >= 0) {
        r = sd_bus_call_async(
            bus_.get(), &slot, m,
            [](sd_bus_message* reply, void* userdata, sd_bus_error*) -> int {
                auto* c = static_cast<Call*>(userdata);
                if (c->life.lock()) {
                    c->self->finished(c->name, c->pid, c->attempt,
                                      sd_bus_message_get_error(reply));
                }
                return 0;
            },
            call, static_cast<std::uint64_t>(options_.timeout.count()) * 1000);
    }
    sd_bus_message_unref(m);
    if (r < 0) {
        delete call;
        asked_.erase(name);
        spdlog::warn("machined: cannot ask to register '{}': {}", name, std::strerror(-r));
        return;
    }
    keep_until_reply(slot);
}

void MachinedRegistrar::keep_until_reply(sd_bus_slot* slot)
{
    // The slot frees its Call with itself: after the reply, or with the bus.
    sd_bus_slot_set_destroy_callback(slot, [](void* userdata) { delete static_cast<Call*>(userdata); });
    sd_bus_slot_set_floating(slot, 1);
    sd_bus_slot_unref(slot);
    bus_.schedule();
}

void MachinedRegistrar::finished(const std::string& name, pid_t pid, int attempt,
                                 const sd_bus_error* error)
{
    if (error == nullptr || !sd_bus_error_is_set(error)) {
        if (availability_ != Availability::available) {
            spdlog::info("machined: registering machines with systemd-machined");
        }
        availability_ = Availability::available;
        spdlog::info("machined: registered '{}' (pid {}): machine-{}.scope", name, pid, name);
        return;
    }
    const std::string_view error_name = error->name != nullptr ? error->name : "";
    const std::string message = error->message != nullptr ? error->message : "";
    if (error_name == "org.freedesktop.machine1.MachineExists") {
        // This process's own machine (re-attached after a restart of qmachined), or an earlier
        // QEMU's whose scope machined has not let go of yet: ask whose.
        availability_ = Availability::available;
        check_existing(name, pid, attempt);
        return;
    }
    if (auto it = asked_.find(name); it != asked_.end() && it->second == pid) {
        asked_.erase(it);
    }
    if (means_absent(error_name) && availability_ != Availability::available) {
        availability_ = Availability::absent;
        spdlog::info("machined: systemd-machined is not available ({}: {}): machines are not "
                     "registered",
                     error_name, message);
        return;
    }
    spdlog::warn("machined: cannot register '{}' (pid {}): {}: {}", name, pid, error_name, message);
}

void MachinedRegistrar::check_existing(const std::string& name, pid_t pid, int attempt)
{
    auto* call = new Call{life_, this, name, pid, attempt};
    sd_bus_slot* slot = nullptr;
    const int r = sd_bus_call_method_async(
        bus_.get(), &slot, "org.freedesktop.machine1", "/org/freedesktop/machine1",
        "org.freedesktop.machine1.Manager", "GetMachineByPID",
        [](sd_bus_message* reply, void* userdata, sd_bus_error*) -> int {
            auto* c = static_cast<Call*>(userdata);
            if (c->life.lock()) {
                c->self->existing_checked(c->name, c->pid, c->attempt, reply);
            }
            return 0;
        },
        call, "u", static_cast<std::uint32_t>(pid));
    if (r < 0) {
        delete call;
        retry_later(name, pid, attempt, std::strerror(-r));
        return;
    }
    keep_until_reply(slot);
}

void MachinedRegistrar::existing_checked(const std::string& name, pid_t pid, int attempt,
                                         sd_bus_message* reply)
{
    // The object path machined gives the machine named `name`.
    char* expected = nullptr;
    if (sd_bus_path_encode("/org/freedesktop/machine1/machine", name.c_str(), &expected) < 0) {
        expected = nullptr;
    }
    const std::string want = expected != nullptr ? expected : "";
    std::free(expected);
    const char* path = nullptr;
    if (const sd_bus_error* error = sd_bus_message_get_error(reply); error == nullptr &&
        sd_bus_message_read(reply, "o", &path) >= 0 && path != nullptr && want == path) {
        spdlog::debug("machined: '{}' (pid {}) is registered already", name, pid);
        return;
    }
    retry_later(name, pid, attempt, "the name belongs to another process");
}

void MachinedRegistrar::retry_later(const std::string& name, pid_t pid, int attempt,
                                    std::string_view why)
{
    if (auto it = asked_.find(name); it != asked_.end() && it->second == pid) {
        asked_.erase(it);
    }
    if (attempt >= options_.retries) {
        spdlog::warn("machined: cannot register '{}' (pid {}): systemd-machined holds a machine "
                     "of that name already ({}), after {} attempt(s)",
                     name, pid, why, attempt + 1);
        return;
    }
    const auto delay = options_.retry_initial * (1 << attempt);
    spdlog::debug("machined: '{}' (pid {}): the name is taken ({}); asking again in {} ms", name,
                  pid, why, delay.count());
    auto timer = std::make_shared<asio::steady_timer>(ioc_, delay);
    timer->async_wait([this, life = std::weak_ptr<int>(life_), timer, name, pid,
                       attempt](const error_code& ec) {
        if (ec || !life.lock()) {
            return;
        }
        // Only if that process is still the machine's and nobody asked meanwhile.
        auto info = supervisor_.inspect(name);
        if (info && info->pid == pid && !asked_.contains(name)) {
            register_machine(name, attempt + 1);
        }
    });
}

} // namespace qm::daemon
