#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drtool contributors
# Apache License 2.0 (see the project's pyproject.toml)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drtool_agent
short_description: The primary's drtool read agent, in drtool's own daemon mode
description:
  - Starts, stops or restarts C(drtool agent --daemon), the primary's long-running process, known by its pid
    file. It holds the volumes it serves, exports each over NBD (a Unix socket and/or loopback TCP), ships
    their writes to the secondary, and answers drtool's CLI and modules on a control socket per volume.
  - V(started) is idempotent. A running agent is restarted when its arguments differ from the task's (the
    set of volumes, the sockets) or when a file named in O(restart_if_changed) (the peer token) changed
    since it started.
  - Once an agent runs, every drtool module reaches its volumes through it automatically.
  - For hosts with systemd, the C(drtool_primary) role runs the same command as a systemd unit instead.
  - drtool must be importable by the Python running the module; that Python runs the agent.
version_added: "0.1.0"
author:
  - drtool contributors
options:
  names:
    description:
      - The volumes the agent serves. Required to start. Their order does not matter.
    type: list
    elements: str
    aliases: [volumes]
  state:
    description:
      - V(started), V(stopped) or V(restarted) (always restarts).
    type: str
    choices: [started, stopped, restarted]
    default: started
  listen:
    description:
      - TCP HOST:PORT of the NBD export, or V(none) for no TCP listener.
    type: str
    default: 127.0.0.1:10809
  nbd_socket:
    description:
      - Unix socket path of the NBD export.
    type: path
  pid_file:
    description:
      - The daemon's pid file, by which the module knows it.
    type: path
    required: true
  log_file:
    description:
      - Where the daemon writes its log. Required to start.
    type: path
  restart_if_changed:
    description:
      - Files the agent reads only at start (the peer token file, a CA certificate). When one is newer than the
        running agent, it is restarted.
    type: list
    elements: path
    default: []
  stop_timeout:
    description:
      - Seconds to wait for the agent to exit after SIGTERM (it saves its maps on the way out) before failing.
    type: float
    default: 60
  state_root:
    description:
      - drtool's state root on the host. Default C($DRTOOL_STATE_ROOT), else C(/var/lib/drtool).
    type: path
requirements:
  - drtool (in the Python running the module)
attributes:
  check_mode:
    support: full
    description: Reports whether it would start, restart or stop the agent; does nothing.
  diff_mode:
    support: full
    description: Shows the agent's state and arguments before and after.
notes:
  - Restarting the agent closes its NBD connections; clients such as C(nbd-client) reconnect.
seealso:
  - module: drtool_volume
  - module: drtool_replica
"""

EXAMPLES = r"""
- name: Serve the database volumes over NBD on loopback and a Unix socket
  drtool_agent:
    names: [db, logs]
    listen: 127.0.0.1:10809
    nbd_socket: /run/drtool/nbd.sock
    pid_file: /run/drtool/agent.pid
    log_file: /var/log/drtool/agent.log
    restart_if_changed: [/etc/drtool/peer.token]

- name: Stop the agent
  drtool_agent:
    state: stopped
    pid_file: /run/drtool/agent.pid
"""

RETURN = r"""
pid:
  description: The agent's pid, or null when it is not running (or would be started, in check mode).
  returned: always
  type: int
  sample: 4242
action:
  description: V(none), V(started), V(restarted) or V(stopped).
  returned: always
  type: str
  sample: started
reason:
  description: Why a running agent was restarted.
  returned: always
  type: str
uris:
  description: NBD URIs of each volume the agent serves.
  returned: when the agent runs
  type: dict
  sample: {"db": ["nbd+unix:///db?socket=/run/drtool/nbd.sock", "nbd://127.0.0.1:10809/db"]}
cmd:
  description: The drtool arguments the agent runs with.
  returned: when O(state) is not V(stopped)
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.drtool_common import Daemon, manage_daemon, require_drtool, volume_status


def main():
    module = AnsibleModule(
        argument_spec=dict(
            names=dict(type="list", elements="str", aliases=["volumes"]),
            state=dict(type="str", default="started", choices=["started", "stopped", "restarted"]),
            listen=dict(type="str", default="127.0.0.1:10809"),
            nbd_socket=dict(type="path"),
            pid_file=dict(type="path", required=True),
            log_file=dict(type="path"),
            restart_if_changed=dict(type="list", elements="path", default=[]),
            stop_timeout=dict(type="float", default=60.0),
            state_root=dict(type="path"),
        ),
        required_if=[
            ("state", "started", ["names", "log_file"]),
            ("state", "restarted", ["names", "log_file"]),
        ],
        supports_check_mode=True,
    )
    require_drtool(module)
    p = module.params
    names = sorted(set(p["names"] or []))
    if p["state"] != "stopped" and not names:
        module.fail_json(msg="names must list at least one volume for the agent to serve")

    args = ["agent"] + names
    if p["state_root"]:
        args += ["--state-root", p["state_root"]]
    args += ["--listen", p["listen"]]
    if p["nbd_socket"]:
        args += ["--nbd-socket", p["nbd_socket"]]
    args += ["--daemon", "--pid-file", p["pid_file"], "--log-file", p["log_file"] or ""]
    daemon = Daemon(module, p["pid_file"], args, inputs=p["restart_if_changed"])

    result = manage_daemon(module, daemon, p["state"], p["stop_timeout"], "drtool agent")
    if p["state"] != "stopped":
        uris = {}
        if result["pid"] is not None:
            for name in names:
                status = volume_status(module, name, p["state_root"])
                uris[name] = ((status or {}).get("agent") or {}).get("uris", {}).get(name, [])
        result["uris"] = uris
    module.exit_json(**result)


if __name__ == "__main__":
    main()
