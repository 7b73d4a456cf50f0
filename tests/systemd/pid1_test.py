#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The installed units under a real systemd, as PID 1 of a private PID and mount namespace (TAP).

  pid1_test.py BUILD_DIR

These machines have no systemd as PID 1, but one boots in a namespace of its own in seconds: the
test installs the build into a DESTDIR, boots /lib/systemd/systemd in `unshare --pid --mount`
with private /tmp, /var/tmp, /run, /var/lib, /srv, /etc/systemd/system and /etc/dbus-1/system.d
(tmpfs: systemd-tmpfiles would empty the host's /tmp, and nothing of the host's is enabled), /etc
as an overlay (sysusers writes there, never in the host's), the DESTDIR's prefix bound over the
real one, and drives it with systemctl through nsenter:

- an image directory added to the installed configuration becomes ReadWritePaths= through
  qmachined-generator at daemon-reload;
- qmachined.socket starts qmachined on the first connection of a member of the group qmachined
  (the socket's directory root:qmachined 0710 from tmpfiles.d, before the service ever ran); an
  outsider reaches neither the socket nor the daemon (Type=notify: active with STATUS=);
- a machine with the test guest and a disk in that image directory runs under the whole sandbox
  (ProtectSystem=strict, SystemCallFilter=, DevicePolicy=, QEMU's own seccomp), the guest boots;
  a disk outside image-dirs is refused with QEMU's "Read-only file system";
- `systemctl restart` (KillMode=process), SIGKILL of the main process (Restart=on-failure) and a
  watchdog timeout (WatchdogSec=, the daemon SIGSTOPped) each bring a new qmachined that re-attaches
  the same QEMU; `systemctl reload` re-reads the configuration;
- D-Bus: the policy lets the daemon own org.qmachined1; with the service stopped, a busctl call
  activates it (SystemdService=, Alias=) and it answers with the machine it took over;
- `systemd-analyze security` rates the running unit.
Everything in the namespace dies with its PID 1 at the end (and if this test is killed).
"""
import json
import os
import re
import shutil
import sys
import tempfile
import time

from pid1ns import Namespace, Tap, guest_dir, install, meson_options, wait_until

build_dir = sys.argv[1]
tap = Tap(progress=True, detail_lines=40)
check = tap.check


def main():
    opts = meson_options(build_dir)
    prefix = opts["prefix"]
    if not check(prefix not in ("/", "/usr") and os.geteuid() == 0,
                 f"runs as root with a build prefix that can be bound over ({prefix})"):
        return
    guest = guest_dir()
    # In the build directory: the namespace gets a private /tmp, which would hide it.
    work = tempfile.mkdtemp(prefix="pid1-test.", dir=os.path.abspath(build_dir))
    ns = None
    try:
        dest = os.path.join(work, "dest")
        r = install(build_dir, dest)
        if not check(r.returncode == 0, "meson install --destdir", r.stdout + r.stderr):
            return
        ns = Namespace(work, dest, prefix)
        if not check(ns.find_pid1(), "systemd boots as PID 1 of a namespace",
                     open(os.path.join(work, "console.log")).read()):
            return
        state = wait_until(lambda: ns.systemctl("is-system-running").stdout.strip()
                           in ("running", "degraded"), 60)
        if not check(state, "the manager reaches basic.target",
                     ns.systemctl("is-system-running").stdout +
                     ns.systemctl("list-units", "--failed").stdout):
            return
        # What an installation does: users and groups, the image directory, the D-Bus daemon.
        ns.run("systemd-sysusers")
        ns.run("systemd-tmpfiles", "--create", f"{prefix}/lib/tmpfiles.d/qmachined.conf")
        r = ns.systemctl("start", "dbus.socket", "dbus.service")
        check(r.returncode == 0, "the system bus runs in the namespace", r.stderr)
        # No systemd-machined here (the machined suite has one): registration must say so once
        # and stay out of the way.
        ns.systemctl("mask", "systemd-machined.service")
        # An image directory of the operator's in the installed configuration: the generator
        # turns it into ReadWritePaths= at daemon-reload, as at boot.
        sysconfdir = opts["sysconfdir"]
        if not sysconfdir.startswith("/"):
            sysconfdir = os.path.join(prefix, sysconfdir)
        ns.run("install", "-d", "-m", "0770", "-o", "qmachined-qemu", "-g", "qmachined",
               "/srv/images")
        ns.run("sh", "-c", "echo 'image-dirs = /srv/images,/var/lib/qmachined-images' >> "
                           f"{sysconfdir}/qmachined/qmachined.conf")
        ns.systemctl("daemon-reload")
        r = ns.systemctl("cat", "qmachined.service")
        check(r.returncode == 0 and "qmachined.service.d/50-image-dirs.conf" in r.stdout and
              "ReadWritePaths=-/srv/images" in r.stdout,
              "qmachined-generator: the configuration's image-dirs are ReadWritePaths= of the unit",
              r.stdout[-1500:] + r.stderr)
        r = ns.systemctl("enable", "--now", "qmachined.socket")
        r2 = ns.systemctl("enable", "qmachined.service")
        check(r.returncode == 0 and r2.returncode == 0,
              "systemctl enable --now qmachined.socket; enable qmachined.service",
              r.stderr + r2.stderr)
        check(ns.show("qmachined.service", "ActiveState")["ActiveState"] == "inactive",
              "qmachined does not run before a client comes")

        # Socket activation and Type=notify. The socket's directory is root:qmachined 0710
        # (tmpfiles.d) before qmachined ever ran: an outsider cannot reach the socket, nor start
        # the daemon; a member of the group qmachined can.
        code, _, text = ns.curl("GET", "/v1/health", as_user="outsider")
        check(code == 0 and
              ns.show("qmachined.service", "ActiveState")["ActiveState"] == "inactive",
              "a user outside the group qmachined neither reaches the socket nor starts qmachined",
              f"{code} {text}")
        code, doc, text = ns.curl("GET", "/v1/health", as_user="member")
        svc = ns.show("qmachined.service", "ActiveState", "SubState", "StatusText", "MainPID",
                      "NRestarts")
        check(code == 200 and svc["ActiveState"] == "active" and
              svc["StatusText"] == "0 machines",
              "the first connection (a member of the group qmachined, before qmachined ever ran) "
              "starts qmachined; active with STATUS=", f"{code} {text} {svc}")

        # A machine under the sandbox, with a disk in the operator's image directory.
        ns.run("truncate", "-s", "8M", "/srv/images/disk.raw")
        ns.run("chown", "qmachined-qemu", "/srv/images/disk.raw")
        spec = {"machine": "pc,accel=tcg", "memory_mib": 128, "args": [
            "-nodefaults", "-no-user-config", "-no-reboot", "-kernel", guest + "/vmlinuz",
            "-initrd", guest + "/initramfs.cpio.gz", "-append",
            "console=ttyS0 quiet panic=-1 qmtest.hello=under-systemd",
            "-drive", "file=/srv/images/disk.raw,format=raw,if=virtio"],
            "shutdown": {"mode": "quit", "timeout_s": 10}}
        code, _, text = ns.curl("POST", "/v1/machines", {"name": "vm", "spec": spec})
        check(code == 201, "create a machine", text)
        code, doc, text = ns.curl("POST", "/v1/machines/vm/start")
        qemu = doc.get("pid") if code == 200 and doc else None
        check(qemu, "the machine starts under the sandbox (disk in image-dirs)", text)
        code, doc, text = ns.curl("POST", "/v1/machines/vm/console/wait",
                                  {"pattern": "hello under-systemd", "timeout_s": 120},
                                  timeout=130)
        check(code == 200 and doc and doc.get("timed_out") is False,
              "the guest boots and says hello on its console", text)
        journal = ns.run("journalctl", "-u", "qmachined", "--no-pager").stdout
        check(journal.count("machined: systemd-machined is not available") == 1 and
              "machined: registered" not in journal,
              "without systemd-machined: one info line, machines run unregistered",
              journal[-1500:])
        r = ns.run("ps", "-o", "user:32=,args=", "-p", str(qemu))
        status = ns.run("cat", f"/proc/{qemu}/status").stdout
        filters = re.search(r"^Seccomp_filters:\s*(\d+)", status, re.M)
        check(r.stdout.startswith("qmachined-qemu ") and "-sandbox on" in r.stdout and
              re.search(r"^Seccomp:\s*2$", status, re.M) and
              (filters is None or int(filters.group(1)) >= 2),
              "QEMU runs as qmachined-qemu under two seccomp filters: the unit's and its own",
              r.stdout + status)

        ns.run("truncate", "-s", "8M", "/srv/outside.raw")
        ns.run("chown", "qmachined-qemu", "/srv/outside.raw")
        outside = dict(spec, args=spec["args"][:-2] + [
            "-drive", "file=/srv/outside.raw,format=raw,if=virtio"])
        ns.curl("POST", "/v1/machines", {"name": "outside", "spec": outside})
        code, doc, text = ns.curl("POST", "/v1/machines/outside/start")
        check(code == 502 and "Read-only file system" in text,
              "a disk outside image-dirs: ProtectSystem=strict, QEMU's error in the answer",
              text[-600:])
        ns.curl("DELETE", "/v1/machines/outside")

        def same_machine(what):
            code, doc, text = ns.curl("GET", "/v1/machines/vm")
            return check(code == 200 and doc["state"] == "running" and doc["pid"] == qemu,
                         f"{what}: the new qmachined re-attached the same QEMU", text)

        # systemctl restart: KillMode=process.
        before = ns.show("qmachined.service", "MainPID")["MainPID"]
        r = ns.systemctl("restart", "qmachined.service")
        after = ns.show("qmachined.service", "MainPID", "ActiveState")
        check(r.returncode == 0 and after["MainPID"] != before and after["ActiveState"] == "active",
              "systemctl restart qmachined", r.stderr + str(after))
        same_machine("systemctl restart")

        # SIGKILL of the main process: Restart=on-failure.
        main_pid = int(after["MainPID"])
        ns.run("kill", "-KILL", str(main_pid))
        restarted = wait_until(lambda: (lambda s: s["ActiveState"] == "active" and
                                        s["MainPID"] not in ("0", str(main_pid)) and
                                        s["NRestarts"] == "1")(
            ns.show("qmachined.service", "ActiveState", "MainPID", "NRestarts")), 30)
        check(restarted, "SIGKILL of qmachined: systemd starts it again (Restart=on-failure)",
              str(ns.show("qmachined.service", "ActiveState", "MainPID", "NRestarts")))
        same_machine("Restart=on-failure")

        # The watchdog: a qmachined whose loop stops is killed and started again.
        ns.run("mkdir", "-p", "/run/systemd/system/qmachined.service.d")
        ns.run("sh", "-c", "printf '[Service]\\nWatchdogSec=2s\\n' > "
                           "/run/systemd/system/qmachined.service.d/90-test-watchdog.conf")
        ns.systemctl("daemon-reload")
        ns.systemctl("restart", "qmachined.service")
        stopped_pid = ns.show("qmachined.service", "MainPID")["MainPID"]
        time.sleep(3)  # keep-alives every second: still the same process
        alive = ns.show("qmachined.service", "MainPID")["MainPID"] == stopped_pid
        ns.run("kill", "-STOP", stopped_pid)
        replaced = wait_until(lambda: (lambda s: s["ActiveState"] == "active" and
                                       s["MainPID"] not in ("0", stopped_pid))(
            ns.show("qmachined.service", "ActiveState", "MainPID")), 30)
        journal = ns.run("journalctl", "-u", "qmachined", "--no-pager").stdout
        check(alive and replaced and "Watchdog timeout" in journal,
              "WatchdogSec=: a stopped loop is killed and qmachined started again",
              f"alive={alive} replaced={replaced}\n" + journal[-1500:])
        same_machine("the watchdog")
        ns.run("rm", "/run/systemd/system/qmachined.service.d/90-test-watchdog.conf")
        ns.systemctl("daemon-reload")

        # systemctl reload: SIGHUP re-reads the configuration file.
        r = ns.systemctl("reload", "qmachined.service")
        reloaded = wait_until(lambda: "Reloaded '" in ns.run(
            "journalctl", "-u", "qmachined", "--no-pager").stdout, 10)
        check(r.returncode == 0 and reloaded, "systemctl reload re-reads the configuration",
              r.stderr)

        # D-Bus: owned under the policy; activation through systemd.
        def list_over_dbus():
            return ns.run("busctl", "--system", "--timeout=60", "--json=short", "call",
                          "org.qmachined1", "/org/qmachined1", "org.qmachined1.Manager",
                          "ListMachines", timeout=70)

        r = list_over_dbus()
        check(r.returncode == 0 and '"vm"' in r.stdout, "busctl ListMachines (the policy)",
              r.stdout + r.stderr)
        r = ns.systemctl("stop", "qmachined.service")
        check(ns.show("qmachined.service", "ActiveState")["ActiveState"] == "inactive",
              "systemctl stop qmachined", r.stderr)
        r = list_over_dbus()
        svc = ns.show("qmachined.service", "ActiveState")
        check(r.returncode == 0 and '"vm"' in r.stdout and svc["ActiveState"] == "active",
              "a D-Bus call activates the stopped qmachined, which answers with the machine",
              r.stdout + r.stderr + str(svc))
        same_machine("D-Bus activation")

        r = ns.run("systemd-analyze", "security", "--no-pager", "qmachined.service")
        m = re.search(r"Overall exposure level for qmachined.service: ([0-9.]+)", r.stdout)
        check(m, "systemd-analyze security on the running unit", r.stdout[-500:] + r.stderr)
        if m:
            print(f"# systemd-analyze security (running): {m.group(1)}")

        code, _, text = ns.curl("POST", "/v1/machines/vm/kill")
        check(code == 200, "the machine is killed at the end", text)
    finally:
        if ns:
            ns.close()
        shutil.rmtree(work, ignore_errors=True)


tap.finish(main)
