"""Every module documents itself: ansible-doc renders it, and its documented options are its argument_spec."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.ansible.conftest import MODULES, ROOT, VENV_BIN, ansible_env, load_module


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


def test_there_are_eight_modules():
    assert MODULES == ["drtool_agent", "drtool_health_info", "drtool_recovery", "drtool_replica",
                       "drtool_replication", "drtool_role", "drtool_status_info", "drtool_volume"]


@pytest.mark.parametrize("name", MODULES)
def test_documented_options_are_the_argument_spec(name):
    module = load_module(name)
    doc = yaml.safe_load(module.DOCUMENTATION)
    examples = yaml.safe_load(module.EXAMPLES)
    returns = yaml.safe_load(module.RETURN)
    assert doc["module"] == name and doc["short_description"] and doc["description"]
    assert doc["attributes"]["check_mode"]["support"] == "full"
    assert examples and any(name in task for task in examples), "the examples use the module"
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
    for name in ("drtool_volume", "drtool_replica", "drtool_agent"):
        assert argument_spec(name)["required_if"], name


def test_ansible_doc_renders_every_module(tmp_path):
    proc = subprocess.run([str(VENV_BIN / "ansible-doc"), "--json", *MODULES], cwd=ROOT,
                          env=ansible_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = json.loads(proc.stdout)
    assert sorted(docs) == MODULES
    for name, entry in docs.items():
        assert entry["doc"]["options"], name
        assert entry["examples"].strip(), name
        assert entry["return"], name
    text = subprocess.run([str(VENV_BIN / "ansible-doc"), "drtool_recovery"], cwd=ROOT, env=ansible_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "fails back" in text.stdout and "RETURN VALUES" in text.stdout
