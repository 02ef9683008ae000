"""Adopt (a replica in place on a former primary's device), rebase, manifest and describe_root."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import blake3
import pytest

from drtool.client import ReplicaClient
from drtool.errors import Conflict, CorruptStateFile, NotPermitted, UsageError
from drtool.replica.jsonstate import load_json, save_json
from drtool.replica.store import describe_root
from drtool.wire import encode_manifest_entries, zero_digest
from tests.replica.conftest import VOLUME_ID, ServerProcess, assert_problem, call, write, zero

RS = 4096
COUNT = 40
SIZE = COUNT * RS - 1000  # a partial last region


def digests_of(content: bytes) -> list[tuple[int, bytes]]:
    """The manifest as entries (drtool.wire): (region, blake3) of every region that is not all zeros."""
    out = []
    for region in range(COUNT):
        piece = content[region * RS:(region + 1) * RS]
        if piece.count(0) != len(piece):
            out.append((region, blake3.blake3(piece).digest()))
    return out


def manifest_file(content: bytes) -> bytes:
    return b"".join(encode_manifest_entries(iter(digests_of(content))))


@pytest.fixture
def device(tmp_path: Path) -> tuple[Path, Path, bytearray]:
    """The old primary's device (outside the server's root, every 4th region zero) and its manifest."""
    rng = random.Random(5)
    content = bytearray(rng.randbytes(SIZE))
    for region in range(0, COUNT, 4):
        content[region * RS:(region + 1) * RS] = bytes(len(content[region * RS:(region + 1) * RS]))
    image, manifest = tmp_path / "old-primary.img", tmp_path / "old-primary.manifest"
    image.write_bytes(content)
    manifest.write_bytes(manifest_file(bytes(content)))
    return image, manifest, content


def adopt(client: ReplicaClient, image_file: Path, manifest_file: Path, **changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"image": str(image_file), "manifest": str(manifest_file), "size": SIZE, "region_size": RS,
                            "volume_id": VOLUME_ID, "applied_seq": 100, "era": 7,
                            "divergent": [(3, 2), (10, 1)], "lost": {"records": 2, "bytes": 8192}}
    args.update(changes)
    return client.adopt("vol", **args)


def test_adopt_holds_the_replica_in_the_image_itself(client: ReplicaClient, device) -> None:  # type: ignore[no-untyped-def]
    image, manifest, content = device
    info = adopt(client, image, manifest)
    assert info["state"] == "replica" and info["image"] == str(image) and info["applied_seq"] == 100
    adopted = info["adopted"]
    assert adopted["divergent"] == [[3, 2], [10, 1]] and adopted["lost"] == {"records": 2, "bytes": 8192}
    assert adopted["era"] == 7 and adopted["seq"] == 100 and info["max_era"] == 7
    assert info["snapshots"] == [] and info["journal"]["records"] == 0 and info["overlay"]["regions"] == 0
    assert info["zero_regions"] == COUNT // 4
    assert list(client.manifest("vol", COUNT)) == digests_of(bytes(content))
    expected = {r: zero_digest(min(RS, SIZE - r * RS)) for r in range(COUNT)} | dict(digests_of(bytes(content)))
    assert all(r.ok for r in client.read_regions("vol", [(0, COUNT)], expected=expected.get))
    # Records land in the adopted file; those at or below the watermark are skipped.
    assert client.send_records("vol", write(100, 0, b"old" * 10) + write(101, RS + 5, b"new" * 10)) == \
        {"applied_seq": 101, "applied": 1, "skipped": 1}
    content[RS + 5:RS + 35] = b"new" * 10
    assert image.read_bytes() == content
    assert list(client.manifest("vol", COUNT)) == digests_of(bytes(content))
    # A resent adopt changes nothing (the records since stay applied).
    assert adopt(client, image, manifest)["applied_seq"] == 101


def test_adopt_refusals(server: ServerProcess, client: ReplicaClient, device, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image, manifest, _ = device
    client.ensure_volume("vol", SIZE, RS, "f" * 32)
    with pytest.raises(Conflict, match="holds volume f{32}, not 0123"):
        adopt(client, image, manifest)
    client.delete_volume("vol")
    stray = server.root / "stray.img"
    stray.write_bytes(bytes(SIZE))
    for changes, match in [({"image": "old-primary.img"}, "absolute"),
                           ({"image": f"{tmp_path}/../{tmp_path.name}/old-primary.img"}, "normalised"),
                           ({"image": str(tmp_path / "missing.img")}, "No such file"),
                           ({"manifest": str(image)}, "manifest entry for region 0 has no digest"),
                           ({"manifest": str(tmp_path / "short")}, "No such file"),
                           ({"size": SIZE + RS * 10}, "has 162840 bytes, the volume needs"),
                           ({"divergent": [[39, 2]]}, "outside the volume"),
                           ({"lost": {"records": -1, "bytes": 0}}, "records must be an integer"),
                           ({"image": str(stray)}, "lies inside the replica root")]:
        with pytest.raises(UsageError, match=match):
            adopt(client, image, manifest, **changes)
    assert_problem(call(server, "POST", "/v1/volumes/vol/adopt", token=False, json={}), 401)
    assert client.list_volumes() == []


def test_rebase_starts_the_new_primarys_sequence_space(server: ServerProcess, client: ReplicaClient,
                                                       device) -> None:  # type: ignore[no-untyped-def]
    image, manifest, content = device
    adopt(client, image, manifest)
    info = client.rebase("vol", 10)
    assert info["applied_seq"] == 10 and info["adopted"]["divergent"] == [] and info["rebased"]["seq"] == 10
    assert info["journal"]["base_seq"] == 10
    assert client.rebase("vol", 10)["rebased"] == info["rebased"]  # idempotent
    result = client.send_records("vol", write(9, 0, b"skip") + write(11, 2 * RS, b"keep"), complete_through=11)
    assert result == {"applied_seq": 11, "applied": 1, "skipped": 1}
    content[2 * RS:2 * RS + 4] = b"keep"
    assert image.read_bytes() == content
    with pytest.raises(Conflict, match="applied records since it was adopted or rebased"):
        client.rebase("vol", 20)
    server.stop()
    server.start()
    with server.client() as c:
        assert c.volume_info("vol")["applied_seq"] == 11
        assert c.send_records("vol", write(11, 2 * RS, b"keep"))["skipped"] == 1


def test_rebase_only_for_adopted_or_empty_replicas(client: ReplicaClient) -> None:
    client.ensure_volume("fresh", SIZE, RS, VOLUME_ID)
    assert client.rebase("fresh", 50)["applied_seq"] == 50
    client.ensure_volume("used", SIZE, RS, VOLUME_ID)
    client.send_records("used", write(1, 0, b"x"))
    with pytest.raises(NotPermitted, match="neither adopted nor is it empty"):
        client.rebase("used", 50)


def test_a_promoted_host_is_demoted_by_adopting_its_own_image(server: ServerProcess, client: ReplicaClient,
                                                              device) -> None:  # type: ignore[no-untyped-def]
    image, manifest, _ = device
    client.ensure_volume("vol", SIZE, RS, VOLUME_ID)
    client.send_records("vol", write(1, 0, b"a" * RS) + zero(2, RS, RS), complete_through=2)
    promoted = client.promote("vol", force=True)
    own = Path(promoted["image"])
    with pytest.raises(NotPermitted, match="adopt it on its own image"):
        adopt(client, image, manifest)
    # The agent wrote the image as a primary; its manifest describes the device now.
    data = bytearray(own.read_bytes())
    data[3 * RS:4 * RS] = b"w" * RS
    own.write_bytes(data)
    own_manifest = own.parent.parent / "own.manifest"
    own_manifest.write_bytes(manifest_file(bytes(data)))
    info = adopt(client, own, own_manifest, applied_seq=9, era=2, divergent=[], lost=None)
    assert info["state"] == "replica" and info["promoted"] is None and info["image"] == str(own)
    assert client.send_records("vol", write(10, 5 * RS, b"b" * 5))["applied"] == 1
    data[5 * RS:5 * RS + 5] = b"b" * 5
    assert own.read_bytes() == data  # unfenced: records land in the very same file
    assert list(client.manifest("vol", COUNT)) == digests_of(bytes(data))


def test_adopt_and_states_survive_a_restart_and_describe_root_reads_them(  # type: ignore[no-untyped-def]
        server: ServerProcess, client: ReplicaClient, device) -> None:
    image, manifest, _ = device
    adopt(client, image, manifest)
    client.ensure_volume("other", SIZE, RS, "e" * 32)
    client.send_records("other", write(1, 0, b"o" * RS, era=4), complete_through=1)
    client.release("other", 4, 1)
    live = {v["name"]: v for v in client.list_volumes()}
    server.stop()
    snapshot = {p: p.read_bytes() for p in server.root.rglob("*") if p.is_file()}
    on_disk = {v["name"]: v for v in describe_root(str(server.root))}
    assert snapshot == {p: p.read_bytes() for p in server.root.rglob("*") if p.is_file()}  # wrote nothing
    for name in ("vol", "other"):
        assert on_disk[name]["journal"]["limit"] is None
        for described in (live[name], on_disk[name]):
            described["journal"].pop("limit")
        assert on_disk[name] == live[name]
    assert on_disk["vol"]["adopted"]["divergent"] == [[3, 2], [10, 1]]
    assert on_disk["other"]["state"] == "released" and on_disk["other"]["last_record_at"] is not None
    server.start()
    with server.client() as c:
        c.send_records("vol", write(101, 0, b"after"))
    server.stop()
    server.start()
    with server.client() as c:
        assert adopt(c, image, manifest)["applied_seq"] == 101  # resent after a restart: still no reset
        info = c.volume_info("vol")
        assert info["image"] == str(image) and info["adopted"]["era"] == 7
        c.delete_volume("vol")
        assert image.exists() and not (server.root / "vol").exists()  # the device is not the server's to delete
    meta = server.root / "other" / "replica.json"
    meta.write_bytes(meta.read_bytes()[:-30])
    with pytest.raises(CorruptStateFile, match=f"refusing state file {meta}"):
        describe_root(str(server.root))


def test_manifest_holds_the_digest_of_every_region(client: ReplicaClient) -> None:
    client.ensure_volume("vol", SIZE, RS, VOLUME_ID)
    content = bytearray(SIZE)
    chunks: list[bytes] = []
    for seq, region in enumerate((1, 2, COUNT - 1), 1):
        start = region * RS
        piece = os.urandom(min(RS, SIZE - start) - 7)
        content[start + 7:start + 7 + len(piece)] = piece
        chunks += write(seq, start + 7, piece)
    client.send_records("vol", chunks)
    assert list(client.manifest("vol", COUNT)) == digests_of(bytes(content))


def test_an_interrupted_adopt_is_refused_until_sent_again(server: ServerProcess, client: ReplicaClient,
                                                          device) -> None:  # type: ignore[no-untyped-def]
    image, manifest, _ = device
    adopt(client, image, manifest)
    server.stop()
    # What a crash between the marker and the end leaves: replica.json still says "adopting".
    meta_path = server.root / "vol" / "replica.json"
    meta = load_json(str(meta_path), "replica", VOLUME_ID)
    save_json(str(meta_path), "replica", VOLUME_ID, {**meta, "adopting": {"at": meta["created"]}})
    (server.root / "vol" / "applied.json").unlink()
    server.start()
    with server.client() as c:
        with pytest.raises(Conflict, match="an adopt started at .* did not finish; send the adopt again"):
            c.volume_info("vol")
        assert "did not finish" in c.list_volumes()[0]["error"]
        assert adopt(c, image, manifest)["applied_seq"] == 100
        assert c.send_records("vol", write(101, 0, b"z"))["applied_seq"] == 101


def test_the_manifest_of_a_sparse_15_tib_replica_costs_its_data(server: ServerProcess, client: ReplicaClient,
                                                                tmp_path: Path) -> None:
    """Promote and adopt move the manifest as entries: 3 written regions of 251M are 120 bytes."""
    size, region_size = 15 << 40, 64 * 1024
    count = size // region_size
    client.ensure_volume("big", size, region_size, VOLUME_ID)
    regions = [0, count // 2, count - 1]
    chunks: list[bytes] = []
    for seq, region in enumerate(regions, 1):
        chunks += write(seq, region * region_size, bytes([seq]) * region_size)
    client.send_records("big", chunks)
    raw = call(server, "GET", "/v1/volumes/big/manifest")
    assert raw.status_code == 200 and raw.headers["Content-Type"] == "application/x-drtool-manifest"
    assert len(raw.content) == 3 * 40
    assert list(client.manifest("big", count)) == [
        (region, blake3.blake3(bytes([seq]) * region_size).digest()) for seq, region in enumerate(regions, 1)]
    # A manifest whose entries are out of order is refused before anything changes.
    bad = tmp_path / "bad.manifest"
    bad.write_bytes(b"".join(encode_manifest_entries(iter([(5, b"\x01" * 32), (4, b"\x02" * 32)]))))
    image = tmp_path / "big.img"
    with open(image, "wb") as handle:
        handle.truncate(size)
    with pytest.raises(UsageError, match="region 4 is out of order"):
        client.adopt("other", image=str(image), manifest=str(bad), size=size, region_size=region_size,
                     volume_id=VOLUME_ID, applied_seq=0, era=1)
