"""Static checks: ansible-lint passes on the roles, playbooks and scenarios; both inventories parse,
and the example inventory holds everything a role swap between the hosts of each pair needs.

(Named to sort after the molecule tests: by then the scenarios running in the background are
done, and ansible-lint does not compete with them for the CPU.)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.ansible.conftest import ROOT, VENV_BIN, ansible_env

pytestmark = pytest.mark.slow

EXAMPLE = "inventory/example"
# The placeholders of the example's secrets (the vault a site writes): the variables resolve with them.
EXAMPLE_VAULT = ROOT / EXAMPLE / "group_vars/all/vault.yml.example"
PRIMARIES = ["db1.dc1.example.com", "files1.dc1.example.com"]
DR_HOSTS = ["dr1.dr.example.com", "dr2.dr.example.com"]

# What the role swaps (roles/drtool_failover: pair, step_down, step_up, reverse, verify) read on
# each host of a pair, besides the roles' defaults: the host may be the primary or the secondary.
SWAP_VARIABLES = [
    "drtool_install_method", "drtool_install_venv",
    "drtool_primary_state_root", "drtool_primary_token", "drtool_primary_token_file", "drtool_primary_ca_cert",
    "drtool_primary_ca_file", "drtool_primary_agent_listen", "drtool_primary_agent_nbd_socket",
    "drtool_primary_service_manager",
    "drtool_secondary_root", "drtool_secondary_listen_address", "drtool_secondary_port", "drtool_secondary_token",
    "drtool_secondary_token_file", "drtool_secondary_tls_cert", "drtool_secondary_tls_key",
    "drtool_failover_timeout", "drtool_failover_verify", "drtool_failover_verify_bytes",
    "drtool_failover_replica_url",
]


def test_ansible_lint_passes(tmp_path):
    proc = subprocess.run([str(VENV_BIN / "ansible-lint"), "--offline", "--nocolor"], cwd=ROOT,
                          env=ansible_env(tmp_path), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "Passed" in output and "0 failure(s), 0 warning(s)" in output, output[-6000:]


def inventory_list(tmp_path: Path, inventory: str) -> dict:
    listed = subprocess.run([str(VENV_BIN / "ansible-inventory"), "-i", inventory, "--list"], cwd=ROOT,
                            env=ansible_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def resolved(tmp_path: Path, inventory: str, hosts: list[str], variables: list[str], *args: str) -> dict:
    """{host: {variable: value}}, templated in each host's context as its plays see them.  Nothing
    contacts a host: set_fact runs on the controller, and the file is written on localhost."""
    out = tmp_path / "resolved.json"
    collect = ("{%- set values = {} -%}{%- for name in wanted_variables -%}"
               "{%- set value = lookup('ansible.builtin.vars', name, default='(undefined)') -%}"
               "{%- if value != '(undefined)' -%}{%- set _ = values.update({name: value}) -%}{%- endif -%}"
               "{%- endfor -%}{{ values }}")
    plays = [
        {"name": "Resolve the variables on each host", "hosts": ",".join(hosts), "gather_facts": False,
         "vars": {"wanted_variables": variables},
         "tasks": [{"name": "Resolve", "ansible.builtin.set_fact": {"resolved_for_test": collect}}]},
        {"name": "Write them", "hosts": "localhost", "gather_facts": False,
         "tasks": [{"name": "Write them", "ansible.builtin.copy": {
             "content": "{{ dict(%r | zip(%r | map('extract', hostvars, 'resolved_for_test'))) | to_json }}"
                        % (hosts, hosts), "dest": str(out), "mode": "0600"}}]},
    ]
    (tmp_path / "resolve.yml").write_text(yaml.safe_dump(plays))
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", inventory, str(tmp_path / "resolve.yml"), *args],
                          cwd=ROOT, env=ansible_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("inventory, groups", [
    ("inventory/local", {"primaries": ["local-primary"], "secondaries": ["local-secondary"]}),
    (EXAMPLE, {"primaries": PRIMARIES, "secondaries": sorted(DR_HOSTS + PRIMARIES)}),
])
def test_inventory_parses(tmp_path, inventory, groups):
    graph = subprocess.run([str(VENV_BIN / "ansible-inventory"), "-i", inventory, "--graph"], cwd=ROOT,
                           env=ansible_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert graph.returncode == 0 and "@primaries" in graph.stdout and "@secondaries" in graph.stdout, graph.stderr
    data = inventory_list(tmp_path, inventory)
    for group, hosts in groups.items():
        assert sorted(data[group]["hosts"]) == hosts


def test_local_inventory_keeps_every_host_under_drtool_base(tmp_path):
    """Every file either host uses in either role (a role swap makes the secondary the primary and
    the other way round: planned_failover.yml runs on inventory/local as it is) lives under
    drtool_base, each host's under its own directory."""
    base = tmp_path / "base"
    paths = ["drtool_primary_state_root", "drtool_primary_token_file", "drtool_primary_agent_nbd_socket",
             "drtool_primary_agent_pid_file", "drtool_primary_agent_log_file", "drtool_secondary_root",
             "drtool_secondary_token_file", "drtool_secondary_pid_file", "drtool_secondary_log_file",
             "drtool_install_venv"]
    hosts = ["local-primary", "local-secondary"]
    values = resolved(tmp_path, "inventory/local", hosts, paths + ["drtool_primary_volumes", "drtool_primary_peer_url",
                                                                   "drtool_secondary_listen_address",
                                                                   "drtool_primary_service_manager",
                                                                   "drtool_secondary_service_manager"],
                      "-e", json.dumps({"drtool_base": str(base)}))
    for host in hosts:
        found = values[host]
        assert sorted(name for name in paths if name in found) == sorted(paths), f"{host} lacks some"
        for name in paths:
            own = base if name == "drtool_install_venv" else base / host.removeprefix("local-")
            assert Path(found[name]).is_relative_to(own), f"{host}: {name}={found[name]} is outside {own}"
        assert found["drtool_primary_service_manager"] == found["drtool_secondary_service_manager"] == "daemon"
    for volume in values["local-primary"]["drtool_primary_volumes"]:
        assert Path(volume["device"]).is_relative_to(base / "primary"), volume
    # Each is the other's peer: the primary's replica server on the other's loopback address.
    assert values["local-primary"]["drtool_primary_peer_url"].startswith(
        f"http://{values['local-secondary']['drtool_secondary_listen_address']}:")
    assert values["local-secondary"]["drtool_primary_peer_url"].startswith(
        f"http://{values['local-primary']['drtool_secondary_listen_address']}:")


def test_example_inventory_can_run_a_role_swap_for_every_pair(tmp_path):
    """Each pair (a primary and the host named by its drtool_pair) has what planned_failover.yml,
    takeover.yml and reintegrate.yml need, in both directions: both hosts run a replica server on an
    address the other reaches, share the token, speak TLS and trust its CA, and the primary's peer is
    the URL the swap's reverse replication uses."""
    data = inventory_list(tmp_path, EXAMPLE)
    hostvars = data["_meta"]["hostvars"]
    pairs = [(primary, hostvars[primary]["drtool_pair"]) for primary in PRIMARIES]
    assert sorted(to for _, to in pairs) == DR_HOSTS
    for source, target in pairs:
        assert hostvars[target]["drtool_pair"] == source
        for host in (source, target):
            # Both run a replica server: either may be the secondary after a swap.
            assert host in data["secondaries"]["hosts"], f"{host} is not in secondaries"
            missing = [name for name in SWAP_VARIABLES if name not in hostvars[host]]
            assert missing == [], f"{host} lacks {missing}"
        assert [v["name"] for v in hostvars[source]["drtool_primary_volumes"]], f"{source} has no volumes"
        assert "drtool_primary_volumes" not in hostvars[target]  # one pair, one set of volumes
    names = [v["name"] for p in PRIMARIES for v in hostvars[p]["drtool_primary_volumes"]]
    assert len(names) == len(set(names)), "volume names are unique across the primaries"

    # The values, templated (with the placeholders of the vault a site writes).
    wanted = SWAP_VARIABLES + ["drtool_primary_peer_url", "drtool_primary_volumes", "drtool_pair"]
    values = resolved(tmp_path, EXAMPLE, PRIMARIES + DR_HOSTS, wanted, "-e", f"@{EXAMPLE_VAULT}")

    def replica_url(host: str) -> str:
        """As roles/drtool_failover/tasks/pair.yml derives the host's replica server URL."""
        v = values[host]
        if v["drtool_failover_replica_url"]:
            return v["drtool_failover_replica_url"]
        scheme = "https" if v["drtool_secondary_tls_cert"] else "http"
        return f"{scheme}://{v['drtool_secondary_listen_address']}:{v['drtool_secondary_port']}"

    addresses = [values[h]["drtool_secondary_listen_address"] for h in PRIMARIES + DR_HOSTS]
    assert len(set(addresses)) == len(addresses)
    for source, target in pairs:
        # site.yml pairs the volumes with the target's replica server under the URL the swap back uses.
        assert values[source]["drtool_primary_peer_url"] == replica_url(target)
        for host, other in ((source, target), (target, source)):
            v = values[host]
            assert replica_url(host).startswith("https://"), f"{host}: the replica server speaks TLS"
            assert not v["drtool_secondary_listen_address"].startswith("127."), f"{host} listens on loopback"
            assert v["drtool_secondary_tls_key"] and v["drtool_primary_ca_cert"], host
            # Whichever is the primary sends the token the other's replica server expects.
            assert v["drtool_primary_token"] == values[other]["drtool_secondary_token"] != "", host
            assert v["drtool_failover_verify"] in ("nbd", "none") and float(v["drtool_failover_timeout"]) > 0
            for name in ("drtool_primary_state_root", "drtool_secondary_root"):
                assert not Path(v[name]).is_relative_to("/tmp") and not Path(v[name]).is_relative_to("/var/tmp"), \
                    f"{host}: {name} is hidden by the units' PrivateTmp"

    # planned_failover.yml's swap play targets exactly the pair (one batch of two), both ways.
    for source, target in pairs + [(t, s) for s, t in pairs]:
        proc = subprocess.run(
            [str(VENV_BIN / "ansible-playbook"), "-i", EXAMPLE, str(ROOT / "playbooks/planned_failover.yml"),
             "--list-hosts", "-e", json.dumps({"drtool_failover_from": source, "drtool_failover_to": target})],
            cwd=ROOT, env=ansible_env(tmp_path), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        swap = proc.stdout.split("Swap the roles, one pair at a time", 1)[1]
        assert sorted(swap.split("hosts (2):", 1)[1].split()) == sorted([source, target]), swap
