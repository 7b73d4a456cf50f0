// SPDX-License-Identifier: GPL-2.0-or-later
// qmachined: placeholder main (being written).
int main() { return 0; }
