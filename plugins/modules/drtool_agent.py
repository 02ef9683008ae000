#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drtool contributors
# Apache License 2.0 (see the project's pyproject.toml)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drtool_agent
short_description: The primary's drtool read agent, and the volumes it serves
description:
  - Starts, stops or restarts C(drtool agent --daemon), the primary's long-running process, known by its pid
    file. It holds the volumes it serves, exports each over NBD, ships their writes to the secondary, and
    answers drtool's CLI and modules on a control socket per volume.
  - The set of volumes changes on the running agent (C(drtool attach), C(drtool detach)); volumes are added and
    removed without a restart, so the NBD clients of the others are never disconnected. A volume with NBD clients
    connected is not removed unless O(force_detach) is set (the task fails and says who is connected).
  - With O(service_manager=systemd) the agent runs as a systemd unit (the C(drtool_primary) role installs it); the
    module then starts and stops nothing and only makes the running agent serve O(names).
  - NBD is served on a Unix socket (mode 0600) only, unless O(listen) asks for TCP too. TCP beyond loopback
    requires TLS (O(tls_cert) and O(tls_key)); on loopback without TLS the agent warns that every local user
    can read and write the volumes.
  - V(started) is idempotent. A running agent is restarted when its arguments other than the volumes differ
    from the task's (the sockets, the TLS files) or when a file named in O(restart_if_changed) (the peer
    token) or a TLS file changed since it started.
  - Once an agent runs, every drtool module reaches its volumes through it automatically.
  - drtool must be importable by the Python running the module; that Python runs the agent.
version_added: "0.1.0"
author:
  - drtool contributors (@drtool)
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
      - Also serve NBD on TCP HOST:PORT. Omitted (or V(none)), the default, the agent opens no TCP port.
      - An address other hosts can reach requires O(tls_cert) and O(tls_key).
    type: str
  tls_cert:
    description:
      - PEM certificate of the TCP listener; with O(tls_key), NBD clients must use TLS (C(nbds://) URIs).
    type: path
  tls_key:
    description:
      - PEM private key of O(tls_cert), mode 0600.
    type: path
  tls_ca:
    description:
      - PEM CA certificate; clients must present a certificate it signed.
    type: path
  nbd_socket:
    description:
      - Unix socket path of the NBD export (mode 0600; its directory must not be writable by other users).
        Default C(nbd.sock) in the state root; V(none) for none (then O(listen) is required).
    type: path
  pid_file:
    description:
      - The daemon's pid file, by which the module knows it. Required unless O(service_manager=systemd).
    type: path
  service_manager:
    description:
      - V(daemon) (drtool's daemon mode, started and stopped by this module) or V(systemd) (a unit runs the
        agent; only its set of volumes is managed here, live, and it must be running).
    type: str
    choices: [daemon, systemd]
    default: daemon
  force_detach:
    description:
      - Remove a volume from the agent although NBD clients are connected to it; they are disconnected (their
        requests in flight are answered first). Without it, connected clients make the task fail.
    type: bool
    default: false
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
  - Restarting the agent (its sockets or TLS files changed, or O(state=restarted)) closes every NBD connection;
    adding or removing a volume closes none but those of a volume removed with O(force_detach).
seealso:
  - module: drtool.drtool.drtool_volume
  - module: drtool.drtool.drtool_replica
"""

EXAMPLES = r"""
- name: Serve the database volumes over NBD on a Unix socket
  drtool.drtool.drtool_agent:
    names: [db, logs]
    nbd_socket: /run/drtool/nbd.sock
    pid_file: /run/drtool/agent.pid
    log_file: /var/log/drtool/agent.log
    restart_if_changed: [/etc/drtool/peer.token]

- name: Also serve them on the storage network, TLS required
  drtool.drtool.drtool_agent:
    names: [db, logs]
    nbd_socket: /run/drtool/nbd.sock
    listen: 192.0.2.10:10809
    tls_cert: /etc/drtool/nbd/server-cert.pem
    tls_key: /etc/drtool/nbd/server-key.pem
    pid_file: /run/drtool/agent.pid
    log_file: /var/log/drtool/agent.log
    restart_if_changed: [/etc/drtool/peer.token]

- name: Under systemd, the agent unit serves exactly these volumes (no restart)
  drtool.drtool.drtool_agent:
    names: [db, logs, archive]
    service_manager: systemd

- name: Stop the agent
  drtool.drtool.drtool_agent:
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
attached:
  description: Volumes the running agent was made to serve, live (none when it was started or restarted).
  returned: always
  type: list
  elements: str
  sample: [logs]
detached:
  description: Volumes the running agent stopped serving, live.
  returned: always
  type: list
  elements: str
  sample: []
reason:
  description: Why a running agent was restarted.
  returned: always
  type: str
uris:
  description: NBD URIs of each volume the agent serves.
  returned: when the agent runs
  type: dict
  sample: {"db": ["nbd+unix:///db?socket=/run/drtool/nbd.sock", "nbds://192.0.2.10:10809/db"]}
cmd:
  description: The drtool arguments the agent runs with.
  returned: when O(state) is not V(stopped)
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.drtool.drtool.plugins.module_utils.drtool_common import (
    Daemon, DrtoolError, fail_drtool, manage_daemon, require_drtool, volume_status)


def _without_volumes(args):
    """The agent's arguments but its volumes (the names right after C(agent)): those change live."""
    if not args:
        return args
    rest = list(args[1:])
    while rest and not rest[0].startswith("-"):
        rest.pop(0)
    return args[:1] + rest


def main():
    module = AnsibleModule(
        argument_spec=dict(
            names=dict(type="list", elements="str", aliases=["volumes"]),
            state=dict(type="str", default="started", choices=["started", "stopped", "restarted"]),
            listen=dict(type="str"),
            tls_cert=dict(type="path"),
            tls_key=dict(type="path"),
            tls_ca=dict(type="path"),
            nbd_socket=dict(type="path"),
            pid_file=dict(type="path"),
            log_file=dict(type="path"),
            restart_if_changed=dict(type="list", elements="path", default=[]),
            stop_timeout=dict(type="float", default=60.0),
            service_manager=dict(type="str", default="daemon", choices=["daemon", "systemd"]),
            force_detach=dict(type="bool", default=False),
            state_root=dict(type="path"),
        ),
        required_if=[
            ("service_manager", "daemon", ["pid_file"]),
            ("state", "started", ["names"]),
            ("state", "restarted", ["names"]),
        ],
        required_together=[("tls_cert", "tls_key")],
        supports_check_mode=True,
    )
    api = require_drtool(module)
    p = module.params
    names = sorted(set(p["names"] or []))
    if p["state"] != "stopped" and not names:
        module.fail_json(msg="names must list at least one volume for the agent to serve")

    if p["service_manager"] == "systemd":
        if p["state"] != "started":
            module.fail_json(msg="with service_manager=systemd the unit starts, stops and restarts the agent: "
                                 "use state=started (the volumes it serves)")
        result = dict(changed=False, action="none", reason=None, pid=None)
    else:
        if p["state"] != "stopped" and not p["log_file"]:
            module.fail_json(msg="log_file is required to start the agent in daemon mode")
        args = ["agent"] + names
        if p["state_root"]:
            args += ["--state-root", p["state_root"]]
        if p["listen"] and p["listen"] != "none":
            args += ["--listen", p["listen"]]
            for option in ("tls_cert", "tls_key", "tls_ca"):
                if p[option]:
                    args += ["--" + option.replace("_", "-"), p[option]]
        elif p["tls_cert"] or p["tls_ca"]:
            module.fail_json(msg="tls_cert, tls_key and tls_ca protect the TCP listener: set listen too")
        if p["nbd_socket"]:
            args += ["--nbd-socket", p["nbd_socket"]]
        args += ["--daemon", "--pid-file", p["pid_file"], "--log-file", p["log_file"] or ""]
        tls_files = [p[option] for option in ("tls_cert", "tls_key", "tls_ca") if p[option]]
        daemon = Daemon(module, p["pid_file"], args, inputs=list(p["restart_if_changed"]) + tls_files,
                        compare=_without_volumes)
        result = manage_daemon(module, daemon, p["state"], p["stop_timeout"], "drtool agent")
    result.update(attached=[], detached=[])
    running = p["service_manager"] == "daemon" or api.agent_info(p["state_root"])["running"]
    if not running and not module.check_mode:
        module.fail_json(msg="no drtool agent is running for the state root %s: start its unit first"
                             % (p["state_root"] or "(default)"), **result)
    # A running agent that was not (re)started here serves the task's volumes live.  (In check
    # mode a unit not started yet would start with the task's volumes: nothing more to do.)
    if p["state"] == "started" and result["action"] == "none" and running:
        try:
            served = api.agent_serve(names, force=p["force_detach"], check=module.check_mode, root=p["state_root"])
        except DrtoolError as exc:
            fail_drtool(module, exc, **result)
        result.update(attached=served["attached"], detached=served["detached"])
        result["changed"] = result["changed"] or served["changed"]
        if result["pid"] is None:
            result["pid"] = api.agent_info(p["state_root"]).get("pid")
    if p["state"] != "stopped":
        uris = {}
        if result["pid"] is not None and not module.check_mode:
            for name in names:
                status = volume_status(module, name, p["state_root"])
                uris[name] = ((status or {}).get("agent") or {}).get("uris", {}).get(name, [])
        result["uris"] = uris
    module.exit_json(**result)


if __name__ == "__main__":
    main()
