#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The fault suite (TAP): qmachined under crashes, faulty monitors, a faulty state directory and
load, as a real process with real QEMU (-machine none) and, where QEMU cannot misbehave on
demand, tests/fault/fake_qemu.py as a machine's binary.

  fault_test.py QMACHINED

Sections (each bounded; QM_FAULT_FULL=1 runs the long versions, for docs/reliability.md):
  cycles   create/start/qmp/stop/delete N times (100; full: 1,000): descriptors, children and
           runtime files back to the baseline; RSS growth from cycle 100 to 1,000 <= 1 MiB
  monitor  a monitor that stops answering, one that floods events (100,000/s), one that sends a
           1 GiB line: the others' REST latency (measured, printed), bounded memory, the flood
           rate-limited with a drop count, each faulty machine still stoppable
  kill     rounds of SIGKILL to QEMU processes and to the daemon during create, start, stop and
           QMP: after each, every definition present and valid, every live QEMU attached exactly
           once, no orphan, no zombie, no stray socket file
  state    the state directory full (a small tmpfs), read-only (a read-only bind mount), and a
           definition truncated mid-write: clear errors, nothing already saved lost
  load     M machines and C concurrent keep-alive HTTP clients for S seconds (20/100/5 s; full:
           200/500/60 s): no answer other than 200 or a documented limit
Needs root for the state section (mounts, in a private mount namespace of this process).
"""
import concurrent.futures
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "systemd"))
from pid1ns import Tap  # noqa: E402
from qmd import (Client, Daemon, children, cpu_seconds, fd_count, pid_alive,  # noqa: E402
                 processes_mentioning, rss_kib, wait_until, zombies_of)

QMACHINED = sys.argv[1]
FULL = os.environ.get("QM_FAULT_FULL") == "1"
CYCLES = int(os.environ.get("QM_FAULT_CYCLES", 1000 if FULL else 100))
ROUNDS = int(os.environ.get("QM_FAULT_ROUNDS", 30 if FULL else 8))
LOAD_MACHINES = int(os.environ.get("QM_FAULT_MACHINES", 200 if FULL else 20))
LOAD_CLIENTS = int(os.environ.get("QM_FAULT_CLIENTS", 500 if FULL else 100))
LOAD_SECONDS = float(os.environ.get("QM_FAULT_SECONDS", 60 if FULL else 5))
SEED = int(os.environ.get("QM_FAULT_SEED", random.randrange(1 << 30)))
FAKE = os.path.join(HERE, "fake_qemu.py")
QUICK = {"machine": "none", "console": {"enabled": False},
         "shutdown": {"mode": "quit", "timeout_s": 10}}

tap = Tap(progress=True, detail_lines=30)
check = tap.check


def measure(text):
    print(f"# measure: {text}", flush=True)


def fake_spec(mode, *extra, timeout_s=2):
    return {"binary": FAKE, "args": ["-fake-mode", mode, *extra], "console": {"enabled": False},
            "shutdown": {"mode": "quit", "timeout_s": timeout_s}}


def p50_qmp(client, name, n=300):
    """The median and p99 of n REST QMP query-status round trips, in µs."""
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        status, _, text = client.request("POST", f"/v1/machines/{name}/qmp",
                                         {"execute": "query-status"})
        xs.append((time.perf_counter() - t) * 1e6)
        if status != 200:
            raise RuntimeError(f"probe query-status: {status} {text[:200]}")
    xs.sort()
    return statistics.median(xs), xs[int(len(xs) * 0.99) - 1]


def runtime_files(d):
    out = []
    for root, dirs, files in os.walk(d.runtime):
        for f in files:
            out.append(os.path.relpath(os.path.join(root, f), d.runtime))
    return sorted(out)


def sockets_under(path):
    out = []
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            try:
                if (os.lstat(p).st_mode & 0o170000) == 0o140000:
                    out.append(p)
            except OSError:
                pass
    return sorted(out)


# ---- cycles -------------------------------------------------------------------------------------

def cycles(work):
    # A small event ring: full before cycle 100 (each cycle publishes ~8 events), so what RSS
    # does from cycle 100 on is leaks, not the ring filling up to its bound (4096 events, ~4 MiB
    # with the default: it fills by cycle ~550, then stays).
    d = Daemon(QMACHINED, os.path.join(work, "cycles"), ["--event-ring", "256"]).start()
    c = d.client()
    problems = []

    def one(i):
        name = f"cycle{i % 7}"
        steps = [("POST", "/v1/machines", {"name": name, "spec": QUICK}, 201),
                 ("POST", f"/v1/machines/{name}/start", None, 200),
                 ("POST", f"/v1/machines/{name}/qmp", {"execute": "query-status"}, 200),
                 ("POST", f"/v1/machines/{name}/stop", {"mode": "quit"}, 200),
                 ("DELETE", f"/v1/machines/{name}", None, 204)]
        for method, target, body, want in steps:
            status, doc, text = c.request(method, target, body)
            if status != want:
                problems.append(f"cycle {i}: {method} {target}: {status} {text[:300]}")
                return False
        return True

    try:
        for i in range(3):  # warm-up: lazily made things (the log thread, the worker) exist
            one(i)
        base_fds, base_files = fd_count(d.pid), runtime_files(d)
        rss_at = {}
        start = time.monotonic()
        for i in range(CYCLES):
            if not one(i):
                break
            if i + 1 in (100, CYCLES):
                rss_at[i + 1] = rss_kib(d.pid)
        elapsed = time.monotonic() - start
        check(not problems, f"{CYCLES} create/start/qmp/stop/delete cycles succeed",
              "\n".join(problems[:5]))
        measure(f"{CYCLES} cycles in {elapsed:.1f} s ({elapsed / max(CYCLES, 1) * 1000:.0f} ms "
                f"each); daemon RSS {rss_at}")
        fds_back = wait_until(lambda: fd_count(d.pid) == base_fds, 5)
        check(fds_back, f"open descriptors back to the baseline ({base_fds})",
              f"now {fd_count(d.pid)}: {sorted(os.listdir(f'/proc/{d.pid}/fd'))}")
        check(wait_until(lambda: children(d.pid) == [], 5),
              "no child process left", str(children(d.pid)))
        check(runtime_files(d) == base_files and not d.qemus(),
              "runtime directory as at the baseline, no QEMU left",
              f"{runtime_files(d)} vs {base_files}; {d.qemus()}")
        if CYCLES >= 1000:
            growth = rss_at[CYCLES] - rss_at[100]
            check(growth <= 1024, f"RSS growth from cycle 100 to {CYCLES}: {growth} KiB <= 1 MiB",
                  str(rss_at))
    finally:
        c.close()
        d.stop()


# ---- monitor faults -----------------------------------------------------------------------------

def monitor_faults(work):
    d = Daemon(QMACHINED, os.path.join(work, "monitor")).start()
    c = d.client()
    try:
        c.request("POST", "/v1/machines", {"name": "probe", "spec": QUICK})
        status, _, text = c.request("POST", "/v1/machines/probe/start")
        if not check(status == 200, "the probe machine (real QEMU) runs", text[:300]):
            return
        p50_qmp(c, "probe", 100)  # warm
        idle, idle99 = p50_qmp(c, "probe")
        base_rss = rss_kib(d.pid)
        measure(f"probe REST query-status idle: p50 {idle:.0f} µs, p99 {idle99:.0f} µs; "
                f"daemon RSS {base_rss} KiB")

        # A flood of 100,000 events/s.
        c.request("POST", "/v1/machines", {"name": "flood",
                                           "spec": fake_spec("flood", "-fake-rate", "100000")})
        _, health, _ = c.request("GET", "/v1/health")
        since = health["event_seq"]
        status, _, text = c.request("POST", "/v1/machines/flood/start")
        check(status == 200, "a machine whose monitor floods 100,000 events/s starts", text[:300])
        time.sleep(0.5)
        during, during99 = p50_qmp(c, "probe")
        ratio = during / idle
        measure(f"probe during the flood: p50 {during:.0f} µs ({ratio:.2f}x idle), "
                f"p99 {during99:.0f} µs; daemon RSS {rss_kib(d.pid)} KiB")
        check(ratio <= 3.0, f"the others' REST latency during the flood: {ratio:.2f}x idle "
                            "(target 2x; a starved loop gives 8x and more)")
        _, _, metrics = c.request("GET", "/metrics")
        dropped = [int(float(l.split()[-1])) for l in metrics.splitlines()
                   if l.startswith("qmachined_events_dropped_total")]
        check(dropped and dropped[0] > 10000,
              f"the flood is rate-limited: {dropped[0] if dropped else None} events dropped",
              metrics[-500:])
        status, doc, text = c.request(
            "POST", "/v1/machines/flood/events/wait",
            {"event": "EVENTS_DROPPED", "since": since, "timeout_s": 5})
        count = (((doc or {}).get("event") or {}).get("data") or {}).get("count")
        check(status == 200 and isinstance(count, int) and count > 0,
              "the drops are reported as an EVENTS_DROPPED event with their count", text[:400])
        check(rss_kib(d.pid) - base_rss < 32 * 1024,
              f"daemon memory bounded during the flood (+{rss_kib(d.pid) - base_rss} KiB)")
        status, doc, text = c.request("POST", "/v1/machines/flood/stop")
        check(status == 200 and doc and doc.get("state") == "stopped",
              "the flooding machine stops (quit answered amid the flood)", text[:300])

        # A monitor that stops answering.
        c.request("POST", "/v1/machines", {"name": "hang", "spec": fake_spec("hang")})
        status, _, text = c.request("POST", "/v1/machines/hang/start")
        check(status == 200, "a machine whose monitor then stops answering starts", text[:300])
        hung = []

        def hang_calls():
            h = d.client()
            for _ in range(3):
                t = time.monotonic()
                s, doc, _ = h.request("POST", "/v1/machines/hang/qmp",
                                      {"execute": "query-status", "timeout_s": 1})
                hung.append((s, time.monotonic() - t, (doc or {}).get("type", "")))
            h.close()

        th = threading.Thread(target=hang_calls)
        th.start()
        during, _ = p50_qmp(c, "probe", 200)
        th.join()
        measure(f"probe while the hung monitor's calls wait: p50 {during:.0f} µs "
                f"({during / idle:.2f}x idle)")
        check(all(s == 504 and 0.9 <= t <= 5 and t and ty.endswith(":Timeout")
                  for s, t, ty in hung),
              "a QMP call to the hung monitor gets 504 Timeout after its timeout_s", str(hung))
        check(during / idle <= 3.0, f"the others' latency meanwhile: {during / idle:.2f}x idle")
        t = time.monotonic()
        status, doc, text = c.request("POST", "/v1/machines/hang/stop",
                                      {"mode": "quit", "timeout_s": 1})
        reason = (doc or {}).get("stop_reason") or {}
        check(status == 200 and doc.get("state") == "stopped" and
              reason.get("kind") == "host-kill" and time.monotonic() - t < 10,
              "stopping the hung machine falls back to SIGKILL after the timeout", text[:400])

        # One line of 1 GiB.
        c.request("POST", "/v1/machines", {"name": "huge", "spec": fake_spec("hugeline")})
        status, _, text = c.request("POST", "/v1/machines/huge/start")
        check(status == 200, "a machine whose monitor sends a 1 GiB line starts", text[:300])
        peak = [0]

        def unresponsive():
            peak[0] = max(peak[0], rss_kib(d.pid))
            s, doc, _ = c.request("GET", "/v1/machines/huge")
            return doc and doc.get("state") == "unresponsive"

        gone = wait_until(unresponsive, 60, 0.02)
        _, log, _ = c.request("GET", "/v1/machines/huge")
        check(gone, "the daemon hangs up on the line: the machine is unresponsive", str(log)[:400])
        daemon_log = d.output()
        check("QMP message exceeds" in daemon_log,
              "the log says why (the QMP message exceeds the limit)",
              "\n".join(l for l in daemon_log.splitlines() if "huge" in l)[-800:])
        measure(f"daemon RSS peak while the 1 GiB line arrived: {peak[0]} KiB "
                f"(+{peak[0] - base_rss} KiB; the message limit is 16 MiB)")
        check(peak[0] - base_rss < 64 * 1024,
              f"daemon memory bounded by the message limit (+{peak[0] - base_rss} KiB < 64 MiB)")
        status, doc, text = c.request("POST", "/v1/machines/huge/stop")
        check(status == 200 and doc.get("state") == "stopped", "the unresponsive machine stops "
              "(killed)", text[:300])
        status, doc, text = c.request("POST", "/v1/machines/probe/qmp", {"execute": "query-status"})
        check(status == 200, "the probe still answers", text[:200])
        c.request("POST", "/v1/machines/probe/kill")
        check(wait_until(lambda: not d.qemus(), 10),
              "no QEMU or stand-in left", str(d.qemus()))
    finally:
        c.close()
        d.stop()


# ---- SIGKILL rounds -----------------------------------------------------------------------------

def invariants(d, c, must_exist, round_no):
    """After a round: what must hold. Returns the problems found."""
    problems = []
    status, doc, text = c.request("GET", "/v1/machines")
    if status != 200:
        return [f"GET /v1/machines: {status} {text[:200]}"]
    machines = {m["name"]: m for m in doc["machines"]}
    for name in must_exist:
        if name not in machines:
            problems.append(f"{name} was created and never deleted, but is missing")
    for f in os.listdir(d.state):
        if f.endswith(".tmp") or ".corrupt-" in f:
            problems.append(f"state directory holds {f}")
        elif f.endswith(".json"):
            try:
                with open(os.path.join(d.state, f)) as fh:
                    definition = json.load(fh)
                if f[:-5] not in machines:
                    problems.append(f"{f} is on disk but not served")
                elif definition.get("spec", {}).get("uuid") != machines[f[:-5]]["uuid"]:
                    problems.append(f"{f}: uuid differs from the served one")
            except ValueError as e:
                problems.append(f"{f} does not parse: {e}")
    with_process = {n: m for n, m in machines.items() if m.get("pid")}
    pids = [m["pid"] for m in with_process.values()]
    if len(set(pids)) != len(pids):
        problems.append(f"a pid serves two machines: {pids}")
    for name, m in with_process.items():
        try:
            with open(f"/proc/{m['pid']}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            cmd = ""
        if f"guest={name}," not in cmd or not pid_alive(m["pid"]):
            problems.append(f"{name} ({m['state']}) names pid {m['pid']}, which is not its QEMU")
        elif m["state"] == "running":
            s, _, t = c.request("POST", f"/v1/machines/{name}/qmp", {"execute": "query-status"})
            if s != 200:
                problems.append(f"{name} runs but its monitor is not attached: {s} {t[:200]}")
    live = set(d.qemus())
    if live != set(pids):
        problems.append(f"orphans: QEMU processes {sorted(live - set(pids))} belong to no machine"
                        if live - set(pids) else f"machines name dead pids {set(pids) - live}")
    if not wait_until(lambda: not zombies_of(d.pid), 5):
        problems.append(f"zombies: {zombies_of(d.pid)}")
    own = {os.path.join(d.runtime, "qmachined.sock")}
    for m in with_process.values():
        own.update(sockets_under(os.path.join(d.runtime, "m", m["id"])))
    stray = [s for s in sockets_under(d.runtime) if s not in own]
    if stray:
        problems.append(f"stray socket files: {stray}")
    return problems


def kill_rounds(work):
    rng = random.Random(SEED)
    d = Daemon(QMACHINED, os.path.join(work, "kill")).start()
    must_exist = set()
    created = 0
    kills = {"daemon": 0, "qemu": 0}
    failures = []
    try:
        c = d.client()
        for i in range(4):
            c.request("POST", "/v1/machines", {"name": f"k{i}", "spec": QUICK})
            must_exist.add(f"k{i}")
            c.request("POST", f"/v1/machines/k{i}/start")
        c.close()
        for rnd in range(ROUNDS):
            lock = threading.Lock()
            stop_ops = threading.Event()

            def ops(worker):
                nonlocal created
                cl = d.client(timeout=30)
                r = random.Random(SEED * 31 + rnd * 7 + worker)
                while not stop_ops.is_set():
                    with lock:
                        names = sorted(must_exist)
                    op = r.choice(["create", "start", "start", "stop", "qmp", "qmp", "delete"])
                    try:
                        if op == "create":
                            with lock:
                                created += 1
                                name = f"n{created}"
                            s, _, _ = cl.request("POST", "/v1/machines",
                                                 {"name": name, "spec": QUICK})
                            if s == 201:
                                with lock:
                                    must_exist.add(name)
                            cl.request("POST", f"/v1/machines/{name}/start")
                        elif names:
                            name = r.choice(names)
                            if op == "delete":
                                with lock:  # from now on it may or may not exist
                                    must_exist.discard(name)
                                cl.request("DELETE", f"/v1/machines/{name}?force=true")
                            elif op == "qmp":
                                cl.request("POST", f"/v1/machines/{name}/qmp",
                                           {"execute": "query-status"})
                            else:
                                cl.request("POST", f"/v1/machines/{name}/{op}",
                                           {"mode": "quit"} if op == "stop" else None)
                    except (OSError, ValueError, Exception):  # the daemon was killed under us
                        cl.close()
                        time.sleep(0.05)
                cl.close()

            threads = [threading.Thread(target=ops, args=(w,)) for w in range(3)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.05, 0.6))
            victim = "daemon" if rng.random() < 0.4 else "qemu"
            qemus = d.qemus()
            if victim == "qemu" and qemus:
                try:
                    os.kill(rng.choice(qemus), signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it went by itself meanwhile (a stop)
                kills["qemu"] += 1
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                d.kill()
                kills["daemon"] += 1
            stop_ops.set()
            for t in threads:
                t.join(60)
            if d.proc.poll() is not None:
                d.start()
            c = d.client()
            problems = invariants(d, c, must_exist, rnd)
            c.close()
            if problems:
                failures.append(f"round {rnd} ({victim} killed): " + "; ".join(problems[:6]))
        check(not failures, f"{ROUNDS} rounds of SIGKILL ({kills['daemon']} to the daemon, "
                            f"{kills['qemu']} to QEMU) during create/start/stop/qmp/delete: "
                            "definitions present and valid, live QEMUs attached once, no orphan, "
                            f"no zombie, no stray socket (seed {SEED})", "\n".join(failures))
        measure(f"SIGKILL rounds: {ROUNDS}, machines created {created}, "
                f"daemon restarts {d.starts - 1}")
    finally:
        d.stop()
        for pid in d.qemus():
            os.kill(pid, signal.SIGKILL)


# ---- the state directory ------------------------------------------------------------------------

def private_mounts():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
        return f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}"
    r = subprocess.run(["mount", "--make-rprivate", "/"], capture_output=True, text=True)
    return None if r.returncode == 0 else r.stderr


def mount(*argv):
    r = subprocess.run(["mount", *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"mount {' '.join(argv)}: {r.stderr}")


def big_spec(i):
    # ~6 KiB of definition: a few fill a small tmpfs.
    return dict(QUICK, args=["-smbios", "type=11,value=" + ("x%d" % i) * 1000])


def state_faults(work):
    if os.geteuid() != 0:
        check(False, "the state directory faults need root (mounts)")
        return
    problem = private_mounts()
    if not check(problem is None, "a private mount namespace for the state directory faults",
                 problem or ""):
        return
    base = os.path.join(work, "state-faults")

    # A full disk: a 64 KiB tmpfs.
    d = Daemon(QMACHINED, os.path.join(base, "full"))
    os.makedirs(d.state, mode=0o700)
    mount("-t", "tmpfs", "-o", "size=64k,nr_inodes=64,mode=0700", "tmpfs", d.state)
    d.start()
    c = d.client()
    saved, refusal = [], None
    for i in range(100):
        s, doc, text = c.request("POST", "/v1/machines", {"name": f"f{i}", "spec": big_spec(i)})
        if s == 201:
            saved.append(f"f{i}")
            continue
        refusal = (s, doc, text, f"f{i}")
        break
    check(refusal and refusal[0] == 500 and refusal[1].get("type", "").endswith(":SystemError")
          and "No space left on device" in refusal[1].get("detail", ""),
          f"a create on a full state directory fails clearly ({len(saved)} saved before)",
          str(refusal)[:500])
    s, _, _ = c.request("GET", f"/v1/machines/{refusal[3]}") if refusal else (0, 0, 0)
    check(s == 404, "the refused machine does not exist")
    leftovers = [f for f in os.listdir(d.state) if not f.endswith(".json")]
    check(not leftovers, "no temp file left behind", str(leftovers))
    s, doc, text = c.request("POST", f"/v1/machines/{saved[0]}/start") if saved else (0, 0, "")
    check(s == 200, "a saved machine still starts on the full disk", text[:300])
    c.close()
    d.stop()
    d.start()
    c = d.client()
    s, doc, _ = c.request("GET", "/v1/machines")
    names = sorted(m["name"] for m in doc["machines"])
    check(names == sorted(saved) and "0 problem(s)" in d.output(),
          "after a restart every saved definition loads, none lost or corrupt",
          f"{names} vs {sorted(saved)}")
    running = [m["name"] for m in doc["machines"] if m["state"] == "running"]
    check(running == saved[:1], "the machine started on the full disk was re-attached",
          str(running))
    s, _, _ = c.request("DELETE", f"/v1/machines/{saved[-1]}?force=true")
    s2, _, text = c.request("POST", "/v1/machines", {"name": "again", "spec": QUICK})
    check(s == 204 and s2 == 201, "once space is freed, creates work again", text[:300])
    c.request("POST", f"/v1/machines/{saved[0]}/kill")
    c.close()
    d.stop()

    # A read-only state directory (root ignores permissions: a read-only bind mount).
    d = Daemon(QMACHINED, os.path.join(base, "ro")).start()
    c = d.client()
    c.request("POST", "/v1/machines", {"name": "keep", "spec": QUICK})
    with open(os.path.join(d.state, "keep.json")) as f:
        before = f.read()
    mount("--bind", d.state, d.state)
    mount("-o", "remount,bind,ro", d.state)
    s, doc, text = c.request("POST", "/v1/machines", {"name": "new", "spec": QUICK})
    check(s == 500 and "Read-only file system" in (doc or {}).get("detail", ""),
          "a create on a read-only state directory fails clearly", text[:300])
    s, doc, text = c.request("PUT", "/v1/machines/keep/spec",
                             dict(QUICK, memory_mib=64), {"If-Match": "1"})
    check(s == 500 and "Read-only file system" in (doc or {}).get("detail", ""),
          "an update fails clearly", text[:300])
    s, doc, text = c.request("DELETE", "/v1/machines/keep")
    check(s == 500 and "Read-only file system" in (doc or {}).get("detail", ""),
          "a delete fails clearly", text[:300])
    s, doc, _ = c.request("GET", "/v1/machines/keep")
    check(s == 200 and doc.get("generation") == 1 and "memory_mib" not in doc.get("spec", {}),
          "the machine is still there, unchanged", str(doc)[:300])
    s1, _, t1 = c.request("POST", "/v1/machines/keep/start")
    s2, _, t2 = c.request("POST", "/v1/machines/keep/stop")
    check(s1 == 200 and s2 == 200, "start and stop need no write: they work", t1[:200] + t2[:200])
    s, _, _ = c.request("GET", "/v1/machines/new")
    check(s == 404, "the refused create left no machine")
    subprocess.run(["umount", d.state], check=True)
    with open(os.path.join(d.state, "keep.json")) as f:
        check(f.read() == before and sorted(os.listdir(d.state)) == ["keep.json"],
              "the definition file is intact, nothing else written")
    c.close()
    d.stop()

    # A definition truncated mid-write (a file cut short by hand or by a disk that lied), and the
    # temp file of a write a crash interrupted.
    d = Daemon(QMACHINED, os.path.join(base, "trunc")).start()
    c = d.client()
    for n in ("a", "b", "c"):
        c.request("POST", "/v1/machines", {"name": n, "spec": QUICK})
    c.close()
    d.stop()
    with open(os.path.join(d.state, "b.json")) as f:
        good_b = f.read()
    with open(os.path.join(d.state, "b.json"), "w") as f:
        f.write(good_b[:len(good_b) // 2])
    with open(os.path.join(d.state, ".c.json.tmp"), "w") as f:
        f.write('{"name": "c", "uu')
    d.start()
    c = d.client()
    s, doc, _ = c.request("GET", "/v1/machines")
    names = sorted(m["name"] for m in doc["machines"])
    files = sorted(os.listdir(d.state))
    check(names == ["a", "c"], "the truncated definition is refused, the others load", str(names))
    check(any(f.startswith("b.json.corrupt-") for f in files) and ".c.json.tmp" not in files,
          "it is renamed aside (kept for the operator), the crash's temp file removed", str(files))
    check("b.json" in d.output() and "1 problem(s)" in d.output(),
          "the log names it", "\n".join(l for l in d.output().splitlines() if "b.json" in l))
    c.close()
    d.stop()


# ---- load ---------------------------------------------------------------------------------------

def load(work):
    d = Daemon(QMACHINED, os.path.join(work, "load")).start()
    c = d.client()
    try:
        names = [f"l{i}" for i in range(LOAD_MACHINES)]
        for n in names:
            c.request("POST", "/v1/machines", {"name": n, "spec": QUICK})
        started = time.monotonic()

        def start(n):
            cl = d.client(timeout=120)
            s, _, t = cl.request("POST", f"/v1/machines/{n}/start")
            cl.close()
            return s, t

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(start, names))
        bad = [(n, s, t[:200]) for n, (s, t) in zip(names, outcomes) if s != 200]
        check(not bad, f"{LOAD_MACHINES} machines started", str(bad[:3]))
        measure(f"{LOAD_MACHINES} machines started in {time.monotonic() - started:.1f} s "
                f"(16 at a time)")
        base_fds = fd_count(d.pid)
        statuses = {}
        latencies = []
        errors = []
        lock = threading.Lock()
        go = threading.Event()
        end = [0.0]

        def client(k):
            r = random.Random(SEED + k)
            cl = d.client(timeout=60)
            mine, lat, errs = {}, [], []
            go.wait()
            while time.monotonic() < end[0]:
                n = r.choice(names)
                op = r.random()
                if op < 0.4:
                    req = ("POST", f"/v1/machines/{n}/qmp", {"execute": "query-status"})
                elif op < 0.8:
                    req = ("GET", f"/v1/machines/{n}", None)
                elif op < 0.95:
                    req = ("GET", "/v1/health", None)
                else:
                    req = ("GET", "/v1/machines", None)
                t = time.perf_counter()
                try:
                    s, _, text = cl.request(*req)
                except Exception as e:  # noqa: BLE001: any failure is counted and shown
                    errs.append(f"{req[0]} {req[1]}: {e!r}")
                    cl.close()
                    continue
                lat.append(time.perf_counter() - t)
                mine[s] = mine.get(s, 0) + 1
                if s not in (200, 429, 503):
                    errs.append(f"{req[0]} {req[1]}: {s} {text[:200]}")
            cl.close()
            with lock:
                for s, k2 in mine.items():
                    statuses[s] = statuses.get(s, 0) + k2
                latencies.extend(lat)
                errors.extend(errs)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(LOAD_CLIENTS)]
        for t in threads:
            t.start()
        cpu0, t0 = cpu_seconds(d.pid), time.monotonic()
        end[0] = t0 + LOAD_SECONDS
        go.set()
        for t in threads:
            t.join(LOAD_SECONDS + 120)
        busy = (cpu_seconds(d.pid) - cpu0) / (time.monotonic() - t0)
        total = sum(statuses.values())
        latencies.sort()
        q = (lambda f: latencies[int(len(latencies) * f) - 1] * 1e3) if latencies else \
            (lambda f: 0)
        measure(f"load: {LOAD_MACHINES} machines, {LOAD_CLIENTS} keep-alive clients, "
                f"{LOAD_SECONDS:.0f} s: {total} requests ({total / LOAD_SECONDS:.0f}/s), "
                f"statuses {statuses}, latency p50 {q(0.5):.1f} ms p99 {q(0.99):.1f} ms "
                f"max {q(1.0):.1f} ms; the daemon used {busy * 100:.0f}% of a core (the clients "
                "are Python threads of one process: their GIL, not the daemon, bounds the rate)")
        check(total > 0 and not errors,
              f"{LOAD_CLIENTS} concurrent clients over {LOAD_MACHINES} machines: no answer but "
              "200 or a documented limit", "\n".join(errors[:10]))
        s, doc, _ = c.request("GET", "/v1/health")
        check(s == 200 and doc["states"].get("running") == LOAD_MACHINES,
              "every machine still runs", str(doc))
        check(wait_until(lambda: fd_count(d.pid) == base_fds, 10),
              f"descriptors back to {base_fds} once the clients are gone",
              str(fd_count(d.pid)))
    finally:
        s, doc, _ = c.request("POST", "/v1/stop-all", {"concurrency": 32})
        c.close()
        d.stop()
        for pid in d.qemus():
            os.kill(pid, signal.SIGKILL)


def main():
    work = tempfile.mkdtemp(prefix="fault-test.")
    os.chmod(work, 0o755)
    print(f"# seed {SEED} (QM_FAULT_SEED), work {work}", flush=True)
    sections = {"cycles": cycles, "monitor": monitor_faults, "kill": kill_rounds,
                "load": load, "state": state_faults}  # state last: it unshares our mounts
    only = os.environ.get("QM_FAULT_ONLY")
    ok = False
    try:
        for name, section in sections.items():
            if only and name not in only.split(","):
                continue
            t = time.monotonic()
            try:
                section(work)
            except Exception:  # noqa: BLE001: a crash is a failed point, with its traceback
                import traceback
                check(False, f"the {name} section ran to its end", traceback.format_exc())
            measure(f"section {name}: {time.monotonic() - t:.1f} s")
        ok = all(good for good, _, _ in tap.results)
    finally:
        for pid in processes_mentioning(work):
            os.kill(pid, signal.SIGKILL)
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"# kept {work} for a look", flush=True)


tap.finish(main)
