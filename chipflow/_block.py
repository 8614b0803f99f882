"""The block task: one window decoded once, every chip in it labelled, encoded and written.

This is the hot loop. Per block: one read, one query of the features' bounds, one rasterize (for
mask formats), one pass of band moments. Per chip: a few numpy operations on
the block's candidate features, one vectorised shapely clip for the features
cut by the chip's edge, two encodes and two writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from affine import Affine
from distributed.metrics import context_meter

from . import zarr_store
from ._clip import clip_convex
from .class_raster import region_features
from .encode import ChipEncoder
from .errors import ChipflowError
from .formats import ChipLabel, get
from .grid import Block, ChipGrid, FeatureBlock
from .labels import LabelSet
from .sources import RasterSource, read_window
from .stats import BlockResult
from .store import RUN_DIR, Store, Writer

__all__ = ["BlockFailed", "Job", "crosses_split_cell", "process_block", "process_feature_block", "run_block"]


@dataclass(frozen=True)
class Job:
    """Everything a block task needs besides the labels (small, picklable).

    ``angles`` are the rotations of each chip (``0`` first); chip ``(row, col)``
    at angle ``k`` is named ``id_offset + grid.chip_id(row, col) * len(angles) + k``.
    """

    source: RasterSource
    grid: ChipGrid
    store: Store
    encoder: ChipEncoder
    metadata_format: str
    label_extension: str
    only_with_features: bool
    n_classes: int
    class_values: tuple[int, ...]
    angles: tuple[float, ...] = (0.0,)
    id_offset: int = 0
    min_overlap_ratio: float = 0.0
    blacken_around_feature: bool = False
    splits: tuple[tuple[str, float], ...] = ()
    split_block: int = 0
    seed: int = 0

    @property
    def halo(self) -> int:
        """Pixels a rotated chip reaches past its window (0 without rotation)."""
        if len(self.angles) == 1:
            return 0
        tx, ty = self.grid.tile_x, self.grid.tile_y
        return int(np.ceil(np.hypot(tx, ty) / 2 - min(tx, ty) / 2)) + 1


def _valid_mask(pixels: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """Per band and pixel: not nodata (None when every pixel is valid).

    None also when the raster has a nodata value that no pixel here holds (most
    blocks of most rasters): the statistics then take the fast path (a 2048²
    4-band 8-bit block: 62 -> 9 ms).
    """
    floating = pixels.dtype.kind == "f"
    if nodata is None and not floating:
        return None
    marked = nodata is not None and not np.isnan(nodata)
    valid = pixels != np.asarray(nodata).astype(pixels.dtype) if marked else ~np.isnan(pixels)
    if floating and marked:
        valid &= ~np.isnan(pixels)
    return None if valid.all() else valid


def _rows(keep: np.ndarray, *arrays: Any) -> tuple[Any, ...]:
    """Each of a chip's (or block's) per-feature arrays cut to the features ``keep``; None stays None."""
    return tuple(None if a is None else a[keep] for a in arrays)


def _cell_starts(offsets: np.ndarray, tile: int, size: int) -> np.ndarray:
    """Start of each cell along one axis: the pieces that chip edges cut the block into."""
    edges = np.unique(np.concatenate([offsets, offsets + tile, [0]]))
    return edges[(edges >= 0) & (edges < size)]


def _cell_sums(values: np.ndarray, ys: np.ndarray, xs: np.ndarray, ufunc: np.ufunc = np.add,
               dtype: type | None = None) -> np.ndarray:
    """Reduce ``values`` (h, w) over the cells cut at row starts ``ys`` and column starts ``xs``."""
    bounds = np.append(ys, values.shape[0])
    rows = np.stack([ufunc.reduce(values[a:b], axis=0, dtype=dtype)
                     for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return ufunc.reduceat(rows, xs, axis=1)


def _chip_weights(chips: list[tuple[int, int]], ys: np.ndarray, xs: np.ndarray,
                  tile: tuple[int, int]) -> np.ndarray:
    """How many of ``chips`` (top-left ``(y0, x0)``) cover each cell (2-D prefix sums of their corners)."""
    corners = np.asarray(chips, np.int64).reshape(-1, 2)
    r0, c0 = np.searchsorted(ys, corners[:, 0]), np.searchsorted(xs, corners[:, 1])
    r1, c1 = np.searchsorted(ys, corners[:, 0] + tile[0]), np.searchsorted(xs, corners[:, 1] + tile[1])
    diff = np.zeros((len(ys) + 1, len(xs) + 1), np.int64)
    np.add.at(diff, (r0, c0), 1)
    np.add.at(diff, (r0, c1), -1)
    np.add.at(diff, (r1, c0), -1)
    np.add.at(diff, (r1, c1), 1)
    return diff.cumsum(axis=0).cumsum(axis=1)[:-1, :-1]


_SQUARE_BYTES = 1 << 19  # squares are made in pieces of rows this large, which stay in the core's cache


def _extreme_fills(dtype: np.dtype) -> tuple[Any, Any]:
    """What nodata pixels become for a minimum and for a maximum: the type's top and bottom."""
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return info.max, info.min
    return np.inf, -np.inf


def _exact_type(bound: int, signed: bool, least: int = 2) -> type:
    """The narrowest integer type of at least ``least`` bytes holding magnitudes up to ``bound``."""
    for size in (2, 4, 8):
        if size >= least and bound < 2 ** (8 * size - signed):
            return np.dtype(f"{'i' if signed else 'u'}{size}").type
    raise OverflowError(bound)


def _row_moments(pixels: np.ndarray, valid: np.ndarray | None, ys: np.ndarray, xs: np.ndarray,
                 weight: np.ndarray) -> tuple:
    """:func:`_band_moments` of 8/16-bit integers or floats: all bands at once, row of cells by row.

    Integers are summed exactly: each row of cells gets its column sums and sums
    of squares in the narrowest exact accumulators (8-bit data: 16-bit sums while
    a cell is at most 257 rows high, 32-bit sums of squares), then Python ints.
    Floats take two passes in float64: the sums, then the squared deviations from
    the mean. Squares are made in pieces of rows that stay in the CPU's cache:
    squaring a whole row of cells at once allocated megabytes of fresh memory
    each time and took about twice as long (a 2048² 4-band block: uint8 16 -> 9
    ms, uint16 35 -> 21 ms, float32 105 -> 42 ms). Nodata pixels (``valid``
    False) count as zeros in the sums and are left out of the counts and extremes;
    such blocks go piece by piece throughout (uint8 67 -> 46 ms, float32 190 ->
    124 ms against a band at a time). Cell rows no exported chip covers are
    skipped; when the chips cover the whole block and every pixel is valid, its
    minimum and maximum are one pass per band.
    """
    n_bands, h, w = pixels.shape
    bounds = np.append(ys, h)
    heights = np.diff(bounds)
    covered = weight > 0
    tallest = int(heights.max())
    floating = pixels.dtype.kind == "f"
    low, high = _extreme_fills(pixels.dtype)
    if floating:
        sum_type = square_type = squares_sum_type = np.float64
    else:
        signed, size = pixels.dtype.kind == "i", pixels.dtype.itemsize
        peak = max(-int(high), int(low))
        square_type = _exact_type(peak * peak, signed, 2 * size)
        sum_type = _exact_type(tallest * peak, signed, 2 * size)
        squares_sum_type = _exact_type(tallest * peak * peak, signed, 4 * size)
    step = max(1, _SQUARE_BYTES // (np.dtype(square_type).itemsize * n_bands * w))
    piece = np.empty((n_bands, min(step, tallest), w), square_type)
    sums = np.zeros((n_bands, len(ys), w), sum_type)
    squares = np.zeros((n_bands, len(ys), w), squares_sum_type)
    counts = None if valid is None else np.zeros((n_bands, len(ys), w), np.int64)
    whole = valid is None and bool(covered.all())
    lows = None if whole else np.full((n_bands, len(ys), w), low, pixels.dtype)
    highs = None if whole else np.full((n_bands, len(ys), w), high, pixels.dtype)
    spans = [(i, a, b) for i, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
             if covered[i].any()]
    pieces = [(i, c, min(c + step, b)) for i, a, b in spans for c in range(a, b, step)]

    def data(c: int, d: int) -> tuple[np.ndarray, np.ndarray | None]:  # rows c:d, nodata as 0; their mask
        if valid is None:
            return pixels[:, c:d], None
        ok = valid[:, c:d]
        return np.where(ok, pixels[:, c:d], 0), ok

    if valid is None:  # sums and extremes a row of cells at a time, squares in pieces
        for i, a, b in spans:
            rows = pixels[:, a:b]
            np.add.reduce(rows, axis=1, dtype=sum_type, out=sums[:, i])
            if not whole:
                np.minimum.reduce(rows, axis=1, out=lows[:, i])
                np.maximum.reduce(rows, axis=1, out=highs[:, i])
    for i, c, d in pieces:
        values, ok = data(c, d)
        if ok is not None:
            sums[:, i] += np.add.reduce(values, axis=1, dtype=sum_type)
            counts[:, i] += np.add.reduce(ok, axis=1, dtype=np.int32)
            np.minimum(lows[:, i], np.minimum.reduce(np.where(ok, values, low), axis=1), out=lows[:, i])
            np.maximum(highs[:, i], np.maximum.reduce(np.where(ok, values, high), axis=1), out=highs[:, i])
        if not floating:
            squared = np.square(values, dtype=square_type, out=piece[:, :d - c])
            squares[:, i] += np.add.reduce(squared, axis=1, dtype=squares_sum_type)
    widths = np.diff(np.append(xs, w))
    cells = (np.broadcast_to(np.outer(heights, widths), (n_bands, len(ys), len(xs))) if counts is None
             else np.add.reduceat(counts, xs, axis=2))
    n = (cells * weight).sum(axis=(1, 2))
    per = np.maximum(n, 1)
    if floating:
        mean = (np.add.reduceat(sums, xs, axis=2) * weight).sum(axis=(1, 2)) / per
        for i, c, d in pieces:  # the second pass: squared deviations from the mean (0 at nodata)
            values, ok = data(c, d)
            part = np.subtract(values, mean[:, None, None], out=piece[:, :d - c])
            np.square(part, out=part)
            if ok is not None:
                np.multiply(part, ok, out=part)
            squares[:, i] += np.add.reduce(part, axis=1)
        m2 = (np.add.reduceat(squares, xs, axis=2) * weight).sum(axis=(1, 2))
    else:
        wobj = weight.astype(object)  # Python ints: no overflow, whatever the raster's size
        s = [int(v) for v in (np.add.reduceat(sums, xs, axis=2).astype(object) * wobj).sum(axis=(1, 2))]
        ss = [int(v) for v in (np.add.reduceat(squares, xs, axis=2).astype(object) * wobj).sum(axis=(1, 2))]
        mean = np.array([v / t for v, t in zip(s, per.tolist(), strict=True)])
        m2 = np.array([(t * q - v * v) / t for v, q, t in zip(s, ss, per.tolist(), strict=True)])
    if whole:
        vmin, vmax = np.min(pixels, axis=(1, 2)), np.max(pixels, axis=(1, 2))
    else:
        has = covered & (cells > 0)  # per band: the cells in a chip with a valid pixel
        vmin = np.where(has, np.minimum.reduceat(lows, xs, axis=2), low).min(axis=(1, 2))
        vmax = np.where(has, np.maximum.reduceat(highs, xs, axis=2), high).max(axis=(1, 2))
    empty = n == 0
    vmin = np.where(empty, np.inf, vmin.astype(np.float64))
    vmax = np.where(empty, -np.inf, vmax.astype(np.float64))
    return n.astype(np.int64), np.where(empty, 0.0, mean), np.where(empty, 0.0, m2), vmin, vmax


def _band_moments(pixels: np.ndarray, valid: np.ndarray | None, chips: list[tuple[int, int]],
                  tile: tuple[int, int]) -> tuple:
    """Per-band n, mean, M2, min, max of the exported chips' pixels (overlaps counted per chip).

    The block is cut into cells by the chips' edges; all pixels of a cell are in
    the same chips, so one pass of cell sums, weighted by each cell's chip count,
    gives the statistics of all chips at once. 8- and 16-bit integers are summed
    exactly, floats in two passes (:func:`_row_moments`).
    """
    n_bands, h, w = pixels.shape
    ty, tx = tile
    cy0 = np.array([c[0] for c in chips])
    cx0 = np.array([c[1] for c in chips])
    ys, xs = _cell_starts(np.unique(cy0), ty, h), _cell_starts(np.unique(cx0), tx, w)
    weight = _chip_weights(chips, ys, xs, tile)
    kind = pixels.dtype.kind
    if weight.any() and (kind == "f" or (kind in "ui" and pixels.dtype.itemsize <= 2)):
        return _row_moments(pixels, valid, ys, xs, weight)
    # other types (32- and 64-bit integers, complex): a band at a time, two passes in float64
    covered = weight > 0
    heights = np.diff(np.append(ys, h))
    widths = np.diff(np.append(xs, w))
    n = np.zeros(n_bands, np.int64)
    mean, m2 = np.zeros(n_bands), np.zeros(n_bands)
    vmin, vmax = np.full(n_bands, np.inf), np.full(n_bands, -np.inf)
    low, high = _extreme_fills(pixels.dtype)
    for i in range(n_bands):
        band = pixels[i]
        if valid is None:
            count = np.outer(heights, widths)
            lo_band = hi_band = data = band
        else:
            count = _cell_sums(valid[i].view(np.uint8), ys, xs, dtype=np.int64)
            data = np.where(valid[i], band, 0)
            lo_band, hi_band = np.where(valid[i], band, low), np.where(valid[i], band, high)
        total = int((weight * count).sum())
        if total == 0:
            continue
        has = covered & (count > 0)
        vmin[i] = _cell_sums(lo_band, ys, xs, np.minimum)[has].min()
        vmax[i] = _cell_sums(hi_band, ys, xs, np.maximum)[has].max()
        f = data.astype(np.float64)
        mean[i] = float((weight * _cell_sums(f, ys, xs)).sum() / total)
        dev = (f - mean[i]) ** 2
        if valid is not None:
            dev[~valid[i]] = 0
        m2[i] = float((weight * _cell_sums(dev, ys, xs)).sum())
        n[i] = total
    return n, mean, m2, vmin, vmax


def _chip_features(
    geoms: np.ndarray, bounds: np.ndarray, full_areas: np.ndarray, polygonal: np.ndarray,
    box: tuple[float, float, float, float], min_ratio: float, want_geoms: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The candidate features inside pixel box ``(x0, y0, x1, y1)``, clipped to it (rotated chips).

    Returns the positions (into the candidate arrays) of the kept features, their
    boxes (the pixel box of each feature clipped to the chip), clipped areas
    (pixels²) and, when asked, the clipped geometries. A feature whose part in
    the chip is below ``min_ratio`` of its area is dropped. Unrotated chips get
    theirs for the whole block at once (:func:`_block_features`), as this one chip does.
    """
    x0, y0, x1, y1 = box
    b = bounds
    # polygons must overlap the chip's interior; points/lines use half-open edges
    hit = ((b[:, 0] < x1) & (b[:, 1] < y1) & np.where(polygonal, b[:, 2] > x0, b[:, 2] >= x0)
           & np.where(polygonal, b[:, 3] > y0, b[:, 3] >= y0))
    pos = np.flatnonzero(hit)
    kept, boxes, areas, clipped, _ = _block_features(
        geoms, bounds, full_areas, polygonal, np.zeros(len(geoms), bool),
        np.array([box], dtype=np.float64), np.zeros(len(pos), np.int64), pos, min_ratio, want_geoms)
    return kept, boxes, areas, clipped


def _axis_hits(starts: np.ndarray, ends: np.ndarray, lo: np.ndarray, hi: np.ndarray,
               polygonal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis, the chips ``[first, last)`` each feature interval ``[lo, hi]`` meets.

    Chips span ``[starts, ends)`` (both non-decreasing). As :func:`_chip_features`
    tests it: a chip is met when ``lo < end`` and ``hi > start`` (``hi >= start``
    for points and lines). Chip edges on whole pixels (always, on a chip grid)
    are counted from a table over the pixels they span: with integer edges,
    ``#(ends <= lo) == #(ends <= floor(lo))`` and ``#(starts < hi) == #(starts <=
    ceil(hi) - 1)``; binary searches of unsorted values cost 10x as much (200k
    features: 1.4 of a block's 2.3 ms of pairing).
    """
    edges = np.concatenate([starts, ends])
    if edges.size and np.isfinite(edges).all() and (edges == np.floor(edges)).all():
        base = int(edges.min()) - 1  # pixel p is row p - base; below and above the edges: clipped
        pixels = np.arange(base, int(edges.max()) + 2, dtype=np.float64)
        ends_upto = np.searchsorted(ends, pixels, side="right")  # per pixel: how many ends are <= it
        starts_upto = np.searchsorted(starts, pixels, side="right")

        def row(values: np.ndarray) -> np.ndarray:  # NaN-free: bounds of features
            return np.clip(values, pixels[0], pixels[-1]).astype(np.intp) - base

        first = ends_upto[row(np.floor(lo))]
        last = np.where(polygonal, starts_upto[row(np.ceil(hi) - 1)], starts_upto[row(np.floor(hi))])
    else:
        first = np.searchsorted(ends, lo, side="right")
        last = np.where(polygonal, np.searchsorted(starts, hi, side="left"),
                        np.searchsorted(starts, hi, side="right"))
    return first, np.maximum(last, first)


def _grid_pairs(bounds: np.ndarray, polygonal: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                tile: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Every (chip, candidate) pair of a block's grid whose boxes meet, sorted by chip then candidate.

    Chips are numbered row-major over ``xs`` x ``ys``. One vectorised pass over
    the candidates instead of a scan of all of them per chip: each feature meets
    a rectangle of chips, found by binary search on the chips' sorted edges.
    Chips at ``xs`` x ``ys``, ``tile = (tx, ty)``, clipped to the raster's
    ``size = (width, height)``, exactly as the per-chip box is.
    """
    (tx, ty), (width, height) = tile, size
    xs, ys = xs.astype(np.float64), ys.astype(np.float64)
    c0, c1 = _axis_hits(np.maximum(xs, 0), np.minimum(xs + tx, width), bounds[:, 0], bounds[:, 2], polygonal)
    r0, r1 = _axis_hits(np.maximum(ys, 0), np.minimum(ys + ty, height), bounds[:, 1], bounds[:, 3], polygonal)
    nc, nr = c1 - c0, r1 - r0
    counts = nc * nr
    total = int(counts.sum())
    cand = np.repeat(np.arange(len(bounds)), counts)
    k = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    ncols = np.maximum(np.repeat(nc, counts), 1)
    chip = (np.repeat(r0, counts) + k // ncols) * len(xs) + np.repeat(c0, counts) + k % ncols
    # candidates come in ascending order, so a stable sort by chip keeps them so within each chip;
    # chip numbers that fit 16 bits sort by radix (7x faster than the two-key sort of both)
    order = np.argsort(chip.astype(np.int16) if len(xs) * len(ys) <= 2**15 else chip, kind="stable")
    return chip[order], cand[order]


def _block_features(
    geoms: np.ndarray, bounds: np.ndarray, full_areas: np.ndarray, polygonal: np.ndarray,
    rectangles: np.ndarray, chip_boxes: np.ndarray, chips: np.ndarray, cands: np.ndarray,
    min_ratio: float, want_geoms: bool, quads: tuple[np.ndarray, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """:func:`_chip_features` for every chip of a block at once, from its (chip, candidate) pairs.

    ``chip_boxes`` (n_chips, 4) are the chips' pixel boxes; ``chips``/``cands``
    the pairs of :func:`_grid_pairs`. When no geometry is wanted, rectangles
    are clipped as boxes, and the convex quadrilaterals of ``quads`` (a mask
    over the candidates, and a function giving candidates' vertices, as
    :meth:`LabelSet.quad_vertices`) with numpy, all pairs in one pass; other
    features cut by a chip's edge go through GEOS, one call per chip. Returns
    the kept pairs' candidates, boxes, areas and (when asked) clipped
    geometries, and ``cuts``: chip ``i``'s pairs are ``cuts[i]:cuts[i + 1]``,
    in ascending candidate order.
    """
    cb = chip_boxes[chips]
    boxes = bounds[cands]
    areas = full_areas[cands]
    clipped = geoms[cands] if want_geoms else None
    partial = ((boxes[:, 0] < cb[:, 0]) | (boxes[:, 1] < cb[:, 1])
               | (boxes[:, 2] > cb[:, 2]) | (boxes[:, 3] > cb[:, 3]))
    keep = np.ones(len(cands), bool)
    quick = partial & rectangles[cands] if not want_geoms else np.zeros(len(cands), bool)
    q = np.flatnonzero(quick)
    if q.size:  # a rectangle clipped by a chip is the overlap of the two boxes
        cut = np.concatenate([np.maximum(boxes[q, :2], cb[q, :2]), np.minimum(boxes[q, 2:], cb[q, 2:])],
                             axis=1)
        boxes[q] = cut
        areas[q] = (cut[:, 2] - cut[:, 0]) * (cut[:, 3] - cut[:, 1])
        keep[q] = areas[q] > 0
    if quads is not None and not want_geoms:  # convex quadrilaterals: Sutherland-Hodgman in numpy
        is_quad, vertices = quads
        convex = partial & ~quick & is_quad[cands]
        v = np.flatnonzero(convex)
        if v.size:
            boxes[v], areas[v] = clip_convex(vertices(cands[v]), cb[v])
            keep[v] = areas[v] > 0
        quick |= convex
    slow = np.flatnonzero(partial & ~quick)
    if slow.size:
        parts = np.empty(slow.size, dtype=object)
        poly = polygonal[cands[slow]]
        slow_geoms = geoms[cands[slow]]
        by_chip = np.flatnonzero(np.r_[True, chips[slow][1:] != chips[slow][:-1]])
        for a, b in zip(by_chip.tolist(), [*by_chip[1:].tolist(), slow.size], strict=True):
            x0, y0, x1, y1 = chip_boxes[chips[slow[a]]].tolist()
            mine, is_poly = slow_geoms[a:b], poly[a:b]
            # GEOS's rectangle clipping: 5x faster than a general intersection, same areas and boxes
            piece = np.empty(b - a, dtype=object)
            piece[is_poly] = shapely.clip_by_rect(mine[is_poly], x0, y0, x1, y1)
            if not is_poly.all():  # points and lines: a general intersection
                piece[~is_poly] = shapely.intersection(mine[~is_poly], shapely.box(x0, y0, x1, y1))
            parts[a:b] = piece
        boxes[slow] = shapely.bounds(parts)
        areas[slow] = shapely.area(parts)
        if clipped is not None:
            clipped[slow] = parts
        keep[slow] = ~shapely.is_empty(parts) & ((areas[slow] > 0) | ~poly)
    if min_ratio > 0:  # features wholly inside a chip keep their whole area
        full = full_areas[cands]
        keep &= (full <= 0) | (areas >= min_ratio * full)
    kept = np.flatnonzero(keep)
    cuts = np.searchsorted(chips[kept], np.arange(len(chip_boxes) + 1))
    return cands[kept], boxes[kept], areas[kept], None if clipped is None else clipped[kept], cuts


def _rasterize(geoms: np.ndarray, values: np.ndarray, shape: tuple[int, int], transform: Affine,
               dtype: type) -> np.ndarray:
    """Burn ``values`` of ``geoms`` (pixel coordinates) into a raster; later features win."""
    from rasterio.features import rasterize

    if len(geoms) == 0:
        return np.zeros(shape, dtype)
    return rasterize(zip(geoms.tolist(), values.tolist(), strict=True), out_shape=shape,
                     transform=transform, fill=0, dtype=dtype)


def _rotation(angle: float, tx: int, ty: int, cx: float, cy: float) -> Affine:
    """Chip pixel → raster pixel for a chip centred on ``(cx, cy)``, rotated by ``angle``°."""
    return (Affine.translation(cx, cy) @ Affine.rotation(angle)
            @ Affine.translation(-tx / 2, -ty / 2))


class _Geometries:
    """A block's candidate geometries, each decoded from the LabelSet when first indexed.

    A box format over rectangles decodes none; otherwise only the features cut
    by a chip's edge are.
    """

    def __init__(self, labels: LabelSet, index: np.ndarray):
        self.labels, self.index = labels, index

    def __getitem__(self, which: Any) -> np.ndarray:
        return self.labels.geometries(self.index[which])


class _Block:
    """One block's decoded pixels, candidate features and per-block rasters."""

    def __init__(self, block: Block, job: Job, labels: LabelSet):
        src = job.source
        self.job, self.labels, self.block = job, labels, block
        self.fmt = get(job.metadata_format)
        h = job.halo
        bx0, by0, bx1, by1 = block.window
        self.window = (bx0 - h, by0 - h, bx1 + h, by1 + h)
        with context_meter.meter("read"):
            self.pixels, covered = read_window(src, self.window)
        self.valid = _valid_mask(self.pixels, src.nodata)
        self.any_valid = None if self.valid is None else self.valid.any(axis=0)
        wx0, wy0, wx1, wy1 = self.window
        self.inside = (max(wx0, 0), max(wy0, 0), min(wx1, src.width), min(wy1, src.height))
        if covered is not None:  # pixels no input covers (past the edge, mosaic gaps) are not data
            self.any_valid = covered if self.any_valid is None else self.any_valid & covered
            if self.valid is not None:
                self.valid &= covered
            else:
                self.valid = np.broadcast_to(covered, self.pixels.shape).copy()
        with context_meter.meter("labels"):
            self._labels(labels)

    def _labels(self, labels: LabelSet) -> None:
        """Candidate features, and the block's class and instance rasters."""
        src, job = self.job.source, self.job
        wx0, wy0 = self.window[:2]
        self.cand = labels.query(self.inside)
        self.class_values = np.asarray((0, *job.class_values), dtype=np.int64)  # index 0 unused
        self.mask_dtype = np.uint8 if self.class_values.max() <= 255 else np.uint16
        origin = Affine.translation(wx0, wy0)
        shape = self.pixels.shape[1:]
        self.mask = self.instances = None
        cand_geoms = (labels.geometries(self.cand) if labels.raster is None
                      and (self.fmt.rasterize or self.fmt.instances) else None)
        if labels.raster is not None:  # class raster: its values on this window's pixels
            self.mask = labels.raster.read(src, self.window).astype(self.mask_dtype)
        elif self.fmt.rasterize:
            self.mask = _rasterize(cand_geoms, self.class_values[labels.class_index[self.cand] + 1],
                                   shape, origin, self.mask_dtype)
        if self.fmt.instances and labels.raster is None:  # class rasters: per chip, from regions
            self.instances = _rasterize(cand_geoms, np.arange(1, len(self.cand) + 1), shape, origin,
                                        np.uint32)
        for raster in (self.mask, self.instances):
            if raster is not None and self.any_valid is not None:
                raster[~self.any_valid] = 0

    def chips_allowed(self) -> np.ndarray | None:
        """Per chip of the block: inside the mask polygons (None without a mask)."""
        if self.labels.mask is None:
            return None
        g, (r0, r1), (c0, c1) = self.job.grid, self.block.rows, self.block.cols
        x0, y0 = np.meshgrid(g.xs[c0:c1], g.ys[r0:r1])
        boxes = shapely.box(x0, y0, x0 + g.tile_x, y0 + g.tile_y)
        return shapely.covers(self.labels.mask, boxes)


def _sample(pixels: np.ndarray, origin: tuple[int, int], chip_to_raster: Affine, shape: tuple[int, int],
            nodata: float | None) -> np.ndarray:
    """Nearest-neighbour sample of a rotated chip from the block's pixels (GDAL's warper)."""
    from rasterio.crs import CRS
    from rasterio.warp import Resampling, reproject

    fill = 0 if nodata is None or np.isnan(nodata) and pixels.dtype.kind != "f" else nodata
    out = np.full((pixels.shape[0], *shape), fill, dtype=pixels.dtype)
    crs = CRS.from_epsg(3857)  # any CRS: source and chip share it, only the affines differ
    reproject(pixels, out, src_transform=Affine.translation(*origin), src_crs=crs,
              dst_transform=chip_to_raster, dst_crs=crs, resampling=Resampling.nearest,
              src_nodata=nodata, dst_nodata=fill)
    return out


def _direct_moments(chip: np.ndarray, valid: np.ndarray | None) -> tuple:
    """Band moments of one chip's valid pixels (rotated chips)."""
    n_bands = chip.shape[0]
    n = np.zeros(n_bands, np.int64)
    mean, m2 = np.zeros(n_bands), np.zeros(n_bands)
    vmin, vmax = np.full(n_bands, np.inf), np.full(n_bands, -np.inf)
    for i in range(n_bands):
        vals = chip[i] if valid is None else chip[i][valid[i]]
        if vals.size:
            v = vals.astype(np.float64)
            n[i], mean[i] = v.size, v.mean()
            m2[i] = float(((v - mean[i]) ** 2).sum())
            vmin[i], vmax[i] = v.min(), v.max()
    return n, mean, m2, vmin, vmax


def chip_reach(x0: Any, y0: Any, tx: int, ty: int, angles: tuple[float, ...],
               size: tuple[int, int]) -> tuple[Any, Any, Any, Any]:
    """The pixels a grid position's chips read at every angle: ``(x0, y0, x1, y1)``, ints or arrays.

    Its window unrotated; rotated about its centre, also the box round the turned
    footprint (a 32 px chip at 45° reaches 6.6 px past its window) within the
    raster of ``size = (width, height)`` (past it there are no pixels of any split
    cell), so that a split cell holds every pixel of the chips it keeps.
    """
    x0, y0 = np.asarray(x0), np.asarray(y0)
    hx, hy = tx / 2, ty / 2
    for angle in angles:
        t = Affine.rotation(angle)  # exact quarter turns
        hx = max(hx, (abs(t.a) * tx + abs(t.b) * ty) / 2)
        hy = max(hy, (abs(t.d) * tx + abs(t.e) * ty) / 2)
    cx, cy = x0 + tx / 2, y0 + ty / 2
    rx0, ry0 = np.floor(cx - hx + 1e-9).astype(np.int64), np.floor(cy - hy + 1e-9).astype(np.int64)
    rx1, ry1 = np.ceil(cx + hx - 1e-9).astype(np.int64), np.ceil(cy + hy - 1e-9).astype(np.int64)
    return (np.minimum(x0, np.maximum(rx0, 0)), np.minimum(y0, np.maximum(ry0, 0)),
            np.maximum(x0 + tx, np.minimum(rx1, size[0])), np.maximum(y0 + ty, np.minimum(ry1, size[1])))


def crosses_split_cell(x0: Any, y0: Any, x1: Any, y1: Any, size: int) -> Any:
    """Whether windows ``[x0, x1) x [y0, y1)`` (ints, or arrays of them) cross a split cell's edge."""
    return (x0 // size != (x1 - 1) // size) | (y0 // size != (y1 - 1) // size)


def split_of(job: Job, window: tuple[int, int, int, int]) -> str | None:
    """The split of a chip window: that of the split cell holding it whole; ``""`` when it straddles.

    Split cells are squares of ``job.split_block`` pixels on the item's grid; each is
    assigned to a split by a seeded hash of its position, so overlapping chips
    (all inside one cell) always share a split. None when no splits were asked for.
    """
    if not job.splits:
        return None
    import hashlib

    s = job.split_block
    x0, y0, x1, y1 = window
    if crosses_split_cell(x0, y0, x1, y1, s):
        return ""  # across a split boundary: dropped, so no chip leaks into two splits
    cx, cy = x0 // s, y0 // s
    digest = hashlib.blake2b(f"{job.seed}:{job.id_offset}:{cx}:{cy}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    total = 0.0
    for name, fraction in job.splits:
        total += fraction
        if u < total:
            return name
    return job.splits[-1][0]


class _Output:
    """Where a block's chips go (a split's folder when splitting) and their statistics."""

    def __init__(self, job: Job, n_bands: int):
        self.job = job
        self.result = BlockResult(job.n_classes, n_bands)
        # per chip: split, id, image path, first label path, feature classes, areas, pixel counts
        self.rows: list[tuple[str | None, int, str, str, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.exported: dict[str | None, list[tuple[int, int]]] = {}
        self.writer = Writer(job.store)
        self.write_seconds = 0.0

    def write(self, split: str | None, label: ChipLabel, chip: np.ndarray, transform: Affine,
              fmt: Any) -> tuple[str, list[tuple[str, bytes]]]:
        """Write the chip's image and label files; returns their paths (relative to the split)."""
        started = time.perf_counter()  # summed over the block, reported once (a meter per chip cost 3%)
        try:
            return self._write(split, label, chip, transform, fmt)
        finally:
            self.write_seconds += time.perf_counter() - started

    def _write(self, split: str | None, label: ChipLabel, chip: np.ndarray, transform: Affine,
               fmt: Any) -> tuple[str, list[tuple[str, bytes]]]:
        job = self.job
        prefix = f"{split}/" if split else ""
        if job.encoder.extension == zarr_store.EXTENSION:  # into chips.zarr, not a file per chip
            return zarr_store.write_chip(job.store, prefix, label, chip, fmt, job.label_extension)
        image_rel = fmt.image_relpath(label)
        files = fmt.files(label, job.label_extension)
        self.writer.put([*((f"{prefix}{image_rel}{suffix}", data) for suffix, data in job.encoder.image(
            chip, transform)), *((f"{prefix}{rel}", data) for rel, data in files)])
        return f"{image_rel}.{job.encoder.extension}", files

    def record(self, split: str | None, chip_id: int, image: str, files: list[tuple[str, bytes]],
               class_index: np.ndarray, areas: np.ndarray, pixel_counts: np.ndarray | None,
               moments: tuple | None = None, origin: tuple[int, int] | None = None) -> None:
        """Note one exported chip (with its direct band moments, or its grid origin); see :meth:`finish`."""
        if moments is not None:
            self.result.add_band_moments(*moments)
            if split:
                self._child(split).add_band_moments(*moments)
        if origin is not None:
            self.exported.setdefault(split, []).append(origin)
        self.rows.append((split, chip_id, image, files[0][0] if files else "", class_index, areas,
                          pixel_counts))

    def _child(self, split: str) -> BlockResult:
        return self.result.children.setdefault(split, BlockResult(self.result.n_classes, self.result.n_bands))

    def finish(self, block: Any, pixels: np.ndarray | None, valid: np.ndarray | None,
               tile: tuple[int, int]) -> BlockResult:
        """Statistics of the chips (in chip id order), grid chips' band moments, the commit marker."""
        rows = sorted(self.rows, key=lambda t: t[1])
        n = self.result.n_classes

        def account(target: BlockResult, mine: list[tuple], prefixed: bool) -> None:
            pixels = [r[6] for r in mine]
            target.add_chips([r[4] for r in mine], [r[5] for r in mine],
                             None if not mine or pixels[0] is None else np.array(pixels, np.int64))
            pre = [f"{r[0]}/" if prefixed and r[0] else "" for r in mine]
            target.set_rows([(r[1], p + r[2], p + r[3] if r[3] else "", np.bincount(r[4], minlength=n),
                              np.zeros(n, np.int64) if r[6] is None else r[6])
                             for p, r in zip(pre, mine, strict=True)])

        account(self.result, rows, True)  # the whole block: paths relative to the output folder
        for split in sorted({r[0] for r in rows if r[0]}):  # each split: paths relative to its folder
            account(self._child(split), [r for r in rows if r[0] == split], False)
        for split, origins in self.exported.items():
            moments = _band_moments(pixels, valid, origins, tile)
            self.result.add_band_moments(*moments)
            if split:
                self.result.children[split].add_band_moments(*moments)
        started = time.perf_counter()
        self.writer.close()
        context_meter.digest_metric("write", self.write_seconds + time.perf_counter() - started, "seconds")
        self.job.store.commit_block(block.id, self.result.to_json())  # after every file of the block
        return self.result


def process_block(block: Block, job: Job, labels: LabelSet) -> BlockResult:
    """Export every chip of ``block`` (at every angle) and return its statistics."""
    src, grid = job.source, job.grid
    b = _Block(block, job, labels)
    fmt, cand = b.fmt, b.cand
    wx0, wy0 = b.window[:2]
    tx, ty = grid.tile_x, grid.tile_y
    out = _Output(job, src.count)
    allowed = b.chips_allowed()
    cand_geoms, cand_bounds = _Geometries(labels, cand), labels.bounds[cand]
    cand_areas, cand_poly = labels.areas[cand], labels.polygonal[cand]
    cand_rect = labels.rectangles[cand]
    want_geoms = fmt.needs_geometry
    # class rasters: connected regions are the features, except for pure class-map formats
    regions = not fmt.rasterize or fmt.instances or fmt.needs_geometry
    n_angles = len(job.angles)
    part_labels: list[tuple[int, ChipLabel]] = []
    # rotated chips sample the block's validity: convert it once per block, not once per chip
    valid_u8 = None if b.any_valid is None or n_angles == 1 else b.any_valid[None].astype(np.uint8)
    n_block_cols = block.cols[1] - block.cols[0]
    xs, ys = grid.xs.tolist(), grid.ys.tolist()
    block_xs, block_ys = grid.xs[slice(*block.cols)], grid.ys[slice(*block.rows)]
    if labels.raster is None and 0 in job.angles:  # every unrotated chip's features, clipped, at once
        bx, by = np.meshgrid(block_xs, block_ys)
        chip_boxes = np.column_stack([np.maximum(bx.ravel(), 0), np.maximum(by.ravel(), 0),
                                      np.minimum(bx.ravel() + tx, src.width),
                                      np.minimum(by.ravel() + ty, src.height)]).astype(np.float64)
        chips, pairs = _grid_pairs(cand_bounds, cand_poly, block_xs, block_ys, (tx, ty),
                                   (src.width, src.height))
        wants = want_geoms or fmt.instances
        kept, kept_boxes, kept_areas, kept_geoms, cuts = _block_features(
            cand_geoms, cand_bounds, cand_areas, cand_poly, cand_rect, chip_boxes, chips, pairs,
            job.min_overlap_ratio, wants,
            None if wants else (labels.quads[cand], lambda pos: labels.quad_vertices(cand[pos])))
        # in each chip's own pixels (origin: the chip's corner, even past the raster's edge)
        corner = np.repeat(np.column_stack([bx.ravel(), by.ravel()]), np.diff(cuts), axis=0)
        kept_boxes = np.clip(kept_boxes - np.tile(corner, 2), 0, (tx, ty, tx, ty)) + 0.0
        dropped = fmt.dropped_boxes(kept_boxes)
        if dropped is not None and dropped.any():  # boxes the label cannot hold: counted nowhere
            keep = ~dropped
            kept, kept_boxes, kept_areas, kept_geoms = _rows(keep, kept, kept_boxes, kept_areas, kept_geoms)
            cuts = np.r_[0, np.cumsum(keep)][cuts]
        kept_classes = labels.class_index[cand[kept]]
        rows = fmt.block_rows(b.class_values[kept_classes + 1], kept_boxes, cuts)
        # chips met by a feature the ratio leaves out: their class raster burns the kept ones alone
        redrawn = (np.bincount(chips, minlength=len(chip_boxes)) > np.diff(cuts)
                   if job.min_overlap_ratio > 0 and b.mask is not None else None)
    chip_affine = src.chip_affine
    ca, cb, cc, cd, ce, cf = chip_affine[:6]
    for r, row in enumerate(range(*block.rows)):
        cy0 = ys[row]
        for c, col in enumerate(range(*block.cols)):
            if allowed is not None and not allowed[r, c]:
                continue
            cx0 = xs[col]
            split = None if not job.splits else split_of(job, tuple(int(v) for v in chip_reach(
                cx0, cy0, tx, ty, job.angles, (src.width, src.height))))
            if split == "":
                continue
            for k, angle in enumerate(job.angles):
                text = None  # the chip's label rows, when the block rendered them (block_rows)
                if angle == 0:
                    sl = np.s_[cy0 - wy0:cy0 - wy0 + ty, cx0 - wx0:cx0 - wx0 + tx]
                    if b.any_valid is not None and not b.any_valid[sl].any():
                        continue  # entirely nodata: not exported
                    mask = None if b.mask is None else b.mask[sl]
                    if labels.raster is not None:
                        class_index, boxes, areas, geoms = region_features(
                            mask, b.class_values[1:], regions=regions)
                    else:
                        i = r * n_block_cols + c
                        mine = slice(cuts[i], cuts[i + 1])
                        pos, boxes, areas = kept[mine], kept_boxes[mine], kept_areas[mine]
                        geoms = None if kept_geoms is None else kept_geoms[mine]
                        class_index = kept_classes[mine]
                        text = None if rows is None else rows[i]
                        if redrawn is not None and redrawn[i]:
                            mask = _rasterize(cand_geoms[pos], b.class_values[class_index + 1], (ty, tx),
                                              Affine.translation(cx0, cy0), b.mask_dtype)
                            if b.any_valid is not None:
                                mask[~b.any_valid[sl]] = 0
                        if geoms is not None:
                            geoms = shapely.transform(geoms, lambda xy, o=(cx0, cy0): xy - o)
                    if job.only_with_features and class_index.size == 0:
                        continue
                    chip = b.pixels[(slice(None), *sl)]
                    inst = None if b.instances is None else b.instances[sl]
                    if mask is not None and not fmt.rasterize:
                        mask = None  # read only to find the raster's regions
                else:
                    to_raster = _rotation(angle, tx, ty, cx0 + tx / 2, cy0 + ty / 2)
                    shift = ~to_raster
                    chip_valid = None if valid_u8 is None else _sample(
                        valid_u8, (wx0, wy0), to_raster, (ty, tx), None)[0].astype(bool)
                    if chip_valid is not None and not chip_valid.any():
                        continue
                    if labels.raster is not None:
                        mask = _sample(b.mask[None], (wx0, wy0), to_raster, (ty, tx), None)[0]
                        if chip_valid is not None:
                            mask[~chip_valid] = 0
                        class_index, boxes, areas, geoms = region_features(
                            mask, b.class_values[1:], regions=regions)
                    else:
                        # only the candidates meeting the rotated chip's footprint box move to its frame
                        corners = np.array([to_raster @ c for c in ((0, 0), (tx, 0), (tx, ty), (0, ty))])
                        (fx0, fy0), (fx1, fy1) = corners.min(axis=0), corners.max(axis=0)
                        near = np.flatnonzero((cand_bounds[:, 0] <= fx1) & (cand_bounds[:, 2] >= fx0)
                                              & (cand_bounds[:, 1] <= fy1) & (cand_bounds[:, 3] >= fy0))
                        local = shapely.transform(cand_geoms[near], lambda xy, m=shift: np.column_stack(
                            [m.a * xy[:, 0] + m.b * xy[:, 1] + m.c, m.d * xy[:, 0] + m.e * xy[:, 1] + m.f]))
                        pos, boxes, areas, geoms = _chip_features(
                            local, shapely.bounds(local).reshape(-1, 4), cand_areas[near], cand_poly[near],
                            (0, 0, tx, ty), job.min_overlap_ratio, True)
                        class_index = labels.class_index[cand[near[pos]]]
                        mask = None
                    boxes = np.clip(boxes, 0, (tx, ty, tx, ty)) + 0.0
                    dropped = fmt.dropped_boxes(boxes)
                    if dropped is not None and dropped.any():  # as for the unrotated chips
                        class_index, boxes, areas, geoms = _rows(~dropped, class_index, boxes, areas, geoms)
                    if job.only_with_features and class_index.size == 0:
                        continue
                    chip = _sample(b.pixels, (wx0, wy0), to_raster, (ty, tx), src.nodata)
                    idx_values = b.class_values[class_index + 1]
                    inst = None
                    if not fmt.rasterize:
                        mask = None
                    elif mask is None:
                        mask = _rasterize(geoms, idx_values, (ty, tx), Affine.identity(), b.mask_dtype)
                    if fmt.instances:
                        inst = _rasterize(geoms, np.arange(1, len(class_index) + 1), (ty, tx),
                                          Affine.identity(), np.uint32)
                    for raster in (mask, inst):
                        if raster is not None and chip_valid is not None:
                            raster[~chip_valid] = 0
                chip_id = job.id_offset + grid.chip_id(row, col) * n_angles + k
                stem = f"{chip_id:09d}"
                if angle == 0:  # chip_affine @ Affine.translation(cx0, cy0), as chips.parquet has it
                    transform = Affine(ca, cb, ca * cx0 + cb * cy0 + cc, cd, ce, cd * cx0 + ce * cy0 + cf)
                else:
                    transform = chip_affine @ to_raster
                if fmt.instances and angle == 0 and labels.raster is not None:
                    inst = _rasterize(geoms, np.arange(1, len(class_index) + 1), (ty, tx),
                                      Affine.identity(), np.uint32)
                elif inst is not None and angle == 0:
                    # block-wide instance ids → positions of this chip's features (1-based)
                    lookup = np.zeros(len(cand) + 1, np.uint32)
                    lookup[pos + 1] = np.arange(1, len(pos) + 1)
                    inst = lookup[inst]
                if inst is not None and class_index.size:
                    seen = np.bincount(inst.ravel(), minlength=class_index.size + 1)[1:] > 0
                    if not seen.all():  # no pixel centre in the chip (a sliver) or hidden by a later
                        # feature: no instance in the masks, so none in the statistics either
                        class_index, boxes, areas, geoms = _rows(seen, class_index, boxes, areas, geoms)
                        lookup = np.zeros(seen.size + 1, np.uint32)
                        lookup[1:][seen] = np.arange(1, int(seen.sum()) + 1, dtype=np.uint32)
                        inst = lookup[inst]
                        if job.only_with_features and class_index.size == 0:
                            continue
                label = ChipLabel(
                    stem=stem, image_name=f"{stem}.{job.encoder.extension}",
                    width=tx, height=ty, depth=src.count,
                    values=b.class_values[class_index + 1], boxes=boxes, class_index=class_index,
                    classes=labels.classes, mask=mask, instances=inst,
                    geoms=geoms if want_geoms else None,
                    encode_raster=lambda m, t=transform: job.encoder.label(m, t), rows=text,
                )
                image, files = out.write(split, label, chip, transform, fmt)
                if fmt.has_parts:
                    part_labels.append((chip_id, label))
                pixel_counts = None
                if mask is not None:
                    counts = np.bincount(mask.ravel(), minlength=int(b.class_values.max()) + 1)
                    pixel_counts = counts[b.class_values[1:]]
                if angle == 0:
                    out.record(split, chip_id, image, files, class_index, areas * labels.pixel_area,
                               pixel_counts, origin=(cy0 - wy0, cx0 - wx0))
                else:
                    out.record(split, chip_id, image, files, class_index, areas * labels.pixel_area,
                               pixel_counts, moments=_direct_moments(
                                   chip, None if chip_valid is None else _valid_mask(chip, src.nodata)))
    if fmt.has_parts:
        part = fmt.block_part([lab for _, lab in sorted(part_labels, key=lambda t: t[0])])
        job.store.put(f"{RUN_DIR}/parts/{block.id:07d}.part", part or b"")
    return out.finish(block, b.pixels, b.valid, (ty, tx))


def process_feature_block(block: FeatureBlock, job: Job, labels: LabelSet) -> BlockResult:
    """Export one chip per feature of ``block`` (Labeled_Tiles, Imagenet) and return its statistics.

    Each chip is the feature's window (the tile centred on it, or its bounding
    box); its label is that feature alone, clipped to the chip. With
    ``job.blacken_around_feature`` the pixels outside the feature are set to 0.
    """
    src = job.source
    b = _Block(block, job, labels)
    fmt = b.fmt
    wx0, wy0 = b.window[:2]
    out = _Output(job, src.count)
    for f, (x0, y0, x1, y1) in zip(block.features, block.windows, strict=True):
        split = split_of(job, (x0, y0, x1, y1))
        if split == "":
            continue
        sl = np.s_[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0]
        if b.any_valid is not None and not b.any_valid[sl].any():
            continue
        w, h = x1 - x0, y1 - y0
        one = np.array([f])
        box = (max(x0, 0), max(y0, 0), min(x1, src.width), min(y1, src.height))
        pos, boxes, areas, geoms = _chip_features(
            labels.geometries(one), labels.bounds[one], labels.areas[one], labels.polygonal[one], box, 0.0,
            True)
        if pos.size == 0:  # the tile centred on the feature misses its pixels (a ring round its centre,
            # parts far apart): still the feature's tile, as in ArcGIS, labelled with its box in the tile
            (fx0, fy0, fx1, fy1), (bx0, by0, bx1, by1) = labels.bounds[f], box
            boxes = np.array([[max(fx0, bx0), max(fy0, by0), min(fx1, bx1), min(fy1, by1)]])
            areas, geoms = np.zeros(1), np.array([shapely.Polygon()])
        chip = b.pixels[(slice(None), *sl)]
        local = shapely.transform(geoms, lambda xy, o=(x0, y0): xy - o)
        if job.blacken_around_feature:
            inside = _rasterize(local, np.ones(1, np.uint8), (h, w), Affine.identity(), np.uint8) > 0
            chip = np.where(inside, chip, np.zeros((), chip.dtype))
        class_index = labels.class_index[one]
        chip_id = job.id_offset + f
        stem = f"{chip_id:09d}"
        transform = src.chip_affine @ Affine.translation(x0, y0)
        label = ChipLabel(
            stem=stem, image_name=f"{stem}.{job.encoder.extension}", width=w, height=h, depth=src.count,
            values=b.class_values[class_index + 1],
            boxes=np.clip(boxes - (x0, y0, x0, y0), 0, (w, h, w, h)) + 0.0,
            class_index=class_index, classes=labels.classes, geoms=local,
            encode_raster=lambda m, t=transform: job.encoder.label(m, t),
        )
        image, files = out.write(split, label, chip, transform, fmt)
        valid = None if b.valid is None else b.valid[(slice(None), *sl)]
        out.record(split, chip_id, image, files, class_index, areas * labels.pixel_area, None,
                   moments=_direct_moments(chip, valid))
    return out.finish(block, None, None, (0, 0))


@dataclass(frozen=True)
class BlockFailed:
    """A block task's answer when its input is bad (a :class:`ChipflowError`): the client raises it.

    Returned, not raised: Dask would retry the task (the same input fails the
    same way) and log each failure's traceback on the worker.
    """

    error: ChipflowError


def run_block(block: Block | FeatureBlock, job: Job, labels: Any) -> BlockResult | BlockFailed:
    """The task: grid blocks and feature blocks alike (labels whole, or partitioned)."""
    try:
        if hasattr(labels, "subset"):  # partitioned class data: only the parts this block meets
            h = job.halo
            x0, y0, x1, y1 = block.window
            labels = labels.subset((x0 - h, y0 - h, x1 + h, y1 + h))
        if isinstance(block, FeatureBlock):
            return process_feature_block(block, job, labels)
        return process_block(block, job, labels)
    except ChipflowError as error:
        # without the chain that led to it: a rasterio error in it does not unpickle
        error.__cause__ = error.__context__ = None
        return BlockFailed(error)
