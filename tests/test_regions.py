"""Region arithmetic: ranges straddling regions, the partial last region, bad ranges."""

import pytest
from hypothesis import given, strategies as st

from drtool.errors import UsageError
from drtool.regions import (
    Geometry, coalesce, format_runs, from_runs, parse_runs, to_runs, validate_region_size,
)

SIZES = st.integers(min_value=1, max_value=1 << 24)
REGION_SIZES = st.sampled_from([4096, 8192, 65536, 1 << 20])


def test_partial_last_region():
    g = Geometry(10 * 65536 + 100, 65536)
    assert g.count == 11
    assert g.region_length(10) == 100
    assert g.region_bounds(10) == (10 * 65536, 100)
    assert g.run_bounds(9, 2) == (9 * 65536, 65536 + 100)


def test_straddling_range_splits_exactly():
    g = Geometry(4 * 4096, 4096)
    assert list(g.split(4000, 200)) == [(0, 4000, 96), (1, 0, 104)]
    assert list(g.regions_for(4095, 2)) == [0, 1]


def test_zero_length_touches_nothing():
    g = Geometry(8192, 4096)
    assert list(g.regions_for(100, 0)) == []
    assert list(g.regions_for(8192, 0)) == []


@pytest.mark.parametrize("offset,length", [(-1, 1), (0, 8193), (8192, 1), (5, -1)])
def test_out_of_range_is_refused(offset, length):
    with pytest.raises(UsageError):
        list(Geometry(8192, 4096).regions_for(offset, length))


@pytest.mark.parametrize("size", ["3000", "6K", "128M", "0", "4097"])
def test_region_size_must_be_power_of_two_in_range(size):
    with pytest.raises(UsageError, match="power of two"):
        validate_region_size(size)


def test_region_size_accepts_units():
    assert validate_region_size("64K") == 65536
    assert validate_region_size("64M") == 64 << 20


@given(size=SIZES, region_size=REGION_SIZES, data=st.data())
def test_split_covers_range_exactly(size, region_size, data):
    g = Geometry(size, region_size)
    offset = data.draw(st.integers(0, size))
    length = data.draw(st.integers(0, size - offset))
    pieces = list(g.split(offset, length))
    assert sum(n for _, _, n in pieces) == length
    position = offset
    for region, inner, n in pieces:
        assert g.region_start(region) + inner == position
        assert 0 < n and inner + n <= g.region_length(region)
        position += n


@given(size=SIZES, region_size=REGION_SIZES)
def test_regions_tile_the_volume(size, region_size):
    g = Geometry(size, region_size)
    assert sum(g.region_length(r) for r in range(g.count)) == size
    assert 0 < g.last_region_length <= region_size


@given(st.lists(st.integers(0, 500)))
def test_runs_round_trip(regions):
    runs = to_runs(regions)
    assert list(from_runs(runs)) == sorted(set(regions))
    assert all(a + n < b for (a, n), (b, _) in zip(runs, runs[1:]))
    if runs:
        assert parse_runs(format_runs(runs)) == runs


def test_coalesce_merges_and_caps():
    assert coalesce([(5, 2), (0, 3), (3, 2)]) == [(0, 7)]
    assert coalesce([(0, 10)], max_count=4) == [(0, 4), (4, 4), (8, 2)]


def test_parse_runs_forms_and_errors():
    assert parse_runs("3,10-12,40+4") == [(3, 1), (10, 3), (40, 4)]
    with pytest.raises(UsageError):
        parse_runs("5-2")
    with pytest.raises(UsageError):
        parse_runs("x")
    with pytest.raises(UsageError, match="outside"):
        parse_runs("0-99", Geometry(4096 * 10, 4096))
