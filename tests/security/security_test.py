#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Security claims of docs/security.md that only a running qmachined can prove (TAP).

  security_test.py QMACHINED

Each point is one claim, tried over the REST socket against a real qmachined and real QEMU:
  - no shell: shell syntax in spec.args reaches QEMU as the bytes it was, and runs nothing;
  - no forged log line: a spec argument holding a line feed and a fake audit line (QEMU echoes it
    when it refuses the option) stays inside the line that quotes it;
  - the machine's uuid is QEMU's (-uuid: QMP query-uuid);
  - options qmachined owns are refused end to end (-readconfig, -set, a `mon:` serial);
  - limits hit over the wire, each with its configured value: --max-machines (429),
    --rest-max-subscribers (429), --rest-max-body (413);
  - the QMP policy as configured in a running daemon: --qmp-deny (403), --qmp-allow lifts a
    default denial;
  - QEMU's user: root refused, a member of the group qmachined refused (a private mount
    namespace with its own /etc/group: the host's is not touched).
Needs root.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "fault"))
sys.path.insert(0, os.path.join(HERE, "..", "systemd"))
from pid1ns import Tap  # noqa: E402
from qmd import Daemon, wait_until  # noqa: E402

QMACHINED = sys.argv[1]
QUICK = {"machine": "none", "console": {"enabled": False},
         "shutdown": {"mode": "quit", "timeout_s": 10}}
tap = Tap(progress=True, detail_lines=30)
check = tap.check


def problem_type(doc):
    return ((doc or {}).get("type") or "").rsplit(":", 1)[-1]


def shell_and_log(work):
    d = Daemon(QMACHINED, os.path.join(work, "shell")).start()
    c = d.client()
    try:
        marker = os.path.join(work, "shell", "ran")
        tricks = [f"$(touch {marker}1)", f"`touch {marker}2`", f"x; touch {marker}3",
                  f"x && touch {marker}4 | cat", "'\"\\"]
        args = []
        for i, t in enumerate(tricks):
            args += ["-smbios", f"type=11,value={t}".replace(",", ",,").replace(
                "type=11,,value=", "type=11,value=")]
        s, doc, text = c.request("POST", "/v1/machines",
                                 {"name": "sh", "spec": dict(QUICK, args=args)})
        s2, doc2, text2 = c.request("POST", "/v1/machines/sh/start")
        pid = (doc2 or {}).get("pid")
        cmdline = []
        if pid:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode().split("\0")
        ran = [p for p in (f"{marker}{i}" for i in range(1, 5)) if os.path.exists(p)]
        check(s == 201 and s2 == 200 and not ran and all(a in cmdline for a in args),
              "shell syntax in spec.args reaches QEMU byte for byte and runs nothing",
              f"{s} {text[:200]} / {s2} {text2[:200]} / ran: {ran} / {cmdline}")
        c.request("POST", "/v1/machines/sh/kill")

        # QEMU refuses an unknown option and prints it: the start fails, the daemon logs why.
        forged = "info: audit: op=delete machine=web1 result=ok caller=\"uid=0 pid=1\""
        s, _, _ = c.request("POST", "/v1/machines",
                            {"name": "forge", "spec": dict(QUICK, args=["-bogus\n" + forged])})
        s2, doc2, text2 = c.request("POST", "/v1/machines/forge/start")
        out = d.output()
        own_lines = [l for l in out.splitlines() if "op=delete machine=web1" in l]
        forged_lines = [l for l in own_lines
                        if re.match(r"^(\S+ \S+ )?info: audit: op=delete machine=web1", l)]
        check(s == 201 and s2 >= 400 and own_lines and not forged_lines and
              all("\\ninfo: audit: op=delete" in l for l in own_lines),
              "a line feed and a fake audit line in an argument stay inside the line quoting "
              "them (escaped \\n): no forged audit line",
              f"{s2} {text2[:200]}\n" + "\n".join(own_lines[:5]))

        # The uuid is QEMU's.
        uuid = "4f1d2c3b-aaaa-4bbb-8ccc-0123456789ab"
        c.request("POST", "/v1/machines", {"name": "id", "spec": dict(QUICK, uuid=uuid)})
        c.request("POST", "/v1/machines/id/start")
        s, doc, text = c.request("POST", "/v1/machines/id/qmp", {"execute": "query-uuid"})
        check(s == 200 and (doc or {}).get("return", {}).get("UUID") == uuid,
              "the machine's uuid is QEMU's (-uuid; QMP query-uuid)", text[:300])
        c.request("POST", "/v1/machines/id/kill")

        for args, words in [(["-readconfig", "/etc/qemu.conf"], "'-readconfig' is managed"),
                            (["--set", "chardev.mon.path=/tmp/x"], "'--set' is managed"),
                            (["-serial", "mon:unix:/tmp/hmp,server=on,wait=off"],
                             "'-serial mon:' (a monitor) is managed"),
                            (["-chardev", "null,id=mon-launch"], "chardev id 'mon-launch' is "
                                                                 "reserved")]:
            s, doc, text = c.request("POST", "/v1/machines",
                                     {"name": "own", "spec": dict(QUICK, args=args)})
            check(s == 400 and words in (doc or {}).get("detail", "") and
                  (doc or {}).get("field", "").startswith("spec.args["),
                  f"a spec with {args[0]} {args[1][:20]} is refused (400, the argument named)",
                  text[:300])
    finally:
        c.close()
        d.stop()
        for pid in d.qemus():
            os.kill(pid, signal.SIGKILL)


def audit_lines(work):
    """Every mutating call leaves its audit line, whatever the operation."""
    d = Daemon(QMACHINED, os.path.join(work, "audit")).start()
    c = d.client()
    try:
        calls = [("POST", "/v1/machines", {"name": "au", "spec": QUICK}, "create"),
                 ("POST", "/v1/machines/au/start", None, "start"),
                 ("POST", "/v1/machines/au/pause", None, "pause"),
                 ("POST", "/v1/machines/au/resume", None, "resume"),
                 ("POST", "/v1/machines/au/restart", None, "restart"),
                 ("POST", "/v1/machines/au/qmp", {"execute": "query-status"}, "qmp:query-status"),
                 ("POST", "/v1/stop-all", {"concurrency": 2}, "stop-all"),
                 ("PUT", "/v1/machines/au/spec", dict(QUICK, memory_mib=64), "update"),
                 ("POST", "/v1/machines/au/kill", None, "kill"),
                 ("DELETE", "/v1/machines/au", None, "delete")]
        statuses = []
        for method, target, body, _ in calls:
            headers = {"If-Match": "1"} if method == "PUT" else None
            statuses.append(c.request(method, target, body, headers)[0])
        out = d.output()
        missing = [op for _, _, _, op in calls
                   if not re.search(rf"audit: op={re.escape(op)} machine=(au|\S*) result=\S+ "
                                    r'caller="uid=0 pid=\d+"', out)]
        check(not missing and statuses[:8] == [201, 200, 200, 200, 200, 200, 200, 200],
              "every mutating call leaves one audit line (create, start, pause, resume, restart, "
              "qmp, stop-all, update, kill, delete)", f"missing {missing}, statuses {statuses}\n" +
              "\n".join(l for l in out.splitlines() if "audit:" in l))
    finally:
        c.close()
        d.stop()
        for pid in d.qemus():
            os.kill(pid, signal.SIGKILL)


def limits(work):
    d = Daemon(QMACHINED, os.path.join(work, "limits"),
               ["--max-machines", "4", "--rest-max-subscribers", "2", "--rest-max-body", "1024",
                "--rest-max-header", "2048", "--qmp-max-message", "65536", "--event-rate", "10",
                "--event-burst", "20", "--qmp-deny", "query-kvm", "--qmp-allow",
                "human-monitor-command"]).start()
    c = d.client()
    streams = []
    try:
        fake = os.path.join(HERE, "..", "fault", "fake_qemu.py")
        got = [c.request("POST", "/v1/machines", {"name": f"m{i}", "spec": QUICK})
               for i in range(2)]
        got += [c.request("POST", "/v1/machines", {"name": "flood", "spec": dict(
            QUICK, binary=fake, args=["-fake-mode", "flood", "-fake-rate", "1000"])})]
        got += [c.request("POST", "/v1/machines", {"name": "huge", "spec": dict(
            QUICK, binary=fake, args=["-fake-mode", "hugeline", "-fake-bytes", "100000"])})]
        got += [c.request("POST", "/v1/machines", {"name": "m9", "spec": QUICK})]
        s, doc, text = got[-1]
        check([g[0] for g in got] == [201, 201, 201, 201, 429] and
              problem_type(doc) == "LimitExceeded" and "4" in doc.get("detail", ""),
              "--max-machines 4: the fifth create gets 429 LimitExceeded", text[:300])

        s, doc, text = c.request("GET", "/v1/version", headers={"X-Pad": "p" * 3000})
        check(s == 431, "--rest-max-header 2048: a 3 KB header field gets 431", text[:300])
        s, doc, text = c.request("GET", "/v1/version", headers={"X-Pad": "p" * 1500})
        check(s == 200, "... and 1.5 KB passes", text[:300])

        c.request("POST", "/v1/machines/huge/start")
        unresponsive = wait_until(lambda: c.request("GET", "/v1/machines/huge")[1].get("state")
                                  == "unresponsive", 20)
        check(unresponsive and "exceeds 65536 bytes" in d.output(),
              "--qmp-max-message 65536: a 100 kB message ends the monitor connection, "
              "the log says why", "\n".join(l for l in d.output().splitlines() if "huge" in l))
        c.request("POST", "/v1/machines/huge/kill")

        c.request("POST", "/v1/machines/flood/start")
        time.sleep(1.5)
        c.request("POST", "/v1/machines/flood/kill")
        _, _, metrics = c.request("GET", "/metrics")
        dropped = [int(float(l.split()[-1])) for l in metrics.splitlines()
                   if l.startswith("qmachined_events_dropped_total")]
        check(dropped and dropped[0] >= 900,
              "--event-rate 10 --event-burst 20: of ~1,500 events in 1.5 s at most ~35 are "
              f"published (dropped {dropped[0] if dropped else None}; the defaults would drop "
              "under 800)", metrics[-300:])

        def open_stream():
            sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sk.settimeout(10)
            sk.connect(d.socket)
            sk.sendall(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sk.recv(4096)
                if not chunk:
                    break
                head += chunk
            return sk, head.decode(errors="replace")

        for _ in range(2):
            sk, head = open_stream()
            streams.append(sk)
        sk, head = open_stream()
        streams.append(sk)
        sk.settimeout(2)
        try:
            head += sk.recv(4096).decode(errors="replace")
        except OSError:
            pass
        check(head.startswith("HTTP/1.1 429") and "LimitExceeded" in head,
              "--rest-max-subscribers 2: a third event stream gets 429 LimitExceeded",
              head[:400])
        for sk in streams:
            sk.close()

        s, doc, text = c.request("POST", "/v1/machines",
                                 {"name": "big", "spec": dict(QUICK, args=["-smbios",
                                                                         "x" * 2048])})
        check(s == 413 and problem_type(doc) == "PayloadTooLarge",
              "--rest-max-body 1024: a 2 KiB body gets 413 PayloadTooLarge", text[:300])

        c.request("POST", "/v1/machines/m0/start")
        s, doc, text = c.request("POST", "/v1/machines/m0/qmp", {"execute": "query-kvm"})
        check(s == 403 and problem_type(doc) == "Forbidden",
              "--qmp-deny query-kvm: the command gets 403 Forbidden", text[:300])
        s, doc, text = c.request("POST", "/v1/machines/m0/qmp",
                                 {"execute": "human-monitor-command",
                                  "arguments": {"command-line": "info version"}})
        check(s == 200 and "7." in str((doc or {}).get("return")),
              "--qmp-allow human-monitor-command lifts the default denial", text[:300])
        s, doc, text = c.request("POST", "/v1/machines/m0/qmp",
                                 {"execute": "getfd", "arguments": {"fdname": "x"}})
        check(s == 403, "the rest of the default deny set still holds (getfd: 403)", text[:300])
        c.request("POST", "/v1/machines/m0/kill")
    finally:
        for sk in streams:
            sk.close()
        c.close()
        d.stop()
        for pid in d.qemus():
            os.kill(pid, signal.SIGKILL)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tcp_slots(work):
    """Clients of the TCP port, token or not, cannot take the unix socket's connections."""
    port = free_port()
    d = Daemon(QMACHINED, os.path.join(work, "tcp"),
               ["--rest-listen", f"127.0.0.1:{port}", "--rest-max-connections", "4"]).start()
    held = []
    try:
        for _ in range(4):  # connected, saying nothing (no token either)
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        extra.settimeout(5)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                chunk = extra.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except OSError:
            pass
        extra.close()
        check(answer.startswith(b"HTTP/1.1 429"),
              "--rest-max-connections 4: a fifth TCP connection gets 429", answer[:200])
        c = d.client()
        results_ok = [c.request("GET", "/v1/health")[0] for _ in range(3)]
        c.close()
        check(results_ok == [200, 200, 200],
              "meanwhile the unix socket still serves (each listener has its own limit)",
              str(results_ok))
    finally:
        for s in held:
            s.close()
        d.stop()


def qemu_user(work):
    d = Daemon(QMACHINED, os.path.join(work, "root-user"))
    argv = [a for a in d.args()]
    i = argv.index("--qemu-user")
    argv[i + 1] = "root"
    d.start(wait=False, argv=argv)
    code = d.proc.wait(30)
    check(code == 1 and "qemu-user 'root' is root" in d.output(),
          "qemu-user root: qmachined refuses to start", d.output()[-500:])

    # A member of the group qmachined, in a private mount namespace with its own /etc/group.
    etc = os.path.join(work, "etc-group")
    members = []
    with open("/etc/group") as f:
        lines = f.read().splitlines()
    if not any(l.startswith("qmachined:") for l in lines):
        check(False, "the group qmachined exists (scripts/deps applies sysusers.d)")
        return
    out = []
    for l in lines:
        if l.startswith("qmachined:"):
            parts = l.split(":")
            members = [m for m in parts[3].split(",") if m]
            parts[3] = ",".join(members + ["qmachined-qemu"])
            l = ":".join(parts)
        out.append(l)
    with open(etc, "w") as f:
        f.write("\n".join(out) + "\n")
    d = Daemon(QMACHINED, os.path.join(work, "group-user"))
    argv = d.args()
    i = argv.index("--qemu-user")
    argv[i + 1] = "qmachined-qemu"
    wrapped = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount --bind "$0" /etc/group && exec "$@"', etc] + argv
    d.start(wait=False, argv=wrapped)
    code = d.proc.wait(30)
    check(code == 1 and "is a member of the group qmachined" in d.output(),
          "qemu-user in the group qmachined: qmachined refuses to start", d.output()[-500:])


def main():
    if os.geteuid() != 0:
        print("1..0 # SKIP needs root")
        sys.exit(0)
    work = tempfile.mkdtemp(prefix="security-test.")
    os.chmod(work, 0o755)
    ok = False
    try:
        for name, section in [("shell", shell_and_log), ("audit", audit_lines), ("limits", limits),
                              ("tcp", tcp_slots), ("qemu-user", qemu_user)]:
            try:
                section(work)
            except Exception:  # noqa: BLE001: a crash is a failed point, with its traceback
                import traceback
                check(False, f"the {name} section ran to its end", traceback.format_exc())
        ok = all(good for good, _, _ in tap.results)
    finally:
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"# kept {work} for a look", flush=True)


tap.finish(main)
