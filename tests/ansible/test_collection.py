"""The repository root is the Ansible collection drtool.drtool: it builds, installs, lists its
modules, its playbooks resolve every role and module by FQCN from the installed copy, and
``ansible-test sanity`` passes on it.

Everything runs under a temporary directory: the artifact, the collections path it is installed
into (``ansible_collections/drtool/drtool``), and ansible-test's HOME (its virtual environments).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.ansible.conftest import COLLECTION, LIBRARY, MODULES, ROOT, VENV_BIN, ansible_env

NAMESPACE, NAME = COLLECTION.split(".")


def galaxy() -> dict:
    return yaml.safe_load((ROOT / "galaxy.yml").read_text())


def isolated_env(base: Path, collections: Path | None = None) -> dict[str, str]:
    """No ansible.cfg (the checkout's would add its own collections/): only ``collections``."""
    env = ansible_env(base)
    env["ANSIBLE_CONFIG"] = str(base / "no-ansible.cfg")  # does not exist: Ansible's defaults
    env["ANSIBLE_COLLECTIONS_PATH"] = str(collections) if collections else str(base / "empty")
    return env


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"$ {' '.join(argv)}\n(rc {proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the collection from the checkout and install it into a fresh collections path."""
    base = tmp_path_factory.mktemp("collection")
    env = isolated_env(base)
    run([str(VENV_BIN / "ansible-galaxy"), "collection", "build", str(ROOT), "--output-path", str(base / "dist")],
        base, env)
    artifact = base / "dist" / f"{NAMESPACE}-{NAME}-{galaxy()['version']}.tar.gz"
    assert artifact.is_file(), sorted(p.name for p in (base / "dist").iterdir())
    collections = base / "collections"
    env = isolated_env(base, collections)
    run([str(VENV_BIN / "ansible-galaxy"), "collection", "install", str(artifact), "-p", str(collections)], base, env)
    path = collections / "ansible_collections" / NAMESPACE / NAME
    assert (path / "MANIFEST.json").is_file()
    return {"base": base, "artifact": artifact, "collections": collections, "path": path}


def test_galaxy_metadata_matches_the_package():
    meta = galaxy()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert (meta["namespace"], meta["name"]) == (NAMESPACE, NAME)
    assert meta["version"] == project["version"], "galaxy.yml's version follows pyproject.toml's"
    assert meta["license"] == [project["license"]]
    runtime = yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text())
    # The same ansible-core range as the package's ansible extra.
    pinned = next(dep for dep in project["optional-dependencies"]["ansible"] if dep.startswith("ansible-core"))
    low, high = re.match(r"ansible-core>=([\d.]+),<([\d.]+)", pinned).groups()
    assert runtime["requires_ansible"] == f">={low}.0,<{high}.0"


def test_the_artifact_holds_the_ansible_content_and_nothing_else(installed):
    with tarfile.open(installed["artifact"]) as tar:
        names = set(tar.getnames())
    top = {name.split("/")[0] for name in names}
    assert top == {"MANIFEST.json", "FILES.json", "README.md", "CHANGELOG.md", "meta", "plugins", "roles", "playbooks",
                   "inventory", "tests"}, top
    assert {f"plugins/modules/{name}.py" for name in MODULES} <= names
    assert "plugins/module_utils/drtool_common.py" in names and "meta/runtime.yml" in names
    assert {name for name in names if name.startswith("tests/")} == {
        "tests/sanity", *(f"tests/sanity/{p.name}" for p in (ROOT / "tests" / "sanity").iterdir())}
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    for role in ("drtool_install", "drtool_secondary", "drtool_primary", "drtool_failover"):
        assert f"roles/{role}/meta/argument_specs.yml" in names, role


def test_ansible_doc_lists_every_module_of_the_installed_collection(installed):
    env = isolated_env(installed["base"], installed["collections"])
    listed = run([str(VENV_BIN / "ansible-doc"), "-l", COLLECTION], installed["base"], env)
    assert sorted(line.split()[0] for line in listed.stdout.splitlines() if line.strip()) == [
        f"{COLLECTION}.{name}" for name in MODULES]
    docs = json.loads(run([str(VENV_BIN / "ansible-doc"), "--json", *(f"{COLLECTION}.{name}" for name in MODULES)],
                          installed["base"], env).stdout)
    paths = [Path(entry["doc"]["filename"]) for entry in docs.values()]
    assert len(paths) == len(MODULES) and all(p.is_relative_to(installed["path"]) for p in paths), paths
    assert sorted(p.stem for p in LIBRARY.glob("*.py")) == MODULES


def test_the_installed_playbooks_resolve_every_role_and_module(installed):
    """ansible-playbook NS.NAME.PLAYBOOK from the installed copy alone: roles and modules by FQCN."""
    env = isolated_env(installed["base"], installed["collections"])
    inventory = installed["path"] / "inventory" / "local"
    for playbook in sorted(p.stem for p in (ROOT / "playbooks").glob("*.yml")):
        run([str(VENV_BIN / "ansible-playbook"), f"{COLLECTION}.{playbook}", "-i", str(inventory), "--syntax-check"],
            installed["base"], env)


def test_tasks_call_modules_and_roles_by_fqcn():
    """Every drtool module and role the playbooks, roles and molecule scenarios name, by FQCN."""
    short = re.compile(r"^\s*(?:- )?(drtool_(?:%s)):\s*$" % "|".join(m.removeprefix("drtool_") for m in MODULES), re.M)
    role = re.compile(r"^\s*(?:- role|name): (drtool_(?:install|primary|secondary|failover))\s*$", re.M)
    files = [p for d in ("playbooks", "roles", "molecule") for p in (ROOT / d).rglob("*.yml")]
    assert files
    for path in files:
        text = path.read_text()
        assert not short.findall(text), f"{path}: {short.findall(text)} not by FQCN"
        assert not role.findall(text), f"{path}: {role.findall(text)} not by FQCN"


def _get_pip_version() -> str:
    """The pip version ansible-test bootstraps into its virtual environments."""
    import ansible_test

    source = (Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py").read_text()
    return re.search(r"pip='([\d.]+)'", source).group(1)


@pytest.mark.slow
def test_ansible_test_sanity_passes(installed, tmp_path):
    """validate-modules (documentation against argument_spec), import, compile, pylint, pep8,
    shebang, yamllint, runtime-metadata and the rest: every sanity test ansible-test has for a
    collection, none skipped.  None needs a container: each runs in a virtual environment
    ansible-test creates (under a private HOME here) and fills from the package index with its
    pinned requirements (pylint, voluptuous, yamllint, ...), pip bootstrapped by the stand-in
    in ansible_test_get_pip.py (see there why).  shellcheck and pslint find no file to check."""
    home = tmp_path / "home"
    cache = home / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True)
    shutil.copy(Path(__file__).parent / "ansible_test_get_pip.py",
                cache / f"get_pip_{_get_pip_version().replace('.', '_')}.py")
    import pip

    (cache / "pip-site.txt").write_text(str(Path(pip.__file__).resolve().parents[1]))  # this venv's pip
    env = isolated_env(installed["base"], installed["collections"])
    # The pip cache stays the user's (it only saves downloads); everything ansible-test creates goes to HOME.
    env.setdefault("PIP_CACHE_DIR", os.path.expanduser("~/.cache/pip"))
    env["HOME"] = str(home)
    python = "%d.%d" % sys.version_info[:2]
    proc = subprocess.run([str(VENV_BIN / "ansible-test"), "sanity", "--python", python, "--color", "no"],
                          cwd=installed["path"], env=env, capture_output=True, text=True, timeout=1500)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    ran = re.findall(r'^Running sanity test "([\w-]+)"', output, re.M)
    for test in ("validate-modules", "import", "compile", "pylint", "pep8", "shebang", "yamllint",
                 "runtime-metadata", "ansible-doc", "ignores"):
        assert test in ran, f"{test} did not run: {ran}"
    assert "ERROR" not in output, output[-8000:]
