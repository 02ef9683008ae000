"""The sub-records of ``volume.json``: one typed dataclass each, with its one owner.

| sub-record    | class         | changed only by                                          |
|---------------|---------------|----------------------------------------------------------|
| `faulted`     | `Faulted`     | drtool.detect.scrub; cleared by the mode machine          |
| `recovery`    | `Recovery`    | the mode machine (engine/modes.py); Engine.count_fetched  |
| `failback`    | `Failback`    | the mode machine; Engine.failback_progress, use_device and scrub (`scrub_pending`) |
| `replication` | `Replication` | the engine: pair, acknowledge, enter_bitmap_mode, save    |
| `promoted`    | `Promoted`    | drtool.roles.promote (a new volume); Engine.pair (`lost`) |
| `demoted`     | `Demoted`     | Engine.become_secondary; drtool.roles.adopt (`adopted`)   |

Each class reads its JSON with :meth:`from_json`, which checks every field's type and
refuses malformed input with :class:`CorruptStateFile` naming the field (``recovery.source``);
:meth:`to_json` writes the same shape the files and ``status --json`` have always had
(optional fields that were never set are left out, as before).

``get(key)`` and ``record[key]`` read a field by its JSON name: for code not yet moved to
attributes; new code uses the attributes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from drtool.errors import CorruptStateFile

T = TypeVar("T", bound="SubRecord")


class SubRecord:
    """Base of the sub-records: validated loading, JSON writing, read access by key."""

    #: Optional fields left out of the JSON while they are None (their key was absent before).
    OMIT_NONE: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_json(cls: type[T], data: Any, where: str = "", path: str = "volume.json") -> T:
        """A sub-record from its JSON; ``where`` names it in errors (``recovery``)."""
        where = where or cls.__name__.lower()
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise CorruptStateFile(path, f"volume record field {where!r} is not an object")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            name = spec.name
            if name not in data:
                if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                    raise CorruptStateFile(path, f"volume record field {where}.{name} is missing")
                continue
            values[name] = _check(data[name], hints[name], f"{where}.{name}", path)
        made = cls(**values)
        made.check(where, path)
        return made

    def check(self, where: str, path: str) -> None:
        """Checks beyond each field's type (a sub-record with such rules overrides this)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if value is None and spec.name in self.OMIT_NONE:
                continue
            out[spec.name] = _json(value)
        return out

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, None) if key in self.__dataclass_fields__ else None
        return default if value is None else _json(value)

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return _json(getattr(self, key))


def _json(value: Any) -> Any:
    if isinstance(value, SubRecord):
        return value.to_json()
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value


def _check(value: Any, hint: Any, where: str, path: str) -> Any:
    """``value`` if it has the type ``hint`` says (a nested sub-record is built), else refuse."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (hint,) = [option for option in options if option is not type(None)]
        origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, SubRecord):
        return hint.from_json(value, where, path)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise CorruptStateFile(path, f"volume record field {where} is not a list")
        return [_check(v, item, f"{where}[{i}]", path) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise CorruptStateFile(path, f"volume record field {where} is not an object")
        return value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is Any:
        ok = True
    else:
        ok = isinstance(value, hint)
    if not ok:
        name = getattr(hint, "__name__", str(hint))
        raise CorruptStateFile(path, f"volume record field {where} must be {name}, not {value!r}")
    return value


# -- the sub-records ----------------------------------------------------------------------


@dataclass
class Faulted(SubRecord):
    """The device is missing or unusable (set by scrub)."""

    reason: str
    since: float


SOURCES_HELP = "mirror, journal or snapshot:NAME"


@dataclass
class Recovery(SubRecord):
    """Degraded mode: why and since when, where the requested portion comes from, what came."""

    entered: float
    reason: str
    auto: bool
    local_era: int | None
    source: str
    era: int  # the era the incident's writes carry (failback ships exactly those to the mirror)
    fetched_regions: int = 0
    fetched_bytes: int = 0
    #: a snapshot source: the runs it took back in time when recover began (confirmed by the
    #: operator), shown by status while the recovery lasts; absent (None) when there were none
    rolled_back: list[list[int]] | None = None

    OMIT_NONE = frozenset({"rolled_back"})

    def check(self, where: str, path: str) -> None:
        if not (self.source in ("mirror", "journal") or self.source.startswith("snapshot:")):
            raise CorruptStateFile(path, f"volume record field {where}.source is not "
                                         f"{SOURCES_HELP}: {self.source!r}")


@dataclass
class Failback(SubRecord):
    """A failback (resync) in progress or finished.

    ``scrub_pending``: the device failback switched to (Engine.use_device, saved before the
    switch) whose scrub's findings are not saved yet; a failback run again scrubs it again."""

    OMIT_NONE = frozenset({"scrub_pending"})

    started: float
    device: str
    total_regions: int
    done_regions: int = 0
    bytes_copied: int = 0
    finished: float | None = None
    scrub_pending: str | None = None


@dataclass
class Loss(SubRecord):
    """What a role swap lost: writes one side made that the other never applied."""

    records: int
    bytes: int
    regions: int
    # A takeover's count only: was the peer's applied sequence known, and which was it.
    exact: bool | None = None
    after_seq: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if self.exact is None:  # a planned swap's loss (nothing) has neither
            del out["exact"], out["after_seq"]
        return out


@dataclass
class Replication(SubRecord):
    """Pairing and shipping: the initial sync, the acknowledged watermark, bitmap mode."""

    OMIT_NONE = frozenset({"initial_sync", "started", "mode", "regions", "finished", "acked_through",
                           "bitmap_mode_since", "overflows", "dropped_through", "reason"})

    initial_sync: str | None = None  # running / done
    started: float | None = None
    mode: str | None = None  # full / incremental
    regions: int | None = None
    finished: float | None = None
    acked_through: int | None = None
    # Forced batches are acknowledged out of order: those above the watermark.
    acked_ahead: list[int] = field(default_factory=list)
    bitmap_mode_since: float | None = None
    overflows: int | None = None
    # Bitmap mode dropped the log's records up to here (their regions ship from the volume).
    dropped_through: int | None = None
    # Why this sync started when it was not the first pairing (the replica was lost or replaced).
    reason: str | None = None

    def done_through(self) -> int:
        """Every record up to this sequence is no longer pending (acknowledged, or dropped)."""
        return max(self.acked_through or 0, self.dropped_through or 0)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if not self.acked_ahead:
            out.pop("acked_ahead")
        return out


@dataclass
class Adopted(SubRecord):
    url: str
    time: float


@dataclass
class Demoted(SubRecord):
    """This host handed the primary role over (planned, or forced after a takeover)."""

    OMIT_NONE = frozenset({"adopted"})

    time: float
    era: int
    seq: int
    peer: str
    forced: bool
    lost: Loss
    divergent: list[list[int]]  # runs this host's device holds stale bytes in
    adopted: Adopted | None = None


@dataclass
class Promoted(SubRecord):
    """This host's replica became the primary volume."""

    time: float
    era: int
    applied_seq: int
    forced: bool
    takeover: bool
    released: dict[str, Any] | None  # the old primary's release, as the replica server recorded it
    last_record_at: float | None
    lost: Loss | None  # set when the old primary pairs again (fast failback)
    overlay_regions_merged: int = 0


#: The sub-records of VolumeRecord, by field name.
SUB_RECORDS: dict[str, type[SubRecord]] = {
    "faulted": Faulted, "recovery": Recovery, "failback": Failback, "replication": Replication,
    "promoted": Promoted, "demoted": Demoted,
}
