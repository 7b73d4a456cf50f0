// SPDX-License-Identifier: GPL-2.0-or-later
// qmachinectl's output: tables, colours, ages, pretty JSON, the SSE parser, log increments.
#include "daemon/ctl/output.hpp"

#include <algorithm>
#include <array>
#include <utility>

#include <fmt/format.h>
#include <rapidjson/prettywriter.h>
#include <rapidjson/stringbuffer.h>

namespace qm::ctl {

bool want_colour(bool stdout_is_tty, const char* no_color)
{
    return stdout_is_tty && (no_color == nullptr || *no_color == '\0');
}

std::string coloured_state(std::string_view state, bool colour)
{
    struct StateColour
    {
        std::string_view state;
        std::string_view sgr; // the SGR parameters
    };
    static constexpr std::array<StateColour, 6> colours{{
        {"running", "32"},
        {"paused", "33"},
        {"starting", "36"},
        {"stopping", "36"},
        {"crashed", "1;31"},
        {"failed", "1;31"},
    }};
    if (!colour) {
        return std::string(state);
    }
    std::string_view sgr;
    for (const auto& c : colours) {
        if (c.state == state) {
            sgr = c.sgr;
        }
    }
    if (state == "unresponsive") {
        sgr = "31";
    }
    if (sgr.empty()) {
        return std::string(state);
    }
    return fmt::format("\x1b[{}m{}\x1b[0m", sgr, state);
}

Table::Table(std::vector<std::string> header)
{
    rows_.push_back(std::move(header));
    shown_.emplace_back();
}

void Table::add_row(std::vector<std::string> cells, std::vector<std::optional<std::string>> shown)
{
    rows_.push_back(std::move(cells));
    shown_.push_back(std::move(shown));
}

std::string Table::render() const
{
    std::vector<std::size_t> widths;
    for (const auto& row : rows_) {
        widths.resize(std::max(widths.size(), row.size()));
        for (std::size_t i = 0; i < row.size(); ++i) {
            widths[i] = std::max(widths[i], row[i].size());
        }
    }
    std::string out;
    for (std::size_t r = 0; r < rows_.size(); ++r) {
        const auto& row = rows_[r];
        std::string line;
        for (std::size_t i = 0; i < row.size(); ++i) {
            const auto& shown = shown_[r];
            line += i < shown.size() && shown[i] ? *shown[i] : row[i];
            if (i + 1 < row.size()) {
                line.append(widths[i] - row[i].size() + 2, ' ');
            }
        }
        while (!line.empty() && line.back() == ' ') {
            line.pop_back();
        }
        out += line;
        out += '\n';
    }
    return out;
}

std::string age(std::int64_t since_us, std::int64_t now_us)
{
    const std::int64_t s = std::max<std::int64_t>(0, (now_us - since_us) / 1000000);
    if (s < 60) {
        return fmt::format("{}s", s);
    }
    if (s < 3600) {
        return fmt::format("{}m", s / 60);
    }
    if (s < 86400) {
        const auto m = s / 60 % 60;
        return m != 0 ? fmt::format("{}h {}m", s / 3600, m) : fmt::format("{}h", s / 3600);
    }
    const auto h = s / 3600 % 24;
    return h != 0 ? fmt::format("{}d {}h", s / 86400, h) : fmt::format("{}d", s / 86400);
}

std::string pretty_json(const json::Value& v)
{
    rapidjson::StringBuffer buffer;
    rapidjson::PrettyWriter<rapidjson::StringBuffer> writer(buffer);
    writer.SetIndent(' ', 2);
    writer.SetFormatOptions(rapidjson::kFormatSingleLineArray);
    v.Accept(writer);
    return std::string(buffer.GetString(), buffer.GetSize());
}

std::vector<SseMessage> SseParser::feed(std::string_view bytes)
{
    std::vector<SseMessage> out;
    for (const char c : bytes) {
        if (c == '\n' && after_cr_) {
            after_cr_ = false; // the second half of "\r\n"
            continue;
        }
        after_cr_ = c == '\r';
        if (c == '\n' || c == '\r') {
            line(partial_, out);
            partial_.clear();
        } else {
            partial_ += c;
        }
    }
    return out;
}

void SseParser::line(std::string_view l, std::vector<SseMessage>& out)
{
    if (l.empty()) {
        if (has_data_) {
            if (current_.event.empty()) {
                current_.event = "message";
            }
            out.push_back(std::move(current_));
        }
        current_ = {};
        has_data_ = false;
        return;
    }
    if (l.front() == ':') {
        return; // a comment (": subscribed", ": keep-alive")
    }
    const auto colon = l.find(':');
    const std::string_view field = l.substr(0, colon);
    std::string_view value =
        colon == std::string_view::npos ? std::string_view() : l.substr(colon + 1);
    if (value.starts_with(' ')) {
        value.remove_prefix(1);
    }
    if (field == "data") {
        if (has_data_) {
            current_.data += '\n';
        }
        current_.data += value;
        has_data_ = true;
    } else if (field == "event") {
        current_.event = std::string(value);
    } else if (field == "id") {
        current_.id = std::string(value);
    }
}

std::string log_increment(std::string_view previous, std::string_view current)
{
    if (current.starts_with(previous)) {
        return std::string(current.substr(previous.size()));
    }
    // The window moved on: the last bytes of `previous` are somewhere in `current`, and what
    // follows them is new. 4 KiB of context makes a false match unlikely.
    const std::string_view tail =
        previous.substr(previous.size() - std::min<std::size_t>(previous.size(), 4096));
    const auto at = current.rfind(tail);
    if (!tail.empty() && at != std::string_view::npos) {
        return std::string(current.substr(at + tail.size()));
    }
    return std::string(current);
}

} // namespace qm::ctl
