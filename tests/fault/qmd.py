# SPDX-License-Identifier: GPL-2.0-or-later
"""A qmachined process for Python tests: started on private directories, talked to over its REST
unix socket with http.client (keep-alive) or curl, and what /proc says about it and its QEMUs."""
import http.client
import json
import os
import signal
import socket
import subprocess
import time


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=60):
        super().__init__("qmachined", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Client:
    """One keep-alive connection; reconnects once when the daemon closed it."""

    def __init__(self, path, timeout=60):
        self.path = path
        self.timeout = timeout
        self.conn = None

    def request(self, method, target, body=None, headers=None):
        """(status, parsed JSON body or None, text)."""
        data = json.dumps(body).encode() if body is not None else None
        hdrs = dict(headers or {})
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        for attempt in range(2):
            try:
                if self.conn is None:
                    self.conn = UnixHTTPConnection(self.path, self.timeout)
                self.conn.request(method, target, body=data, headers=hdrs)
                r = self.conn.getresponse()
                text = r.read().decode("utf-8", "replace")
                if r.getheader("Connection", "").lower() == "close":
                    self.close()
                break
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                self.close()
                if attempt == 1:
                    raise
        try:
            doc = json.loads(text) if text else None
        except ValueError:
            doc = None
        return r.status, doc, text

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def pid_alive(pid):
    """Running and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def proc_stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return fields  # [0] state, [1] ppid


def children(pid):
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if int(proc_stat(p)[1]) == pid:
                    out.append(int(p))
            except (OSError, IndexError):
                pass
    return sorted(out)


def zombies_of(pid):
    out = []
    for c in children(pid):
        try:
            if proc_stat(c)[0] == "Z":
                out.append(c)
        except OSError:
            pass
    return out


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def cpu_seconds(pid):
    """User + system CPU time the process used so far."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def processes_mentioning(text):
    """Pids whose command line or stdout mentions `text` (each QEMU's stdout is its qemu.log in
    the runtime directory)."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().decode("utf-8", "replace")
            try:
                target = os.readlink(f"/proc/{p}/fd/1")
            except OSError:
                target = ""
            if (text in cmd or text in target) and pid_alive(p):
                out.append(int(p))
        except OSError:
            pass
    return sorted(out)


def wait_until(predicate, deadline=30.0, step=0.02):
    end = time.monotonic() + deadline
    while True:
        v = predicate()
        if v or time.monotonic() >= end:
            return v
        time.sleep(step)


class Daemon:
    """qmachined on `work`/state and `work`/runtime, its output in `work`/daemon.N.log."""

    def __init__(self, binary, work, extra=()):
        self.binary = binary
        self.work = work
        os.makedirs(work, exist_ok=True)
        self.state = os.path.join(work, "state")
        self.runtime = os.path.join(work, "runtime")
        self.socket = os.path.join(self.runtime, "qmachined.sock")
        self.extra = list(extra)
        self.proc = None
        self.starts = 0
        self.log_path = None

    def args(self):
        return [self.binary, "--state-dir", self.state, "--runtime-dir", self.runtime,
                "--bus", "none", "--machined", "off", "--qemu-user", "", "--log-level", "info",
                *self.extra]

    def start(self, wait=True, argv=None):
        self.starts += 1
        self.log_path = os.path.join(self.work, f"daemon.{self.starts}.log")
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv or self.args(), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        if wait and not self.wait_ready():
            raise RuntimeError("qmachined did not become ready: " + self.output()[-2000:])
        return self

    def wait_ready(self, deadline=60):
        def ready():
            if self.proc.poll() is not None:
                return True
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.socket)
                s.close()
                return True
            except OSError:
                return False
        return wait_until(ready, deadline) and self.proc.poll() is None

    def output(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except (OSError, TypeError):
            return ""

    @property
    def pid(self):
        return self.proc.pid

    def qemus(self):
        """The live processes that are this daemon's QEMUs (they log into its runtime directory),
        the daemon's own process excepted."""
        me = self.proc.pid if self.proc else None
        return [p for p in processes_mentioning(self.work) if p != me]

    def client(self, timeout=60):
        return Client(self.socket, timeout)

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)

    def stop(self):
        """SIGTERM and wait (the policy decides what happens to machines)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
