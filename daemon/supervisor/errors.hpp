// SPDX-License-Identifier: GPL-2.0-or-later
// The front ends' error table: every qm::errc with its HTTP status, RFC 9457 problem type and
// D-Bus error name. proto/errors.json is the machine-readable contract; a test checks that this
// table and that file agree and that every errc is in both.
#pragma once

#include <span>
#include <string_view>

#include "libmachine/error.hpp"

namespace qm::daemon {

struct ErrorInfo
{
    errc code;
    std::string_view name;      // "NoSuchMachine"
    int http_status;            // 404
    std::string_view title;     // "No such machine" (the problem's "title")
    std::string_view problem_type; // "urn:qmachined:error:NoSuchMachine"
    std::string_view dbus_name; // "org.qmachined1.Error.NoSuchMachine"
};

// The table, in errc order.
std::span<const ErrorInfo> error_table() noexcept;
// The row of `code`; the `internal` row for a code not in the table (or of another category).
const ErrorInfo& error_info(errc code) noexcept;
const ErrorInfo& error_info(const Error& error) noexcept;

} // namespace qm::daemon
