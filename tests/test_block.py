"""Block task helpers checked against their plain definitions."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

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
