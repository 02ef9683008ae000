"""`drtool upgrade`: a first-format state directory is refused until converted, and converted whole."""

import json
import os
import time

import pytest

from drtool.errors import ExitCode, UpgradeNeeded
from drtool.regions import Geometry
from drtool.storage import mapfile
from drtool.storage.maps import zero_digest
from drtool.storage.record import EraStart, VolumeRecord
from drtool.storage.volume import BITMAP_KINDS, MAGIC_BITMAPS, MAGIC_ERAS, MAGIC_MANIFEST, Volume
from tests.conftest import make_image

RS = 4096
COUNT = 40


def write_first_format(state_root, name, device, seq=7):
    """A state directory as drtool wrote it before the paged maps (whole-volume files)."""
    geometry = Geometry(COUNT * RS, RS)
    record = VolumeRecord(name=name, volume_id=os.urandom(16).hex(), device=str(device), size=geometry.size,
                          region_size=RS, created=time.time(), era=3,
                          eras=[EraStart(1, time.time(), 1), EraStart(2, time.time(), 4), EraStart(3, time.time(), 6)])
    directory = state_root / name
    directory.mkdir(parents=True)
    data = record.to_json()
    data["format"] = "drtool.volume/1"  # the first format had no checksum
    (directory / "volume.json").write_text(json.dumps(data, indent=2, sort_keys=True))
    vid = record.volume_id_bytes
    digests = bytearray()
    for region in range(COUNT):
        digests += bytes([region + 1]) * 32 if region % 3 else zero_digest(RS)
    eras = b"".join((1 if region < 30 else region % 4).to_bytes(4, "little") for region in range(COUNT))
    bitmap_size = (COUNT + 7) // 8
    bits = bytearray(bitmap_size * len(BITMAP_KINDS))
    model = {"bad": [2, 17], "unreplicated": [5, 6, 7, 39], "overlay": [17]}
    for kind, regions in model.items():
        base = BITMAP_KINDS.index(kind) * bitmap_size
        for region in regions:
            bits[base + region // 8] |= 1 << (region % 8)
    for leaf, magic, body in (("manifest.bin", MAGIC_MANIFEST, digests), ("eras.bin", MAGIC_ERAS, eras),
                              ("bitmaps.bin", MAGIC_BITMAPS, bits)):
        header = mapfile.MapHeader(magic, mapfile.FORMAT_VERSION, RS, COUNT, 5, seq, vid)
        mapfile.save(str(directory / leaf), header, body)
    return digests, eras, model


@pytest.fixture
def old_volume(tmp_path, state_root):
    make_image(tmp_path / "dev.img", COUNT * RS)
    return write_first_format(state_root, "vol", tmp_path / "dev.img")


def test_first_format_is_refused_with_what_to_run(old_volume, state_root, cli):
    with pytest.raises(UpgradeNeeded, match=r"run `drtool upgrade vol`"):
        Volume.open(str(state_root), "vol")
    result = cli("status", "vol")
    assert result.code == ExitCode.STATE
    assert "drtool upgrade vol" in result.err
    assert (state_root / "vol" / "manifest.bin").exists()  # refused, never rewritten


def test_upgrade_converts_every_map(old_volume, state_root, cli):
    digests, eras, model = old_volume
    result = cli("upgrade", "vol", "--json")
    assert result.code == 0, result.err
    assert result.json()["changed"] is True
    assert sorted(os.listdir(state_root / "vol")) == ["lock", "maps.pages", "volume.json"]
    with Volume.open(str(state_root), "vol") as volume:
        for region in range(COUNT):
            assert volume.manifest[region] == digests[32 * region:32 * region + 32]
            assert volume.eras[region] == int.from_bytes(eras[4 * region:4 * region + 4], "little")
        for kind in BITMAP_KINDS:
            assert list(volume.bitmaps[kind]) == model.get(kind, [])
        assert volume.covered_seq["manifest"] == 7
    again = cli("upgrade", "vol")
    assert again.code == 0 and "already in the current format" in again.out
    assert json.loads((state_root / "vol" / "volume.json").read_text())["format"] == "drtool.volume/2"


def test_upgrade_interrupted_before_the_record_was_saved(old_volume, state_root, cli):
    record = (state_root / "vol" / "volume.json").read_text()
    assert cli("upgrade", "vol").code == 0
    (state_root / "vol" / "volume.json").write_text(record)  # as if killed right after the switch
    result = cli("upgrade", "vol", "--json")
    assert result.code == 0 and result.json()["changed"] is True
    with Volume.open(str(state_root), "vol") as volume:
        assert list(volume.bad) == [2, 17]


def test_interrupted_upgrade_is_run_again(old_volume, state_root, cli):
    directory = state_root / "vol"
    (directory / "maps.pages.upgrade").write_bytes(b"half built")  # killed while building
    assert cli("upgrade", "vol").code == 0
    with Volume.open(str(state_root), "vol") as volume:
        assert list(volume.bad) == [2, 17]
    # killed after the switch, before the old files were removed: a second run removes them
    mapfile.save(str(directory / "eras.bin"), mapfile.MapHeader(MAGIC_ERAS, 1, RS, COUNT, 1, 1, b"\0" * 16), b"")
    result = cli("upgrade", "vol", "--json")
    assert result.code == 0 and result.json()["removed"] == ["eras.bin"]
    assert not (directory / "eras.bin").exists()


def test_upgrade_of_a_damaged_old_file_is_refused(old_volume, state_root, cli):
    path = state_root / "vol" / "eras.bin"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(data)
    result = cli("upgrade", "vol")
    assert result.code == ExitCode.STATE
    assert "eras.bin" in result.err and "checksum mismatch" in result.err
    assert not (state_root / "vol" / "maps.pages").exists()


def test_upgrade_of_an_unknown_volume(state_root, cli):
    result = cli("upgrade", "nope")
    assert result.code == ExitCode.STATE and "not registered" in result.err
