"""Static checks: ansible-lint passes on the roles, playbooks and scenarios; both inventories parse.

(Named to sort after the molecule tests: by then the scenarios running in the background are
done, and ansible-lint does not compete with them for the CPU.)
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.ansible.conftest import ROOT, VENV_BIN, ansible_env

pytestmark = pytest.mark.slow


def test_ansible_lint_passes(tmp_path):
    proc = subprocess.run([str(VENV_BIN / "ansible-lint"), "--offline", "--nocolor"], cwd=ROOT,
                          env=ansible_env(tmp_path), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "Passed" in output and "0 failure(s), 0 warning(s)" in output, output[-6000:]


@pytest.mark.parametrize("inventory, groups", [
    ("inventory/local", {"primaries": ["local-primary"], "secondaries": ["local-secondary"]}),
    ("inventory/example", {"primaries": ["db1.dc1.example.com", "files1.dc1.example.com"],
                           "secondaries": ["dr1.dr.example.com"]}),
])
def test_inventory_parses(tmp_path, inventory, groups):
    env = ansible_env(tmp_path)
    graph = subprocess.run([str(VENV_BIN / "ansible-inventory"), "-i", inventory, "--graph"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert graph.returncode == 0 and "@primaries" in graph.stdout and "@secondaries" in graph.stdout, graph.stderr
    listed = subprocess.run([str(VENV_BIN / "ansible-inventory"), "-i", inventory, "--list"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    for group, hosts in groups.items():
        assert sorted(data[group]["hosts"]) == hosts
