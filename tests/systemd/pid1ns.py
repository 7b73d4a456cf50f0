# SPDX-License-Identifier: GPL-2.0-or-later
"""A real systemd as PID 1 of a private PID and mount namespace, for the systemd and machined
suites: these machines have no systemd as PID 1, but one boots in a namespace of its own in about
a second.

Namespace(work, dest, prefix) boots /lib/systemd/systemd (to basic.target) in `unshare --pid
--mount` with private tmpfs on /tmp, /var/tmp, /run, /var/lib, /srv, /var/log/journal,
/etc/systemd/system and /etc/dbus-1/system.d (systemd-tmpfiles would empty the host's /tmp, the
journal would land on the host's disk, and nothing the host enables starts), /etc as an overlay
whose changes stay in `work` (when the kernel allows one), the installed D-Bus
policy copied in, and DESTDIR+prefix bound over prefix. `ns.run(...)` runs a command inside
(nsenter), `ns.systemctl(...)`, `ns.show(unit, props...)`, `ns.curl(method, path, body)` talk to
the manager and to qmachined's REST socket. Everything in the namespace dies with its PID 1 at
close() (and if the test is killed: unshare dies with its parent and kills the namespace).
`persist` binds host directories over paths inside (a state directory kept across two boots).
"""
import ctypes
import json
import os
import signal
import subprocess
import sys
import time


def run(argv, timeout=60, **kw):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(argv, -1, e.stdout or "", f"timed out: {argv}")


def meson_options(build_dir):
    out = run(["meson", "introspect", "--buildoptions", build_dir])
    return {o["name"]: o["value"] for o in json.loads(out.stdout)}


def guest_dir():
    """The test guest's directory: $QM_GUEST_DIR, else what scripts/guest-image builds."""
    return os.environ.get("QM_GUEST_DIR") or run(
        [os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../scripts/guest-image")],
        timeout=600).stdout.strip().splitlines()[-1]


def install(build_dir, dest, timeout=60):
    """`meson install` of the build into the DESTDIR `dest`."""
    return run(["meson", "install", "-C", build_dir, "--no-rebuild", "--quiet", "--destdir", dest],
               timeout=timeout)


class Tap:
    """Results as TAP: check() records one (and, with `progress`, says it at once); finish() runs
    the test's main, turns a crash into a failed point, prints the plan and exits."""

    def __init__(self, progress=True, detail_lines=40):
        self.results = []
        self.progress = progress
        self.detail_lines = detail_lines

    def check(self, ok, what, detail=""):
        self.results.append((bool(ok), what, detail))
        if self.progress:
            print(f"# {'ok' if ok else 'FAILED'}: {what}", flush=True)
        return ok

    def finish(self, main, crash_point="the test ran to the end"):
        try:
            main()
        except SystemExit:
            raise
        except Exception:
            import traceback
            self.check(False, crash_point, traceback.format_exc())
        print(f"1..{len(self.results)}")
        for i, (ok, what, detail) in enumerate(self.results, 1):
            print(f"{'ok' if ok else 'not ok'} {i} - {what}")
            if not ok and detail:
                for line in str(detail).splitlines()[-self.detail_lines:]:
                    print(f"#   {line}")
        sys.exit(0 if all(ok for ok, _, _ in self.results) else 1)


def die_with_parent():
    # PR_SET_PDEATHSIG: if this test dies, unshare dies, and --kill-child takes the namespace.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class Namespace:
    def __init__(self, work, dest, prefix, persist=None):
        self.work = work
        # Every source is under `work`, named relative to it: the script changes into `work`
        # first, so they stay reachable through its current directory once the tmpfs mounts hide
        # them (a build directory under /tmp, say).
        def rel(path):
            r = os.path.relpath(path, work)
            if r.startswith(".."):
                raise ValueError(f"{path} is not under {work}")
            return "./" + r
        binds = "".join(f"mkdir -p '{inside}'\nmount --bind '{rel(outside)}' '{inside}'\n"
                        for inside, outside in (persist or {}).items())
        boot = os.path.join(work, "boot.sh")
        installed = rel(dest + "/" + prefix.lstrip("/"))
        policy = installed + "/share/dbus-1/system.d/org.qmachined1.conf"
        with open(boot, "w") as f:
            f.write(f"""#!/bin/sh
set -e
cd '{work}'
mount --make-rprivate /
# /etc as an overlay whose changes stay in the work directory (systemd-sysusers, enabled units):
# the host's own /etc is never written. Where no overlay can be mounted, the host's /etc is shared.
mkdir -p etc-upper etc-work
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$PWD/etc-upper,workdir=$PWD/etc-work" /etc ||
  echo "pid1ns: no overlay over /etc" >&2
for d in /tmp /var/tmp /run /var/lib /srv /etc/systemd/system /var/log/journal \
         /etc/dbus-1/system.d; do
  # Only over what exists: nothing of the host's is created.
  if [ -d "$d" ]; then mount -t tmpfs -o mode=0755 tmpfs "$d"; fi
done
chmod 1777 /tmp /var/tmp
mkdir -p /etc/dbus-1/system.d
cp '{policy}' /etc/dbus-1/system.d/
mount --bind '{installed}' '{prefix}'
{binds}exec /lib/systemd/systemd --system --unit=basic.target --log-level=warning
""")
        os.chmod(boot, 0o755)
        self.log = open(os.path.join(work, "console.log"), "w")
        self.proc = subprocess.Popen(
            ["unshare", "--fork", "--pid", "--mount", "--mount-proc", "--uts",
             "--kill-child=SIGKILL", boot],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent)
        self.pid1 = None
        self.pidns = None

    def find_pid1(self, deadline=20):
        end = time.time() + deadline
        while time.time() < end:
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                if ppid == self.proc.pid and b"systemd" in cmd:
                    self.pid1 = int(pid)
                    try:
                        self.pidns = os.readlink(f"/proc/{pid}/ns/pid")
                    except OSError:
                        self.pidns = None
                    return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def run(self, *argv, timeout=60, **kw):
        return run(["nsenter", "-t", str(self.pid1), "-p", "-m", "-u", "--"] + list(argv),
                   timeout=timeout, **kw)

    def systemctl(self, *argv, timeout=60):
        return self.run("systemctl", "--no-pager", *argv, timeout=timeout)

    def show(self, unit, *props):
        r = self.systemctl("show", unit, *[f"-p{p}" for p in props])
        return dict(l.split("=", 1) for l in r.stdout.splitlines() if "=" in l)

    def curl(self, method, path, body=None, timeout=60, as_user=None):
        """as_user: None (root), "member" (nobody in the group qmachined) or "outsider" (nobody);
        a refused connection is code 0."""
        argv = [] if as_user is None else [
            "setpriv", "--reuid=nobody", "--regid=nogroup",
            "--groups=qmachined" if as_user == "member" else "--clear-groups", "--"]
        argv += ["curl", "-s", "-m", str(timeout), "--unix-socket", "/run/qmachined/qmachined.sock",
                "-X", method, "-w", "\n%{http_code}", f"http://qmachined{path}"]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        r = self.run(*argv, timeout=timeout + 5)
        text, _, code = r.stdout.rpartition("\n")
        try:
            doc = json.loads(text) if text else None
        except ValueError:
            doc = None
        return int(code or 0), doc, text

    def close(self):
        if self.pid1:
            try:
                os.kill(self.pid1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        # The kernel kills everything in the namespace with its PID 1, but a QEMU may take a
        # moment to go: the next namespace's systemd must not meet it in the cgroups they share.
        if self.pidns:
            wait_until(lambda: not self.members(), 20)
        self.log.close()

    def members(self):
        """The pids of processes still in this namespace."""
        out = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if os.readlink(f"/proc/{pid}/ns/pid") == self.pidns:
                        out.append(int(pid))
                except OSError:
                    pass
        return out


def wait_until(predicate, deadline=30, step=0.1):
    end = time.time() + deadline
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


