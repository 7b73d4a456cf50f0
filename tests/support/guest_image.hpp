// SPDX-License-Identifier: GPL-2.0-or-later
// The test guest (scripts/guest-image: Debian's cloud kernel and a busybox initramfs whose /init is
// tests/guest/init), built once and cached; QM_SOURCE_DIR must name the source tree.
#pragma once

#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include <fmt/format.h>

#ifndef QM_SOURCE_DIR
#error "QM_SOURCE_DIR (the source tree, for scripts/guest-image) must be defined by the build"
#endif

namespace qm::test {

// Where the guest's vmlinuz and initramfs.cpio.gz are, or why there are none. scripts/guest-image
// (which honours QM_GUEST_DIR) builds them once and caches them; it prints the directory last.
struct GuestImage
{
    std::string dir;
    std::string error;
};

inline const GuestImage& guest_image()
{
    static const GuestImage image = [] {
        GuestImage g;
        const std::string script = std::string(QM_SOURCE_DIR) + "/scripts/guest-image";
        const std::string command = fmt::format("'{}' 2>&1 </dev/null", script);
        FILE* p = ::popen(command.c_str(), "r");
        if (p == nullptr) {
            g.error = "cannot run " + script;
            return g;
        }
        std::string out;
        char buf[4096];
        for (std::size_t n; (n = std::fread(buf, 1, sizeof(buf), p)) > 0;) {
            out.append(buf, n);
        }
        const int status = ::pclose(p);
        while (!out.empty() && out.back() == '\n') {
            out.pop_back();
        }
        const auto nl = out.rfind('\n');
        const std::string last = nl == std::string::npos ? out : out.substr(nl + 1);
        if (status != 0) {
            g.error = fmt::format("{} failed (exit status {}):\n{}", script,
                                  WIFEXITED(status) ? WEXITSTATUS(status) : -1, out);
        } else if (!std::filesystem::exists(last + "/vmlinuz") || !std::filesystem::exists(last + "/initramfs.cpio.gz")) {
            g.error =
                fmt::format("{} printed '{}', which holds no vmlinuz and initramfs.cpio.gz:\n{}",
                            script, last, out);
        } else {
            g.dir = last;
        }
        return g;
    }();
    return image;
}

} // namespace qm::test
