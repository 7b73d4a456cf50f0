// SPDX-License-Identifier: GPL-2.0-or-later
// The REST front end without sockets: the route table (404 and 405 decided by it), percent-decoding
// and queries, problem bodies and the HTTP-only problem rows against proto/errors.json, log tails,
// timestamps, tokens, the QEMU version line.
#include "daemon/rest/router.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "daemon/qemu_version.hpp"
#include "daemon/rest/api.hpp"
#include "daemon/rest/problem.hpp"
#include "daemon/rest/server.hpp"
#include "libmachine/json.hpp"

namespace qm::rest {
namespace {

namespace fs = std::filesystem;

std::string read_file(const std::string& path)
{
    std::ifstream f(path, std::ios::binary);
    std::ostringstream s;
    s << f.rdbuf();
    return s.str();
}

// The value, or a text that no expected value equals.
std::string ok(const expected<std::string>& r)
{
    return r ? *r : "(error: " + r.error().message + ")";
}

const RouteMatch* as_match(const std::variant<RouteMatch, NoRoute>& r)
{
    return std::get_if<RouteMatch>(&r);
}

const NoRoute* as_no_route(const std::variant<RouteMatch, NoRoute>& r)
{
    return std::get_if<NoRoute>(&r);
}

// A pattern with its {name} filled in.
std::string instantiate(std::string_view pattern, std::string_view name)
{
    std::string out(pattern);
    if (auto at = out.find("{name}"); at != std::string::npos) {
        out.replace(at, 6, name);
    }
    return out;
}

TEST(RouterTest, EveryRouteMatchesItsOwnMethodAndPath)
{
    for (const RouteInfo& r : routes()) {
        SCOPED_TRACE(std::string(r.method) + " " + std::string(r.pattern));
        const auto m = match_route(r.method, instantiate(r.pattern, "vm-1"));
        ASSERT_NE(as_match(m), nullptr);
        EXPECT_EQ(as_match(m)->route, r.route);
        if (r.pattern.find("{name}") != std::string_view::npos) {
            EXPECT_EQ(as_match(m)->name, "vm-1");
        }
        EXPECT_EQ(&route_info(r.route), &r);
    }
}

TEST(RouterTest, OtherMethodsOnAKnownPathAre405WithAllow)
{
    // The Allow value of each path: its methods in table order.
    std::map<std::string, std::string> allow;
    for (const RouteInfo& r : routes()) {
        std::string& a = allow[std::string(r.pattern)];
        a += a.empty() ? "" : ", ";
        a += r.method;
    }
    EXPECT_EQ(allow["/v1/machines"], "GET, POST");
    EXPECT_EQ(allow["/v1/machines/{name}"], "GET, DELETE");
    for (const auto& [pattern, methods] : allow) {
        for (const char* method : {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "FROB"}) {
            if (methods.find(method) != std::string::npos &&
                (std::string(method) != "PUT" || methods.find("PUT") != std::string::npos)) {
                continue;
            }
            SCOPED_TRACE(std::string(method) + " " + pattern);
            const auto m = match_route(method, instantiate(pattern, "a"));
            ASSERT_NE(as_no_route(m), nullptr);
            EXPECT_EQ(as_no_route(m)->status, 405);
            EXPECT_EQ(as_no_route(m)->allow, methods);
        }
    }
}

TEST(RouterTest, UnknownPathsAre404)
{
    for (const char* target : {"/", "/v1", "/v1/", "/v2/machines", "/v1/machines/", "/v1/machines/a/",
                               "/v1/machines/a/frob", "/v1/machines/a/start/x", "/v1//machines",
                               "/v1/machines//start", "/V1/machines", "/v1/machines/a/consoles",
                               "/v1/metrics", "/metrics/", "/metrics/x", "/Metrics",
                               "/v1/machines/a/console/log/x"}) {
        SCOPED_TRACE(target);
        const auto m = match_route("GET", target);
        ASSERT_NE(as_no_route(m), nullptr);
        EXPECT_EQ(as_no_route(m)->status, 404);
        EXPECT_TRUE(as_no_route(m)->allow.empty());
        EXPECT_NE(as_no_route(m)->detail.find("no route for GET"), std::string::npos);
    }
}

TEST(RouterTest, SegmentsAreDecodedAfterSplitting)
{
    // %2F inside a name stays inside it (the name check refuses it later); it does not add a
    // segment that would reach another route.
    auto m = match_route("POST", "/v1/machines/a%2Fstart");
    ASSERT_NE(as_no_route(m), nullptr);
    EXPECT_EQ(as_no_route(m)->status, 405); // /v1/machines/{name} has no POST
    m = match_route("GET", "/v1/machines/a%2Fstart");
    ASSERT_NE(as_match(m), nullptr);
    EXPECT_EQ(as_match(m)->route, Route::machine_get);
    EXPECT_EQ(as_match(m)->name, "a/start");
    m = match_route("GET", "/v1/machines/%2e%2e");
    ASSERT_NE(as_match(m), nullptr);
    EXPECT_EQ(as_match(m)->name, "..");
    m = match_route("GET", "/v1/machines/a%00b/log");
    ASSERT_NE(as_match(m), nullptr);
    EXPECT_EQ(as_match(m)->name, std::string("a\0b", 3));
    m = match_route("GET", "/v1/%6dachines");
    ASSERT_NE(as_match(m), nullptr);
    EXPECT_EQ(as_match(m)->route, Route::machines_list);
}

TEST(RouterTest, MalformedTargetsAre400)
{
    for (const char* target : {"v1/machines", "", "*", "http://x/v1/machines", "/v1/machines/%zz",
                               "/v1/machines/a%2", "/v1/machines?x=%g0"}) {
        SCOPED_TRACE(target);
        const auto m = match_route("GET", target);
        ASSERT_NE(as_no_route(m), nullptr);
        EXPECT_EQ(as_no_route(m)->status, 400);
    }
}

TEST(RouterTest, QueriesAreParsedAndDecoded)
{
    const auto m = match_route("DELETE", "/v1/machines/a?force=true&x=a%20b+c&empty=&flag");
    ASSERT_NE(as_match(m), nullptr);
    const Query want{{"force", "true"}, {"x", "a b c"}, {"empty", ""}, {"flag", ""}};
    EXPECT_EQ(as_match(m)->query, want);
    EXPECT_EQ(as_match(match_route("GET", "/v1/machines?"))->query, Query{});
    EXPECT_EQ(as_match(match_route("GET", "/v1/machines?&&"))->query, Query{});
}

TEST(PercentDecodeTest, Table)
{
    EXPECT_EQ(percent_decode("a%41%7a"), "aAz");
    EXPECT_EQ(percent_decode("a+b"), "a+b");
    EXPECT_EQ(percent_decode("a+b", true), "a b");
    EXPECT_EQ(percent_decode("%2B", true), "+");
    EXPECT_EQ(percent_decode(""), "");
    EXPECT_EQ(percent_decode("%"), std::nullopt);
    EXPECT_EQ(percent_decode("%4"), std::nullopt);
    EXPECT_EQ(percent_decode("%4g"), std::nullopt);
    EXPECT_EQ(percent_decode("ab%"), std::nullopt);
}

json::Document parse_body(const std::string& body)
{
    auto d = json::parse(body);
    EXPECT_TRUE(d) << body;
    return d ? std::move(*d) : json::Document();
}

TEST(ProblemTest, BodiesFollowRfc9457)
{
    const Problem p = make_problem(Error{make_error_code(errc::no_such_machine), "no machine 'x'", {}, {}});
    EXPECT_EQ(p.status, 404);
    const json::Document d = parse_body(problem_body(p));
    EXPECT_EQ(json::get_string(d, "type"), "urn:qmachined:error:NoSuchMachine");
    EXPECT_EQ(json::get_string(d, "title"), "No such machine");
    EXPECT_EQ(json::get_int(d, "status"), 404);
    EXPECT_EQ(json::get_string(d, "detail"), "no machine 'x'");
    EXPECT_EQ(json::find(d, "field"), nullptr);
    EXPECT_EQ(json::find(d, "class"), nullptr);
}

TEST(ProblemTest, SpecErrorsNameTheirField)
{
    const Problem p = make_problem(
        Error{make_error_code(errc::invalid_argument), "spec.console.ring_size: must be ...", {}, {}});
    EXPECT_EQ(p.field, "spec.console.ring_size");
    const Problem other = make_problem(
        Error{make_error_code(errc::invalid_argument), "the body: is not JSON", {}, {}});
    EXPECT_EQ(other.field, "");
    EXPECT_EQ(make_problem(errc::invalid_argument, "bad", "tail").field, "tail");
}

TEST(ProblemTest, QmpErrorsCarryClassAndDesc)
{
    const Problem p = make_problem(Error{make_error_code(errc::qmp_command_failed), "frob: no",
                                         "CommandNotFound", "The command frob has not been found"});
    EXPECT_EQ(p.status, 422);
    const json::Document d = parse_body(problem_body(p));
    EXPECT_EQ(json::get_string(d, "class"), "CommandNotFound");
    EXPECT_EQ(json::get_string(d, "desc"), "The command frob has not been found");
}

TEST(ProblemTest, InvalidUtf8BecomesReplacementCharacters)
{
    const Problem p = make_problem(errc::invalid_argument, std::string("name '\xff\xfe' \xc3\xa9 \xe2\x82", 15));
    const std::string body = problem_body(p);
    const json::Document d = parse_body(body);
    EXPECT_EQ(json::get_string(d, "detail"), "name '\xEF\xBF\xBD\xEF\xBF\xBD' \xc3\xa9 \xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(ProblemTest, HttpOnlyRowsAgreeWithProtoErrorsJson)
{
    const json::Document doc = parse_body(read_file(QM_SOURCE_DIR "/proto/errors.json"));
    const json::Value* rows = json::find(doc, "http_only");
    ASSERT_NE(rows, nullptr);
    ASSERT_TRUE(rows->IsArray());
    std::map<std::string, std::pair<int, std::string>> from_file;
    for (const auto& row : rows->GetArray()) {
        const std::string name(*json::get_string(row, "name"));
        from_file[name] = {static_cast<int>(*json::get_int(row, "http_status")),
                           std::string(*json::get_string(row, "title"))};
        EXPECT_EQ(json::get_string(row, "type"), "urn:qmachined:error:" + name);
    }
    const std::string md = read_file(QM_SOURCE_DIR "/proto/errors.md");
    EXPECT_EQ(from_file.size(), http_problem_table().size());
    std::set<int> statuses;
    for (const HttpProblemInfo& row : http_problem_table()) {
        SCOPED_TRACE(std::string(row.name));
        ASSERT_TRUE(from_file.count(std::string(row.name)));
        EXPECT_EQ(from_file[std::string(row.name)].first, row.http_status);
        EXPECT_EQ(from_file[std::string(row.name)].second, row.title);
        EXPECT_NE(md.find(std::string(row.name)), std::string::npos);
        EXPECT_TRUE(statuses.insert(row.http_status).second);
        const Problem p = make_problem(row.problem, "x");
        EXPECT_EQ(p.status, row.http_status);
        EXPECT_EQ(p.name, row.name);
    }
}

TEST(ProblemTest, Unauthorized401CarriesWwwAuthenticate)
{
    const Response r = problem_response(make_problem(HttpProblem::unauthorized, "no token"));
    EXPECT_EQ(r.status, 401);
    EXPECT_EQ(r.content_type, "application/problem+json");
    ASSERT_EQ(r.headers.size(), 1u);
    EXPECT_EQ(r.headers[0].first, "WWW-Authenticate");
    EXPECT_EQ(r.headers[0].second, "Bearer realm=\"qmachined\"");
}

TEST(ProblemTest, UpgradeRequired426NamesWebSocket)
{
    const Response r = problem_response(make_problem(HttpProblem::upgrade_required, "no upgrade"));
    EXPECT_EQ(r.status, 426);
    EXPECT_EQ(r.problem, "UpgradeRequired");
    const std::vector<std::pair<std::string, std::string>> want{{"Upgrade", "websocket"},
                                                                {"Connection", "Upgrade"}};
    EXPECT_EQ(r.headers, want);
}

TEST(TimestampTest, Rfc3339WithMicroseconds)
{
    EXPECT_EQ(rfc3339_us(0), "1970-01-01T00:00:00.000000Z");
    EXPECT_EQ(rfc3339_us(1795644487759098), "2026-11-25T22:08:07.759098Z");
    EXPECT_EQ(rfc3339_us(951782400000001), "2000-02-29T00:00:00.000001Z");
}

class TempDirTest : public ::testing::Test
{
protected:
    void SetUp() override
    {
        char tmpl[] = "/tmp/qm-rest-XXXXXX";
        ASSERT_NE(::mkdtemp(tmpl), nullptr);
        dir_ = tmpl;
    }
    void TearDown() override { fs::remove_all(dir_); }
    void write(const std::string& name, const std::string& text, mode_t mode = 0600)
    {
        std::ofstream(dir_ / name, std::ios::binary) << text;
        ::chmod((dir_ / name).c_str(), mode);
    }
    std::string path(const std::string& name) const { return (dir_ / name).string(); }
    fs::path dir_;
};

using LogTailTest = TempDirTest;

TEST_F(LogTailTest, LastLines)
{
    write("log", "one\ntwo\nthree\n");
    EXPECT_EQ(ok(read_log_tail(path("log"), std::nullopt, 1024)), "one\ntwo\nthree\n");
    EXPECT_EQ(ok(read_log_tail(path("log"), 2, 1024)), "two\nthree\n");
    EXPECT_EQ(ok(read_log_tail(path("log"), 1, 1024)), "three\n");
    EXPECT_EQ(ok(read_log_tail(path("log"), 3, 1024)), "one\ntwo\nthree\n");
    EXPECT_EQ(ok(read_log_tail(path("log"), 10, 1024)), "one\ntwo\nthree\n");
    EXPECT_EQ(ok(read_log_tail(path("log"), 0, 1024)), "");
    write("partial", "one\ntwo\nthr");
    EXPECT_EQ(ok(read_log_tail(path("partial"), 1, 1024)), "thr");
    EXPECT_EQ(ok(read_log_tail(path("partial"), 2, 1024)), "two\nthr");
    write("empty", "");
    EXPECT_EQ(ok(read_log_tail(path("empty"), 5, 1024)), "");
}

TEST_F(LogTailTest, BoundedReadStartsAtALineBoundary)
{
    std::string text;
    for (int i = 0; i < 1000; ++i) {
        text += "line " + std::to_string(i) + "\n";
    }
    write("log", text);
    const auto tail = read_log_tail(path("log"), std::nullopt, 100);
    ASSERT_TRUE(tail);
    EXPECT_LE(tail->size(), 100u);
    EXPECT_TRUE(tail->starts_with("line "));
    EXPECT_TRUE(tail->ends_with("line 999\n"));
}

TEST_F(LogTailTest, MissingFileIsEmptyAndOthersAreErrors)
{
    EXPECT_EQ(ok(read_log_tail(path("nothing"), std::nullopt, 1024)), "");
    fs::create_symlink(path("elsewhere"), path("link"));
    const auto link = read_log_tail(path("link"), std::nullopt, 1024);
    ASSERT_FALSE(link);
    EXPECT_TRUE(link.error().is(errc::system_error));
}

TEST(TokenTest, ConstantTimeEqual)
{
    EXPECT_TRUE(constant_time_equal("", ""));
    EXPECT_TRUE(constant_time_equal("abc", "abc"));
    EXPECT_FALSE(constant_time_equal("abc", "abd"));
    EXPECT_FALSE(constant_time_equal("abc", "ab"));
    EXPECT_FALSE(constant_time_equal("ab", "abc"));
    EXPECT_FALSE(constant_time_equal("", "a"));
    EXPECT_FALSE(constant_time_equal(std::string("a\0", 2), "a"));
}

using TokenFileTest = TempDirTest;

TEST_F(TokenFileTest, GeneratedOnceWithMode0600ThenRead)
{
    const auto first = load_or_create_token(path("rest.token"));
    ASSERT_TRUE(first) << first.error().message;
    EXPECT_EQ(first->size(), 64u);
    EXPECT_EQ(first->find_first_not_of("0123456789abcdef"), std::string::npos);
    struct stat st{};
    ASSERT_EQ(::stat(path("rest.token").c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    EXPECT_EQ(ok(load_or_create_token(path("rest.token"))), *first);
    const auto other = load_or_create_token(path("other.token"));
    ASSERT_TRUE(other);
    EXPECT_NE(*other, *first);
}

TEST_F(TokenFileTest, GivenTokensAreTrimmedAndChecked)
{
    write("given", "  s3cret \nsecond line\n");
    EXPECT_EQ(ok(load_or_create_token(path("given"))), "s3cret");
    write("open", "s3cret\n", 0644);
    const auto open = load_or_create_token(path("open"));
    ASSERT_FALSE(open);
    EXPECT_TRUE(open.error().is(errc::invalid_argument));
    EXPECT_NE(open.error().message.find("readable by others"), std::string::npos);
    write("blank", "\n\n");
    EXPECT_FALSE(load_or_create_token(path("blank")));
    EXPECT_FALSE(load_or_create_token(path("no/such/dir/token")));
}

TEST(QemuVersionTest, ParsesTheFirstLine)
{
    EXPECT_EQ(daemon::parse_qemu_version(
                  "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright"),
              "7.2.22");
    EXPECT_EQ(daemon::parse_qemu_version("QEMU emulator version 8.0.0\n"), "8.0.0");
    EXPECT_EQ(daemon::parse_qemu_version("qemu: unknown option\n"), "");
    EXPECT_EQ(daemon::parse_qemu_version(""), "");
}

} // namespace
} // namespace qm::rest
