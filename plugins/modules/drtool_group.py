#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drtool contributors
# Apache License 2.0 (see the project's pyproject.toml)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drtool_group
short_description: A drtool consistency group on the primary, its members, and its protection as one group
description:
  - Defines a consistency group of volumes registered on the primary (C(drtool group create), C(group add),
    C(group remove)) and protects it as a group (C(drtool protect GROUP)), so that its members replicate to one replica
    server in one write order across them and fail over together (the role swaps take the group's name).
  - The members must be registered under O(state_root) first (M(drtool.drtool.drtool_volume)); a volume belongs to
    at most one group, and group names and volume names share one namespace.
  - With O(state=present) the group's members become exactly O(members) (missing ones are added, others removed).
    With O(peer), every member is paired with that replica server as a group (C(drtool protect GROUP)), when a
    member is not paired with it yet, its initial sync did not finish, or the membership changed.
  - With O(state=absent) the group is deleted; its volumes stay registered and paired, each on its own.
  - A thin adapter over C(drtool.api); drtool must be importable by the Python running the module.
version_added: "0.1.0"
author:
  - drtool contributors (@drtool)
options:
  name:
    description:
      - The group's name (1-64 letters, digits, C(-), C(_) or C(.)); no volume may have it.
    type: str
    required: true
    aliases: [group]
  state:
    description:
      - V(present) creates the group or changes its members to O(members), then protects it with O(peer) if given.
      - V(absent) deletes the group (its volumes are not touched).
    type: str
    choices: [present, absent]
    default: present
  members:
    description:
      - The volumes of the group, registered on this host. Required with O(state=present).
    type: list
    elements: str
    aliases: [volumes]
  peer:
    description:
      - URL of the replica server all members replicate to, for example V(https://dr-site:8470).
      - When omitted, the group is defined but its protection is left as it is.
    type: str
  token_file:
    description:
      - File holding the bearer token the replica server expects.
    type: path
  ca:
    description:
      - CA certificate (PEM file) that signed the replica server's TLS certificate, for an V(https) peer.
    type: path
  insecure:
    description:
      - Pair with an V(http://) O(peer) whose host is not loopback (C(drtool protect --insecure)); only for a link
        private by other means, or a lab. See M(drtool.drtool.drtool_volume).
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
    description: Reports what would be created, added, removed, protected or deleted; changes nothing.
  diff_mode:
    support: full
    description: Shows the group's members and pairing before and after.
notes:
  - Protecting a group runs the initial sync of the members that need one before the task returns.
  - A member can not be swapped alone; M(drtool.drtool.drtool_role) takes the group's name and O(members).
seealso:
  - module: drtool.drtool.drtool_volume
  - module: drtool.drtool.drtool_role
  - module: drtool.drtool.drtool_status_info
"""

EXAMPLES = r"""
- name: Register the database's two volumes, not paired one by one
  drtool.drtool.drtool_volume:
    name: "{{ item.name }}"
    device: "{{ item.device }}"
  loop:
    - {name: db-wal, device: /dev/vg0/db-wal}
    - {name: db-data, device: /dev/vg0/db-data}

- name: Group them and protect them as one group (write order kept across both)
  drtool.drtool.drtool_group:
    name: db
    members: [db-wal, db-data]
    peer: https://dr-site.example.com:8470
    token_file: /etc/drtool/peer.token
    ca: /etc/drtool/dr-ca.pem

- name: Delete the group (its volumes stay registered and paired, each on its own)
  drtool.drtool.drtool_group:
    name: db
    state: absent
"""

RETURN = r"""
group:
  description: The group's name.
  returned: always
  type: str
  sample: db
actions:
  description: What the task did (or would do, in check mode), in order.
  returned: always
  type: list
  elements: str
  sample: [created, protected]
exists:
  description: Whether the group exists after the task.
  returned: always
  type: bool
  sample: true
members:
  description: The group's members after the task (or as they would be, in check mode), sorted.
  returned: always
  type: list
  elements: str
  sample: [db-data, db-wal]
added:
  description: The volumes added to the group.
  returned: always
  type: list
  elements: str
  sample: [db-data]
removed:
  description: The volumes removed from the group.
  returned: always
  type: list
  elements: str
  sample: []
peer:
  description: The replica server every member is paired with, or null when they are not all paired with one.
  returned: always
  type: str
  sample: https://dr-site.example.com:8470
protect:
  description: What C(drtool protect GROUP) returned.
  returned: when the group was protected by this task
  type: dict
plan:
  description:
    - What protecting the group copies (or would copy, in check mode) to each member's replica, by member, as drtool
      plans it before it starts, as M(drtool.drtool.drtool_volume) returns it for a volume. After a role swap, the
      fast failback's regions. V(in sync) for a member with nothing to copy.
    - In check mode it is known only for a group that exists already (the replica server is asked); null when the
      replica server could not tell (a warning says why).
  returned: when the group was protected by this task (or would be, in check mode)
  type: dict
  sample: {"db-wal": {"mode": "incremental", "regions": 3, "bytes": 196608, "divergent": 2}, "db-data": {"mode": "in sync"}}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.drtool.drtool.plugins.module_utils.drtool_common import (
    STATE_ROOT_OPTION, call, fail_drtool, require_drtool, volume_status)


def _group(module, api, name, root):
    """The group's description (drtool group status), or None when it does not exist here."""
    from drtool.errors import DrtoolError, GroupNotFound

    try:
        return api.group_status(name, root=root, probe_peer=False)
    except GroupNotFound:
        return None
    except DrtoolError as exc:
        fail_drtool(module, exc)


def _member_names(group):
    """The members' names in a group description (a list of names, or of member summaries)."""
    names = []
    for member in group.get("members") or []:
        names.append(member if isinstance(member, str) else member.get("volume") or member.get("name"))
    return sorted(names)


def _pairing(module, name, members, root, strict=True):
    """{member: (peer url, initial sync done, insecure)} as each member's own status says
    (``strict``: a member that is not registered fails the task; else it is left out)."""
    found = {}
    for member in members:
        status = volume_status(module, member, root)
        if status is None and not strict:
            continue
        if status is None and module.check_mode:
            # An earlier task of the same run (drtool_volume) would have registered it.
            module.warn("group %s: volume %s is not registered%s yet" % (name, member, " under %s" % root if root else ""))
            found[member] = (None, False, False)
            continue
        if status is None:
            module.fail_json(msg="group %s: volume %s is not registered%s (drtool_volume registers it)"
                                 % (name, member, " under %s" % root if root else ""))
        peer = status.get("peer") or {}
        sync = (status.get("replication") or {}).get("initial_sync")
        found[member] = (peer.get("url"), sync == "done", bool(peer.get("insecure")))
    return found


def _view(members, pairing):
    """The part of the group this module manages (also its diff)."""
    if members is None:
        return {"exists": False, "members": [], "peer": None}
    peers = {pairing[m][0] for m in members if m in pairing}
    return {"exists": True, "members": list(members), "peer": peers.pop() if len(peers) == 1 else None}


def _plans(protected):
    """{member: plan} from what C(drtool protect GROUP) returned (or planned)."""
    return dict((member, (found or {}).get("plan")) for member, found in (protected.get("members") or {}).items())


def _plan(module, api, name, peer, token_file, ca, root, insecure):
    """drtool's plan for protecting the group with ``peer`` (check mode); None if the peer cannot tell."""
    from drtool.errors import DrtoolError

    try:
        return _plans(api.protect(name, peer, token_file, ca, root=root, plan_only=True, insecure=insecure))
    except DrtoolError as exc:
        module.warn("group %s: cannot tell what protecting it with %s would copy: %s" % (name, peer, exc))
        return None


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True, aliases=["group"]),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            members=dict(type="list", elements="str", aliases=["volumes"]),
            peer=dict(type="str"),
            token_file=dict(type="path"),
            ca=dict(type="path"),
            insecure=dict(type="bool", default=False),
            state_root=STATE_ROOT_OPTION,
        ),
        required_if=[("state", "present", ["members"])],
        supports_check_mode=True,
    )
    api = require_drtool(module)
    p = module.params
    name, root = p["name"], p["state_root"]
    group = _group(module, api, name, root)
    current = _member_names(group) if group is not None else None
    actions, result = [], {}
    added, removed = [], []

    if p["state"] == "absent":
        before = _view(current, _pairing(module, name, current or [], root, strict=False))
        if group is not None:
            actions.append("deleted")
            if not module.check_mode:
                call(module, api.group_delete, name, root=root)
        after = _view(None, {})
    else:
        wanted = sorted(set(p["members"]))
        if not wanted or len(wanted) != len(p["members"]):
            module.fail_json(msg="group %s: members must name at least one volume, each once (got %s)"
                                 % (name, p["members"]))
        # Every wanted member must be registered here: checked before anything changes.
        pairing = _pairing(module, name, sorted(set(wanted) | set(current or [])), root)
        before = _view(current, pairing)
        if group is None:
            actions.append("created")
            if not module.check_mode:
                result["create"] = call(module, api.group_create, name, wanted, root=root)
        else:
            added = [m for m in wanted if m not in current]
            removed = [m for m in current if m not in wanted]
            if added:
                actions.append("members added")
                if not module.check_mode:
                    call(module, api.group_add, name, added, root=root)
            if removed:
                actions.append("members removed")
                if not module.check_mode:
                    call(module, api.group_remove, name, removed, root=root)
        peer = p["peer"].rstrip("/") if p["peer"] else None
        if peer and (actions or any(pairing[m] != (peer, True, p["insecure"]) for m in wanted)):
            # The group's members pair as one group: the replica server learns the group, and the
            # members ship their writes as group transactions from then on.
            actions.append("protected")
            if not module.check_mode:
                result["protect"] = call(module, api.protect, name, peer, p["token_file"], p["ca"], root=root,
                                         insecure=p["insecure"])
                result["plan"] = _plans(result["protect"])
                pairing = _pairing(module, name, wanted, root)
            else:
                if group is not None and not (added or removed):
                    # What the sync would copy, as drtool plans it (the replica server is asked;
                    # nothing is copied): after a role swap, the fast failback's regions.
                    result["plan"] = _plan(module, api, name, peer, p["token_file"], p["ca"], root, p["insecure"])
                pairing = dict((m, (peer, True, p["insecure"])) for m in wanted)
        if module.check_mode or not actions:
            after = _view(wanted, pairing)
        else:
            now = _group(module, api, name, root)
            after = _view(_member_names(now) if now is not None else None, pairing)

    output = dict(changed=bool(actions), group=name, actions=actions, added=added, removed=removed,
                  exists=after["exists"], members=after["members"], peer=after["peer"])
    for key in ("protect", "plan"):
        if key in result:
            output[key] = result[key]
    if module._diff:
        output["diff"] = dict(before=before, after=after, before_header="group %s" % name,
                              after_header="group %s" % name)
    module.exit_json(**output)


if __name__ == "__main__":
    main()
