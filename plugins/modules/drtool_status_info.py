#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drtool contributors
# Apache License 2.0 (see the project's pyproject.toml)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drtool_status_info
short_description: The status of every drtool volume on the host, as data
description:
  - Returns C(drtool status --json) of every volume registered under the state root (or of the named ones),
    with health, mode, bad and lost regions, replication lag, peer, agent, recovery and failback records, in
    drtool's stable C(drtool.status/1) schema.
  - Through a running agent when there is one (its live lag and peer state).
  - Feed the gathered lists to C(drtool report) for one rich report of a fleet (see C(playbooks/status.yml)).
  - A thin adapter over C(drtool.api); drtool must be importable by the Python running the module.
version_added: "0.1.0"
author:
  - drtool contributors (@drtool)
options:
  names:
    description:
      - The volumes. Default every volume registered under O(state_root) (none is not an error).
    type: list
    elements: str
    aliases: [name, volumes]
  probe_peer:
    description:
      - Ask each volume's replica server whether it answers (a short timeout).
    type: bool
    default: true
  groups:
    description:
      - Also return every consistency group defined under O(state_root) (RV(groups)), with its members, its lag (the
        group's recovery point) and whether its replica is write-order consistent.
    type: bool
    default: false
  state_root:
    description:
      - drtool's state root on the host. Default C($DRTOOL_STATE_ROOT), else C(/var/lib/drtool).
    type: path
requirements:
  - drtool (in the Python running the module)
attributes:
  check_mode:
    support: full
    description: Read-only; runs the same in check mode.
  diff_mode:
    support: none
    description: Changes nothing, so there is nothing to show.
seealso:
  - module: drtool.drtool.drtool_health_info
"""

EXAMPLES = r"""
- name: Gather the status of every volume
  drtool.drtool.drtool_status_info:
  register: drtool

- name: Fail when a volume is not ONLINE
  ansible.builtin.assert:
    that: drtool.healthy
    fail_msg: "not ONLINE: {{ drtool.unhealthy | join(', ') }}"
"""

RETURN = r"""
volumes:
  description: The status of each volume (schema C(drtool.status/1), see drtool's docs/status.md).
  returned: always
  type: list
  elements: dict
  sample:
    - schema: drtool.status/1
      volume: db
      health: ONLINE
      mode: normal
      role: primary
      bad_count: 0
      lag: {"records": 0, "regions": 0, "summary": "in sync"}
names:
  description: The volumes' names.
  returned: always
  type: list
  elements: str
unhealthy:
  description: Names of the volumes whose health is not V(ONLINE).
  returned: always
  type: list
  elements: str
healthy:
  description: Whether every volume is V(ONLINE).
  returned: always
  type: bool
groups:
  description:
    - The status of each consistency group defined under O(state_root) (schema C(drtool.group-status/1), see drtool's
      docs/status.md), whatever O(names) says, with O(groups=true); else empty.
  returned: always
  type: list
  elements: dict
  sample:
    - group: db
      members: [db-wal, db-data]
      role: primary
      peer: https://dr-site.example.com:8470
      lag: {"records": 0, "oldest_seconds": 0}
      consistent: true
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.drtool.drtool.plugins.module_utils.drtool_common import STATE_ROOT_OPTION, call, require_drtool


def main():
    module = AnsibleModule(
        argument_spec=dict(
            names=dict(type="list", elements="str", aliases=["name", "volumes"]),
            probe_peer=dict(type="bool", default=True),
            groups=dict(type="bool", default=False),
            state_root=STATE_ROOT_OPTION,
        ),
        supports_check_mode=True,
    )
    api = require_drtool(module)
    p = module.params
    if p["names"] is None:
        volumes = call(module, api.status, None, root=p["state_root"], probe_peer=p["probe_peer"])
    else:
        volumes = [call(module, api.status, name, root=p["state_root"], probe_peer=p["probe_peer"])[0]
                   for name in p["names"]]
    unhealthy = [v["volume"] for v in volumes if v["health"] != "ONLINE"]
    groups = call(module, api.group_status, None, root=p["state_root"], probe_peer=p["probe_peer"]) if p["groups"] else []
    module.exit_json(changed=False, volumes=volumes, names=[v["volume"] for v in volumes],
                     unhealthy=unhealthy, healthy=not unhealthy, groups=groups)


if __name__ == "__main__":
    main()
