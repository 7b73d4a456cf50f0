// SPDX-License-Identifier: GPL-2.0-or-later
// org.qmachined1.Manager at /org/qmachined1: the machines as a list, create and delete, and the
// lifecycle calls by name (as org.freedesktop.machine1.Manager has them).
#include <cerrno>
#include <string>

#include "daemon/audit.hpp"
#include "daemon/dbus/calls.hpp"
#include "daemon/dbus/service.hpp"
#include "daemon/supervisor/errors.hpp"
#include "daemon/supervisor/supervisor.hpp"
#include "libmachine/json.hpp"

namespace qm::dbus {

namespace {

Service& service_of(void* userdata)
{
    return *static_cast<Service*>(userdata);
}

int property_event_seq(sd_bus*, const char*, const char*, const char*, sd_bus_message* reply,
                       void* userdata, sd_bus_error*)
{
    return sd_bus_message_append(reply, "t", service_of(userdata).supervisor().events().last_seq());
}

int method_list(sd_bus_message* m, void* userdata, sd_bus_error*)
{
    Service& s = service_of(userdata);
    sd_bus_message* reply = nullptr;
    int r = sd_bus_message_new_method_return(m, &reply);
    if (r >= 0) {
        r = sd_bus_message_open_container(reply, 'a', "(sso)");
    }
    for (const auto& info : s.supervisor().list()) {
        if (r < 0) {
            break;
        }
        const std::string state(qm::to_string(info.state));
        r = sd_bus_message_append(reply, "(sso)", info.name.c_str(), state.c_str(),
                                  Service::machine_path(info.name).c_str());
    }
    if (r >= 0) {
        r = sd_bus_message_close_container(reply);
    }
    if (r >= 0) {
        r = sd_bus_send(nullptr, reply, nullptr);
    }
    sd_bus_message_unref(reply);
    return r;
}

int method_get(sd_bus_message* m, void* userdata, sd_bus_error* error)
{
    const char* name = nullptr;
    int r = sd_bus_message_read(m, "s", &name);
    if (r < 0) {
        return r;
    }
    auto info = service_of(userdata).supervisor().inspect(name);
    if (!info) {
        return Service::set_error(info.error(), error);
    }
    return sd_bus_reply_method_return(m, "o", Service::machine_path(name).c_str());
}

int method_create(sd_bus_message* m, void* userdata, sd_bus_error* error)
{
    Service& s = service_of(userdata);
    const char* name = nullptr;
    const char* spec = nullptr;
    int r = sd_bus_message_read(m, "ss", &name, &spec);
    if (r < 0) {
        return r;
    }
    if (r = s.authorize(m, error, "create", name); r < 0) {
        return r;
    }
    return s.reply_later(m, create_call(&s, s.caller(m), name, spec));
}

// StartMachine(s), KillMachine(s): the action on the machine named.
template <Action action>
int method_action(sd_bus_message* m, void* userdata, sd_bus_error* error)
{
    Service& s = service_of(userdata);
    const char* name = nullptr;
    int r = sd_bus_message_read(m, "s", &name);
    if (r < 0) {
        return r;
    }
    if (r = s.authorize(m, error, to_string(action), name); r < 0) {
        return r;
    }
    return s.reply_later(m, action_call(&s, s.caller(m), name, action, {}));
}

int method_stop(sd_bus_message* m, void* userdata, sd_bus_error* error)
{
    Service& s = service_of(userdata);
    const char* name = nullptr;
    const char* mode = nullptr;
    std::uint64_t timeout_usec = 0;
    int r = sd_bus_message_read(m, "sst", &name, &mode, &timeout_usec);
    if (r < 0) {
        return r;
    }
    if (r = s.authorize(m, error, "stop", name); r < 0) {
        return r;
    }
    auto options = stop_options(mode, timeout_usec);
    if (!options) {
        return Service::set_error(options.error(), error);
    }
    return s.reply_later(m, action_call(&s, s.caller(m), name, Action::stop, *options));
}

int method_delete(sd_bus_message* m, void* userdata, sd_bus_error* error)
{
    Service& s = service_of(userdata);
    const char* name = nullptr;
    int force = 0;
    int r = sd_bus_message_read(m, "sb", &name, &force);
    if (r < 0) {
        return r;
    }
    if (r = s.authorize(m, error, "delete", name); r < 0) {
        return r;
    }
    return s.reply_later(m, delete_call(&s, s.caller(m), name, force != 0));
}

int method_stop_all(sd_bus_message* m, void* userdata, sd_bus_error* error)
{
    Service& s = service_of(userdata);
    std::uint32_t concurrency = 0;
    int r = sd_bus_message_read(m, "u", &concurrency);
    if (r < 0) {
        return r;
    }
    if (r = s.authorize(m, error, "stop-all"); r < 0) {
        return r;
    }
    return s.reply_later(m, stop_all_call(&s, s.caller(m), concurrency));
}

const sd_bus_vtable vtable[] = {
    SD_BUS_VTABLE_START(0),
    SD_BUS_PROPERTY("EventSeq", "t", property_event_seq, 0, 0),
    SD_BUS_METHOD_WITH_NAMES("ListMachines", "", , "a(sso)", SD_BUS_PARAM(machines), method_list,
                             SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD_WITH_NAMES("GetMachine", "s", SD_BUS_PARAM(name), "o", SD_BUS_PARAM(machine),
                             method_get, SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD_WITH_NAMES("CreateMachine", "ss", SD_BUS_PARAM(name) SD_BUS_PARAM(spec_json), "o",
                             SD_BUS_PARAM(machine), credentialed<method_create>,
                             SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD_WITH_NAMES("StartMachine", "s", SD_BUS_PARAM(name), "", ,
                             credentialed<method_action<Action::start>>,
                             SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD_WITH_NAMES("StopMachine", "sst",
                             SD_BUS_PARAM(name) SD_BUS_PARAM(mode) SD_BUS_PARAM(timeout_usec), "", ,
                             credentialed<method_stop>, SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD_WITH_NAMES("KillMachine", "s", SD_BUS_PARAM(name), "", ,
                             credentialed<method_action<Action::kill>>, SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD_WITH_NAMES("DeleteMachine", "sb", SD_BUS_PARAM(name) SD_BUS_PARAM(force), "", ,
                             credentialed<method_delete>, SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD_WITH_NAMES("StopAll", "u", SD_BUS_PARAM(concurrency), "asa(ss)",
                             SD_BUS_PARAM(stopped) SD_BUS_PARAM(failed),
                             credentialed<method_stop_all>,
                             SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_SIGNAL_WITH_NAMES("MachineNew", "so", SD_BUS_PARAM(name) SD_BUS_PARAM(machine), 0),
    SD_BUS_SIGNAL_WITH_NAMES("MachineRemoved", "so", SD_BUS_PARAM(name) SD_BUS_PARAM(machine), 0),
    SD_BUS_VTABLE_END,
};

} // namespace

const sd_bus_vtable* manager_vtable()
{
    return vtable;
}

} // namespace qm::dbus
