// SPDX-License-Identifier: GPL-2.0-or-later
// The D-Bus methods' operations, shared by the Manager (by name) and the Machine objects: each
// runs one Supervisor operation, writes the audit line of a mutating call, and gives the reply's
// body (or the error) to Service::reply_later.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "daemon/dbus/service.hpp"
#include "daemon/supervisor/supervisor.hpp"
#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"

namespace qm::dbus {

enum class Action { start, stop, kill, pause, resume, restart };
// The operation's name in audit lines ("start", ...).
const char* to_string(Action a) noexcept;

// Stop's arguments: mode "" (the spec's), "powerdown" or "quit"; timeout 0 (the spec's) or up to
// a day. errc::invalid_argument otherwise.
expected<daemon::StopOptions> stop_options(std::string_view mode, std::uint64_t timeout_usec);

awaitable<expected<Service::BodyWriter>> create_call(Service* s, std::string caller, std::string name,
                                                     std::string spec_json);
awaitable<expected<Service::BodyWriter>> action_call(Service* s, std::string caller, std::string name,
                                                     Action action, daemon::StopOptions stop);
awaitable<expected<Service::BodyWriter>> delete_call(Service* s, std::string caller, std::string name,
                                                     bool force);
// Supervisor::stop_all; the reply is (as stopped, a(ss) failed).
awaitable<expected<Service::BodyWriter>> stop_all_call(Service* s, std::string caller,
                                                       std::uint32_t concurrency);
// QMP passthrough: the reply is QEMU's `return` as JSON.
awaitable<expected<Service::BodyWriter>> execute_call(Service* s, std::string caller, std::string name,
                                                      std::string command, std::string arguments_json);
// The newest `max_lines` lines (all when nullopt) of the machine's QEMU log, read off the loop;
// the reply is the text.
awaitable<expected<Service::BodyWriter>> log_call(Service* s, std::string path,
                                                  std::optional<std::size_t> max_lines);
// The first event of the machine named `event` ("" any) matching `match_json` ("" any) after
// `since` (0: from now) within `timeout_usec` (0: 30 s); the reply is the event as JSON.
// errc::timeout when none came.
awaitable<expected<Service::BodyWriter>> wait_event_call(Service* s, std::string name,
                                                         std::string event, std::string match_json,
                                                         std::uint64_t since,
                                                         std::uint64_t timeout_usec);

} // namespace qm::dbus
