// SPDX-License-Identifier: GPL-2.0-or-later
// Runtime records and recognising their processes.
#include "daemon/supervisor/record.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>

#include <fmt/format.h>

#include "libmachine/json.hpp"
#include "libmachine/proc/proc_info.hpp"

namespace qm::daemon {
namespace {

std::optional<std::uint64_t> get_uint(const json::Value& obj, std::string_view key)
{
    const json::Value* v = json::find(obj, key);
    if (v == nullptr || !v->IsUint64()) {
        return std::nullopt;
    }
    return v->GetUint64();
}

// A JSON object of this record format (every record file's first checks).
expected<json::Document> parse_versioned(std::string_view text)
{
    auto doc = json::parse(text);
    if (!doc) {
        return fail(errc::invalid_argument, "not JSON: " + doc.error().message);
    }
    if (!doc->IsObject()) {
        return fail(errc::invalid_argument, "not a JSON object");
    }
    const auto format = json::get_int(*doc, "format");
    if (!format || *format != record_format) {
        return fail(errc::invalid_argument,
                    fmt::format("format {} is not {}", format.value_or(-1), record_format));
    }
    return doc;
}

// Sets `out` to the string `key` of `obj`; false when it is missing or not a string.
bool read_string(const json::Value& obj, std::string_view key, std::string& out)
{
    auto v = json::get_string(obj, key);
    if (v) {
        out = std::string(*v);
    }
    return v.has_value();
}

// Checks one candidate pid against the record: returns its pidfd when it is the recorded QEMU.
expected<int> check_process(const RuntimeRecord& r, pid_t pid, bool check_start_time)
{
    // The pidfd first: if the check passes, the pidfd names the process that passed it.
    auto pidfd = proc::open_pidfd(pid);
    if (!pidfd) {
        return fail(errc::invalid_state, fmt::format("process {} is gone", pid));
    }
    auto reject = [&](std::string why) -> expected<int> {
        ::close(*pidfd);
        return fail(errc::invalid_state, std::move(why));
    };
    auto start = proc::process_start_time(pid);
    if (!start) {
        return reject(fmt::format("process {} is gone", pid));
    }
    if (check_start_time && *start != r.start_time) {
        return reject(fmt::format("pid {} was reused: it names a process started at tick {}, "
                                  "not {}", pid, *start, r.start_time));
    }
    auto argv = proc::process_cmdline(pid);
    if (!argv || argv->empty()) {
        return reject(fmt::format("process {} has exited", pid));
    }
    if (proc::hash_command_line(*argv) != r.argv_hash) {
        return reject(fmt::format("process {} runs another command line", pid));
    }
    return *pidfd;
}

} // namespace

std::string record_to_json(const RuntimeRecord& r)
{
    json::Document d(rapidjson::kObjectType);
    auto& a = d.GetAllocator();
    auto str = [&a](std::string_view s) {
        return json::Value(s.data(), static_cast<rapidjson::SizeType>(s.size()), a);
    };
    d.AddMember("format", record_format, a);
    d.AddMember("name", str(r.name), a);
    d.AddMember("uuid", str(r.uuid), a);
    d.AddMember("generation", r.generation, a);
    d.AddMember("pid", r.pid ? json::Value(*r.pid) : json::Value(), a);
    d.AddMember("start_time", r.start_time, a);
    d.AddMember("boot_id", str(r.boot_id), a);
    json::Value argv(rapidjson::kArrayType);
    for (const auto& arg : r.argv) {
        argv.PushBack(str(arg), a);
    }
    d.AddMember("argv", argv, a);
    d.AddMember("argv_hash", str(r.argv_hash), a);
    d.AddMember("monitor", str(r.monitor), a);
    d.AddMember("console", r.console.empty() ? json::Value() : str(r.console), a);
    d.AddMember("started_at_us", r.started_at_us, a);
    d.AddMember("restart_count", r.restart_count, a);
    return json::to_string(d) + "\n";
}

expected<RuntimeRecord> record_from_json(std::string_view text)
{
    auto doc = parse_versioned(text);
    if (!doc) {
        return fail(doc.error());
    }
    RuntimeRecord r;
    auto need_string = [&doc](std::string_view key, std::string& out) {
        return read_string(*doc, key, out);
    };
    if (!need_string("name", r.name) || !need_string("uuid", r.uuid) ||
        !need_string("boot_id", r.boot_id) || !need_string("argv_hash", r.argv_hash) ||
        !need_string("monitor", r.monitor)) {
        return fail(errc::invalid_argument, "a string field is missing");
    }
    need_string("console", r.console); // null without a console
    const auto generation = get_uint(*doc, "generation");
    const auto start_time = get_uint(*doc, "start_time");
    const auto restarts = get_uint(*doc, "restart_count");
    const auto started = json::get_int(*doc, "started_at_us");
    if (!generation || !start_time || !restarts || !started) {
        return fail(errc::invalid_argument, "a number field is missing");
    }
    r.generation = *generation;
    r.start_time = *start_time;
    r.restart_count = static_cast<std::uint32_t>(*restarts);
    r.started_at_us = *started;
    const json::Value* pid = json::find(*doc, "pid");
    if (pid != nullptr && pid->IsInt() && pid->GetInt() > 0) {
        r.pid = pid->GetInt();
    } else if (pid == nullptr || !pid->IsNull()) {
        return fail(errc::invalid_argument, "pid must be a positive integer or null");
    }
    const json::Value* argv = json::find(*doc, "argv");
    if (argv == nullptr || !argv->IsArray() || argv->Empty()) {
        return fail(errc::invalid_argument, "argv must be a non-empty array");
    }
    for (const auto& arg : argv->GetArray()) {
        if (!arg.IsString()) {
            return fail(errc::invalid_argument, "argv must hold strings");
        }
        r.argv.emplace_back(arg.GetString(), arg.GetStringLength());
    }
    if (proc::hash_command_line(r.argv) != r.argv_hash) {
        return fail(errc::invalid_argument, "argv_hash does not match argv");
    }
    return r;
}

std::string record_path(std::string_view dir)
{
    return std::string(dir) + "/record.json";
}

namespace {

// Writes `text` to "<dir>/<name>" atomically (temp file + rename; the runtime directory is a
// tmpfs, so no fsync), 0600.
expected<void> write_file_atomically(const std::string& dir, std::string_view name,
                                     const std::string& text)
{
    const std::string path = fmt::format("{}/{}", dir, name);
    const std::string temp = fmt::format("{}/.{}.tmp", dir, name);
    const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        return fail(errc::system_error,
                    fmt::format("cannot write '{}': {}", temp, std::strerror(errno)));
    }
    std::size_t done = 0;
    while (done < text.size()) {
        const auto n = ::write(fd, text.data() + done, text.size() - done);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            const int err = errno;
            ::close(fd);
            ::unlink(temp.c_str());
            return fail(errc::system_error,
                        fmt::format("cannot write '{}': {}", temp, std::strerror(err)));
        }
        done += static_cast<std::size_t>(n);
    }
    ::close(fd);
    if (::rename(temp.c_str(), path.c_str()) != 0) {
        const int err = errno;
        ::unlink(temp.c_str());
        return fail(errc::system_error,
                    fmt::format("cannot rename '{}' to '{}': {}", temp, path, std::strerror(err)));
    }
    return {};
}

// The text of a small file; std::nullopt when there is none.
expected<std::optional<std::string>> read_small_file(const std::string& path)
{
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        if (errno == ENOENT) {
            return std::optional<std::string>{};
        }
        return fail(errc::system_error,
                    fmt::format("cannot read '{}': {}", path, std::strerror(errno)));
    }
    return std::optional<std::string>(
        std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>()));
}

} // namespace

expected<void> write_record(const std::string& dir, const RuntimeRecord& r)
{
    return write_file_atomically(dir, "record.json", record_to_json(r));
}

expected<std::optional<RuntimeRecord>> read_record(const std::string& dir)
{
    const std::string path = record_path(dir);
    auto text = read_small_file(path);
    if (!text) {
        return fail(text.error());
    }
    if (!*text) {
        return std::optional<RuntimeRecord>{};
    }
    auto r = record_from_json(**text);
    if (!r) {
        return fail(errc::invalid_argument, fmt::format("'{}': {}", path, r.error().message));
    }
    return std::optional<RuntimeRecord>(std::move(*r));
}

std::string last_run_to_json(const LastRun& r)
{
    json::Document d(rapidjson::kObjectType);
    auto& a = d.GetAllocator();
    auto str = [&a](std::string_view s) {
        return json::Value(s.data(), static_cast<rapidjson::SizeType>(s.size()), a);
    };
    d.AddMember("format", record_format, a);
    d.AddMember("state", str(r.state), a);
    d.AddMember("since_us", r.since_us, a);
    d.AddMember("stop_kind", str(r.stop_kind), a);
    d.AddMember("stop_signal", r.stop_signal, a);
    d.AddMember("stop_exit_code",
                r.stop_exit_code ? json::Value(*r.stop_exit_code) : json::Value(), a);
    d.AddMember("stop_detail", str(r.stop_detail), a);
    d.AddMember("exit", str(r.exit), a);
    d.AddMember("exit_value", r.exit_value, a);
    d.AddMember("restart_count", r.restart_count, a);
    return json::to_string(d) + "\n";
}

expected<LastRun> last_run_from_json(std::string_view text)
{
    auto doc = parse_versioned(text);
    if (!doc) {
        return fail(doc.error());
    }
    LastRun r;
    auto need_string = [&doc](std::string_view key, std::string& out) {
        return read_string(*doc, key, out);
    };
    if (!need_string("state", r.state) || !need_string("stop_kind", r.stop_kind) ||
        !need_string("stop_detail", r.stop_detail) || !need_string("exit", r.exit)) {
        return fail(errc::invalid_argument, "a string field is missing");
    }
    const auto since = json::get_int(*doc, "since_us");
    const auto signal = json::get_int(*doc, "stop_signal");
    const auto value = json::get_int(*doc, "exit_value");
    const auto restarts = get_uint(*doc, "restart_count");
    if (!since || !signal || !value || !restarts) {
        return fail(errc::invalid_argument, "a number field is missing");
    }
    r.since_us = *since;
    r.stop_signal = static_cast<int>(*signal);
    r.exit_value = static_cast<int>(*value);
    r.restart_count = static_cast<std::uint32_t>(*restarts);
    const json::Value* code = json::find(*doc, "stop_exit_code");
    if (code != nullptr && code->IsInt()) {
        r.stop_exit_code = code->GetInt();
    } else if (code == nullptr || !code->IsNull()) {
        return fail(errc::invalid_argument, "stop_exit_code must be an integer or null");
    }
    return r;
}

expected<void> write_last_run(const std::string& dir, const LastRun& r)
{
    return write_file_atomically(dir, "last.json", last_run_to_json(r));
}

expected<std::optional<LastRun>> read_last_run(const std::string& dir)
{
    const std::string path = dir + "/last.json";
    auto text = read_small_file(path);
    if (!text) {
        return fail(text.error());
    }
    if (!*text) {
        return std::optional<LastRun>{};
    }
    auto r = last_run_from_json(**text);
    if (!r) {
        return fail(errc::invalid_argument, fmt::format("'{}': {}", path, r.error().message));
    }
    return std::optional<LastRun>(std::move(*r));
}

void remove_record(const std::string& dir) noexcept
{
    ::unlink(record_path(dir).c_str());
}

expected<std::pair<pid_t, int>> find_recorded_process(const RuntimeRecord& r)
{
    if (r.boot_id != proc::boot_id()) {
        return fail(errc::invalid_state, "the record is from another boot");
    }
    if (r.pid) {
        auto pidfd = check_process(r, *r.pid, true);
        if (!pidfd) {
            return fail(pidfd.error());
        }
        return std::make_pair(*r.pid, *pidfd);
    }
    // Spawned, but the daemon stopped before it could record the pid: the command line (which
    // names the machine and its uuid) finds it, if it lives.
    DIR* proc_dir = ::opendir("/proc");
    if (proc_dir == nullptr) {
        return fail(errc::system_error, fmt::format("cannot list /proc: {}", std::strerror(errno)));
    }
    std::optional<std::pair<pid_t, int>> found;
    while (const dirent* entry = ::readdir(proc_dir)) {
        char* end = nullptr;
        const long pid = std::strtol(entry->d_name, &end, 10);
        if (pid <= 0 || *end != '\0') {
            continue;
        }
        if (auto pidfd = check_process(r, static_cast<pid_t>(pid), false)) {
            found = std::make_pair(static_cast<pid_t>(pid), *pidfd);
            break;
        }
    }
    ::closedir(proc_dir);
    if (!found) {
        return fail(errc::invalid_state, "no process runs its command line");
    }
    return *found;
}

} // namespace qm::daemon
