"""Tests for goheap/sizeclasses.py: the generated tables against Go's published class list, and the
lookup against a brute-force search at every heap page size the module accepts."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from goheap import sizeclasses
from goheap.sizeclasses import (
    HEAP_ALLOC_CHUNK,
    MAX_MHEAP_LIST,
    MAX_SMALL_SIZE,
    NUM_SIZE_CLASSES,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    init_sizes,
    roundupsize,
    size_to_class,
)

# The test oracle: reference/go-allocator.md section 4, the Go 1.3/1.4 class list at 8 KiB pages.
# (class, size, npages, objs/span, tail waste bytes, max round-up waste % to one decimal)
GO_TABLE_8K = [
    (1, 8, 1, 1024, 0, 87.5), (2, 16, 1, 512, 0, 43.8), (3, 32, 1, 256, 0, 46.9),
    (4, 48, 1, 170, 32, 31.2), (5, 64, 1, 128, 0, 23.4), (6, 80, 1, 102, 32, 18.8),
    (7, 96, 1, 85, 32, 15.6), (8, 112, 1, 73, 16, 13.4), (9, 128, 1, 64, 0, 11.7),
    (10, 144, 1, 56, 128, 10.4), (11, 160, 1, 51, 32, 9.4), (12, 176, 1, 46, 96, 8.5),
    (13, 192, 1, 42, 128, 7.8), (14, 208, 1, 39, 80, 7.2), (15, 224, 1, 36, 128, 6.7),
    (16, 240, 1, 34, 32, 6.2), (17, 256, 1, 32, 0, 5.9), (18, 288, 1, 28, 128, 10.8),
    (19, 320, 1, 25, 192, 9.7), (20, 352, 1, 23, 96, 8.8), (21, 384, 1, 21, 128, 8.1),
    (22, 416, 1, 19, 288, 7.5), (23, 448, 1, 18, 128, 6.9), (24, 480, 1, 17, 32, 6.5),
    (25, 512, 1, 16, 0, 6.1), (26, 576, 1, 14, 128, 10.9), (27, 640, 1, 12, 512, 9.8),
    (28, 704, 1, 11, 448, 8.9), (29, 768, 1, 10, 512, 8.2), (30, 896, 1, 9, 128, 14.2),
    (31, 1024, 1, 8, 0, 12.4), (32, 1152, 1, 7, 128, 11.0), (33, 1280, 1, 6, 512, 9.9),
    (34, 1408, 2, 11, 896, 9.0), (35, 1536, 1, 5, 512, 8.3), (36, 1664, 2, 9, 1408, 7.6),
    (37, 2048, 1, 4, 0, 18.7), (38, 2304, 2, 7, 256, 11.1), (39, 2560, 1, 3, 512, 10.0),
    (40, 2816, 3, 8, 2048, 9.1), (41, 3072, 2, 5, 1024, 8.3), (42, 3328, 3, 7, 1280, 7.7),
    (43, 4096, 1, 2, 0, 18.7), (44, 4608, 3, 5, 1536, 11.1), (45, 5376, 2, 3, 256, 14.3),
    (46, 6144, 3, 4, 0, 12.5), (47, 6400, 4, 5, 768, 4.0), (48, 6656, 5, 6, 1024, 3.8),
    (49, 6912, 6, 7, 768, 3.7), (50, 8192, 1, 1, 0, 15.6), (51, 8448, 7, 6, 6656, 3.0),
    (52, 8704, 6, 5, 5632, 2.9), (53, 9472, 5, 4, 3072, 8.1), (54, 10496, 4, 3, 1280, 9.7),
    (55, 12288, 3, 2, 0, 14.6), (56, 13568, 5, 3, 256, 9.4), (57, 14080, 7, 4, 1024, 3.6),
    (58, 16384, 2, 1, 0, 14.1), (59, 16640, 9, 4, 7168, 1.5), (60, 17664, 7, 3, 4352, 5.8),
    (61, 20480, 5, 2, 0, 13.7), (62, 21248, 8, 3, 1792, 3.6), (63, 24576, 3, 1, 0, 13.5),
    (64, 24832, 10, 3, 7424, 1.0), (65, 28416, 7, 2, 512, 12.6), (66, 32768, 4, 1, 0, 13.3),
]  # fmt: skip

# Class counts (class 0 included) per heap page shift, from the same reference section.
CLASS_COUNTS = {12: 61, 13: 67, 14: 70, 16: 73}
PAGE_SHIFTS = sorted(CLASS_COUNTS)


@pytest.fixture(scope="module", params=PAGE_SHIFTS, ids=lambda s: f"{1 << (s - 10)}KiB")
def sc(request):
    return init_sizes(request.param)


def brute_force_class(class_to_size, size):
    """The smallest class whose size is >= size, by linear search; 0 when none fits."""
    return next((c for c in range(1, len(class_to_size)) if class_to_size[c] >= size), 0)


def test_sizeclasses_constants_relate_as_go_defines_them():
    assert PAGE_SIZE == 1 << PAGE_SHIFT == 8192
    assert PAGE_MASK == PAGE_SIZE - 1
    assert MAX_SMALL_SIZE == 32768
    assert NUM_SIZE_CLASSES == 67
    assert MAX_MHEAP_LIST == 128 == HEAP_ALLOC_CHUNK // PAGE_SIZE


def test_class_table_matches_go_table_at_8k_pages():
    rows = sizeclasses.class_table()
    got = [(*r[:5], f"{r.max_waste_pct:.1f}") for r in rows]
    want = [(*w[:5], f"{w[5]:.1f}") for w in GO_TABLE_8K]
    assert got == want


def test_module_tables_are_generated_at_8k_pages():
    fresh = init_sizes(PAGE_SHIFT)
    assert sizeclasses.SIZE_CLASSES == fresh
    assert sizeclasses.class_to_size == fresh.class_to_size == (0, *(w[1] for w in GO_TABLE_8K))
    assert sizeclasses.class_to_allocnpages == (0, *(w[2] for w in GO_TABLE_8K))
    assert sizeclasses.class_to_nobjs == (0, *(w[3] for w in GO_TABLE_8K))
    assert sizeclasses.size_to_class8 == fresh.size_to_class8
    assert sizeclasses.size_to_class128 == fresh.size_to_class128


@pytest.mark.parametrize("page_shift", PAGE_SHIFTS)
def test_init_sizes_class_count_per_page_shift(page_shift):
    assert init_sizes(page_shift).num_classes == CLASS_COUNTS[page_shift]


def test_init_sizes_lookup_tables_have_go_lengths(sc):
    assert len(sc.size_to_class8) == 129
    assert len(sc.size_to_class128) == 249


def test_size_to_class_picks_smallest_fitting_class(sc):
    for size in range(MAX_SMALL_SIZE + 1):
        want = brute_force_class(sc.class_to_size, size)
        assert sc.size_to_class(size) == want, size


def test_size_to_class_zero_gets_smallest_class():
    assert size_to_class(0) == 1
    assert roundupsize(0) == 8


@pytest.mark.parametrize("size", [MAX_SMALL_SIZE + 1, MAX_SMALL_SIZE + 128, 1 << 40])
def test_size_to_class_large_is_class_zero(sc, size):
    assert sc.size_to_class(size) == 0


@pytest.mark.parametrize(("bad", "exc"), [(-1, ValueError), (1.0, TypeError), (True, TypeError)])
def test_size_to_class_rejects_bad_sizes(bad, exc):
    with pytest.raises(exc):
        size_to_class(bad)
    with pytest.raises(exc):
        roundupsize(bad)


def test_init_sizes_tail_waste_within_an_eighth_of_the_span(sc):
    for row in sc.class_table():
        span_bytes = row.npages * sc.page_size
        assert row.nobjs == span_bytes // row.size
        assert row.tail_waste == span_bytes - row.nobjs * row.size
        assert 8 * row.tail_waste <= span_bytes, row


def test_init_sizes_tables_are_monotone(sc):
    sizes = sc.class_to_size
    assert sizes[0] == 0 and sizes[1] == 8 and sizes[2] == 16 and sizes[-1] == MAX_SMALL_SIZE
    assert all(a < b for a, b in itertools.pairwise(sizes))
    for table in (sc.size_to_class8, sc.size_to_class128):
        assert all(a <= b for a, b in itertools.pairwise(table))
    assert sc.size_to_class8[-1] == sc.size_to_class128[0]  # both entries mean 1024 bytes
    assert sc.size_to_class128[-1] == sc.num_classes - 1


def test_init_sizes_merges_classes_that_pack_alike(sc):
    # After the merge rule no two neighbours share both page count and objects per span.
    for prev, row in itertools.pairwise(sc.class_table()):
        assert (prev.npages, prev.nobjs) != (row.npages, row.nobjs), (prev, row)


def test_init_sizes_class_sizes_are_aligned(sc):
    for size in sc.class_to_size[2:]:
        assert size % 16 == 0
        if size > 1024:
            assert size % 128 == 0


def test_class_table_max_waste_is_worst_request(sc):
    worst = {}
    for size in range(1, MAX_SMALL_SIZE + 1):
        c = sc.size_to_class(size)
        waste = 100.0 * (sc.class_to_size[c] - size) / sc.class_to_size[c]
        worst[c] = max(worst.get(c, 0.0), waste)
    for row in sc.class_table():
        assert row.max_waste_pct == pytest.approx(worst[row.sizeclass]), row


@pytest.mark.parametrize(
    ("size", "want"),
    [(1, 8), (8, 8), (9, 16), (17, 32), (1023, 1024), (1025, 1152), (32767, 32768),
     (32768, 32768), (32769, 40960), (40960, 40960), (40961, 49152), (1 << 30, 1 << 30)],
)  # fmt: skip
def test_roundupsize_at_8k_pages(size, want):
    assert roundupsize(size) == want


def test_roundupsize_large_rounds_to_whole_heap_pages(sc):
    page = sc.page_size
    edges = [k * page + d for k in (9, 100, 1 << 20) for d in (-1, 0, 1)]  # 9 pages > 32 KiB
    for size in [MAX_SMALL_SIZE + 1, *edges]:
        got = sc.roundupsize(size)
        assert got % page == 0 and size <= got < size + page, (size, got)
        assert got == size if size % page == 0 else got > size


@given(size=st.integers(min_value=0, max_value=1 << 48))
def test_roundupsize_fits_and_is_idempotent(size):
    got = roundupsize(size)
    assert got >= size
    assert roundupsize(got) == got
    if size <= MAX_SMALL_SIZE:
        assert got == sizeclasses.class_to_size[size_to_class(size)]


@pytest.mark.parametrize("bad", [11, 17, 13.0, "13"])
def test_init_sizes_rejects_unsupported_page_shift(bad):
    with pytest.raises(ValueError):
        init_sizes(bad)


def test_import_check_rejects_tables_with_another_class_count():
    # The import-time check passes the 8 KiB tables (or the import would have failed) and refuses
    # tables generated for another page size, whose class count is not NUM_SIZE_CLASSES.
    sizeclasses._check_go_invariants(sizeclasses.SIZE_CLASSES)
    with pytest.raises(RuntimeError, match="NUM_SIZE_CLASSES"):
        sizeclasses._check_go_invariants(init_sizes(12))
