"""The volume's peer: a client for the replica server it is paired with."""

from __future__ import annotations

from typing import Any

from drtool.client import ReplicaClient
from drtool.errors import UsageError


def make_client(peer: dict[str, Any] | None, timeout: float | None = None) -> ReplicaClient:
    """A client for the volume's peer (drtool.client.ReplicaClient); ``timeout``: the seconds
    one request may wait for the peer (the client's default otherwise)."""
    if not peer:
        raise UsageError("the volume has no peer: run drtool protect first")
    extra: dict[str, Any] = {}
    if timeout:
        extra["timeout"] = (min(5.0, timeout), timeout)
    return ReplicaClient(peer["url"], token_file=peer.get("token_file"), ca=peer.get("ca"),
                         insecure=bool(peer.get("insecure")), **extra)
