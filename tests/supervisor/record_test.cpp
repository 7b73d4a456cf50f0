// SPDX-License-Identifier: GPL-2.0-or-later
// Runtime records: the JSON round trip and every field record_from_json() rejects, the files
// (atomic, 0600, a missing or corrupt one), and find_recorded_process() against a live child, a
// reused or exited pid, another boot, another command line, and a record without a pid.
#include "daemon/supervisor/record.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "libmachine/json.hpp"
#include "libmachine/proc/proc_info.hpp"
#include "libmachine/proc/spawn.hpp"

#include "tests/support/children.hpp"
namespace qm::daemon {
namespace {

using test::reap;
using test::wait_exited_unreaped;

namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::string describe(const Error& e)
{
    return std::string(to_string(static_cast<errc>(e.code.value()))) + ": " + e.message;
}

std::string read_file(const fs::path& path)
{
    std::ifstream f(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void write_raw(const fs::path& path, const std::string& content)
{
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f << content;
}

RuntimeRecord sample(std::optional<pid_t> pid = 4242)
{
    RuntimeRecord r;
    r.name = "web-1";
    r.uuid = "0b6d1c3e-4c1f-4d5e-9a43-1c2b3d4e5f60";
    r.generation = 7;
    r.pid = pid;
    r.start_time = 123456789;
    r.boot_id = "6e3a3b2c-8a57-4a67-9f1e-0d1c2b3a4f5e";
    r.argv = {"qemu-system-x86_64", "-name", "guest=web-1,process=qemu:web-1", "a \"quoted\" arg",
              ""};
    r.argv_hash = proc::hash_command_line(r.argv);
    r.monitor = "/run/qmachined/m/0001/monitor.sock";
    r.console = "/run/qmachined/m/0001/console.sock";
    r.started_at_us = 1764121328123456; // microseconds since the epoch: beyond 32 bits
    r.restart_count = 3;
    return r;
}

// sample() as a JSON document, changed by `edit`, as text.
std::string edited(const std::function<void(json::Document&)>& edit)
{
    auto doc = json::parse(record_to_json(sample()));
    EXPECT_TRUE(doc);
    edit(*doc);
    return json::to_string(*doc);
}

TEST(RecordTest, JsonRoundTripWithAndWithoutPid)
{
    const auto r = sample();
    const auto text = record_to_json(r);
    auto back = record_from_json(text);
    ASSERT_TRUE(back) << describe(back.error()) << "\n" << text;
    EXPECT_EQ(*back, r);
    EXPECT_EQ(record_to_json(*back), text);

    auto doc = json::parse(text);
    ASSERT_TRUE(doc);
    EXPECT_EQ(json::get_int(*doc, "format"), record_format);
    EXPECT_EQ(json::get_int(*doc, "pid"), 4242);

    // Written before the spawn: no pid yet (null), and a machine without a console.
    auto spawning = sample(std::nullopt);
    spawning.console.clear();
    const auto text2 = record_to_json(spawning);
    auto doc2 = json::parse(text2);
    ASSERT_TRUE(doc2);
    ASSERT_NE(json::find(*doc2, "pid"), nullptr);
    EXPECT_TRUE(json::find(*doc2, "pid")->IsNull());
    EXPECT_TRUE(json::find(*doc2, "console")->IsNull());
    auto back2 = record_from_json(text2);
    ASSERT_TRUE(back2) << describe(back2.error());
    EXPECT_EQ(*back2, spawning);
    EXPECT_EQ(back2->pid, std::nullopt);

    // The extremes of the numbers survive.
    auto big = sample();
    big.generation = std::numeric_limits<std::uint64_t>::max();
    big.start_time = std::numeric_limits<std::uint64_t>::max();
    big.restart_count = std::numeric_limits<std::uint32_t>::max();
    big.started_at_us = std::numeric_limits<std::int64_t>::max();
    big.pid = std::numeric_limits<pid_t>::max();
    auto back3 = record_from_json(record_to_json(big));
    ASSERT_TRUE(back3) << describe(back3.error());
    EXPECT_EQ(*back3, big);
}

TEST(RecordTest, FromJsonRejectsWhatItCannotTrust)
{
    struct Case
    {
        const char* what;
        std::string text;
        const char* message; // a part of the error message
    };
    auto set_null = [](const char* key) {
        return [key](json::Document& d) { d[key].SetNull(); };
    };
    auto remove = [](const char* key) {
        return [key](json::Document& d) { d.RemoveMember(key); };
    };
    auto set_int = [](const char* key, std::int64_t v) {
        return [key, v](json::Document& d) { d[key].SetInt64(v); };
    };
    auto set_string = [](const char* key, const char* v) {
        return [key, v](json::Document& d) { d[key].SetString(v, d.GetAllocator()); };
    };
    const std::vector<Case> cases{
        {"bad JSON", "{\"format\": 1,", "not JSON"},
        {"empty", "", "not JSON"},
        {"not an object", "[1]", "not a JSON object"},
        {"format 2", edited(set_int("format", 2)), "format 2 is not 1"},
        {"format as a string", edited(set_string("format", "1")), "is not 1"},
        {"no format", edited(remove("format")), "is not 1"},
        {"no name", edited(remove("name")), "string field is missing"},
        {"no uuid", edited(remove("uuid")), "string field is missing"},
        {"no boot_id", edited(remove("boot_id")), "string field is missing"},
        {"no argv_hash", edited(remove("argv_hash")), "string field is missing"},
        {"no monitor", edited(remove("monitor")), "string field is missing"},
        {"name a number", edited(set_int("name", 3)), "string field is missing"},
        {"no generation", edited(remove("generation")), "number field is missing"},
        {"no start_time", edited(remove("start_time")), "number field is missing"},
        {"negative start_time", edited(set_int("start_time", -1)), "number field is missing"},
        {"no restart_count", edited(remove("restart_count")), "number field is missing"},
        {"no started_at_us", edited(remove("started_at_us")), "number field is missing"},
        {"start_time a string", edited(set_string("start_time", "5")), "number field is missing"},
        {"no pid", edited(remove("pid")), "pid must be a positive integer or null"},
        {"pid 0", edited(set_int("pid", 0)), "pid must be a positive integer or null"},
        {"pid -1", edited(set_int("pid", -1)), "pid must be a positive integer or null"},
        {"pid beyond int", edited(set_int("pid", std::int64_t{1} << 33)),
         "pid must be a positive integer or null"},
        {"pid a string", edited(set_string("pid", "42")), "pid must be a positive integer or null"},
        {"no argv", edited(remove("argv")), "argv must be a non-empty array"},
        {"argv null", edited(set_null("argv")), "argv must be a non-empty array"},
        {"argv a string", edited(set_string("argv", "qemu")), "argv must be a non-empty array"},
        {"empty argv",
         edited([](json::Document& d) { d["argv"].SetArray(); }),
         "argv must be a non-empty array"},
        {"argv with a number",
         edited([](json::Document& d) { d["argv"].PushBack(1, d.GetAllocator()); }),
         "argv must hold strings"},
        {"argv_hash of another argv",
         edited([](json::Document& d) { d["argv"][0].SetString("qemu-kvm"); }),
         "argv_hash does not match argv"},
        {"argv_hash changed", edited(set_string("argv_hash", "0000000000000000")),
         "argv_hash does not match argv"},
    };
    for (const auto& c : cases) {
        SCOPED_TRACE(c.what);
        auto r = record_from_json(c.text);
        ASSERT_FALSE(r) << c.text;
        EXPECT_TRUE(r.error().is(errc::invalid_argument)) << describe(r.error());
        EXPECT_NE(r.error().message.find(c.message), std::string::npos)
            << "message: " << r.error().message << "\ntext: " << c.text;
    }
}

class RecordFileTest : public testing::Test
{
protected:
    void SetUp() override
    {
        dir_ = fs::temp_directory_path() / "record-test";
        fs::create_directories(dir_);
    }
    void TearDown() override { fs::remove_all(dir_); }

    fs::path dir_;
};

TEST_F(RecordFileTest, WriteReadRemove)
{
    const auto path = fs::path(record_path(dir_.string()));
    EXPECT_EQ(path, dir_ / "record.json");

    auto none = read_record(dir_.string());
    ASSERT_TRUE(none) << describe(none.error());
    EXPECT_EQ(*none, std::nullopt);

    const auto r = sample();
    auto written = write_record(dir_.string(), r);
    ASSERT_TRUE(written) << describe(written.error());
    struct stat st
    {
    };
    ASSERT_EQ(::stat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0600U);
    EXPECT_EQ(read_file(path), record_to_json(r));
    // Only the record: the temporary file was renamed.
    std::vector<std::string> entries;
    for (const auto& e : fs::directory_iterator(dir_)) {
        entries.push_back(e.path().filename().string());
    }
    EXPECT_EQ(entries, std::vector<std::string>{"record.json"});

    auto back = read_record(dir_.string());
    ASSERT_TRUE(back) << describe(back.error());
    ASSERT_TRUE(back->has_value());
    EXPECT_EQ(**back, r);

    // Rewritten (the pid recorded after the spawn): replaced as a whole, still 0600.
    auto before = sample(std::nullopt);
    ASSERT_TRUE(write_record(dir_.string(), before));
    ASSERT_TRUE(write_record(dir_.string(), r));
    ASSERT_EQ(::stat(path.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0600U);
    auto again = read_record(dir_.string());
    ASSERT_TRUE(again && again->has_value());
    EXPECT_EQ(**again, r);

    remove_record(dir_.string());
    EXPECT_FALSE(fs::exists(path));
    auto removed = read_record(dir_.string());
    ASSERT_TRUE(removed);
    EXPECT_EQ(*removed, std::nullopt);
    remove_record(dir_.string()); // a missing record is not an error
    EXPECT_TRUE(fs::is_empty(dir_));
}

TEST_F(RecordFileTest, ACorruptRecordIsAnErrorNamingItsPath)
{
    const auto path = record_path(dir_.string());
    write_raw(path, "{\"format\": 1, \"name\": \"trunc");
    auto r = read_record(dir_.string());
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::invalid_argument)) << describe(r.error());
    EXPECT_NE(r.error().message.find(path), std::string::npos) << r.error().message;

    write_raw(path, edited([](json::Document& d) { d["format"].SetInt(2); }));
    auto other = read_record(dir_.string());
    ASSERT_FALSE(other);
    EXPECT_NE(other.error().message.find(path), std::string::npos) << other.error().message;
    EXPECT_NE(other.error().message.find("format 2"), std::string::npos) << other.error().message;
}

TEST_F(RecordFileTest, WriteIntoAMissingDirectoryFails)
{
    auto r = write_record((dir_ / "missing").string(), sample());
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::system_error)) << describe(r.error());
    EXPECT_NE(r.error().message.find((dir_ / "missing").string()), std::string::npos);
}

LastRun sample_last_run()
{
    LastRun r;
    r.state = "crashed";
    r.since_us = 1795665683123456;
    r.stop_kind = "signal";
    r.stop_signal = SIGKILL;
    r.stop_detail = "killed by signal 9 (Killed), \"quoted\"";
    r.exit = "signaled";
    r.exit_value = SIGKILL;
    r.restart_count = 3;
    return r;
}

TEST_F(RecordFileTest, LastRunRoundTripsAndSitsBesideTheRecord)
{
    auto none = read_last_run(dir_.string());
    ASSERT_TRUE(none) << describe(none.error());
    EXPECT_EQ(*none, std::nullopt);

    auto crashed = sample_last_run();
    ASSERT_TRUE(write_last_run(dir_.string(), crashed));
    ASSERT_TRUE(write_record(dir_.string(), sample()));
    struct stat st
    {
    };
    ASSERT_EQ(::stat((dir_ / "last.json").c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0600U);
    auto back = read_last_run(dir_.string());
    ASSERT_TRUE(back && back->has_value()) << (back ? "none" : describe(back.error()));
    EXPECT_EQ(**back, crashed);

    // Replaced as a whole by the next run's end: an exit code and no exit status.
    LastRun stopped;
    stopped.state = "stopped";
    stopped.since_us = 42;
    stopped.stop_kind = "crashed";
    stopped.stop_exit_code = 1;
    ASSERT_TRUE(write_last_run(dir_.string(), stopped));
    auto again = read_last_run(dir_.string());
    ASSERT_TRUE(again && again->has_value());
    EXPECT_EQ(**again, stopped);
    EXPECT_EQ(last_run_from_json(last_run_to_json(stopped)).value(), stopped);
    // Only the two files: the temporary ones were renamed.
    std::vector<std::string> entries;
    for (const auto& e : fs::directory_iterator(dir_)) {
        entries.push_back(e.path().filename().string());
    }
    std::sort(entries.begin(), entries.end());
    EXPECT_EQ(entries, (std::vector<std::string>{"last.json", "record.json"}));
}

TEST_F(RecordFileTest, ABadLastRunIsAnErrorNamingItsPath)
{
    const auto path = (dir_ / "last.json").string();
    const std::string good = last_run_to_json(sample_last_run());
    auto edit = [&](const std::function<void(json::Document&)>& change) {
        auto d = json::parse(good);
        change(*d);
        return json::to_string(*d);
    };
    const std::vector<std::pair<std::string, std::string>> cases{
        {"{\"format\": 1, \"state\": ", "not JSON"},
        {"[]", "not a JSON object"},
        {edit([](json::Document& d) { d["format"].SetInt(7); }), "format 7 is not 1"},
        {edit([](json::Document& d) { d.RemoveMember("stop_kind"); }), "a string field is missing"},
        {edit([](json::Document& d) { d["since_us"].SetString("soon"); }),
         "a number field is missing"},
        {edit([](json::Document& d) { d["stop_exit_code"].SetString("1"); }),
         "stop_exit_code must be an integer or null"},
    };
    for (const auto& [text, message] : cases) {
        SCOPED_TRACE(text);
        write_raw(path, text);
        auto r = read_last_run(dir_.string());
        ASSERT_FALSE(r);
        EXPECT_TRUE(r.error().is(errc::invalid_argument)) << describe(r.error());
        EXPECT_NE(r.error().message.find(path), std::string::npos) << r.error().message;
        EXPECT_NE(r.error().message.find(message), std::string::npos) << r.error().message;
    }
}

// A live child and the record a supervisor would have written for it.
class FindRecordedProcessTest : public testing::Test
{
protected:
    void SetUp() override
    {
        // A command line no other process on the machine has: the scan must find ours only.
        argv_ = {"/bin/sleep", "30", fmt::format("0.{}", ::getpid())};
        auto pid = proc::spawn(argv_);
        ASSERT_TRUE(pid) << describe(pid.error());
        pid_ = *pid;
        // spawn() returns once the old image is gone, before the kernel has set up the new
        // command line: until then /proc/PID/cmdline is empty.
        const auto end = std::chrono::steady_clock::now() + 10s;
        auto cmdline = proc::process_cmdline(pid_);
        while ((!cmdline || *cmdline != argv_) && std::chrono::steady_clock::now() < end) {
            std::this_thread::yield();
            cmdline = proc::process_cmdline(pid_);
        }
        ASSERT_TRUE(cmdline && *cmdline == argv_);
        auto start = proc::process_start_time(pid_);
        ASSERT_TRUE(start) << describe(start.error());
        record_ = sample(pid_);
        record_.argv = argv_;
        record_.argv_hash = proc::hash_command_line(argv_);
        record_.start_time = *start;
        record_.boot_id = proc::boot_id();
    }

    void TearDown() override
    {
        if (pid_ > 0) {
            ::kill(pid_, SIGKILL);
            reap(pid_);
        }
    }

    // A found process: our child, with a pidfd that names it.
    void expect_found(const expected<std::pair<pid_t, int>>& found)
    {
        ASSERT_TRUE(found) << describe(found.error());
        EXPECT_EQ(found->first, pid_);
        const int pidfd = found->second;
        ASSERT_GE(pidfd, 0);
        EXPECT_TRUE(::fcntl(pidfd, F_GETFD) & FD_CLOEXEC);
        EXPECT_TRUE(proc::pidfd_signal(pidfd, 0));
        // The pidfd is the child's: a SIGKILL through it ends our child.
        ASSERT_TRUE(proc::pidfd_signal(pidfd, SIGKILL));
        const int status = reap(pid_);
        EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;
        pid_ = -1;
        ::close(pidfd);
    }

    void expect_rejected(const RuntimeRecord& r, const std::string& part)
    {
        auto found = find_recorded_process(r);
        ASSERT_FALSE(found) << "pid " << found->first;
        EXPECT_TRUE(found.error().is(errc::invalid_state)) << describe(found.error());
        EXPECT_NE(found.error().message.find(part), std::string::npos) << found.error().message;
    }

    std::vector<std::string> argv_;
    pid_t pid_ = -1;
    RuntimeRecord record_;
};

TEST_F(FindRecordedProcessTest, ALiveProcessWithTheRecordedStartAndCommandLineIsFound)
{
    expect_found(find_recorded_process(record_));
}

TEST_F(FindRecordedProcessTest, AnotherStartTimeMeansThePidWasReused)
{
    auto r = record_;
    r.start_time += 1;
    expect_rejected(r, "reused");
    EXPECT_EQ(::kill(pid_, 0), 0) << "a rejected process is left alone";
}

TEST_F(FindRecordedProcessTest, ARecordOfAnotherBootNamesNoProcess)
{
    auto r = record_;
    r.boot_id = "00000000-0000-0000-0000-000000000000";
    expect_rejected(r, "another boot");
    r.pid.reset();
    expect_rejected(r, "another boot");
}

TEST_F(FindRecordedProcessTest, AnotherCommandLineIsNotTheRecordedProcess)
{
    auto r = record_;
    r.argv = {"/bin/sleep", "31"};
    r.argv_hash = proc::hash_command_line(r.argv);
    expect_rejected(r, "another command line");
}

TEST_F(FindRecordedProcessTest, AnExitedProcessIsGone)
{
    ::kill(pid_, SIGKILL);
    ASSERT_TRUE(wait_exited_unreaped(pid_));
    // A zombie: the pid still exists, the process does not run.
    expect_rejected(record_, "has exited");
    reap(pid_);
    const pid_t old = pid_;
    pid_ = -1;
    // Reaped: nothing has the pid (unless it was reused at once, which the start time catches).
    auto found = find_recorded_process(record_);
    ASSERT_FALSE(found);
    EXPECT_TRUE(found.error().is(errc::invalid_state)) << describe(found.error());
    EXPECT_NE(found.error().message.find(std::to_string(old)), std::string::npos)
        << found.error().message;
}

TEST_F(FindRecordedProcessTest, ARecordWithoutAPidIsFoundByItsCommandLine)
{
    auto r = record_;
    r.pid.reset();
    r.start_time = 0; // not known before the spawn either
    expect_found(find_recorded_process(r));
}

TEST_F(FindRecordedProcessTest, ARecordWithoutAPidWhoseCommandLineNobodyRunsIsNotFound)
{
    auto r = record_;
    r.pid.reset();
    r.argv = {"/bin/sleep", "30", "0.nobody-runs-this"};
    r.argv_hash = proc::hash_command_line(r.argv);
    expect_rejected(r, "no process runs its command line");
}

} // namespace
} // namespace qm::daemon
