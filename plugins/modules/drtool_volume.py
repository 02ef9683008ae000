#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drtool contributors
# Apache License 2.0 (see the project's pyproject.toml)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drtool_volume
short_description: A drtool primary volume registered and paired with its replica
description:
  - Registers a block device or a regular file as a drtool volume on the primary (C(drtool init)),
    which digests every region, and pairs it with its replica server (C(drtool protect)), which runs
    or resumes the initial full sync.
  - With O(state=absent), unregisters the volume on the primary. The device and the replica on the
    secondary are left alone.
  - A thin adapter over C(drtool.api); drtool must be importable by the Python running the module
    (the C(drtool_install) role sets C(ansible_python_interpreter) to its venv).
  - Registration is never repeated over an existing volume unless O(force=true); a volume registered
    with another device or region size is a clear failure, because re-registering discards its state.
version_added: "0.1.0"
author:
  - drtool contributors (@drtool)
options:
  name:
    description:
      - The volume's name (1-64 letters, digits, C(-), C(_) or C(.)).
    type: str
    required: true
    aliases: [volume]
  state:
    description:
      - V(present) registers the volume (if it is not) and pairs it with O(peer) (if given and not yet paired
        with it, or if the initial sync did not finish).
      - V(absent) unregisters it. It fails while an agent serves the volume (stop the agent first).
    type: str
    choices: [present, absent]
    default: present
  device:
    description:
      - The volume's device, a block device or a regular file. Required with O(state=present).
    type: path
  region_size:
    description:
      - The unit of tracking, a power of two from 4K to 64M, fixed at registration.
    type: str
    default: 64K
  peer:
    description:
      - URL of the secondary's replica server, for example V(https://dr-site:8470).
      - When omitted, the volume is registered but not paired (an existing pairing is kept).
    type: str
  token_file:
    description:
      - File holding the bearer token the replica server expects.
      - With O(token), the module writes the token there (mode 0600).
    type: path
  token:
    description:
      - The bearer token. Written to O(token_file), mode 0600, only when it differs. Never logged.
    type: str
  ca:
    description:
      - CA certificate (PEM file) that signed the replica server's TLS certificate, for an V(https) peer.
    type: path
  insecure:
    description:
      - Pair with an V(http://) O(peer) whose host is not loopback (C(drtool protect --insecure)). Without it drtool
        refuses such a peer, because the bearer token and the volume's bytes would cross the network in cleartext.
      - Only for a link that is private by other means (a dedicated, encrypted tunnel or VPN), or a lab. The pairing
        keeps it (C(drtool status) shows the link as insecure); the replica server must run with its own
        C(insecure) as well. Changing it on a paired volume updates the pairing.
      - Not needed for V(https://) peers, or for V(http://) on loopback.
    type: bool
    default: false
  settings:
    description:
      - The volume's settings (C(drtool configure)), changed live when an agent serves it. Only the keys given
        are managed; the others keep their values.
    type: dict
    suboptions:
      copy_on_read:
        description: Keep regions fetched from the replica in the overlay, so the next read is local.
        type: bool
      auto_degrade:
        description: A bad region seen while serving switches the volume to degraded mode by itself.
        type: bool
      log_limit:
        description: Pending replication log before bitmap mode, for example V(1G) (at least 1M).
        type: str
      fetch_timeout:
        description: Seconds one request to the replica may wait while a client's read needs it.
        type: float
  force:
    description:
      - Re-register a volume registered with another device or region size.
      - This discards the volume's drtool state (maps, log, overlay, pairing) and digests the device again.
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
    description:
      - Reports what would be registered, paired or removed, and for a registered volume what its sync would
        copy (RV(plan)); changes nothing.
  diff_mode:
    support: full
    description: Shows the registration and pairing before and after.
notes:
  - Pairing runs the initial full sync before the task returns; for a large volume the task takes that long.
  - After a failback onto a replacement device the volume is registered with the new device; update the
    device in your inventory then, or the next run fails with "registered with another device".
seealso:
  - module: drtool.drtool.drtool_agent
  - module: drtool.drtool.drtool_replica
"""

EXAMPLES = r"""
- name: Register and protect the database volume
  drtool.drtool.drtool_volume:
    name: db
    device: /dev/vg0/db
    peer: https://dr-site.example.com:8470
    token_file: /etc/drtool/peer.token
    token: "{{ drtool_token }}"
    ca: /etc/drtool/dr-ca.pem

- name: A volume for small random I/O that fails reads fast when the replica hangs
  drtool.drtool.drtool_volume:
    name: oltp
    device: /dev/vg0/oltp
    region_size: 4K
    peer: https://dr-site.example.com:8470
    token_file: /etc/drtool/peer.token
    settings:
      fetch_timeout: 5
      log_limit: 4G

- name: Register a volume without a replica yet
  drtool.drtool.drtool_volume:
    name: scratch
    device: /srv/images/scratch.img
    region_size: 1M

- name: Unregister a volume (stop its agent first)
  drtool.drtool.drtool_volume:
    name: scratch
    state: absent
"""

RETURN = r"""
volume:
  description: The volume's name.
  returned: always
  type: str
  sample: db
actions:
  description: What the task did (or would do, in check mode), in order.
  returned: always
  type: list
  elements: str
  sample: [registered, paired]
registered:
  description: Whether the volume is registered after the task.
  returned: always
  type: bool
  sample: true
device:
  description: The device the volume is registered with.
  returned: when registered
  type: str
  sample: /dev/vg0/db
region_size:
  description: Region size in bytes.
  returned: when registered
  type: int
  sample: 65536
peer:
  description: The replica server the volume is paired with.
  returned: when registered
  type: str
  sample: https://dr-site.example.com:8470
insecure:
  description: Whether the pairing accepts plain HTTP beyond loopback (O(insecure)).
  returned: when registered
  type: bool
  sample: false
initial_sync:
  description: State of the initial sync (V(running), V(done)), or null when not paired.
  returned: when registered
  type: str
  sample: done
settings:
  description: The volume's settings after the task (or as they would be, in check mode).
  returned: when registered
  type: dict
  sample: {"copy_on_read": true, "auto_degrade": true, "log_limit": 1073741824, "fetch_timeout": 30.0}
init:
  description: What C(drtool init) returned.
  returned: when the volume was registered by this task
  type: dict
plan:
  description:
    - What the pairing copies (or would copy, in check mode), as drtool plans it before it starts, C(mode)
      V(full) (every region), V(incremental) (a fast failback after a role swap, only the regions the peer
      lacks, C(divergent) of them written there and never shipped here) or V(resume) (an interrupted sync).
    - In check mode it is known only for a volume that is already registered (the replica server is asked);
      null when the replica server could not tell (a warning says why).
  returned: when the volume is paired or its sync resumed by this task (or would be, in check mode)
  type: dict
  sample: {"mode": "incremental", "regions": 3, "bytes": 196608, "divergent": 2}
protect:
  description: What C(drtool protect) returned (regions synced, records and bytes shipped).
  returned: when the volume was paired or its sync resumed by this task
  type: dict
  sample: {"volume": "db", "peer": "https://dr-site.example.com:8470", "changed": true, "regions_synced": 64}
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.drtool.drtool.plugins.module_utils.drtool_common import (
    STATE_ROOT_OPTION, call, ensure_secret_file, require_drtool, volume_status)


def _view(status):
    """The part of a volume's status this module manages (also its diff)."""
    if status is None:
        return {"registered": False}
    replication = status.get("replication") or {}
    return {
        "registered": True,
        "device": status["device"],
        "region_size": status["region_size"],
        "peer": (status.get("peer") or {}).get("url"),
        "insecure": bool((status.get("peer") or {}).get("insecure")),
        "initial_sync": replication.get("initial_sync"),
    }


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True, aliases=["volume"]),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            device=dict(type="path"),
            region_size=dict(type="str", default="64K"),
            peer=dict(type="str"),
            token_file=dict(type="path"),
            token=dict(type="str", no_log=True),
            ca=dict(type="path"),
            insecure=dict(type="bool", default=False),
            settings=dict(type="dict", options=dict(
                copy_on_read=dict(type="bool"), auto_degrade=dict(type="bool"),
                log_limit=dict(type="str"), fetch_timeout=dict(type="float"))),
            force=dict(type="bool", default=False),
            state_root=STATE_ROOT_OPTION,
        ),
        required_if=[("state", "present", ["device"])],
        required_by={"token": "token_file"},
        supports_check_mode=True,
    )
    api = require_drtool(module)
    from drtool.units import parse_size

    p = module.params
    name, root = p["name"], p["state_root"]
    before = volume_status(module, name, root)
    actions = []
    result = {}

    if p["state"] == "absent":
        if before is not None:
            actions.append("unregistered")
            if not module.check_mode:
                _remove(module, api, name, root)
        predicted = _view(None)
    else:
        region_size = call(module, parse_size, p["region_size"], "region_size")
        device = os.path.abspath(p["device"])
        wanted = {key: value for key, value in (p["settings"] or {}).items() if value is not None}
        if "log_limit" in wanted:
            wanted["log_limit"] = call(module, parse_size, wanted["log_limit"], "settings.log_limit")
        target_settings = call(module, api.settings_with, wanted)  # bad values fail before anything changes
        if p["token"] is not None and ensure_secret_file(module, p["token_file"], p["token"]):
            actions.append("token written")
        view = _view(before)
        differs = before is not None and (view["device"] != device or view["region_size"] != region_size)
        if differs and not p["force"]:
            module.fail_json(
                msg="volume %s is registered with device %s and region size %d, not %s and %d; set force=true "
                    "to re-register it (this discards its drtool state)"
                    % (name, view["device"], view["region_size"], device, region_size),
                volume=name, device=view["device"], region_size=view["region_size"])
        if before is None or differs:
            actions.append("re-registered" if differs else "registered")
            if not module.check_mode:
                result["init"] = call(module, api.init_volume, name, device, region_size,
                                      force=differs, root=root)
        if before is not None and not differs:
            current = _settings(module, api, name, root)
            target_settings = dict(current, **wanted)
        else:  # not registered yet (or about to be again): drtool's defaults
            current = call(module, api.settings_with)
        if target_settings != current:
            actions.append("settings changed")
            if not module.check_mode:
                call(module, api.configure, name, wanted, root=root)
        peer = p["peer"].rstrip("/") if p["peer"] else None
        fresh = before is None or differs
        insecure = p["insecure"]
        if peer and (fresh or view["peer"] != peer or view["initial_sync"] != "done"
                     or view["insecure"] != insecure):
            if fresh or view["peer"] != peer:
                actions.append("paired")
            else:
                actions.append("sync resumed" if view["initial_sync"] != "done" else "pairing updated")
            if not module.check_mode:
                result["protect"] = call(module, api.protect, name, peer, p["token_file"], p["ca"], root=root,
                                         insecure=insecure)
                result["plan"] = result["protect"].get("plan")
            elif not fresh:
                # What the sync would copy, as drtool plans it (the replica server is asked; nothing is
                # copied): after a role swap, the fast failback's regions.
                result["plan"] = _plan(module, api, name, peer, p["token_file"], p["ca"], root, insecure)
        if not actions:
            predicted = _view(before)
        elif module.check_mode:
            predicted = dict(_view(before), registered=True, device=device, region_size=region_size)
            if peer:
                predicted.update(peer=peer, insecure=insecure, initial_sync="done")
        else:
            predicted = _view(volume_status(module, name, root))

    if p["state"] == "present":
        predicted["settings"] = target_settings  # what configure applied (or would apply) over ``current``
    changed = bool(actions)
    output = dict(changed=changed, volume=name, actions=actions, **predicted, **result)
    if module._diff:
        shown_before = _view(before)
        if before is not None:
            shown_before["settings"] = current if p["state"] == "present" else _settings(module, api, name, root)
        output["diff"] = dict(before=shown_before, after=predicted,
                              before_header="volume %s" % name, after_header="volume %s" % name)
    module.exit_json(**output)


def _settings(module, api, name, root):
    """The registered volume's settings."""
    return call(module, api.configure, name, root=root)["settings"]


def _plan(module, api, name, peer, token_file, ca, root, insecure):
    """drtool's plan for pairing the volume with ``peer`` (check mode); None if the peer cannot tell."""
    from drtool.errors import DrtoolError

    try:
        return api.protect(name, peer, token_file, ca, root=root, plan_only=True, insecure=insecure)["plan"]
    except DrtoolError as exc:
        module.warn("volume %s: cannot tell what the sync to %s would copy: %s" % (name, peer, exc))
        return None


def _remove(module, api, name, root):
    """Unregister the volume (its state directory; the device is not touched)."""
    call(module, api.remove_volume, name, root=root)


if __name__ == "__main__":
    main()
