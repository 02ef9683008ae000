#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drtool contributors
# Apache License 2.0 (see the project's pyproject.toml)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drtool_replication
short_description: Replication of a drtool volume caught up, given regions forced, or the replica verified
description:
  - Without O(regions), ships the volume's pending writes to its replica server and waits until the lag is
    zero (C(drtool replicate --wait)). If that takes longer than O(timeout), the task fails and says how much
    is still pending.
  - With O(regions), ships exactly those regions' pending writes now and waits for the acknowledgement
    (C(drtool replicate --regions)).
  - With O(verify=true), proves the replica instead (C(drtool verify)). The replica server re-reads and re-hashes
    its copy of each region (O(regions) only, when given) and the digests are compared with the volume's
    manifest and with what was acknowledged. Regions whose replica bytes fail the replica's own digest
    (C(replica-rot)) or differ from the manifest though acknowledged (C(divergent)) fail the task, unless
    O(repair=true) ships them again and they then verify. Regions not replicated yet are C(pending), not a failure.
  - Through a running agent when there is one (its background replicator keeps shipping meanwhile).
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
  regions:
    description:
      - Regions to force, as numbers or ranges (V(3), V(10-12)).
    type: list
    elements: str
  timeout:
    description:
      - Seconds the wait for a zero lag may take.
    type: float
    default: 300
  verify:
    description:
      - Verify the replica (C(drtool verify)) instead of shipping pending writes.
    type: bool
    default: false
  repair:
    description:
      - With O(verify=true), ship the regions that differ again (and whatever is pending), then verify them once more.
    type: bool
    default: false
  rate:
    description:
      - With O(verify=true), bytes per second the replica server may read (V(200M)); default unthrottled.
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
      - Predicts C(changed) as the real run would decide it, and ships nothing. Without O(regions), whether
        anything is pending; with O(regions), whether any of those regions has pending writes (the others are
        left to the background replicator). Fails as the real run would on a volume without a peer or a region
        outside the volume. With O(verify=true), the verify runs (it reads, it writes nothing, not even its resume
        cursor) and C(changed) says whether O(repair=true) would ship regions.
  diff_mode:
    support: full
    description: Shows the lag before and after.
notes:
  - C(changed) means records were shipped; a volume already in sync reports C(changed=false).
seealso:
  - module: drtool.drtool.drtool_volume
"""

EXAMPLES = r"""
- name: Drain replication before a planned failover (fail after 10 minutes)
  drtool.drtool.drtool_replication:
    name: db
    timeout: 600

- name: Force the regions a degraded read needs
  drtool.drtool.drtool_replication:
    name: db
    regions: ["3", "10-12"]

- name: Prove the replica holds what was acknowledged; ship again what it does not
  drtool.drtool.drtool_replication:
    name: db
    verify: true
    repair: true
    rate: 200M
"""

RETURN = r"""
records_shipped:
  description: Log records shipped by this task.
  returned: always
  type: int
  sample: 12
bytes_shipped:
  description: Bytes shipped by this task.
  returned: always
  type: int
forced_regions:
  description: The forced regions, as [first, count] runs.
  returned: always
  type: list
  sample: [[3, 1], [10, 3]]
lag:
  description: The lag after the task (records, regions, bytes, oldest_seconds, bitmap_mode).
  returned: always
  type: dict
  sample: {"records": 0, "regions": 0, "bytes": 0, "oldest_seconds": 0.0, "bitmap_mode": false}
verify:
  description:
    - What C(drtool verify --json) reports (docs/status.md) - result (V(equal), V(pending), V(differ)), replica_rot,
      divergent and pending runs, differ, regions_compared, bytes_read, and with O(repair=true) repair.
  returned: with O(verify=true)
  type: dict
  sample: {"result": "equal", "replica_rot": [], "divergent": [], "pending": [], "regions_compared": 16}
in_sync:
  description: The replica holds exactly what the volume does (the verify's result is V(equal)).
  returned: with O(verify=true)
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.drtool.drtool.plugins.module_utils.drtool_common import STATE_ROOT_OPTION, fail_drtool, require_drtool, volume_status


def _pending(lag):
    return bool(lag.get("records") or lag.get("regions"))


def _forced_runs(module, status, regions):
    """The [first, count] runs a real run would force (drtool's own parsing and bounds check)."""
    from drtool.errors import DrtoolError
    from drtool.regions import Geometry, parse_runs

    try:
        return [list(run) for run in parse_runs(regions, Geometry(status["size"], status["region_size"]))]
    except DrtoolError as exc:
        fail_drtool(module, exc)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True, aliases=["volume"]),
            regions=dict(type="list", elements="str"),
            timeout=dict(type="float", default=300.0),
            verify=dict(type="bool", default=False),
            repair=dict(type="bool", default=False),
            rate=dict(type="str"),
            state_root=STATE_ROOT_OPTION,
        ),
        supports_check_mode=True,
    )
    api = require_drtool(module)
    from drtool.errors import DrtoolError, OperationTimeout, UsageError
    from drtool.regions import from_runs

    p = module.params
    name, root = p["name"], p["state_root"]
    if p["timeout"] <= 0:
        module.fail_json(msg="timeout must be a positive number of seconds, not %s" % p["timeout"])
    status = volume_status(module, name, root)
    if status is None:
        module.fail_json(msg="volume %s is not registered%s" % (name, " under %s" % root if root else ""))
    before = status["lag"]
    regions = ",".join(r.strip() for r in p["regions"]) if p["regions"] else None
    if (p["repair"] or p["rate"]) and not p["verify"]:
        module.fail_json(msg="repair and rate apply to verify=true")
    if p["verify"]:
        _verify(module, api, name, root, regions, before)

    if module.check_mode:
        # Predict what the real run does: it fails without a peer, forces exactly the given regions
        # (shipping only what is pending in them), or waits until nothing is pending.
        if status.get("peer") is None:
            fail_drtool(module, UsageError("volume %s has no peer: run drtool protect first" % name))
        forced = _forced_runs(module, status, regions) if regions else []
        if regions:
            pending = set(from_runs(status["maps"]["unreplicated"]))
            changed = any(region in pending for region in from_runs(forced))
        else:
            changed = _pending(before)
        result = dict(records_shipped=0, bytes_shipped=0, forced_regions=forced, lag=before)
    else:
        try:
            result = api.replicate(name, wait=regions is None, regions=regions, timeout=p["timeout"], root=root)
        except OperationTimeout as exc:
            now = volume_status(module, name, root) or {}
            fail_drtool(module, exc, lag=now.get("lag"))
        except DrtoolError as exc:
            fail_drtool(module, exc)
        changed = result["records_shipped"] > 0
    output = dict(changed=changed, records_shipped=result["records_shipped"], bytes_shipped=result["bytes_shipped"],
                  forced_regions=result["forced_regions"], lag=result["lag"])
    if module._diff:
        output["diff"] = dict(before={"lag": before}, after={"lag": result["lag"]},
                              before_header="volume %s" % name, after_header="volume %s" % name)
    module.exit_json(**output)


def _verify(module, api, name, root, regions, before):
    """verify=true: drtool verify [--repair]; fails while regions differ (replica-rot, divergent)."""
    from drtool.errors import DrtoolError, ExitCode

    p = module.params
    repair = p["repair"] and not module.check_mode
    try:
        result = api.verify_volume(name, regions=regions, repair=repair, rate=p["rate"], timeout=p["timeout"],
                                   root=root, cursor=not module.check_mode)
    except DrtoolError as exc:
        fail_drtool(module, exc)
    if repair:
        shipped = result["repair"]["relogged"] or result["pending"] or result["differ"]
        changed = bool(shipped)
    else:
        changed = bool(p["repair"] and (result["differ"] or result["pending"]))
    now = volume_status(module, name, root) or {}
    output = dict(changed=changed, verify=result, in_sync=result["in_sync"], records_shipped=0, bytes_shipped=0,
                  forced_regions=[], lag=now.get("lag", before))
    if module._diff:
        output["diff"] = dict(before={"replica": result["result"] if not repair else _before(result)},
                              after={"replica": result["result"]},
                              before_header="replica of %s" % name, after_header="replica of %s" % name)
    if result["result"] == "differ" and not (module.check_mode and p["repair"]):
        differ = result["repair"]["after"]["differ"] if result["repair"] else result["differ"]
        runs = ", ".join("%s %s" % (d["reason"], d["first"] if d["count"] == 1 else "%d-%d" % (
            d["first"], d["first"] + d["count"] - 1)) for d in differ)
        module.fail_json(msg="the replica of %s differs from the volume: %s%s" % (
            name, runs, "" if p["repair"] else " (repair=true ships them again)"),
            exit_code=int(ExitCode.BAD_REGIONS), **output)
    module.exit_json(**output)


def _before(result):
    if result["differ"]:
        return "differ"
    return "pending" if result["pending"] else "equal"


if __name__ == "__main__":
    main()
