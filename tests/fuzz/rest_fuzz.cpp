// SPDX-License-Identifier: GPL-2.0-or-later
// libFuzzer target for the REST path: the bytes are what a client sends on the unix socket (one
// request, or several pipelined on a kept-alive connection). They take the session's production
// steps (daemon/rest/http_request.hpp: Beast's parser with the daemon's default limits, the header
// checks, the body admission, the answer to what cannot be read, the message turned into a
// rest::Request), then rest::Api::handle over a real Supervisor.
//
// Each input gets a new Supervisor (cheap: no process, tmpfs) on the same private directories,
// loaded with one defined machine, "vm1", so that a single request reaches the machine routes; the
// directories are emptied after the input, so inputs are independent (the event numbers start
// at a fixed base). Nothing starts a process: a start or restart request is not handed to the Api
// (the route is decided with match_route, as handle() decides it), and a stream (events, console)
// is taken as an answer without being run. The waits (events/wait, console/wait) may still be
// waiting after 50 ms: they are left to the Supervisor's end (which completes them); any other
// request must be answered by then.
//
// What must hold for every answer:
//  - the status is one the API documents (never 500: that is an exception escaping a handler, or
//    a failure of the state directory);
//  - a problem is application/problem+json whose body's "status" is the status and whose "type"
//    and "title" are non-empty strings; a 405 carries Allow;
//  - a body that says it is JSON parses as JSON;
//  - a request that could not be read is answered 400, 413 or 431 with such a problem, or not at
//    all (the client went away mid-request);
//  - no process was started (there is no child watcher on the loop).
#include <algorithm>
#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>

#include <unistd.h>

#include <spdlog/spdlog.h>

#include "daemon/audit.hpp"
#include "daemon/config.hpp"
#include "daemon/rest/api.hpp"
#include "daemon/rest/beast.hpp"
#include "daemon/rest/http_request.hpp"
#include "daemon/rest/router.hpp"
#include "daemon/rest/server.hpp"
#include "daemon/supervisor/supervisor.hpp"
#include "libmachine/asio.hpp"
#include "libmachine/json.hpp"
#include "libmachine/proc/child_watcher.hpp"
#include "tests/fuzz/fuzz_loop.hpp"

namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using qm::rest::Request;
using qm::rest::Response;
using qm::rest::Route;

// Requests read from one input at most (a connection would go on; the fuzzer need not).
constexpr int max_requests = 8;
// How long a request may take before it must be one of the waits.
constexpr auto answer_deadline = 50ms;

void check(bool ok, const char* what)
{
    if (!ok) {
        std::fprintf(stderr, "rest_fuzz: %s\n", what);
        std::abort();
    }
}

// A SyncReadStream over the input: Beast's read_header and read take it as they take a socket
// (each read gets what is left, up to the buffer; then EOF, as when the client hangs up).
class InputStream
{
public:
    explicit InputStream(std::string_view data)
        : rest_(data)
    {}

    template <class MutableBuffers>
    std::size_t read_some(const MutableBuffers& buffers, qm::error_code& ec)
    {
        if (rest_.empty()) {
            ec = qm::asio::error::eof;
            return 0;
        }
        ec = {};
        const std::size_t n =
            qm::asio::buffer_copy(buffers, qm::asio::buffer(rest_.data(), rest_.size()));
        rest_.remove_prefix(n);
        return n;
    }
    template <class MutableBuffers>
    std::size_t read_some(const MutableBuffers& buffers)
    {
        qm::error_code ec;
        const std::size_t n = read_some(buffers, ec);
        if (ec) {
            throw boost::system::system_error(ec);
        }
        return n;
    }

private:
    std::string_view rest_;
};

struct Fixture
{
    qm::asio::io_context ioc{1};
    qm::fuzz::ScratchDir scratch{"qm-rest-fuzz"};
    const fs::path root = scratch.path();
    qm::daemon::SupervisorOptions options;
    std::string vm1_definition; // vm1's definition file, as the state directory holds it

    Fixture()
    {
        spdlog::set_level(spdlog::level::off);
        options.state_dir = (root / "state").string();
        options.runtime_dir = (root / "run").string();
        options.events.seq_base = 1000; // the same numbers for every input
        fs::create_directories(options.state_dir);
        fs::create_directories(options.runtime_dir);
        // vm1 as created through the API, once; every input starts from its file.
        auto sup = std::make_unique<qm::daemon::Supervisor>(ioc, options);
        check(sup->load().has_value(), "the supervisor cannot load");
        bool done = false;
        bool created = false;
        qm::asio::co_spawn(
            ioc,
            [](qm::daemon::Supervisor* s, bool* ok) -> qm::awaitable<void> {
                auto spec = qm::json::parse(R"({"machine": "none", "memory_mib": 64})");
                *ok = spec && (co_await s->create("vm1", std::move(*spec))).has_value();
            }(sup.get(), &created),
            [&done](const std::exception_ptr&) { done = true; });
        run_until([&] { return done; }, 10s);
        check(created, "cannot create vm1");
        std::ifstream f(fs::path(options.state_dir) / "vm1.json", std::ios::binary);
        vm1_definition.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
        check(!vm1_definition.empty(), "vm1 has no definition file");
        finish(std::move(sup));
    }
    Fixture(const Fixture&) = delete;
    Fixture& operator=(const Fixture&) = delete;

    static Fixture& instance()
    {
        static Fixture f;
        return f;
    }

    // Runs the loop until `done` or the deadline; whether `done`.
    template <class Done>
    bool run_until(Done done, std::chrono::milliseconds deadline)
    {
        return qm::fuzz::run_until(ioc, done, deadline);
    }

    std::unique_ptr<qm::daemon::Supervisor> open()
    {
        {
            std::ofstream f(fs::path(options.state_dir) / "vm1.json", std::ios::binary);
            f << vm1_definition;
        }
        auto sup = std::make_unique<qm::daemon::Supervisor>(ioc, options);
        auto loaded = sup->load();
        check(loaded && loaded->empty() && sup->size() == 1, "vm1 does not load");
        return sup;
    }

    // shutdown() (nothing runs: it completes at once), then the Supervisor goes, which completes
    // the waits still pending; the directories are emptied.
    void finish(std::unique_ptr<qm::daemon::Supervisor> sup)
    {
        bool down = false;
        qm::asio::co_spawn(ioc, sup->shutdown(),
                           [&down](const std::exception_ptr&) { down = true; });
        check(run_until([&] { return down; }, 10s), "shutdown did not complete");
        sup.reset();
        ioc.restart();
        ioc.poll();
        for (const auto& dir : {options.state_dir, options.runtime_dir}) {
            std::error_code ec;
            for (const auto& entry : fs::directory_iterator(dir, ec)) {
                fs::remove_all(entry.path(), ec);
            }
        }
    }
};

bool is_json(std::string_view content_type)
{
    const std::string_view type = content_type.substr(0, content_type.find(';'));
    return type == "application/json" || type.ends_with("+json");
}

const std::string* header(const Response& r, std::string_view name)
{
    for (const auto& [k, v] : r.headers) {
        if (k == name) {
            return &v;
        }
    }
    return nullptr;
}

void check_problem(const Response& r)
{
    check(r.content_type == qm::rest::problem_media_type,
          "a problem is not application/problem+json");
    auto doc = qm::json::parse(r.body);
    check(doc.has_value() && doc->IsObject(), "a problem's body is not a JSON object");
    check(qm::json::get_int(*doc, "status") == r.status, "a problem's status is not the status");
    const auto type = qm::json::get_string(*doc, "type");
    const auto title = qm::json::get_string(*doc, "title");
    check(type && !type->empty(), "a problem has no type");
    check(title && !title->empty(), "a problem has no title");
}

void check_response(const Response& r)
{
    // What proto/openapi.yaml gives the routes (never 500). Beyond the usual: 403 is the QMP
    // policy's Forbidden, 412 a stale If-Match, 426 the console asked for without the upgrade.
    static constexpr std::array<int, 17> documented{200, 201, 204, 400, 401, 403, 404, 405, 409,
                                                    412, 413, 415, 422, 426, 429, 503, 504};
    const bool upgraded = r.status == 101 && r.stream; // the console's WebSocket
    if (!upgraded &&
        std::find(documented.begin(), documented.end(), r.status) == documented.end()) {
        std::fprintf(stderr, "rest_fuzz: status %d: %.1000s\n", r.status, r.body.c_str());
        std::abort();
    }
    if (r.status >= 400) {
        check_problem(r);
    }
    if (r.status == 405) {
        const std::string* allow = header(r, "Allow");
        check(allow != nullptr && !allow->empty(), "405 without Allow");
    }
    if (is_json(r.content_type)) {
        check(qm::json::parse(r.body).has_value(), "a JSON body does not parse");
    }
}

// The route handle() takes for `r`: it accepts the absolute form first (RFC 9112 3.2.2), the same
// steps here; nullopt for no route.
std::optional<Route> route_of(const Request& r)
{
    std::string target = r.target;
    if (target.starts_with("http://") || target.starts_with("https://")) {
        const std::size_t authority = target.find("//") + 2;
        const std::size_t path = target.find_first_of("/?", authority);
        target = path == std::string::npos ? "/" : target.substr(path);
        if (target.front() == '?') {
            target.insert(0, "/");
        }
    }
    auto matched = qm::rest::match_route(r.method, target);
    if (const auto* m = std::get_if<qm::rest::RouteMatch>(&matched)) {
        return m->route;
    }
    return std::nullopt;
}

struct Pending
{
    bool done = false;
    std::exception_ptr error;
    Response response;
};

// Hands `request` to the Api; whether it was answered in time (a wait may still be pending, in
// `pending`, which the caller keeps until the Supervisor is gone).
bool handle(Fixture& fx, qm::rest::Api& api, Request request,
            const std::shared_ptr<Pending>& pending)
{
    qm::asio::co_spawn(fx.ioc, api.handle(std::move(request)),
                       [pending](const std::exception_ptr& e, Response r) {
                           pending->done = true;
                           pending->error = e;
                           pending->response = std::move(r);
                       });
    return fx.run_until([&] { return pending->done; }, answer_deadline);
}

// QM_FUZZ_TRACE=1: each request and its answer on stderr (to see what the seeds reach).
bool trace()
{
    static const bool on = std::getenv("QM_FUZZ_TRACE") != nullptr;
    return on;
}

void check_answered(const Pending& p)
{
    if (p.error) {
        try {
            std::rethrow_exception(p.error);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "rest_fuzz: a handler threw (the session answers 500): %s\n",
                         e.what());
        } catch (...) {
            std::fprintf(stderr, "rest_fuzz: a handler threw (the session answers 500)\n");
        }
        std::abort();
    }
    if (trace()) {
        std::fprintf(stderr, "  -> %d %s %.300s\n", p.response.status,
                     p.response.stream ? "(stream)" : "", p.response.body.c_str());
    }
    check_response(p.response);
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    Fixture& fx = Fixture::instance();
    auto sup = fx.open();
    auto api = std::make_unique<qm::rest::Api>(*sup, qm::rest::ApiOptions{"0.0.0-fuzz"});
    const qm::daemon::Caller caller = qm::daemon::unix_caller(::getuid(), ::getpid());
    // The daemon's limits as it starts without a configuration file (main.cpp: the header limit
    // of ServerOptions, the body limit of Config's rest-max-body).
    static const qm::rest::RequestLimits limits{qm::rest::ServerOptions{}.max_header,
                                                qm::daemon::Config{}.rest_max_body};

    InputStream stream(std::string_view(reinterpret_cast<const char*>(data), size));
    qm::rest::beast::flat_buffer buffer;
    std::shared_ptr<Pending> waiting;
    for (int i = 0; i < max_requests && !waiting; ++i) {
        // The session's steps for one request on the unix socket (no token), as in server.cpp.
        qm::rest::RequestParser parser;
        qm::rest::limit_parser(parser, limits, false);
        qm::error_code ec;
        qm::rest::http::read_header(stream, buffer, parser, ec);
        if (!ec) {
            ec = qm::rest::check_header(parser);
        }
        if (!ec) {
            ec = qm::rest::admit_body(parser, limits);
        }
        if (!ec && !parser.is_done()) {
            qm::rest::http::read(stream, buffer, parser, ec);
        }
        if (ec) {
            if (auto problem = qm::rest::read_problem(ec, limits)) {
                const Response r = qm::rest::problem_response(*problem);
                check(r.status == 400 || r.status == 413 || r.status == 431,
                      "a request that cannot be read is not answered 400, 413 or 431");
                check_problem(r);
                if (trace()) {
                    std::fprintf(stderr, "  -> %d before the Api: %s\n", r.status, r.body.c_str());
                }
            }
            break;
        }
        auto& msg = parser.get();
        const bool keep_alive = msg.keep_alive();
        Request request = qm::rest::to_request(msg, caller);
        const auto route = route_of(request);
        if (trace()) {
            std::fprintf(stderr, "%s %.200s\n", request.method.c_str(), request.target.c_str());
        }
        if (route == Route::start || route == Route::restart) {
            // Would start QEMU: not here.
        } else {
            auto pending = std::make_shared<Pending>();
            if (handle(fx, *api, std::move(request), pending)) {
                check_answered(*pending);
            } else {
                check(route == Route::events_wait || route == Route::console_wait,
                      "a request other than a wait was not answered in 50 ms");
                // The session waits with it: nothing after it on this connection is read.
                waiting = pending;
            }
        }
        if (!keep_alive) {
            break;
        }
    }
    check(!qm::asio::has_service<qm::proc::ChildWatcher>(fx.ioc), "a process was started");

    fx.finish(std::move(sup));
    if (waiting) {
        // The Supervisor's end completed the wait (the event stream closed).
        check(fx.run_until([&] { return waiting->done; }, 1s), "a wait outlived the supervisor");
        check_answered(*waiting);
    }
    api.reset();
    return 0;
}
