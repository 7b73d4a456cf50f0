// SPDX-License-Identifier: GPL-2.0-or-later
// The daemon suite's fixture for tests with machines: the real qmachined (DaemonFixture) plus a
// REST client, quick machine specs and the QEMUs of the test. At teardown every QEMU is gone,
// whatever the shutdown policy the test ran the daemon with.
#pragma once

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/asio.hpp"
#include "libmachine/json.hpp"
#include "tests/rest/daemon_fixture.hpp"
#include "tests/rest/http_client.hpp"
#include "tests/support/daemon_process.hpp"
#include "tests/support/qemu_process.hpp"

namespace qm::test {

// Starts in milliseconds and quits at once; with a console socket (nothing behind it under
// -machine none, but QEMU serves it) or without.
inline std::string quick_spec(bool console = false)
{
    return fmt::format(R"({{"binary": {}, "machine": "none", "console": {{"enabled": {}}},
        "shutdown": {{"mode": "quit", "timeout_s": 10}}}})",
                       json::quote(QemuProcess::binary()), console ? "true" : "false");
}

// Whether `pid` runs (a zombie does not: a QEMU whose daemon is gone is reaped by init, which
// may take a moment).
inline bool alive(pid_t pid)
{
    const std::string stat = read_whole_file("/proc/" + std::to_string(pid) + "/stat");
    const auto close = stat.rfind(')');
    return close != std::string::npos && close + 2 < stat.size() && stat[close + 2] != 'Z';
}

// The lines of `text` that contain `what`.
inline std::vector<std::string> lines_with(const std::string& text, const std::string& what)
{
    std::vector<std::string> out;
    std::size_t pos = 0;
    while (pos < text.size()) {
        auto end = text.find('\n', pos);
        if (end == std::string::npos) {
            end = text.size();
        }
        const std::string line = text.substr(pos, end - pos);
        if (line.find(what) != std::string::npos) {
            out.push_back(line);
        }
        pos = end + 1;
    }
    return out;
}

class MachineDaemonTest : public DaemonFixture
{
protected:
    void SetUp() override
    {
        DaemonFixture::SetUp();
        if (HasFatalFailure()) {
            return;
        }
        if (auto why = QemuProcess::unavailable_reason()) {
            GTEST_SKIP() << "no QEMU: " << *why;
        }
    }

    void TearDown() override
    {
        // A daemon that leaves its machines running at SIGTERM (or a test that failed half-way
        // with one) hands them to one that stops them; the fixture then checks nothing is left.
        if (daemon_ && leave_running_) {
            daemon_->signal(SIGTERM);
            EXPECT_EQ(daemon_->wait_exit(10s), 0) << daemon_->output();
            daemon_.reset();
        }
        if (!daemon_ && !IsSkipped() && !qemus().empty() && std::filesystem::exists(state_)) {
            start_daemon();
        }
        DaemonFixture::TearDown();
    }

    // DaemonFixture's (stop-machines, unless `extra` says otherwise).
    void start_daemon(const std::vector<std::string>& extra = {})
    {
        leave_running_ = std::find(extra.begin(), extra.end(), "leave-running") != extra.end();
        DaemonFixture::start_daemon(extra);
    }

    // qmachined with nothing but its directories: the default shutdown policy (leave-running).
    void start_default_daemon(const std::vector<std::string>& extra = {})
    {
        ASSERT_FALSE(daemon_) << "the daemon already runs";
        std::vector<std::string> args{"--state-dir", state_.string(), "--runtime-dir",
                                      runtime_.string(), "--bus", "none"};
        args.insert(args.end(), extra.begin(), extra.end());
        leave_running_ = true;
        daemon_ = std::make_unique<DaemonProcess>(
            QM_QMACHINED, args, root_ / ("daemon" + std::to_string(++runs_) + ".out"));
        const bool ready = eventually(
            [&] { return accepts_connections(socket_path()) || !daemon_->running(); }, 30s);
        ASSERT_TRUE(ready && daemon_->running()) << "qmachined did not become ready:\n"
                                                 << daemon_->output();
    }

    HttpResponse call(const std::string& method, const std::string& target, std::string body = {})
    {
        HttpConnection c(ioc_, socket_path());
        EXPECT_FALSE(c.error()) << c.error().message();
        HttpResponse r = c.request(method, target, std::move(body));
        c.close();
        return r;
    }

    HttpResponse create(const std::string& name, const std::string& spec)
    {
        return call("POST", "/v1/machines",
                    fmt::format(R"({{"name": "{}", "spec": {}}})", name, spec));
    }

    // Starts `name`; its pid (-1 when it did not start).
    pid_t start_machine(const std::string& name)
    {
        HttpResponse r = call("POST", "/v1/machines/" + name + "/start");
        EXPECT_EQ(r.status, 200) << r;
        EXPECT_EQ(r.str("state"), "running") << r;
        return static_cast<pid_t>(json::get_int(r.json(), "pid").value_or(-1));
    }

    json::Document machine(const std::string& name)
    {
        return call("GET", "/v1/machines/" + name).json();
    }

    std::filesystem::path machine_dir(const std::string& name)
    {
        return runtime_ / "m" / std::string(json::get_string(machine(name), "id").value_or("?"));
    }

    // The QEMUs of this test (their output goes to logs under the runtime directory; the
    // daemon, which names it on its command line, is not one).
    std::vector<pid_t> qemus()
    {
        auto out = processes_mentioning(runtime_.string());
        if (daemon_) {
            std::erase(out, daemon_->pid());
        }
        return out;
    }

    asio::io_context ioc_{1};
    bool leave_running_ = false; // the daemon runs with the default shutdown policy
};

} // namespace qm::test
