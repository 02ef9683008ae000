"""drtool deployed in the two-host lab: its inventory, an offline install, playbook runs, NBD checks.

The lab (``tests/lab/lab.py``) gives two SSH hosts, ``primary`` and ``secondary``, each with its own
private ``/srv/drtool``, ``/var/lib/drtool``, ``/run``, ``/tmp`` and ``/var/log``.  This module adds
what drtool's playbooks need on top, all of it inside the lab's own directory (removed by
``lab.down()``):

- an inventory directory generated from the lab's own inventory: the lab's connection settings,
  plus group_vars that keep everything drtool creates on the hosts' private storage (the venv in
  ``/srv/drtool/venv``, replicas in ``/srv/drtool/replicas``, tokens and TLS files in
  ``/srv/drtool/etc``, the volume images in ``/srv/drtool/images``).  ``primary`` is in both groups:
  a host that may become the secondary after a swap runs a replica server too;
- TLS end to end, as at a real site (drtool refuses plain HTTP beyond loopback): a throwaway CA made
  with openssl at setup, a server certificate per host for its lab address (each host serves
  replicas in turn as the roles swap), the CA given to the primaries, ``https://`` peer URLs;
- a wheelhouse of drtool's dependencies and a snapshot of the sources, so ``drtool_install`` builds
  a wheel and installs it offline into each host's venv;
- helpers that act as an operator would, over SSH: playbook runs with the PLAY RECAP parsed, writes
  and reads through the agent with real NBD clients (``qemu-io``, ``nbdcopy``), ``drtool ... --json``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.ansible.conftest import RECAP, PlaybookRun, snapshot_sources
from tests.lab.lab import Lab

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
STORAGE = "/srv/drtool"
VENV = f"{STORAGE}/venv"
REPLICA_ROOT = f"{STORAGE}/replicas"
REPLICA_PORT = 8470
NBD_SOCKET = "/run/drtool/nbd.sock"  # drtool_primary's default, in each host's private /run
REGION = 64 * 1024
VOLUME_SIZE = 16 * 1024 * 1024
VOLUMES = ("vol-a", "vol-b")
TOKEN = "drtool-lab-token-" + "5c" * 12


@dataclass(frozen=True)
class LabPki:
    """The lab's throwaway CA and one server certificate (and key) per host, as PEM text."""

    ca_cert: str
    servers: dict[str, tuple[str, str]]  # host name -> (certificate, key)


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_lab_pki(directory: Path, hosts: dict[str, dict[str, Any]]) -> LabPki:
    """A CA valid for two days and, for each host, a certificate for its lab address and its name
    (subjectAltName), signed by it.  Keys are mode 0600; nothing here outlives the lab's dir."""
    directory.mkdir(mode=0o700)
    ca_cert, ca_key = directory / "ca.pem", directory / "ca-key.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", ca_key, "-out", ca_cert, "-days", "2", "-subj", "/CN=drtool lab CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    servers = {}
    for name, host in hosts.items():
        cert, key, csr, ext = (directory / f"{name}{suffix}" for suffix in (".pem", "-key.pem", ".csr", ".ext"))
        ext.write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n"
                       f"subjectAltName=IP:{host['address']},DNS:{name}\n")
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        _openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
                 "-days", "2", "-extfile", ext)
        key.chmod(0o600)
        servers[name] = (cert.read_text(), key.read_text())
    return LabPki(ca_cert.read_text(), servers)


def region_digests(data: bytes | bytearray) -> list[str]:
    return [hashlib.sha256(data[i:i + REGION]).hexdigest() for i in range(0, len(data), REGION)]


def initial_image(volume: str) -> bytearray:
    """The bytes a volume's device holds before drtool sees it (made on the host the same way)."""
    return bytearray(random.Random(f"drtool-lab-{volume}").randbytes(VOLUME_SIZE))


# Runs on a lab host with the machine's python3: per-region sha256 of stdin (or of a file).
_DIGEST_SCRIPT = (
    "import hashlib, sys\n"
    "src = open(sys.argv[1], 'rb') if len(sys.argv) > 1 else sys.stdin.buffer\n"
    f"while chunk := src.read({REGION}):\n"
    "    print(hashlib.sha256(chunk).hexdigest())\n"
)
_MAKE_IMAGE_SCRIPT = (
    "import random, sys\n"
    "sys.stdout.buffer.write(random.Random('drtool-lab-' + sys.argv[1]).randbytes(int(sys.argv[2])))\n"
)


class DrtoolLab:
    """drtool on a running lab.  ``expected[volume]`` is the bytes every reader must see."""

    def __init__(self, lab: Lab, groups: dict[str, list[str]] | None = None) -> None:
        self.lab = lab
        # Consistency groups of the primary's volumes ({name: [volume, ...]}), in its inventory.
        self.groups = dict(groups or {})
        self.dir = lab.dir / "drtool"
        self.inventory = self.dir / "inventory"
        self.wheelhouse = self.dir / "wheelhouse"
        self.source = self.dir / "source"
        self.pki: LabPki | None = None
        self.expected = {name: initial_image(name) for name in VOLUMES}

    # -- setup ------------------------------------------------------------------------------

    def prepare(self) -> None:
        self.dir.mkdir()
        (self.dir / "build").mkdir()
        self._snapshot_sources()
        self.pki = make_lab_pki(self.dir / "pki", self.lab.hosts)
        self._write_inventory()
        self._build_wheelhouse()
        for name in VOLUMES:
            self.ssh("primary", f"mkdir -p {STORAGE}/images && python3 -c {shlex.quote(_MAKE_IMAGE_SCRIPT)} "
                                f"{name} {VOLUME_SIZE} > {STORAGE}/images/{name}.img", check=True)

    def _snapshot_sources(self) -> None:
        """The package as it is now: the team edits the checkout while the tests run."""
        snapshot_sources(self.source)

    def _build_wheelhouse(self) -> None:
        import tomllib

        deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(self.wheelhouse), *deps],
                       check=True, capture_output=True, timeout=600)

    def replica_url(self, host: str) -> str:
        """The host's replica server as its pair reaches it (and as drtool reports the peer)."""
        return f"https://{self.lab.hosts[host]['address']}:{REPLICA_PORT}"

    def _write_inventory(self) -> None:
        assert self.pki is not None
        generated = yaml.safe_load(self.lab.inventory.read_text())
        groups = generated["all"]["children"]
        # Either host may be the secondary after a swap: both run a replica server.
        groups["secondaries"]["hosts"].update({name: None for name in groups["primaries"]["hosts"]})
        common = {
            "drtool_token": TOKEN,
            # drtool_install: a wheel of the snapshot, offline from the wheelhouse, into each host's
            # private storage (a shared path would let one host see the other's files).
            "drtool_install_method": "wheel",
            "drtool_install_source": str(self.source),
            "drtool_install_venv": VENV,
            "drtool_install_base_python": "/usr/bin/python3",
            "drtool_install_wheelhouse": str(self.wheelhouse),
            "drtool_install_build_tmpdir": str(self.dir / "build"),
            # drtool_secondary: every host serves replicas on its lab address.
            "drtool_secondary_root": REPLICA_ROOT,
            "drtool_secondary_listen_address": "{{ ansible_host }}",
            "drtool_secondary_port": REPLICA_PORT,
            "drtool_secondary_token": "{{ drtool_token }}",
            "drtool_secondary_token_file": f"{STORAGE}/etc/replica.token",
            "drtool_secondary_service_manager": "daemon",
            # TLS (each host's certificate and key are in its host_vars): the role writes them here.
            "drtool_secondary_tls_dir": f"{STORAGE}/etc/tls",
            # drtool_primary: the settings a host needs whenever it is the primary.
            "drtool_primary_token": "{{ drtool_token }}",
            "drtool_primary_token_file": f"{STORAGE}/etc/peer.token",
            # The CA of every replica server's certificate: a host verifies its pair's and, in a role
            # swap, its own (promote, adopt).
            "drtool_primary_ca_cert": self.pki.ca_cert,
            "drtool_primary_ca_file": f"{STORAGE}/etc/peer-ca.pem",
            "drtool_primary_service_manager": "daemon",
            "drtool_failover_timeout": 60,
        }
        primary_vars = {
            "drtool_primary_peer_url": self.replica_url("secondary"),
            "drtool_primary_volumes": [
                {"name": name, "device": f"{STORAGE}/images/{name}.img", "region_size": "64K",
                 "create_size": str(VOLUME_SIZE)} for name in VOLUMES],
        }
        if self.groups:
            primary_vars["drtool_primary_groups"] = [{"name": name, "volumes": list(members)}
                                                     for name, members in self.groups.items()]
        (self.inventory / "group_vars").mkdir(parents=True)
        (self.inventory / "host_vars").mkdir()
        header = f"# drtool lab {self.lab.id}: generated by tests/lab/drtool_lab.py, removed by `lab.py down`.\n"
        (self.inventory / "hosts.yml").write_text(header + yaml.safe_dump(generated, sort_keys=False))
        (self.inventory / "group_vars" / "all.yml").write_text(header + yaml.safe_dump(common, sort_keys=False))
        host_vars = {name: {"drtool_secondary_tls_cert": cert, "drtool_secondary_tls_key": key}
                     for name, (cert, key) in self.pki.servers.items()}
        host_vars["primary"].update(primary_vars)
        for name, variables in host_vars.items():
            path = self.inventory / "host_vars" / f"{name}.yml"
            path.write_text(header + yaml.safe_dump(variables, sort_keys=False))
            path.chmod(0o600)  # a TLS key

    # -- running things ---------------------------------------------------------------------

    def ssh(self, host: str, command: str | list[str], check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
        result = self.lab.ssh(host, command, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{host}: {command!r} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def playbook(self, name: str, *args: str, timeout: float = 600, **extra: Any) -> PlaybookRun:
        argv = [str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory), str(ROOT / "playbooks" / name),
                *args]
        if extra:
            argv += ["-e", json.dumps(extra)]
        env = {**self.lab.env, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_INVENTORY": str(self.inventory),
               "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "NO_COLOR": "1", "PY_COLORS": "0"}
        env.pop("DRTOOL_STATE_ROOT", None)
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        recap = {m.group(1): {"ok": int(m.group(2)), "changed": int(m.group(3)), "unreachable": int(m.group(4)),
                              "failed": int(m.group(5))} for m in RECAP.finditer(proc.stdout)}
        return PlaybookRun(argv, proc.returncode, proc.stdout + proc.stderr, recap)

    def drtool(self, host: str, *args: str) -> Any:
        """``drtool ARGS --json`` on a host, with the venv drtool_install made there."""
        result = self.ssh(host, f"cd / && {VENV}/bin/python -m drtool {shlex.join(args)} --json")
        if result.returncode != 0:
            raise AssertionError(f"{host}: drtool {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return json.loads(result.stdout)

    def status(self, host: str, volume: str) -> dict[str, Any]:
        return self.drtool(host, "status", volume)

    def group_status(self, host: str, group: str) -> dict[str, Any]:
        return self.drtool(host, "group", "status", group)

    def replica_status(self, host: str) -> dict[str, dict[str, Any]]:
        return {entry["name"]: entry for entry in self.drtool(host, "status", "--replica-root", REPLICA_ROOT)}

    @staticmethod
    def nbd_uri(volume: str) -> str:
        return f"nbd+unix:///{volume}?socket={NBD_SOCKET}"

    def write(self, host: str, volume: str, writes: list[tuple[int, int, int]], via_ssh: bool = True) -> None:
        """Write (offset, length, byte) patterns through the host's agent over NBD with qemu-io."""
        argv = ["qemu-io", "--format", "raw"]
        for offset, length, byte in writes:
            argv += ["--cmd", f"write -P {byte} {offset} {length}"]
        argv.append(self.nbd_uri(volume))
        if via_ssh:
            result = self.ssh(host, argv)
        else:  # the host is cut off: act inside it as a local workload would
            result = self.lab.run_in(host, argv)
        assert result.returncode == 0 and "failed" not in result.stdout, f"{host}: {argv}: {result.stdout}{result.stderr}"
        for offset, length, byte in writes:
            self.expected[volume][offset:offset + length] = bytes([byte]) * length

    def nbd_digests(self, host: str, volume: str) -> list[str]:
        """Per-region digests of the volume as an NBD client on the host reads it from the agent."""
        command = f"nbdcopy {shlex.quote(self.nbd_uri(volume))} - | python3 -c {shlex.quote(_DIGEST_SCRIPT)}"
        result = self.ssh(host, ["bash", "-o", "pipefail", "-c", command])
        assert result.returncode == 0, f"{host}: reading {volume} over NBD failed: {result.stderr}"
        return result.stdout.split()

    def nbd_bytes(self, host: str, volume: str, offset: int, length: int) -> bytes:
        """``length`` bytes of the volume from ``offset``, as an NBD client on the host reads them."""
        script = ("import sys\n"
                  "data = sys.stdin.buffer.read()\n"
                  f"sys.stdout.write(data[{offset}:{offset + length}].hex())\n")
        command = f"nbdcopy {shlex.quote(self.nbd_uri(volume))} - | python3 -c {shlex.quote(script)}"
        result = self.ssh(host, ["bash", "-o", "pipefail", "-c", command])
        assert result.returncode == 0, f"{host}: reading {volume} over NBD failed: {result.stderr}"
        return bytes.fromhex(result.stdout.strip())

    def file_digests(self, host: str, path: str) -> list[str]:
        result = self.ssh(host, ["python3", "-c", _DIGEST_SCRIPT, path])
        assert result.returncode == 0, f"{host}: reading {path} failed: {result.stderr}"
        return result.stdout.split()

    def mismatches(self, volume: str, digests: list[str], expected: bytes | bytearray | None = None) -> list[int]:
        """Regions whose digest differs from the expected bytes' (empty: the bytes are exact)."""
        want = region_digests(self.expected[volume] if expected is None else expected)
        if len(digests) != len(want):
            return [-1]
        return [region for region, (got, exp) in enumerate(zip(digests, want)) if got != exp]
