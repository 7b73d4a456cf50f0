// SPDX-License-Identifier: GPL-2.0-or-later
// The daemon's metrics: counters, gauges and histograms kept as plain numbers, and their text in
// the Prometheus exposition format 0.0.4 (what `GET /metrics` answers).
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace qm::daemon {

// A series' labels, (name, value), in the order they are written.
using Labels = std::vector<std::pair<std::string, std::string>>;

// Only ever goes up (restarts at 0 with the daemon). A collector may set it from a count kept
// elsewhere (EventBus::last_seq()).
struct Counter
{
    std::uint64_t value = 0;
    void inc(std::uint64_t n = 1) noexcept { value += n; }
};

struct Gauge
{
    double value = 0;
    void set(double v) noexcept { value = v; }
};

// Latencies from 100 µs (a QMP query, a REST GET) to 10 s (a QMP command that waits for QEMU).
inline constexpr std::array<double, 16> latency_buckets{
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
};

// Observations by bucket. Each bucket counts only its own observations (bound[i-1], bound[i]];
// the text makes them cumulative. observe() neither allocates nor searches more than the bounds.
class Histogram
{
public:
    // `bounds`: the upper bounds, ascending, without +Inf; they must outlive the histogram
    // (latency_buckets does).
    explicit Histogram(std::span<const double> bounds);

    void observe(double value) noexcept;

    std::span<const double> bounds() const noexcept { return bounds_; }
    // One per bound, then the one above the last bound (+Inf).
    std::span<const std::uint64_t> buckets() const noexcept { return buckets_; }
    double sum() const noexcept { return sum_; }
    std::uint64_t count() const noexcept { return count_; }

private:
    std::span<const double> bounds_;
    std::vector<std::uint64_t> buckets_;
    double sum_ = 0;
    std::uint64_t count_ = 0;
};

// Owned by the supervisor (Supervisor::metrics()); loop thread only, so no atomics and no locks.
// Registering a series returns a reference to it that stays valid for the registry's life: the
// hot paths keep it and only add to a number. A family renders in the order it was first
// registered, its series in theirs; a family without series is left out. Registering a name or
// label that the format does not allow, a name twice with two types or help texts, or a histogram
// with other bounds, is a bug: std::invalid_argument.
class Registry
{
public:
    // The series of family `name` with these labels, created (at 0) the first time.
    Counter& counter(std::string_view name, std::string_view help, Labels labels = {});
    Gauge& gauge(std::string_view name, std::string_view help, Labels labels = {});
    Histogram& histogram(std::string_view name, std::string_view help,
                         std::span<const double> bounds, Labels labels = {});

    // Called by render() first, in the order added: a collector sets gauges (and counters) from
    // what is counted elsewhere (machines by state, open connections). Its owner removes it
    // before it goes away.
    std::uint64_t add_collector(std::function<void()> collect);
    void remove_collector(std::uint64_t id);

    // Every family as text: `# HELP`, `# TYPE`, then its samples, one per line.
    std::string render();

private:
    enum class Type { counter, gauge, histogram };
    struct Series
    {
        Labels labels;
        std::variant<Counter, Gauge, Histogram> metric;
    };
    struct Family
    {
        std::string name;
        std::string help;
        Type type;
        std::deque<Series> series; // a deque: references to its elements survive push_back
    };

    Series& series(std::string_view name, std::string_view help, Type type, Labels labels,
                   std::span<const double> bounds);

    std::deque<Family> families_;
    std::vector<std::pair<std::uint64_t, std::function<void()>>> collectors_;
    std::uint64_t next_collector_ = 1;
};

// A sample value as the format writes it: integers without a point, "+Inf", "-Inf", "NaN".
std::string format_value(double value);
// A label value between its quotes: `\` → `\\`, `"` → `\"`, newline → `\n`.
std::string escape_label_value(std::string_view value);
// A HELP text: `\` → `\\`, newline → `\n`.
std::string escape_help(std::string_view help);

// The process' own series: qmachined_start_time_seconds (now, as the Unix time) and
// qmachined_build_info{version} 1.
void register_process_metrics(Registry& registry, std::string_view version);

} // namespace qm::daemon
