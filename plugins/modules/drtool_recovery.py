#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drtool contributors
# Apache License 2.0 (see the project's pyproject.toml)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drtool_recovery
short_description: A drtool volume scrubbed, in recovery (degraded) or back to normal (failback)
description:
  - V(scrubbed) reads and verifies every region against the manifest (C(drtool scrub)) and records what it finds
    in the volume's bad map, the regions a later V(degraded) serves from the replica. It reports C(changed) when the
    bad map changed (new bad regions, or regions found good again). This is the scrub that changes something;
    M(drtool.drtool.drtool_health_info) with O(drtool.drtool.drtool_health_info#module:mode=scrub) only reports.
  - V(degraded) enters recovery (C(drtool recover)), at once; an overlay takes every later write, and reads are
    merged and verified (overlay, then the regions fetched from the replica, then the healthy local ones).
    Nothing changes for a volume already in recovery.
  - V(normal) fails back (C(drtool failback)) and copies each bad region from the replica and each overlay region
    into the repaired device, or into a replacement O(device), optionally throttled to O(rate); then normal
    replication resumes. Resumable; nothing changes for a volume already normal.
  - Through a running agent when there is one.
  - A thin adapter over C(drtool.api); drtool must be importable by the Python running the module.
version_added: "0.1.0"
author:
  - drtool contributors (@drtool)
options:
  name:
    description:
      - The volume.
    type: str
    required: true
    aliases: [volume]
  state:
    description:
      - V(scrubbed) scrubs and records the bad regions; V(degraded) enters recovery; V(normal) fails back.
    type: str
    required: true
    choices: [degraded, normal, scrubbed]
  source:
    description:
      - With V(degraded), where the replica's bytes come from. V(mirror) (the current replica), V(journal)
        (the changes since O(local_era)) or V(snapshot:NAME) (a point in time).
    type: str
    default: mirror
  accept_rollback:
    description:
      - With O(source=snapshot:NAME), go ahead although regions go back to the snapshot's time (the bad regions
        the snapshot holds older bytes of; the rest of the volume stays as it is now). Without it the module
        fails, listing those regions, and nothing changes.
    type: bool
    default: false
  local_era:
    description:
      - With V(degraded), the local copy is older (restored from a backup) and holds the writes made before this
        era, and every region changed since is read from the replica too.
      - Required with O(source=journal).
    type: int
  device:
    description:
      - With V(normal), a replacement device of the same size to fail back onto. Default the volume's own
        (repaired) device.
    type: path
  rate:
    description:
      - With V(normal), throttle the copy to this many bytes per second (V(200M)). Default unlimited.
    type: str
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
      - Reports whether the volume would enter recovery or fail back; does neither.
      - V(scrubbed) scrubs in check mode too and reports what it finds, without recording it.
  diff_mode:
    support: full
    description: Shows the volume's mode and device (and with V(scrubbed), its bad regions) before and after.
notes:
  - Entering recovery for a different O(source) or O(local_era) than the one in force fails; fail back first.
  - Failback refuses while regions are lost (bad and never replicated); write them first.
seealso:
  - module: drtool.drtool.drtool_health_info
  - module: drtool.drtool.drtool_agent
"""

EXAMPLES = r"""
- name: Scrub db and record its bad regions
  drtool.drtool.drtool_recovery:
    name: db
    state: scrubbed
  register: scrub

- name: Serve db from the replica where its local regions are bad
  drtool.drtool.drtool_recovery:
    name: db
    state: degraded

- name: Fail back onto the replacement disk at 200 MiB/s
  drtool.drtool.drtool_recovery:
    name: db
    state: normal
    device: /dev/disk/by-id/wwn-0x5000c500a1b2c3d4
    rate: 200M
"""

RETURN = r"""
volume:
  description: The volume's name.
  returned: always
  type: str
  sample: db
health:
  description: V(ONLINE), V(DEGRADED) (bad regions) or V(FAULTED) (the device is missing or unreadable), as the scrub found it.
  returned: when O(state=scrubbed)
  type: str
  sample: DEGRADED
bad_regions:
  description: Runs of bad regions the scrub found, as [first, count] pairs.
  returned: when O(state=scrubbed)
  type: list
  elements: list
  sample: [[3, 1], [40, 2]]
bad_count:
  description: Number of bad regions the scrub found.
  returned: when O(state=scrubbed)
  type: int
  sample: 3
faulted:
  description: Why the device is unusable, or null.
  returned: when O(state=scrubbed)
  type: str
size:
  description: The volume's size in bytes.
  returned: when O(state=scrubbed)
  type: int
region_size:
  description: The volume's region size in bytes.
  returned: when O(state=scrubbed)
  type: int
scrub:
  description:
    - The scrub report (regions scanned, C(new_bad_regions) and C(cleared_regions), errors, seconds).
    - In check mode, what the scrub found without recording it.
  returned: when O(state=scrubbed)
  type: dict
mode:
  description: The volume's mode after the task (V(normal), V(degraded), V(resync)).
  returned: always
  type: str
  sample: degraded
device:
  description: The volume's device after the task.
  returned: always
  type: str
recover:
  description: What C(drtool recover) returned (requested regions, lost regions, recovery record).
  returned: when O(state=degraded) and the volume entered recovery
  type: dict
failback:
  description: What C(drtool failback) returned (regions copied, device, failback record).
  returned: when O(state=normal) and the volume failed back
  type: dict
lost_regions:
  description: Regions that are bad and were never replicated (reads of them fail with EIO), as [first, count].
  returned: always
  type: list
  elements: list
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.drtool.drtool.plugins.module_utils.drtool_common import STATE_ROOT_OPTION, call, require_drtool, volume_status


def _view(status):
    return {"mode": status["mode"], "device": status["device"]}


def _scrubbed(module, api, name, root, status):
    """Scrub, record the findings (not in check mode), report them; changed when the bad map changed."""
    scrub = call(module, api.scrub_volume, name, root=root, record=not module.check_mode)
    changed = bool(scrub["new_bad_regions"] or scrub["cleared_regions"])
    output = dict(changed=changed, volume=name, mode=status["mode"], device=status["device"], scrub=scrub,
                  health=scrub["health"], faulted=scrub["faulted"] or status.get("faulted"),
                  bad_regions=scrub["bad_regions"], bad_count=scrub["bad_count"],
                  lost_regions=status["lost_regions"], size=status["size"], region_size=status["region_size"])
    if changed and not module.check_mode:
        output["lost_regions"] = volume_status(module, name, root)["lost_regions"]
    if module._diff:
        output["diff"] = dict(before={"bad_regions": status["bad_regions"]}, after={"bad_regions": scrub["bad_regions"]},
                              before_header="volume %s" % name, after_header="volume %s" % name)
    module.exit_json(**output)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True, aliases=["volume"]),
            state=dict(type="str", required=True, choices=["degraded", "normal", "scrubbed"]),
            source=dict(type="str", default="mirror"),
            accept_rollback=dict(type="bool", default=False),
            local_era=dict(type="int"),
            device=dict(type="path"),
            rate=dict(type="str"),
            state_root=STATE_ROOT_OPTION,
        ),
        # The journal holds the changes after an era: which one, local_era says.
        required_if=[("source", "journal", ["local_era"])],
        supports_check_mode=True,
    )
    api = require_drtool(module)
    p = module.params
    name, root, state = p["name"], p["state_root"], p["state"]
    # Options that only one state takes: an argument spec can require an option given another's value
    # (required_if above), but cannot forbid one, so these two are checked here.
    if state != "normal" and (p["device"] or p["rate"]):
        module.fail_json(msg="device and rate are for state=normal (failback), not state=%s" % state)
    if state != "degraded" and (p["local_era"] is not None or p["source"] != "mirror"):
        module.fail_json(msg="source and local_era are for state=degraded (recovery), not state=%s" % state)

    status = volume_status(module, name, root)
    if status is None:
        module.fail_json(msg="volume %s is not registered%s" % (name, " under %s" % root if root else ""))
    if state == "scrubbed":
        _scrubbed(module, api, name, root, status)
    before = _view(status)
    output = {"volume": name}
    if state == "degraded":
        changed = status["mode"] == "normal"
        if changed and not module.check_mode:
            output["recover"] = call(module, api.recover, name, local_era=p["local_era"], source=p["source"],
                                     accept_rollback=p["accept_rollback"], root=root)
            changed = output["recover"]["changed"]
    else:
        changed = status["mode"] != "normal"
        if changed and not module.check_mode:
            output["failback"] = call(module, api.failback, name, device=p["device"], rate=p["rate"], root=root)
            changed = output["failback"]["changed"]
        elif not changed and p["device"] and p["device"] != status["device"]:
            module.fail_json(msg="volume %s is in normal mode on %s; there is nothing to fail back onto %s"
                                 % (name, status["device"], p["device"]))

    if module.check_mode or not changed:
        after = dict(before)
        if changed:
            after["mode"] = state if state == "degraded" else "normal"
            if p["device"]:
                after["device"] = p["device"]
        lost = status["lost_regions"]
    else:
        now = volume_status(module, name, root)
        after, lost = _view(now), now["lost_regions"]
    output.update(changed=changed, mode=after["mode"], device=after["device"], lost_regions=lost)
    if module._diff:
        output["diff"] = dict(before=before, after=after,
                              before_header="volume %s" % name, after_header="volume %s" % name)
    module.exit_json(**output)


if __name__ == "__main__":
    main()
