// SPDX-License-Identifier: GPL-2.0-or-later
// Tests of daemon/audit: the line's fields, quoting of values that could forge a field or a line,
// the callers (unix credentials from SO_PEERCRED, TCP peers), and the log level.
#include "daemon/audit.hpp"

#include <memory>
#include <string>

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>

namespace qm::daemon {
namespace {

TEST(AuditLine, FieldsInOrder)
{
    EXPECT_EQ(audit_line(unix_caller(0, 123), "start", "web1", "ok"),
              R"(audit: op=start machine=web1 result=ok caller="uid=0 pid=123")");
    EXPECT_EQ(audit_line(tcp_caller("127.0.0.1", 5555), "qmp:human-monitor-command", "vm.1_a-b",
                         "Forbidden"),
              "audit: op=qmp:human-monitor-command machine=vm.1_a-b result=Forbidden "
              R"(caller="tcp=127.0.0.1:5555 token")");
    EXPECT_EQ(audit_line(Caller{}, "create", "", "InvalidArgument"),
              R"(audit: op=create machine="" result=InvalidArgument caller="")");
}

TEST(AuditLine, ValuesThatCouldForgeAFieldOrALineAreQuoted)
{
    const Caller c = unix_caller(1000, 42);
    const std::string tail = R"( result=ok caller="uid=1000 pid=42")";
    EXPECT_EQ(audit_line(c, "delete", "a b", "ok"), R"(audit: op=delete machine="a b")" + tail);
    EXPECT_EQ(audit_line(c, "delete", "x\nINFO audit: op=kill", "ok"),
              R"(audit: op=delete machine="x\nINFO audit: op=kill")" + tail);
    EXPECT_EQ(audit_line(c, "delete", "x result=ok", "ok"),
              R"(audit: op=delete machine="x result=ok")" + tail);
    EXPECT_EQ(audit_line(c, "delete", "a=b", "ok"), R"(audit: op=delete machine="a=b")" + tail);
    EXPECT_EQ(audit_line(c, "delete", R"(q"uo\te)", "ok"),
              R"(audit: op=delete machine="q\"uo\\te")" + tail);
    EXPECT_EQ(audit_line(c, "delete", "caf\xc3\xa9\t\x01", "ok"),
              R"(audit: op=delete machine="caf\xc3\xa9\t\x01")" + tail);
    EXPECT_EQ(audit_line(c, "qmp:a b", "vm", "ok"), R"(audit: op="qmp:a b" machine=vm)" + tail);
}

TEST(AuditLine, LongValuesAreCut)
{
    const Caller c = unix_caller(1, 2);
    EXPECT_EQ(audit_line(c, "start", std::string(256, 'a'), "ok"),
              "audit: op=start machine=" + std::string(256, 'a') +
                  R"( result=ok caller="uid=1 pid=2")");
    EXPECT_EQ(audit_line(c, "start", std::string(300, 'a'), "ok"),
              "audit: op=start machine=" + std::string(256, 'a') +
                  R"(... result=ok caller="uid=1 pid=2")");
    EXPECT_EQ(audit_line(c, "start", std::string(300, ' '), "ok"),
              R"(audit: op=start machine=")" + std::string(256, ' ') +
                  R"(..." result=ok caller="uid=1 pid=2")");
}

TEST(AuditCaller, Descriptions)
{
    EXPECT_EQ(unix_caller(1000, 4242).description, "uid=1000 pid=4242");
    EXPECT_EQ(tcp_caller("127.0.0.1", 5555).description, "tcp=127.0.0.1:5555 token");
    EXPECT_EQ(tcp_caller("::1", 8080).description, "tcp=[::1]:8080 token");
}

TEST(AuditCaller, UnixSocketPeerFromTheKernel)
{
    int fds[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
    EXPECT_EQ(unix_socket_caller(fds[0]).description,
              fmt::format("uid={} pid={}", ::geteuid(), ::getpid()));
    ::close(fds[0]);
    ::close(fds[1]);

    // Not a socket: the kernel says nothing.
    int p[2];
    ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
    EXPECT_EQ(unix_socket_caller(p[0]).description, "uid=? pid=?");
    ::close(p[0]);
    ::close(p[1]);
    EXPECT_EQ(unix_socket_caller(-1).description, "uid=? pid=?");
}

TEST(Audit, LogsOneInfoLine)
{
    auto sink = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(16);
    sink->set_pattern("%l %v");
    auto previous = spdlog::default_logger();
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("audit_test", sink));
    spdlog::set_level(spdlog::level::info);
    audit(unix_caller(0, 1), "kill", "vm", "StateConflict");
    const auto lines = sink->last_formatted();
    spdlog::set_default_logger(previous);

    ASSERT_EQ(lines.size(), 1u);
    const std::string line = lines[0].substr(0, lines[0].find_last_not_of("\r\n") + 1);
    EXPECT_EQ(line, R"(info audit: op=kill machine=vm result=StateConflict caller="uid=0 pid=1")");
}

// Whatever a message quotes (a spec argument with a line feed, QEMU's output) cannot start a line
// of its own: a forged audit line stays inside the line that quotes it.
TEST(LogFormat, ControlBytesInAMessageAreEscaped)
{
    auto sink = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(16);
    sink->set_formatter(make_log_formatter(false));
    auto logger = std::make_shared<spdlog::logger>("format_test", sink);
    logger->error("Failed to start 'vm': qemu-system-x86_64 -smbios \"x\ninfo: audit: op=delete "
                  "machine=web1 result=ok caller=\"uid=0 pid=1\"\"\r\x1b[2K\ttab\x7f ünïcode");
    logger->info("plain");
    const auto lines = sink->last_formatted();
    ASSERT_EQ(lines.size(), 2u);
    EXPECT_EQ(lines[0], "error: Failed to start 'vm': qemu-system-x86_64 -smbios \"x\\ninfo: "
                        "audit: op=delete machine=web1 result=ok caller=\"uid=0 pid=1\"\"\\r"
                        "\\x1b[2K\ttab\\x7f ünïcode\n");
    EXPECT_EQ(lines[1], "info: plain\n");
    auto timed = make_log_formatter(true);
    spdlog::memory_buf_t out;
    spdlog::details::log_msg msg("t", spdlog::level::warn, "a\nb");
    timed->format(msg, out);
    EXPECT_TRUE(fmt::to_string(out).ends_with(" warning: a\\nb\n")) << fmt::to_string(out);
}

} // namespace
} // namespace qm::daemon
