// SPDX-License-Identifier: GPL-2.0-or-later
// A strict reader of the Prometheus text exposition format 0.0.4, for the tests: every line is a
// HELP, a TYPE or a sample `name{label="value",...} value`; every family has its HELP and TYPE
// before its samples and its samples together; no series twice; a histogram's buckets have
// ascending `le` bounds up to +Inf with cumulative counts, +Inf equal to _count, and a _sum.
// Stricter than Prometheus where qmachined has no reason to differ (no timestamps, no blank lines,
// no trailing comma in a label set): what it refuses is in Exposition::errors.
#pragma once

#include <cmath>
#include <cstdlib>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

namespace qm::test {

using MetricLabels = std::map<std::string, std::string>;

struct MetricSample
{
    std::string name; // as written: "x_bucket" for a histogram x
    MetricLabels labels;
    double value = 0;
};

struct MetricFamily
{
    std::string help; // unescaped
    std::string type; // "counter", "gauge", "histogram", "summary", "untyped"
    std::vector<MetricSample> samples;
};

struct Exposition
{
    std::map<std::string, MetricFamily> families;
    std::vector<std::string> errors;

    // The sample `name` with exactly `labels`.
    std::optional<double> value(std::string_view name, const MetricLabels& labels = {}) const
    {
        for (const auto& [family_name, family] : families) {
            for (const MetricSample& s : family.samples) {
                if (s.name == name && s.labels == labels) {
                    return s.value;
                }
            }
        }
        return std::nullopt;
    }
    // As value(), 0 for a series not there (yet).
    double value_or_zero(std::string_view name, const MetricLabels& labels = {}) const
    {
        return value(name, labels).value_or(0);
    }
};

namespace exposition_detail {

inline bool name_start(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

inline bool name_char(char c)
{
    return name_start(c) || (c >= '0' && c <= '9');
}

// A metric name at the start of `s` ([a-zA-Z_:][a-zA-Z0-9_:]*), consumed; empty if none.
inline std::string take_metric_name(std::string_view& s)
{
    std::size_t n = 0;
    while (n < s.size() &&
           (n == 0 ? name_start(s[n]) || s[n] == ':' : name_char(s[n]) || s[n] == ':')) {
        ++n;
    }
    std::string out(s.substr(0, n));
    s.remove_prefix(n);
    return out;
}

inline std::string take_label_name(std::string_view& s)
{
    std::size_t n = 0;
    while (n < s.size() && (n == 0 ? name_start(s[n]) : name_char(s[n]))) {
        ++n;
    }
    std::string out(s.substr(0, n));
    s.remove_prefix(n);
    return out;
}

// "+Inf", "-Inf", "NaN" or a number that strtod reads whole.
inline std::optional<double> parse_value(std::string_view s)
{
    if (s == "+Inf") {
        return HUGE_VAL;
    }
    if (s == "-Inf") {
        return -HUGE_VAL;
    }
    if (s == "NaN") {
        return std::nan("");
    }
    const std::string text(s);
    if (text.empty() || text.front() == ' ' || text.find_first_of("xXpP") != std::string::npos) {
        return std::nullopt;
    }
    char* end = nullptr;
    const double v = std::strtod(text.c_str(), &end);
    if (end != text.c_str() + text.size() || std::isinf(v) || std::isnan(v)) {
        return std::nullopt;
    }
    return v;
}

// The HELP text unescaped (`\\` and `\n` only), or nullopt for another escape.
inline std::optional<std::string> unescape_help(std::string_view s)
{
    std::string out;
    for (std::size_t i = 0; i < s.size(); ++i) {
        if (s[i] != '\\') {
            out += s[i];
            continue;
        }
        if (i + 1 == s.size() || (s[i + 1] != '\\' && s[i + 1] != 'n')) {
            return std::nullopt;
        }
        out += s[++i] == 'n' ? '\n' : '\\';
    }
    return out;
}

// `{a="x",b="y"}` at the start of `s`, consumed; an error text when malformed.
inline std::optional<std::string> take_labels(std::string_view& s, MetricLabels& out)
{
    if (s.empty() || s.front() != '{') {
        return std::nullopt;
    }
    s.remove_prefix(1);
    if (!s.empty() && s.front() == '}') {
        s.remove_prefix(1);
        return std::nullopt;
    }
    while (true) {
        const std::string name = take_label_name(s);
        if (name.empty()) {
            return "a label name is expected";
        }
        if (s.size() < 2 || s[0] != '=' || s[1] != '"') {
            return fmt::format("label {}: =\" is expected", name);
        }
        s.remove_prefix(2);
        std::string value;
        while (true) {
            if (s.empty()) {
                return fmt::format("label {}: the value has no closing quote", name);
            }
            const char c = s.front();
            s.remove_prefix(1);
            if (c == '"') {
                break;
            }
            if (c == '\\') {
                if (s.empty() || (s.front() != '\\' && s.front() != '"' && s.front() != 'n')) {
                    return fmt::format("label {}: an escape other than \\\\, \\\" or \\n", name);
                }
                value += s.front() == 'n' ? '\n' : s.front();
                s.remove_prefix(1);
            } else {
                value += c;
            }
        }
        if (!out.emplace(name, std::move(value)).second) {
            return fmt::format("label {} twice", name);
        }
        if (s.empty()) {
            return "the label set is not closed";
        }
        const char sep = s.front();
        s.remove_prefix(1);
        if (sep == '}') {
            return std::nullopt;
        }
        if (sep != ',') {
            return fmt::format("',' or '}}' is expected after label {}", name);
        }
    }
}

inline void check_histogram(const std::string& name, const MetricFamily& f,
                            std::vector<std::string>& errors)
{
    struct Series
    {
        std::vector<std::pair<double, double>> buckets; // (le, count) in the order written
        std::optional<double> sum;
        std::optional<double> count;
    };
    std::map<MetricLabels, Series> series;
    for (const MetricSample& s : f.samples) {
        MetricLabels labels = s.labels;
        if (s.name == name + "_bucket") {
            auto le = labels.find("le");
            if (le == labels.end()) {
                errors.push_back(fmt::format("{}: a bucket without le", name));
                continue;
            }
            const auto bound = parse_value(le->second);
            if (!bound) {
                errors.push_back(fmt::format("{}: le=\"{}\" is not a number", name, le->second));
                continue;
            }
            labels.erase(le);
            series[labels].buckets.emplace_back(*bound, s.value);
        } else if (s.name == name + "_sum") {
            series[labels].sum = s.value;
        } else if (s.name == name + "_count") {
            series[labels].count = s.value;
        } else {
            errors.push_back(fmt::format("{}: sample {} in a histogram", name, s.name));
        }
    }
    for (const auto& [labels, h] : series) {
        std::string where = name;
        for (const auto& [k, v] : labels) {
            where += fmt::format(" {}=\"{}\"", k, v);
        }
        if (h.buckets.empty() || !std::isinf(h.buckets.back().first) ||
            h.buckets.back().first < 0) {
            errors.push_back(where + ": no le=\"+Inf\" bucket last");
        }
        for (std::size_t i = 1; i < h.buckets.size(); ++i) {
            if (!(h.buckets[i].first > h.buckets[i - 1].first)) {
                errors.push_back(where + ": le bounds do not ascend");
            }
            if (h.buckets[i].second < h.buckets[i - 1].second) {
                errors.push_back(
                    fmt::format("{}: bucket le={} counts {}, fewer than the one before "
                                "(buckets are cumulative)",
                                where, h.buckets[i].first, h.buckets[i].second));
            }
        }
        if (!h.sum || !h.count) {
            errors.push_back(where + ": no _sum or no _count");
        } else if (!h.buckets.empty() && h.buckets.back().second != *h.count) {
            errors.push_back(fmt::format("{}: +Inf counts {} but _count is {}", where,
                                         h.buckets.back().second, *h.count));
        }
    }
}

} // namespace exposition_detail

inline Exposition parse_exposition(std::string_view text)
{
    using namespace exposition_detail;
    Exposition out;
    auto error = [&](std::size_t line, const std::string& what) {
        out.errors.push_back(fmt::format("line {}: {}", line, what));
    };
    if (text.empty() || text.back() != '\n') {
        out.errors.push_back("the text does not end with a newline");
    }
    std::string current;        // the family of the lines being read
    std::set<std::string> done; // families whose lines have ended
    std::set<std::string> helped;
    std::set<std::string> series;
    // The lines of one family are together: a line of another family ends the current one.
    auto enter = [&](std::size_t line, const std::string& family) {
        if (family == current) {
            return;
        }
        if (done.contains(family)) {
            error(line, fmt::format("{} appears again after other families", family));
        }
        if (!current.empty()) {
            done.insert(current);
        }
        current = family;
    };
    std::size_t line_no = 0;
    std::size_t pos = 0;
    while (pos < text.size()) {
        const std::size_t nl = text.find('\n', pos);
        std::string_view line = text.substr(pos, nl == std::string_view::npos ? nl : nl - pos);
        pos = nl == std::string_view::npos ? text.size() : nl + 1;
        ++line_no;
        if (line.empty()) {
            error(line_no, "an empty line");
            continue;
        }
        if (line.starts_with("# HELP ") || line.starts_with("# TYPE ")) {
            const bool help = line[2] == 'H';
            line.remove_prefix(7);
            const std::string name = take_metric_name(line);
            if (name.empty() || line.empty() || line.front() != ' ') {
                error(line_no, "a metric name and a space are expected");
                continue;
            }
            line.remove_prefix(1);
            enter(line_no, name);
            MetricFamily& f = out.families[name];
            if (!f.samples.empty()) {
                error(line_no,
                      fmt::format("{} after the samples of {}", help ? "HELP" : "TYPE", name));
            }
            if (help) {
                const auto unescaped = unescape_help(line);
                if (!unescaped) {
                    error(line_no, "HELP has an escape other than \\\\ or \\n");
                }
                if (!helped.insert(name).second) {
                    error(line_no, fmt::format("HELP twice for {}", name));
                }
                f.help = unescaped.value_or("");
            } else {
                static const std::set<std::string_view> types{"counter", "gauge", "histogram",
                                                              "summary", "untyped"};
                if (!types.contains(line)) {
                    error(line_no, fmt::format("unknown type '{}'", line));
                }
                if (!f.type.empty()) {
                    error(line_no, fmt::format("TYPE twice for {}", name));
                }
                f.type = std::string(line);
            }
            continue;
        }
        if (line.front() == '#') {
            continue; // a comment
        }
        MetricSample sample;
        sample.name = take_metric_name(line);
        if (sample.name.empty()) {
            error(line_no, "a metric name is expected");
            continue;
        }
        if (auto bad = take_labels(line, sample.labels)) {
            error(line_no, *bad);
            continue;
        }
        if (line.empty() || line.front() != ' ') {
            error(line_no, "a space and a value are expected");
            continue;
        }
        line.remove_prefix(1);
        const auto value = parse_value(line);
        if (!value) {
            error(line_no, fmt::format("'{}' is not a value (or has a timestamp)", line));
            continue;
        }
        sample.value = *value;
        // The family: the name itself, or a histogram's (summary's) name before its suffix.
        std::string family = sample.name;
        const auto own = out.families.find(family);
        if (own == out.families.end() || own->second.type.empty()) {
            for (std::string_view suffix : {"_bucket", "_sum", "_count"}) {
                if (sample.name.ends_with(suffix)) {
                    const std::string base =
                        sample.name.substr(0, sample.name.size() - suffix.size());
                    auto it = out.families.find(base);
                    if (it != out.families.end() &&
                        (it->second.type == "histogram" || it->second.type == "summary")) {
                        family = base;
                    }
                }
            }
        }
        auto it = out.families.find(family);
        if (it == out.families.end() || it->second.type.empty()) {
            error(line_no, fmt::format("{} has no TYPE before it", sample.name));
            continue;
        }
        if (!helped.contains(family)) {
            error(line_no, fmt::format("{} has no HELP before it", sample.name));
        }
        if (it->second.type != "histogram" && it->second.type != "summary" &&
            sample.name != family) {
            error(line_no, fmt::format("{} in family {}", sample.name, family));
        }
        enter(line_no, family);
        std::string key = sample.name;
        for (const auto& [k, v] : sample.labels) {
            key += fmt::format("|{}={}", k, v);
        }
        if (!series.insert(key).second) {
            error(line_no, fmt::format("{} appears twice with the same labels", sample.name));
        }
        it->second.samples.push_back(std::move(sample));
    }
    for (const auto& [name, f] : out.families) {
        if (!helped.contains(name) || f.type.empty()) {
            out.errors.push_back(fmt::format("{} lacks its HELP or its TYPE", name));
        }
        if (f.type == "histogram") {
            check_histogram(name, f, out.errors);
        }
        if (f.type == "counter") {
            for (const MetricSample& s : f.samples) {
                if (!(s.value >= 0)) {
                    out.errors.push_back(fmt::format("counter {} is {}", name, s.value));
                }
            }
        }
    }
    return out;
}

} // namespace qm::test
