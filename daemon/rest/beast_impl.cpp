// SPDX-License-Identifier: GPL-2.0-or-later
// The one translation unit that compiles Boost.Beast (BOOST_BEAST_SEPARATE_COMPILATION, trap 7).
#include "daemon/rest/beast.hpp"

#include <boost/beast/src.hpp>
