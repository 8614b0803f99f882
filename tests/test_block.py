"""Block task helpers checked against their plain definitions."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
import shapely.affinity

from chipflow._block import _block_features, _chip_features, _grid_pairs
from chipflow.labels import _rectangles


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
def test_block_features_clip_rectangles_as_boxes_like_geos(min_ratio):
    """The block's box shortcut for axis-aligned rectangles gives GEOS's boxes and areas, chip by chip."""
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
    kept, boxes, kept_areas, _, cuts = _block_features(
        geoms, bounds, areas, polygonal, rect, chip_boxes, chips, cands, min_ratio, False)
    shortcut = 0
    for i, box in enumerate(chip_boxes):
        plain = _chip_features(geoms, bounds, areas, polygonal, tuple(box), min_ratio, False)
        mine = slice(cuts[i], cuts[i + 1])
        np.testing.assert_array_equal(kept[mine], plain[0])
        np.testing.assert_array_equal(boxes[mine], plain[1])
        np.testing.assert_allclose(kept_areas[mine], plain[2], rtol=1e-12)
        shortcut += int(((bounds[plain[0]] != plain[1]).any(axis=1) & rect[plain[0]]).sum())
    assert shortcut > 50  # rectangles cut by the chips' edges took the shortcut


@pytest.mark.parametrize("stride", [256, 128, 300, 100, 600])  # 600: 344-row cells between chips
def test_band_moments_of_8_bit_blocks_equal_the_chips_own_statistics(stride):
    """The 8-bit path (all bands per row of cells, 16-bit column sums) against numpy over the chips."""
    from chipflow._block import _band_moments

    rng = np.random.default_rng(stride)
    pixels = rng.integers(0, 256, (3, 900, 1100), dtype=np.uint8)
    pixels[1, :40] = 255  # a band at its maximum over whole rows
    tile = 256
    chips = [(y, x) for y in range(0, 900 - tile + 1, stride) for x in range(0, 1100 - tile + 1, stride)]
    chips = chips[::2] + chips[1:3]  # some chips missing, so some cells are covered by none
    n, mean, m2, vmin, vmax = _band_moments(pixels, None, chips, (tile, tile))
    values = np.stack([pixels[:, y:y + tile, x:x + tile] for y, x in chips]).transpose(1, 0, 2, 3)
    values = values.reshape(3, -1).astype(np.float64)
    assert n.tolist() == [values.shape[1]] * 3
    np.testing.assert_allclose(mean, values.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(m2, ((values - values.mean(axis=1, keepdims=True)) ** 2).sum(axis=1), rtol=1e-11)
    assert vmin.tolist() == values.min(axis=1).tolist() and vmax.tolist() == values.max(axis=1).tolist()


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
