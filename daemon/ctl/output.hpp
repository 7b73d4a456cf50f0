// SPDX-License-Identifier: GPL-2.0-or-later
// qmachinectl's output for people and scripts: aligned tables, states in colour (on a terminal
// only), ages, pretty JSON, Server-Sent Events parsing. Pure functions: no I/O.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "libmachine/json.hpp"

namespace qm::ctl {

// Whether to colour: stdout is a terminal and NO_COLOR is unset or empty (no-color.org).
bool want_colour(bool stdout_is_tty, const char* no_color);

// `state` wrapped in its ANSI colour when `colour`: running green, paused yellow, starting and
// stopping cyan, crashed, failed and unresponsive red, the others as they are.
std::string coloured_state(std::string_view state, bool colour);

// A table of text cells printed with every column as wide as its widest cell (escape sequences
// do not count), columns two spaces apart, no trailing spaces.
class Table
{
public:
    explicit Table(std::vector<std::string> header);
    // `shown` overrides what is printed (a coloured state) while `cell` gives the width.
    void add_row(std::vector<std::string> cells,
                 std::vector<std::optional<std::string>> shown = {});
    std::string render() const;

private:
    std::vector<std::vector<std::string>> rows_;
    std::vector<std::vector<std::optional<std::string>>> shown_;
};

// "12s", "5m", "3h 4m", "2d 3h": how long ago `since_us` was at `now_us` (both µs since the epoch).
std::string age(std::int64_t since_us, std::int64_t now_us);

// JSON with two-space indents, as people read it.
std::string pretty_json(const json::Value& v);

// One Server-Sent Events message (the WHATWG spec's fields that qmachined sends).
struct SseMessage
{
    std::string id;
    std::string event; // "message" when the message named none
    std::string data;  // the data lines joined with '\n'
};

// Splits a stream's bytes, given in any pieces, into messages: lines end with "\n", "\r\n" or
// "\r"; a blank line ends a message; ':' lines are comments. Messages without data are dropped,
// as the spec says.
class SseParser
{
public:
    // The messages completed by `bytes`.
    std::vector<SseMessage> feed(std::string_view bytes);

private:
    void line(std::string_view l, std::vector<SseMessage>& out);

    std::string partial_;   // an unfinished line
    bool after_cr_ = false; // the last byte was '\r' (a following '\n' belongs to it)
    SseMessage current_;
    bool has_data_ = false;
};

// "qmtest: ready\n" from `log`, as much as is new since `previous` (what the last poll of the
// same log answered): the answers are windows on a growing file (its last 1 MiB), so the new part
// follows the end of `previous` in `current`. When `current` does not continue `previous` (a new
// run's log), all of it.
std::string log_increment(std::string_view previous, std::string_view current);

} // namespace qm::ctl
