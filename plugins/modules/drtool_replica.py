#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: drtool contributors
# Apache License 2.0 (see the project's pyproject.toml)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: drtool_replica
short_description: The secondary's drtool replica server, in drtool's own daemon mode
description:
  - Starts, stops or restarts C(drtool serve --daemon), the secondary's replica server, known by its pid file.
  - V(started) is idempotent. A running server is restarted when its arguments differ from the task's
    (listen address, root, TLS, token file) or when its token, certificate or key file changed since it
    started, since the server reads them only at start.
  - For hosts with systemd, the C(drtool_secondary) role runs the same command as a systemd unit instead.
  - drtool must be importable by the Python running the module; that Python runs the server.
version_added: "0.1.0"
author:
  - drtool contributors (@drtool)
options:
  state:
    description:
      - V(started), V(stopped) or V(restarted) (always restarts).
    type: str
    choices: [started, stopped, restarted]
    default: started
  root:
    description:
      - Directory holding the replicas. Required to start.
    type: path
  listen:
    description:
      - HOST:PORT to listen on.
    type: str
    default: 127.0.0.1:8470
  token_file:
    description:
      - File (mode 0600) holding the bearer token clients must send. Only a loopback server may go without.
    type: path
  token:
    description:
      - The bearer token. Written to O(token_file), mode 0600, when it differs (and the server restarted).
        Never logged.
    type: str
  tls_cert:
    description:
      - PEM certificate; with O(tls_key) the server speaks HTTPS.
    type: path
  tls_key:
    description:
      - PEM private key of O(tls_cert) (mode 0600).
    type: path
  insecure:
    description:
      - Serve plain HTTP on a non-loopback O(listen) address (C(--insecure)); without it drtool refuses to start
        there without O(tls_cert) and O(tls_key). The bearer token and the volumes' bytes then cross the network
        in cleartext.
    type: bool
    default: false
  pid_file:
    description:
      - The daemon's pid file, by which the module knows it.
    type: path
    required: true
  log_file:
    description:
      - Where the daemon writes its log. Required to start.
    type: path
  stop_timeout:
    description:
      - Seconds to wait for the server to exit after SIGTERM before failing.
    type: float
    default: 30
requirements:
  - drtool (in the Python running the module)
attributes:
  check_mode:
    support: full
    description: Reports whether it would start, restart or stop the server; does nothing.
  diff_mode:
    support: full
    description: Shows the server's state and arguments before and after.
seealso:
  - module: drtool.drtool.drtool_agent
  - module: drtool.drtool.drtool_volume
"""

EXAMPLES = r"""
- name: Replica server on the DR site, HTTPS with a token
  drtool.drtool.drtool_replica:
    root: /var/lib/drtool-replica
    listen: 192.0.2.20:8470
    token_file: /etc/drtool/replica.token
    token: "{{ drtool_token }}"
    tls_cert: /etc/drtool/tls/server.crt
    tls_key: /etc/drtool/tls/server.key
    pid_file: /run/drtool/replica.pid
    log_file: /var/log/drtool/replica.log

- name: Stop it
  drtool.drtool.drtool_replica:
    state: stopped
    pid_file: /run/drtool/replica.pid
"""

RETURN = r"""
pid:
  description: The server's pid, or null when it is not running (or would be started, in check mode).
  returned: always
  type: int
  sample: 4242
action:
  description: V(none), V(started), V(restarted) or V(stopped).
  returned: always
  type: str
  sample: started
reason:
  description: Why a running server was restarted.
  returned: always
  type: str
  sample: /etc/drtool/replica.token changed since it started
url:
  description: The server's base URL.
  returned: when O(state) is not V(stopped)
  type: str
  sample: https://192.0.2.20:8470
cmd:
  description: The drtool arguments the server runs with.
  returned: when O(state) is not V(stopped)
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.drtool.drtool.plugins.module_utils.drtool_common import Daemon, ensure_secret_file, manage_daemon, require_drtool


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", default="started", choices=["started", "stopped", "restarted"]),
            root=dict(type="path"),
            listen=dict(type="str", default="127.0.0.1:8470"),
            token_file=dict(type="path"),
            token=dict(type="str", no_log=True),
            tls_cert=dict(type="path"),
            tls_key=dict(type="path"),
            insecure=dict(type="bool", default=False),
            pid_file=dict(type="path", required=True),
            log_file=dict(type="path"),
            stop_timeout=dict(type="float", default=30.0),
        ),
        required_if=[
            ("state", "started", ["root", "log_file"]),
            ("state", "restarted", ["root", "log_file"]),
        ],
        required_together=[("tls_cert", "tls_key")],
        required_by={"token": "token_file"},
        supports_check_mode=True,
    )
    require_drtool(module)
    p = module.params

    args = ["serve", "--root", p["root"] or "", "--listen", p["listen"]]
    if p["token_file"]:
        args += ["--token-file", p["token_file"]]
    if p["tls_cert"]:
        args += ["--tls-cert", p["tls_cert"], "--tls-key", p["tls_key"]]
    if p["insecure"]:
        args += ["--insecure"]
    args += ["--daemon", "--pid-file", p["pid_file"], "--log-file", p["log_file"] or ""]
    daemon = Daemon(module, p["pid_file"], args, inputs=[p["token_file"], p["tls_cert"], p["tls_key"]])

    written = False
    if p["state"] != "stopped" and p["token"] is not None:
        # The server reads its token only at start: a newer token file makes it restart.
        written = ensure_secret_file(module, p["token_file"], p["token"])
    result = manage_daemon(module, daemon, p["state"], p["stop_timeout"], "drtool replica server",
                           pending_input=written)
    if p["state"] != "stopped":
        result["url"] = "%s://%s" % ("https" if p["tls_cert"] else "http", p["listen"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
