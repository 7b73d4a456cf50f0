// SPDX-License-Identifier: GPL-2.0-or-later
// The one translation unit that compiles Boost.Asio (BOOST_ASIO_SEPARATE_COMPILATION, trap 7).
#include "libmachine/asio.hpp"

#include <boost/asio/impl/src.hpp>
