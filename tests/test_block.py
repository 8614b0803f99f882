"""Block task helpers checked against their plain definitions."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
import shapely.affinity

from chipflow._block import _block_features, _chip_features, _grid_pairs
from chipflow._clip import clip_convex
from chipflow.labels import _rectangles, _strictly_convex


@pytest.mark.parametrize("size", [(1000, 1000), (900, 950)], ids=["inside", "chips past the edge"])
def test_block_features_equal_a_per_chip_scan(size):
    """Polygons, lines and points; on chip edges, across them, outside the raster."""
    rng = np.random.default_rng(1)
    n = 3000
    x, y = rng.uniform(-50, 1100, n), rng.uniform(-50, 1100, n)
    w, h = rng.choice([0, 0, 5, 40, 300], n), rng.choice([0, 7, 60], n)
    x[::7], y[::5] = np.round(x[::7] / 128) * 128, np.round(y[::5] / 128) * 128  # on chip edges
    geoms = np.array([
        shapely.box(a, b, a + c, b + d) if c and d else
        shapely.Point(a, b) if not c else shapely.LineString([(a, b), (a + c, b + d)])
        for a, b, c, d in zip(x, y, w, h, strict=True)])
    bounds, areas = shapely.bounds(geoms), shapely.area(geoms)
    polygonal = np.isin(shapely.get_type_id(geoms), (3, 6))
    xs = ys = np.arange(0, 1000, 128)
    chip_boxes = np.array([(max(x0, 0), max(y0, 0), min(x0 + 256, size[0]), min(y0 + 256, size[1]))
                           for y0 in ys for x0 in xs], dtype=np.float64)
    chips, cands = _grid_pairs(bounds, polygonal, xs, ys, (256, 256), size)
    assert len(cands) > 5000 and (np.diff(chips) >= 0).all()
    cuts = np.searchsorted(chips, np.arange(len(chip_boxes) + 1))
    hits = [cands[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    rect, _ = _rectangles(geoms, bounds, areas)
    for want_geoms in (True, False):
        kept, boxes, kept_areas, clipped, cuts = _block_features(
            geoms, bounds, areas, polygonal, rect, chip_boxes, chips, cands, 0.0, want_geoms)
        for i, box in enumerate(chip_boxes):
            scan = _chip_features(geoms, bounds, areas, polygonal, tuple(box), 0.0, True)
            assert (np.diff(hits[i]) > 0).all()  # ascending: the class data's own order
            mine = slice(cuts[i], cuts[i + 1])
            np.testing.assert_array_equal(kept[mine], scan[0])
            np.testing.assert_array_equal(boxes[mine], scan[1])
            np.testing.assert_allclose(kept_areas[mine], scan[2], rtol=1e-12)
            if want_geoms:
                assert shapely.equals_exact(clipped[mine], scan[3], tolerance=0).all()


@pytest.mark.parametrize("starts", [np.arange(0, 1000, 128), np.array([0, 256, 512, 744]),
                                    np.array([-64, 64, 192]), np.array([0.0, 100.5])],
                         ids=["grid", "shifted last chip", "past the edge", "fractional edges"])
def test_axis_hits_equal_binary_searches(starts):
    """Edges, just off them, far outside, NaN-free; the table and searchsorted agree."""
    from chipflow._block import _axis_hits

    starts = starts.astype(np.float64)
    ends = np.minimum(starts + 256, 1000)
    starts = np.maximum(starts, 0)
    rng = np.random.default_rng(3)
    on = np.concatenate([starts, ends])
    lo = np.concatenate([rng.uniform(-300, 1300, 4000), on, on - 1e-9, on + 1e-9, on - 0.5, [-1e12, 1e12]])
    hi = lo + np.concatenate([rng.choice([0, 0.25, 3, 128, 300], lo.size - on.size), np.zeros(on.size)])
    polygonal = rng.random(lo.size) < 0.5
    first, last = _axis_hits(starts, ends, lo, hi, polygonal)
    want_first = np.searchsorted(ends, lo, side="right")
    want_last = np.where(polygonal, np.searchsorted(starts, hi, side="left"),
                         np.searchsorted(starts, hi, side="right"))
    np.testing.assert_array_equal(first, want_first)
    np.testing.assert_array_equal(last, np.maximum(want_last, want_first))


def test_grid_pairs_of_a_block_with_more_chips_than_16_bits_count():
    """Over 32767 chips in a block (tiny strides): the pairs still come sorted by chip, then candidate."""
    rng = np.random.default_rng(2)
    x, y = rng.uniform(0, 990, (2, 300))
    bounds = np.column_stack([x, y, x + rng.uniform(0, 12, 300), y + rng.uniform(0, 12, 300)])
    xs = ys = np.arange(0, 1000, 5)  # 200 x 200 chips of 8 px
    chips, cands = _grid_pairs(bounds, np.ones(300, bool), xs, ys, (8, 8), (1000, 1000))
    assert len(xs) * len(ys) > 2**15 and len(chips) > 1000
    cx0, cy0 = np.meshgrid(xs, ys)
    cx0, cy0 = cx0.ravel()[:, None], cy0.ravel()[:, None]
    meets = ((bounds[:, 0] < np.minimum(cx0 + 8, 1000)) & (bounds[:, 2] > cx0)
             & (bounds[:, 1] < np.minimum(cy0 + 8, 1000)) & (bounds[:, 3] > cy0))
    expected_chips, expected_cands = np.nonzero(meets)  # row-major: by chip, then candidate
    np.testing.assert_array_equal(chips, expected_chips)
    np.testing.assert_array_equal(cands, expected_cands)


def test_rectangles_are_exactly_the_polygons_that_equal_their_bounding_box():
    geoms = np.array([
        shapely.box(0, 0, 10, 5),  # a box
        shapely.Polygon([(0, 5), (10, 5), (10, 0), (0, 0)]),  # the same box, clockwise, other start
        shapely.affinity.rotate(shapely.box(0, 0, 10, 5), 20),  # a rotated box
        shapely.Polygon([(0, 0), (10, 0), (10, 5), (10, 5)]),  # a triangle with a repeated corner
        shapely.box(0, 0, 10, 5).difference(shapely.box(2, 2, 3, 3)),  # a box with a hole
        shapely.MultiPolygon([shapely.box(0, 0, 1, 1), shapely.box(2, 2, 3, 3)]),
        shapely.Polygon([(0, 0), (10, 0), (10, 5), (0, 5.000001)]),  # nearly a box
        shapely.Point(1, 1),
        shapely.box(3, 3, 3, 8),  # zero width
    ])
    found, _ = _rectangles(geoms, shapely.bounds(geoms), shapely.area(geoms))
    assert found.tolist() == [True, True, False, False, False, False, False, False, False]


@pytest.mark.parametrize("min_ratio", [0.0, 0.3])
@pytest.mark.parametrize("numpy_quads", [False, True], ids=["geos-quads", "numpy-quads"])
def test_block_features_clip_rectangles_as_boxes_like_geos(min_ratio, numpy_quads):
    """The block's shortcuts, for axis-aligned rectangles and (with ``quads``) rotated boxes,
    give GEOS's boxes and areas, chip by chip."""
    rng = np.random.default_rng(7)
    n = 2000
    x, y = rng.uniform(-40, 600, n), rng.uniform(-40, 600, n)
    w, h = rng.uniform(0.5, 90, n), rng.uniform(0.5, 90, n)
    geoms = np.array([shapely.box(a, b, a + c, b + d) for a, b, c, d in zip(x, y, w, h, strict=True)])
    geoms[::3] = [shapely.affinity.rotate(g, 25) for g in geoms[::3]]
    bounds, areas = shapely.bounds(geoms), shapely.area(geoms)
    polygonal = np.ones(n, bool)
    rect, _ = _rectangles(geoms, bounds, areas)
    assert rect.sum() == n - len(geoms[::3])
    xs = ys = np.arange(0, 600, 128) + 0.5  # chip edges off the integer grid too
    chip_boxes = np.array([(x0, y0, min(x0 + 256, 600), min(y0 + 256, 600)) for y0 in ys for x0 in xs])
    chips, cands = _grid_pairs(bounds, polygonal, xs, ys, (256, 256), (600, 600))
    quads = None
    if numpy_quads:
        corners = shapely.get_coordinates(geoms).reshape(-1, 5, 2)[:, :4]
        quads = (~rect, lambda which: corners[which])
        calls = []
        import chipflow._block

        def counted(rings, boxes):
            calls.append(len(rings))
            return clip_convex(rings, boxes)

        chipflow._block.clip_convex, real = counted, chipflow._block.clip_convex
    try:
        kept, boxes, kept_areas, _, cuts = _block_features(
            geoms, bounds, areas, polygonal, rect, chip_boxes, chips, cands, min_ratio, False, quads)
    finally:
        if numpy_quads:
            chipflow._block.clip_convex = real
    shortcut = 0
    for i, box in enumerate(chip_boxes):
        plain = _chip_features(geoms, bounds, areas, polygonal, tuple(box), min_ratio, False)
        mine = slice(cuts[i], cuts[i + 1])
        np.testing.assert_array_equal(kept[mine], plain[0])
        if numpy_quads:  # numpy's crossing points against GEOS's: the same to rounding
            np.testing.assert_allclose(boxes[mine], plain[1], rtol=0, atol=1e-9)
        else:
            np.testing.assert_array_equal(boxes[mine], plain[1])
        np.testing.assert_allclose(kept_areas[mine], plain[2], rtol=1e-12)
        shortcut += int(((bounds[plain[0]] != plain[1]).any(axis=1) & rect[plain[0]]).sum())
    assert shortcut > 50  # rectangles cut by the chips' edges took the shortcut
    if numpy_quads:
        assert sum(calls) > 50  # and rotated boxes the numpy clipping


@pytest.mark.parametrize("nodata", [False, True], ids=["all-valid", "nodata"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int8", "float32", "float64", "int32"])
@pytest.mark.parametrize("every", [False, True], ids=["some-chips", "every-chip"])
@pytest.mark.parametrize("stride", [256, 128, 300, 100, 600])  # 600: 344-row cells between chips
def test_band_moments_equal_the_chips_own_statistics(stride, every, dtype, nodata, monkeypatch):
    """Band statistics of a block against numpy over its chips' valid pixels (overlaps counted per chip).

    8/16-bit integers and floats go row of cells by row (integers summed exactly in narrow
    accumulators, floats in two passes, pieces of rows that end mid-cell); int32 a band at a time.
    Some chips missing, or chips covering the whole block; with nodata, scattered nodata pixels
    (NaN in floats), a band with a nodata stretch and a band with no valid pixel at all.
    """
    from chipflow import _block

    monkeypatch.setattr(_block, "_SQUARE_BYTES", 3 * 1100 * 8 * 7)  # pieces of 7-28 rows: cells end mid-piece
    rng = np.random.default_rng(stride)
    if dtype.startswith("float"):  # far from 0, so one pass of sums of squares would lose digits
        pixels = rng.normal(10_000, 30, (3, 900, 1100)).astype(dtype)
        top, bottom = 20_000, -5_000
    else:
        info = np.iinfo(dtype)
        pixels = rng.integers(int(info.min) + 10, int(info.max) - 9, (3, 900, 1100), dtype=dtype)
        top, bottom = info.max, info.min
    pixels[1, :40] = top  # a band at its maximum over whole rows
    tile = 256
    chips = [(y, x) for y in range(0, 900 - tile + 1, stride) for x in range(0, 1100 - tile + 1, stride)]
    if every:  # the block ends where the chips do: each cell is in a chip (one min/max pass per band)
        pixels = pixels[:, :max(y for y, _ in chips) + tile, :max(x for _, x in chips) + tile]
        ys, xs = (_block._cell_starts(np.unique([c[k] for c in chips]), tile, pixels.shape[1 + k])
                  for k in (0, 1))
        covered = (_block._chip_weights(chips, ys, xs, (tile, tile)) > 0).all()
        assert covered == (stride <= tile)  # beyond the tile, gaps between chips
    else:
        chips = chips[::2] + chips[1:3]  # some chips missing, so some cells are covered by none
    # lone extremes at the corners: the last in a chip or not
    pixels[0, 0, 0], pixels[2, -1, -1] = bottom + 3, bottom
    valid = None
    if nodata:
        valid = rng.random(pixels.shape) > 0.05
        valid[1, 100:230] = False  # a stretch of band 1, through the rows of extremes
        valid[0, 0, 0] = False  # band 0's lone minimum is nodata: not in the statistics
        valid[2] = False  # band 2 has no valid pixel
        if dtype.startswith("float"):
            pixels[~valid] = np.nan
    n, mean, m2, vmin, vmax = _block._band_moments(pixels, valid, chips, (tile, tile))
    for b in range(3):
        values = np.concatenate([pixels[b, y:y + tile, x:x + tile][
            slice(None) if valid is None else valid[b, y:y + tile, x:x + tile]] for y, x in chips])
        values = values.astype(np.float64)
        assert n[b] == values.size
        if not values.size:  # no valid pixel: nothing to merge
            assert (mean[b], m2[b], vmin[b], vmax[b]) == (0, 0, np.inf, -np.inf)
            continue
        assert mean[b] == pytest.approx(values.mean(), rel=1e-13)
        assert m2[b] == pytest.approx(((values - values.mean()) ** 2).sum(), rel=1e-11)
        assert (vmin[b], vmax[b]) == (values.min(), values.max())
    assert valid is not None or n[2] > 0


def test_strictly_convex_quadrilaterals_are_the_valid_ones_geos_need_not_check():
    from chipflow.labels import _strictly_convex

    rings = [
        [(0, 0), (10, 0), (10, 5), (0, 5)],  # a box, counter-clockwise
        [(0, 0), (0, 5), (10, 5), (10, 0)],  # clockwise
        list(shapely.affinity.rotate(shapely.box(0, 0, 10, 5), 17).exterior.coords)[:4],
        [(0, 0), (10, 10), (10, 0), (0, 10)],  # a bow-tie (invalid)
        [(0, 0), (10, 0), (3, 3), (0, 10)],  # a dart: valid, but concave
        [(0, 0), (10, 0), (10, 0), (0, 10)],  # a repeated corner
        [(0, 0), (5, 0), (10, 0), (0, 10)],  # a corner on an edge (flat)
    ]
    ring = np.array([r + [r[0]] for r in rings], dtype=np.float64)
    convex = _strictly_convex(ring)
    assert convex.tolist() == [True, True, True, False, False, False, False]
    valid = shapely.is_valid(shapely.polygons(ring))
    assert not (convex & ~valid).any()  # whatever it calls convex, GEOS calls valid


def _rotated_boxes(rng, n):
    """(n, 4, 2) corners of boxes 1-80 px wide at random angles, half of them clockwise."""
    w, h, angle = rng.uniform(1, 80, n), rng.uniform(1, 80, n), rng.uniform(0, np.pi, n)
    unit = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)]) / 2
    dx, dy = unit[:, 0] * w[:, None], unit[:, 1] * h[:, None]
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    centre = rng.uniform(-20, 300, (n, 1, 2))
    rings = centre + np.stack([dx * c - dy * s, dx * s + dy * c], axis=2)
    rings[::2] = rings[::2, ::-1]
    return rings


def test_convex_clipping_equals_geos_clip_by_rect():
    """Bounds and areas of quadrilaterals clipped to boxes: inside, outside, across edges and corners,
    with vertices and edges on the box's lines."""
    rng = np.random.default_rng(3)
    n = 4000
    rings = _rotated_boxes(rng, n)
    rings[:300] = np.round(rings[:300])  # integer vertices, on the integer box edges below
    rings[300:400] = [[(0, 0), (40, 0), (40, 30), (0, 30)]] * 100  # axis-aligned, shifted below
    rings[300:400] += rng.integers(-50, 250, (100, 1, 2))
    rings[400:500] = [[(0, 10), (10, 0), (20, 10), (10, 20)]] * 100  # diamonds touching box lines
    rings[400:500] += rng.integers(-30, 260, (100, 1, 2))
    x0, y0 = rng.integers(-10, 150, n).astype(float), rng.integers(-10, 150, n).astype(float)
    boxes = np.column_stack([x0, y0, x0 + rng.integers(1, 256, n), y0 + rng.integers(1, 256, n)])
    boxes[::5, :2] += 0.5  # and off the grid
    polygons = shapely.polygons(np.concatenate([rings, rings[:, :1]], axis=1))
    assert _strictly_convex(np.concatenate([rings, rings[:, :1]], axis=1)).all()
    geos = np.array([shapely.clip_by_rect(p, *b) for p, b in zip(polygons, boxes.tolist(), strict=True)])
    want_bounds, want_areas = shapely.bounds(geos), shapely.area(geos)
    bounds, areas = clip_convex(rings, boxes)
    left = want_areas > 0
    assert 900 < left.sum() < n - 900 and ((want_areas < shapely.area(polygons)) & left).sum() > 500
    np.testing.assert_array_equal(areas > 0, left)  # the same ones clipped away (or to an edge)
    np.testing.assert_allclose(areas, want_areas, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(bounds[left], want_bounds[left], rtol=0, atol=1e-9)
    assert (bounds[left, :2] >= boxes[left, :2] - 1e-9).all() and (bounds[left, 2:] <= boxes[left, 2:] + 1e-9).all()


@pytest.mark.parametrize("dtype, nodata", [("uint8", 0), ("uint16", 65535), ("float32", -9999.0),
                                           ("float32", None), ("float32", float("nan"))])
def test_valid_mask_is_none_when_no_pixel_is_nodata(dtype, nodata):
    """No nodata pixel in the block: None (the statistics' fast path); else exactly the nodata pixels."""
    from chipflow._block import _valid_mask

    pixels = np.full((2, 5, 6), 7, dtype=dtype)
    assert _valid_mask(pixels, nodata) is None
    pixels[1, 2, 3] = float("nan") if nodata is None or np.isnan(nodata) else nodata
    if dtype.startswith("float"):
        pixels[0, 4, 5] = np.nan  # NaN is never valid in floats, nodata value or not
    valid = _valid_mask(pixels, nodata)
    expected = np.ones(pixels.shape, bool)
    expected[1, 2, 3] = False
    if dtype.startswith("float"):
        expected[0, 4, 5] = False
    assert valid is not None and valid.tolist() == expected.tolist()
