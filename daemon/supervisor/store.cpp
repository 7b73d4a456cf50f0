// SPDX-License-Identifier: GPL-2.0-or-later
// The state directory: atomic writes of definition files (on the store's worker thread), their
// removal, and the start-up scan that loads them and moves corrupt ones aside.
#include "daemon/supervisor/store.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <exception>
#include <optional>
#include <thread>
#include <utility>

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include "daemon/log_tail.hpp"

namespace qm::daemon {

namespace {

constexpr std::string_view json_suffix = ".json";
constexpr std::string_view tmp_suffix = ".tmp";

bool ends_with(std::string_view s, std::string_view suffix)
{
    return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// strerror() may share a buffer between threads (the worker and the loop both report errors).
std::string errno_text(int err)
{
    char buf[256];
    return ::strerror_r(err, buf, sizeof buf); // the GNU strerror_r: returns the text
}

std::string join(const std::string& dir, std::string_view file)
{
    std::string out = dir;
    if (out.empty() || out.back() != '/') {
        out += '/';
    }
    out += file;
    return out;
}

// Closes a file descriptor when it goes out of scope.
class Fd
{
public:
    explicit Fd(int fd = -1) noexcept
        : fd_(fd)
    {}
    ~Fd() { reset(); }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;

    int get() const noexcept { return fd_; }
    bool valid() const noexcept { return fd_ >= 0; }
    // Closes now; returns close()'s result (the caller may want its error).
    int reset() noexcept
    {
        int rc = 0;
        if (fd_ >= 0) {
            // Linux releases the descriptor even when close() fails (EINTR included): never retry.
            rc = ::close(fd_);
            fd_ = -1;
        }
        return rc;
    }

private:
    int fd_;
};

int open_dir(const std::string& dir)
{
    return ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
}

int fsync_retry(int fd)
{
    int rc = 0;
    do {
        rc = ::fsync(fd);
    } while (rc != 0 && errno == EINTR);
    return rc;
}

// Writes every byte of `data`, resuming after EINTR and partial writes. 0 or -1 with errno.
int write_all(int fd, std::string_view data)
{
    while (!data.empty()) {
        const ssize_t n = ::write(fd, data.data(), data.size());
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        data.remove_prefix(static_cast<std::size_t>(n));
    }
    return 0;
}

// A file name (no directory) that Store may create: not empty, no '/', not hidden (temp files are
// hidden, so a definition can never collide with one).
bool is_plain_name(std::string_view file)
{
    return !file.empty() && file.find('/') == std::string_view::npos && file.front() != '.' &&
           file.find('\0') == std::string_view::npos;
}

expected<void> remove_file_synced(const std::string& dir, const std::string& file)
{
    const std::string path = join(dir, file);
    if (!is_plain_name(file)) {
        return fail(errc::invalid_argument, "cannot remove '" + path + "': not a plain file name");
    }
    Fd dirfd(open_dir(dir));
    if (!dirfd.valid()) {
        return fail(errc::system_error,
                    "cannot remove '" + path + "': open directory: " + errno_text(errno));
    }
    if (::unlinkat(dirfd.get(), file.c_str(), 0) != 0) {
        if (errno == ENOENT) {
            return {};
        }
        return fail(errc::system_error,
                    "cannot remove '" + path + "': unlink: " + errno_text(errno));
    }
    // The removal is durable only once the directory is synced (as for a rename).
    if (fsync_retry(dirfd.get()) != 0) {
        return fail(errc::system_error,
                    "cannot remove '" + path + "': fsync directory: " + errno_text(errno));
    }
    return {};
}

// Renames `file` in `dirfd` to "<file>.corrupt-<now>" (then "-1", "-2", ... when that is taken),
// never replacing anything. Returns the new name, or empty (errno set) when it could not.
std::string rename_aside(int dirfd, const std::string& file)
{
    const std::string base = file + ".corrupt-" + std::to_string(std::time(nullptr));
    for (int i = 0; i < 1000; ++i) {
        std::string target = i == 0 ? base : base + "-" + std::to_string(i);
        // renameat2(RENAME_NOREPLACE): two daemons (or two corrupt files in one second) must not
        // overwrite an earlier corrupt file, which may be the only copy of a definition.
        if (::renameat2(dirfd, file.c_str(), dirfd, target.c_str(), RENAME_NOREPLACE) == 0) {
            return target;
        }
        if (errno == EEXIST) {
            continue;
        }
        if (errno != EINVAL && errno != ENOSYS) {
            return {};
        }
        // A file system without RENAME_NOREPLACE: check, then rename (racy, but only against
        // another daemon on the same directory, which the runtime lock excludes).
        struct stat st
        {
        };
        if (::fstatat(dirfd, target.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
            continue;
        }
        if (errno != ENOENT) {
            return {};
        }
        if (::renameat(dirfd, file.c_str(), dirfd, target.c_str()) == 0) {
            return target;
        }
        return {};
    }
    errno = EEXIST;
    return {};
}

// Reads the definition file `file` in `dirfd`: a regular file, not a symlink. The reason on
// failure.
expected<std::string> read_definition(int dirfd, const std::string& file)
{
    // O_NOFOLLOW: a symlink in the state directory is not ours to follow (it could point anywhere);
    // O_NONBLOCK: a FIFO named "x.json" must not block the start-up.
    Fd fd(::openat(dirfd, file.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK));
    if (!fd.valid()) {
        const int err = errno;
        if (err == ELOOP) {
            return fail(errc::system_error, "is a symbolic link");
        }
        return fail(errc::system_error, std::string("cannot open: ") + errno_text(err));
    }
    struct stat st
    {
    };
    if (::fstat(fd.get(), &st) != 0) {
        return fail(errc::system_error, std::string("cannot stat: ") + errno_text(errno));
    }
    if (!S_ISREG(st.st_mode)) {
        return fail(errc::system_error,
                    S_ISDIR(st.st_mode) ? "is a directory" : "is not a regular file");
    }
    std::string content;
    content.reserve(static_cast<std::size_t>(st.st_size));
    char buf[8192];
    for (;;) {
        const ssize_t n = ::read(fd.get(), buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return fail(errc::system_error, std::string("cannot read: ") + errno_text(errno));
        }
        if (n == 0) {
            break;
        }
        content.append(buf, static_cast<std::size_t>(n));
    }
    return content;
}

// Runs `job` on `worker` and completes on the handler's executor (the loop's, `loop` by default),
// keeping the loop's work count up meanwhile so that io_context::run() does not return while a
// write is in flight. Neither the job nor the completion refers to the Store: it may be gone by
// the time either runs (its destructor waits for the job, not for the completion).
template <typename Job>
awaitable<expected<void>> run_on_worker(asio::io_context::executor_type worker,
                                        asio::any_io_executor loop, Job job)
{
    error_code ec;
    auto token = use_ec(ec);
    auto initiate = [worker, loop, job = std::move(job)](auto handler) mutable {
        auto ex = asio::get_associated_executor(handler, loop);
        auto work = asio::prefer(ex, asio::execution::outstanding_work.tracked);
        asio::post(worker, [job = std::move(job), handler = std::move(handler),
                            work = std::move(work)]() mutable {
            error_code result;
            std::string message;
            try {
                expected<void> r = job();
                if (!r) {
                    result = r.error().code;
                    message = std::move(r).error().message;
                }
            } catch (...) {
                // A bug (or bad_alloc): the worker thread must survive it, the caller hears of it.
                result = make_error_code(errc::internal);
                message = describe_exception(std::current_exception());
            }
            // Posted while `work` still counts; `work` is released when this lambda is destroyed.
            asio::post(work, [handler = std::move(handler), result,
                              message = std::move(message)]() mutable {
                std::move(handler)(result, std::move(message));
            });
        });
    };
    std::string message =
        co_await asio::async_initiate<decltype(token), void(error_code, std::string)>(
            std::move(initiate), token);
    if (ec) {
        co_return fail(Error{ec, std::move(message), {}, {}});
    }
    co_return expected<void>{};
}

} // namespace

const char* to_string(WriteStep step) noexcept
{
    switch (step) {
    case WriteStep::temp_written:
        return "temp_written";
    case WriteStep::temp_synced:
        return "temp_synced";
    case WriteStep::renamed:
        return "renamed";
    case WriteStep::dir_synced:
        return "dir_synced";
    }
    return "unknown";
}

expected<void> write_file_atomic(const std::string& dir, const std::string& file,
                                 std::string_view data,
                                 const std::function<void(WriteStep)>& after_step)
{
    const std::string path = join(dir, file);
    if (!is_plain_name(file)) {
        return fail(errc::invalid_argument, "cannot write '" + path + "': not a plain file name");
    }
    const std::string tmp = "." + file + ".tmp";
    auto failed = [&](const char* step, int err) {
        return fail(errc::system_error,
                    "cannot write '" + path + "': " + step + ": " + errno_text(err));
    };
    auto step_done = [&](WriteStep step) {
        if (after_step) {
            after_step(step);
        }
    };

    Fd dirfd(open_dir(dir));
    if (!dirfd.valid()) {
        return failed("open directory", errno);
    }
    // A temp file left by a crash (or anything else with that name: a symlink planted there) goes;
    // O_EXCL then guarantees the file we write is one we created.
    if (::unlinkat(dirfd.get(), tmp.c_str(), 0) != 0 && errno != ENOENT) {
        return failed("remove old temp file", errno);
    }
    Fd fd(::openat(dirfd.get(), tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                   0600));
    if (!fd.valid()) {
        return failed("create temp file", errno);
    }
    auto abandon = [&](const char* step, int err) {
        fd.reset();
        ::unlinkat(dirfd.get(), tmp.c_str(), 0);
        return failed(step, err);
    };
    // 0600 whatever the umask (which could also have taken the owner's bits).
    if (::fchmod(fd.get(), 0600) != 0) {
        return abandon("chmod temp file", errno);
    }
    if (write_all(fd.get(), data) != 0) {
        return abandon("write temp file", errno);
    }
    step_done(WriteStep::temp_written);
    // The data must be on disk before the rename makes it the file: otherwise a crash could leave
    // the new name with no (or partial) content.
    if (fsync_retry(fd.get()) != 0) {
        return abandon("fsync temp file", errno);
    }
    if (fd.reset() != 0) {
        return abandon("close temp file", errno);
    }
    step_done(WriteStep::temp_synced);
    if (::renameat(dirfd.get(), tmp.c_str(), dirfd.get(), file.c_str()) != 0) {
        return abandon("rename temp file", errno);
    }
    step_done(WriteStep::renamed);
    // The rename itself is durable only once the directory is.
    if (fsync_retry(dirfd.get()) != 0) {
        return failed("fsync directory", errno);
    }
    step_done(WriteStep::dir_synced);
    return {};
}

// The worker thread and its queue: an io_context run by one thread runs posted jobs one at a
// time, in the order they were posted.
struct Store::Worker
{
    asio::io_context ioc{1};
    // Keeps run() going while the queue is empty; reset by the destructor.
    std::optional<asio::any_io_executor> work{
        asio::prefer(ioc.get_executor(), asio::execution::outstanding_work.tracked)};
    std::thread thread{[this] {
        ioc.run();
    }};

    Worker() = default;
    Worker(const Worker&) = delete;
    Worker& operator=(const Worker&) = delete;
    ~Worker()
    {
        // run() returns once the queued jobs are done: every accepted write lands.
        work.reset();
        thread.join();
    }
};

Store::Store(asio::io_context& ioc, std::string dir)
    : ioc_(ioc)
    , dir_(std::move(dir))
    , worker_(std::make_unique<Worker>())
{}

Store::~Store() = default;

void Store::set_write_hook(std::function<void(WriteStep)> hook)
{
    hook_ = std::move(hook);
}

awaitable<expected<void>> Store::save(std::string name, std::string content)
{
    // Not a coroutine: everything the job needs is copied now, while the Store surely exists.
    name += json_suffix;
    auto job = [dir = dir_, file = std::move(name), content = std::move(content), hook = hook_] {
        return write_file_atomic(dir, file, content, hook);
    };
    return run_on_worker(worker_->ioc.get_executor(), ioc_.get_executor(), std::move(job));
}

awaitable<expected<void>> Store::remove(std::string name)
{
    name += json_suffix;
    auto job = [dir = dir_, file = std::move(name)] {
        return remove_file_synced(dir, file);
    };
    return run_on_worker(worker_->ioc.get_executor(), ioc_.get_executor(), std::move(job));
}

namespace {

// The coroutine of Store::read_tail: it names no Store, which may be gone when it resumes.
awaitable<expected<std::string>> read_tail_on(asio::io_context::executor_type worker,
                                              asio::any_io_executor loop, std::string path,
                                              std::optional<std::size_t> max_lines,
                                              std::size_t limit)
{
    auto text = std::make_shared<std::string>();
    auto job = [path = std::move(path), max_lines, limit, text]() -> expected<void> {
        auto read = read_log_tail(path, max_lines, limit);
        if (!read) {
            return fail(std::move(read).error());
        }
        *text = std::move(*read);
        return {};
    };
    auto done = co_await run_on_worker(worker, loop, std::move(job));
    if (!done) {
        co_return fail(std::move(done).error());
    }
    co_return std::move(*text);
}

} // namespace

awaitable<expected<std::string>> Store::read_tail(std::string path,
                                                  std::optional<std::size_t> max_lines,
                                                  std::size_t limit)
{
    return read_tail_on(worker_->ioc.get_executor(), ioc_.get_executor(), std::move(path),
                        max_lines, limit);
}

std::vector<LoadedFile>
Store::load_all(const std::function<std::string(const LoadedFile&)>& validate,
                std::vector<LoadProblem>& problems)
{
    std::vector<LoadedFile> loaded;
    Fd dirfd(open_dir(dir_));
    if (!dirfd.valid()) {
        problems.push_back(
            {dir_, {}, std::string("cannot open the directory: ") + errno_text(errno)});
        return loaded;
    }
    std::vector<std::string> names;
    {
        // fdopendir takes over its descriptor: give it a duplicate, ours stays for the *at calls.
        DIR* d = ::fdopendir(::fcntl(dirfd.get(), F_DUPFD_CLOEXEC, 0));
        if (d == nullptr) {
            problems.push_back(
                {dir_, {}, std::string("cannot list the directory: ") + errno_text(errno)});
            return loaded;
        }
        while (const dirent* e = ::readdir(d)) {
            names.emplace_back(e->d_name);
        }
        ::closedir(d);
    }
    std::sort(names.begin(), names.end());

    bool changed = false;
    for (const auto& file : names) {
        if (file.front() == '.') {
            if (file.size() > 1 + tmp_suffix.size() && ends_with(file, tmp_suffix)) {
                // An unfinished write: the old file (if any) is still in place; this one is not.
                if (::unlinkat(dirfd.get(), file.c_str(), 0) == 0) {
                    changed = true;
                    spdlog::debug("Removed the unfinished write '{}'", join(dir_, file));
                } else {
                    spdlog::debug("Could not remove '{}': {}", join(dir_, file), errno_text(errno));
                }
            }
            continue;
        }
        if (file.size() <= json_suffix.size() || !ends_with(file, json_suffix)) {
            continue; // not ours (a file renamed aside, a README, ...)
        }
        LoadedFile f{file.substr(0, file.size() - json_suffix.size()), {}};
        std::string reason;
        if (auto content = read_definition(dirfd.get(), file)) {
            f.content = std::move(*content);
            reason = validate ? validate(f) : std::string();
        } else {
            reason = std::move(content).error().message;
        }
        if (reason.empty()) {
            loaded.push_back(std::move(f));
            continue;
        }
        LoadProblem problem{join(dir_, file), {}, std::move(reason)};
        const std::string aside = rename_aside(dirfd.get(), file);
        if (aside.empty()) {
            problem.reason +=
                std::string(" (could not rename it aside: ") + errno_text(errno) + ")";
        } else {
            problem.moved_to = join(dir_, aside);
            changed = true;
        }
        problems.push_back(std::move(problem));
    }
    if (changed) {
        fsync_retry(dirfd.get());
    }
    return loaded;
}

} // namespace qm::daemon
