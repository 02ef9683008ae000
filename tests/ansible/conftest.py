"""Helpers for the Ansible tests: the modules in-process, playbooks and molecule as subprocesses.

Modules run in-process with ``ansible.module_utils.testing.patch_module_args``
(ansible-core 2.19; the old ``_ANSIBLE_ARGS`` trick is broken there).  Playbooks
run as real ``ansible-playbook`` processes against ``inventory/local`` with every
path under a temporary ``drtool_base`` and free ports, so nothing outside the
test's directory is touched.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The repository root is the collection drtool.drtool; collections/ansible_collections/drtool/drtool
# is a symlink to it, so that this checkout's modules import their module_utils by their
# collection name, as Ansible runs them.
COLLECTIONS = ROOT / "collections"
COLLECTION = "drtool.drtool"
LIBRARY = ROOT / "plugins" / "modules"
MODULE_UTILS_NAME = "ansible_collections.drtool.drtool.plugins.module_utils.drtool_common"
VENV_BIN = Path(sys.executable).parent
MODULES = sorted(p.stem for p in LIBRARY.glob("drtool_*.py"))

# -- modules in-process --------------------------------------------------------------------


def load_module(name: str) -> ModuleType:
    """A fresh copy of plugins/modules/NAME.py (tests may patch it), its module_utils shared."""
    if str(COLLECTIONS) not in sys.path:
        sys.path.insert(0, str(COLLECTIONS))
    importlib.import_module(MODULE_UTILS_NAME)
    spec = importlib.util.spec_from_file_location(f"drtool_ansible_modules.{name}", LIBRARY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class ModuleResult:
    rc: int
    data: dict[str, Any]

    @property
    def changed(self) -> bool:
        return bool(self.data.get("changed"))

    @property
    def failed(self) -> bool:
        return bool(self.data.get("failed"))

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


@pytest.fixture
def run_module(capsys: pytest.CaptureFixture[str]):
    """run_module("drtool_volume", {...}, check=True, diff=True) -> ModuleResult (never raises SystemExit)."""
    from ansible.module_utils.testing import patch_module_args

    def run(name: str, args: dict[str, Any], check: bool = False, diff: bool = False) -> ModuleResult:
        module = load_module(name)
        args = dict(args)
        if check:
            args["_ansible_check_mode"] = True
        if diff:
            args["_ansible_diff"] = True
        capsys.readouterr()
        with patch_module_args(args):
            with pytest.raises(SystemExit) as exit_info:
                module.main()
        out = capsys.readouterr().out
        return ModuleResult(int(exit_info.value.code or 0), json.loads(out))

    return run


# -- processes -----------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def stop_pid_file(path: Path, timeout: float = 20.0) -> None:
    """Stop the daemon of a pid file (SIGTERM, then SIGKILL): tests leave nothing running."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state == "Z":
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def ansible_env(base: Path) -> dict[str, str]:
    """Environment for ansible-playbook/molecule: the venv's tools first, our ansible.cfg, no colour."""
    env = dict(os.environ)
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_LOCAL_TEMP": str(base / ".ansible-local"),
        "ANSIBLE_REMOTE_TEMP": str(base / ".ansible-remote"),
        "PY_COLORS": "0",
        "NO_COLOR": "1",
    })
    env.pop("DRTOOL_STATE_ROOT", None)
    return env


RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


@dataclass
class PlaybookRun:
    argv: list[str]
    rc: int
    output: str
    recap: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return sum(host["changed"] for host in self.recap.values())

    def __str__(self) -> str:
        return f"$ {' '.join(self.argv)}\n(rc {self.rc})\n{self.output[-6000:]}"


def run_playbook(playbook: str, base: Path, extra: dict[str, Any], *args: str, timeout: float = 300) -> PlaybookRun:
    argv = [str(VENV_BIN / "ansible-playbook"), str(ROOT / "playbooks" / playbook),
            "-e", json.dumps(extra), *args]
    proc = subprocess.run(argv, cwd=ROOT, env=ansible_env(base), capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    recap = {m.group(1): {"ok": int(m.group(2)), "changed": int(m.group(3)), "unreachable": int(m.group(4)),
                          "failed": int(m.group(5))} for m in RECAP.finditer(proc.stdout)}
    return PlaybookRun(argv, proc.returncode, output, recap)


# -- molecule ------------------------------------------------------------------------------

MOLECULE_SCENARIOS = ["drtool_install", "drtool_secondary", "drtool_primary"]


@dataclass
class MoleculeRun:
    proc: subprocess.Popen
    log: Path
    base: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def snapshot_sources(dest: Path) -> Path:
    """The package sources as they are now (a shared checkout may change during a long run)."""
    dest.mkdir()
    for item in ("pyproject.toml", "README.md", "LICENSE", "drtool"):
        source = ROOT / item
        if source.is_dir():
            shutil.copytree(source, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, dest / item)
    return dest


@pytest.fixture(scope="session")
def molecule_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Start `molecule test -s NAME` for every scenario at once; yields {name: MoleculeRun}."""
    from tests.conftest import IN_CI, require_tool

    require_tool("openssl", "qemu-img", "nbdinfo")  # the scenarios' prepare and verify steps
    molecule = VENV_BIN / "molecule"
    if not molecule.exists():
        message = f"molecule is not installed in {VENV_BIN} (pip install -e '.[test]')"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    top = tmp_path_factory.mktemp("molecule")
    source = snapshot_sources(top / "source")
    runs = {}
    selected = getattr(request.config, "_drtool_molecule_scenarios", None) or MOLECULE_SCENARIOS
    for name in (n for n in MOLECULE_SCENARIOS if n in selected):
        base = top / name
        base.mkdir()
        env = ansible_env(base)
        env.pop("ANSIBLE_CONFIG")  # molecule writes its own
        env.update({
            # molecule's own state (e.g. "prepared") must not carry over from another run.
            "MOLECULE_EPHEMERAL_DIRECTORY": str(base / "molecule"),
            "DRTOOL_MOLECULE_BASE": str(base),
            "DRTOOL_MOLECULE_PORT": str(free_port("127.0.0.2")),
            "DRTOOL_MOLECULE_NBD_PORT": str(free_port("127.0.0.3")),
            "DRTOOL_MOLECULE_SOURCE": str(source),
            "DRTOOL_MOLECULE_WHEELHOUSE": str(top / "wheelhouse"),
        })
        log = top / f"{name}.log"
        with open(log, "w") as handle:
            proc = subprocess.Popen([str(molecule), "test", "-s", name], cwd=ROOT, env=env, stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        runs[name] = MoleculeRun(proc, log, base)
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
        for pid_file in run.base.rglob("*.pid"):
            stop_pid_file(pid_file)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Remember which scenarios the selected tests need (molecule_runs starts only those)."""
    session.config._drtool_molecule_scenarios = [
        item.callspec.params["scenario"] for item in session.items
        if "molecule_runs" in getattr(item, "fixturenames", ()) and hasattr(item, "callspec")]


@pytest.fixture(scope="session", autouse=True)
def _start_molecule_early(request: pytest.FixtureRequest) -> None:
    """When molecule tests are selected, start them with the first test here: they run meanwhile."""
    if getattr(request.config, "_drtool_molecule_scenarios", None):
        try:
            request.getfixturevalue("molecule_runs")
        except (pytest.skip.Exception, pytest.fail.Exception):
            pass  # a missing tool: the molecule tests skip (fail under CI) when they ask; the others run
