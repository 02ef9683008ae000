"""The agent's NBD listener as the drtool_primary role templates it (issue 11, "Local security").

By default the unit runs the agent with its Unix socket only (no --listen: no TCP port); TCP and
its TLS files appear only when the inventory asks for them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.ansible.conftest import ROOT, VENV_BIN, ansible_env

pytestmark = pytest.mark.slow

BASE = {
    "ansible_python_interpreter": sys.executable,
    "drtool_primary_python": sys.executable,
    "drtool_primary_present": ["vol-a"],
    "drtool_primary_volumes": [{"name": "vol-a", "device": "/dev/vg0/a"}],
    "drtool_primary_state_root": "/var/lib/drtool",
}
DEFAULTS = yaml.safe_load((ROOT / "roles/drtool_primary/defaults/main.yml").read_text())


def render(tmp_path, cases: dict[str, dict]) -> dict[str, str]:
    plays = []
    for name, variables in cases.items():
        (tmp_path / name).mkdir()
        plays.append({
            "name": f"Render {name}", "hosts": "localhost", "gather_facts": False,
            "vars": {**{k: v for k, v in DEFAULTS.items() if k.startswith("drtool_primary_agent_")},
                     **BASE, **variables},
            "tasks": [{"name": "Render the unit", "ansible.builtin.template": {
                "src": str(ROOT / "roles/drtool_primary/templates/drtool-agent.service.j2"),
                "dest": str(tmp_path / name / "drtool-agent.service"), "mode": "0644"}}],
        })
    (tmp_path / "render.yml").write_text(yaml.safe_dump(plays))
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), str(tmp_path / "render.yml")], cwd=ROOT,
                          env=ansible_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    units = {}
    for name in cases:
        (line,) = [each for each in (tmp_path / name / "drtool-agent.service").read_text().splitlines()
                   if each.startswith("ExecStart=")]
        # systemd puts the volumes of the environment file the role writes in place of the variable
        # (split at spaces: $VAR, not ${VAR}).
        assert " agent $DRTOOL_AGENT_VOLUMES " in line
        units[name] = line.split(" -m drtool ", 1)[1].replace("$DRTOOL_AGENT_VOLUMES", " ".join(BASE["drtool_primary_present"]))
    return units


def test_role_defaults_serve_the_unix_socket_only(tmp_path):
    assert DEFAULTS["drtool_primary_agent_listen"] in ("", "none")
    units = render(tmp_path, {
        "defaults": {},
        "none": {"drtool_primary_agent_listen": "none"},
        "loopback": {"drtool_primary_agent_listen": "127.0.0.1:10809"},
        "tls": {"drtool_primary_agent_listen": "192.0.2.10:10809",
                "drtool_primary_agent_tls_cert": "/etc/drtool/nbd/cert.pem",
                "drtool_primary_agent_tls_key": "/etc/drtool/nbd/key.pem",
                "drtool_primary_agent_tls_ca": "/etc/drtool/nbd/ca.pem"},
        "default_socket": {"drtool_primary_agent_nbd_socket": ""},
    })
    assert units["defaults"] == "agent vol-a --state-root /var/lib/drtool --nbd-socket /run/drtool/nbd.sock"
    assert units["none"] == units["defaults"]
    assert units["loopback"] == ("agent vol-a --state-root /var/lib/drtool --listen 127.0.0.1:10809 "
                                 "--nbd-socket /run/drtool/nbd.sock")
    assert units["tls"] == ("agent vol-a --state-root /var/lib/drtool --listen 192.0.2.10:10809 "
                            "--tls-cert /etc/drtool/nbd/cert.pem --tls-key /etc/drtool/nbd/key.pem "
                            "--tls-ca /etc/drtool/nbd/ca.pem --nbd-socket /run/drtool/nbd.sock")
    assert units["default_socket"] == "agent vol-a --state-root /var/lib/drtool"


def test_templated_command_lines_are_accepted_by_drtool(tmp_path):
    """Each rendered command line parses (the agent's own checks then run on the host)."""
    from drtool.cli import build_parser

    units = render(tmp_path, {"defaults": {}, "loopback": {"drtool_primary_agent_listen": "127.0.0.1:10809"}})
    for line in units.values():
        args = build_parser().parse_args(line.split())
        assert args.command == "agent" and args.names == ["vol-a"]
    assert build_parser().parse_args(units["defaults"].split()).listen is None
