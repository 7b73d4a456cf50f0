// SPDX-License-Identifier: GPL-2.0-or-later
// Reading the tail of a log file without reading all of it.
#include "daemon/log_tail.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

namespace qm::daemon {

expected<std::string> read_log_tail(const std::string& path, std::optional<std::size_t> max_lines,
                                    std::size_t limit)
{
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (fd < 0) {
        if (errno == ENOENT) {
            return std::string();
        }
        return fail(errc::system_error, fmt::format("cannot open '{}': {}", path, std::strerror(errno)));
    }
    struct stat st{};
    std::string data;
    if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
        const auto size = static_cast<std::size_t>(st.st_size);
        const std::size_t want = std::min(size, limit);
        data.resize(want);
        const ssize_t n = ::pread(fd, data.data(), want, static_cast<off_t>(size - want));
        data.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
        if (want < size) {
            // Started mid-line: drop the partial first line.
            const std::size_t nl = data.find('\n');
            data.erase(0, nl == std::string::npos ? 0 : nl + 1);
        }
    }
    ::close(fd);
    if (max_lines) {
        std::size_t pos = data.size();
        // A final newline ends the last line; it does not start another one.
        if (pos > 0 && data[pos - 1] == '\n') {
            --pos;
        }
        std::size_t lines = 0;
        while (lines < *max_lines && pos > 0) {
            const std::size_t nl = data.rfind('\n', pos - 1);
            if (nl == std::string::npos) {
                pos = 0;
                ++lines;
                break;
            }
            ++lines;
            if (lines == *max_lines) {
                pos = nl + 1;
                break;
            }
            pos = nl;
        }
        if (*max_lines == 0) {
            pos = data.size();
        }
        data.erase(0, pos);
    }
    return data;
}

} // namespace qm::daemon
