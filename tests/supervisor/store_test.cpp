// SPDX-License-Identifier: GPL-2.0-or-later
// qm::daemon::Store and write_file_atomic: round trips, order of writes, the worker thread and the
// loop, a crash (SIGKILL of a writing child) after every step, and files moved aside on load.
#include "daemon/supervisor/store.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <ctime>
#include <exception>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "libmachine/asio.hpp"
#include "libmachine/json.hpp"
#include "tests/support/loop.hpp"

namespace qm::daemon {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using test::run_co;
using test::run_until;

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

unsigned mode_of(const fs::path& path)
{
    struct stat st
    {
    };
    EXPECT_EQ(::lstat(path.c_str(), &st), 0) << path;
    return st.st_mode & 07777;
}

// The validator the tests use: any well-formed JSON text.
std::string validate_json(const LoadedFile& f)
{
    auto doc = json::parse(f.content);
    return doc ? std::string() : doc.error().message;
}

std::vector<std::string> names_of(const std::vector<LoadedFile>& files)
{
    std::vector<std::string> out;
    out.reserve(files.size());
    for (const auto& f : files) {
        out.push_back(f.name);
    }
    return out;
}

std::vector<std::string> dir_entries(const fs::path& dir)
{
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir)) {
        out.push_back(e.path().filename().string());
    }
    std::sort(out.begin(), out.end());
    return out;
}

// "<file>.corrupt-<stamp>" or "<file>.corrupt-<stamp>-<suffix>" taken apart (suffix 0 when there
// is none); nullopt when `moved_to` has another form. (No std::regex: GCC 12 warns in it under
// the sanitizers.)
struct Aside
{
    long long stamp = 0;
    int suffix = 0;
};
std::optional<Aside> parse_aside(const std::string& moved_to, const std::string& file)
{
    const std::string prefix = file + ".corrupt-";
    if (moved_to.rfind(prefix, 0) != 0) {
        return std::nullopt;
    }
    const std::string rest = moved_to.substr(prefix.size());
    const auto dash = rest.find('-');
    const std::string stamp = rest.substr(0, dash);
    const std::string suffix = dash == std::string::npos ? "0" : rest.substr(dash + 1);
    auto digits = [](const std::string& s) {
        return !s.empty() && s.find_first_not_of("0123456789") == std::string::npos;
    };
    if (!digits(stamp) || !digits(suffix)) {
        return std::nullopt;
    }
    return Aside{std::stoll(stamp), std::stoi(suffix)};
}

// A save whose result (and the thread it completed on) the test collects.
struct SaveResult
{
    int index = 0;
    std::optional<expected<void>> result;
    std::thread::id thread;
};

awaitable<void> save_into(Store* store, std::string name, std::string content, int index,
                          std::shared_ptr<std::vector<SaveResult>> out)
{
    auto r = co_await store->save(std::move(name), std::move(content));
    out->push_back({index, std::move(r), std::this_thread::get_id()});
}

awaitable<void> save_many_in_a_row(Store* store, int n)
{
    for (int i = 1; i <= n; ++i) {
        auto r = co_await store->save("m", "{\"n\":" + std::to_string(i) + "}");
        EXPECT_TRUE(r) << describe(r.error());
    }
}

void log_exception(const std::exception_ptr& e)
{
    if (e) {
        ADD_FAILURE() << "coroutine failed: " << describe_exception(e);
    }
}

class StoreTest : public testing::Test
{
protected:
    void SetUp() override
    {
        // Under the leak check's private TMPDIR, and removed again: it checks for leftovers.
        std::string templ = (fs::temp_directory_path() / "store.XXXXXX").string();
        ASSERT_NE(::mkdtemp(templ.data()), nullptr);
        dir_ = templ;
    }
    void TearDown() override
    {
        std::error_code ec;
        fs::remove_all(dir_, ec);
    }

    std::vector<LoadedFile> load(Store& store, std::vector<LoadProblem>& problems)
    {
        return store.load_all(validate_json, problems);
    }

    asio::io_context ioc_{1};
    fs::path dir_;
};

TEST_F(StoreTest, SaveThenLoadRoundTrip)
{
    Store store(ioc_, dir_.string());
    EXPECT_EQ(store.dir(), dir_.string());
    for (const char* name : {"b", "a", "c"}) {
        auto r = run_co(ioc_, store.save(name, std::string(R"({"name":")") + name + R"("})"));
        ASSERT_TRUE(r) << describe(r.error());
    }
    EXPECT_EQ(read_file(dir_ / "a.json"), R"({"name":"a"})");
    EXPECT_EQ(mode_of(dir_ / "a.json"), 0600u);

    std::vector<LoadProblem> problems;
    auto files = load(store, problems);
    EXPECT_TRUE(problems.empty());
    ASSERT_EQ(names_of(files), (std::vector<std::string>{"a", "b", "c"}));
    EXPECT_EQ(files[1].content, R"({"name":"b"})");
    EXPECT_EQ(dir_entries(dir_), (std::vector<std::string>{"a.json", "b.json", "c.json"}));
}

TEST_F(StoreTest, SaveOverwrites)
{
    Store store(ioc_, dir_.string());
    ASSERT_TRUE(run_co(ioc_, store.save("a", R"({"v":1})")));
    ASSERT_TRUE(run_co(ioc_, store.save("a", R"({"v":2})")));
    EXPECT_EQ(read_file(dir_ / "a.json"), R"({"v":2})");
    EXPECT_EQ(mode_of(dir_ / "a.json"), 0600u);
    EXPECT_EQ(dir_entries(dir_), (std::vector<std::string>{"a.json"}));
}

TEST_F(StoreTest, SaveIgnoresTheUmask)
{
    const mode_t old = ::umask(0277); // would take the owner's write bit
    Store store(ioc_, dir_.string());
    auto r = run_co(ioc_, store.save("a", "{}"));
    ::umask(old);
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(mode_of(dir_ / "a.json"), 0600u);
}

TEST_F(StoreTest, RemoveDeletesTheFile)
{
    Store store(ioc_, dir_.string());
    ASSERT_TRUE(run_co(ioc_, store.save("a", "{}")));
    ASSERT_TRUE(run_co(ioc_, store.save("b", "{}")));
    auto r = run_co(ioc_, store.remove("a"));
    ASSERT_TRUE(r) << describe(r.error());
    EXPECT_EQ(dir_entries(dir_), (std::vector<std::string>{"b.json"}));
}

TEST_F(StoreTest, RemoveOfAMissingFileSucceeds)
{
    Store store(ioc_, dir_.string());
    auto r = run_co(ioc_, store.remove("never"));
    EXPECT_TRUE(r) << describe(r.error());
}

TEST_F(StoreTest, ManySavesInARowEndWithTheLast)
{
    Store store(ioc_, dir_.string());
    run_co(ioc_, save_many_in_a_row(&store, 50));
    EXPECT_EQ(read_file(dir_ / "m.json"), R"({"n":50})");
    EXPECT_EQ(dir_entries(dir_), (std::vector<std::string>{"m.json"}));
}

TEST_F(StoreTest, ConcurrentSavesLandAndCompleteInCallOrder)
{
    // Twenty coroutines save the same file without waiting for each other: the worker takes the
    // writes in call order, so the last call's content is what stays.
    Store store(ioc_, dir_.string());
    auto results = std::make_shared<std::vector<SaveResult>>();
    constexpr int n = 20;
    for (int i = 0; i < n; ++i) {
        asio::co_spawn(ioc_,
                       save_into(&store, "m", "{\"n\":" + std::to_string(i) + "}", i, results),
                       log_exception);
    }
    ASSERT_TRUE(run_until(ioc_, [&] { return results->size() == n; }));
    EXPECT_EQ(read_file(dir_ / "m.json"), "{\"n\":" + std::to_string(n - 1) + "}");
    for (int i = 0; i < n; ++i) {
        EXPECT_EQ((*results)[i].index, i);
        ASSERT_TRUE((*results)[i].result.has_value());
        EXPECT_TRUE(*(*results)[i].result);
    }
    EXPECT_EQ(dir_entries(dir_), (std::vector<std::string>{"m.json"}));
}

TEST_F(StoreTest, WritesRunOnTheWorkerAndCompleteOnTheLoop)
{
    Store store(ioc_, dir_.string());
    std::vector<std::pair<WriteStep, std::thread::id>> steps;
    store.set_write_hook([&](WriteStep s) { steps.emplace_back(s, std::this_thread::get_id()); });
    auto results = std::make_shared<std::vector<SaveResult>>();
    asio::co_spawn(ioc_, save_into(&store, "a", "{}", 0, results), log_exception);
    ASSERT_TRUE(run_until(ioc_, [&] { return results->size() == 1; }));

    EXPECT_EQ(results->front().thread, std::this_thread::get_id());
    // The hook ran on the worker; `steps` is read only after the completion, which the worker
    // posted after its last write to it.
    ASSERT_EQ(steps.size(), 4u);
    const WriteStep expected_steps[] = {WriteStep::temp_written, WriteStep::temp_synced,
                                        WriteStep::renamed, WriteStep::dir_synced};
    for (std::size_t i = 0; i < steps.size(); ++i) {
        EXPECT_EQ(steps[i].first, expected_steps[i]) << to_string(steps[i].first);
        EXPECT_NE(steps[i].second, std::this_thread::get_id());
    }
}

TEST_F(StoreTest, TheLoopRunsWhileASaveIsInFlight)
{
    // The write waits (on the worker) until a timer has fired on the loop: if the save blocked
    // the loop, the timer could not fire and the hook would give up after its deadline.
    Store store(ioc_, dir_.string());
    std::promise<void> timer_fired;
    auto fired = timer_fired.get_future();
    std::atomic<bool> hook_saw_timer{false};
    store.set_write_hook([&](WriteStep s) {
        if (s == WriteStep::temp_written) {
            hook_saw_timer = fired.wait_for(10s) == std::future_status::ready;
        }
    });
    auto results = std::make_shared<std::vector<SaveResult>>();
    asio::co_spawn(ioc_, save_into(&store, "a", "{}", 0, results), log_exception);

    asio::steady_timer timer(ioc_);
    timer.expires_after(1ms);
    bool timer_done = false;
    timer.async_wait([&](error_code) {
        timer_done = true;
        EXPECT_TRUE(results->empty()); // the save is still in flight
        timer_fired.set_value();
    });
    ASSERT_TRUE(run_until(
        ioc_, [&] { return results->size() == 1; }, 20s));
    EXPECT_TRUE(timer_done);
    EXPECT_TRUE(hook_saw_timer);
    EXPECT_TRUE(*results->front().result);
}

awaitable<void> read_into(Store* store, std::string path, std::optional<std::size_t> lines,
                          std::optional<expected<std::string>>* out)
{
    *out = co_await store->read_tail(std::move(path), lines, 1 << 20);
}

TEST_F(StoreTest, LogTailsAreReadOnTheWorkerAfterTheWritesBeforeThem)
{
    // A log read is a job of the worker's queue: it waits behind a save the hook holds, while
    // the loop keeps running, and completes after it. A read on the loop would be done at once.
    const fs::path log = dir_ / "m.log";
    {
        std::ofstream f(log);
        f << "one\ntwo\nthree\nfour\nfive\n";
    }
    Store store(ioc_, dir_.string());
    std::promise<void> release;
    auto released = release.get_future();
    store.set_write_hook([&](WriteStep s) {
        if (s == WriteStep::temp_written) {
            released.wait_for(10s);
        }
    });
    auto saves = std::make_shared<std::vector<SaveResult>>();
    asio::co_spawn(ioc_, save_into(&store, "a", "{}", 0, saves), log_exception);
    std::optional<expected<std::string>> read;
    asio::co_spawn(ioc_, read_into(&store, log.string(), 2, &read), log_exception);
    run_until(ioc_, [] { return false; }, 100ms);
    EXPECT_FALSE(read.has_value()) << "the read did not wait for the worker";
    EXPECT_TRUE(saves->empty());
    release.set_value();
    ASSERT_TRUE(run_until(ioc_, [&] { return read.has_value(); }, 20s));
    EXPECT_EQ(saves->size(), 1u); // completed first
    ASSERT_TRUE(*read) << describe(read->error());
    EXPECT_EQ(**read, "four\nfive\n");

    // Bounded: the last bytes, from the first whole line in them; a missing file is empty.
    auto limited = run_co(ioc_, store.read_tail(log.string(), std::nullopt, 12));
    ASSERT_TRUE(limited) << describe(limited.error());
    EXPECT_EQ(*limited, "four\nfive\n");
    auto missing = run_co(ioc_, store.read_tail((dir_ / "none.log").string(), std::nullopt, 64));
    ASSERT_TRUE(missing) << describe(missing.error());
    EXPECT_EQ(*missing, "");
}

TEST_F(StoreTest, IoContextRunWaitsForASaveInFlight)
{
    // A write in flight counts as work on the loop (co_spawn's own count does too): run()
    // returns only after the completion ran, not when the loop merely has nothing ready.
    Store store(ioc_, dir_.string());
    auto results = std::make_shared<std::vector<SaveResult>>();
    asio::co_spawn(ioc_, save_into(&store, "a", "{}", 0, results), log_exception);
    ioc_.run();
    ASSERT_EQ(results->size(), 1u);
    EXPECT_TRUE(*results->front().result);
}

TEST_F(StoreTest, DestructorFinishesQueuedWritesAndCompletionsOutliveTheStore)
{
    auto store = std::make_unique<Store>(ioc_, dir_.string());
    // The worker holds the first write until the three saves are queued.
    std::promise<void> release;
    auto released = release.get_future().share();
    store->set_write_hook([released](WriteStep s) {
        if (s == WriteStep::temp_written) {
            released.wait_for(10s);
        }
    });
    auto results = std::make_shared<std::vector<SaveResult>>();
    for (int i = 0; i < 3; ++i) {
        asio::co_spawn(ioc_, save_into(store.get(), "f" + std::to_string(i), "{}", i, results),
                       log_exception);
    }
    ioc_.poll(); // each coroutine runs up to its save, which is queued on the worker
    EXPECT_TRUE(results->empty());
    release.set_value();
    store.reset(); // waits for the three writes
    EXPECT_EQ(dir_entries(dir_), (std::vector<std::string>{"f0.json", "f1.json", "f2.json"}));

    // The completions run now, with the Store gone (ASan would see a touch of it).
    ASSERT_TRUE(run_until(ioc_, [&] { return results->size() == 3; }));
    for (const auto& r : *results) {
        EXPECT_TRUE(*r.result);
    }
}

TEST_F(StoreTest, WriteIntoAMissingDirectoryFailsNamingThePath)
{
    const std::string missing = (dir_ / "missing").string();
    Store store(ioc_, missing);
    auto r = run_co(ioc_, store.save("a", "{}"));
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::system_error)) << describe(r.error());
    EXPECT_NE(r.error().message.find(missing + "/a.json"), std::string::npos) << r.error().message;
    EXPECT_NE(r.error().message.find("No such file or directory"), std::string::npos)
        << r.error().message;

    auto removed = run_co(ioc_, store.remove("a"));
    ASSERT_FALSE(removed);
    EXPECT_TRUE(removed.error().is(errc::system_error)) << describe(removed.error());
    EXPECT_NE(removed.error().message.find(missing + "/a.json"), std::string::npos);

    std::vector<LoadProblem> problems;
    EXPECT_TRUE(store.load_all(validate_json, problems).empty());
    ASSERT_EQ(problems.size(), 1u);
    EXPECT_EQ(problems[0].file, missing);
}

TEST_F(StoreTest, WriteFailureRemovesTheTempFile)
{
    // A directory where the file should go: the rename fails, the temp file must not stay.
    fs::create_directory(dir_ / "x.json");
    fs::create_directory(dir_ / "x.json" / "inside");
    auto r = write_file_atomic(dir_.string(), "x.json", "{}");
    ASSERT_FALSE(r);
    EXPECT_TRUE(r.error().is(errc::system_error)) << describe(r.error());
    EXPECT_NE(r.error().message.find("rename temp file"), std::string::npos) << r.error().message;
    EXPECT_EQ(dir_entries(dir_), (std::vector<std::string>{"x.json"}));
}

TEST_F(StoreTest, WriteFileAtomicRefusesNamesThatAreNotPlain)
{
    for (const char* bad : {"", "../x.json", "a/b.json", ".hidden.json"}) {
        auto r = write_file_atomic(dir_.string(), bad, "{}");
        ASSERT_FALSE(r) << bad;
        EXPECT_TRUE(r.error().is(errc::invalid_argument)) << describe(r.error());
    }
    EXPECT_TRUE(dir_entries(dir_).empty());
}

TEST_F(StoreTest, WriteFileAtomicReplacesAPlantedTempSymlink)
{
    // Whatever sits at the temp name is removed, never written through.
    write_raw(dir_ / "target", "untouched");
    fs::create_symlink(dir_ / "target", dir_ / ".a.json.tmp");
    ASSERT_TRUE(write_file_atomic(dir_.string(), "a.json", "{}"));
    EXPECT_EQ(read_file(dir_ / "target"), "untouched");
    EXPECT_EQ(read_file(dir_ / "a.json"), "{}");
    EXPECT_EQ(dir_entries(dir_), (std::vector<std::string>{"a.json", "target"}));
}

TEST(WriteStepTest, Names)
{
    EXPECT_STREQ(to_string(WriteStep::temp_written), "temp_written");
    EXPECT_STREQ(to_string(WriteStep::temp_synced), "temp_synced");
    EXPECT_STREQ(to_string(WriteStep::renamed), "renamed");
    EXPECT_STREQ(to_string(WriteStep::dir_synced), "dir_synced");
}

// Crash injection: a child writes the new content and is killed (SIGKILL: no cleanup of any
// kind) right after one step; the parent then checks what a restarted daemon would find.
class StoreCrashTest : public StoreTest,
                       public testing::WithParamInterface<std::optional<WriteStep>>
{
protected:
    // Runs write_file_atomic(new_content) in a child killed after `crash_at` (never if nullopt)
    // and reaps it. Returns the child's wait status.
    int write_in_child(const std::string& content, std::optional<WriteStep> crash_at)
    {
        const pid_t pid = ::fork();
        if (pid == 0) {
            auto hook = [crash_at](WriteStep s) {
                if (crash_at && s == *crash_at) {
                    ::raise(SIGKILL);
                }
            };
            auto r = write_file_atomic(dir_.string(), "m.json", content, hook);
            ::_exit(r ? 0 : 1); // no atexit handlers, no gtest in the child
        }
        int status = 0;
        EXPECT_GT(pid, 0);
        EXPECT_EQ(::waitpid(pid, &status, 0), pid);
        return status;
    }
};

TEST_P(StoreCrashTest, TheFileIsTheOldOrTheNewNeverTornOrLost)
{
    const auto crash_at = GetParam();
    const std::string old_content = R"({"version":"old"})";
    // Large enough to take several write() calls' worth of page cache.
    const std::string new_content =
        R"({"version":"new","pad":")" + std::string(std::size_t{512} * 1024, 'x') + R"("})";
    ASSERT_TRUE(write_file_atomic(dir_.string(), "m.json", old_content));

    const int status = write_in_child(new_content, crash_at);
    if (crash_at) {
        ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;
    } else {
        ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
    }
    // Before the rename the old file is untouched; from the rename on the new one is in place.
    const bool expect_new = !crash_at || *crash_at >= WriteStep::renamed;
    const std::string& expected_content = expect_new ? new_content : old_content;
    EXPECT_EQ(read_file(dir_ / "m.json"), expected_content);
    const bool temp_left = fs::exists(fs::symlink_status(dir_ / ".m.json.tmp"));
    EXPECT_EQ(temp_left, !expect_new);

    // A restarted daemon loads it and clears the unfinished write away.
    Store store(ioc_, dir_.string());
    std::vector<LoadProblem> problems;
    auto files = load(store, problems);
    EXPECT_TRUE(problems.empty());
    ASSERT_EQ(files.size(), 1u);
    EXPECT_EQ(files[0].name, "m");
    EXPECT_EQ(files[0].content, expected_content);
    EXPECT_EQ(dir_entries(dir_), (std::vector<std::string>{"m.json"}));
}

TEST_P(StoreCrashTest, AFirstWriteIsAllOrNothing)
{
    const auto crash_at = GetParam();
    const std::string content = R"({"version":"first"})";
    const int status = write_in_child(content, crash_at);
    ASSERT_TRUE(WIFSIGNALED(status) || WIFEXITED(status));

    const bool expect_file = !crash_at || *crash_at >= WriteStep::renamed;
    Store store(ioc_, dir_.string());
    std::vector<LoadProblem> problems;
    auto files = load(store, problems);
    EXPECT_TRUE(problems.empty());
    if (expect_file) {
        ASSERT_EQ(files.size(), 1u);
        EXPECT_EQ(files[0].content, content);
        EXPECT_EQ(dir_entries(dir_), (std::vector<std::string>{"m.json"}));
    } else {
        EXPECT_TRUE(files.empty());
        EXPECT_TRUE(dir_entries(dir_).empty());
    }
}

INSTANTIATE_TEST_SUITE_P(EveryStep, StoreCrashTest,
                         testing::Values(std::optional<WriteStep>(WriteStep::temp_written),
                                         std::optional<WriteStep>(WriteStep::temp_synced),
                                         std::optional<WriteStep>(WriteStep::renamed),
                                         std::optional<WriteStep>(WriteStep::dir_synced),
                                         std::optional<WriteStep>()),
                         [](const testing::TestParamInfo<std::optional<WriteStep>>& info) {
                             return info.param
                                        ? std::string("crash_after_") + to_string(*info.param)
                                        : std::string("no_crash");
                         });

TEST_F(StoreTest, CorruptFileIsReportedAndMovedAsideWhileTheOthersLoad)
{
    write_raw(dir_ / "good.json", R"({"ok":true})");
    write_raw(dir_ / "bad.json", R"({"ok":)");
    write_raw(dir_ / "zgood.json", R"({"ok":2})");
    write_raw(dir_ / "notes.txt", "not a definition");
    write_raw(dir_ / "old.json.corrupt-12", "moved aside long ago");
    write_raw(dir_ / ".hidden", "not ours either");
    Store store(ioc_, dir_.string());

    const auto before = std::time(nullptr);
    std::vector<LoadProblem> problems;
    auto files = load(store, problems);
    const auto after = std::time(nullptr);

    EXPECT_EQ(names_of(files), (std::vector<std::string>{"good", "zgood"}));
    ASSERT_EQ(problems.size(), 1u);
    EXPECT_EQ(problems[0].file, (dir_ / "bad.json").string());
    EXPECT_FALSE(problems[0].reason.empty());
    const auto aside = parse_aside(problems[0].moved_to, (dir_ / "bad.json").string());
    ASSERT_TRUE(aside && aside->suffix == 0) << problems[0].moved_to;
    const auto stamp = aside->stamp;
    EXPECT_GE(stamp, before);
    EXPECT_LE(stamp, after);
    EXPECT_EQ(read_file(problems[0].moved_to), R"({"ok":)");
    EXPECT_FALSE(fs::exists(dir_ / "bad.json"));
    // Everything that is not a definition is left alone.
    EXPECT_EQ(read_file(dir_ / "notes.txt"), "not a definition");
    EXPECT_EQ(read_file(dir_ / "old.json.corrupt-12"), "moved aside long ago");
    EXPECT_EQ(read_file(dir_ / ".hidden"), "not ours either");

    // A second start finds the good ones only, and nothing to report.
    problems.clear();
    EXPECT_EQ(names_of(load(store, problems)), (std::vector<std::string>{"good", "zgood"}));
    EXPECT_TRUE(problems.empty());
}

TEST_F(StoreTest, MovingAsideNeverReplacesAnEarlierCorruptFile)
{
    // The names for this second and the next two are taken: the file gets "-1" (or, if the clock
    // moved past them, a later second of its own).
    const auto now = std::time(nullptr);
    for (int i = 0; i < 3; ++i) {
        write_raw(dir_ / ("bad.json.corrupt-" + std::to_string(now + i)),
                  "earlier " + std::to_string(i));
    }
    write_raw(dir_ / "bad.json", "not json");
    Store store(ioc_, dir_.string());
    std::vector<LoadProblem> problems;
    EXPECT_TRUE(load(store, problems).empty());
    ASSERT_EQ(problems.size(), 1u);

    const auto aside = parse_aside(problems[0].moved_to, (dir_ / "bad.json").string());
    ASSERT_TRUE(aside) << problems[0].moved_to;
    EXPECT_EQ(aside->suffix, aside->stamp <= now + 2 ? 1 : 0) << problems[0].moved_to;
    EXPECT_EQ(read_file(problems[0].moved_to), "not json");
    for (int i = 0; i < 3; ++i) {
        EXPECT_EQ(read_file(dir_ / ("bad.json.corrupt-" + std::to_string(now + i))),
                  "earlier " + std::to_string(i));
    }
}

TEST_F(StoreTest, UnreadableFilesAreReportedAndMovedAside)
{
    write_raw(dir_ / "good.json", R"({"ok":true})");
    fs::create_directory(dir_ / "dir.json");
    fs::create_symlink(dir_ / "good.json", dir_ / "link.json");
    ASSERT_EQ(::mkfifo((dir_ / "fifo.json").c_str(), 0600), 0); // must not block the load
    Store store(ioc_, dir_.string());

    std::vector<LoadProblem> problems;
    auto files = load(store, problems);
    EXPECT_EQ(names_of(files), (std::vector<std::string>{"good"}));
    ASSERT_EQ(problems.size(), 3u);
    // Sorted by name: dir, fifo, link.
    EXPECT_EQ(problems[0].file, (dir_ / "dir.json").string());
    EXPECT_EQ(problems[0].reason, "is a directory");
    EXPECT_EQ(problems[1].file, (dir_ / "fifo.json").string());
    EXPECT_EQ(problems[1].reason, "is not a regular file");
    EXPECT_EQ(problems[2].file, (dir_ / "link.json").string());
    EXPECT_EQ(problems[2].reason, "is a symbolic link");
    for (const auto& p : problems) {
        EXPECT_FALSE(p.moved_to.empty()) << p.file;
        EXPECT_TRUE(fs::exists(fs::symlink_status(p.moved_to))) << p.moved_to;
        EXPECT_FALSE(fs::exists(fs::symlink_status(p.file))) << p.file;
    }
    // The link was moved, not what it points to.
    EXPECT_TRUE(fs::is_symlink(problems[2].moved_to));
    EXPECT_EQ(read_file(dir_ / "good.json"), R"({"ok":true})");
}

TEST_F(StoreTest, LoadRemovesLeftoverTempFilesOnly)
{
    write_raw(dir_ / ".a.json.tmp", "half a wri");
    write_raw(dir_ / ".b.json.tmp", "");
    write_raw(dir_ / "a.json", R"({"v":1})");
    write_raw(dir_ / ".tmp", "not a temp file of ours");
    write_raw(dir_ / "c.tmp", "not hidden: not ours");
    Store store(ioc_, dir_.string());
    std::vector<LoadProblem> problems;
    auto files = load(store, problems);
    EXPECT_TRUE(problems.empty());
    ASSERT_EQ(names_of(files), (std::vector<std::string>{"a"}));
    EXPECT_EQ(dir_entries(dir_), (std::vector<std::string>{".tmp", "a.json", "c.tmp"}));
}

TEST_F(StoreTest, LoadWithoutValidatorAcceptsEverything)
{
    write_raw(dir_ / "x.json", "anything");
    Store store(ioc_, dir_.string());
    std::vector<LoadProblem> problems;
    auto files = store.load_all({}, problems);
    ASSERT_EQ(files.size(), 1u);
    EXPECT_EQ(files[0].content, "anything");
    EXPECT_TRUE(problems.empty());
}

} // namespace
} // namespace qm::daemon
