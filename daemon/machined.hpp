// SPDX-License-Identifier: GPL-2.0-or-later
// Registration of running machines with systemd-machined (org.freedesktop.machine1): each QEMU
// gets its own scope, machine-NAME.scope, through CreateMachine (the machine's uuid, class "vm",
// service "qmachined", QEMU as the leader), so `machinectl list` shows it, `machinectl terminate
// NAME` stops only that machine, and the QEMU processes leave the service's cgroup (a stop of the
// service cannot reach them, whatever its KillMode=). Not RegisterMachine: in systemd 252 it keeps
// the QEMU in qmachined's own unit, and terminating one machine would stop the whole service.
#pragma once

#include <systemd/sd-bus.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <sys/types.h>

#include "libmachine/asio.hpp"

namespace qm::dbus {
class Bus;
}

namespace qm::daemon {

class Supervisor;
class Event;

// Whether `name` can be a machined machine name (a host name: labels of letters, digits and
// '-', not at either end of a label, separated by '.'; 64 bytes at most). qmachined's own names
// also allow '_': such a machine runs unregistered.
bool machined_name_valid(std::string_view name);

struct MachinedOptions
{
    // The deadline of one CreateMachine call (machined may need to be started by the bus first).
    std::chrono::milliseconds timeout = std::chrono::seconds(5);
    // A name machined still holds for an earlier process (its scope not yet emptied after a quick
    // restart): asked again after this, doubling, this many times.
    std::chrono::milliseconds retry_initial = std::chrono::milliseconds(250);
    int retries = 5;
    // Extra properties of each machine's scope: ordered before this unit, so that at host
    // shutdown the unit that stops the machines gracefully (qmachined-guests.service) runs
    // before systemd kills what is left in the scopes. Empty: none.
    std::string scope_before = "qmachined-guests.service";
};

// Owned by main; loop thread only. Listens to the supervisor's events: a machine that starts (a
// new QEMU, running or paused) or is re-attached is registered, asynchronously, never blocking
// anything. A name machined still holds for another process (an earlier QEMU's scope after a quick
// restart) is asked again a few times, then left with a warning. The first
// answer that says machined is not there (no such name on the bus, no activatable service) turns
// registration off quietly (one info line); other failures are logged per machine at warn.
class MachinedRegistrar
{
public:
    MachinedRegistrar(asio::io_context& ioc, Supervisor& supervisor, dbus::Bus& bus,
                      MachinedOptions options = {});
    ~MachinedRegistrar();
    MachinedRegistrar(const MachinedRegistrar&) = delete;
    MachinedRegistrar& operator=(const MachinedRegistrar&) = delete;

    // From now on; machines that already run (re-attached before this) are registered now.
    void start();

    enum class Availability { unknown, available, absent };
    Availability availability() const noexcept { return availability_; }

private:
    struct Call;
    void on_event(const Event& e);
    void register_machine(const std::string& name, int attempt = 0);
    // An async call's slot, made floating: it frees its Call after the reply (or with the bus).
    void keep_until_reply(sd_bus_slot* slot);
    void finished(const std::string& name, pid_t pid, int attempt, const sd_bus_error* error);
    // CreateMachine said MachineExists: whether the machine holding the name is this process's.
    void check_existing(const std::string& name, pid_t pid, int attempt);
    void existing_checked(const std::string& name, pid_t pid, int attempt, sd_bus_message* reply);
    void retry_later(const std::string& name, pid_t pid, int attempt, std::string_view why);

    asio::io_context& ioc_;
    Supervisor& supervisor_;
    dbus::Bus& bus_;
    MachinedOptions options_;
    std::uint64_t listener_ = 0;
    Availability availability_ = Availability::unknown;
    // Machines asked for or registered, by name: their leader.
    std::map<std::string, pid_t> asked_;
    std::shared_ptr<int> life_ = std::make_shared<int>(0);
};

} // namespace qm::daemon
