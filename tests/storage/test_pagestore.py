"""The page store under kill -9: at every write of a commit, whole or half done, a reopen finds
the commit before or the commit after (never a mix, never a refusal), and the engine loses no
acknowledged write.  A checkpoint writes what changed, not the volume."""

import os
import shutil
import signal

import pytest

from drtool import api
from drtool.engine import Engine
from drtool.storage import pagestore
from drtool.storage.volume import Volume
from tests.conftest import make_image

RS = 4096


def _die_at(point: int, half: bool):
    """Make the point-th pwrite of this (child) process the last: SIGKILL before it, or half way."""
    real = os.pwrite
    calls = [0]

    def pwrite(fd, data, offset):
        calls[0] += 1
        if calls[0] == point:
            if half:
                real(fd, bytes(memoryview(data)[:len(data) // 2]), offset)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(fd, data, offset)

    os.pwrite = pwrite


def _in_child(work) -> int:
    """Run ``work`` in a forked child; return how it ended (the signal number when killed)."""
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _snapshot(volume: Volume) -> dict:
    count = volume.geometry.count
    return {
        "manifest": [(r, volume.manifest[r]) for r in volume.manifest.nonzero_between(0, count)],
        "eras": [(r, volume.eras[r]) for r in volume.eras.changed_since(1)],
        "bitmaps": {kind: bitmap.runs() for kind, bitmap in volume.bitmaps.items()},
        "seq": volume.covered_seq["manifest"],
    }


def _change(volume: Volume, salt: int) -> None:
    count = volume.geometry.count
    for region in range(salt, count, 2999):  # pages all over the file
        volume.manifest[region] = bytes([salt]) * 32
        volume.eras[region] = salt
        volume.bad.set(region)
    volume.unreplicated.set_all() if salt % 2 else volume.unreplicated.clear_all()
    volume.overlay.set_run(salt * 10, 5000)


@pytest.fixture
def volume(tmp_path, state_root):
    with open(tmp_path / "dev.img", "wb") as handle:  # 40k regions: manifest, eras and 2 bitmap chunks
        handle.truncate(40000 * RS)
    vol = Volume.create(str(state_root), "vol", str(tmp_path / "dev.img"), "4K")
    _change(vol, 3)
    vol.commit(11)
    vol.close()
    return vol


def test_kill_at_every_write_of_a_commit_leaves_the_old_or_the_new_maps(volume, state_root):
    with Volume.inspect(str(state_root), "vol") as before_volume:
        before = _snapshot(before_volume)
    saved = state_root.parent / "saved"
    shutil.copytree(state_root / "vol", saved)

    def commit_all() -> None:
        with Volume.open(str(state_root), "vol") as vol:
            _change(vol, 4)
            vol.commit(12)

    assert _in_child(commit_all) == 0
    with Volume.inspect(str(state_root), "vol") as after_volume:
        after = _snapshot(after_volume)
    assert after != before and after["seq"] == 12

    # Put the old state back, then kill the same commit at each of its writes.
    outcomes = set()
    point = 1
    while True:
        for half in (False, True):
            shutil.rmtree(state_root / "vol")
            shutil.copytree(saved, state_root / "vol")

            def die_in_commit() -> None:
                _die_at(point, half)
                commit_all()

            ended = _in_child(die_in_commit)
            with Volume.open(str(state_root), "vol") as reopened:  # replays the journal if needed
                found = _snapshot(reopened)
            assert found in (before, after), f"kill at write {point} (half={half}) mixed two commits"
            outcomes.add((ended == signal.SIGKILL, found == after))
        if ended == 0:
            break
        point += 1
    assert point > 5  # the journal, then the superblock and every changed page
    assert (True, False) in outcomes and (True, True) in outcomes and (False, True) in outcomes


def test_commit_writes_only_changed_pages(volume, state_root):
    with Volume.open(str(state_root), "vol") as vol:
        assert vol.commit() == 0  # nothing changed: nothing written
        vol.manifest[5] = b"\x09" * 32
        vol.unreplicated.set(20001)
        written = vol.commit(13)
    # superblock + manifest page + bitmap page + its count page, each twice (journal and in place)
    assert written <= 2 * 5 * pagestore.PAGE_SIZE + 200


def test_reader_sees_the_journal_while_a_writer_is_between_journal_and_pages(volume, state_root):
    with Volume.open(str(state_root), "vol") as vol:
        vol.manifest[7] = b"\x0a" * 32

        def die_after_journal() -> None:
            _die_at(2, True)  # the journal is whole; the first page write is torn
            vol.commit(14)

        assert _in_child(die_after_journal) == signal.SIGKILL
        with Volume.inspect(str(state_root), "vol") as reader:  # no lock: reads over the journal
            assert reader.manifest[7] == b"\x0a" * 32
            assert reader.covered_seq["manifest"] == 14


def test_engine_loses_no_acknowledged_write_when_killed_in_a_checkpoint(tmp_path, state_root):
    image = tmp_path / "dev.img"
    make_image(image, 64 * RS)
    api.init_volume("vol", str(image), "4K")
    point = 1
    while True:
        payload = {r: bytes([point % 250 + 1, r]) * (RS // 2) for r in (1, 9, 33, 60)}

        def write_then_checkpoint() -> None:
            engine = Engine.open(str(state_root), "vol")
            for region, data in payload.items():
                engine.write(region * RS, data, fua=True)  # acknowledged
            _die_at(point, point % 2 == 0)
            engine.save()
            os._exit(0)

        ended = _in_child(write_then_checkpoint)
        with Engine.open(str(state_root), "vol") as engine:
            for region, data in payload.items():
                assert engine.read(region * RS, RS) == data, f"kill at write {point}: region {region} lost"
        if ended == 0:
            break
        point += 1
    assert point > 3
