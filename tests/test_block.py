"""Block task helpers checked against their plain definitions."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
import shapely.affinity

from chipflow._block import _chip_features, _grid_hits


@pytest.mark.parametrize("size", [(1000, 1000), (900, 950)], ids=["inside", "chips past the edge"])
def test_grid_hits_find_exactly_the_features_a_per_chip_scan_finds(size):
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
    hits = _grid_hits(bounds, polygonal, xs, ys, (256, 256), size)
    assert len(hits) == len(xs) * len(ys) and sum(map(len, hits)) > 5000
    for r, y0 in enumerate(ys):
        for c, x0 in enumerate(xs):
            box = (max(x0, 0), max(y0, 0), min(x0 + 256, size[0]), min(y0 + 256, size[1]))
            scan = _chip_features(geoms, bounds, areas, polygonal, box, 0.0, True)
            fast = _chip_features(geoms, bounds, areas, polygonal, box, 0.0, True, pos=hits[r * len(xs) + c])
            np.testing.assert_array_equal(fast[0], scan[0])
            np.testing.assert_array_equal(fast[1], scan[1])


def test_rectangles_are_exactly_the_polygons_that_equal_their_bounding_box():
    from chipflow.labels import _rectangles

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
    found = _rectangles(geoms, shapely.bounds(geoms), shapely.area(geoms))
    assert found.tolist() == [True, True, False, False, False, False, False, False, False]


@pytest.mark.parametrize("want_geoms", [False, True])
def test_rectangles_clipped_as_boxes_equal_geos_clipping(want_geoms):
    """The box shortcut for axis-aligned rectangles gives GEOS's boxes and areas; the rest go through GEOS."""
    rng = np.random.default_rng(7)
    n = 2000
    x, y = rng.uniform(-40, 600, n), rng.uniform(-40, 600, n)
    w, h = rng.uniform(0.5, 90, n), rng.uniform(0.5, 90, n)
    geoms = np.array([shapely.box(a, b, a + c, b + d) for a, b, c, d in zip(x, y, w, h, strict=True)])
    geoms[::3] = [shapely.affinity.rotate(g, 25) for g in geoms[::3]]
    bounds, areas = shapely.bounds(geoms), shapely.area(geoms)
    polygonal = np.ones(n, bool)
    from chipflow.labels import _rectangles

    rect = _rectangles(geoms, bounds, areas)
    assert rect.sum() == n - len(geoms[::3])
    cut = 0
    for box in [(0, 0, 256, 256), (128, 256, 384, 512), (300.5, 10.25, 556.5, 266.25)]:
        plain = _chip_features(geoms, bounds, areas, polygonal, box, 0.3, want_geoms)
        quick = _chip_features(geoms, bounds, areas, polygonal, box, 0.3, want_geoms, rectangles=rect)
        np.testing.assert_array_equal(quick[0], plain[0])
        np.testing.assert_array_equal(quick[1], plain[1])
        np.testing.assert_allclose(quick[2], plain[2], rtol=1e-12)
        cut += int(((bounds[plain[0]] != plain[1]).any(axis=1) & rect[plain[0]]).sum())
    assert cut > 50  # rectangles cut by the chips' edges took the shortcut
