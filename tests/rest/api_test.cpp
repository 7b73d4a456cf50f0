// SPDX-License-Identifier: GPL-2.0-or-later
// The REST handlers (rest::Api) in process, over a real Supervisor and real QEMU, without sockets:
// bodies, queries, names, If-Match, statuses and headers of every route, and that a refused
// request changes nothing.
#include "daemon/rest/api.hpp"

#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "daemon/rest/router.hpp"
#include "tests/supervisor/supervisor_fixture.hpp"

namespace qm::test {
namespace {

using rest::Api;
using rest::Request;
using rest::Response;

class ApiTest : public SupervisorFixture
{
protected:
    void SetUp() override
    {
        SupervisorFixture::SetUp();
        if (IsSkipped()) {
            return;
        }
        // LifecycleThroughTheHandlers sends human-monitor-command, which the default QMP policy
        // denies (qmp_policy_test and rest_test test the policy): this Api lifts it.
        options_.qmp_policy.allow = {"human-monitor-command"};
        open_supervisor();
        api_.emplace(*sup_, rest::ApiOptions{"9.9.9"});
    }
    void TearDown() override
    {
        api_.reset();
        SupervisorFixture::TearDown();
    }

    Response call(std::string method, std::string target, std::string body = {},
                  std::string content_type = "application/json",
                  std::optional<std::string> if_match = {})
    {
        Request r;
        r.method = std::move(method);
        r.target = std::move(target);
        r.body = std::move(body);
        if (!r.body.empty()) {
            r.content_type = std::move(content_type);
        }
        r.if_match = std::move(if_match);
        return run_co(ioc_, api_->handle(std::move(r)), 60s);
    }

    // The problem's type name ("NoSuchMachine") and field of an error response.
    static std::pair<std::string, std::string> problem(const Response& r)
    {
        EXPECT_EQ(r.content_type, "application/problem+json") << r.body;
        const json::Document d = parse_json(r.body);
        const std::string type(json::get_string(d, "type").value_or(""));
        EXPECT_TRUE(type.starts_with("urn:qmachined:error:")) << r.body;
        EXPECT_EQ(json::get_int(d, "status"), r.status) << r.body;
        return {type.substr(std::string_view("urn:qmachined:error:").size()),
                std::string(json::get_string(d, "field").value_or(""))};
    }

    static std::string header(const Response& r, std::string_view name)
    {
        for (const auto& [k, v] : r.headers) {
            if (k == name) {
                return v;
            }
        }
        return {};
    }

    std::string create_body(const std::string& name)
    {
        return R"({"name": ")" + name + R"(", "spec": )" + none_spec() + "}";
    }

    // What must stay the same after a refused request.
    std::string snapshot()
    {
        std::string out = call("GET", "/v1/machines").body;
        // event_seq moves with any event; a refused request must not publish any either.
        for (const auto& f : files_ending(root_ / "state", "")) {
            out += "\n" + f + "=" + read_file(f);
        }
        return out;
    }

    std::optional<Api> api_;
};

TEST_F(ApiTest, CreateAnswers201WithLocationAndETag)
{
    const Response r = call("POST", "/v1/machines", create_body("vm1"));
    ASSERT_EQ(r.status, 201) << r.body;
    EXPECT_EQ(r.content_type, "application/json");
    EXPECT_EQ(header(r, "Location"), "/v1/machines/vm1");
    EXPECT_EQ(header(r, "ETag"), "\"1\"");
    EXPECT_EQ(r.route, "machines.create");
    const json::Document d = parse_json(r.body);
    EXPECT_EQ(json::get_string(d, "name"), "vm1");
    EXPECT_EQ(json::get_string(d, "state"), "defined");
    EXPECT_TRUE(json::find(d, "pid")->IsNull());
    EXPECT_TRUE(json::find(d, "stop_reason")->IsNull());
    EXPECT_EQ(json::get_int(d, "generation"), 1);
    EXPECT_GT(json::get_int(d, "event_seq").value_or(0), 0);
    const std::string since(json::get_string(d, "state_since").value_or(""));
    EXPECT_EQ(since.size(), 27u) << since;
    EXPECT_TRUE(since.ends_with("Z")) << since;

    const Response again = call("POST", "/v1/machines", create_body("vm1"));
    EXPECT_EQ(again.status, 409);
    EXPECT_EQ(problem(again).first, "Exists");
}

TEST_F(ApiTest, CreateWithoutSpecTakesTheDefaults)
{
    const Response r = call("POST", "/v1/machines", R"({"name": "plain"})");
    ASSERT_EQ(r.status, 201) << r.body;
    const json::Document d = parse_json(r.body);
    EXPECT_EQ(json::get_string(*json::find(d, "spec"), "binary"), "qemu-system-x86_64");
}

TEST_F(ApiTest, BadCreateBodiesAre400Or415AndChangeNothing)
{
    ASSERT_EQ(call("POST", "/v1/machines", create_body("keep")).status, 201);
    const std::string before = snapshot();
    struct Case
    {
        std::string body;
        std::string content_type;
        int status;
        std::string type;
        std::string field;
    };
    const std::vector<Case> cases = {
        {"{", "application/json", 400, "InvalidArgument", ""},
        {"[1]", "application/json", 400, "InvalidArgument", ""},
        {R"({"spec": {}})", "application/json", 400, "InvalidArgument", "name"},
        {R"({"name": 3})", "application/json", 400, "InvalidArgument", "name"},
        {R"({"name": "a", "frob": 1})", "application/json", 400, "InvalidArgument", "frob"},
        {R"({"name": "a/b"})", "application/json", 400, "InvalidArgument", "name"},
        {R"({"name": ".."})", "application/json", 400, "InvalidArgument", "name"},
        {R"({"name": "a\u0000b"})", "application/json", 400, "InvalidArgument", "name"},
        {R"({"name": ")" + std::string(65, 'a') + R"("})", "application/json", 400,
         "InvalidArgument", "name"},
        {R"({"name": "a", "spec": []})", "application/json", 400, "InvalidArgument", "spec"},
        {R"({"name": "a", "spec": {"cpus": "two"}})", "application/json", 400, "InvalidArgument",
         "spec.cpus"},
        {R"({"name": "a", "spec": {"console": {"frob": 1}}})", "application/json", 400,
         "InvalidArgument", "spec.console.frob"},
        {R"({"name": "a", "spec": {"args": ["-daemonize"]}})", "application/json", 400,
         "InvalidArgument", "spec.args[0]"},
        {R"({"name": "a"})", "text/plain", 415, "UnsupportedMediaType", ""},
        {R"({"name": "a"})", "", 415, "UnsupportedMediaType", ""},
        {R"({"name": "a"})", "application/x-www-form-urlencoded", 415, "UnsupportedMediaType", ""},
    };
    for (const Case& c : cases) {
        SCOPED_TRACE(c.body + " as " + c.content_type);
        Request r;
        const Response res = call("POST", "/v1/machines", c.body, c.content_type);
        EXPECT_EQ(res.status, c.status) << res.body;
        const auto [type, field] = problem(res);
        EXPECT_EQ(type, c.type);
        EXPECT_EQ(field, c.field);
    }
    EXPECT_EQ(snapshot(), before);
    // JSON with a parameter and a +json suffix are JSON.
    EXPECT_EQ(call("POST", "/v1/machines", create_body("b"), "Application/JSON; charset=utf-8").status, 201);
    EXPECT_EQ(call("POST", "/v1/machines", create_body("c"), "application/merge-patch+json").status, 201);
}

TEST_F(ApiTest, NamesInPathsAreValidatedBeforeAnything)
{
    for (const char* target : {"/v1/machines/..", "/v1/machines/%2e%2e", "/v1/machines/a%2Fb",
                               "/v1/machines/a%00b", "/v1/machines/-a", "/v1/machines/a%20b"}) {
        SCOPED_TRACE(target);
        const Response r = call("GET", target);
        EXPECT_EQ(r.status, 400);
        EXPECT_EQ(problem(r), (std::pair<std::string, std::string>{"InvalidArgument", "name"}));
    }
    const std::string long_name(65, 'a');
    EXPECT_EQ(call("POST", "/v1/machines/" + long_name + "/start").status, 400);
    const Response unknown = call("POST", "/v1/machines/ghost/start");
    EXPECT_EQ(unknown.status, 404);
    EXPECT_EQ(problem(unknown).first, "NoSuchMachine");
    EXPECT_EQ(call("GET", "/v1/machines/ghost/log").status, 404);
}

TEST_F(ApiTest, RoutingProblems)
{
    const Response missing = call("GET", "/v1/nothing");
    EXPECT_EQ(missing.status, 404);
    EXPECT_EQ(problem(missing).first, "NotFound");
    EXPECT_EQ(missing.route, "unmatched");
    const Response method = call("PATCH", "/v1/machines");
    EXPECT_EQ(method.status, 405);
    EXPECT_EQ(problem(method).first, "MethodNotAllowed");
    EXPECT_EQ(header(method, "Allow"), "GET, POST");
    // The absolute form (RFC 9112 3.2.2) reaches the same routes.
    EXPECT_EQ(call("GET", "http://qmachined/v1/health").status, 200);
    EXPECT_EQ(call("GET", "http://qmachined?x").status, 404);
    EXPECT_EQ(problem(call("GET", "http://qmachined/v1/machines/ghost")).first, "NoSuchMachine");
    const Response query = call("GET", "/v1/machines?verbose=1");
    EXPECT_EQ(query.status, 400);
    EXPECT_EQ(problem(query), (std::pair<std::string, std::string>{"InvalidArgument", "verbose"}));
}

TEST_F(ApiTest, LifecycleThroughTheHandlers)
{
    ASSERT_EQ(call("POST", "/v1/machines", create_body("vm")).status, 201);
    Response r = call("POST", "/v1/machines/vm/start");
    ASSERT_EQ(r.status, 200) << r.body;
    json::Document d = parse_json(r.body);
    EXPECT_EQ(json::get_string(d, "state"), "running");
    EXPECT_TRUE(json::find(d, "pid")->IsInt());

    r = call("POST", "/v1/machines/vm/qmp", R"({"execute": "query-status"})");
    ASSERT_EQ(r.status, 200) << r.body;
    d = parse_json(r.body);
    EXPECT_EQ(json::get_string(*json::find(d, "return"), "status"), "running");
    EXPECT_TRUE(json::find(d, "event_seq")->IsUint64());

    r = call("POST", "/v1/machines/vm/qmp", R"({"execute": "frob"})");
    EXPECT_EQ(r.status, 422);
    d = parse_json(r.body);
    EXPECT_EQ(json::get_string(d, "class"), "CommandNotFound");
    EXPECT_TRUE(json::get_string(d, "desc").has_value());

    r = call("POST", "/v1/machines/vm/qmp",
             R"({"execute": "human-monitor-command", "arguments": {"command-line": "info version"}, "timeout_s": 5})");
    EXPECT_EQ(r.status, 200) << r.body;
    // What the policy still denies: 403.
    r = call("POST", "/v1/machines/vm/qmp", R"({"execute": "getfd", "arguments": {"fdname": "x"}})");
    EXPECT_EQ(r.status, 403) << r.body;
    EXPECT_EQ(problem(r).first, "Forbidden");

    r = call("POST", "/v1/machines/vm/pause", "{}");
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(json::get_string(parse_json(r.body), "state"), "paused");
    r = call("POST", "/v1/machines/vm/resume");
    ASSERT_EQ(r.status, 200) << r.body;
    EXPECT_EQ(json::get_string(parse_json(r.body), "state"), "running");

    r = call("DELETE", "/v1/machines/vm");
    EXPECT_EQ(r.status, 409);
    EXPECT_EQ(problem(r).first, "StateConflict");
    r = call("PUT", "/v1/machines/vm/spec", none_spec(), "application/json", "\"1\"");
    EXPECT_EQ(r.status, 409);

    r = call("POST", "/v1/machines/vm/stop", R"({"mode": "quit", "timeout_s": 5})");
    ASSERT_EQ(r.status, 200) << r.body;
    d = parse_json(r.body);
    EXPECT_EQ(json::get_string(d, "state"), "stopped");
    EXPECT_EQ(json::get_string(*json::find(d, "stop_reason"), "kind"), "host-quit");

    r = call("POST", "/v1/machines/vm/qmp", R"({"execute": "query-status"})");
    EXPECT_EQ(r.status, 409);

    r = call("GET", "/v1/machines/vm/log?tail=5");
    EXPECT_EQ(r.status, 200);
    EXPECT_EQ(r.content_type, "text/plain; charset=utf-8");
    r = call("GET", "/v1/machines/vm/console/log");
    EXPECT_EQ(r.status, 200);
    EXPECT_EQ(r.body, ""); // no console in this spec

    r = call("DELETE", "/v1/machines/vm");
    EXPECT_EQ(r.status, 204);
    EXPECT_TRUE(r.body.empty());
    EXPECT_TRUE(r.content_type.empty());
    EXPECT_EQ(call("GET", "/v1/machines/vm").status, 404);
}

TEST_F(ApiTest, ActionBodiesAreChecked)
{
    ASSERT_EQ(call("POST", "/v1/machines", create_body("vm")).status, 201);
    const std::string before = snapshot();
    const std::vector<std::tuple<std::string, std::string, std::string>> cases = {
        {"/v1/machines/vm/start", R"({"force": true})", "force"},
        {"/v1/machines/vm/stop", R"({"mode": "hard"})", "mode"},
        {"/v1/machines/vm/stop", R"({"mode": 1})", "mode"},
        {"/v1/machines/vm/stop", R"({"timeout_s": -1})", "timeout_s"},
        {"/v1/machines/vm/stop", R"({"timeout_s": "5"})", "timeout_s"},
        {"/v1/machines/vm/stop", R"({"timeout_s": 1e300})", "timeout_s"},
        {"/v1/machines/vm/stop", R"({"timeout_s": 1.5})", "timeout_s"},
        {"/v1/machines/vm/stop", R"({"timeout_s": 86401})", "timeout_s"},
        {"/v1/machines/vm/qmp", R"({"execute": "x", "arguments": null})", "arguments"},
        {"/v1/machines/vm/qmp", R"({"execute": "x", "timeout_s": 3601})", "timeout_s"},
        {"/v1/machines/vm/qmp", R"({})", "execute"},
        {"/v1/machines/vm/qmp", R"({"execute": ""})", "execute"},
        {"/v1/machines/vm/qmp", R"({"execute": 5})", "execute"},
        {"/v1/machines/vm/qmp", R"({"execute": "x", "arguments": [1]})", "arguments"},
        {"/v1/machines/vm/qmp", R"({"execute": "x", "timeout_s": 0})", "timeout_s"},
        {"/v1/machines/vm/qmp", R"({"execute": "x", "id": 1})", "id"},
    };
    for (const auto& [target, body, field] : cases) {
        SCOPED_TRACE(target + " " + body);
        const Response r = call("POST", target, body);
        EXPECT_EQ(r.status, 400) << r.body;
        EXPECT_EQ(problem(r), (std::pair<std::string, std::string>{"InvalidArgument", field}));
    }
    const Response text = call("POST", "/v1/machines/vm/start", "go", "text/plain");
    EXPECT_EQ(text.status, 415);
    EXPECT_EQ(snapshot(), before);
}

TEST_F(ApiTest, ConditionalSpecUpdates)
{
    ASSERT_EQ(call("POST", "/v1/machines", create_body("vm")).status, 201);
    // Each accepted form of If-Match, each moving the generation on by one.
    std::uint64_t generation = 1;
    for (std::optional<std::string> tag :
         {std::optional<std::string>("\"1\""), std::optional<std::string>("2"),
          std::optional<std::string>("\"3\""), std::optional<std::string>("*"),
          std::optional<std::string>()}) {
        SCOPED_TRACE(tag.value_or("(none)"));
        const Response r = call("PUT", "/v1/machines/vm/spec", none_spec(R"(, "cpus": 2)"),
                                "application/json", tag);
        ASSERT_EQ(r.status, 200) << r.body;
        ++generation;
        EXPECT_EQ(header(r, "ETag"), "\"" + std::to_string(generation) + "\"");
        EXPECT_EQ(json::get_int(*json::find(parse_json(r.body), "spec"), "cpus"), 2);
    }
    const std::string before = snapshot();
    Response stale = call("PUT", "/v1/machines/vm/spec", none_spec(), "application/json", "\"1\"");
    EXPECT_EQ(stale.status, 412);
    EXPECT_EQ(problem(stale).first, "StaleGeneration");
    Response weak = call("PUT", "/v1/machines/vm/spec", none_spec(), "application/json", "W/\"6\"");
    EXPECT_EQ(weak.status, 412) << weak.body; // a weak tag never matches, even the current one
    Response junk = call("PUT", "/v1/machines/vm/spec", none_spec(), "application/json", "abc");
    EXPECT_EQ(junk.status, 400);
    EXPECT_EQ(problem(junk).second, "If-Match");
    Response bad = call("PUT", "/v1/machines/vm/spec", R"({"cpus": 0})");
    EXPECT_EQ(bad.status, 400);
    EXPECT_EQ(problem(bad).second, "spec.cpus");
    EXPECT_EQ(call("PUT", "/v1/machines/vm/spec", "").status, 400);
    EXPECT_EQ(call("PUT", "/v1/machines/vm/spec", "[]").status, 400);
    EXPECT_EQ(call("PUT", "/v1/machines/vm/spec", "{}", "text/plain").status, 415);
    EXPECT_EQ(call("PUT", "/v1/machines/ghost/spec", "{}").status, 404);
    EXPECT_EQ(snapshot(), before);
}

TEST_F(ApiTest, DeleteQueries)
{
    ASSERT_EQ(call("POST", "/v1/machines", create_body("vm")).status, 201);
    ASSERT_EQ(call("POST", "/v1/machines/vm/start").status, 200);
    const Response bad = call("DELETE", "/v1/machines/vm?force=yes");
    EXPECT_EQ(bad.status, 400);
    EXPECT_EQ(problem(bad).second, "force");
    EXPECT_EQ(call("DELETE", "/v1/machines/vm?force=true&force=true").status, 400);
    EXPECT_EQ(call("DELETE", "/v1/machines/vm?force=false").status, 409);
    EXPECT_EQ(call("DELETE", "/v1/machines/vm?force=1").status, 204);
    EXPECT_EQ(call("GET", "/v1/machines").body.find("\"vm\""), std::string::npos);
}

TEST_F(ApiTest, VersionHealthAndList)
{
    Response v = call("GET", "/v1/version");
    ASSERT_EQ(v.status, 200);
    json::Document d = parse_json(v.body);
    EXPECT_EQ(json::get_string(d, "qmachined"), "9.9.9");
    EXPECT_EQ(json::get_string(d, "api"), "v1");
    EXPECT_TRUE(json::find(d, "qemu")->IsNull());
    api_->set_qemu_version({"qemu-system-x86_64", "7.2.22", "QEMU emulator version 7.2.22"});
    d = parse_json(call("GET", "/v1/version").body);
    EXPECT_EQ(json::get_string(*json::find(d, "qemu"), "version"), "7.2.22");

    ASSERT_EQ(call("POST", "/v1/machines", create_body("b")).status, 201);
    ASSERT_EQ(call("POST", "/v1/machines", create_body("a")).status, 201);
    d = parse_json(call("GET", "/v1/health").body);
    EXPECT_EQ(json::get_string(d, "status"), "ok");
    EXPECT_EQ(json::get_int(d, "machines"), 2);
    EXPECT_EQ(json::get_int(*json::find(d, "states"), "defined"), 2);
    d = parse_json(call("GET", "/v1/machines").body);
    const json::Value& list = *json::find(d, "machines");
    ASSERT_EQ(list.Size(), 2u);
    EXPECT_EQ(json::get_string(list[0], "name"), "a");
    EXPECT_EQ(json::get_string(list[1], "name"), "b");
}

TEST_F(ApiTest, DuringShutdownOperationsAre503)
{
    ASSERT_EQ(call("POST", "/v1/machines", create_body("vm")).status, 201);
    run_co(ioc_, sup_->shutdown(), 60s);
    const Response health = call("GET", "/v1/health");
    EXPECT_EQ(health.status, 503);
    EXPECT_EQ(problem(health).first, "ShuttingDown");
    const Response start = call("POST", "/v1/machines/vm/start");
    EXPECT_EQ(start.status, 503);
    EXPECT_EQ(problem(start).first, "ShuttingDown");
    EXPECT_EQ(call("GET", "/v1/machines/vm").status, 200);
}

} // namespace
} // namespace qm::test
