// SPDX-License-Identifier: GPL-2.0-or-later
// The supervisor suite's fixture: a Supervisor on private state and runtime directories with real
// QEMU, helpers that run its operations to completion, and the checks that nothing is left behind.
#pragma once

#include <sys/resource.h>
#include <sys/types.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include <unistd.h>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include "daemon/supervisor/supervisor.hpp"
#include "libmachine/asio.hpp"
#include "libmachine/json.hpp"
#include "libmachine/proc/child_watcher.hpp"
#include "tests/support/loop.hpp"
#include "tests/support/qemu_process.hpp"

namespace qm {
inline void PrintTo(MachineState s, std::ostream* os)
{
    *os << to_string(s);
}
} // namespace qm

namespace qm::test {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using daemon::MachineInfo;
using daemon::OpResult;
using daemon::Supervisor;
using daemon::SupervisorOptions;

inline std::string describe(const Error& e)
{
    return std::string(to_string(static_cast<errc>(e.code.value()))) + ": " + e.message;
}

inline std::string read_file(const fs::path& path)
{
    std::ifstream f(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

inline void write_file(const fs::path& path, const std::string& content)
{
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f << content;
}

inline bool process_gone(pid_t pid)
{
    return ::kill(pid, 0) != 0 && errno == ESRCH;
}

inline json::Document parse_json(const std::string& text)
{
    auto d = json::parse(text);
    if (!d) {
        ADD_FAILURE() << "bad JSON in the test: " << text;
        return json::Document();
    }
    return std::move(*d);
}

// Every file below `dir` (recursively) whose name ends with `suffix`.
inline std::vector<std::string> files_ending(const fs::path& dir, const std::string& suffix)
{
    std::vector<std::string> out;
    std::error_code ec;
    for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::end(it);
         it.increment(ec)) {
        const auto name = it->path().filename().string();
        if (name.size() >= suffix.size() &&
            name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
            out.push_back(it->path().string());
        }
    }
    return out;
}

class SupervisorFixture : public testing::Test
{
protected:
    void SetUp() override
    {
        if (auto why = QemuProcess::unavailable_reason()) {
            GTEST_SKIP() << "no QEMU: " << *why;
        }
        // The supervisor logs every transition at info: QM_TEST_LOG=info shows them.
        const char* level = std::getenv("QM_TEST_LOG");
        spdlog::set_level(level != nullptr ? spdlog::level::from_str(level) : spdlog::level::warn);
        // 200 machines hold ~600 descriptors: more than the usual soft limit of 1024 allows
        // with everything else.
        rlimit rl{};
        if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
            rl.rlim_cur = rl.rlim_max;
            ::setrlimit(RLIMIT_NOFILE, &rl);
        }
        root_ = fs::temp_directory_path() / "sup";
        fs::create_directories(root_ / "state");
        fs::create_directories(root_ / "run");
        options_.state_dir = (root_ / "state").string();
        options_.runtime_dir = (root_ / "run").string();
        options_.probe_timeout = 300ms;
    }

    void TearDown() override
    {
        if (sup_) {
            shutdown_supervisor();
        }
        auto& watcher = proc::ChildWatcher::get(ioc_);
        EXPECT_TRUE(run_until(ioc_, [&] { return watcher.watched() == 0; }, 30s))
            << watcher.watched() << " processes still watched at the end of the test";
        ioc_.restart();
        ioc_.poll();
        std::error_code ec;
        fs::remove_all(root_, ec);
    }

    // A new supervisor on the fixture's directories (after load()).
    Supervisor& open_supervisor()
    {
        sup_ = std::make_unique<Supervisor>(ioc_, options_);
        auto loaded = sup_->load();
        EXPECT_TRUE(loaded) << describe(loaded.error());
        if (loaded) {
            problems_ = std::move(*loaded);
        }
        return *sup_;
    }

    // Stops every machine (the daemon's shutdown), then destroys the supervisor.
    void shutdown_supervisor()
    {
        run_co(ioc_, sup_->shutdown(), 120s);
        for (const auto& m : sup_->list()) {
            EXPECT_FALSE(has_process(m.state)) << m.name << " is still " << to_string(m.state);
        }
        sup_.reset();
    }

    // A spec of `-machine none` with no console (nothing for a serial port to attach to).
    static std::string none_spec(const std::string& extra = {})
    {
        return fmt::format(R"({{"binary": {}, "machine": "none", "console": {{"enabled": false}},
                               "shutdown": {{"mode": "quit", "timeout_s": 10}}{}}})",
                           json::quote(QemuProcess::binary()), extra);
    }

    expected<OpResult> create(const std::string& name, const std::string& spec)
    {
        return run_co(ioc_, sup_->create(name, parse_json(spec)));
    }
    expected<OpResult> start(const std::string& name)
    {
        return run_co(ioc_, sup_->start(name), 60s);
    }
    expected<OpResult> stop(const std::string& name, daemon::StopOptions o = {})
    {
        return run_co(ioc_, sup_->stop(name, o), 90s);
    }
    expected<OpResult> kill(const std::string& name) { return run_co(ioc_, sup_->kill(name), 60s); }
    expected<OpResult> pause(const std::string& name)
    {
        return run_co(ioc_, sup_->pause(name), 30s);
    }
    expected<OpResult> resume(const std::string& name)
    {
        return run_co(ioc_, sup_->resume(name), 30s);
    }
    expected<OpResult> restart(const std::string& name)
    {
        return run_co(ioc_, sup_->restart(name), 90s);
    }
    expected<std::uint64_t> remove(const std::string& name, bool force = false)
    {
        return run_co(ioc_, sup_->remove(name, force), 60s);
    }
    expected<OpResult> update(const std::string& name, const std::string& spec,
                              std::uint64_t generation)
    {
        return run_co(ioc_, sup_->update(name, parse_json(spec), generation));
    }
    expected<daemon::QmpResult> qmp(const std::string& name, const std::string& command,
                                     const std::string& args = "null",
                                     std::optional<std::chrono::milliseconds> timeout = {})
    {
        return run_co(ioc_, sup_->qmp(name, command, parse_json(args), timeout), 30s);
    }

    MachineState state(const std::string& name)
    {
        auto m = sup_->inspect(name);
        return m ? m->state : MachineState::defined;
    }
    MachineInfo info(const std::string& name)
    {
        auto m = sup_->inspect(name);
        EXPECT_TRUE(m) << describe(m.error());
        return m ? *m : MachineInfo{};
    }
    bool wait_state(const std::string& name, MachineState s, std::chrono::milliseconds t = 30s)
    {
        return run_until(ioc_, [&] { return state(name) == s; }, t);
    }

    // The STATE_CHANGED states of `name` published after `since`, in order.
    std::vector<std::string> states_since(const std::string& name, std::uint64_t since)
    {
        std::vector<std::string> out;
        daemon::EventSelector sel;
        sel.machine = name;
        sel.names = {std::string(daemon::event_names::state_changed)};
        for (const auto& e : sup_->events().replay(since, sel)) {
            out.emplace_back(json::get_string(e.data(), "state").value_or("?"));
        }
        return out;
    }

    asio::io_context ioc_{1};
    fs::path root_;
    SupervisorOptions options_;
    std::unique_ptr<Supervisor> sup_;
    std::vector<daemon::LoadProblem> problems_;
};

} // namespace qm::test
