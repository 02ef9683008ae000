"""Bitmaps, era maps and the manifest (on scratch pages in memory)."""

from hypothesis import given, strategies as st

from drtool.storage.maps import CHUNK_BITS, EraMap, Manifest, RegionBitmap, zero_digest
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


def test_bitmap_copy_and_difference_span_chunks():
    count = 3 * CHUNK_BITS + 17
    bits = RegionBitmap(count)
    bits.update([0, 7, CHUNK_BITS - 1, CHUNK_BITS, count - 1])
    bits.set_run(CHUNK_BITS * 2, CHUNK_BITS)  # a whole chunk: a count, no page
    again = bits.copy()
    assert again == bits and again.popcount() == 5 + CHUNK_BITS
    other = RegionBitmap(count)
    other.update([7, count - 1])
    other.set_run(CHUNK_BITS * 2 + 5, 10)
    diff = bits.difference(other)
    assert diff.popcount() == 3 + CHUNK_BITS - 10
    assert diff.runs() == [(0, 1), (CHUNK_BITS - 1, 2), (2 * CHUNK_BITS, 5), (2 * CHUNK_BITS + 15, CHUNK_BITS - 15)]


def test_full_chunk_becomes_mixed_when_one_bit_clears():
    count = CHUNK_BITS + 3
    bits = RegionBitmap(count)
    bits.set_all()
    bits.clear(CHUNK_BITS + 1)
    bits.clear(4)
    assert bits.popcount() == count - 2
    assert bits.runs() == [(0, 4), (5, CHUNK_BITS - 4), (CHUNK_BITS + 2, 1)]


def test_era_map_changed_since():
    eras = EraMap(5000)
    for region in range(5000):
        eras[region] = 1
    eras[3] = 4
    eras[1] = 2
    eras[4999] = 3
    assert list(eras.changed_since(2)) == [1, 3, 4999]
    assert list(eras.changed_since(2, 2, 4999)) == [3]
    assert list(eras.changed_since(5)) == []


def test_manifest_set_and_match():
    m = Manifest(3, 4096, last_length=100)
    m[1] = zero_digest(4096)
    assert m.is_zero(1) and m.matches(1, zero_digest(4096))
    assert m.matches(0, zero_digest(4096))  # never written: all zeros
    assert m[2] == zero_digest(100)  # the partial last region's own zero digest
    m[0] = b"\x01" + bytes(30) + b"\x02"
    assert not m.matches(0, zero_digest(4096))
    assert list(m.nonzero_between(0, 3)) == [0]


@given(data=st.data())
def test_manifest_nonzero_between_is_every_data_region_once(data):
    count = 1000
    m = Manifest(count, 4096)
    chosen = data.draw(st.sets(st.integers(0, count - 1), max_size=50))
    for region in chosen:
        # digests with zero bytes inside: one region must still come out once
        m[region] = bytes([1]) + bytes(15) + bytes([region % 251 + 1]) + bytes(15)
    first = data.draw(st.integers(0, count))
    end = data.draw(st.integers(first, count))
    assert list(m.nonzero_between(first, end)) == sorted(r for r in chosen if first <= r < end)


@given(data=st.data())
def test_set_algebra_matches_python_sets(data):
    count = 2 * CHUNK_BITS + 100
    region = st.integers(0, count - 1)
    a_set = data.draw(st.sets(region, max_size=30))
    b_set = data.draw(st.sets(region, max_size=30))
    a, b = RegionBitmap(count), RegionBitmap(count)
    a.update(a_set)
    b.update(b_set)
    full_chunk = data.draw(st.sampled_from([None, 0, 1, 2]))
    if full_chunk is not None:  # a whole chunk set on one side: settled by counts
        lo = full_chunk * CHUNK_BITS
        n = min(CHUNK_BITS, count - lo)
        a.set_run(lo, n)
        a_set |= set(range(lo, lo + n))
    assert list(a.difference(b)) == sorted(a_set - b_set)
    assert list(a.intersection(b)) == sorted(a_set & b_set)
    assert list(b.intersection(a)) == sorted(a_set & b_set)
    assert list(a.union(b)) == sorted(a_set | b_set)
    assert a.union(b).popcount() == len(a_set | b_set)


# -- block digests (issue 12) ---------------------------------------------------------------

def _manifest_with_blocks(count: int = 20, region_size: int = 65536) -> "Manifest":
    from drtool.storage.maps import MemoryPages

    return Manifest(count, region_size, pages=MemoryPages(), first_page=1, blocks_page=100)


def test_a_new_digest_clears_block_digests_unless_fresh_ones_come_with_it():
    from drtool.storage.maps import block_digests, digest

    manifest = _manifest_with_blocks()
    old, new = b"a" * 65536, b"b" * 65536
    manifest.set(3, digest(old), block_digests(digest(old), old))
    assert manifest.blocks.get(3, 0, 16) == block_digests(digest(old), old)
    manifest[3] = digest(old)  # the same digest (the same bytes): they still hold
    assert manifest.blocks.known(3)
    manifest[3] = digest(new)
    assert not manifest.blocks.known(3) and manifest.blocks.get(3, 5, 6) is None
    assert manifest.remember_blocks(3, digest(old), block_digests(digest(old), old)) is False  # stale source
    assert manifest.remember_blocks(3, digest(new), block_digests(digest(new), new)) is True
    assert manifest.blocks.known(3) and not manifest.blocks.known(2) and not manifest.blocks.known(4)
    manifest[3] = zero_digest(65536)  # zeros: checked against zeros, no block digests kept
    assert not manifest.blocks.known(3)


def test_block_digests_of_a_region_that_straddles_two_pages():
    """254 digests a page: region 15's 16 slots are 240-255, across pages 0 and 1."""
    from drtool.storage.maps import BLOCK_DIGESTS_PER_PAGE, block_digests, digest

    assert 15 * 16 < BLOCK_DIGESTS_PER_PAGE < 16 * 16
    manifest = _manifest_with_blocks()
    regions = {region: bytes([region]) * 65536 for region in (14, 15, 16)}
    for region, data in regions.items():
        manifest.set(region, digest(data), block_digests(digest(data), data))
    for region, data in regions.items():
        assert manifest.blocks.get(region, 0, 16) == block_digests(digest(data), data)
    manifest[15] = digest(b"x" * 65536)
    assert not manifest.blocks.known(15)
    assert manifest.blocks.known(14) and manifest.blocks.known(16)  # the neighbours keep theirs


def test_block_digests_are_keyed_by_the_region_digest():
    from drtool.storage.maps import BLOCK_DIGEST_SIZE, block_digests

    data = bytes(range(256)) * 64 + b"short tail"
    one, two = block_digests(b"k" * 32, data), block_digests(b"K" * 32, data)
    assert len(one) == 5 and all(len(d) == BLOCK_DIGEST_SIZE for d in one)
    assert not set(one) & set(two)


def test_block_digests_come_after_every_other_map_in_the_layout():
    """A store written before block digests existed keeps every map where it was."""
    from drtool.storage.maps import Layout

    kinds = ("bad", "ioerror", "unreplicated", "norecord", "overlay", "resync")
    before, after = Layout(100000, kinds), Layout(100000, kinds, 65536)
    assert (before.manifest, before.eras, before.era_summary, before.bitmaps) == \
        (after.manifest, after.eras, after.era_summary, after.bitmaps)
    digest_pages = (100000 * 16 + 253) // 254
    assert after.blocks == before.pages and after.overlay_blocks[0] == after.blocks + digest_pages
    # then the overlay's block map: a bit per block (chunks, then their counts), a digest per block
    chunks = (100000 * 16 + 32511) // 32512
    assert after.overlay_blocks == (after.blocks + digest_pages, after.blocks + digest_pages + chunks)
    assert after.overlay_digests == after.overlay_blocks[1] + 1
    assert after.pages == after.overlay_digests + digest_pages
    assert Layout(100, kinds, 4096).pages == Layout(100, kinds).pages  # one block a region: none kept


def test_overlay_blocks_say_which_blocks_a_partial_region_holds():
    from drtool.storage.maps import OverlayBlocks, overlay_block_digest

    blocks = OverlayBlocks(1000, 65536)
    assert not blocks.partial(7) and blocks.held(7) == []
    first, second = b"a" * 4096, b"b" * 4096
    blocks.add(7, 3, [overlay_block_digest(first), overlay_block_digest(second)])
    blocks.add(8, 15, [overlay_block_digest(first)])
    assert blocks.partial(7) and blocks.held(7) == [3, 4] and blocks.held(8) == [15]
    assert not blocks.partial(6) and not blocks.partial(9)
    assert blocks.verify(7, 3, first) and blocks.verify(7, 4, second)
    assert not blocks.verify(7, 3, second) and not blocks.verify(7, 5, first)
    blocks.clear(7)
    assert not blocks.partial(7) and blocks.held(8) == [15]


def test_matches_run_compares_a_run_of_digests_across_pages():
    from drtool.storage.maps import digest

    manifest = Manifest(400, 65536)
    digests = [digest(bytes([r % 251]) * 100) for r in range(400)]
    for region, value in enumerate(digests):
        manifest[region] = value
    assert manifest.matches_run(100, digests[100:390])  # spans three manifest pages
    assert not manifest.matches_run(100, digests[101:391])
    assert not manifest.matches_run(5, digests[5:7] + [None])
    changed = digests[200:260]
    changed[40] = digest(b"other")
    assert not manifest.matches_run(200, changed)
    manifest[7] = zero_digest(65536)  # stored as "all zeros": checked one by one
    assert not manifest.matches_run(7, [zero_digest(65536)])


def test_verify_block_checks_one_block_in_place():
    from drtool.storage.maps import block_digests, digest

    import os

    manifest = _manifest_with_blocks()
    content = os.urandom(65536)
    manifest[4] = digest(content)
    block = content[3 * 4096:4 * 4096]
    assert not manifest.verify_block(4, 3, block)  # unknown: the caller checks the region whole
    manifest.remember_blocks(4, digest(content), block_digests(digest(content), content))
    assert manifest.verify_block(4, 3, block)
    assert not manifest.verify_block(4, 2, block)  # another block's bytes
    assert not manifest.verify_block(4, 3, b"\x00" + block[1:])
    assert manifest.verify_block(6, 0, bytes(4096)) and not manifest.verify_block(6, 0, b"\x01" + bytes(4095))
