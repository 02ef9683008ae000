#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drtool contributors
# Apache License 2.0 (see the project's pyproject.toml)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drtool_role
short_description: A drtool volume's role on this host, primary or secondary (planned failover, takeover)
description:
  - Swaps a volume's role between the two hosts of a pair, one side at a time. Run it with O(state=secondary)
    on the current primary, then with O(state=primary) on the host that takes over.
  - O(state=secondary) on the primary demotes the volume (C(drtool demote)). Writes are refused, replication
    is drained until the lag is zero (at most O(timeout) seconds, else the task fails and the volume accepts
    writes again, unchanged), and the role is released at the secondary's replica server.
    With O(force=true) (the secondary has already taken over) nothing is drained, and what this host wrote
    that the new primary never applied is counted as lost (RV(lost)).
  - With O(replica_url), O(state=secondary) then adopts the volume (C(drtool adopt)), so that this host's own
    replica server serves it in place, on this host's device, and the new primary ships its writes there. An agent
    still serving the volume hands it over and stops serving it (its other volumes are not disturbed); NBD clients
    still connected to the volume make the task fail (disconnect them first).
  - O(state=primary) promotes this host's replica (C(drtool promote)), which becomes the primary volume, with the
    same identity and a new era. It is refused while the old primary still claims the volume, unless
    O(force=true) (an unplanned takeover). Starting the agent (M(drtool.drtool.drtool_agent)) and reversing replication
    (M(drtool.drtool.drtool_volume) with the old primary's replica server as its C(peer), a fast failback)
    are separate steps.
  - A host where the volume is not registered (a pure secondary) already has O(state=secondary).
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
  members:
    description:
      - O(name) is a consistency group (M(drtool.drtool.drtool_group)) of these volumes, and they change roles
        together, at one point of the group's write order (C(drtool demote GROUP), C(adopt GROUP),
        C(promote GROUP)). A member of a group can not change roles alone.
      - The task is done when every member has the role; RV(members) reports each one.
    type: list
    elements: str
  state:
    description:
      - The role the volume (or every member of the group) must have on this host.
    type: str
    required: true
    choices: [primary, secondary]
  force:
    description:
      - With O(state=primary), promote although the old primary never released the volume (a takeover, the
        old primary is lost or cut off). Its writes that never reached this host are lost.
      - With O(state=secondary), demote without draining, because the secondary has already taken over; the
        loss is counted exactly when the new primary's replica server answers.
    type: bool
    default: false
  timeout:
    description:
      - Seconds the drain of a planned demotion may take before the task fails (nothing changed then).
    type: float
    default: 60
  replica_url:
    description:
      - This host's own replica server, for example V(https://db1.example.com:8470).
      - Required with O(state=primary) (the replica that becomes the primary volume lives there).
      - With O(state=secondary), the volume is also adopted by that server. Without it, the volume is only
        demoted (stop the agent, then run the task again with it).
    type: str
  token_file:
    description:
      - File holding the bearer token of the replica server at O(replica_url).
    type: path
  ca:
    description:
      - CA certificate (PEM file) of an V(https) O(replica_url).
    type: path
  insecure:
    description:
      - Reach an V(http://) O(replica_url) whose host is not loopback (C(drtool promote/adopt --insecure)). Without
        it drtool refuses such a URL, because the bearer token and the volume's bytes would cross the network in
        cleartext.
      - Only when that replica server runs with its own C(insecure) (a link private by other means, or a lab).
        Not needed for V(https://), or for V(http://) on loopback.
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
      - Reports what would change (demotion, adoption, promotion) and changes nothing. A demotion reports the
        current lag (what a drain would ship, or with O(force=true) what could be lost); a promotion reports
        the replica server's state for the volume (V(released) or, before the release, V(replica)).
  diff_mode:
    support: full
    description: Shows the volume's role, and who serves it as a replica, before and after.
notes:
  - The whole swap, in order, is in C(playbooks/planned_failover.yml); C(playbooks/takeover.yml) takes over and
    later brings the old primary back as the secondary.
  - Every step is idempotent, so a failover interrupted half-way is finished by running it again.
seealso:
  - module: drtool.drtool.drtool_agent
  - module: drtool.drtool.drtool_volume
  - module: drtool.drtool.drtool_replication
"""

EXAMPLES = r"""
# Planned failover of "db" from db1 to dr1 (each runs a replica server on port 8470).
- name: On db1, demote db (drain replication for at most 5 minutes)
  drtool.drtool.drtool_role:
    name: db
    state: secondary
    timeout: 300

- name: On db1, stop the agent
  drtool.drtool.drtool_agent:
    state: stopped
    pid_file: /run/drtool/agent.pid

- name: Take over a consistency group on dr1 (both volumes at one consistent point)
  drtool.drtool.drtool_role:
    name: pg
    members: [pg-wal, pg-data]
    state: primary
    force: true
    replica_url: https://dr1.example.com:8470
    token_file: /etc/drtool/replica.token

- name: On db1, let its own replica server serve db from now on
  drtool.drtool.drtool_role:
    name: db
    state: secondary
    replica_url: https://db1.example.com:8470
    token_file: /etc/drtool/replica.token
    ca: /etc/drtool/site-ca.pem

- name: On dr1, promote its replica of db
  drtool.drtool.drtool_role:
    name: db
    state: primary
    replica_url: https://dr1.example.com:8470
    token_file: /etc/drtool/replica.token
    ca: /etc/drtool/site-ca.pem

# db1 is gone: take over on dr1.
- name: On dr1, take over db
  drtool.drtool.drtool_role:
    name: db
    state: primary
    force: true
    replica_url: https://dr1.example.com:8470
    token_file: /etc/drtool/replica.token

# db1 is back: it steps down and counts what it lost.
- name: On db1, step down after the takeover
  drtool.drtool.drtool_role:
    name: db
    state: secondary
    force: true
"""

RETURN = r"""
volume:
  description: The volume's name.
  returned: always
  type: str
  sample: db
role:
  description: The volume's role on this host after the task (in check mode, what it would be).
  returned: always
  type: str
  sample: secondary
actions:
  description: What the task did (or would do, in check mode), in order, among V(demoted), V(adopted), V(promoted).
  returned: always
  type: list
  elements: str
  sample: [demoted, adopted]
device:
  description: The volume's device on this host (for a promoted volume, the replica's image that is now the primary volume).
  returned: when the volume is registered on this host
  type: str
  sample: /srv/drtool/replicas/db/mirror.img
demoted:
  description:
    - The demotion as drtool recorded it (C(time), C(era), C(seq), C(peer), C(forced), C(lost), C(divergent), C(adopted)).
  returned: when the volume was demoted on this host
  type: dict
promoted:
  description:
    - The promotion as drtool recorded it (C(time), C(era), C(applied_seq), C(takeover), C(released), C(last_record_at)).
  returned: when the volume was promoted on this host
  type: dict
takeover:
  description: Whether the volume became primary here without the old primary's release (a takeover).
  returned: when the volume was promoted on this host
  type: bool
lost:
  description:
    - What the old primary wrote that the new primary never applied, counted by a forced demotion
      (C(records), C(bytes), C(regions), C(exact)). Zero after a planned demotion.
  returned: when the volume was demoted on this host
  type: dict
  sample: {"records": 3, "bytes": 1210, "regions": 2, "exact": true}
lag:
  description: The replication lag before the task (records, bytes, regions), that is what a drain ships, or what a forced demotion may lose.
  returned: when the volume is a primary here before the task
  type: dict
members:
  description:
    - With O(members), each member's role, swap records (C(demoted), C(promoted)) and loss after the task, by name.
  returned: with O(members)
  type: dict
  sample: {"pg-wal": {"role": "primary", "promoted": {"takeover": true, "applied_seq": 812}, "lost": null}}
replica:
  description: The replica server's description of the volume (C(state) V(replica), V(released) or V(promoted), C(applied_seq)).
  returned: in check mode, with O(state=primary) when the volume is not a primary here yet
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.drtool.drtool.plugins.module_utils.drtool_common import STATE_ROOT_OPTION, call, fail_drtool, require_drtool, volume_status


def _view(status):
    """The part of a volume's status this module manages (also its diff)."""
    if status is None:
        return {"role": "secondary", "registered": False, "adopted_by": None}
    adopted = (status.get("demoted") or {}).get("adopted") or {}
    return {"role": status["role"], "registered": True, "adopted_by": adopted.get("url")}


def _replica_info(module, api, name, url, token_file, ca, insecure):
    """The replica server's description of the volume (None when it holds no such volume)."""
    from drtool.errors import DrtoolError, VolumeNotFound

    try:
        return api.replica_info(name, url, token_file=token_file, ca=ca, insecure=insecure)
    except VolumeNotFound:
        return None
    except DrtoolError as exc:
        fail_drtool(module, exc)


def _secondary(module, api, name, root, before):
    p = module.params
    url = p["replica_url"]
    result = {"actions": []}
    if before is None:
        # Not registered here: this host was never the volume's primary.  Its replica server,
        # when named, must hold the volume (a typo in the name must not pass as "already done").
        if url and _replica_info(module, api, name, url, p["token_file"], p["ca"], p["insecure"]) is None:
            module.fail_json(msg="volume %s is neither registered on this host%s nor held by the replica server %s"
                                 % (name, " under %s" % root if root else "", url))
        return result, None
    status = before
    if before["role"] == "primary":
        result["lag"] = before["lag"]
        result["actions"].append("demoted")
        if module.check_mode:
            status = dict(before, role="secondary", demoted=None)
        else:
            result["demote"] = call(module, api.demote, name, timeout=p["timeout"], force=p["force"], root=root)
            status = volume_status(module, name, root)
    demoted = status.get("demoted") or {}
    if url and (demoted.get("adopted") or {}).get("url") != url:
        result["actions"].append("adopted")
        if not module.check_mode:
            call(module, api.adopt, name, url, p["token_file"], p["ca"], root=root, insecure=p["insecure"])
            status = volume_status(module, name, root)
    return result, status


def _primary(module, api, name, root, before):
    p = module.params
    result = {"actions": []}
    if before is not None and before["role"] == "primary":
        return result, before  # promoted earlier, or the original primary: nothing to do
    result["actions"].append("promoted")
    if module.check_mode:
        info = _replica_info(module, api, name, p["replica_url"], p["token_file"], p["ca"], p["insecure"])
        if info is None:
            module.fail_json(msg="the replica server %s holds no volume %s to promote" % (p["replica_url"], name))
        result["replica"] = {key: info.get(key) for key in ("state", "applied_seq", "primary", "promoted", "image")}
        if info.get("state") == "replica" and not p["force"]:
            module.warn("volume %s is not released by its primary yet: the promotion needs the demotion to "
                        "happen first, or force=true (a takeover)" % name)
        # Not promoted yet: an earlier promotion's record (before a swap back) is not this one.
        return result, dict(before or {}, role="primary", demoted=None, promoted=None)
    call(module, api.promote, name, p["replica_url"], p["token_file"], p["ca"], force=p["force"], root=root,
         insecure=p["insecure"])
    return result, volume_status(module, name, root)


def _member_view(status):
    """A member's part of a group's result."""
    if status is None:
        return {"role": "secondary", "registered": False}
    return {"role": status["role"], "registered": True, "demoted": status.get("demoted"),
            "promoted": status.get("promoted"), "lost": (status.get("demoted") or {}).get("lost")}


def _group(module, api, name, root, members):
    """The group's members change roles together: drtool's group operations, judged member by member."""
    p = module.params
    before = dict((m, volume_status(module, m, root)) for m in members)
    actions, result = [], {}
    if p["state"] == "secondary":
        if any(s is not None and s["role"] == "primary" for s in before.values()):
            actions.append("demoted")
            result["lag"] = dict((m, s["lag"]) for m, s in before.items() if s is not None and s["role"] == "primary")
            if not module.check_mode:
                result["demote"] = call(module, api.demote, name, timeout=p["timeout"], force=p["force"], root=root)
        url = p["replica_url"]
        registered = [m for m, s in before.items() if s is not None]
        if url and registered:
            now = before if module.check_mode else dict((m, volume_status(module, m, root)) for m in members)
            if any(((now[m].get("demoted") or {}).get("adopted") or {}).get("url") != url for m in registered):
                actions.append("adopted")
                if not module.check_mode:
                    call(module, api.adopt, name, url, p["token_file"], p["ca"], root=root, insecure=p["insecure"])
    else:
        if not all(s is not None and s["role"] == "primary" for s in before.values()):
            actions.append("promoted")
            if module.check_mode:
                replicas = {}
                for member in members:
                    info = _replica_info(module, api, member, p["replica_url"], p["token_file"], p["ca"], p["insecure"])
                    if info is None:
                        module.fail_json(msg="the replica server %s holds no volume %s (of group %s) to promote"
                                             % (p["replica_url"], member, name))
                    replicas[member] = dict((key, info.get(key)) for key in ("state", "applied_seq", "primary", "promoted"))
                result["replica"] = replicas
            else:
                result["promote"] = call(module, api.promote, name, p["replica_url"], p["token_file"], p["ca"],
                                         force=p["force"], root=root, insecure=p["insecure"])
    after = before if module.check_mode else dict((m, volume_status(module, m, root)) for m in members)
    output = dict(changed=bool(actions), volume=name, group=name, role=p["state"], actions=actions,
                  members=dict((m, _member_view(s)) for m, s in after.items()))
    for key in ("lag", "replica"):
        if key in result:
            output[key] = result[key]
    if module._diff:
        shown = dict((m, (s or {}).get("role", "secondary")) for m, s in before.items())
        predicted = dict((m, p["state"]) for m in members) if module.check_mode else dict(
            (m, (s or {}).get("role", "secondary")) for m, s in after.items())
        output["diff"] = dict(before={"roles": shown}, after={"roles": predicted},
                              before_header="group %s" % name, after_header="group %s" % name)
    module.exit_json(**output)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True, aliases=["volume"]),
            members=dict(type="list", elements="str"),
            state=dict(type="str", required=True, choices=["primary", "secondary"]),
            force=dict(type="bool", default=False),
            timeout=dict(type="float", default=60.0),
            replica_url=dict(type="str"),
            token_file=dict(type="path"),
            ca=dict(type="path"),
            insecure=dict(type="bool", default=False),
            state_root=STATE_ROOT_OPTION,
        ),
        # The replica that becomes the primary volume lives in this host's replica server.
        required_if=[("state", "primary", ["replica_url"])],
        supports_check_mode=True,
    )
    api = require_drtool(module)
    p = module.params
    name, root = p["name"], p["state_root"]
    if p["timeout"] <= 0:
        module.fail_json(msg="timeout must be a positive number of seconds, not %s" % p["timeout"])
    if p["replica_url"]:
        p["replica_url"] = p["replica_url"].rstrip("/")

    if p["members"] is not None:
        members = sorted(set(p["members"]))
        if not members or len(members) != len(p["members"]):
            module.fail_json(msg="group %s: members must name at least one volume, each once (got %s)"
                                 % (name, p["members"]))
        _group(module, api, name, root, members)
    before = volume_status(module, name, root)
    if p["state"] == "secondary":
        result, after = _secondary(module, api, name, root, before)
    else:
        result, after = _primary(module, api, name, root, before)

    output = dict(changed=bool(result["actions"]), volume=name, role=p["state"], actions=result["actions"])
    for key in ("lag", "replica"):
        if key in result:
            output[key] = result[key]
    if after:
        if after.get("device"):
            output["device"] = after["device"]
        if after.get("demoted"):
            output["demoted"] = after["demoted"]
            output["lost"] = after["demoted"].get("lost")
        if after.get("promoted") and p["state"] == "primary":
            output["promoted"] = after["promoted"]
            output["takeover"] = bool(after["promoted"].get("takeover"))
    if module._diff:
        predicted = _view(after) if after is not None else _view(None)
        if module.check_mode and "adopted" in result["actions"]:
            predicted["adopted_by"] = p["replica_url"]
        output["diff"] = dict(before=_view(before), after=predicted,
                              before_header="volume %s" % name, after_header="volume %s" % name)
    module.exit_json(**output)


if __name__ == "__main__":
    main()
