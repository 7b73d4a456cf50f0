// SPDX-License-Identifier: GPL-2.0-or-later
// Tests of libmachine/json: bounded parsing, compact serialisation, typed lookups, quoting.
#include "libmachine/json.hpp"

#include <cstdint>
#include <string>

#include <gtest/gtest.h>

namespace qm::json {
namespace {

TEST(Json, ParsesAndSerialisesCompactly)
{
    auto doc = parse(R"( { "a" : [1, 2.5, "x"], "b": {"c": null, "d": true} } )");
    ASSERT_TRUE(doc.has_value()) << doc.error().message;
    EXPECT_EQ(to_string(*doc), R"({"a":[1,2.5,"x"],"b":{"c":null,"d":true}})");
}

TEST(Json, RejectsTrailingTextAndGarbage)
{
    for (const char* bad : {"", "{", "{} {}", "{}x", "[1,]", "{'a': 1}", "nul"}) {
        SCOPED_TRACE(bad);
        auto doc = parse(bad);
        ASSERT_FALSE(doc.has_value());
        EXPECT_TRUE(doc.error().is(errc::invalid_argument));
        EXPECT_FALSE(doc.error().message.empty());
    }
}

TEST(Json, NestingUpToMaxDepthIsAccepted)
{
    const std::string arrays = std::string(max_depth, '[') + std::string(max_depth, ']');
    EXPECT_TRUE(parse(arrays).has_value());
    std::string objects;
    for (int i = 0; i < max_depth; ++i) {
        objects += R"({"a":)";
    }
    objects += "1" + std::string(max_depth, '}');
    EXPECT_TRUE(parse(objects).has_value());
}

TEST(Json, NestingPastMaxDepthIsRejected)
{
    const std::string arrays = std::string(max_depth + 1, '[') + std::string(max_depth + 1, ']');
    auto doc = parse(arrays);
    ASSERT_FALSE(doc.has_value());
    EXPECT_TRUE(doc.error().is(errc::invalid_argument));
    // Hostile depth: rejected, not a stack overflow.
    EXPECT_FALSE(parse(std::string(1000000, '[')).has_value());
}

TEST(Json, BracketsInsideStringsDoNotCountAsNesting)
{
    const std::string text =
        "[\"" + std::string(1000, '[') + "\\\"" + std::string(1000, '{') + "\"]";
    auto doc = parse(text);
    ASSERT_TRUE(doc.has_value()) << doc.error().message;
    ASSERT_TRUE(doc->IsArray());
    EXPECT_EQ((*doc)[0].GetStringLength(), 2001U);
}

TEST(Json, FullPrecisionIntegers)
{
    auto doc = parse(R"({"u": 18446744073709551615, "i": -9223372036854775808})");
    ASSERT_TRUE(doc.has_value());
    EXPECT_EQ((*doc)["u"].GetUint64(), 18446744073709551615ULL);
    EXPECT_EQ(get_int(*doc, "i"), INT64_MIN);
    EXPECT_FALSE(get_int(*doc, "u").has_value()) << "does not fit an int64";
}

TEST(Json, ExponentsOfZeroAreZero)
{
    // RapidJSON 1.1 with kParseFullPrecisionFlag read these as 1.3e33 and 3.2e32.
    for (const char* text : {"0e52", "0.0e52", "-0e300"}) {
        auto d = parse(text);
        ASSERT_TRUE(d) << text;
        ASSERT_TRUE(d->IsNumber()) << text;
        EXPECT_EQ(d->GetDouble(), 0.0) << text;
    }
}

TEST(Json, TypedLookups)
{
    auto doc = parse(R"({"s": "text", "n": 42, "f": 1.5, "o": {}})");
    ASSERT_TRUE(doc.has_value());
    EXPECT_EQ(get_string(*doc, "s"), "text");
    EXPECT_FALSE(get_string(*doc, "n").has_value());
    EXPECT_EQ(get_int(*doc, "n"), 42);
    EXPECT_FALSE(get_int(*doc, "f").has_value());
    EXPECT_FALSE(get_int(*doc, "s").has_value());
    EXPECT_FALSE(get_int(*doc, "missing").has_value());
    EXPECT_NE(find(*doc, "o"), nullptr);
    EXPECT_EQ(find(*doc, "missing"), nullptr);

    auto arr = parse("[1]");
    ASSERT_TRUE(arr.has_value());
    EXPECT_EQ(find(*arr, "s"), nullptr) << "not an object";
    EXPECT_FALSE(get_string(*arr, "s").has_value());
}

TEST(Json, LookupKeysAreNotNulTerminatedStrings)
{
    auto doc = parse(R"({"ab": 1, "a": 2})");
    ASSERT_TRUE(doc.has_value());
    const std::string key = "abc";
    EXPECT_EQ(get_int(*doc, std::string_view(key).substr(0, 1)), 2);
    EXPECT_EQ(get_int(*doc, std::string_view(key).substr(0, 2)), 1);
}

TEST(Json, QuoteEscapes)
{
    EXPECT_EQ(quote("plain"), R"("plain")");
    EXPECT_EQ(quote("a\"b\\c\n\t"), R"("a\"b\\c\n\t")");
    EXPECT_EQ(quote(std::string_view("nul\0x", 5)), R"("nul\u0000x")");
    auto round = parse(quote("ünï\"cödé\x01"));
    ASSERT_TRUE(round.has_value());
    EXPECT_EQ(std::string(round->GetString(), round->GetStringLength()), "ünï\"cödé\x01");
}

} // namespace
} // namespace qm::json
