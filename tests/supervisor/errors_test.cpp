// SPDX-License-Identifier: GPL-2.0-or-later
// Tests of daemon/supervisor/errors: every qm::errc has one row, in the C++ table and in
// proto/errors.json, the two agree, names are unique valid D-Bus error names, and proto/errors.md
// documents each one.
#include "daemon/supervisor/errors.hpp"

#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <boost/system/error_code.hpp>
#include <gtest/gtest.h>

#include "libmachine/json.hpp"

namespace qm::daemon {
namespace {

std::string read_file(const std::string& path)
{
    std::ifstream f(path, std::ios::binary);
    std::ostringstream s;
    s << f.rdbuf();
    return s.str();
}

std::vector<errc> all_errcs()
{
    std::vector<errc> out;
    for (int e = static_cast<int>(errc_first); e <= static_cast<int>(errc_last); ++e) {
        out.push_back(static_cast<errc>(e));
    }
    return out;
}

// A D-Bus error name follows the interface name rules (D-Bus specification, "Valid Names"): at
// most 255 bytes, two or more elements separated by '.', each [A-Za-z_][A-Za-z0-9_]*.
bool valid_dbus_error_name(std::string_view name)
{
    if (name.empty() || name.size() > 255) {
        return false;
    }
    int elements = 0;
    std::size_t start = 0;
    while (true) {
        const std::size_t end = std::min(name.find('.', start), name.size());
        const std::string_view element = name.substr(start, end - start);
        if (element.empty() || (element[0] >= '0' && element[0] <= '9')) {
            return false;
        }
        for (char c : element) {
            const bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                            (c >= '0' && c <= '9') || c == '_';
            if (!ok) {
                return false;
            }
        }
        ++elements;
        if (end == name.size()) {
            break;
        }
        start = end + 1;
    }
    return elements >= 2;
}

// The rows of proto/errors.json by errc name.
class ErrorsJson : public ::testing::Test
{
protected:
    void SetUp() override
    {
        auto doc = json::parse(read_file(QM_SOURCE_DIR "/proto/errors.json"));
        ASSERT_TRUE(doc.has_value()) << doc.error().message;
        doc_ = std::move(*doc);
        ASSERT_TRUE(doc_.IsObject());
        ASSERT_TRUE(doc_.HasMember("errors"));
        ASSERT_TRUE(doc_["errors"].IsArray());
    }

    const json::Value& rows() const { return doc_["errors"]; }

    json::Document doc_;
};

TEST(ErrorTable, OneRowPerErrcInOrder)
{
    const auto table = error_table();
    const auto errcs = all_errcs();
    ASSERT_EQ(table.size(), errcs.size());
    for (std::size_t i = 0; i < errcs.size(); ++i) {
        SCOPED_TRACE(to_string(errcs[i]));
        EXPECT_EQ(table[i].code, errcs[i]);
        EXPECT_EQ(&error_info(errcs[i]), &table[i]);
    }
}

TEST(ErrorTable, RowsAreWellFormed)
{
    std::set<std::string_view> names;
    std::set<std::string_view> dbus_names;
    std::set<std::string_view> types;
    for (const auto& row : error_table()) {
        SCOPED_TRACE(row.name);
        EXPECT_TRUE(names.insert(row.name).second) << "duplicate name";
        EXPECT_TRUE(dbus_names.insert(row.dbus_name).second) << "duplicate D-Bus name";
        EXPECT_TRUE(types.insert(row.problem_type).second) << "duplicate problem type";
        EXPECT_TRUE(valid_dbus_error_name(row.dbus_name));
        EXPECT_EQ(row.dbus_name, "org.qmachined1.Error." + std::string(row.name));
        EXPECT_EQ(row.problem_type, "urn:qmachined:error:" + std::string(row.name));
        EXPECT_GE(row.http_status, 400);
        EXPECT_LE(row.http_status, 599);
        EXPECT_FALSE(row.title.empty());
        ASSERT_FALSE(row.name.empty());
        EXPECT_TRUE(row.name[0] >= 'A' && row.name[0] <= 'Z');
    }
}

TEST(ErrorTable, TheIssuesMapping)
{
    const std::map<errc, std::pair<int, std::string_view>> expected{
        {errc::invalid_argument, {400, "InvalidArgument"}},
        {errc::invalid_state, {409, "StateConflict"}},
        {errc::timeout, {504, "Timeout"}},
        {errc::qmp_protocol, {502, "QmpProtocol"}},
        {errc::qmp_message_too_large, {502, "QmpMessageTooLarge"}},
        {errc::qmp_command_failed, {422, "QmpError"}},
        {errc::qmp_disconnected, {503, "QmpDisconnected"}},
        {errc::qmp_closed, {503, "QmpClosed"}},
        {errc::connect_failed, {502, "ConnectFailed"}},
        {errc::system_error, {500, "SystemError"}},
        {errc::spawn_failed, {502, "SpawnFailed"}},
        {errc::abnormal_shutdown, {500, "AbnormalShutdown"}},
        {errc::no_such_machine, {404, "NoSuchMachine"}},
        {errc::exists, {409, "Exists"}},
        {errc::launch_failed, {502, "LaunchFailed"}},
        {errc::unresponsive, {503, "Unresponsive"}},
        {errc::shutting_down, {503, "ShuttingDown"}},
        {errc::limit_exceeded, {429, "LimitExceeded"}},
        {errc::access_denied, {403, "AccessDenied"}},
        // If-Match failed: 412 Precondition Failed (RFC 9110 13.1.1), not a plain conflict.
        {errc::stale_generation, {412, "StaleGeneration"}},
        {errc::internal, {500, "Internal"}},
        // The policy refuses whoever asks: 403 Forbidden (RFC 9110 15.5.4).
        {errc::forbidden, {403, "Forbidden"}},
    };
    ASSERT_EQ(expected.size(), all_errcs().size());
    for (const auto& [code, want] : expected) {
        SCOPED_TRACE(to_string(code));
        EXPECT_EQ(error_info(code).http_status, want.first);
        EXPECT_EQ(error_info(code).name, want.second);
    }
    EXPECT_EQ(error_info(errc::no_such_machine).title, "No such machine");
}

TEST(ErrorTable, UnknownCodesGetTheInternalRow)
{
    const ErrorInfo& internal = error_info(errc::internal);
    EXPECT_EQ(internal.name, "Internal");
    EXPECT_EQ(internal.http_status, 500);
    EXPECT_EQ(&error_info(static_cast<errc>(0)), &internal);
    EXPECT_EQ(&error_info(static_cast<errc>(static_cast<int>(errc_last) + 1)), &internal);
    EXPECT_EQ(&error_info(static_cast<errc>(-1)), &internal);
    EXPECT_EQ(&error_info(static_cast<errc>(1000000)), &internal);

    // Errors of another category are not the qmachined codes with the same number.
    Error foreign{
        boost::system::errc::make_error_code(boost::system::errc::no_such_file_or_directory),
        "x",
        {},
        {}};
    EXPECT_EQ(&error_info(foreign), &internal);
    Error none{};
    EXPECT_EQ(&error_info(none), &internal);
    Error ours{make_error_code(errc::no_such_machine), "no machine named 'web'", {}, {}};
    EXPECT_EQ(error_info(ours).name, "NoSuchMachine");
}

TEST_F(ErrorsJson, OneRowPerErrc)
{
    std::map<std::string, int> rows_per_errc;
    for (const auto& row : rows().GetArray()) {
        auto name = json::get_string(row, "errc");
        ASSERT_TRUE(name.has_value()) << json::to_string(row);
        ++rows_per_errc[std::string(*name)];
    }
    for (errc e : all_errcs()) {
        SCOPED_TRACE(to_string(e));
        EXPECT_EQ(rows_per_errc[to_string(e)], 1);
        rows_per_errc.erase(to_string(e));
    }
    for (const auto& [name, count] : rows_per_errc) {
        ADD_FAILURE() << "proto/errors.json has a row for '" << name << "', which is no qm::errc";
    }
}

TEST_F(ErrorsJson, AgreesWithTheCppTable)
{
    const std::set<std::string> fields{"errc", "name", "http_status", "title",
                                       "type", "dbus", "description"};
    for (const auto& row : rows().GetArray()) {
        SCOPED_TRACE(json::to_string(row));
        ASSERT_TRUE(row.IsObject());
        for (const auto& m : row.GetObject()) {
            EXPECT_TRUE(fields.count(m.name.GetString()) == 1)
                << "unexpected field " << m.name.GetString();
        }
        const auto errc_name = json::get_string(row, "errc");
        ASSERT_TRUE(errc_name.has_value());
        const ErrorInfo* info = nullptr;
        for (const auto& r : error_table()) {
            if (to_string(r.code) == *errc_name) {
                info = &r;
            }
        }
        ASSERT_NE(info, nullptr);
        EXPECT_EQ(json::get_string(row, "name"), info->name);
        EXPECT_EQ(json::get_int(row, "http_status"), info->http_status);
        EXPECT_EQ(json::get_string(row, "title"), info->title);
        EXPECT_EQ(json::get_string(row, "type"), info->problem_type);
        EXPECT_EQ(json::get_string(row, "dbus"), info->dbus_name);
        const auto description = json::get_string(row, "description");
        ASSERT_TRUE(description.has_value());
        EXPECT_GT(description->size(), 10U);
    }
}

TEST_F(ErrorsJson, RowsFollowErrcOrder)
{
    const auto errcs = all_errcs();
    ASSERT_EQ(rows().Size(), errcs.size());
    for (rapidjson::SizeType i = 0; i < rows().Size(); ++i) {
        EXPECT_EQ(json::get_string(rows()[i], "errc"), to_string(errcs[i]));
    }
}

TEST(ErrorsMarkdown, DocumentsEveryName)
{
    const std::string md = read_file(QM_SOURCE_DIR "/proto/errors.md");
    ASSERT_FALSE(md.empty());
    EXPECT_NE(md.find("errors.json"), std::string::npos);
    EXPECT_NE(md.find("RFC 9457"), std::string::npos);
    for (const auto& row : error_table()) {
        SCOPED_TRACE(row.name);
        // A row of the table: "| `Name` | 404 | `org.qmachined1.Error.Name` |".
        const std::string line = "| `" + std::string(row.name) + "` | " +
                                 std::to_string(row.http_status) + " | `" +
                                 std::string(row.dbus_name) + "` |";
        EXPECT_NE(md.find(line), std::string::npos) << line;
    }
}

TEST(DbusNames, Validity)
{
    EXPECT_TRUE(valid_dbus_error_name("org.qmachined1.Error.NoSuchMachine"));
    EXPECT_TRUE(valid_dbus_error_name("a._b"));
    EXPECT_FALSE(valid_dbus_error_name("NoSuchMachine"));
    EXPECT_FALSE(valid_dbus_error_name("org..Error"));
    EXPECT_FALSE(valid_dbus_error_name(".org.Error"));
    EXPECT_FALSE(valid_dbus_error_name("org.Error."));
    EXPECT_FALSE(valid_dbus_error_name("org.1Error"));
    EXPECT_FALSE(valid_dbus_error_name("org.Error-X"));
    EXPECT_FALSE(valid_dbus_error_name("org." + std::string(300, 'a')));
}

} // namespace
} // namespace qm::daemon
