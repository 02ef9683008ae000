"""Small JSON state files that refuse torn or foreign content.

Each file carries its kind, the volume id it belongs to and a blake3 checksum
of the rest, so a half-written, hand-edited or misplaced file is refused with
CorruptStateFile instead of being trusted or reset.
"""

from __future__ import annotations

import json
from typing import Any

import blake3

from drtool.errors import CorruptStateFile
from drtool.storage.atomic import write_atomic


def _checksum(body: dict[str, Any]) -> str:
    return blake3.blake3(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_json(path: str, kind: str, volume_id: str, data: dict[str, Any]) -> None:
    body = {**data, "kind": kind, "volume_id": volume_id}
    text = json.dumps({**body, "checksum": _checksum(body)}, sort_keys=True, indent=1)
    write_atomic(path, text.encode() + b"\n")


def load_json(path: str, kind: str, volume_id: str | None) -> dict[str, Any]:
    """Read a file written by save_json; ``volume_id`` None accepts any (then check it yourself)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise CorruptStateFile(path, f"the {kind} file is missing") from None
    except OSError as exc:
        raise CorruptStateFile(path, f"cannot read the {kind} file: {exc.strerror}") from None
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptStateFile(path, f"the {kind} file is not valid JSON (torn write?)") from None
    if not isinstance(body, dict) or body.get("kind") != kind:
        raise CorruptStateFile(path, f"not a drtool {kind} file")
    checksum = body.pop("checksum", None)
    if checksum != _checksum(body):
        raise CorruptStateFile(path, f"the {kind} file's checksum does not match (damaged or edited)")
    if volume_id is not None and body.get("volume_id") != volume_id:
        raise CorruptStateFile(path, f"the {kind} file belongs to another volume")
    return body
