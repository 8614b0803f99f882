"""Class data: read once, reprojected, validated, and moved to pixel space.

Features are kept as a shapely array in the raster's *pixel* coordinates
(column, row; origin at the raster's top-left corner), so a chip's labels are
just the features clipped to the chip's pixel box, shifted by its offset.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely

from .errors import ChipflowWarning, InputNotFoundError, InvalidParameterError, LabelError
from .sources import RasterSource

__all__ = ["ClassInfo", "LabelSet", "class_keys", "describe", "empty_labels", "read_class_data", "read_mask"]

# Distinct, readable class colours (ArcGIS-style [r, g, b]); cycled past 20 classes.
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)
_VALUE_FIELDS = ("value", "classvalue")
_NAME_FIELD = "classname"
_MAX_CLASS_VALUE = 65535


@dataclass(frozen=True)
class ClassInfo:
    """One class: its integer value (written into labels), name and display colour."""

    value: int
    name: str
    color: tuple[int, int, int]


def class_keys(classes: tuple[ClassInfo, ...]) -> list[str]:
    """Each class's name as a key of per-class counts; a name two classes share, with its value.

    >>> grey = (0, 0, 0)
    >>> class_keys((ClassInfo(1, "roof", grey), ClassInfo(2, "roof", grey), ClassInfo(3, "tree", grey)))
    ['roof (1)', 'roof (2)', 'tree']
    """
    from collections import Counter

    seen = Counter(c.name for c in classes)
    return [f"{c.name} ({c.value})" if seen[c.name] > 1 else c.name for c in classes]


def _pack_wkb(geoms: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Geometries as one WKB buffer and each one's length."""
    wkb = shapely.to_wkb(geoms)
    return b"".join(wkb.tolist()), np.fromiter(map(len, wkb), np.int64, len(wkb))


def _unpack_wkb(blob: bytes, ends: np.ndarray, which: np.ndarray) -> np.ndarray:
    """The geometries at positions ``which`` of a :func:`_pack_wkb` buffer (``ends``: its lengths' cumsum)."""
    starts, ends = np.r_[0, ends[:-1]][which], ends[which]
    parts = np.empty(len(ends), dtype=object)
    parts[:] = [blob[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
    return shapely.from_wkb(parts) if len(parts) else np.empty(0, dtype=object)


def _rectangles(geoms: np.ndarray, bounds: np.ndarray, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which geometries are exactly their bounding box, and the order of their corners.

    A rectangle is a 2D polygon of five coordinates, each a corner of its bounds,
    with the box's area. Detection labels are often such boxes: a chip clips
    them without GEOS, and they travel as their bounds plus ``corners`` (per
    vertex 2 bits: x is the right edge, y the bottom edge), from which
    :func:`_rectangle_polygons` rebuilds them coordinate for coordinate.
    """
    out = ((shapely.get_type_id(geoms) == 3) & (shapely.get_num_coordinates(geoms) == 5)
           & ~shapely.has_z(geoms))
    corners = np.zeros(len(geoms), np.uint8)
    idx = np.flatnonzero(out)
    if idx.size:
        xy = shapely.get_coordinates(geoms[idx]).reshape(-1, 5, 2)
        out[idx], corners[idx] = _box_corners(xy, bounds[idx], areas[idx])
    return out, corners


def _box_corners(xy: np.ndarray, b: np.ndarray, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For closed 5-point rings ``xy`` (k, 5, 2) with bounds ``b`` and areas: box or not, corner codes.

    Computed vertex by vertex on columns (one row of k values each): numpy's
    loops over a short last axis of 2 or 4 cost 2-3x more.
    """
    column = _columns(xy, 4)  # the fifth point is the first
    x0, y0, x1, y1 = b.T.copy()
    corner, codes = np.ones(len(b), bool), np.zeros(len(b), np.uint8)
    for i in range(4):
        x, y = column[2 * i], column[2 * i + 1]
        right, bottom = x == x1, y == y1
        corner &= (right | (x == x0)) & (bottom | (y == y0))
        codes |= (right.view(np.uint8) << 2 * i) | (bottom.view(np.uint8) << 2 * i + 1)  # 2 bits a vertex
    box_area = (x1 - x0) * (y1 - y0)
    is_box = corner & (box_area > 0) & (np.abs(areas - box_area) <= 1e-9 * np.abs(box_area))  # rtol=1e-9
    return is_box, np.where(is_box, codes, 0).astype(np.uint8)


def _columns(xy: np.ndarray, points: int) -> np.ndarray:
    """The first ``points`` vertices of rings ``xy`` (k, m, 2) as rows x0, y0, x1, y1...: (2 * points, k)."""
    return xy[:, :points].reshape(len(xy), 2 * points).T.copy()


def _strictly_convex(ring: np.ndarray) -> np.ndarray:
    """Closed 5-point rings (k, 5, 2) that are strictly convex quadrilaterals (so valid polygons).

    Each corner turns the same way, clearly: the cross product of its two edges is
    at least 1e-9 of their lengths' product. Nearly flat corners are left to GEOS.
    """
    column = _columns(ring, 5)
    x, y = column[0::2], column[1::2]
    ex, ey = x[1:] - x[:-1], y[1:] - y[:-1]  # the 4 edges
    length2 = ex * ex + ey * ey
    clear, left, right = (np.ones(len(ring), bool) for _ in range(3))
    for i in range(4):
        j = (i + 1) % 4  # the next edge
        cross = ex[i] * ey[j] - ey[i] * ex[j]
        lengths2 = length2[i] * length2[j]
        clear &= (cross * cross >= 1e-18 * lengths2) & (lengths2 > 0)
        left &= cross > 0
        right &= cross < 0
    return clear & (left | right)


def _rectangle_polygons(bounds: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """The rectangles :func:`_rectangles` found, rebuilt from their bounds and corner codes."""
    bits = (corners[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
    xy = np.empty((len(bounds), 5, 2))
    xy[:, :4, 0] = np.where(bits & 1, bounds[:, None, 2], bounds[:, None, 0])
    xy[:, :4, 1] = np.where(bits & 2, bounds[:, None, 3], bounds[:, None, 1])
    xy[:, 4] = xy[:, 0]
    return shapely.polygons(xy) if len(bounds) else np.empty(0, dtype=object)


def _ring_polygons(xy: np.ndarray, counts: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Polygons of one ring each: ring ``i`` is ``xy[starts[i]:starts[i] + counts[i]]``."""
    if not len(counts):
        return np.empty(0, dtype=object)
    gather = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
    return shapely.from_ragged_array(shapely.GeometryType.POLYGON, xy[gather],
                                     (np.r_[0, np.cumsum(counts)], np.arange(len(counts) + 1)))


def _ring_area(ring: np.ndarray) -> np.ndarray:
    """Areas of closed 5-point rings (k, 5, 2), computed exactly as GEOS does (``shapely.area``)."""
    x0, total = ring[:, 0, 0], 0.0
    for i in range(1, 4):
        total = total + (ring[:, i, 0] - x0) * (ring[:, i - 1, 1] - ring[:, i + 1, 1])
    return np.abs(total / 2.0)


class _BoundsIndex:
    """Features whose bounds meet a window, found from the bounds alone (no geometry decoded).

    Features are sorted by their top edge; a query scans those whose top is
    within the tallest one's height above the window (all but the tallest 1%,
    which are scanned on their own, so one huge feature does not widen every
    scan). Building it is a sort; a query is two binary searches and one
    vectorised test.
    """

    def __init__(self, bounds: np.ndarray):
        heights = bounds[:, 3] - bounds[:, 1]
        limit = float(np.quantile(heights, 0.99)) if len(bounds) else 0.0
        tall = heights > limit
        short = np.flatnonzero(~tall)
        self.order = short[np.argsort(bounds[short, 1])]  # any order of equal tops: queries sort
        self.sorted = np.ascontiguousarray(bounds[self.order])
        self.tall = np.flatnonzero(tall)
        self.tall_bounds = bounds[self.tall]
        self.reach = limit * (1 + 1e-9) + 1e-9  # rounding of heights never hides a feature

    def query(self, window: tuple[float, float, float, float]) -> np.ndarray:
        x0, y0, x1, y1 = window
        lo = np.searchsorted(self.sorted[:, 1], y0 - self.reach, side="left")
        hi = np.searchsorted(self.sorted[:, 1], y1, side="right")
        b = self.sorted[lo:hi]
        hits = self.order[lo:hi][(b[:, 0] <= x1) & (b[:, 2] >= x0) & (b[:, 3] >= y0)]
        t = self.tall_bounds
        tall = self.tall[(t[:, 0] <= x1) & (t[:, 2] >= x0) & (t[:, 1] <= y1) & (t[:, 3] >= y0)]
        return np.sort(np.concatenate([hits, tall]))


class LabelSet:
    """The features of one export in raster pixel space (picklable, sent once per worker).

    Attributes
    ----------
    geoms : numpy.ndarray
        shapely geometries in pixel coordinates (all of them decoded; block
        tasks decode only the ones they need, with :meth:`geometries`).
    class_index : numpy.ndarray
        int32 index into ``classes`` of each feature.
    classes : tuple of ClassInfo
        Sorted by value.
    pixel_area : float
        Map units² per pixel, to report feature areas in map units.
    mask : shapely geometry or None
        The union of ``in_mask_polygons`` in pixel coordinates: only chips it
        covers are exported.
    raster : chipflow.class_raster.ClassRaster or None
        Class data given as a classified raster (then there are no features and
        each block reads its class values from it).
    bounds, areas, polygonal, rectangles, quads : numpy.ndarray
        Derived per feature: pixel bounds, area, whether it is a (multi)polygon,
        whether it is exactly its bounding box, and whether it is a strictly
        convex quadrilateral the numpy reader shipped as coordinates (both are
        clipped without GEOS by box formats).

    On the wire, rectangles are their bounds and a corner code (no WKB), the
    one-ring polygons the numpy reader found (:func:`read_class_data`) their
    coordinates, and the other features one WKB buffer; a worker decodes a
    geometry only when a block needs it (a box format over rectangles needs
    none) and finds features by their bounds, so 200k rectangles cost a worker
    no shapely object at all; nor do convex quadrilaterals (rotated boxes,
    marked on the wire), which box formats clip with numpy.
    """

    def __init__(self, geoms: np.ndarray, class_index: np.ndarray, classes: tuple[ClassInfo, ...],
                 pixel_area: float, mask: Any = None, raster: Any = None):
        geoms = np.asarray(geoms, dtype=object)
        self.class_index, self.classes, self.pixel_area = class_index, classes, pixel_area
        self.mask, self.raster = mask, raster
        self.bounds = shapely.bounds(geoms).reshape(-1, 4)
        self.areas = shapely.area(geoms)
        self.polygonal = np.isin(shapely.get_type_id(geoms), (3, 6))
        self.rectangles, self._corners = _rectangles(geoms, self.bounds, self.areas)
        self._geoms, self._decoded = geoms, None  # None: every geometry is decoded
        self._plain = np.zeros(len(geoms), bool)  # one-ring polygons shipped as coordinates: none here
        self._plain_xy, self._plain_counts = np.zeros((0, 2)), np.zeros(0, np.int64)
        self.quads = np.zeros(len(geoms), bool)  # plain rings that are strictly convex quadrilaterals
        self._others: tuple[bytes, np.ndarray] | None = None  # WKB of the other features
        self._reset()

    @classmethod
    def _from_parts(cls, geoms: np.ndarray, derived: dict[str, np.ndarray], class_index: np.ndarray,
                    classes: tuple[ClassInfo, ...], pixel_area: float) -> LabelSet:
        """A LabelSet whose derived arrays are known; ``geoms`` holds None for rectangles and plain rings.

        Those are decoded on use, from the bounds and corner codes, or from
        ``derived["plain_xy"]`` (the plain rings' coordinates, ring after ring).
        """
        self = cls.__new__(cls)
        self.class_index, self.classes, self.pixel_area, self.mask, self.raster = (
            class_index, classes, pixel_area, None, None)
        self.bounds, self.areas, self.polygonal = derived["bounds"], derived["areas"], derived["polygonal"]
        self.rectangles, self._corners = derived["rectangles"], derived["corners"]
        self._plain, self._plain_xy = derived["plain"], derived["plain_xy"]
        self._plain_counts, self.quads = derived["plain_counts"], derived["quads"]
        self._geoms = geoms
        undecoded = self.rectangles | self._plain
        self._decoded = ~undecoded if undecoded.any() else None
        self._others = None
        self._reset()
        return self

    def _reset(self) -> None:
        self._index: _BoundsIndex | None = None
        self._ends: np.ndarray | None = None  # where each other feature's WKB ends
        self._rank: np.ndarray | None = None  # each feature's rank among the other features
        self._plain_rank: np.ndarray | None = None  # ... among the plain rings
        self._plain_starts: np.ndarray | None = None  # where each plain ring starts in _plain_xy
        self._fingerprint: tuple[str, str] | None = None  # (the classes it was for, the digest)
        self._lock = threading.Lock()

    def _wire(self) -> tuple[bytes, np.ndarray]:
        """The other features (neither rectangles nor plain rings) as one WKB buffer and their lengths.

        Made once: hashed and pickled.
        """
        if self._others is None:
            self._others = _pack_wkb(self.geometries(np.flatnonzero(~self.rectangles & ~self._plain)))
        return self._others

    def __getstate__(self) -> dict[str, Any]:
        # Shipped: derived arrays (cheaper to ship than to recompute on every
        # worker), rectangles as bounds + corner codes, plain rings as coordinates,
        # the rest as one WKB buffer (10x faster both ways than pickling shapely
        # objects one by one). The index is rebuilt lazily once per worker.
        return {"class_index": self.class_index, "classes": self.classes, "pixel_area": self.pixel_area,
                "mask": self.mask, "raster": self.raster, "bounds": self.bounds, "areas": self.areas,
                "polygonal": self.polygonal, "rectangles": self.rectangles, "_corners": self._corners,
                "_plain": self._plain, "_plain_xy": self._plain_xy, "_plain_counts": self._plain_counts,
                "quads": self.quads,
                "_others": self._wire()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._geoms = np.empty(len(self.bounds), dtype=object)
        self._decoded = np.zeros(len(self.bounds), bool)
        self._reset()
        if self.mask is not None:
            shapely.prepare(self.mask)

    def __len__(self) -> int:
        return len(self.bounds)

    @property
    def geoms(self) -> np.ndarray:
        """Every feature's geometry (decoded on first use after unpickling)."""
        return self.geometries(slice(None))

    def geometries(self, which: Any) -> np.ndarray:
        """The geometries of features ``which`` (an index array, mask or slice), decoding only those."""
        if self._decoded is not None:
            with self._lock:
                todo = np.asarray(which) if not isinstance(which, slice) else np.arange(len(self))[which]
                if todo.dtype == bool:
                    todo = np.flatnonzero(todo)
                todo = np.unique(todo[~self._decoded[todo]])
                if todo.size:
                    rect, plain = self.rectangles[todo], self._plain[todo]
                    boxes = todo[rect]
                    self._geoms[boxes] = _rectangle_polygons(self.bounds[boxes], self._corners[boxes])
                    rings = todo[plain]
                    if rings.size:
                        r, starts = self._plain_slots(rings)
                        self._geoms[rings] = _ring_polygons(self._plain_xy, self._plain_counts[r], starts)
                    others = todo[~rect & ~plain]
                    if others.size:
                        if self._ends is None:  # where each other feature's WKB ends; its rank
                            self._ends = np.cumsum(self._others[1])
                            self._rank = np.cumsum(~self.rectangles & ~self._plain) - 1
                        self._geoms[others] = _unpack_wkb(self._others[0], self._ends, self._rank[others])
                    self._decoded[todo] = True
                    if self._decoded.all():
                        self._decoded = None
        return self._geoms[which]

    def _plain_slots(self, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Plain rings ``which``: their rank among the plain rings, and where each starts in ``_plain_xy``."""
        if self._plain_rank is None:
            self._plain_rank = np.cumsum(self._plain) - 1
            self._plain_starts = np.cumsum(self._plain_counts) - self._plain_counts
        rank = self._plain_rank[which]
        return rank, self._plain_starts[rank]

    def quad_vertices(self, which: np.ndarray) -> np.ndarray:
        """The (k, 4, 2) vertices of features ``which``, each a strictly convex quadrilateral.

        Those the numpy reader marked (``quads``: rotated boxes, mostly), which
        box formats clip with numpy (:func:`chipflow._clip.clip_convex`) without
        decoding them.
        """
        _, starts = self._plain_slots(np.asarray(which))
        return self._plain_xy[starts[:, None] + np.arange(4)]

    def fingerprint(self) -> str:
        """sha256 of the features as chipflow uses them (pixel-space geometry and class).

        Computed once for the run file and the partitions' cache keys alike (again
        only if the classes were renamed since).
        """
        classes = repr(self.classes)
        if self._fingerprint is not None and self._fingerprint[0] == classes:
            return self._fingerprint[1]
        import hashlib

        digest = hashlib.sha256()
        for array in (self.bounds, self.rectangles, self._corners, self._plain, self._plain_xy,
                      self._plain_counts):
            digest.update(np.ascontiguousarray(array))  # hashed in place, not copied
        digest.update(self._wire()[0])
        digest.update(np.asarray(self.values, "<i8").tobytes())
        digest.update(classes.encode())
        self._fingerprint = (classes, digest.hexdigest())
        return self._fingerprint[1]

    @property
    def values(self) -> np.ndarray:
        """Class value of each feature."""
        return np.array([c.value for c in self.classes], dtype=np.int64)[self.class_index]

    def query(self, window: tuple[float, float, float, float]) -> np.ndarray:
        """Indices (ascending) of the features whose bounds meet ``(x0, y0, x1, y1)`` (edges included)."""
        if self._index is None:
            with self._lock:
                if self._index is None:
                    self._index = _BoundsIndex(self.bounds)
        return self._index.query(window)


#: Files (and FileGDB folders) holding several layers, ArcGIS's workspaces: a layer is ``<file>/<layer>``.
_WORKSPACES = (".gpkg", ".gdb", ".sqlite")


def split_layer(path: str) -> tuple[str, str | None]:
    """``project.gpkg/buildings`` → ``("project.gpkg", "buildings")``; any other path → ``(path, None)``.

    As ArcGIS names a feature class: ``project.gdb/buildings``, ``project.gpkg/main.buildings``.
    Only split when ``path`` itself does not exist and its folder is a workspace.

    >>> split_layer("s3://bucket/project.gpkg/buildings")
    ('s3://bucket/project.gpkg', 'buildings')
    >>> split_layer("buildings.geojson")
    ('buildings.geojson', None)
    """
    remote = "://" in path
    if remote or not os.path.exists(path):
        head, name = path.rpartition("/")[::2] if remote else os.path.split(path)  # Windows: backslashes too
        if name and head.lower().endswith(_WORKSPACES) and (remote or os.path.exists(head)):
            return head, name
    return path, None


def _locate_vector(data: Any, parameter: str) -> tuple[str, str | None] | None:
    """A vector path as its file and layer (:func:`split_layer`), the layer checked; None for a frame.

    Raises
    ------
    InvalidParameterError
        A workspace of several layers named without one.
    InputNotFoundError
        A layer it does not hold, or a workspace that cannot be read.
    """
    if not isinstance(data, str | os.PathLike):
        return None
    path = os.fspath(data)
    dataset, layer = split_layer(path)
    if not dataset.lower().endswith(_WORKSPACES) or ("://" not in dataset and not os.path.exists(dataset)):
        return dataset, layer  # one layer a file, or missing: reading it says so
    import pyogrio

    try:  # the layers with geometries: not QGIS's layer_styles and other attribute tables
        layers = [str(name) for name, kind in pyogrio.list_layers(dataset) if kind is not None]
    except Exception as exc:
        raise InputNotFoundError(parameter, path, f"cannot be read as vector data ({exc})") from None
    shown = ", ".join(map(repr, layers[:10])) + (", ..." if len(layers) > 10 else "")
    if layer is None:
        if len(layers) > 1:
            raise InvalidParameterError(parameter, path, f"holds {len(layers)} layers ({shown}); name one, "
                                                         f"as {dataset + '/' + layers[0]!r}")
        if not layers:
            raise LabelError(f"{parameter}={path!r} holds no layer with geometries")
        return dataset, layers[0]
    if layer not in layers and layer.lower().startswith("main.") and layer[5:] in layers:
        layer = layer[5:]  # ArcGIS calls a GeoPackage's feature classes main.<name>
    if layer not in layers:
        raise InputNotFoundError(parameter, path, f"{dataset!r} has no layer {layer!r} with geometries; "
                                                  f"its layers: {shown or 'none'}")
    return dataset, layer


@contextlib.contextmanager
def _m_dropped() -> Iterator[None]:
    """Without pyogrio's warning that it drops M values: chipflow drops them, and Z (:func:`_to_pixels`).

    Nor GDAL's that it read a polygon ring that is not closed: GEOS refuses
    that geometry next, and :func:`_geometry_errors` says so, naming the data.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Measured \(M\) geometry types are not supported")
        warnings.filterwarnings("ignore", r"Non closed ring detected")
        yield


@contextlib.contextmanager
def _geometry_errors(data: Any, parameter: str) -> Iterator[None]:
    """GEOS's refusal of a geometry (a ring not closed, coordinates it cannot repair) as a LabelError."""
    try:
        yield
    except shapely.errors.GEOSException as error:
        raise LabelError(f"{parameter}={describe(data)} holds a geometry that cannot be read or repaired "
                         f"({error}); fix it (QGIS: Fix Geometries; geopandas: make_valid) or drop it"
                         ) from None


def _check_degrees(series: Any, data: Any, parameter: str) -> None:
    """Refuse coordinates beyond longitude/latitude in a geographic CRS (GeoJSON is always read as WGS 84)."""
    if series.crs is None or not series.crs.is_geographic or not len(series):
        return
    x0, y0, x1, y1 = series.total_bounds
    if min(x0, y0) >= -360 and x1 <= 360 and y1 <= 90 + 1e-9 and y0 >= -90 - 1e-9 or np.isnan(x0):
        return
    code = series.crs.to_epsg()
    raise LabelError(
        f"{parameter}={describe(data)} is in {f'EPSG:{code}' if code else series.crs.name} (degrees), but "
        f"its coordinates reach ({x0:.6g}, {y0:.6g}, {x1:.6g}, {y1:.6g}), outside longitude/latitude: "
        "projected coordinates in a file read as WGS 84? (a GeoJSON is); give it its CRS "
        "(`gdf.set_crs(..., allow_override=True)`, or write it with one)")


def _warn_collapsed(count: int, data: Any) -> None:
    """Say how many invalid features collapsed to nothing when repaired (they are dropped)."""
    if count:
        warnings.warn(f"in_class_data={describe(data)}: {count} feature{'s' if count > 1 else ''} "
                      "collapsed to nothing when repaired (no area: repeated or collinear points) and "
                      f"{'were' if count > 1 else 'was'} dropped", ChipflowWarning, stacklevel=2)


def _read_frame(data: Any, parameter: str = "in_class_data",
                located: tuple[str, str | None] | None = None) -> Any:
    """A GeoDataFrame as given, or read from its file (``located``: :func:`_locate_vector`'s answer)."""
    import geopandas as gpd

    if isinstance(data, gpd.GeoDataFrame):
        return data
    if not isinstance(data, str | os.PathLike):
        shown = f"<{type(data).__name__} of {len(data)} rows>" if hasattr(data, "columns") else repr(data)
        raise LabelError(f"{parameter}={shown} must be a vector file path or a GeoDataFrame")
    path, layer = located or _locate_vector(data, parameter)
    if "://" not in path and not os.path.exists(path):
        raise InputNotFoundError(parameter, os.fspath(data))
    try:
        if path.lower().endswith((".parquet", ".geoparquet")):
            from ._cloud import vector_input

            return gpd.read_parquet(vector_input(path) if "://" in path else path)
        with _m_dropped():
            frame = gpd.read_file(path, layer=layer, engine="pyogrio", use_arrow=True)
    except shapely.errors.GEOSException:  # the file is read; a geometry in it is not (_geometry_errors)
        raise
    except Exception as exc:  # pyogrio/arrow raise many types for unreadable files
        raise InputNotFoundError(parameter, os.fspath(data),
                                 f"cannot be read as vector data ({exc})") from None
    if not isinstance(frame, gpd.GeoDataFrame):  # a table (CSV, an attribute table): no geometry column
        raise LabelError(f"{parameter}={os.fspath(data)!r} has no geometries (a table with the fields "
                         f"{list(frame.columns)[:10]})")
    return frame


def _repair(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Invalid geometries made valid (keeping their dimension), and which were."""
    invalid = ~shapely.is_valid(geoms) & ~shapely.is_missing(geoms)
    if invalid.any():
        geoms = geoms.copy()
        geoms[invalid] = shapely.make_valid(geoms[invalid], method="structure", keep_collapsed=False)
    return geoms, invalid


def _collapsed(repaired: np.ndarray, invalid: np.ndarray) -> np.ndarray:
    """Which of the geometries :func:`_repair` made empty (invalid ones: a ring of no area)."""
    return invalid & shapely.is_empty(repaired)


def read_mask(in_mask_polygons: Any, source: RasterSource) -> Any:
    """The union of the mask polygons in raster pixel space (prepared), or None.

    Raises
    ------
    InputNotFoundError, LabelError
        Unreadable, without CRS, not polygons, or outside the raster.
    """
    if in_mask_polygons is None:
        return None
    with _geometry_errors(in_mask_polygons, "in_mask_polygons"):
        frame = _read_frame(in_mask_polygons, "in_mask_polygons")
        if frame.crs is None:
            raise LabelError(f"in_mask_polygons={describe(in_mask_polygons)} has no coordinate "
                             "reference system; set one")
        _check_degrees(frame.geometry, in_mask_polygons, "in_mask_polygons")
        geoms = _repair(_to_crs(frame.geometry, source.crs_wkt).to_numpy())[0]
    geoms = geoms[~(shapely.is_missing(geoms) | shapely.is_empty(geoms))]
    if len(geoms) == 0 or not np.isin(shapely.get_type_id(geoms), (3, 6)).all():
        raise LabelError(f"in_mask_polygons={describe(in_mask_polygons)} must hold polygons")
    mask = shapely.union_all(_to_pixels(geoms, source))
    if not shapely.intersects(mask, shapely.box(0, 0, source.width, source.height)):
        raise LabelError(f"in_mask_polygons={describe(in_mask_polygons)} does not overlap the raster "
                         f"({source.path!r}): no chip could be exported")
    shapely.prepare(mask)
    return mask


def empty_labels(source: RasterSource) -> LabelSet:
    """No class data (Export_Tiles): no features, no classes."""
    return LabelSet(geoms=np.array([], dtype=object), class_index=np.zeros(0, np.int32), classes=(),
                    pixel_area=_pixel_area(source))


def _find_field(columns: list[str], wanted: tuple[str, ...]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[w] for w in wanted if w in lower), None)


def _fields(frame: Any) -> list[str]:
    """A frame's attribute columns (a GeoDataFrame's, or a plain one's read without its geometry)."""
    import geopandas as gpd

    geometry = frame.geometry.name if isinstance(frame, gpd.GeoDataFrame) else None
    return [c for c in frame.columns if c != geometry]


def _class_values(frame: Any, class_value_field: str | None) -> tuple[np.ndarray, str | None]:
    columns = _fields(frame)
    if class_value_field is not None:
        name = _find_field(columns, (class_value_field.lower(),))
        if name is None:
            raise LabelError(
                f"class_value_field={class_value_field!r} is not a field of in_class_data; "
                f"its fields are {columns}"
            )
    else:
        name = _find_field(columns, _VALUE_FIELDS)
        if name is None:
            return np.ones(len(frame), dtype=np.int64), None
    column = frame[name]
    import pandas as pd

    # numbers as they are (no Python object per row), text that reads as one as numbers, the rest NaN
    numbers = column if column.dtype.kind in "iuf" else pd.to_numeric(column, errors="coerce")
    numeric = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    whole = np.isfinite(numeric) & (numeric == np.round(numeric))
    if not whole.all():
        first = int(np.argmin(whole))  # the first that is not
        missing = column.isna().to_numpy()
        if missing[first]:
            raise LabelError(
                f"class_value_field={name!r} holds no value in {int(missing.sum())} of {len(column)} "
                f"features (the first: row {first}); give every feature a class value, or drop those "
                "features")
        example = column.iloc[first]
        example = example.item() if isinstance(example, np.generic) else example
        raise LabelError(
            f"class_value_field={name!r} must hold whole numbers, but it is {column.dtype} "
            f"(e.g. {example!r}); fields: "
            + ", ".join(f"{c} ({frame[c].dtype})" for c in columns)
        )
    out_of_range = (numeric < 1) | (numeric > _MAX_CLASS_VALUE)  # before the cast: 1e20 does not fit
    if out_of_range.any():
        example = column.iloc[int(np.argmax(out_of_range))]
        example = example.item() if isinstance(example, np.generic) else example
        raise LabelError(
            f"class_value_field={name!r} holds {example!r}: class values must be 1..65535 "
            "(0 is reserved for background/NoData)"
        )
    return numeric.astype(np.int64), name


def _class_names(frame: Any, values: np.ndarray) -> dict[int, str]:
    """Each class value's first non-blank ``classname`` (``values``: as :func:`_class_values` gives them)."""
    columns = _fields(frame)
    field_name = _find_field(columns, (_NAME_FIELD,))
    if field_name is None:
        return {}
    column = frame[field_name]
    given = column.notna().to_numpy()
    rows, of = np.flatnonzero(given), values[given]
    # each value's first row: the last write of a reversed scatter wins (values are 1..65535)
    at = np.full(_MAX_CLASS_VALUE + 1, -1, np.int64)
    at[of[::-1]] = np.arange(len(of))[::-1]
    uniq = np.flatnonzero(at >= 0)
    first = at[uniq]  # usually each value's first name is not blank
    text = column.iloc[rows[first]].astype(str).str.strip().to_numpy()
    if (text != "").all():
        return dict(zip(uniq.tolist(), text.tolist(), strict=True))
    named = column[given].astype(str).str.strip().to_numpy()
    nonblank = named != ""
    first = dict(zip(values[given][nonblank].tolist()[::-1], named[nonblank].tolist()[::-1], strict=True))
    return {v: first[v] for v in sorted(first)}  # each value's first name


def _to_pixels(geoms: np.ndarray, source: RasterSource) -> np.ndarray:
    """Map coordinates (the raster's CRS) → the source grid's pixel coordinates.

    Through the affine transform, or in pixel space through the raster's GCPs or
    RPCs (GDAL's transformers) when it has them; a raster without any
    georeferencing takes coordinates as pixels already. Z and M values are
    dropped (shapely's transform would keep them as NaN).
    """
    if shapely.has_z(geoms).any() or shapely.has_m(geoms).any():
        geoms = shapely.force_2d(geoms)
    if source.pixel_space and (source.gcps or source.rpcs):
        from rasterio.control import GroundControlPoint
        from rasterio.rpc import RPC
        from rasterio.transform import GCPTransformer, RPCTransformer

        if source.gcps:
            transformer: Any = GCPTransformer([GroundControlPoint(row=r, col=c, x=x, y=y)
                                               for c, r, x, y in source.gcps])
        else:
            transformer = RPCTransformer(RPC(**source.rpcs))

        def apply(xy: np.ndarray) -> np.ndarray:
            rows, cols = transformer.rowcol(xy[:, 0], xy[:, 1], op=lambda v: v)
            return _snap(np.column_stack([np.asarray(cols, float), np.asarray(rows, float)]))

        with transformer:
            return shapely.transform(geoms, apply)
    return shapely.transform(geoms, lambda xy: _map_to_pixels(xy, source))


#: Pixel coordinates are rounded to multiples of this (about a millionth of a pixel).
SNAP = 2.0**-20


def _snap(xy: np.ndarray) -> np.ndarray:
    """Round pixel coordinates to multiples of :data:`SNAP`, in place (exact: a power of two).

    Map → pixel arithmetic leaves noise of about 1e-8 px: a building whose edge
    lies on a chip edge in map units (row 192) came out at row 192.0000000037,
    and overlapped the next chip by that much, which got a 0.00-high box. A
    millionth of a pixel is far below any label's precision and far above that
    noise.
    """
    xy *= 1 / SNAP
    np.rint(xy, out=xy)
    xy *= SNAP
    return xy


def _map_to_pixels(xy: np.ndarray, source: RasterSource) -> np.ndarray:
    """Map coordinates ``(n, 2)`` → pixel coordinates through the raster's inverse affine (snapped)."""
    inv = ~source.affine
    if inv.b == 0 and inv.d == 0:  # north up: each axis on its own (the same numbers, fewer passes)
        out = np.empty(xy.shape)
        for axis, scale, shift in ((0, inv.a, inv.c), (1, inv.e, inv.f)):  # columns: see _box_corners
            np.multiply(xy[:, axis], scale, out=out[:, axis])
            out[:, axis] += shift
        return _snap(out)
    x, y = xy[:, 0], xy[:, 1]
    return _snap(np.column_stack([inv.a * x + inv.b * y + inv.c, inv.d * x + inv.e * y + inv.f]))


def _pixel_area(source: RasterSource) -> float:
    """Map units² per pixel of ``source``."""
    a, b, _, d, e, _ = source.transform
    return abs(a * e - b * d)


def read_class_data(
    in_class_data: Any, *, class_value_field: str | None, source: RasterSource,
    buffer_radius: float = 0.0, require_overlap: bool = True,
) -> LabelSet:
    """Read the class data, pick its class field, reproject and repair it.

    Parameters
    ----------
    in_class_data : str or geopandas.GeoDataFrame
        A vector file (GeoPackage, GeoJSON, Shapefile, GeoParquet) or a frame.
    class_value_field : str, optional
        The integer class field; without it a ``value`` or ``classvalue`` field
        (any case) is used, else every feature is class 1.
    source : RasterSource
        The raster whose CRS and pixel grid the features are moved to.
    buffer_radius : float
        Buffer every feature by this distance in the class data's CRS units
        first (points become circular samples).

    Raises
    ------
    InputNotFoundError, LabelError
        Unreadable data, no CRS, a bad class field, or no feature over the raster.
    """
    from .class_raster import is_class_raster, open_class_raster

    if is_class_raster(in_class_data):
        raster, raster_names, class_values = open_class_raster(os.fspath(in_class_data), source)
        labels = empty_labels(source)
        labels.classes = _classes(class_values, raster_names)
        labels.raster = raster
        return labels
    located = _locate_vector(in_class_data, "in_class_data")
    with _geometry_errors(in_class_data, "in_class_data"):
        fast = _read_polygons_fast(in_class_data, located, class_value_field=class_value_field, source=source,
                                   buffer_radius=buffer_radius, require_overlap=require_overlap)
        if fast is not None:
            return fast
        return _read_vector(in_class_data, located, class_value_field=class_value_field, source=source,
                            buffer_radius=buffer_radius, require_overlap=require_overlap)


def _read_vector(in_class_data: Any, located: tuple[str, str | None] | None, *, class_value_field: str | None,
                 source: RasterSource, buffer_radius: float, require_overlap: bool) -> LabelSet:
    """:func:`read_class_data`'s general path: any vector data, through a GeoDataFrame."""
    frame = _read_frame(in_class_data, "in_class_data", located)
    if frame.crs is None and source.crs_wkt:
        raise LabelError(
            f"in_class_data={describe(in_class_data)} has no coordinate reference system; "
            "set one (e.g. `gdf.set_crs('EPSG:4326')`, or a .prj next to a shapefile)"
        )
    values, _ = _class_values(frame, class_value_field)
    names = _class_names(frame, values)
    series = frame.geometry
    reprojected = frame.crs is not None and bool(source.crs_wkt)
    if reprojected:
        _check_degrees(series, in_class_data, "in_class_data")
    if buffer_radius > 0:
        series = series.buffer(buffer_radius)
    if reprojected:
        series = _to_crs(series, source.crs_wkt)
    geoms, invalid = _repair(series.to_numpy())
    _warn_collapsed(int(_collapsed(geoms, invalid).sum()), in_class_data)
    keep = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    geoms, values = geoms[keep], values[keep]
    _check_single_family(shapely.get_type_id(geoms), in_class_data)
    class_index, classes = _class_index(values, names)
    labels = LabelSet(geoms=_to_pixels(np.asarray(geoms), source), class_index=class_index, classes=classes,
                      pixel_area=_pixel_area(source))
    if require_overlap:
        _check_overlap(labels, source, in_class_data)
    return labels


@contextlib.contextmanager
def _arrow_vector(path: str, layer: str | None = None) -> Iterator[tuple[Any, str, Any] | None]:
    """A local vector file (its ``layer``, else its only one) as Arrow batches, its WKB column, its CRS.

    Yields a ``pyarrow.RecordBatchReader`` of at most ``_BATCH_ROWS`` rows a
    batch (read as it is iterated, while the file stays open), or None when
    the geometry is not WKB. GeoParquet through pyarrow (its ``geo`` metadata:
    the primary column, WKB encoding; a missing ``crs`` means OGC:CRS84, as the
    specification says), anything else through pyogrio.
    """
    if path.lower().endswith((".parquet", ".geoparquet")):
        import json

        import pyarrow as pa
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as file:
            schema = file.schema_arrow
            geo = json.loads((schema.metadata or {}).get(b"geo", b"null")) or {}
            primary = geo.get("primary_column")
            info = geo["columns"].get(primary, {}) if primary in schema.names else {}
            if not info or str(info.get("encoding", "WKB")).upper() != "WKB":
                yield None
                return
            crs = info.get("crs", "OGC:CRS84")
            batches = pa.RecordBatchReader.from_batches(schema, file.iter_batches(batch_size=_BATCH_ROWS))
            yield batches, primary, json.dumps(crs) if isinstance(crs, dict) else crs
        return
    import pyogrio

    with pyogrio.raw.open_arrow(path, layer=layer, batch_size=_BATCH_ROWS, use_pyarrow=True) as (
            meta, batches):
        geometry = meta["geometry_name"] or "wkb_geometry"
        yield (batches, geometry, meta["crs"]) if geometry in batches.schema.names else None


def _wkb_features(wkb: Any, source: RasterSource) -> dict[str, np.ndarray]:
    """A WKB column (pyarrow) as features in ``source``'s pixel space, as :func:`_read_polygons_fast` keeps.

    Per row: ``geoms`` (None for rectangles and plain rings), ``present``,
    ``collapsed`` (invalid, and empty once repaired), ``type_ids`` and the
    derived arrays of :meth:`LabelSet._from_parts`; and the plain rings'
    coordinates ``plain_xy`` with their ``plain_counts``.
    """
    from ._wkb import simple_polygons

    parsed = simple_polygons(wkb)
    n = len(wkb)
    geoms = np.empty(n, dtype=object)
    bounds, areas = np.zeros((n, 4)), np.zeros(n)
    polygonal, rectangles, corners = np.ones(n, bool), np.zeros(n, bool), np.zeros(n, np.uint8)
    present, changed, collapsed = np.ones(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    type_ids = np.full(n, 3, np.int32)
    # plain polygons: pixel coordinates (as _to_pixels moves them), bounds, rectangles
    xy = _map_to_pixels(parsed.coords, source)
    rows, counts = np.flatnonzero(parsed.simple), parsed.counts
    first = np.cumsum(counts) - counts
    same = bool(rows.size) and bool((counts == counts[0]).all())  # one point count: a table of rings
    if same and len(rows) == n:
        ring = xy.reshape(n, counts[0], 2)
        low, high = ring[:, 0].copy(), ring[:, 0].copy()
        for i in range(1, counts[0] - 1):  # the last point is the first; point by point beats a reduce here
            np.minimum(low, ring[:, i], out=low)
            np.maximum(high, ring[:, i], out=high)
        bounds[:, :2], bounds[:, 2:] = low, high
    elif rows.size:
        low, high = np.minimum.reduceat(xy, first), np.maximum.reduceat(xy, first)
        bounds[rows] = np.column_stack([low, high])
    five = np.flatnonzero((counts == 5) & ~parsed.multi)  # a one-part MultiPolygon is no rectangle
    convex = np.zeros(len(rows), bool)
    if five.size:
        ring = xy.reshape(-1, 5, 2) if five.size == len(rows) else xy[first[five, None] + np.arange(5)]
        ring_areas = _ring_area(ring)  # shapely.area's, to the bit
        at = slice(None) if five.size == n else rows[five]  # every row: a slice, no gathers
        rectangles[at], corners[at] = _box_corners(ring, bounds[at], ring_areas)
        other = ~rectangles[at]  # rectangles are valid already
        convex[other if five.size == n else five[other]] = _strictly_convex(ring[other])
        areas[at] = ring_areas
    # other one-ring polygons travel as their coordinates ("plain"): valid without GEOS's check when
    # strictly convex quadrilaterals, else checked and, when invalid, repaired into shapely objects
    # like the one-part MultiPolygons
    ring_of = convex.copy()  # per simple row: shipped as a plain ring
    for multi in (False, True):
        check = ~rectangles[rows] & (parsed.multi == multi) & ~convex
        if check.any():
            parts = np.arange(check.sum() + 1)
            ring_offsets = np.concatenate([[0], np.cumsum(counts[check])])
            kind = shapely.GeometryType.MULTIPOLYGON if multi else shapely.GeometryType.POLYGON
            made = shapely.from_ragged_array(kind, xy[np.repeat(check, counts)],
                                             (ring_offsets, parts, parts) if multi else (ring_offsets, parts))
            made, repaired = _repair(made)
            collapsed[rows[check]] = _collapsed(made, repaired)
            areas[rows[check]] = shapely.area(made)
            changed[rows[check]] = repaired  # measured again below
            if multi:
                geoms[rows[check]] = made
            else:  # valid ones travel as coordinates, repaired ones as shapely objects
                geoms[rows[check][repaired]] = made[repaired]
                ring_of[np.flatnonzero(check)[~repaired]] = True
    plain, quads = np.zeros(n, bool), np.zeros(n, bool)
    plain[rows[ring_of]] = True
    quads[rows[convex]] = True
    others = np.flatnonzero(~parsed.simple)
    if others.size:  # holes, multipolygons, points, lines...: shapely's, as the general path does
        raw = shapely.from_wkb(np.asarray(wkb.take(others).to_numpy(zero_copy_only=False), dtype=object))
        fixed, repaired = _repair(raw)
        collapsed[others] = _collapsed(fixed, repaired)
        geoms[others] = _to_pixels(fixed, source)
    general = np.flatnonzero(~parsed.simple | changed)
    if general.size:
        g = geoms[general]
        present[general] = ~(shapely.is_missing(g) | shapely.is_empty(g))
        type_ids[general] = shapely.get_type_id(g)
        bounds[general] = shapely.bounds(g).reshape(-1, 4)
        areas[general] = shapely.area(g)
        polygonal[general] = np.isin(type_ids[general], (3, 6))
        rect, code = _rectangles(g, bounds[general], areas[general])  # repaired ones, or from shapely
        rectangles[general], corners[general] = rect, code
        geoms[general[rect]] = None
    return {"geoms": geoms, "present": present, "collapsed": collapsed, "type_ids": type_ids,
            "bounds": bounds, "areas": areas,
            "polygonal": polygonal, "rectangles": rectangles, "corners": corners, "plain": plain,
            "quads": quads, "plain_counts": counts[ring_of],
            "plain_xy": xy.reshape(len(rows), counts[0], 2)[ring_of].reshape(-1, 2) if same  # whole rings
            else xy[np.repeat(ring_of, counts)]}


_BATCH_ROWS = 25_000  # rows per batch when reading class data with numpy


class _Unreadable(Exception):
    """The file failed part way through a fast read (the general path then reads it, or says why not)."""


def _read(batches: Any) -> Iterator[Any]:
    """The batches of a reader, its errors raised as :class:`_Unreadable` (not the parsing's)."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as error:
            raise _Unreadable(str(error)) from error
        yield batch


def _read_features(batches: Any, geometry: str, source: RasterSource) -> tuple[Any, dict[str, np.ndarray]]:
    """The attributes (pandas) and :func:`_wkb_features` of a stream of record batches, concatenated.

    Each batch is parsed on a thread while the next is read (numpy and GEOS
    release the GIL; reading is serial), the last one on this thread. Planning
    is the client's serial part of an export, while the workers wait: planning
    200k features took 0.25 s with the whole file read, then parsed on one
    thread; 0.11 s parsed in row ranges on two; 0.10 s (GeoPackage) and 0.095 s
    (GeoParquet) streamed.
    """
    import pyarrow as pa

    attributes, parts, wkb = [], [], None
    with ThreadPoolExecutor(min(os.cpu_count() or 1, 4)) as pool:  # threads start with a second batch
        for batch in _read(batches):
            if wkb is not None:
                parts.append(pool.submit(_wkb_features, wkb, source))
            attributes.append(batch.drop_columns([geometry]))
            wkb = batch.column(geometry)
        if wkb is None:  # no rows
            wkb = pa.array([], batches.schema.field(geometry).type)
        last = _wkb_features(wkb, source)
        parts = [part.result() for part in parts] + [last]
    table = pa.Table.from_batches(attributes, batches.schema.remove(batches.schema.get_field_index(geometry)))
    features = parts[0] if len(parts) == 1 else {name: np.concatenate([part[name] for part in parts])
                                                 for name in parts[0]}
    return table.to_pandas(), features


def _read_polygons_fast(
    in_class_data: Any, located: tuple[str, str | None] | None, *, class_value_field: str | None,
    source: RasterSource, buffer_radius: float, require_overlap: bool,
) -> LabelSet | None:
    """:func:`read_class_data` of a local vector file in the raster's CRS, plain polygons parsed by numpy.

    Single-ring 2D polygons (most building footprints) go from the file's WKB
    to pixel-space coordinates, bounds and areas without a shapely object each
    (:mod:`chipflow._wkb`), and travel as coordinates. Rectangles and strictly
    convex quadrilaterals (valid as they are) never become one on the client;
    the other polygons do, once, for GEOS's validity check and repair. Any
    other feature takes the general path. The result equals the general path's,
    except that an invalid polygon is repaired in pixel space instead of map
    space. None when the input is not such a file (the general path then
    reads it, and reports what is wrong with it).
    """
    if located is None or buffer_radius > 0 or (source.pixel_space and (source.gcps or source.rpcs)):
        return None
    path, layer = located
    if "://" in path or not os.path.exists(path):
        return None
    import pyproj

    with contextlib.ExitStack() as stack:
        stack.enter_context(_m_dropped())
        try:
            found = stack.enter_context(_arrow_vector(path, layer))
            if found is None:
                return None
            batches, geometry, crs = found
            if crs is None or not source.crs_wkt or not pyproj.CRS.from_user_input(crs).equals(
                    pyproj.CRS.from_user_input(source.crs_wkt)):
                return None  # no CRS, or another one: the general path refuses or reprojects
        except Exception:  # unreadable here: the general path reads it, or says why it cannot
            return None
        try:
            attributes, f = _read_features(batches, geometry, source)
        except _Unreadable:
            return None
    values, _ = _class_values(attributes, class_value_field)
    names = _class_names(attributes, values)
    _warn_collapsed(int(f["collapsed"].sum()), in_class_data)
    keep = slice(None) if f["present"].all() else np.flatnonzero(f["present"])  # all: no copies
    _check_single_family(f["type_ids"][keep], in_class_data)
    derived = {name: f[name][keep] for name in ("bounds", "areas", "polygonal", "rectangles", "corners",
                                                 "plain", "quads")}
    derived.update(plain_xy=f["plain_xy"], plain_counts=f["plain_counts"])  # plain rings are all present
    labels = LabelSet._from_parts(f["geoms"][keep], derived, *_class_index(values[keep], names),
                                  _pixel_area(source))
    if require_overlap:
        _check_overlap(labels, source, in_class_data)
    return labels


def _class_index(values: np.ndarray, names: dict[int, str]) -> tuple[np.ndarray, tuple[ClassInfo, ...]]:
    """Each feature's index into its classes (int32), and the classes: the values present, sorted.

    Values are 1..65535 (:func:`_class_values`): a table of which are present ranks
    them, 9x faster than sorting 200k values.
    """
    present = np.zeros(_MAX_CLASS_VALUE + 1, bool)
    present[values] = True
    rank = np.cumsum(present, dtype=np.int32) - 1
    return rank[values], _classes(np.flatnonzero(present), names)


def _classes(values: np.ndarray, names: dict[int, str]) -> tuple[ClassInfo, ...]:
    """Classes sorted by value, named from ``names`` (else the value), coloured from the palette."""
    return tuple(ClassInfo(int(v), names.get(int(v), str(int(v))), _PALETTE[i % len(_PALETTE)])
                 for i, v in enumerate(values))


def _to_crs(series: Any, crs_wkt: str) -> Any:
    """``series`` in ``crs_wkt``; untouched when already in it.

    A no-op reprojection still moves every coordinate: 0.4 s for 200k features.
    """
    import pyproj

    target = pyproj.CRS.from_user_input(crs_wkt)
    return series if pyproj.CRS.from_user_input(series.crs).equals(target) else series.to_crs(target)


def describe(in_class_data: Any) -> str:
    """How error messages name the class data: its path, or the kind of in-memory object."""
    if isinstance(in_class_data, str | os.PathLike):
        return repr(os.fspath(in_class_data))
    return f"<{type(in_class_data).__name__} of {len(in_class_data)} features>"


_FAMILIES = {0: "point", 4: "point", 1: "line", 2: "line", 5: "line", 3: "polygon", 6: "polygon",
             7: "geometry collection"}


def _check_single_family(type_ids: np.ndarray, in_class_data: Any) -> None:
    kinds, counts = np.unique(type_ids, return_counts=True)
    per_family: dict[str, int] = {}
    for kind, count in zip(kinds.tolist(), counts.tolist(), strict=True):
        per_family[_FAMILIES[kind]] = per_family.get(_FAMILIES[kind], 0) + count
    families, counts = np.array(sorted(per_family)), np.array([per_family[f] for f in sorted(per_family)])
    if len(families) > 1 or "geometry collection" in families:
        found = ", ".join(f"{n} {f}s" for f, n in zip(families.tolist(), counts.tolist(), strict=True))
        raise LabelError(
            f"in_class_data={describe(in_class_data)} mixes geometry types ({found}); "
            "use one type per input: polygons, or points/lines (with a buffer)"
        )


def _check_overlap(labels: LabelSet, source: RasterSource, in_class_data: Any) -> None:
    extent = shapely.box(0, 0, source.width, source.height)
    if len(labels) == 0:
        raise LabelError(f"in_class_data={describe(in_class_data)} holds no non-empty feature")
    b = labels.bounds
    meets = (b[:, 0] <= source.width) & (b[:, 2] >= 0) & (b[:, 1] <= source.height) & (b[:, 3] >= 0)
    # a rectangle meets the extent exactly when its bounds do; other features are tested
    if not (meets & labels.rectangles).any() and not shapely.intersects(
            labels.geometries(np.flatnonzero(meets)), extent).any():
        gap = float(shapely.distance(labels.geoms, extent).min())
        x0, y0 = source.affine @ (0, 0)
        x1, y1 = source.affine @ (source.width, source.height)
        bounds = tuple(round(v, 6) for v in (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
        raise LabelError(
            f"in_class_data={describe(in_class_data)} does not overlap in_raster={source.path!r}: "
            f"the nearest feature is {gap * source.cell_size[0]:.6g} map units ({gap:.6g} pixels) "
            f"away from the raster's extent {bounds}"
        )
