#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Machines as systemd machines, and the host's shutdown, under a real systemd (TAP).

  machined_test.py BUILD_DIR

The installed units in a systemd that is PID 1 of a private namespace (tests/systemd/pid1ns.py),
with systemd-machined (package systemd-container):

- each started machine is registered: `machinectl list` shows it (class vm, service qmachined,
  QEMU the leader), its QEMU is in machine-NAME.scope; a name machined refuses ("odd_name") runs
  unregistered;
- the scopes keep the machines through a restart of qmachined even under KillMode=mixed (an
  unregistered machine, in the service's cgroup, does not survive that: why the unit keeps
  KillMode=process);
- a systemd-machined that hangs (SIGSTOP) does not delay qmachined's start: the registration
  times out with a warning;
- `machinectl terminate NAME` stops that machine only, and qmachined reports it (and does not
  restart it, even with restart policy always);
- a machine started paused is registered; a quick restart registers the new QEMU;
- the host's shutdown: `systemctl stop qmachined-guests.service` (what systemd does at shutdown,
  ordered before qmachined and before the scopes) stops every guest gracefully (ACPI power
  button: reason guest-poweroff), in parallel (every machine is `stopping` before the first is
  `stopped`);
- after a "reboot" (a new namespace, the state directory kept) the machines with autostart come
  back and the others do not.

Skips (the one suite allowed to) where no systemd-machined can run, saying why; a failure of
qmachined's own units is a failure, never a skip.
"""
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "systemd"))
from pid1ns import Namespace, Tap, guest_dir, install, meson_options, wait_until  # noqa: E402

build_dir = sys.argv[1]
tap = Tap(progress=True, detail_lines=40)
check = tap.check


def skip(why):
    print(f"1..0 # SKIP {' '.join(why.split())}")  # one line: the rest would not be TAP
    sys.exit(0)  # TAP: the plan says it skipped


def guest_spec(guest, autostart, restart="no"):
    return {"machine": "pc,accel=tcg", "memory_mib": 128, "autostart": autostart,
            "restart": {"policy": restart}, "args": [
        "-nodefaults", "-no-user-config", "-no-reboot", "-kernel", guest + "/vmlinuz",
        "-initrd", guest + "/initramfs.cpio.gz", "-append", "console=ttyS0 quiet panic=-1"],
        "shutdown": {"mode": "powerdown", "timeout_s": 60}}


def boot(work, dest, prefix, state, name):
    """(namespace, why no machined can run here or None, what failed of qmachined's or None)."""
    ns = Namespace(work, dest, prefix, persist={"/var/lib/qmachined": state})
    if not ns.find_pid1():
        return ns, f"systemd did not start as PID 1 of a namespace ({name}): " + \
            open(os.path.join(work, "console.log")).read()[-500:], None
    if not wait_until(lambda: ns.systemctl("is-system-running").stdout.strip()
                      in ("running", "degraded"), 60):
        return ns, "the manager did not reach basic.target", None
    ns.run("systemd-sysusers")
    ns.systemctl("start", "dbus.socket", "dbus.service")
    r = ns.systemctl("start", "systemd-machined.service")
    if r.returncode:
        return ns, "systemd-machined.service does not start: " + r.stderr, None
    # From here a failure is qmachined's, never a reason to skip.
    r = ns.systemctl("enable", "--now", "qmachined.socket")
    r2 = ns.systemctl("enable", "qmachined.service", "qmachined-guests.service")
    r3 = ns.systemctl("start", "qmachined-guests.service")
    if r.returncode or r2.returncode or r3.returncode:
        return ns, None, r.stderr + r2.stderr + r3.stderr
    return ns, None, None


def machine(ns, name):
    code, doc, text = ns.curl("GET", f"/v1/machines/{name}")
    return doc if code == 200 else {"state": f"HTTP {code}: {text}"}


def registered(ns):
    r = ns.run("machinectl", "list", "--no-legend", "--no-pager")
    return sorted(line.split()[0] for line in r.stdout.splitlines() if line.strip())


def main():
    if os.geteuid() != 0:
        skip("needs root (a PID namespace with systemd in it)")
    if not os.path.exists("/lib/systemd/systemd-machined"):
        skip("no systemd-machined (package systemd-container)")
    if not shutil.which("unshare") or not os.path.exists("/lib/systemd/systemd"):
        skip("no unshare or systemd to boot in a namespace")
    opts = meson_options(build_dir)
    prefix = opts["prefix"]
    if prefix in ("/", "/usr"):
        skip(f"the build's prefix {prefix} cannot be bound over the host's")
    guest = guest_dir()
    work = tempfile.mkdtemp(prefix="machined-test.", dir=os.path.abspath(build_dir))
    ns = None
    try:
        dest = os.path.join(work, "dest")
        r = install(build_dir, dest)
        if not check(r.returncode == 0, "meson install --destdir", r.stdout + r.stderr):
            return
        state = os.path.join(work, "state")
        os.makedirs(state, mode=0o700)

        ns, absent, failed = boot(work, dest, prefix, state, "boot1")
        if absent is not None:
            skip(f"no systemd-machined could run here: {absent.strip()[:300]}")
        if not check(failed is None, "qmachined's units are enabled and started", failed or ""):
            return
        qemu = QemuOf(ns)

        # Machines: two guests (web1 autostarts), one whose name machined refuses.
        ns.curl("POST", "/v1/machines", {"name": "web1", "spec": guest_spec(guest, True)})
        ns.curl("POST", "/v1/machines", {"name": "db1", "spec": guest_spec(guest, False, "always")})
        quick = {"binary": "qemu-system-x86_64", "machine": "none",
                 "shutdown": {"mode": "quit", "timeout_s": 10}}
        ns.curl("POST", "/v1/machines", {"name": "odd_name", "spec": quick})
        pids = {}
        for name in ["web1", "db1", "odd_name"]:
            code, doc, text = ns.curl("POST", f"/v1/machines/{name}/start")
            check(code == 200, f"start {name}", text)
            pids[name] = doc.get("pid") if doc else None
        # web1's guest up now: the restarts below re-attach it, and a re-attached console starts
        # empty.
        code, doc, text = ns.curl("POST", "/v1/machines/web1/console/wait",
                                  {"pattern": "qmtest: ready", "timeout_s": 120}, timeout=130)
        check(code == 200 and doc and not doc.get("timed_out"), "web1's guest is up", text)
        got = wait_until(lambda: registered(ns) == ["db1", "web1"], 15)
        check(got, "machinectl list: web1 and db1, registered; odd_name is not",
              str(registered(ns)) + ns.run("journalctl", "-u", "qmachined", "--no-pager")
              .stdout[-1500:])
        r = ns.run("machinectl", "show", "web1", "-p", "Leader", "-p", "Class", "-p", "Service",
                   "-p", "Unit")
        props = dict(l.split("=", 1) for l in r.stdout.splitlines() if "=" in l)
        check(props.get("Leader") == str(pids["web1"]) and props.get("Class") == "vm" and
              props.get("Service") == "qmachined" and props.get("Unit") == "machine-web1.scope",
              "machinectl show web1: leader the QEMU, class vm, service qmachined, its scope",
              r.stdout + r.stderr)
        r = ns.systemctl("show", "machine-web1.scope", "-p", "Before", "--value")
        check("qmachined-guests.service" in r.stdout.split(),
              "machine-web1.scope is ordered before qmachined-guests.service (at shutdown the "
              "guests' graceful stop runs first, then systemd stops the scopes)", r.stdout)
        cgroup = qemu.cgroup(pids["web1"])
        check("/machine.slice/machine-web1.scope" in cgroup,
              "web1's QEMU runs in machine.slice/machine-web1.scope", cgroup)
        check("/system.slice/qmachined.service" in qemu.cgroup(pids["odd_name"]),
              "odd_name's QEMU stays in qmachined.service's cgroup",
              qemu.cgroup(pids["odd_name"]))

        # A restart under KillMode=mixed: the scopes keep their machines.
        ns.run("mkdir", "-p", "/run/systemd/system/qmachined.service.d")
        ns.run("sh", "-c", "printf '[Service]\\nKillMode=mixed\\n' > "
                           "/run/systemd/system/qmachined.service.d/90-mixed.conf")
        ns.systemctl("daemon-reload")
        r = ns.systemctl("restart", "qmachined.service")
        for name in ["web1", "db1"]:
            m = machine(ns, name)
            check(m.get("state") == "running" and m.get("pid") == pids[name],
                  f"KillMode=mixed restart: {name} kept in its scope, re-attached", str(m))
        m = machine(ns, "odd_name")
        check(m.get("state") != "running" and not qemu.alive(pids["odd_name"]),
              "KillMode=mixed restart: the unregistered odd_name is killed with the service "
              "(why the unit keeps KillMode=process)", str(m))
        ns.run("rm", "/run/systemd/system/qmachined.service.d/90-mixed.conf")
        ns.systemctl("daemon-reload")

        # A machined that does not answer (SIGSTOP) never holds up a start: READY comes after the
        # re-attach as usual, and the CreateMachine calls time out (5 s) with a warning.
        machined_pid = ns.show("systemd-machined.service", "MainPID")["MainPID"]
        ns.run("kill", "-STOP", machined_pid)
        try:
            started = time.monotonic()
            r = ns.systemctl("restart", "qmachined.service")
            took = time.monotonic() - started
            code, _, _ = ns.curl("GET", "/v1/health")
            check(r.returncode == 0 and code == 200 and took < 4 and
                  machine(ns, "web1").get("pid") == pids["web1"],
                  f"a hung systemd-machined does not delay qmachined's start ({took:.1f} s)",
                  r.stderr + ns.run("journalctl", "--no-pager", "-o", "short-monotonic",
                                    "-n", "80").stdout)
            warned = wait_until(lambda: "machined: cannot register 'web1'" in ns.run(
                "journalctl", "-u", "qmachined", "--no-pager").stdout, 15)
            check(warned, "the registration times out with a warning",
                  ns.run("journalctl", "-u", "qmachined", "--no-pager").stdout[-1500:])
        finally:
            ns.run("kill", "-CONT", machined_pid)
        ns.systemctl("restart", "qmachined.service")
        check(registered(ns) == ["db1", "web1"], "still registered after the restarts",
              str(registered(ns)))

        # machinectl terminate: that machine only, and it stays stopped (restart policy always:
        # an operator's stop).
        r = ns.run("machinectl", "terminate", "db1")
        stopped = wait_until(lambda: machine(ns, "db1").get("state") in ("stopped", "crashed"), 30)
        time.sleep(1)  # a restart would be scheduled by now
        m = machine(ns, "db1")
        reason = m.get("stop_reason") or {}
        check(r.returncode == 0 and stopped and m.get("state") == "stopped" and
              reason.get("kind") == "signal" and "host-signal" in reason.get("detail", "") and
              m.get("restart_count") == 0 and machine(ns, "web1").get("state") == "running",
              "machinectl terminate db1: db1 stopped (reason signal, host-signal) and not "
              "restarted under restart policy always; web1 runs on",
              r.stderr + json.dumps(m))
        check(wait_until(lambda: registered(ns) == ["web1"], 10),
              "machined forgot db1 once its scope was empty", str(registered(ns)))

        # A machine started paused (-S) is registered too; a quick restart registers the new
        # QEMU even while machined still holds the name for the old one's scope.
        ns.curl("POST", "/v1/machines", {"name": "held", "spec": dict(quick, args=["-S"])})
        code, doc, text = ns.curl("POST", "/v1/machines/held/start")
        check(code == 200 and doc and doc.get("state") == "paused" and
              wait_until(lambda: "held" in registered(ns), 10),
              "a machine started paused is registered", text + str(registered(ns)))
        ns.curl("POST", "/v1/machines", {"name": "quick1", "spec": quick})
        code, doc, text = ns.curl("POST", "/v1/machines/quick1/start")
        first = doc.get("pid") if code == 200 and doc else None
        wait_until(lambda: "quick1" in registered(ns), 10)

        def leader(name):
            r = ns.run("machinectl", "show", name, "-p", "Leader", "--value")
            return r.stdout.strip()
        code, doc, text = ns.curl("POST", "/v1/machines/quick1/restart")
        second = doc.get("pid") if code == 200 and doc else None
        check(first and second and second != first and
              wait_until(lambda: leader("quick1") == str(second), 15),
              "a restarted machine is registered again with its new QEMU as the leader",
              f"{first} -> {second}, leader {leader('quick1')}\n" +
              ns.run("journalctl", "-u", "qmachined", "--no-pager").stdout[-1500:])
        for name in ["held", "quick1"]:
            ns.curl("DELETE", f"/v1/machines/{name}?force=true")
        wait_until(lambda: registered(ns) == ["web1"], 10)

        # The host's shutdown: both guests up, then what systemd does at shutdown.
        code, doc, text = ns.curl("POST", "/v1/machines/db1/start")
        db1 = doc.get("pid") if code == 200 and doc else None
        check(db1 and wait_until(lambda: leader("db1") == str(db1), 10),
              "start db1 again: registered again", text)
        code, doc, text = ns.curl("POST", "/v1/machines/db1/console/wait",
                                  {"pattern": "qmtest: ready", "timeout_s": 120}, timeout=130)
        check(code == 200 and doc and not doc.get("timed_out"), "db1's guest is up again", text)
        code, doc, _ = ns.curl("GET", "/v1/health")
        since = None
        code, doc, text = ns.curl("POST", "/v1/machines/web1/events/wait",
                                  {"event": "NO_SUCH_EVENT", "timeout_s": 0.01})
        since = doc.get("event_seq") if doc else None
        start = time.monotonic()
        r = ns.systemctl("stop", "qmachined-guests.service", timeout=300)
        elapsed = time.monotonic() - start
        reasons = {n: (machine(ns, n).get("stop_reason") or {}).get("kind") for n in
                   ["web1", "db1"]}
        check(r.returncode == 0 and reasons == {"web1": "guest-poweroff", "db1": "guest-poweroff"},
              f"systemctl stop qmachined-guests: every guest powered off ({elapsed:.1f} s)",
              r.stderr + str(reasons))
        print(f"# host shutdown: 2 guests stopped gracefully in {elapsed:.2f} s")
        # In parallel: both were `stopping` before the first was `stopped`.
        r = ns.run("curl", "-sN", "-m", "1", "--unix-socket", "/run/qmachined/qmachined.sock",
                   f"http://qmachined/v1/events?since={since or 0}&event=STATE_CHANGED")
        order = []
        for line in r.stdout.splitlines():
            if line.startswith("data: "):
                e = json.loads(line[6:])
                order.append((e["machine"], e["data"]["state"]))
        stopping = [i for i, (_, s) in enumerate(order) if s == "stopping"]
        stopped_at = [i for i, (_, s) in enumerate(order) if s == "stopped"]
        check(len(stopping) == 2 and len(stopped_at) == 2 and max(stopping) < min(stopped_at),
              "the guests were stopped in parallel (both stopping before the first stopped)",
              str(order))
        ns.close()
        ns = None

        # The next boot: the same state directory, a fresh runtime directory.
        ns, absent, failed = boot(work, dest, prefix, state, "boot2")
        if not check(absent is None and failed is None, "a second boot", (absent or failed or "")):
            return
        code, _, _ = ns.curl("GET", "/v1/health")  # the socket starts qmachined
        came_back = wait_until(lambda: machine(ns, "web1").get("state") == "running", 30)
        check(came_back and machine(ns, "db1").get("state") in ("defined", "stopped"),
              "after boot: web1 (autostart) runs again, db1 does not",
              json.dumps(machine(ns, "web1")) + json.dumps(machine(ns, "db1")))
        check(wait_until(lambda: registered(ns) == ["web1"], 15),
              "after boot: web1 registered with machined", str(registered(ns)))
        ns.curl("POST", "/v1/machines/web1/kill")
    finally:
        if ns:
            ns.close()
        shutil.rmtree(work, ignore_errors=True)


class QemuOf:
    """What the host's /proc says about a process inside the namespace (pids are the
    namespace's: translated through NSpid)."""

    def __init__(self, ns):
        self.ns = ns

    def cgroup(self, pid):
        r = self.ns.run("cat", f"/proc/{pid}/cgroup")
        return r.stdout

    def alive(self, pid):
        r = self.ns.run("sh", "-c", f"test -d /proc/{pid} && ! grep -q '^State:.*Z' "
                                    f"/proc/{pid}/status")
        return r.returncode == 0


tap.finish(main)
