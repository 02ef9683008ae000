"""``volume.json``: a volume's identity, geometry, mode and bookkeeping.

The file is replaced atomically and checked on load: a file that is not JSON,
has another ``format``, fails its checksum, or lacks a field is refused, never
rewritten.  ``checksum`` is the blake3 (hex) of the record's canonical JSON (sorted
keys, no spaces) without the checksum itself: a flipped byte anywhere that matters
(a key, a value) is caught, while the file stays readable and pretty-printed.
A record of the first format (``drtool.volume/1``, no checksum) is refused with
:class:`UpgradeNeeded`; ``drtool upgrade`` reads it with ``allow_first_format``.  The
sub-records (``recovery``, ``failback``, ``replication``, ``promoted``,
``demoted``, ``faulted``) are typed dataclasses of :mod:`drtool.storage.records`,
checked field by field; assigning one its JSON form checks it the same way.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import blake3

from drtool.errors import CorruptStateFile, UpgradeNeeded
from drtool.storage.atomic import write_atomic
from drtool.storage.records import (
    SUB_RECORDS, Demoted, Failback, Faulted, Promoted, Recovery, Replication, SubRecord,
)

FORMAT = "drtool.volume/2"
FIRST_FORMAT = "drtool.volume/1"
MODES = ("normal", "degraded", "resync")
ROLES = ("primary", "secondary")


@dataclass
class EraStart:
    era: int
    started: float
    seq: int  # first replication-log sequence number written in this era


@dataclass
class VolumeRecord:
    name: str
    volume_id: str
    device: str
    size: int
    region_size: int
    created: float
    mode: str = "normal"
    role: str = "primary"
    era: int = 1
    eras: list[EraStart] = field(default_factory=list)
    faulted: Faulted | None = None
    last_scrub: dict[str, Any] | None = None
    peer: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    recovery: Recovery | None = None
    failback: Failback | None = None
    replication: Replication = field(default_factory=Replication)
    promoted: Promoted | None = None  # this host took the primary role (from its replica)
    demoted: Demoted | None = None  # this host handed the primary role over
    history: list[dict[str, Any]] = field(default_factory=list)

    def __setattr__(self, name: str, value: Any) -> None:
        # A sub-record given as JSON (a dict) is checked and typed on the way in.
        kind = SUB_RECORDS.get(name)
        if kind is not None and value is not None and not isinstance(value, SubRecord):
            value = kind.from_json(value, name)
        elif name == "replication" and value is None:
            value = Replication()
        object.__setattr__(self, name, value)

    @classmethod
    def new(cls, name: str, device: str, size: int, region_size: int) -> VolumeRecord:
        now = time.time()
        return cls(
            name=name, volume_id=uuid.uuid4().hex, device=device, size=size,
            region_size=region_size, created=now, eras=[EraStart(1, now, 1)],
        )

    @property
    def volume_id_bytes(self) -> bytes:
        return bytes.fromhex(self.volume_id)

    def era_start(self, era: int) -> EraStart | None:
        for start in self.eras:
            if start.era == era:
                return start
        return None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": FORMAT}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, SubRecord):
                data[name] = value.to_json()
            elif name == "eras":
                data[name] = [asdict(start) for start in value]
            else:
                data[name] = value
        return data

    def save(self, path: str) -> None:
        data = self.to_json()
        data["checksum"] = record_checksum(data)
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        write_atomic(path, text.encode())

    @classmethod
    def load(cls, path: str, allow_first_format: bool = False) -> VolumeRecord:
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            raise CorruptStateFile(path, "the volume record is missing") from None
        except OSError as exc:
            raise CorruptStateFile(path, f"cannot read the volume record: {exc.strerror}") from None
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptStateFile(path, f"volume record is not valid JSON (torn or foreign): {exc}") from None
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        if found == FIRST_FORMAT:
            if not allow_first_format:
                raise UpgradeNeeded(path, str(data.get("name")), "the first format (volume.json without a checksum)")
            data["format"] = FORMAT
            return cls._from_json(path, data)
        if not isinstance(data, dict) or found != FORMAT:
            raise CorruptStateFile(path, f"not a drtool volume record (format {found!r}, expected {FORMAT!r})")
        stored = data.pop("checksum", None)
        if stored is None:
            raise CorruptStateFile(path, "volume record has no checksum")
        if stored != record_checksum(data):
            raise CorruptStateFile(path, "volume record checksum mismatch (edited by hand, damaged, or torn)")
        return cls._from_json(path, data)

    @classmethod
    def _from_json(cls, path: str, data: dict[str, Any]) -> VolumeRecord:
        required = {
            "name": str, "volume_id": str, "device": str, "size": int, "region_size": int,
            "created": (int, float), "mode": str, "role": str, "era": int, "eras": list,
        }
        for key, kind in required.items():
            if key not in data:
                raise CorruptStateFile(path, f"volume record lacks {key!r}")
            if not isinstance(data[key], kind) or isinstance(data[key], bool):
                raise CorruptStateFile(path, f"volume record field {key!r} has the wrong type")
        if data["mode"] not in MODES:
            raise CorruptStateFile(path, f"unknown mode {data['mode']!r}")
        if data["role"] not in ROLES:
            raise CorruptStateFile(path, f"unknown role {data['role']!r}")
        try:
            bytes.fromhex(data["volume_id"])
            eras = [EraStart(int(e["era"]), float(e["started"]), int(e["seq"])) for e in data["eras"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptStateFile(path, f"volume record is malformed: {exc}") from None
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["eras"] = eras
        for name, kind in SUB_RECORDS.items():
            if fields.get(name) is not None:
                fields[name] = kind.from_json(fields[name], name, path)
        return cls(**fields)


def record_checksum(data: dict[str, Any]) -> str:
    """blake3 (hex) of a record's canonical JSON, its ``checksum`` field left out."""
    body = {key: value for key, value in data.items() if key != "checksum"}
    return blake3.blake3(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
