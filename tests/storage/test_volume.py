"""The state directory: maps survive reopen; torn, truncated and foreign files are refused; one mutator."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from drtool.errors import CorruptStateFile, StateError, UpgradeNeeded, VolumeBusy, VolumeExists, VolumeNotFound, UsageError
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


def _maps(volume):
    return os.path.join(volume.paths.dir, "maps.pages")


def test_truncated_map_file_is_refused(volume, state_root):
    volume.bad.set(3)  # the bitmaps' pages come last in the file
    volume.save_all()
    volume.manifest[10] = b"\x05" * 32  # the last commit (the journal) holds only this page
    volume.save_all()
    volume.close()
    path = _maps(volume)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 4096 - 5)
    with pytest.raises(CorruptStateFile, match="maps.pages: region map file is .* bytes, its commit covers"):
        Volume.open(str(state_root), "vol")
    assert os.path.getsize(path) > 0  # refused, not reset


@pytest.mark.parametrize("page", [0, 1])
def test_flipped_byte_in_a_page_is_refused_by_checksum(volume, state_root, page):
    volume.manifest[0] = b"\x07" * 32  # page 1 holds the first manifest page
    volume.save_all()
    volume.close()
    with open(_maps(volume), "r+b") as handle:
        handle.seek(page * 4096 + 100)
        byte = handle.read(1)
        handle.seek(page * 4096 + 100)
        handle.write(bytes([byte[0] ^ 1]))
    os.unlink(os.path.join(volume.paths.dir, "maps.journal"))  # nothing to repair it from
    with pytest.raises(CorruptStateFile, match="maps.pages.*(superblock|page 1) fails its checksum"):
        again = Volume.open(str(state_root), "vol")
        again.manifest[0]
        again.close()


def test_torn_page_is_repaired_from_the_journal(volume, state_root):
    volume.manifest[0] = b"\x07" * 32
    volume.save_all()
    volume.close()
    with open(_maps(volume), "r+b") as handle:  # a crash half way through the page writes
        handle.seek(4096 + 2000)
        handle.write(b"\xee" * 100)
    again = Volume.open(str(state_root), "vol")
    try:
        assert again.manifest[0] == b"\x07" * 32
    finally:
        again.close()


def test_foreign_map_from_another_volume_is_refused(volume, state_root, tmp_path):
    other = Volume.create(str(state_root), "other", str(tmp_path / "dev.img"), "4K")
    other.close()
    volume.close()
    os.replace(os.path.join(other.paths.dir, "maps.pages"), _maps(volume))
    with pytest.raises(CorruptStateFile, match="belongs to another volume"):
        Volume.open(str(state_root), "vol")


def test_foreign_file_magic_is_refused(volume, state_root):
    volume.close()
    with open(_maps(volume), "wb") as handle:
        handle.write(b"\x7fELF" + b"\0" * 5000)
    os.unlink(os.path.join(volume.paths.dir, "maps.journal"))
    with pytest.raises(CorruptStateFile, match="not a drtool region map file"):
        Volume.open(str(state_root), "vol")


def test_missing_map_file_is_refused(volume, state_root):
    volume.close()
    os.unlink(_maps(volume))
    with pytest.raises(CorruptStateFile, match="region map file is missing"):
        Volume.open(str(state_root), "vol")


def test_torn_volume_record_is_refused(volume, state_root):
    volume.close()
    path = volume.paths.record
    text = open(path).read()
    with open(path, "w") as handle:
        handle.write(text[: len(text) // 2])
    with pytest.raises(CorruptStateFile, match="not valid JSON"):
        Volume.open(str(state_root), "vol")


@pytest.mark.parametrize("change", [("\"mode\"", "\"modf\""), ("\"era\": 1", "\"era\": 2")])
def test_flipped_byte_in_the_volume_record_is_refused(volume, state_root, change):
    volume.close()
    text = open(volume.paths.record).read()
    assert change[0] in text
    with open(volume.paths.record, "w") as handle:
        handle.write(text.replace(change[0], change[1], 1))
    with pytest.raises(CorruptStateFile, match="volume record checksum mismatch"):
        Volume.open(str(state_root), "vol")


def test_first_format_volume_record_asks_for_an_upgrade(volume, state_root):
    volume.close()
    data = json.loads(open(volume.paths.record).read())
    data["format"] = "drtool.volume/1"
    del data["checksum"]
    with open(volume.paths.record, "w") as handle:
        json.dump(data, handle)
    with pytest.raises(UpgradeNeeded, match="run `drtool upgrade vol`"):
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


def test_leftover_temporary_files_are_removed_at_open(volume, state_root):
    volume.close()
    for leaf in ("volume.json.tmp.4242", "manifest.bin.tmp.77", "maps.pages.upgrade"):
        with open(os.path.join(volume.paths.dir, leaf), "wb") as handle:
            handle.write(b"half written")
    Volume.inspect(str(state_root), "vol").close()  # a reader removes nothing
    assert os.path.exists(os.path.join(volume.paths.dir, "volume.json.tmp.4242"))
    Volume.open(str(state_root), "vol").close()
    assert sorted(os.listdir(volume.paths.dir)) == ["lock", "maps.journal", "maps.pages", "volume.json"]


@pytest.mark.parametrize("which", ["root", "volume"])
def test_a_state_directory_other_users_can_write_is_refused(volume, state_root, which):
    volume.close()
    target = state_root if which == "root" else state_root / "vol"
    os.chmod(target, 0o777)
    try:
        with pytest.raises(StateError, match=f"state directory {target} is writable by other users"):
            Volume.open(str(state_root), "vol")
    finally:
        os.chmod(target, 0o700)
    Volume.open(str(state_root), "vol").close()
