// SPDX-License-Identifier: GPL-2.0-or-later
// The metrics registry without a daemon: the exact text of small registries (Prometheus
// exposition format 0.0.4), label and HELP escaping, cumulative histogram buckets, collectors, and
// the names it refuses; and the strict reader the over-the-wire tests use
// (tests/rest/exposition.hpp), against the registry's text and against texts it must refuse.
#include "daemon/metrics.hpp"

#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "tests/rest/exposition.hpp"

namespace qm::daemon {
namespace {

constexpr std::array<double, 2> two_bounds{0.25, 1};

TEST(MetricsTest, ExactTextOfASmallRegistry)
{
    Registry r;
    Counter& ok = r.counter("t_requests_total", "Requests.", {{"route", "a"}, {"status", "200"}});
    Counter& bad = r.counter("t_requests_total", "Requests.", {{"route", "a"}, {"status", "404"}});
    Gauge& open = r.gauge("t_open", "Open things.");
    Histogram& h = r.histogram("t_seconds", "Latency.", two_bounds, {{"route", "a"}});
    ok.inc();
    ok.inc(2);
    bad.inc();
    open.set(-2.5);
    // Exact binary fractions: the sum is exact too. 0.25 is on a bound, which "le" includes.
    for (double v : {0.125, 0.25, 0.5, 4.0}) {
        h.observe(v);
    }
    EXPECT_EQ(r.render(), "# HELP t_requests_total Requests.\n"
                          "# TYPE t_requests_total counter\n"
                          "t_requests_total{route=\"a\",status=\"200\"} 3\n"
                          "t_requests_total{route=\"a\",status=\"404\"} 1\n"
                          "# HELP t_open Open things.\n"
                          "# TYPE t_open gauge\n"
                          "t_open -2.5\n"
                          "# HELP t_seconds Latency.\n"
                          "# TYPE t_seconds histogram\n"
                          "t_seconds_bucket{route=\"a\",le=\"0.25\"} 2\n"
                          "t_seconds_bucket{route=\"a\",le=\"1\"} 3\n"
                          "t_seconds_bucket{route=\"a\",le=\"+Inf\"} 4\n"
                          "t_seconds_sum{route=\"a\"} 4.875\n"
                          "t_seconds_count{route=\"a\"} 4\n");
}

TEST(MetricsTest, SameNameAndLabelsIsTheSameSeries)
{
    Registry r;
    Counter& a = r.counter("t_total", "T.", {{"k", "v"}});
    Counter& b = r.counter("t_total", "T.", {{"k", "v"}});
    Counter& c = r.counter("t_total", "T.", {{"k", "w"}});
    EXPECT_EQ(&a, &b);
    EXPECT_NE(&a, &c);
    // References stay valid while more series and families are added.
    for (int i = 0; i < 1000; ++i) {
        r.counter("t_total", "T.", {{"k", std::to_string(i)}});
        r.gauge("t_g" + std::to_string(i), "G.");
    }
    a.inc(7);
    EXPECT_EQ(r.counter("t_total", "T.", {{"k", "v"}}).value, 7U);
}

TEST(MetricsTest, LabelValuesAndHelpAreEscaped)
{
    Registry r;
    r.gauge("t_g", "A \\ backslash\nand a \"quote\".", {{"path", "C:\\dir \"x\"\nnext"}}).set(1);
    // HELP escapes backslash and newline only; a label value escapes the quote too.
    EXPECT_EQ(r.render(), "# HELP t_g A \\\\ backslash\\nand a \"quote\".\n"
                          "# TYPE t_g gauge\n"
                          "t_g{path=\"C:\\\\dir \\\"x\\\"\\nnext\"} 1\n");
    EXPECT_EQ(escape_label_value("plain"), "plain");
    EXPECT_EQ(escape_label_value("\\\"\n"), "\\\\\\\"\\n");
    EXPECT_EQ(escape_help("\\\"\n"), "\\\\\"\\n");
}

TEST(MetricsTest, HistogramBucketsAreCumulative)
{
    Registry r;
    Histogram& h = r.histogram("t_seconds", "L.", latency_buckets);
    // One observation per bucket, the +Inf one included, and three in the first.
    h.observe(0);
    h.observe(0.00005);
    for (double bound : latency_buckets) {
        h.observe(bound);
    }
    h.observe(11);
    ASSERT_EQ(h.buckets().size(), latency_buckets.size() + 1);
    EXPECT_EQ(h.buckets().front(), 3U);
    EXPECT_EQ(h.buckets().back(), 1U);
    EXPECT_EQ(h.count(), latency_buckets.size() + 3);

    const std::string text = r.render();
    std::uint64_t expected = 2;
    for (double bound : latency_buckets) {
        ++expected;
        const std::string line = "t_seconds_bucket{le=\"" + format_value(bound) + "\"} " +
                                 std::to_string(expected) + "\n";
        EXPECT_NE(text.find(line), std::string::npos) << line << "in\n" << text;
    }
    EXPECT_NE(text.find("t_seconds_bucket{le=\"+Inf\"} " + std::to_string(h.count()) + "\n"),
              std::string::npos)
        << text;
    EXPECT_NE(text.find("t_seconds_count " + std::to_string(h.count()) + "\n"), std::string::npos)
        << text;
    EXPECT_NE(text.find("t_seconds_bucket{le=\"0.0001\"} 3\n"), std::string::npos) << text;
    EXPECT_NE(text.find("t_seconds_bucket{le=\"10\"} 18\n"), std::string::npos) << text;
}

TEST(MetricsTest, ValuesAsTheFormatWritesThem)
{
    EXPECT_EQ(format_value(3), "3");
    EXPECT_EQ(format_value(0), "0");
    EXPECT_EQ(format_value(0.00025), "0.00025");
    EXPECT_EQ(format_value(1700000000.5), "1700000000.5");
    EXPECT_EQ(format_value(std::numeric_limits<double>::infinity()), "+Inf");
    EXPECT_EQ(format_value(-std::numeric_limits<double>::infinity()), "-Inf");
    EXPECT_EQ(format_value(std::numeric_limits<double>::quiet_NaN()), "NaN");
    // Shortest round trip: what the scraper parses is the double we had.
    EXPECT_EQ(std::stod(format_value(0.1 + 0.2)), 0.1 + 0.2);
}

TEST(MetricsTest, CollectorsRunAtRenderUntilRemoved)
{
    Registry r;
    Gauge& g = r.gauge("t_open", "Open.");
    double source = 4;
    int calls = 0;
    const auto id = r.add_collector([&] {
        ++calls;
        g.set(source);
    });
    EXPECT_NE(r.render().find("t_open 4\n"), std::string::npos);
    source = 5;
    EXPECT_NE(r.render().find("t_open 5\n"), std::string::npos);
    EXPECT_EQ(calls, 2);
    r.remove_collector(id);
    source = 6;
    EXPECT_NE(r.render().find("t_open 5\n"), std::string::npos);
    EXPECT_EQ(calls, 2);
}

TEST(MetricsTest, FamiliesWithoutSeriesAreLeftOut)
{
    Registry r;
    EXPECT_EQ(r.render(), "");
    r.gauge("t_a", "A.").set(1);
    EXPECT_EQ(r.render(), "# HELP t_a A.\n# TYPE t_a gauge\nt_a 1\n");
}

TEST(MetricsTest, NamesTheFormatRefusesAreBugs)
{
    Registry r;
    EXPECT_THROW(r.gauge("1abc", "X."), std::invalid_argument);
    EXPECT_THROW(r.gauge("a-b", "X."), std::invalid_argument);
    EXPECT_THROW(r.gauge("", "X."), std::invalid_argument);
    EXPECT_THROW(r.gauge("t_a", "X.", {{"__name", "x"}}), std::invalid_argument);
    EXPECT_THROW(r.gauge("t_a", "X.", {{"a b", "x"}}), std::invalid_argument);
    EXPECT_THROW(r.gauge("t_a", "X.", {{"k", "x"}, {"k", "y"}}), std::invalid_argument);
    EXPECT_THROW(r.counter("t_requests", "X."), std::invalid_argument);
    EXPECT_THROW(r.histogram("t_h", "X.", two_bounds, {{"le", "1"}}), std::invalid_argument);
    const std::array<double, 2> descending{1, 0.5};
    EXPECT_THROW(r.histogram("t_h", "X.", descending), std::invalid_argument);
    // One name, one type and one help text.
    r.gauge("t_b", "B.");
    EXPECT_THROW(r.counter("t_b", "B."), std::invalid_argument);
    EXPECT_THROW(r.gauge("t_b", "Other."), std::invalid_argument);
    r.histogram("t_h", "H.", two_bounds);
    EXPECT_THROW(r.histogram("t_h", "H.", latency_buckets), std::invalid_argument);
    // Colons are allowed in metric names (recording rules use them), not in label names.
    EXPECT_NO_THROW(r.gauge("t:c", "C."));
    EXPECT_THROW(r.gauge("t_c", "C.", {{"a:b", "x"}}), std::invalid_argument);
    // A refused call leaves nothing behind: the families are the ones registered above.
    const test::Exposition e = test::parse_exposition(r.render());
    EXPECT_TRUE(e.errors.empty()) << testing::PrintToString(e.errors);
    std::vector<std::string> names;
    for (const auto& [name, family] : e.families) {
        names.push_back(name);
    }
    EXPECT_EQ(names, (std::vector<std::string>{"t:c", "t_b", "t_h"}));
}

TEST(MetricsTest, ProcessMetrics)
{
    Registry r;
    const auto before =
        std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    register_process_metrics(r, "1.2.3");
    const std::string text = r.render();
    EXPECT_NE(text.find("# TYPE qmachined_build_info gauge\n"
                        "qmachined_build_info{version=\"1.2.3\"} 1\n"),
              std::string::npos)
        << text;
    const std::string key = "\nqmachined_start_time_seconds ";
    const auto at = text.find(key);
    ASSERT_NE(at, std::string::npos) << text;
    const double started = std::stod(text.substr(at + key.size()));
    EXPECT_GE(started, std::floor(before));
    EXPECT_LT(started, before + 60);
}

// ---- the reader of the tests ----------------------------------------------------------------

TEST(ExpositionTest, TheRegistrysTextReadsBack)
{
    Registry r;
    r.counter("t_requests_total", "Requests \\ \"all\"\n.", {{"route", "a\"b\\c\nd"}}).inc(5);
    r.gauge("t_open", "Open.").set(0.5);
    Histogram& h = r.histogram("t_seconds", "L.", latency_buckets, {{"route", "x"}});
    h.observe(0.003);
    h.observe(20);
    register_process_metrics(r, "0.1.0");
    const test::Exposition e = test::parse_exposition(r.render());
    EXPECT_TRUE(e.errors.empty()) << testing::PrintToString(e.errors);
    ASSERT_TRUE(e.families.contains("t_requests_total"));
    EXPECT_EQ(e.families.at("t_requests_total").help, "Requests \\ \"all\"\n.");
    EXPECT_EQ(e.families.at("t_requests_total").type, "counter");
    EXPECT_EQ(e.value("t_requests_total", {{"route", "a\"b\\c\nd"}}), 5);
    EXPECT_EQ(e.value("t_open"), 0.5);
    EXPECT_EQ(e.value("t_seconds_bucket", {{"route", "x"}, {"le", "0.0025"}}), 0);
    EXPECT_EQ(e.value("t_seconds_bucket", {{"route", "x"}, {"le", "0.005"}}), 1);
    EXPECT_EQ(e.value("t_seconds_bucket", {{"route", "x"}, {"le", "+Inf"}}), 2);
    EXPECT_EQ(e.value("t_seconds_count", {{"route", "x"}}), 2);
    EXPECT_EQ(e.value("qmachined_build_info", {{"version", "0.1.0"}}), 1);
}

TEST(ExpositionTest, RefusesWhatTheFormatDoesNotAllow)
{
    const std::string ok = "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n";
    ASSERT_TRUE(test::parse_exposition(ok).errors.empty())
        << testing::PrintToString(test::parse_exposition(ok).errors);
    const std::vector<std::pair<const char*, std::string>> bad{
        {"no newline at the end", "# HELP a A.\n# TYPE a gauge\na 1"},
        {"no TYPE", "# HELP a A.\na 1\n"},
        {"no HELP", "# TYPE a gauge\na 1\n"},
        {"TYPE after the samples", "# HELP a A.\na 1\n# TYPE a gauge\n"},
        {"unknown type", "# HELP a A.\n# TYPE a meter\na 1\n"},
        {"a blank line", "# HELP a A.\n# TYPE a gauge\n\na 1\n"},
        {"not a value", "# HELP a A.\n# TYPE a gauge\na one\n"},
        {"a timestamp", "# HELP a A.\n# TYPE a gauge\na 1 1700000000\n"},
        {"an unescaped quote", "# HELP a A.\n# TYPE a gauge\na{l=\"x\"y\"} 1\n"},
        {"an unknown escape", "# HELP a A.\n# TYPE a gauge\na{l=\"x\\ty\"} 1\n"},
        {"an unclosed label set", "# HELP a A.\n# TYPE a gauge\na{l=\"x\" 1\n"},
        {"a series twice", "# HELP a A.\n# TYPE a gauge\na{l=\"x\"} 1\na{l=\"x\"} 2\n"},
        {"a family split", "# HELP a A.\n# TYPE a gauge\na{l=\"x\"} 1\n# HELP b B.\n"
                           "# TYPE b gauge\nb 1\na{l=\"y\"} 1\n"},
        {"a negative counter", "# HELP a_total A.\n# TYPE a_total counter\na_total -1\n"},
        {"buckets not cumulative", "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\n"
                                   "h_bucket{le=\"+Inf\"} 1\nh_sum 3\nh_count 1\n"},
        {"no +Inf bucket", "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\n"
                           "h_count 1\n"},
        {"+Inf is not _count", "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\n"
                               "h_sum 1\nh_count 1\n"},
        {"no _sum", "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n"},
        {"bounds not ascending", "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"2\"} 1\n"
                                 "h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\n"
                                 "h_count 1\n"},
    };
    for (const auto& [why, text] : bad) {
        EXPECT_FALSE(test::parse_exposition(text).errors.empty()) << why << ":\n" << text;
    }
}

} // namespace
} // namespace qm::daemon
