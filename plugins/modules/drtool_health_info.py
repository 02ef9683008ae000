#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drtool contributors
# Apache License 2.0 (see the project's pyproject.toml)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drtool_health_info
short_description: Health of drtool volumes, from a scrub or a quick probe
description:
  - With O(mode=probe), a quick look at the volume's recorded health plus a probe of its device (is it there,
    the right size, readable at both ends). A device that fails the probe is reported C(FAULTED).
  - With O(mode=scrub), reads and verifies every region against the manifest (C(drtool scrub)) and reports
    the bad regions it found, without recording them (like every C(_info) module it never changes anything).
    To record them in the volume's bad map (what recovery serves from the replica), use
    M(drtool.drtool.drtool_recovery) with O(drtool.drtool.drtool_recovery#module:state=scrubbed).
    Through a running agent when there is one.
  - Returns health, bad and lost regions, mode and replication lag of each volume.
  - A thin adapter over C(drtool.api); drtool must be importable by the Python running the module.
version_added: "0.1.0"
author:
  - drtool contributors (@drtool)
options:
  names:
    description:
      - The volumes to look at. Default every volume registered under O(state_root).
    type: list
    elements: str
    aliases: [name, volumes]
  mode:
    description:
      - V(probe) is quick and reads only a few bytes of each device.
      - V(scrub) reads every region of each volume (not the overlay's) and verifies it; nothing is recorded.
    type: str
    choices: [probe, scrub]
    default: probe
  probe_peer:
    description:
      - Also ask each volume's replica server whether it answers (a short timeout).
    type: bool
    default: true
  state_root:
    description:
      - drtool's state root on the host. Default C($DRTOOL_STATE_ROOT), else C(/var/lib/drtool).
    type: path
requirements:
  - drtool (in the Python running the module)
attributes:
  check_mode:
    support: full
    description:
      - Runs the same in check mode, and never changes anything (no data, mode, configuration or bad map).
  diff_mode:
    support: none
    description: Changes nothing, so there is nothing to show.
notes:
  - Never reports C(changed).
seealso:
  - module: drtool.drtool.drtool_status_info
  - module: drtool.drtool.drtool_recovery
"""

EXAMPLES = r"""
- name: Scrub every volume (reads and verifies; records nothing)
  drtool.drtool.drtool_health_info:
    mode: scrub
  register: health

- name: Show what needs recovery
  ansible.builtin.debug:
    msg: "{{ health.unhealthy }}"

- name: Quick probe of one volume, without asking the replica server
  drtool.drtool.drtool_health_info:
    names: [db]
    probe_peer: false
"""

RETURN = r"""
volumes:
  description: One entry per volume.
  returned: always
  type: list
  elements: dict
  contains:
    volume:
      description: The volume's name.
      type: str
      sample: db
    health:
      description: V(ONLINE), V(DEGRADED) (bad regions) or V(FAULTED) (the device is missing or unreadable).
      type: str
      sample: DEGRADED
    mode:
      description: V(normal), V(degraded) (overlay active, merged reads) or V(resync) (failback running).
      type: str
      sample: normal
    faulted:
      description: Why the device is unusable, or null.
      type: str
    device:
      description: The volume's device.
      type: str
    size:
      description: The volume's size in bytes.
      type: int
    region_size:
      description: The volume's region size in bytes.
      type: int
    bad_regions:
      description: Runs of bad regions, as [first, count] pairs.
      type: list
      sample: [[3, 1], [40, 2]]
    bad_count:
      description: Number of bad regions.
      type: int
      sample: 3
    lost_regions:
      description: Runs of regions that are bad and were never replicated (reads fail with EIO).
      type: list
    lost_count:
      description: Number of lost regions.
      type: int
    lag:
      description: Replication lag (records, regions, bytes, oldest_seconds, summary).
      type: dict
    peer:
      description: The replica server's URL and whether it answered (when O(probe_peer=true)).
      type: dict
    agent:
      description: Whether an agent serves the volume, and its NBD URIs.
      type: dict
    scrub:
      description: The scrub report (regions scanned, new and cleared bad regions, errors, seconds).
      type: dict
      returned: with O(mode=scrub)
    probe:
      description: The device probe (path, state, size, reason).
      type: dict
      returned: with O(mode=probe)
unhealthy:
  description: Names of the volumes whose health is not V(ONLINE).
  returned: always
  type: list
  elements: str
  sample: [db]
healthy:
  description: Whether every volume is V(ONLINE).
  returned: always
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.drtool.drtool.plugins.module_utils.drtool_common import STATE_ROOT_OPTION, call, require_drtool

KEYS = ("volume", "health", "mode", "faulted", "device", "size", "region_size", "bad_regions", "bad_count", "lost_regions",
        "lost_count", "lag", "peer", "agent", "era", "last_scrub")


def _probe(api, status, root):
    """The quick device probe (no scrub)."""
    return api.probe_volume(status["volume"], root=root)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            names=dict(type="list", elements="str", aliases=["name", "volumes"]),
            mode=dict(type="str", default="probe", choices=["probe", "scrub"]),
            probe_peer=dict(type="bool", default=True),
            state_root=STATE_ROOT_OPTION,
        ),
        supports_check_mode=True,
    )
    api = require_drtool(module)
    p = module.params
    root = p["state_root"]
    names = p["names"]
    if names is None:
        names = [s["volume"] for s in call(module, api.status, None, root=root, probe_peer=False)]

    volumes = []
    for name in names:
        scrub = None
        if p["mode"] == "scrub":
            # An _info module changes nothing: the scrub reports and never records (drtool_recovery
            # state=scrubbed is the one that records).
            scrub = call(module, api.scrub_volume, name, root=root, record=False)
        status = call(module, api.status, name, root=root, probe_peer=p["probe_peer"])[0]
        entry = {key: status.get(key) for key in KEYS}
        if scrub is not None:
            entry["scrub"] = scrub
            # What the scrub found (not recorded).
            entry["health"] = scrub["health"]
            entry["faulted"] = scrub["faulted"] or entry["faulted"]
            entry["bad_regions"] = scrub["bad_regions"]
            entry["bad_count"] = scrub["bad_count"]
        else:
            entry["probe"] = call(module, _probe, api, status, root)
            if not entry["probe"]["ok"]:
                entry["health"] = "FAULTED"
                entry["faulted"] = "%s: %s" % (entry["probe"]["path"], entry["probe"]["reason"])
        volumes.append(entry)

    unhealthy = [v["volume"] for v in volumes if v["health"] != "ONLINE"]
    module.exit_json(changed=False, volumes=volumes, unhealthy=unhealthy, healthy=not unhealthy)


if __name__ == "__main__":
    main()
