"""Every module documents itself: ansible-doc renders it, and its documented options are its argument_spec."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.ansible.conftest import COLLECTION, MODULES, ROOT, VENV_BIN, ansible_env, load_module


class _Captured(Exception):
    pass


def argument_spec(name: str) -> dict:
    """The keyword arguments the module passes to AnsibleModule (captured, the module not run)."""
    module = load_module(name)
    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        raise _Captured

    module.AnsibleModule = fake
    with pytest.raises(_Captured):
        module.main()
    return seen


def test_there_are_nine_modules():
    assert MODULES == ["drtool_agent", "drtool_group", "drtool_health_info", "drtool_recovery", "drtool_replica",
                       "drtool_replication", "drtool_role", "drtool_status_info", "drtool_volume"]


@pytest.mark.parametrize("name", MODULES)
def test_documented_options_are_the_argument_spec(name):
    module = load_module(name)
    doc = yaml.safe_load(module.DOCUMENTATION)
    examples = yaml.safe_load(module.EXAMPLES)
    returns = yaml.safe_load(module.RETURN)
    assert doc["module"] == name and doc["short_description"] and doc["description"]
    assert doc["attributes"]["check_mode"]["support"] == "full"
    assert examples and any(f"{COLLECTION}.{name}" in task for task in examples), "the examples use the module (FQCN)"
    for task in examples:
        called = [key for key in task if key.startswith("drtool")]
        assert all(key.startswith(f"{COLLECTION}.") for key in called), f"{name}'s examples call {called}: not FQCN"
    assert returns, "RETURN documents the results"

    kwargs = argument_spec(name)
    assert kwargs["supports_check_mode"] is True
    spec = kwargs["argument_spec"]
    options = doc["options"]
    assert set(options) == set(spec), "documented options == argument_spec"
    for option, rules in spec.items():
        documented = options[option]
        assert documented["description"], option
        assert documented["type"] == rules.get("type", "str"), option
        assert documented.get("choices") == rules.get("choices"), option
        assert bool(documented.get("required")) == bool(rules.get("required")), option
        assert documented.get("default") == rules.get("default"), option
        assert documented.get("elements") == rules.get("elements"), option
        assert sorted(documented.get("aliases", [])) == sorted(rules.get("aliases", [])), option
        if option == "token":
            assert rules.get("no_log") is True, f"{option} is a secret"


def test_state_modules_use_required_if():
    for name in ("drtool_volume", "drtool_replica", "drtool_agent", "drtool_role"):
        assert argument_spec(name)["required_if"], name


def test_every_module_but_the_info_ones_takes_state():
    """One way to say what a module manages: state (drtool_role's roles too), except *_info (read-only)."""
    for name in MODULES:
        spec = argument_spec(name)["argument_spec"]
        if name.endswith("_info"):
            assert "state" not in spec, name
        elif name != "drtool_replication":  # an action (drain, force, verify): no state to be in
            assert "state" in spec and spec["state"].get("choices"), name
    assert argument_spec("drtool_role")["argument_spec"]["state"]["choices"] == ["primary", "secondary"]


def test_ansible_doc_renders_every_module(tmp_path):
    """From the checkout (ansible.cfg's collections_path finds the collection through collections/)."""
    fqcns = [f"{COLLECTION}.{name}" for name in MODULES]
    listed = subprocess.run([str(VENV_BIN / "ansible-doc"), "-l", COLLECTION], cwd=ROOT, env=ansible_env(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert sorted(line.split()[0] for line in listed.stdout.splitlines() if line.strip()) == fqcns
    proc = subprocess.run([str(VENV_BIN / "ansible-doc"), "--json", *fqcns], cwd=ROOT,
                          env=ansible_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = json.loads(proc.stdout)
    assert sorted(docs) == fqcns
    for name, entry in docs.items():
        assert entry["doc"]["options"], name
        assert entry["examples"].strip(), name
        assert entry["return"], name
    text = subprocess.run([str(VENV_BIN / "ansible-doc"), f"{COLLECTION}.drtool_recovery"], cwd=ROOT,
                          env=ansible_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "fails back" in text.stdout and "RETURN VALUES" in text.stdout
