// SPDX-License-Identifier: GPL-2.0-or-later
// org.qmachined1.Machine at /org/qmachined1/machine/<name, sd_bus_path_encode>: one machine's
// properties (from the supervisor's model), its lifecycle, QMP passthrough, its log and waits.
#include <cstdlib>
#include <optional>
#include <string>

#include "daemon/dbus/calls.hpp"
#include "daemon/dbus/service.hpp"
#include "daemon/supervisor/supervisor.hpp"
#include "libmachine/json.hpp"

namespace qm::dbus {

namespace {

Service& service_of(void* userdata)
{
    return *static_cast<Service*>(userdata);
}

// The machine an object path names ("" when it names none).
std::string name_of(const char* path)
{
    char* name = nullptr;
    if (sd_bus_path_decode(path, machine_prefix, &name) <= 0 || name == nullptr) {
        return {};
    }
    std::string out(name);
    std::free(name);
    return out;
}

// The model of the machine at `path`; sets NoSuchMachine in `error` when there is none.
std::optional<daemon::MachineInfo> info_at(Service& s, const char* path, sd_bus_error* error,
                                           int* r)
{
    auto info = s.supervisor().inspect(name_of(path));
    if (!info) {
        *r = Service::set_error(info.error(), error);
        return std::nullopt;
    }
    return std::move(*info);
}

// One getter for every property: the member name says which.
int get_property(sd_bus* bus, const char* path, const char*, const char* property,
                 sd_bus_message* reply, void* userdata, sd_bus_error* error)
{
    Service& s = service_of(userdata);
    int r = 0;
    auto info = info_at(s, path, error, &r);
    if (!info) {
        return r;
    }
    const std::string_view p(property);
    if (p == "Name") {
        return sd_bus_message_append(reply, "s", info->name.c_str());
    }
    if (p == "UUID") {
        return sd_bus_message_append(reply, "s", info->spec.uuid.c_str());
    }
    if (p == "State") {
        const std::string state(qm::to_string(info->state));
        return sd_bus_message_append(reply, "s", state.c_str());
    }
    if (p == "Pid") {
        return sd_bus_message_append(reply, "u", static_cast<std::uint32_t>(info->pid.value_or(0)));
    }
    if (p == "ExitCode") {
        return sd_bus_message_append(reply, "i", info->exit_code.value_or(-1));
    }
    if (p == "ExitSignal") {
        return sd_bus_message_append(reply, "i", info->exit_signal.value_or(-1));
    }
    if (p == "StopReason") {
        const char* kind = info->stop_reason.kind == daemon::StopReason::Kind::none
                               ? ""
                               : daemon::to_string(info->stop_reason.kind);
        return sd_bus_message_append(reply, "s", kind);
    }
    if (p == "RestartCount") {
        return sd_bus_message_append(reply, "u", info->restart_count);
    }
    if (p == "StateSince") {
        return sd_bus_message_append(reply, "t", static_cast<std::uint64_t>(info->state_since_us));
    }
    if (p == "Generation") {
        return sd_bus_message_append(reply, "t", info->generation);
    }
    if (p == "Spec") {
        // The spec names files, arguments and paths: not for everyone.
        if (r = s.authorize(sd_bus_get_current_message(bus), error); r < 0) {
            return r;
        }
        json::Document d(rapidjson::kObjectType);
        daemon::spec_to_json(info->spec, d, d.GetAllocator());
        return sd_bus_message_append(reply, "s", json::to_string(d).c_str());
    }
    return -ENOENT;
}

template <Action action>
int method_action(sd_bus_message* m, void* userdata, sd_bus_error* error)
{
    Service& s = service_of(userdata);
    const std::string name = name_of(sd_bus_message_get_path(m));
    if (int r = s.authorize(m, error, to_string(action), name); r < 0) {
        return r;
    }
    return s.reply_later(m, action_call(&s, s.caller(m), name, action, {}));
}

int method_stop(sd_bus_message* m, void* userdata, sd_bus_error* error)
{
    Service& s = service_of(userdata);
    const char* mode = nullptr;
    std::uint64_t timeout_usec = 0;
    int r = sd_bus_message_read(m, "st", &mode, &timeout_usec);
    if (r < 0) {
        return r;
    }
    if (r = s.authorize(m, error, "stop", name_of(sd_bus_message_get_path(m))); r < 0) {
        return r;
    }
    auto options = stop_options(mode, timeout_usec);
    if (!options) {
        return Service::set_error(options.error(), error);
    }
    return s.reply_later(m, action_call(&s, s.caller(m), name_of(sd_bus_message_get_path(m)),
                                        Action::stop, *options));
}

int method_execute(sd_bus_message* m, void* userdata, sd_bus_error* error)
{
    Service& s = service_of(userdata);
    const char* command = nullptr;
    const char* arguments = nullptr;
    int r = sd_bus_message_read(m, "ss", &command, &arguments);
    if (r < 0) {
        return r;
    }
    if (r = s.authorize(m, error, std::string("qmp:") + command,
                        name_of(sd_bus_message_get_path(m)));
        r < 0) {
        return r;
    }
    return s.reply_later(m, execute_call(&s, s.caller(m), name_of(sd_bus_message_get_path(m)),
                                         command, arguments));
}

int method_get_log(sd_bus_message* m, void* userdata, sd_bus_error* error)
{
    Service& s = service_of(userdata);
    std::uint32_t tail = 0;
    int r = sd_bus_message_read(m, "u", &tail);
    if (r < 0) {
        return r;
    }
    if (r = s.authorize(m, error); r < 0) {
        return r;
    }
    auto info = info_at(s, sd_bus_message_get_path(m), error, &r);
    if (!info) {
        return r;
    }
    // tail 0: the whole (bounded) log, as REST without `tail`.
    std::optional<std::size_t> lines;
    if (tail > 0) {
        lines = tail;
    }
    return s.reply_later(m, log_call(&s, info->log_path, lines));
}

int method_wait_event(sd_bus_message* m, void* userdata, sd_bus_error* error)
{
    Service& s = service_of(userdata);
    const char* event = nullptr;
    const char* match = nullptr;
    std::uint64_t since = 0;
    std::uint64_t timeout_usec = 0;
    int r = sd_bus_message_read(m, "sstt", &event, &match, &since, &timeout_usec);
    if (r < 0) {
        return r;
    }
    if (r = s.authorize(m, error); r < 0) {
        return r;
    }
    return s.reply_later(m, wait_event_call(&s, name_of(sd_bus_message_get_path(m)), event, match,
                                            since, timeout_usec));
}

constexpr std::uint64_t changes = SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE;

const sd_bus_vtable vtable[] = {
    SD_BUS_VTABLE_START(0),
    SD_BUS_PROPERTY("Name", "s", get_property, 0, SD_BUS_VTABLE_PROPERTY_CONST),
    SD_BUS_PROPERTY("UUID", "s", get_property, 0, changes),
    SD_BUS_PROPERTY("State", "s", get_property, 0, changes),
    SD_BUS_PROPERTY("Pid", "u", get_property, 0, changes),
    SD_BUS_PROPERTY("ExitCode", "i", get_property, 0, changes),
    SD_BUS_PROPERTY("ExitSignal", "i", get_property, 0, changes),
    SD_BUS_PROPERTY("StopReason", "s", get_property, 0, changes),
    SD_BUS_PROPERTY("RestartCount", "u", get_property, 0, changes),
    SD_BUS_PROPERTY("StateSince", "t", get_property, 0, changes),
    SD_BUS_PROPERTY("Generation", "t", get_property, 0, changes),
    // Read on its own only (not in GetAll or GetManagedObjects): for the privileged.
    SD_BUS_PROPERTY("Spec", "s", get_property, 0, SD_BUS_VTABLE_PROPERTY_EXPLICIT),
    SD_BUS_METHOD("Start", "", "", credentialed<method_action<Action::start>>,
                  SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD_WITH_NAMES("Stop", "st", SD_BUS_PARAM(mode) SD_BUS_PARAM(timeout_usec), "", ,
                             credentialed<method_stop>, SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD("Kill", "", "", credentialed<method_action<Action::kill>>,
                  SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD("Pause", "", "", credentialed<method_action<Action::pause>>,
                  SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD("Resume", "", "", credentialed<method_action<Action::resume>>,
                  SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD("Restart", "", "", credentialed<method_action<Action::restart>>,
                  SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD_WITH_NAMES("Execute", "ss", SD_BUS_PARAM(command) SD_BUS_PARAM(arguments_json),
                             "s", SD_BUS_PARAM(return_json), credentialed<method_execute>,
                             SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD_WITH_NAMES("GetLog", "u", SD_BUS_PARAM(tail), "s", SD_BUS_PARAM(log),
                             credentialed<method_get_log>, SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD_WITH_NAMES("WaitEvent", "sstt",
                             SD_BUS_PARAM(name) SD_BUS_PARAM(match_json) SD_BUS_PARAM(since)
                                 SD_BUS_PARAM(timeout_usec),
                             "s", SD_BUS_PARAM(event_json), credentialed<method_wait_event>,
                             SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_SIGNAL_WITH_NAMES("QmpEvent", "tsst",
                             SD_BUS_PARAM(seq) SD_BUS_PARAM(name) SD_BUS_PARAM(data_json)
                                 SD_BUS_PARAM(timestamp_usec),
                             0),
    SD_BUS_VTABLE_END,
};

} // namespace

const sd_bus_vtable* machine_vtable()
{
    return vtable;
}

} // namespace qm::dbus
