#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""A stand-in for qemu-system-x86_64 that misbehaves on its monitor, for the fault suite.

qmachined starts it as a machine's `binary` with QEMU's command line; it finds the launch monitor
(`-chardev socket,id=mon-launch,fd=N`, the connected socket the daemon talks QMP over), greets
and negotiates like QEMU 7.2, answers query-status, quit (then exits) and system_powerdown, and
otherwise does what its mode says. The mode is the `-fake-mode MODE` pair in the spec's args
(QEMU would refuse it; this stand-in is the only reader):

  hang      after negotiation, reads commands and never answers any (a wedged monitor); quit is
            not answered either: only a signal ends it
  flood     after negotiation, writes events as fast as the socket takes them (STOP/RESUME-free
            BLOCK_IO_ERROR events, each ~150 bytes), still answering commands between batches;
            `-fake-rate N` limits it to N events per second
  hugeline  after negotiation, writes one line of `-fake-bytes N` bytes (default 1 GiB) with no
            newline until the end, then a newline; answers nothing meanwhile
  normal    answers every command with {}
"""
import json
import os
import select
import socket
import sys
import time

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": ["oob"]}}


def arg_value(argv, name, default=None):
    for i, a in enumerate(argv[:-1]):
        if a == name:
            return argv[i + 1]
    return default


def monitor_fd(argv):
    for i, a in enumerate(argv[:-1]):
        if a == "-chardev" and argv[i + 1].startswith("socket,id=mon-launch,"):
            for part in argv[i + 1].split(","):
                if part.startswith("fd="):
                    return int(part[3:])
    sys.exit("fake_qemu: no -chardev socket,id=mon-launch,fd=N")


def now_ts():
    t = time.time()
    return {"seconds": int(t), "microseconds": int((t % 1) * 1e6)}


def send(sock, obj):
    sock.sendall((json.dumps(obj) + "\r\n").encode())


class Monitor:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def commands(self, timeout):
        """The complete commands that arrived within `timeout` (None: block until one)."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return []
        data = self.sock.recv(65536)
        if not data:
            sys.exit(0)  # the daemon hung up
        self.buf += data
        out = []
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                out.append(json.loads(line))
        return out

    def answer(self, cmd):
        name = cmd.get("execute") or cmd.get("exec-oob")
        reply = {"return": {}}
        if name == "query-status":
            reply = {"return": {"status": "running", "singlestep": False, "running": True}}
        if "id" in cmd:
            reply["id"] = cmd["id"]
        send(self.sock, reply)
        if name in ("quit", "system_powerdown"):
            send(self.sock, {"event": "SHUTDOWN", "timestamp": now_ts(),
                             "data": {"guest": name == "system_powerdown",
                                      "reason": "guest-shutdown" if name == "system_powerdown"
                                      else "host-qmp-quit"}})
            self.sock.close()
            sys.exit(0)


def main():
    argv = sys.argv[1:]
    mode = arg_value(argv, "-fake-mode", "normal")
    sock = socket.socket(fileno=monitor_fd(argv))
    sock.setblocking(True)
    mon = Monitor(sock)
    send(sock, GREETING)
    negotiated = False
    while not negotiated:
        for cmd in mon.commands(None):
            mon.answer(cmd)
            negotiated = negotiated or cmd.get("execute") == "qmp_capabilities"
    # The daemon asks query-status once QMP is up: answer it in every mode, then misbehave.
    if mode != "normal":
        deadline = time.monotonic() + 5
        asked = False
        while not asked and time.monotonic() < deadline:
            for cmd in mon.commands(0.1):
                mon.answer(cmd)
                asked = asked or cmd.get("execute") == "query-status"
    if mode == "hang":
        while True:
            mon.commands(None)  # read, never answer
    elif mode == "flood":
        rate = float(arg_value(argv, "-fake-rate", "0"))
        event = (json.dumps({"event": "BLOCK_IO_ERROR", "timestamp": now_ts(),
                             "data": {"device": "d0", "node-name": "n0", "operation": "write",
                                      "action": "report", "nospace": False,
                                      "reason": "flood"}}) + "\r\n").encode()
        batch = 100
        chunk = event * batch
        sent = 0
        start = time.monotonic()
        while True:
            for cmd in mon.commands(0):
                mon.answer(cmd)
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(min(ahead, 0.05))
                    continue
            sock.sendall(chunk)
            sent += batch
    elif mode == "hugeline":
        size = int(arg_value(argv, "-fake-bytes", str(1 << 30)))
        block = b"x" * (1 << 20)
        try:
            sock.sendall(b'{"event": "X", "data": {"s": "')
            left = size
            while left > 0:
                n = min(left, len(block))
                sock.sendall(block[:n])
                left -= n
            sock.sendall(b'"}}\r\n')
        except OSError:
            pass  # the daemon hung up on the line: what it should do
        # A QEMU whose monitor was hung up on lives on: only a signal ends it.
        while True:
            time.sleep(3600)
    else:
        while True:
            for cmd in mon.commands(None):
                mon.answer(cmd)


if __name__ == "__main__":
    main()
