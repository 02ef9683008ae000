"""Where a volume's state lives, and what a volume may be called."""

from __future__ import annotations

import os
import re

from drtool.errors import UsageError

DEFAULT_STATE_ROOT = "/var/lib/drtool"
STATE_ROOT_ENV = "DRTOOL_STATE_ROOT"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def validate_name(name: str, what: str = "volume name") -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise UsageError(
            f"{what} {name!r} is not valid: use 1-64 letters, digits, '-', '_' or '.'"
        )
    return name


def state_root(explicit: str | None = None) -> str:
    """``--state-root``, else ``$DRTOOL_STATE_ROOT``, else /var/lib/drtool."""
    return os.path.abspath(explicit or os.environ.get(STATE_ROOT_ENV) or DEFAULT_STATE_ROOT)


#: the agent's own control socket in the state root: volumes are added to and removed from the
#: running agent through it ('@' cannot start a volume's name, so no volume's directory is
#: called that)
AGENT_SOCKET = "@agent.sock"


def agent_control_socket(root: str) -> str:
    """The control socket of the agent serving volumes of the state root ``root``."""
    return os.path.join(root, AGENT_SOCKET)


class StatePaths:
    """The files of one volume's state directory."""

    def __init__(self, root: str, name: str) -> None:
        self.root = root
        self.name = validate_name(name)
        self.dir = os.path.join(root, name)

    def file(self, leaf: str) -> str:
        return os.path.join(self.dir, leaf)

    @property
    def record(self) -> str:
        return self.file("volume.json")

    @property
    def maps(self) -> str:
        """Every region map (manifest, eras, bitmaps), paged: storage.pagestore."""
        return self.file("maps.pages")

    @property
    def maps_journal(self) -> str:
        return self.file("maps.journal")

    # The files of the first state format (whole-volume maps), read only by `drtool upgrade`.
    @property
    def bitmaps(self) -> str:
        return self.file("bitmaps.bin")

    @property
    def eras(self) -> str:
        return self.file("eras.bin")

    @property
    def manifest(self) -> str:
        return self.file("manifest.bin")

    @property
    def log_dir(self) -> str:
        return self.file("log")

    @property
    def overlay(self) -> str:
        return self.file("overlay.img")

    @property
    def control_socket(self) -> str:
        return self.file("agent.sock")


def list_volumes(root: str) -> list[str]:
    try:
        entries = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    return [e for e in entries if _NAME.match(e) and os.path.exists(os.path.join(root, e, "volume.json"))]
