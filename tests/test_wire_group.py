"""The group transaction body (drtool.wire): what is encoded decodes to the same parts, and every
length is checked against the body."""

from __future__ import annotations

import pytest

from drtool import wire


def _body(parts, txn: int = 7) -> bytes:
    return b"".join(wire.encode_group_txn(txn, parts))


def test_parts_round_trip_in_order() -> None:
    rec_a = wire.encode_record(wire.KIND_WRITE, 5, 0, b"a" * 100)
    rec_b = wire.encode_record(wire.KIND_ZERO, 9, 4096, length=4096, flags=wire.FLAG_OVERLAY)
    txn = wire.decode_group_txn(_body([("vol-a", False, 5, rec_a), ("vol-b", True, 0, rec_b)]))
    assert txn.txn == 7
    assert [(p.volume, p.overlay, p.complete_through, bytes(p.body)) for p in txn.parts] == [
        ("vol-a", False, 5, b"".join(rec_a)), ("vol-b", True, 0, b"".join(rec_b))]
    assert [h.seq for h, _ in wire.iter_records(txn.parts[0].body)] == [5]


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b[:-1], "is truncated"),
    (lambda b: b + b"x", "bytes after the last part"),
    (lambda b: b[:25] + b"\xff" + b[26:], "volume name of"),
    (lambda b: b[:30] + b"\x01" + b[31:], "part header checksum mismatch"),
    (lambda b: b[:24], "truncated part header"),
])
def test_malformed_bodies_name_the_check(mangle, message) -> None:
    good = _body([("a", False, 0, wire.encode_record(wire.KIND_WRITE, 1, 0, b"x" * 10))])
    with pytest.raises(wire.WireError, match=message):
        wire.decode_group_txn(mangle(good))


def test_a_volume_twice_and_too_many_parts_are_refused() -> None:
    rec = wire.encode_record(wire.KIND_WRITE, 1, 0, b"x")
    with pytest.raises(wire.WireError, match="two mirror parts"):
        wire.decode_group_txn(_body([("a", False, 0, rec), ("a", False, 0, rec)]))
    assert len(wire.decode_group_txn(_body([("a", False, 0, rec), ("a", True, 0, rec)])).parts) == 2
    with pytest.raises(wire.WireError, match="3 parts"):
        wire.decode_group_txn(_body([(n, False, 0, rec) for n in "abc"]), max_parts=2)
    with pytest.raises(ValueError):
        wire.encode_group_txn(0, [("a", False, 0, rec)])
