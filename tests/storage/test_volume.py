"""The state directory: maps survive reopen; torn, truncated and foreign files are refused; one mutator."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from drtool.errors import CorruptStateFile, VolumeBusy, VolumeExists, VolumeNotFound, UsageError
from drtool.storage.volume import Volume
from tests.conftest import make_image


@pytest.fixture
def volume(tmp_path, state_root):
    make_image(tmp_path / "dev.img", 10 * 4096 + 123)
    vol = Volume.create(str(state_root), "vol", str(tmp_path / "dev.img"), "4K")
    yield vol
    vol.close()


def test_maps_survive_reopen(volume, state_root):
    volume.bad.update([1, 10])
    volume.eras[3] = 7
    volume.manifest[2] = b"\x01" * 32
    volume.save_all()
    volume.close()
    again = Volume.open(str(state_root), "vol")
    try:
        assert list(again.bad) == [1, 10]
        assert again.eras[3] == 7
        assert again.manifest[2] == b"\x01" * 32
        assert again.geometry.count == 11 and again.geometry.last_region_length == 123
    finally:
        again.close()


def test_second_mutating_process_is_refused(volume, state_root):
    code = textwrap.dedent(f"""
        from drtool.storage.volume import Volume
        from drtool.errors import VolumeBusy
        try:
            Volume.open({str(state_root)!r}, "vol")
        except VolumeBusy as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"volume vol is in use by pid {os.getpid()}"


def test_in_process_second_open_is_refused(volume, state_root):
    with pytest.raises(VolumeBusy, match=f"pid {os.getpid()}"):
        Volume.open(str(state_root), "vol")


def test_reregistering_needs_force(volume, state_root, tmp_path):
    volume.close()
    with pytest.raises(VolumeExists, match="--force"):
        Volume.create(str(state_root), "vol", str(tmp_path / "dev.img"), "4K")
    Volume.create(str(state_root), "vol", str(tmp_path / "dev.img"), "8K", force=True).close()
    assert Volume.inspect(str(state_root), "vol").record.region_size == 8192


@pytest.mark.parametrize("leaf", ["bitmaps.bin", "eras.bin", "manifest.bin"])
def test_truncated_map_is_refused(volume, state_root, leaf):
    volume.close()
    path = os.path.join(volume.paths.dir, leaf)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 5)
    with pytest.raises(CorruptStateFile, match=leaf):
        Volume.open(str(state_root), "vol")
    assert os.path.getsize(path) > 0  # refused, not reset


@pytest.mark.parametrize("leaf", ["bitmaps.bin", "manifest.bin"])
def test_flipped_byte_is_refused_by_checksum(volume, state_root, leaf):
    volume.close()
    path = os.path.join(volume.paths.dir, leaf)
    with open(path, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    with pytest.raises(CorruptStateFile, match="checksum mismatch"):
        Volume.open(str(state_root), "vol")


def test_foreign_map_from_another_volume_is_refused(volume, state_root, tmp_path):
    other = Volume.create(str(state_root), "other", str(tmp_path / "dev.img"), "4K")
    other.close()
    volume.close()
    os.replace(os.path.join(other.paths.dir, "bitmaps.bin"), os.path.join(volume.paths.dir, "bitmaps.bin"))
    with pytest.raises(CorruptStateFile, match="belongs to another volume"):
        Volume.open(str(state_root), "vol")


def test_foreign_file_magic_is_refused(volume, state_root):
    volume.close()
    with open(os.path.join(volume.paths.dir, "eras.bin"), "wb") as handle:
        handle.write(b"\x7fELF" + b"\0" * 200)
    with pytest.raises(CorruptStateFile, match="not a drtool era map"):
        Volume.open(str(state_root), "vol")


def test_torn_volume_record_is_refused(volume, state_root):
    volume.close()
    path = volume.paths.record
    text = open(path).read()
    with open(path, "w") as handle:
        handle.write(text[: len(text) // 2])
    with pytest.raises(CorruptStateFile, match="not valid JSON"):
        Volume.open(str(state_root), "vol")


def test_foreign_volume_record_is_refused(volume, state_root):
    volume.close()
    with open(volume.paths.record, "w") as handle:
        json.dump({"format": "something-else"}, handle)
    with pytest.raises(CorruptStateFile, match="not a drtool volume record"):
        Volume.open(str(state_root), "vol")


def test_unknown_volume(state_root):
    with pytest.raises(VolumeNotFound, match="volume nope is not registered"):
        Volume.open(str(state_root), "nope")


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "x" * 65, "sp ace", ".."])
def test_bad_names_are_refused(state_root, tmp_path, name):
    make_image(tmp_path / "d.img", 8192)
    with pytest.raises(UsageError, match="is not valid"):
        Volume.create(str(state_root), name, str(tmp_path / "d.img"), "4K")
