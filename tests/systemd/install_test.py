#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""What `meson install` puts on a system, checked in a DESTDIR (TAP output).

  install_test.py BUILD_DIR SOURCE_DIR

1. `meson install --destdir` installs exactly the expected files, with their modes.
2. `systemd-analyze verify --root` accepts the system units (the commands they run must exist
   in the root: the test's root is the DESTDIR plus the host's targets and /bin/kill), and
   rejects them when the installed qmachined is missing (the check is real).
3. The unit says what the service needs (Type=notify, KillMode=process, the directories...) and
   `systemd-analyze security --offline` rates it at most EXPOSURE_MAX.
4. qmachined-generator writes the image-dirs drop-in (verify accepts the unit with it), and
   writes nothing for a configuration qmachined would refuse.
5. sysusers.d and tmpfiles.d applied to a scratch root create the group qmachined, the user
   qmachined-qemu (in kvm, not in qmachined) and the image directory.
6. The D-Bus activation files name the unit's alias; the man pages document every option of
   `qmachined --help` and every command of `qmachinectl --help`.
"""
import glob
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile

from pid1ns import Tap, install

EXPOSURE_MAX = 3.5  # systemd-analyze security (252): measured 3.4 offline, 3.2 in a running manager

build_dir, source_dir = sys.argv[1], sys.argv[2]
tap = Tap(progress=False, detail_lines=60)
check = tap.check


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


def options():
    out = run(["meson", "introspect", "--buildoptions", build_dir])
    return {o["name"]: o["value"] for o in json.loads(out.stdout)}


def under_prefix(opts, key):
    value = opts[key]
    return value if value.startswith("/") else os.path.join(opts["prefix"], value)


def installed_files(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            out["/" + os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


def unit_settings(path):
    settings, section = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                section = line.strip("[]")
            elif line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                settings.setdefault((section, key), []).append(value)
    return settings


def main():
    opts = options()
    prefix = opts["prefix"]
    sbindir, bindir = under_prefix(opts, "sbindir"), under_prefix(opts, "bindir")
    datadir, mandir = under_prefix(opts, "datadir"), under_prefix(opts, "mandir")
    sysconfdir = under_prefix(opts, "sysconfdir")
    libsystemd = os.path.join(prefix, "lib", "systemd")

    work = tempfile.mkdtemp(prefix="qm-install.")
    try:
        dest = os.path.join(work, "dest")
        r = install(build_dir, dest, timeout=120)
        if not check(r.returncode == 0, "meson install --destdir", r.stdout + r.stderr):
            return

        # 1. The file list.
        expected = {
            f"{sbindir}/qmachined": 0o755,
            f"{bindir}/qmachinectl": 0o755,
            f"{libsystemd}/system/qmachined.service": 0o644,
            f"{libsystemd}/system/qmachined.socket": 0o644,
            f"{libsystemd}/system/qmachined-guests.service": 0o644,
            f"{libsystemd}/user/qmachined.service": 0o644,
            f"{libsystemd}/user/qmachined.socket": 0o644,
            f"{libsystemd}/system-generators/qmachined-generator": 0o755,
            f"{prefix}/lib/sysusers.d/qmachined.conf": 0o644,
            f"{prefix}/lib/tmpfiles.d/qmachined.conf": 0o644,
            f"{datadir}/dbus-1/system.d/org.qmachined1.conf": 0o644,
            f"{datadir}/dbus-1/system-services/org.qmachined1.service": 0o644,
            f"{datadir}/dbus-1/services/org.qmachined1.service": 0o644,
            f"{datadir}/dbus-1/interfaces/org.qmachined1.Manager.xml": 0o644,
            f"{datadir}/dbus-1/interfaces/org.qmachined1.Machine.xml": 0o644,
            f"{datadir}/bash-completion/completions/qmachinectl": 0o644,
            f"{mandir}/man8/qmachined.8": 0o644,
            f"{mandir}/man1/qmachinectl.1": 0o644,
            f"{sysconfdir}/qmachined/qmachined.conf": 0o644,
        }
        for name in ["openapi.yaml", "machine.schema.json", "errors.json", "errors.md",
                     "states.md"]:
            expected[f"{datadir}/qmachined/proto/{name}"] = 0o644
        got = installed_files(dest)
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        check(not missing and not extra, "the installed files are exactly the expected ones",
              f"missing: {missing}\nunexpected: {extra}")
        wrong_modes = {p: oct(m) for p, m in got.items() if p in expected and m != expected[p]}
        check(not wrong_modes, "the installed files have their modes", str(wrong_modes))

        # 2. systemd-analyze verify on a root: the DESTDIR, the host's targets and slices (the
        # units' dependencies), /bin/kill and /bin/true (commands the units run).
        root = dest
        host_units = os.path.join(root, "usr/lib/systemd/system")
        os.makedirs(host_units, exist_ok=True)
        for path in glob.glob("/usr/lib/systemd/system/*.target") + \
                glob.glob("/usr/lib/systemd/system/*.slice") + \
                ["/usr/lib/systemd/system/dbus.socket"]:
            target = os.path.join(host_units, os.path.basename(path))
            if os.path.exists(path) and not os.path.exists(target):
                shutil.copy(path, target)
        os.makedirs(os.path.join(root, "bin"), exist_ok=True)
        for tool in ["kill", "true"]:  # ExecReload=, ExecStart= of qmachined-guests.service
            shutil.copy(shutil.which(tool) or f"/bin/{tool}", os.path.join(root, "bin", tool))
        units = [f"{libsystemd}/system/qmachined.service", f"{libsystemd}/system/qmachined.socket",
                 f"{libsystemd}/system/qmachined-guests.service"]

        def verify():
            return run(["systemd-analyze", "verify", "--man=no", f"--root={root}"] + units,
                       cwd=root)

        r = verify()
        check(r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "",
              "systemd-analyze verify accepts qmachined.service, .socket and -guests.service",
              r.stdout + r.stderr)
        binary = root + f"{sbindir}/qmachined"
        os.rename(binary, binary + ".away")
        r = verify()
        check(r.returncode != 0 and "qmachined" in r.stderr and "not executable" in r.stderr,
              "systemd-analyze verify refuses the unit without the installed qmachined",
              r.stdout + r.stderr)
        os.rename(binary + ".away", binary)

        guests = unit_settings(root + f"{libsystemd}/system/qmachined-guests.service")
        after = " ".join(guests.get(("Unit", "After"), []))
        check(guests.get(("Service", "ExecStop")) ==
              [f"{bindir}/qmachinectl stop --all --concurrency 16"] and
              "qmachined.service" in after.split() and
              guests.get(("Service", "RemainAfterExit")) == ["yes"] and
              guests.get(("Service", "TimeoutStopSec")) == ["10min"],
              "qmachined-guests.service: after qmachined (stopped before it), stop --all, "
              "10 minutes for it",
              str(guests))

        # The user units: systemd 252 has no --root for --user, so they are verified in a copy
        # whose ExecStart= names the DESTDIR's qmachined (the only change).
        user_copy = os.path.join(work, "user-units")
        os.makedirs(user_copy)
        for unit in ["qmachined.service", "qmachined.socket"]:
            text = open(root + f"{libsystemd}/user/{unit}").read()
            with open(os.path.join(user_copy, unit), "w") as f:
                f.write(text.replace(f"ExecStart={sbindir}/qmachined",
                                     f"ExecStart={root}{sbindir}/qmachined"))
        xdg = os.path.join(work, "xdg-runtime")
        os.makedirs(xdg, mode=0o700)
        r = run(["systemd-analyze", "--user", "verify", "--man=no",
                 os.path.join(user_copy, "qmachined.service"),
                 os.path.join(user_copy, "qmachined.socket")],
                env=dict(os.environ, XDG_RUNTIME_DIR=xdg, HOME=work))
        check(r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "",
              "systemd-analyze --user verify accepts the user units", r.stdout + r.stderr)

        # 3. What the unit says.
        service = unit_settings(root + f"{libsystemd}/system/qmachined.service")
        want = {
            "Type": "notify", "NotifyAccess": "main", "KillMode": "process",
            "Restart": "on-failure", "StateDirectory": "qmachined",
            "RuntimeDirectory": "qmachined", "RuntimeDirectoryPreserve": "yes",
            "ProtectSystem": "strict", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
            "SystemCallArchitectures": "native", "Group": "qmachined",
            "WatchdogSec": "30s", "ProtectHome": "yes",
            "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        }
        wrong = {k: service.get(("Service", k)) for k, v in want.items()
                 if service.get(("Service", k), [None])[-1] != v}
        check(not wrong, "qmachined.service: notify, KillMode=process, directories, sandbox",
              str(wrong))
        exec_start = service.get(("Service", "ExecStart"), [""])[-1].split()
        check(exec_start[:1] == [f"{sbindir}/qmachined"] and
              exec_start[1:] == [f"--config={sysconfdir}/qmachined/qmachined.conf"],
              "ExecStart runs the installed qmachined with the installed configuration",
              str(exec_start))
        limit = service.get(("Service", "LimitNOFILE"), [""])[-1]
        check(re.fullmatch(r"\d+:\d+", limit) and int(limit.split(":")[1]) >= 65536,
              "LimitNOFILE allows hundreds of machines (hard limit >= 65536)", limit)
        devices = service.get(("Service", "DeviceAllow"), [])
        check("/dev/kvm rw" in devices and "/dev/net/tun rw" in devices,
              "DeviceAllow= /dev/kvm and /dev/net/tun", str(devices))
        socket = unit_settings(root + f"{libsystemd}/system/qmachined.socket")
        check(socket.get(("Socket", "ListenStream")) == ["/run/qmachined/qmachined.sock"] and
              socket.get(("Socket", "SocketMode")) == ["0660"] and
              socket.get(("Socket", "SocketGroup")) == ["qmachined"],
              "qmachined.socket: the daemon's default path, 0660, group qmachined",
              str(socket))
        r = run(["systemd-analyze", "security", "--offline=true", f"--root={root}",
                 f"{libsystemd}/system/qmachined.service"], cwd=root)
        m = re.search(r"Overall exposure level for qmachined.service: ([0-9.]+)", r.stdout)
        check(m and float(m.group(1)) <= EXPOSURE_MAX,
              f"systemd-analyze security: exposure {m.group(1) if m else '?'} <= {EXPOSURE_MAX}",
              r.stdout[-2000:] + r.stderr)
        print(f"# systemd-analyze security --offline: {m.group(1) if m else '?'}")

        # 4. The generator.
        generator = root + f"{libsystemd}/system-generators/qmachined-generator"
        conf = os.path.join(work, "qmachined.conf")
        with open(conf, "w") as f:
            f.write("# images\nimage-dirs = /srv/images, /home/vm/disks\n")
        out = os.path.join(work, "generator")
        os.makedirs(out)
        env = dict(os.environ, QM_GENERATOR_CONFIG=conf)
        r = run([generator, out, out, out], env=env)
        dropin = os.path.join(out, "qmachined.service.d", "50-image-dirs.conf")
        text = open(dropin).read() if os.path.exists(dropin) else ""
        lines = [l for l in text.splitlines() if l and not l.startswith("#")]
        check(r.returncode == 0 and lines == ["[Service]", "ReadWritePaths=-/srv/images",
                                              "ReadWritePaths=-/home/vm/disks",
                                              "ProtectHome=read-only"],
              "qmachined-generator: image-dirs become ReadWritePaths= (and /home read-only)",
              r.stderr + text)
        # The drop-in where systemd reads one, and verify still accepts the unit.
        etc_dropins = os.path.join(root, "etc/systemd/system/qmachined.service.d")
        os.makedirs(etc_dropins)
        shutil.copy(dropin, etc_dropins)
        r = verify()
        check(r.returncode == 0, "systemd-analyze verify accepts the unit with the drop-in",
              r.stdout + r.stderr)
        shutil.rmtree(os.path.join(root, "etc/systemd"))
        with open(conf, "w") as f:
            f.write("image-dirs = relative/dir\n")
        out2 = os.path.join(work, "generator2")
        os.makedirs(out2)
        r = run([generator, out2, out2, out2], env=env)
        check(r.returncode != 0 and "not an absolute path" in r.stderr and
              os.listdir(out2) == [],
              "qmachined-generator writes nothing for a configuration qmachined refuses",
              r.stderr)
        with open(conf, "w") as f:
            f.write("")
        r = run([generator, out2], env=dict(os.environ, QM_GENERATOR_CONFIG=conf + ".none"))
        text = open(os.path.join(out2, "qmachined.service.d/50-image-dirs.conf")).read() \
            if r.returncode == 0 else r.stderr
        check(r.returncode == 0 and "ReadWritePaths=-/var/lib/qmachined-images" in text,
              "qmachined-generator without a configuration file: the default image directory",
              text)

        # 5. sysusers.d and tmpfiles.d on a scratch root.
        scratch = os.path.join(work, "scratch")
        os.makedirs(os.path.join(scratch, "etc"))
        for name in ["passwd", "group", "shadow", "gshadow"]:
            with open(os.path.join(scratch, "etc", name), "w") as f:
                f.write({"passwd": "root:x:0:0:root:/root:/bin/bash\n",
                         "group": "root:x:0:\n"}.get(name, ""))
        r = run(["systemd-sysusers", f"--root={scratch}",
                 root + f"{prefix}/lib/sysusers.d/qmachined.conf"])
        groups = {l.split(":")[0]: l.strip().split(":")
                  for l in open(os.path.join(scratch, "etc/group"))}
        users = {l.split(":")[0]: l.strip().split(":")
                 for l in open(os.path.join(scratch, "etc/passwd"))}
        qemu = users.get("qmachined-qemu")
        check(r.returncode == 0 and "qmachined" in groups and qemu is not None and
              int(qemu[2]) < 1000 and int(qemu[2]) > 0 and qemu[6] == "/usr/sbin/nologin" and
              "qmachined-qemu" in groups.get("kvm", ["", "", "", ""])[3].split(",") and
              "qmachined-qemu" not in groups["qmachined"][3].split(","),
              "sysusers.d: group qmachined, system user qmachined-qemu in kvm, not in qmachined",
              r.stderr + str(groups) + str(users))
        r = run(["systemd-tmpfiles", f"--root={scratch}", "--create",
                 root + f"{prefix}/lib/tmpfiles.d/qmachined.conf"])
        images = os.path.join(scratch, "var/lib/qmachined-images")
        st = os.stat(images) if os.path.isdir(images) else None
        check(r.returncode == 0 and st is not None and stat.S_IMODE(st.st_mode) == 0o770 and
              st.st_uid == int(qemu[2]) and st.st_gid == int(groups["qmachined"][2]),
              "tmpfiles.d: /var/lib/qmachined-images 0770 qmachined-qemu:qmachined",
              r.stderr + str(st))
        # qmachined.socket's directory: systemd would create it root:root, keeping the group
        # qmachined out of a socket-activated daemon until the service first ran.
        runtime = os.path.join(scratch, "run/qmachined")
        st = os.stat(runtime) if os.path.isdir(runtime) else None
        check(r.returncode == 0 and st is not None and stat.S_IMODE(st.st_mode) == 0o710 and
              st.st_uid == 0 and st.st_gid == int(groups["qmachined"][2]),
              "tmpfiles.d: /run/qmachined 0710 root:qmachined from boot", str(st))

        # 6. D-Bus activation and the man pages.
        alias = service.get(("Install", "Alias"), [""])[-1]
        for bus_file in [f"{datadir}/dbus-1/system-services/org.qmachined1.service",
                         f"{datadir}/dbus-1/services/org.qmachined1.service"]:
            text = open(root + bus_file).read()
            check("Name=org.qmachined1" in text and f"SystemdService={alias}" in text and
                  alias == "dbus-org.qmachined1.service",
                  f"{os.path.basename(os.path.dirname(bus_file))}: activates {alias}", text)
        qmachined = root + f"{sbindir}/qmachined"
        helptext = run([qmachined, "--help"]).stdout
        page = open(root + f"{mandir}/man8/qmachined.8").read().replace("\\-", "-")
        flags = sorted(set(re.findall(r"--[a-z][a-z-]+", helptext)) - {"--option"})
        undocumented = [f for f in flags if f not in page]
        check(flags and not undocumented, f"qmachined(8) documents all {len(flags)} options",
              str(undocumented))
        ctl_help = run([root + f"{bindir}/qmachinectl", "--help"]).stdout
        commands = re.findall(r"^  ([a-z]+)\s{2,}", ctl_help.split("Commands:")[1].split(
            "Options")[0], re.M)
        ctl_page = open(root + f"{mandir}/man1/qmachinectl.1").read().replace("\\-", "-")
        missing_cmds = [c for c in commands if not re.search(rf"^\.SS {c}\b|\\fB{c}\\fR", ctl_page,
                                                             re.M)]
        check(len(commands) >= 15 and not missing_cmds,
              f"qmachinectl(1) documents all {len(commands)} commands", str(missing_cmds))
    finally:
        shutil.rmtree(work, ignore_errors=True)


tap.finish(main, 'install test ran to the end')
