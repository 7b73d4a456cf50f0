// SPDX-License-Identifier: GPL-2.0-or-later
// qm::expected<T>: the subset of C++23 std::expected that libmachine needs, with the same names, so
// that moving to std::expected later is a rename. Failure carries a qm::Error.
#pragma once

#include <cassert>
#include <type_traits>
#include <utility>
#include <variant>

#include "libmachine/error.hpp"

namespace qm {

template <typename E>
class unexpected // NOLINT(readability-identifier-naming): std::unexpected's name
{
public:
    explicit unexpected(E e) : error_(std::move(e)) {}
    E& error() & { return error_; }
    E&& error() && { return std::move(error_); }
    const E& error() const& { return error_; }

private:
    E error_;
};

template <typename T>
class [[nodiscard]] expected // NOLINT(readability-identifier-naming): std::expected's name
{
public:
    using value_type = T;

    expected() requires std::is_default_constructible_v<T> : v_(std::in_place_index<0>) {}
    expected(T value) : v_(std::in_place_index<0>, std::move(value)) {} // NOLINT(google-explicit-constructor)
    expected(unexpected<Error> e) : v_(std::in_place_index<1>, std::move(e).error()) {} // NOLINT

    bool has_value() const noexcept { return v_.index() == 0; }
    explicit operator bool() const noexcept { return has_value(); }

    T& value() &
    {
        assert(has_value());
        return std::get<0>(v_);
    }
    const T& value() const&
    {
        assert(has_value());
        return std::get<0>(v_);
    }
    T&& value() &&
    {
        assert(has_value());
        return std::get<0>(std::move(v_));
    }
    T& operator*() & { return value(); }
    const T& operator*() const& { return value(); }
    T&& operator*() && { return std::move(*this).value(); }
    T* operator->() { return &value(); }
    const T* operator->() const { return &value(); }

    const Error& error() const&
    {
        assert(!has_value());
        return std::get<1>(v_);
    }
    Error&& error() &&
    {
        assert(!has_value());
        return std::get<1>(std::move(v_));
    }

private:
    std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] expected<void>
{
public:
    using value_type = void;

    expected() = default;
    expected(unexpected<Error> e) : error_(std::move(e).error()), ok_(false) {} // NOLINT

    bool has_value() const noexcept { return ok_; }
    explicit operator bool() const noexcept { return ok_; }
    void value() const { assert(ok_); }

    const Error& error() const&
    {
        assert(!ok_);
        return error_;
    }
    Error&& error() &&
    {
        assert(!ok_);
        return std::move(error_);
    }

private:
    Error error_;
    bool ok_ = true;
};

// Shorthand for `return qm::fail(errc::timeout, "...")` in functions returning expected<T>.
inline unexpected<Error> fail(errc code, std::string message)
{
    return unexpected<Error>(Error{make_error_code(code), std::move(message), {}, {}});
}
inline unexpected<Error> fail(Error e)
{
    return unexpected<Error>(std::move(e));
}

} // namespace qm
