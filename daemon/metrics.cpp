// SPDX-License-Identifier: GPL-2.0-or-later
// The metrics registry and its text (Prometheus exposition format 0.0.4).
#include "daemon/metrics.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iterator>
#include <stdexcept>
#include <type_traits>

#include <fmt/format.h>

namespace qm::daemon {

namespace {

bool is_name_start(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

bool is_name_char(char c)
{
    return is_name_start(c) || (c >= '0' && c <= '9');
}

// Metric names are [a-zA-Z_:][a-zA-Z0-9_:]*, label names [a-zA-Z_][a-zA-Z0-9_]* (the format's
// "Metric names and labels"); label names starting with "__" are Prometheus' own.
bool valid_metric_name(std::string_view name)
{
    return !name.empty() && (is_name_start(name.front()) || name.front() == ':') &&
           std::all_of(name.begin(), name.end(),
                       [](char c) { return is_name_char(c) || c == ':'; });
}

bool valid_label_name(std::string_view name)
{
    return !name.empty() && is_name_start(name.front()) && !name.starts_with("__") &&
           std::all_of(name.begin(), name.end(), is_name_char);
}

// `{a="x",b="y"}` (nothing without labels); `extra` is one more label written last (a
// histogram's `le`).
void write_labels(std::string& out, const Labels& labels,
                  const std::pair<std::string_view, std::string_view>* extra = nullptr)
{
    if (labels.empty() && extra == nullptr) {
        return;
    }
    out += '{';
    bool first = true;
    for (const auto& [name, value] : labels) {
        out += first ? "" : ",";
        first = false;
        fmt::format_to(std::back_inserter(out), "{}=\"{}\"", name, escape_label_value(value));
    }
    if (extra != nullptr) {
        out += first ? "" : ",";
        fmt::format_to(std::back_inserter(out), "{}=\"{}\"", extra->first, extra->second);
    }
    out += '}';
}

template <class Value>
void write_sample(std::string& out, std::string_view name, std::string_view suffix,
                  const Labels& labels, Value value,
                  const std::pair<std::string_view, std::string_view>* extra = nullptr)
{
    out += name;
    out += suffix;
    write_labels(out, labels, extra);
    out += ' ';
    if constexpr (std::is_floating_point_v<Value>) {
        out += format_value(value);
    } else {
        fmt::format_to(std::back_inserter(out), "{}", value);
    }
    out += '\n';
}

void check_bounds(std::span<const double> bounds)
{
    if (!std::is_sorted(bounds.begin(), bounds.end()) ||
        std::adjacent_find(bounds.begin(), bounds.end()) != bounds.end() ||
        std::any_of(bounds.begin(), bounds.end(), [](double b) { return !std::isfinite(b); })) {
        throw std::invalid_argument("histogram bounds must be finite and strictly ascending");
    }
}

} // namespace

Histogram::Histogram(std::span<const double> bounds)
    : bounds_(bounds)
    , buckets_(bounds.size() + 1, 0)
{
    check_bounds(bounds);
}

void Histogram::observe(double value) noexcept
{
    // The first bound >= value: a bucket counts what is less than or equal to its bound ("le").
    const auto at = std::lower_bound(bounds_.begin(), bounds_.end(), value);
    ++buckets_[static_cast<std::size_t>(at - bounds_.begin())];
    sum_ += value;
    ++count_;
}

Registry::Series& Registry::series(std::string_view name, std::string_view help, Type type,
                                   Labels labels, std::span<const double> bounds)
{
    if (!valid_metric_name(name)) {
        throw std::invalid_argument(fmt::format("'{}' is not a metric name", name));
    }
    // A counter's samples end in _total (the exposition format's convention, a rule in
    // OpenMetrics): a name without it is a mistake here, not at the scraper.
    if (type == Type::counter && !name.ends_with("_total")) {
        throw std::invalid_argument(fmt::format("counter '{}' does not end in _total", name));
    }
    if (type == Type::histogram) {
        check_bounds(bounds); // before anything is added: a refused call leaves no trace
    }
    for (std::size_t i = 0; i < labels.size(); ++i) {
        const std::string& label = labels[i].first;
        if (!valid_label_name(label) || (type == Type::histogram && label == "le")) {
            throw std::invalid_argument(
                fmt::format("'{}' is not a label name for '{}'", label, name));
        }
        for (std::size_t j = 0; j < i; ++j) {
            if (labels[j].first == label) {
                throw std::invalid_argument(fmt::format("label '{}' twice in '{}'", label, name));
            }
        }
    }
    auto family = std::find_if(families_.begin(), families_.end(),
                               [&](const Family& f) { return f.name == name; });
    if (family == families_.end()) {
        families_.push_back(Family{std::string(name), std::string(help), type, {}});
        family = std::prev(families_.end());
    } else if (family->type != type || family->help != help) {
        throw std::invalid_argument(
            fmt::format("'{}' is registered with another type or help text", name));
    }
    for (Series& s : family->series) {
        if (s.labels == labels) {
            const auto* h = std::get_if<Histogram>(&s.metric);
            if (h != nullptr &&
                !std::equal(h->bounds().begin(), h->bounds().end(), bounds.begin(), bounds.end())) {
                throw std::invalid_argument(fmt::format("'{}' has other bounds", name));
            }
            return s;
        }
    }
    switch (type) {
    case Type::counter:
        family->series.push_back(Series{std::move(labels), Counter{}});
        break;
    case Type::gauge:
        family->series.push_back(Series{std::move(labels), Gauge{}});
        break;
    case Type::histogram:
        family->series.push_back(Series{std::move(labels), Histogram(bounds)});
        break;
    }
    return family->series.back();
}

Counter& Registry::counter(std::string_view name, std::string_view help, Labels labels)
{
    return std::get<Counter>(series(name, help, Type::counter, std::move(labels), {}).metric);
}

Gauge& Registry::gauge(std::string_view name, std::string_view help, Labels labels)
{
    return std::get<Gauge>(series(name, help, Type::gauge, std::move(labels), {}).metric);
}

Histogram& Registry::histogram(std::string_view name, std::string_view help,
                               std::span<const double> bounds, Labels labels)
{
    return std::get<Histogram>(
        series(name, help, Type::histogram, std::move(labels), bounds).metric);
}

std::uint64_t Registry::add_collector(std::function<void()> collect)
{
    const std::uint64_t id = next_collector_++;
    collectors_.emplace_back(id, std::move(collect));
    return id;
}

void Registry::remove_collector(std::uint64_t id)
{
    std::erase_if(collectors_, [id](const auto& c) { return c.first == id; });
}

std::string Registry::render()
{
    for (const auto& [id, collect] : collectors_) {
        collect();
    }
    std::string out;
    out.reserve(16 * 1024);
    for (const Family& f : families_) {
        if (f.series.empty()) {
            continue;
        }
        const char* type = f.type == Type::counter ? "counter"
                           : f.type == Type::gauge ? "gauge"
                                                   : "histogram";
        fmt::format_to(std::back_inserter(out), "# HELP {} {}\n# TYPE {} {}\n", f.name,
                       escape_help(f.help), f.name, type);
        for (const Series& s : f.series) {
            if (const auto* c = std::get_if<Counter>(&s.metric)) {
                write_sample(out, f.name, "", s.labels, c->value);
            } else if (const auto* g = std::get_if<Gauge>(&s.metric)) {
                write_sample(out, f.name, "", s.labels, g->value);
            } else {
                const auto& h = std::get<Histogram>(s.metric);
                // The format's buckets are cumulative: each counts every observation <= its
                // bound, and +Inf equals _count.
                std::uint64_t cumulative = 0;
                for (std::size_t i = 0; i < h.buckets().size(); ++i) {
                    cumulative += h.buckets()[i];
                    const std::string le =
                        i < h.bounds().size() ? format_value(h.bounds()[i]) : "+Inf";
                    const std::pair<std::string_view, std::string_view> extra{"le", le};
                    write_sample(out, f.name, "_bucket", s.labels, cumulative, &extra);
                }
                write_sample(out, f.name, "_sum", s.labels, h.sum());
                write_sample(out, f.name, "_count", s.labels, h.count());
            }
        }
    }
    return out;
}

std::string format_value(double value)
{
    if (std::isnan(value)) {
        return "NaN";
    }
    if (std::isinf(value)) {
        return value > 0 ? "+Inf" : "-Inf";
    }
    // The shortest text that reads back as the same double ("3", "0.00025", "1e-05"): what Go's
    // ParseFloat, and so Prometheus, reads.
    return fmt::format("{}", value);
}

std::string escape_label_value(std::string_view value)
{
    std::string out;
    out.reserve(value.size());
    for (char c : value) {
        switch (c) {
        case '\\':
            out += "\\\\";
            break;
        case '"':
            out += "\\\"";
            break;
        case '\n':
            out += "\\n";
            break;
        default:
            out += c;
        }
    }
    return out;
}

std::string escape_help(std::string_view help)
{
    std::string out;
    out.reserve(help.size());
    for (char c : help) {
        if (c == '\\') {
            out += "\\\\";
        } else if (c == '\n') {
            out += "\\n";
        } else {
            out += c;
        }
    }
    return out;
}

void register_process_metrics(Registry& registry, std::string_view version)
{
    const auto now = std::chrono::system_clock::now().time_since_epoch();
    registry
        .gauge("qmachined_start_time_seconds", "When qmachined started, as a Unix time in seconds.")
        .set(std::chrono::duration<double>(now).count());
    registry
        .gauge("qmachined_build_info", "qmachined's version, as a label; the value is always 1.",
               {{"version", std::string(version)}})
        .set(1);
}

} // namespace qm::daemon
