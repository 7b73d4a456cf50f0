// SPDX-License-Identifier: GPL-2.0-or-later
// What the fuzz targets that drive a real Supervisor share: a scratch directory for its state and
// runtime directories, and running its loop until something is done.
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>

#include <stdlib.h>

#include "libmachine/asio.hpp"

namespace qm::fuzz {

// A directory of its own, "<prefix>-XXXXXX" on tmpfs when there is one (every create and delete
// syncs the state directory), removed with everything in it at destruction. Aborts when none can
// be made: the target cannot run.
class ScratchDir
{
public:
    explicit ScratchDir(const std::string& prefix)
    {
        namespace fs = std::filesystem;
        const std::string base =
            fs::is_directory("/dev/shm") ? "/dev/shm" : fs::temp_directory_path().string();
        std::string tmpl = base + "/" + prefix + "-XXXXXX";
        if (::mkdtemp(tmpl.data()) == nullptr) {
            std::fprintf(stderr, "fuzz: cannot create the temporary directory %s\n", tmpl.c_str());
            std::abort();
        }
        path_ = tmpl;
    }
    ~ScratchDir()
    {
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }
    ScratchDir(const ScratchDir&) = delete;
    ScratchDir& operator=(const ScratchDir&) = delete;

    const std::filesystem::path& path() const noexcept { return path_; }

private:
    std::filesystem::path path_;
};

// Runs `ioc` until `done` holds or the deadline passes; whether `done`. A loop that runs out of
// work meanwhile is restarted (the next handler may come from a thread: the store's worker).
template <class Done>
bool run_until(asio::io_context& ioc, Done done, std::chrono::milliseconds deadline)
{
    using namespace std::chrono_literals;
    const auto end = std::chrono::steady_clock::now() + deadline;
    ioc.restart();
    while (!done()) {
        const auto now = std::chrono::steady_clock::now();
        if (now >= end) {
            return false;
        }
        ioc.run_one_for(std::chrono::duration_cast<std::chrono::milliseconds>(end - now) + 1ms);
        if (ioc.stopped()) {
            ioc.restart();
        }
    }
    return true;
}

} // namespace qm::fuzz
