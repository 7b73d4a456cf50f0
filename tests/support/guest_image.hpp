// SPDX-License-Identifier: GPL-2.0-or-later
// The test guest (scripts/guest-image: Debian's cloud kernel and a busybox initramfs whose /init is
// tests/guest/init), built once and cached; QM_SOURCE_DIR must name the source tree.
#pragma once

#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include <fmt/format.h>

#include "libmachine/json.hpp"
#include "tests/support/qemu_process.hpp"

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

// A machine spec (proto/machine.schema.json) that boots the test guest under TCG with its serial
// console, `append` added to the kernel's command line (qmtest.hello=WORD, ...), stopped by the
// power button within `timeout_s`.
inline std::string guest_spec(const std::string& append = {}, int timeout_s = 60)
{
    const std::string& dir = guest_image().dir;
    std::string cmdline = "console=ttyS0 quiet panic=-1";
    if (!append.empty()) {
        cmdline += " " + append;
    }
    return fmt::format(
        R"({{"binary": {}, "machine": "pc,accel=tcg", "memory_mib": 128,
            "args": ["-nodefaults", "-no-user-config", "-no-reboot", "-kernel", {}, "-initrd",
                     {}, "-append", {}],
            "shutdown": {{"mode": "powerdown", "timeout_s": {}}}}})",
        json::quote(QemuProcess::binary()), json::quote(dir + "/vmlinuz"),
        json::quote(dir + "/initramfs.cpio.gz"), json::quote(cmdline), timeout_s);
}

} // namespace qm::test
