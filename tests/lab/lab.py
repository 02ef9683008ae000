#!/usr/bin/env python3
"""A two-host SSH lab on one machine, for end-to-end tests of drtool over Ansible.

Layout (all names carry a per-lab id, so labs never clash with each other or with leftovers)::

    root namespace (controller: pytest, ansible)
        |  bin/ssh wrapper = nsenter --net=/run/netns/drlab-<id>-ctl ssh -F ssh_config
    drlab-<id>-ctl    bridge br0 198.51.100.1/24, ports v-primary, v-secondary
    drlab-<id>-pri    eth0 198.51.100.10, own mount/uts/pid namespaces, hostname "primary"
    drlab-<id>-sec    eth0 198.51.100.20, own mount/uts/pid namespaces, hostname "secondary"

Each host is a pid namespace whose PID 1 is hostinit.py (started through ``unshare``); it mounts
the host's private tmpfs directories (storage, /tmp, /run, ...) and then only reaps orphans. sshd
runs inside the host via ``nsenter`` and can be killed and restarted without losing the host's
files. Everything else (binaries, /etc, /root, the venv) is the machine's shared root filesystem.

Use from Python::

    with running_lab() as lab:
        lab.ssh("primary", "hostname")
        subprocess.run(["ansible", "all", "-m", "ping"], env=lab.env)

or from a shell: ``python tests/lab/lab.py up`` (prints how to use it), ``status``, ``down``.
Needs root, iproute2, util-linux (nsenter, unshare) and openssh-server/-client.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

PREFIX = "drlab-"
SUBNET = "198.51.100"  # TEST-NET-2; the root namespace already uses 192.0.2.0/24
CONTROL_ADDRESS = f"{SUBNET}.1"
PREFIX_LEN = 24
# host name -> (namespace suffix, last address octet)
HOST_LAYOUT: dict[str, tuple[str, int]] = {"primary": ("pri", 10), "secondary": ("sec", 20)}
DEFAULT_STORAGE = "/srv/drtool"
# Directories each host gets as its own empty tmpfs, as separate machines would have them. drtool's
# default state root is here so two "hosts" never share state by accident through the root fs.
DEFAULT_PRIVATE_DIRS: dict[str, str] = {
    "/tmp": "1777",
    "/run": "0755",
    "/dev/shm": "1777",
    "/var/log": "0755",
    "/var/lib/drtool": "0755",
}
DEFAULT_BASE_DIR = os.environ.get("DRLAB_BASE_DIR", "/var/tmp")  # must not be a private dir
def _inside(path: str, directories: Iterable[str]) -> str | None:
    """The directory of ``directories`` that ``path`` lies in, if any."""
    return next((d for d in directories if path.startswith(d.rstrip("/") + "/")), None)


def _visible_python(python: str, private: Mapping[str, str]) -> str:
    """An interpreter the hosts can see: a venv under a host-private dir (a checkout in /tmp) is
    hidden by the host's own tmpfs there, so its real interpreter is used instead."""
    if _inside(python, private) is None:
        return python
    real = os.path.realpath(python)
    hidden = _inside(real, private)
    if hidden is not None:
        raise LabError(f"the lab hosts cannot see {python}: it lies in {hidden}, which each host mounts "
                       "as its own tmpfs; give python= an interpreter outside "
                       f"{', '.join(sorted(private))}")
    return real


REQUIRED_TOOLS = ("ip", "nsenter", "unshare", "sshd", "ssh", "ssh-keygen", "bash")
HOSTINIT = Path(__file__).resolve().with_name("hostinit.py")
SETUP_TIMEOUT = 15.0


class LabError(RuntimeError):
    pass


# --------------------------------------------------------------------------- process helpers

def find_tool(name: str) -> str | None:
    """``name`` on PATH, else in the sbin dirs a non-login root shell may not have on PATH."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        raise LabError(f"missing tool: {name}")
    return path


def _start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone.

    PIDs are recorded together with this so a recycled PID is never mistaken for a lab process.
    Zombies count as gone: they run nothing and hold no namespace.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] == b"Z":
        return None
    return int(fields[19])


def _alive(record: Mapping[str, Any]) -> bool:
    start = record.get("start")
    return start is not None and _start_time(record["pid"]) == start


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    # /proc/PID/task/TID/children needs CONFIG_PROC_CHILDREN, which this kernel lacks.
    return [child for child in _all_pids() if _parent_of(child) == pid]


def _ns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return st.st_dev, st.st_ino


def _pids_in_ns(ns_file: str, kind: str) -> list[int]:
    """PIDs whose ``kind`` namespace ("net", "pid") is the one ``ns_file`` refers to."""
    target = _ns_id(ns_file)
    if target is None:
        return []
    return [pid for pid in _all_pids() if _ns_id(f"/proc/{pid}/ns/{kind}") == target]


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _reap(pid: int) -> None:
    # Only our own children can be reaped; for the rest (a lab started by the CLI) init does it.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: if the test process dies (even by SIGKILL) its hosts die too; unshare
    # --kill-child then takes the pid namespace down. Runs in the child between fork and exec.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str,
              diagnose: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not predicate():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f}s waiting for {what}{diagnose()}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


# --------------------------------------------------------------------------- the lab

class Lab:
    """One running (or torn down) lab. Create with :meth:`up`, reattach with :meth:`load`."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.dir = Path(state["dir"])
        self._popens: list[subprocess.Popen] = []

    # ----------------------------------------------------------------- naming and files

    @property
    def id(self) -> str:
        return self.state["id"]

    @property
    def control_netns(self) -> str:
        return self.state["control_netns"]

    @property
    def netns_names(self) -> list[str]:
        return [self.control_netns] + [host["netns"] for host in self.state["hosts"].values()]

    @property
    def hosts(self) -> dict[str, dict[str, Any]]:
        """{"primary": {"address", "storage", "netns", "hostname", "private_dirs", ...}, ...}"""
        return self.state["hosts"]

    @property
    def inventory(self) -> Path:
        return self.dir / "inventory.yml"

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def bin_dir(self) -> Path:
        return self.dir / "bin"

    @property
    def ssh_wrapper(self) -> Path:
        return self.bin_dir / "ssh"

    @property
    def env_overrides(self) -> dict[str, str]:
        """Only the variables the lab sets (PATH with the wrappers first, ANSIBLE_*)."""
        return self.state["env"]

    @property
    def env(self) -> dict[str, str]:
        """A complete environment for subprocess: ``subprocess.run([...ansible...], env=lab.env)``."""
        env = {**os.environ, **self.env_overrides}
        env["PATH"] = f"{self.bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        return env

    def _host(self, name: str) -> dict[str, Any]:
        try:
            return self.hosts[name]
        except KeyError:
            raise LabError(f"no host {name!r} in lab {self.id} (hosts: {', '.join(self.hosts)})") from None

    def _save(self) -> None:
        tmp = self.dir / "lab.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.rename(self.dir / "lab.json")

    def _record(self, host: str | None, what: str, pid: int) -> dict[str, Any]:
        record = {"pid": pid, "start": _start_time(pid), "what": what, "host": host}
        self.state["processes"].append(record)
        return record

    def recorded_processes(self) -> list[dict[str, Any]]:
        """Every process the lab started itself: {"pid", "start", "what", "host"}."""
        return list(self.state["processes"])

    def namespace_processes(self) -> list[int]:
        """PIDs currently inside any of the lab's network namespaces (includes ssh ControlMasters)."""
        pids: set[int] = set()
        for name in self.netns_names:
            pids.update(_pids_in_ns(f"/run/netns/{name}", "net"))
        return sorted(pids)

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    def up(cls, *, storage: str = DEFAULT_STORAGE, python: str | None = None,
           private_dirs: Mapping[str, str] | None = None, base_dir: str | os.PathLike = DEFAULT_BASE_DIR,
           detached: bool = False, lab_id: str | None = None) -> Lab:
        """Create and start a lab; on any failure everything created so far is removed.

        storage: the per-host tmpfs path drtool uses for volumes.
        python: interpreter Ansible uses on the hosts (they share the root fs, so any local one).
        private_dirs: {path: mode} of further per-host tmpfs dirs (default DEFAULT_PRIVATE_DIRS).
        detached: the lab outlives this process (CLI ``up``); otherwise it dies with it.
        """
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network, mount and pid namespaces)")
        lab_id = lab_id or secrets.token_hex(3)
        lab_dir = Path(base_dir) / f"{PREFIX}{lab_id}"
        private = dict(DEFAULT_PRIVATE_DIRS if private_dirs is None else private_dirs)
        private[storage] = "0755"
        for path in private:
            if not os.path.isabs(path) or path == "/":
                raise LabError(f"private dir must be an absolute path below /: {path!r}")
            if str(lab_dir).startswith(path.rstrip("/") + "/"):
                raise LabError(f"the lab dir {lab_dir} must not lie inside the private dir {path}")
        lab_dir.mkdir(mode=0o700, parents=True)
        hosts = {}
        for name, (suffix, octet) in HOST_LAYOUT.items():
            hosts[name] = {
                "name": name, "hostname": name, "address": f"{SUBNET}.{octet}",
                "netns": f"{PREFIX}{lab_id}-{suffix}", "veth": f"v-{name}"[:15],
                "storage": storage, "private_dirs": sorted(private), "dir": str(lab_dir / name),
                "init": None, "unshare": None, "sshd": None, "sshd_launcher": None, "cut": False,
            }
        lab = cls({
            "id": lab_id, "dir": str(lab_dir), "boot_id": _boot_id(),
            # The owner is what cleanup_stale() checks: its death makes this lab a leftover. A
            # detached lab drops its owner only once its hosts run, which then vouch for it.
            "owner": {"pid": os.getpid(), "start": _start_time(os.getpid())},
            "detached": detached, "control_netns": f"{PREFIX}{lab_id}-ctl",
            "control_address": CONTROL_ADDRESS, "python": _visible_python(python or sys.executable, private),
            "private": private, "hosts": hosts, "processes": [], "env": {}, "timings": {},
        })
        lab._save()  # first, so a crash from here on leaves a lab cleanup_stale() can find
        try:
            lab._build()
        except BaseException:
            lab.down()
            raise
        return lab

    @classmethod
    def load(cls, lab_dir: str | os.PathLike) -> Lab:
        return cls(json.loads((Path(lab_dir) / "lab.json").read_text()))

    def _build(self) -> None:
        t0 = time.monotonic()
        keygen = self._write_files()
        self._make_network()
        t_net = time.monotonic()
        for popen in keygen:
            if popen.wait() != 0:
                raise LabError(f"ssh-keygen failed: {popen.stderr.read().decode(errors='replace')}")
        client = self.dir / "client"
        (client / "authorized_keys").write_bytes((client / "id_ed25519.pub").read_bytes())
        for name in self.hosts:
            self._start_host(name)
        for name in self.hosts:
            self._wait_host(name)
        for name in self.hosts:
            self._start_sshd(name)
        for name in self.hosts:
            self._wait_sshd(name)
        if self.state["detached"]:
            self.state["owner"] = None
        self.state["timings"] = {"network_s": round(t_net - t0, 3), "total_s": round(time.monotonic() - t0, 3)}
        self._save()

    def _write_files(self) -> list[subprocess.Popen]:
        """Write configs, wrappers and inventory; start key generation (returned to wait on)."""
        d = self.dir
        for sub in ("bin", "cm", "client", "ansible-local"):
            (d / sub).mkdir(mode=0o700)
        keygen = [_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", ""]
        popens = [subprocess.Popen([*keygen, "-C", f"drlab-{self.id}-controller", "-f", str(d / "client/id_ed25519")],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
        ssh_config = [
            "# Generated by tests/lab/lab.py; used through bin/ssh, which runs ssh in the control netns.",
        ]
        etc_hosts = ["127.0.0.1 localhost", f"{CONTROL_ADDRESS} control"]
        for name, host in self.hosts.items():
            hdir = Path(host["dir"])
            hdir.mkdir(mode=0o700)
            (hdir / "scratch").mkdir()
            popens.append(subprocess.Popen([*keygen, "-C", f"drlab-{self.id}-{name}", "-f", str(hdir / "ssh_host_ed25519_key")],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            (hdir / "sshd_config").write_text("\n".join([
                "# Generated by tests/lab/lab.py for one lab host.",
                f"ListenAddress {host['address']}",
                "Port 22",
                f"HostKey {hdir / 'ssh_host_ed25519_key'}",
                f"PidFile {hdir / 'sshd.pid'}",
                f"AuthorizedKeysFile {d / 'client/authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                # With PAM, Debian's sshd refuses the key-only root login (account stack).
                "UsePAM no",
                # The lab dir sits in world-writable /var/tmp, which StrictModes rejects.
                "StrictModes no",
                "UseDNS no",
                "PrintMotd no",
                "PrintLastLog no",
                "AcceptEnv LANG LC_*",
                "MaxStartups 100:30:200",  # Ansible forks open many connections at once
                "MaxSessions 100",
                "Subsystem sftp internal-sftp",
                "LogLevel INFO",
                "",
            ]))
            ssh_config += [f"Host {name}", f"    HostName {host['address']}"]
            etc_hosts.append(f"{host['address']} {name}")
        ssh_config += [
            "Host *",
            "    User root",
            f"    IdentityFile {d / 'client/id_ed25519'}",
            "    IdentitiesOnly yes",
            "    BatchMode yes",
            # Host keys are new in every lab; nothing to pin and nothing worth remembering.
            "    StrictHostKeyChecking no",
            "    UserKnownHostsFile /dev/null",
            "    GlobalKnownHostsFile /dev/null",
            "    LogLevel ERROR",
            "    ControlMaster auto",
            f"    ControlPath {d / 'cm'}/%C",
            "    ControlPersist 60s",
            "    ConnectTimeout 5",
            # A cut host must be noticed in seconds, not after TCP's minutes.
            "    ServerAliveInterval 2",
            "    ServerAliveCountMax 3",
            "",
        ]
        self.ssh_config.write_text("\n".join(ssh_config))
        (d / "hosts").write_text("\n".join(etc_hosts) + "\n")
        bind_files = {"/etc/hosts": str(d / "hosts")}
        rc = Path(pwd.getpwnam("root").pw_dir) / ".bashrc"
        if rc.is_file():
            # bash sources ~/.bashrc even for `ssh host cmd`; this machine's (pyenv init) costs
            # ~130 ms per command and so per Ansible task step. Hosts get their own, empty one.
            (d / "bashrc").write_text("# drtool lab host: the machine's ~root/.bashrc is not used here.\n")
            bind_files[str(rc)] = str(d / "bashrc")
        self.state["bind_files"] = bind_files

        nsenter = _tool("nsenter")
        for client in ("ssh", "scp", "sftp"):
            wrapper = self.bin_dir / client
            wrapper.write_text(
                "#!/bin/sh\n"
                f"# drtool lab {self.id}: run {client} inside the control network namespace, the only\n"
                "# place from which the lab hosts are reachable. scp and sftp start ssh themselves,\n"
                "# which inherits the namespace.\n"
                f"exec {nsenter} --net=/run/netns/{self.control_netns} -- {_tool(client)} -F {self.ssh_config} \"$@\"\n")
            wrapper.chmod(0o755)

        ssh_args = f"-o ControlMaster=auto -o ControlPersist=60s -o ControlPath={d / 'cm'}/%C"
        common_vars = {
            "ansible_user": "root",
            "ansible_python_interpreter": self.state["python"],
            "ansible_ssh_executable": str(self.bin_dir / "ssh"),
            "ansible_scp_executable": str(self.bin_dir / "scp"),
            "ansible_sftp_executable": str(self.bin_dir / "sftp"),
            # An explicit ControlPath makes Ansible share the lab's own ControlMasters, so cut()
            # can drop them all with `ssh -O exit`.
            "ansible_ssh_args": ssh_args,
            "ansible_control_path_dir": str(d / "cm"),
            "ansible_host_key_checking": False,
            "ansible_pipelining": True,
            # Host-private /tmp, not the /root/.ansible shared by every host and the controller.
            "ansible_remote_tmp": "/tmp/.ansible-remote",
        }
        group_of = {"primary": "primaries", "secondary": "secondaries"}
        inventory = {"all": {"vars": common_vars, "children": {
            group_of.get(name, name + "s"): {"hosts": {name: {
                "ansible_host": host["address"], "drlab_storage": host["storage"]}}}
            for name, host in self.hosts.items()}}}
        header = f"# drtool lab {self.id}: generated by tests/lab/lab.py, removed by `lab.py down`.\n"
        try:
            import yaml
            text = yaml.safe_dump(inventory, sort_keys=False, default_flow_style=False)
        except ImportError:  # JSON is YAML too
            text = json.dumps(inventory, indent=2) + "\n"
        self.inventory.write_text(header + text)

        self.state["env"] = {
            "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "ANSIBLE_INVENTORY": str(self.inventory),
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(d / "cm"),
            "ANSIBLE_SSH_EXECUTABLE": str(self.bin_dir / "ssh"),
            "ANSIBLE_SCP_EXECUTABLE": str(self.bin_dir / "scp"),
            "ANSIBLE_SFTP_EXECUTABLE": str(self.bin_dir / "sftp"),
            "ANSIBLE_SSH_ARGS": ssh_args,
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_REMOTE_USER": "root",
            "ANSIBLE_LOCAL_TEMP": str(d / "ansible-local"),
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_NOCOWS": "1",
            "DRLAB_ID": self.id,
            "DRLAB_DIR": str(d),
        }
        (d / "env.sh").write_text(
            f"# source this to use drtool lab {self.id} from a shell\n"
            + "".join(f"export {key}={shlex.quote(value)}\n" for key, value in self.state["env"].items()))
        return popens

    def _ip(self, lines: Sequence[str], netns: str | None = None) -> None:
        argv = [_tool("ip"), *(["-n", netns] if netns else []), "-batch", "-"]
        result = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True)
        if result.returncode != 0:
            raise LabError(f"{shlex.join(argv)} failed: {result.stderr.strip()}\ninput:\n" + "\n".join(lines))

    def _make_network(self) -> None:
        ctl = self.control_netns
        self._ip([f"netns add {name}" for name in self.netns_names])
        control = ["link set lo up",
                   "link add br0 type bridge stp_state 0 forward_delay 0",
                   f"addr add {CONTROL_ADDRESS}/{PREFIX_LEN} dev br0",
                   "link set br0 up"]
        for host in self.hosts.values():
            # Created from inside the control namespace with the peer placed straight into the
            # host namespace: nothing ever appears in the root namespace, even for a moment.
            control += [f"link add {host['veth']} type veth peer name eth0 netns {host['netns']}",
                        f"link set {host['veth']} master br0",
                        f"link set {host['veth']} up"]
        self._ip(control, ctl)
        for host in self.hosts.values():
            # The default route makes Ansible's ansible_default_ipv4 fact the lab address, as
            # playbooks expect of real hosts; the control namespace forwards nothing further.
            self._ip(["link set lo up",
                      f"addr add {host['address']}/{PREFIX_LEN} dev eth0",
                      "link set eth0 up",
                      f"route add default via {CONTROL_ADDRESS} dev eth0"], host["netns"])

    def _popen(self, argv: Sequence[str], log: Path, *, die_with_parent: bool) -> subprocess.Popen:
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C meant for pytest must not kill hosts before teardown runs.
                start_new_session=True, cwd="/",
                preexec_fn=_die_with_parent if die_with_parent else None)
        self._popens.append(popen)
        return popen

    def _start_host(self, name: str) -> None:
        host = self._host(name)
        hdir = Path(host["dir"])
        spec = {"hostname": host["hostname"], "scratch": str(hdir / "scratch"),
                "private": self.state["private"], "bind_files": self.state["bind_files"],
                "ready": str(hdir / "ready")}
        with contextlib.suppress(FileNotFoundError):
            (hdir / "ready").unlink()
        argv = [_tool("nsenter"), f"--net=/run/netns/{host['netns']}", "--",
                _tool("unshare"), "--mount", "--uts", "--pid", "--fork", "--mount-proc",
                "--propagation", "private", "--kill-child=SIGKILL", "--",
                sys.executable, str(HOSTINIT), json.dumps(spec)]
        popen = self._popen(argv, hdir / "init.log", die_with_parent=not self.state["detached"])
        host["unshare"] = self._record(name, "unshare", popen.pid)

    def _wait_host(self, name: str) -> None:
        host = self._host(name)
        hdir = Path(host["dir"])
        unshare_pid = host["unshare"]["pid"]

        def diagnose() -> str:
            failed = hdir / "ready.failed"
            log = (hdir / "init.log").read_text(errors="replace") if (hdir / "init.log").exists() else ""
            return f": {failed.read_text().strip() if failed.exists() else ''}\n{log}"

        def ready() -> bool:
            if (hdir / "ready.failed").exists() or _start_time(unshare_pid) is None:
                raise LabError(f"host {name} failed to start{diagnose()}")
            return (hdir / "ready").exists()

        _wait_for(ready, SETUP_TIMEOUT, f"host {name}", diagnose)
        children = _children(unshare_pid)
        if len(children) != 1:
            raise LabError(f"host {name}: expected one child of unshare {unshare_pid}, found {children}")
        host["init"] = self._record(name, "init", children[0])

    def _nsenter_host(self, name: str) -> list[str]:
        host = self._host(name)
        if not _alive(host["init"] or {}):
            raise LabError(f"host {name} is not running")
        # The init process holds the host's namespaces for the host's whole life, unlike sshd.
        return [_tool("nsenter"), "-t", str(host["init"]["pid"]), "--net", "--mount", "--uts", "--pid", "--"]

    def _start_sshd(self, name: str) -> None:
        host = self._host(name)
        hdir = Path(host["dir"])
        with contextlib.suppress(FileNotFoundError):
            (hdir / "sshd.pid").unlink()
        argv = [*self._nsenter_host(name), _tool("sshd"), "-D", "-f", str(hdir / "sshd_config"),
                "-E", str(hdir / "sshd.log")]
        # nsenter stays as sshd's parent outside the pid namespace; sshd itself is inside it.
        popen = self._popen(argv, hdir / "sshd.out", die_with_parent=False)
        host["sshd_launcher"] = self._record(name, "sshd-launcher", popen.pid)
        host["sshd"] = None

    def _wait_sshd(self, name: str) -> None:
        host = self._host(name)
        hdir = Path(host["dir"])
        launcher = host["sshd_launcher"]

        def diagnose() -> str:
            parts = [(hdir / f).read_text(errors="replace") for f in ("sshd.out", "sshd.log") if (hdir / f).exists()]
            return ":\n" + "\n".join(parts)

        def ready() -> bool:
            if not _alive(launcher):
                raise LabError(f"sshd on {name} exited{diagnose()}")
            # sshd writes its PidFile only after it is listening.
            return (hdir / "sshd.pid").exists()

        _wait_for(ready, SETUP_TIMEOUT, f"sshd on {name}", diagnose)
        children = _children(launcher["pid"])
        if children:
            host["sshd"] = self._record(name, "sshd", children[0])

    def down(self) -> None:
        """Kill every lab process, delete the namespaces and the lab dir. Safe to call repeatedly."""
        # SIGKILL to a pid namespace's init kills everything inside it; killing the inits first
        # stops sshd from accepting or forking while the rest is swept.
        for host in self.hosts.values():
            if host.get("init") and _alive(host["init"]):
                _kill(host["init"]["pid"])
        deadline = time.monotonic() + 10
        while True:
            victims = {record["pid"] for record in self.state["processes"] if _alive(record)}
            victims.update(pid for pid in self.namespace_processes() if pid != os.getpid())
            for popen in self._popens:
                if popen.poll() is None:
                    victims.add(popen.pid)
            if not victims:
                break
            if time.monotonic() > deadline:
                raise LabError(f"lab {self.id}: processes survive SIGKILL: {sorted(victims)}")
            for pid in victims:
                _kill(pid)
            time.sleep(0.01)
            for pid in victims:
                _reap(pid)
        for popen in self._popens:
            popen.wait()
        existing = set(list_netns())
        doomed = [name for name in self.netns_names if name in existing]
        if doomed:
            # -force: carry on past a name that vanished meanwhile.
            subprocess.run([_tool("ip"), "-force", "-batch", "-"], capture_output=True,
                           input="".join(f"netns del {name}\n" for name in doomed), text=True)
        left = set(self.netns_names) & set(list_netns())
        if left:
            raise LabError(f"lab {self.id}: could not delete namespaces {sorted(left)}")
        shutil.rmtree(self.dir, ignore_errors=True)

    # ----------------------------------------------------------------- using the hosts

    def ssh(self, host: str, command: str | Sequence[str], *, check: bool = False, timeout: float = 60,
            input: str | None = None, connect_timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run ``command`` on ``host`` over SSH as root, like the controller would.

        A sequence is shell-quoted; a string goes to the remote shell as it is. Output is text.
        """
        self._host(host)
        if not isinstance(command, str):
            command = shlex.join(command)
        options = ["-o", f"ConnectTimeout={max(1, round(connect_timeout))}"] if connect_timeout else []
        return subprocess.run([str(self.ssh_wrapper), *options, "--", host, command],
                              input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def run_in(self, host: str, argv: Sequence[str], *, check: bool = False, timeout: float = 60,
               input: str | bytes | None = None, text: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``host``'s net, mount, uts and pid namespaces without SSH.

        For fault injection and checks that must work while the host is cut off. Shares the
        controller's environment; the files seen are the host's (its private tmpfs dirs).
        """
        if isinstance(input, bytes):
            text = False
        return subprocess.run([*self._nsenter_host(host), *argv], input=input,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              capture_output=True, text=text, timeout=timeout, check=check, cwd="/")

    def run_ctl(self, argv: Sequence[str], *, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``argv`` in the control network namespace (where the controller's SSH comes from)."""
        return subprocess.run([_tool("nsenter"), f"--net=/run/netns/{self.control_netns}", "--", *argv],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                              check=check)

    def reachable(self, host: str, timeout: float = 1.0) -> bool:
        """Whether host's SSH port accepts a TCP connection from the control namespace."""
        address = self._host(host)["address"]
        try:
            result = self.run_ctl([_tool("bash"), "-c", f"exec 3<>/dev/tcp/{address}/22"], timeout=timeout + 1)
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def host_pids(self, host: str) -> list[int]:
        """Root-namespace PIDs of every process inside ``host``'s pid namespace (init included)."""
        init = self._host(host)["init"]
        if not init or not _alive(init):
            return []
        return _pids_in_ns(f"/proc/{init['pid']}/ns/pid", "pid")

    # ----------------------------------------------------------------- faults

    def cut(self, host: str) -> None:
        """Cut ``host`` off: its link goes down on the bridge side and its sshd is killed.

        The host keeps running (its files and other processes stay), as a partitioned machine
        would; :meth:`restore` brings it back.
        """
        entry = self._host(host)
        # Link first, so the kills below cannot send anything to the controller: the controller
        # sees the silent failure of a real partition, not a polite FIN.
        self._ip([f"link set {entry['veth']} down"], self.control_netns)
        sshds = [pid for pid in self.host_pids(host) if _comm(pid).startswith("sshd")]
        for pid in sshds:
            _kill(pid)
        _wait_for(lambda: not any(_start_time(pid) for pid in sshds), 5, f"sshd on {host} to die")
        launcher = entry.get("sshd_launcher")
        if launcher:
            _wait_for(lambda: not _alive(launcher), 5, f"sshd launcher on {host} to exit")
        for popen in self._popens:
            popen.poll()
        # The ControlMaster (shared by Ansible) would otherwise hang on the dead connection for
        # ServerAliveInterval*CountMax seconds; a new connection must fail at once instead.
        subprocess.run([str(self.ssh_wrapper), "-O", "exit", host], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=10)
        entry["cut"] = True
        self._save()

    def restore(self, host: str) -> None:
        """Undo :meth:`cut`: link up, sshd restarted; returns when sshd accepts connections."""
        entry = self._host(host)
        self._ip([f"link set {entry['veth']} up"], self.control_netns)
        if not any(_comm(pid).startswith("sshd") for pid in self.host_pids(host)):
            self._start_sshd(host)
            self._wait_sshd(host)
        _wait_for(lambda: self.reachable(host), 10, f"{host} to be reachable")
        entry["cut"] = False
        self._save()

    @contextlib.contextmanager
    def partitioned(self, host: str) -> Iterator[None]:
        """``cut(host)`` for the duration of a ``with`` block, restored even if the block fails."""
        self.cut(host)
        try:
            yield
        finally:
            self.restore(host)

    def restore_all(self) -> None:
        for name, entry in self.hosts.items():
            if entry.get("cut"):
                self.restore(name)

    # ----------------------------------------------------------------- checks

    def check_isolation(self, directory: str | None = None) -> list[str]:
        """Prove the hosts are separate machines; returns the failures (empty when isolated).

        For each ordered pair (a, b): a file written into b's storage over SSH is visible on b
        (control), invisible on a, invisible in the root namespace, and not reachable from a
        through /proc/*/root; a process started on b is invisible in a's /proc. ``directory``
        checks another path than the storage (a shared one must fail: the check's own test).
        """
        failures: list[str] = []
        names = list(self.hosts)
        for target in names:
            for observer in (n for n in names if n != target):
                failures += self._check_pair(observer, target, directory or self.hosts[target]["storage"])
        hostnames = {name: self.ssh(name, "hostname").stdout.strip() for name in names}
        for name, seen in hostnames.items():
            if seen != self.hosts[name]["hostname"]:
                failures.append(f"{name}: hostname is {seen!r}")
        return failures

    def _check_pair(self, observer: str, target: str, directory: str) -> list[str]:
        failures: list[str] = []
        token = secrets.token_hex(4)
        marker = f"{directory}/drlab-isolation-{token}"
        wrote = self.ssh(target, f"echo {token} > {shlex.quote(marker)} && cat {shlex.quote(marker)}")
        if wrote.returncode != 0 or wrote.stdout.strip() != token:
            return [f"{target}: cannot write {marker} over SSH: {wrote.stderr.strip()}"]
        # A distinctive argv to look for; the sleep ends by itself even if cleanup fails.
        sleeper = f"sleep 30.{int(token, 16) % 10**6:06d}"
        started = self.ssh(target, f"setsid {sleeper} </dev/null >/dev/null 2>&1 & echo $!")
        try:
            seen_file = self.ssh(observer, f"test -e {shlex.quote(marker)}")
            if seen_file.returncode != 1:
                failures.append(f"{observer} sees {target}'s {marker} (test -e -> {seen_file.returncode})")
            through_proc = self.ssh(observer, "for p in /proc/[0-9]*/root" + shlex.quote(marker)
                                    + '; do test -e "$p" && echo "$p"; done; true')
            if through_proc.stdout.strip():
                failures.append(f"{observer} reaches {target}'s files via {through_proc.stdout.split()}")
            if os.path.exists(marker):
                failures.append(f"the root namespace sees {target}'s {marker}")
            visible = self.ssh(observer, "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' <\"$f\"; echo; done")
            if visible.returncode != 0:
                failures.append(f"{observer}: cannot list processes: {visible.stderr.strip()}")
            elif any(line.strip() == sleeper for line in visible.stdout.splitlines()):
                failures.append(f"{observer} sees {target}'s process {sleeper!r}")
            own = self.run_in(target, ["sh", "-c", "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' <\"$f\"; echo; done"])
            if not any(line.strip() == sleeper for line in own.stdout.splitlines()):
                failures.append(f"control failed: {target} does not see its own process {sleeper!r}")
        finally:
            pid = started.stdout.strip()
            cleanup = f"rm -f {shlex.quote(marker)}" + (f"; kill {pid} 2>/dev/null" if pid.isdigit() else "")
            self.ssh(target, cleanup + "; true")
        return failures

    def status(self) -> dict[str, Any]:
        """A JSON-able summary: per host, whether init and sshd run, link state, reachability."""
        existing = set(list_netns())
        hosts = {}
        for name, host in self.hosts.items():
            running = bool(host.get("init")) and _alive(host["init"])
            hosts[name] = {
                "address": host["address"], "netns": host["netns"], "storage": host["storage"],
                "running": running, "cut": host.get("cut", False),
                "sshd": running and any(_comm(pid).startswith("sshd") for pid in self.host_pids(name)),
                "reachable": running and self.control_netns in existing and self.reachable(name, 0.5),
            }
        owner = self.state.get("owner")
        return {"id": self.id, "dir": str(self.dir), "inventory": str(self.inventory),
                "detached": self.state.get("detached", False),
                "owner_pid": owner["pid"] if owner else None, "stale": self.is_stale(),
                "netns": {name: name in existing for name in self.netns_names}, "hosts": hosts}

    @property
    def setup_seconds(self) -> float:
        return float(self.state.get("timings", {}).get("total_s", 0.0))

    def is_stale(self) -> bool:
        """A leftover: from an earlier boot, its owner process died, or (detached) its hosts died."""
        if self.state.get("boot_id") != _boot_id():
            return True
        owner = self.state.get("owner")
        if owner:
            return not _alive(owner)
        if not self.state.get("detached"):
            return True
        return not any(host.get("init") and _alive(host["init"]) for host in self.hosts.values())


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


# --------------------------------------------------------------------------- many labs

def list_netns() -> list[str]:
    """Names of all named network namespaces (`ip netns list`, without the id suffixes)."""
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def list_labs(base_dir: str | os.PathLike = DEFAULT_BASE_DIR) -> list[Lab]:
    labs = []
    for path in sorted(Path(base_dir).glob(f"{PREFIX}*")):
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError):
            labs.append(Lab.load(path))
    return labs


def cleanup_stale(base_dir: str | os.PathLike = DEFAULT_BASE_DIR, *, everything: bool = False) -> list[str]:
    """Remove leftovers of crashed labs; returns what was removed.

    Live labs (owner process alive, or detached with running hosts) are kept unless
    ``everything``. Namespaces with the prefix that no lab dir claims are always removed: a lab
    writes its lab.json before it creates any namespace.
    """
    removed: list[str] = []
    claimed: set[str] = set()
    for lab in list_labs(base_dir):
        if everything or lab.is_stale():
            lab.down()
            removed.append(f"lab {lab.id}")
        else:
            claimed.update(lab.netns_names)
    orphans = [name for name in list_netns() if name.startswith(PREFIX) and name not in claimed]
    for name in orphans:
        for pid in _pids_in_ns(f"/run/netns/{name}", "net"):
            _kill(pid)
        deadline = time.monotonic() + 5
        while _pids_in_ns(f"/run/netns/{name}", "net") and time.monotonic() < deadline:
            time.sleep(0.01)
        subprocess.run([_tool("ip"), "netns", "del", name], capture_output=True)
        removed.append(f"netns {name}")
    # A dir without lab.json is a lab that died in mkdir; give a lab being born a minute.
    for path in Path(base_dir).glob(f"{PREFIX}*"):
        if not (path / "lab.json").exists() and time.time() - path.stat().st_mtime > 60:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"dir {path}")
    return removed


@contextlib.contextmanager
def running_lab(**options: Any) -> Iterator[Lab]:
    """A lab for the duration of a ``with`` block; torn down even on failure, Ctrl-C or SIGTERM."""
    cleanup_stale(options.get("base_dir", DEFAULT_BASE_DIR))
    previous = None
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # Default SIGTERM would end the process without running the teardown below.
        def on_term(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        previous = signal.signal(signal.SIGTERM, on_term)
    lab = Lab.up(**options)
    try:
        yield lab
    finally:
        try:
            lab.down()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- CLI

def _print_usage_hint(lab: Lab) -> None:
    print(f"lab {lab.id} is up in {lab.setup_seconds:.2f}s ({lab.dir})")
    for name, host in lab.hosts.items():
        print(f"  {name:<10} {host['address']:<15} storage {host['storage']}  netns {host['netns']}")
    print(f"inventory: {lab.inventory}")
    print(f"use it:    . {lab.dir / 'env.sh'} && ansible all -m ping   # or: ssh primary")
    print(f"stop it:   {sys.executable} {Path(__file__).resolve()} down {lab.id}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab.py", description="drtool two-host SSH lab")
    parser.add_argument("--base-dir", default=DEFAULT_BASE_DIR, help="where lab dirs live (default %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start a lab that lives until `down`")
    up.add_argument("--storage", default=DEFAULT_STORAGE)
    up.add_argument("--python", default=sys.executable, help="interpreter Ansible uses on the hosts")
    down = commands.add_parser("down", help="stop labs (default: all detached and stale ones)")
    down.add_argument("ids", nargs="*", help="lab ids to stop")
    down.add_argument("--all", action="store_true", help="also labs owned by running processes")
    status = commands.add_parser("status", help="show labs")
    status.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    try:
        if args.command == "up":
            cleanup_stale(args.base_dir)
            lab = Lab.up(storage=args.storage, python=args.python, base_dir=args.base_dir, detached=True)
            _print_usage_hint(lab)
        elif args.command == "down":
            labs = list_labs(args.base_dir)
            if args.ids:
                wanted = set(args.ids)
                unknown = wanted - {lab.id for lab in labs}
                for lab in labs:
                    if lab.id in wanted:
                        lab.down()
                        print(f"lab {lab.id} down")
                if unknown:  # idempotent: an unknown id is already down
                    print(f"not running: {', '.join(sorted(unknown))}")
            else:
                for lab in labs:
                    if args.all or lab.state.get("detached"):
                        lab.down()
                        print(f"lab {lab.id} down")
                for what in cleanup_stale(args.base_dir, everything=args.all):
                    print(f"removed {what}")
        elif args.command == "status":
            report = [lab.status() for lab in list_labs(args.base_dir)]
            strays = [name for name in list_netns() if name.startswith(PREFIX)
                      and not any(name in r["netns"] for r in report)]
            if args.json:
                print(json.dumps({"labs": report, "stray_netns": strays}, indent=2))
            else:
                if not report:
                    print("no labs")
                for r in report:
                    flags = " (stale)" if r["stale"] else ""
                    print(f"lab {r['id']}{flags}: {r['dir']}")
                    for name, h in r["hosts"].items():
                        state = ("up" if h["reachable"] else "unreachable") if h["running"] else "down"
                        print(f"  {name:<10} {h['address']:<15} {state}{' (cut)' if h['cut'] else ''}")
                if strays:
                    print(f"stray namespaces (removed by `down`): {', '.join(strays)}")
    except LabError as error:
        print(f"lab.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
