// SPDX-License-Identifier: GPL-2.0-or-later
// The state directory: one definition file per machine ("<name>.json"), written atomically
// (temp file, fsync, rename, fsync of the directory) on a worker thread so the loop never waits
// for the disk; corrupt files are renamed aside on load.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "libmachine/asio.hpp"
#include "libmachine/expected.hpp"

namespace qm::daemon {

// The steps of an atomic write, in order; a test hook runs after each.
enum class WriteStep {
    temp_written, // "<dir>/.<file>.tmp" has every byte (not yet synced)
    temp_synced,  // fsync(temp) done
    renamed,      // rename(temp, file) done
    dir_synced,   // fsync(dir) done: the write is durable
};
const char* to_string(WriteStep step) noexcept;

// Writes `data` to `dir`/`file` atomically: a reader (or a crash at any point) sees the old
// content or the new one, never a mix, never nothing. `after_step` (tests) runs after each step.
// Blocking: call it off the loop thread (Store does). errc::system_error naming the path, the
// step and errno's text ("cannot write '/var/lib/qmachined/a.json': write temp file: No space
// left on device"); the temp file is removed on failure. errc::invalid_argument when `file` is
// not a plain, non-hidden file name. The file is created 0600.
expected<void> write_file_atomic(const std::string& dir, const std::string& file,
                                 std::string_view data,
                                 const std::function<void(WriteStep)>& after_step = {});

// What Store::load_all found.
struct LoadedFile
{
    std::string name;    // the file name without ".json"
    std::string content; // the file's bytes
};
struct LoadProblem
{
    std::string file;     // the file's path as found ("<dir>/x.json"; the directory itself if it
                          // could not be listed)
    std::string moved_to; // the path it was renamed aside to (empty if it could not be)
    std::string reason;   // "is a symbolic link", validate's reason, ...
};

// The state directory's definition files. Owned by the supervisor; loop thread only (the writes
// themselves run on the store's one worker thread, in call order).
class Store
{
public:
    // `dir` must exist (the daemon creates it 0700).
    Store(asio::io_context& ioc, std::string dir);
    ~Store();
    Store(const Store&) = delete;
    Store& operator=(const Store&) = delete;

    const std::string& dir() const noexcept { return dir_; }

    // Reads every "*.json" file (blocking; at start-up only, before the loop serves anyone),
    // sorted by name. `validate` says whether a file's content is acceptable (empty string) or why
    // not; a file it rejects, or that cannot be read (a symlink, a directory, ...), is renamed
    // aside to "<file>.corrupt-<unix time>" ("-1", "-2", ... appended when taken; nothing is ever
    // replaced) and reported in `problems`. Temp files left by a crash (".*.tmp") are removed;
    // other files are left alone.
    std::vector<LoadedFile> load_all(const std::function<std::string(const LoadedFile&)>& validate,
                                     std::vector<LoadProblem>& problems);

    // Atomically writes "<name>.json" on the worker thread; completes on the loop thread (the
    // awaiting coroutine's executor). Saves and removes run in call order. The Store may be
    // destroyed while one is in flight: its destructor finishes the queued writes, and the
    // completion does not touch it. Errors: those of write_file_atomic.
    awaitable<expected<void>> save(std::string name, std::string content);
    // Removes "<name>.json" (and syncs the directory) on the worker thread. Removing a file that
    // does not exist succeeds.
    awaitable<expected<void>> remove(std::string name);

    // read_log_tail(path, max_lines, limit) on the worker thread (after the writes queued before
    // it), so that reading up to `limit` bytes of a log never holds the loop; completes on the
    // loop thread.
    awaitable<expected<std::string>> read_tail(std::string path,
                                               std::optional<std::size_t> max_lines,
                                               std::size_t limit);

    // Test hook: runs after each step of every later save (on the worker thread).
    void set_write_hook(std::function<void(WriteStep)> hook);

private:
    struct Worker; // the thread and its FIFO queue (store.cpp)
    asio::io_context& ioc_;
    std::string dir_;
    std::unique_ptr<Worker> worker_;
    std::function<void(WriteStep)> hook_;
};

} // namespace qm::daemon
