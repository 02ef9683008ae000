"""A full disk under the state directory: a clear error, and nothing already written is lost."""

import os
import subprocess

import pytest

from drtool import api
from drtool.engine import Engine
from drtool.errors import StateError
from tests.conftest import IN_CI, make_image, require_root

RS = 65536


@pytest.fixture
def small_state_root(tmp_path, monkeypatch):
    require_root()
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        (pytest.fail if IN_CI else pytest.skip)(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    monkeypatch.setenv("DRTOOL_STATE_ROOT", str(mount / "state"))
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount) -> None:
    with open(mount / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass


def test_log_append_on_a_full_disk_fails_cleanly(small_state_root, tmp_path):
    image = tmp_path / "dev.img"
    data = make_image(image, 16 * RS)
    api.init_volume("vol", str(image), "64K")
    with Engine.open(None, "vol") as engine:
        engine.write(0, b"kept" * 100)
        engine.flush()
        fill(small_state_root)
        with pytest.raises(StateError, match="No space left on device; nothing was written"):
            engine.write(RS, os.urandom(RS))
        assert image.read_bytes()[RS:2 * RS] == data[RS:2 * RS]  # the device was not touched
        os.unlink(small_state_root / "filler")
    with Engine.open(None, "vol") as engine:
        assert bytes(engine.read(0, 400)) == b"kept" * 100
        assert bytes(engine.read(RS, RS)) == data[RS:2 * RS]
    assert api.scrub_volume("vol")["bad_regions"] == []


def test_saving_maps_on_a_full_disk_keeps_the_old_files(small_state_root, tmp_path):
    image = tmp_path / "dev.img"
    make_image(image, 16 * RS)
    api.init_volume("vol", str(image), "64K")
    fill(small_state_root)
    with pytest.raises(StateError, match="no space left"):
        api.checkpoint("vol")
    os.unlink(small_state_root / "filler")
    status = api.status("vol")[0]
    assert status["health"] == "ONLINE" and status["era"] in (1, 2)
