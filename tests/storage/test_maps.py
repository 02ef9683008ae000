"""Bitmaps, era maps and the manifest in memory."""

from hypothesis import given, strategies as st

from drtool.storage.maps import EraMap, Manifest, RegionBitmap, zero_digest
from drtool.regions import to_runs


@given(count=st.integers(1, 300), data=st.data())
def test_bitmap_runs_match_set_bits(count, data):
    bits = RegionBitmap(count)
    chosen = data.draw(st.sets(st.integers(0, count - 1)))
    bits.update(chosen)
    assert list(bits) == sorted(chosen)
    assert bits.runs() == to_runs(chosen)
    assert bits.popcount() == len(chosen)
    assert bits.any() == bool(chosen)
    for region in chosen:
        bits.clear(region)
        assert bits.any() == (bits.popcount() > 0)


@given(count=st.integers(1, 300), data=st.data())
def test_set_between_is_the_set_bits_of_a_range(count, data):
    bits = RegionBitmap(count)
    chosen = data.draw(st.sets(st.integers(0, count - 1)))
    bits.update(chosen)
    first = data.draw(st.integers(-3, count + 3))
    end = data.draw(st.integers(-3, count + 10))
    assert list(bits.set_between(first, end)) == sorted(r for r in chosen if first <= r < end)


@given(count=st.integers(1, 300), data=st.data())
def test_set_run_and_clear_run(count, data):
    first = data.draw(st.integers(0, count - 1))
    n = data.draw(st.integers(1, count - first))
    bits = RegionBitmap(count)
    bits.set_run(first, n)
    assert bits.runs() == [(first, n)]
    assert bits.any()
    bits.clear_run(first, n)
    assert not bits.any()


def test_bitmap_bytes_round_trip():
    bits = RegionBitmap(20)
    bits.update([0, 7, 8, 19])
    again = RegionBitmap(20, bits.to_bytes())
    assert again == bits and list(again) == [0, 7, 8, 19]


def test_era_map_changed_since():
    eras = EraMap(5, initial=1)
    eras[3] = 4
    eras[1] = 2
    assert list(eras.changed_since(2)) == [1, 3]
    assert EraMap(5, eras.to_bytes())[3] == 4


def test_manifest_set_and_match():
    m = Manifest(3)
    m[1] = zero_digest(4096)
    assert m.matches(1, zero_digest(4096))
    assert not m.matches(0, zero_digest(4096))
    assert Manifest(3, m.to_bytes())[1] == zero_digest(4096)
