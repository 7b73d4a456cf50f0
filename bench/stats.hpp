// SPDX-License-Identifier: GPL-2.0-or-later
// Statistics shared by the benchmarks: nearest-rank percentiles of a sample, ranges over trials.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include <fmt/format.h>

namespace qm::bench {

// Nearest-rank percentile of `v` (0 < p <= 100); NaN for an empty sample. With fewer than 100
// samples, p99 is the largest one.
inline double percentile(std::vector<double> v, double p)
{
    if (v.empty()) {
        return std::nan("");
    }
    std::sort(v.begin(), v.end());
    const auto rank =
        static_cast<std::size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size())));
    return v[std::clamp<std::size_t>(rank, 1, v.size()) - 1];
}

// "lo-hi" of `v` (not empty), rounded to integers: the range of a figure over trials.
inline std::string range_of(const std::vector<double>& v)
{
    const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
    return fmt::format("{:.0f}-{:.0f}", *lo, *hi);
}

} // namespace qm::bench
