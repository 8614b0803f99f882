"""The block task: one window decoded once, every chip in it labelled, encoded and written.

This is the hot loop. Per block: one read, one STRtree query, one rasterize (for
mask formats), one pass of band moments. Per chip: a few numpy operations on
the block's candidate features, one vectorised shapely clip for the features
cut by the chip's edge, two encodes and two writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine

from .encode import ChipEncoder
from .formats import ChipLabel, get
from .grid import Block, ChipGrid
from .labels import LabelSet
from .sources import RasterSource, read_window
from .stats import BlockResult
from .store import Store

__all__ = ["Job", "process_block"]


@dataclass(frozen=True)
class Job:
    """Everything a block task needs besides the labels (small, picklable)."""

    source: RasterSource
    grid: ChipGrid
    store: Store
    encoder: ChipEncoder
    metadata_format: str
    label_extension: str
    only_with_features: bool
    n_classes: int
    class_values: tuple[int, ...]


def _valid_mask(pixels: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """Per band and pixel: not nodata (None when every pixel is valid)."""
    floating = pixels.dtype.kind == "f"
    if nodata is None and not floating:
        return None
    valid = np.ones(pixels.shape, bool)
    if floating:
        valid &= ~np.isnan(pixels)
    if nodata is not None and not np.isnan(nodata):
        valid &= pixels != np.asarray(nodata).astype(pixels.dtype)
    return valid


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


def _band_moments(pixels: np.ndarray, valid: np.ndarray | None, chips: list[tuple[int, int]],
                  tile: tuple[int, int]) -> tuple:
    """Per-band n, mean, M2, min, max of the exported chips' pixels (overlaps counted per chip).

    The block is cut into cells by the chips' edges; all pixels of a cell are in
    the same chips, so one pass of cell sums, weighted by each cell's chip count,
    gives the statistics of all chips at once. Integer data is summed exactly.
    """
    n_bands, h, w = pixels.shape
    ty, tx = tile
    cy0 = np.array([c[0] for c in chips])
    cx0 = np.array([c[1] for c in chips])
    ys, xs = _cell_starts(np.unique(cy0), ty, h), _cell_starts(np.unique(cx0), tx, w)
    weight = np.zeros((len(ys), len(xs)), np.int64)
    for y0, x0 in chips:  # chips covering each cell
        weight[np.searchsorted(ys, y0):np.searchsorted(ys, y0 + ty),
               np.searchsorted(xs, x0):np.searchsorted(xs, x0 + tx)] += 1
    covered = weight > 0
    heights = np.diff(np.append(ys, h))
    widths = np.diff(np.append(xs, w))
    n = np.zeros(n_bands, np.int64)
    mean, m2 = np.zeros(n_bands), np.zeros(n_bands)
    vmin, vmax = np.full(n_bands, np.inf), np.full(n_bands, -np.inf)
    kind, size = pixels.dtype.kind, pixels.dtype.itemsize
    exact = kind in "uib" and size <= 2
    wide = np.int32 if kind == "i" else (np.uint16 if size == 1 else np.uint32)
    for i in range(n_bands):
        band = pixels[i]
        if valid is None:
            count = np.outer(heights, widths)
            lo_band = hi_band = data = band
        else:
            count = _cell_sums(valid[i].view(np.uint8), ys, xs, dtype=np.int64)
            data = np.where(valid[i], band, 0)
            lo_band = np.where(valid[i], band, np.inf if kind == "f" else np.iinfo(band.dtype).max)
            hi_band = np.where(valid[i], band, -np.inf if kind == "f" else np.iinfo(band.dtype).min)
        total = int((weight * count).sum())
        if total == 0:
            continue
        has = covered & (count > 0)
        vmin[i] = _cell_sums(lo_band, ys, xs, np.minimum)[has].min()
        vmax[i] = _cell_sums(hi_band, ys, xs, np.maximum)[has].max()
        if exact:  # integer sums (Python ints): mean and M2 without rounding error
            wobj = weight.astype(object)
            s = int((wobj * _cell_sums(data, ys, xs, dtype=np.int64).astype(object)).sum())
            sq = data.astype(wide) ** 2
            ss = int((wobj * _cell_sums(sq, ys, xs, dtype=np.int64).astype(object)).sum())
            mean[i] = s / total
            m2[i] = (total * ss - s * s) / total
        else:  # two passes in float64
            f = data.astype(np.float64)
            mean[i] = float((weight * _cell_sums(f, ys, xs)).sum() / total)
            dev = (f - mean[i]) ** 2
            if valid is not None:
                dev[~valid[i]] = 0
            m2[i] = float((weight * _cell_sums(dev, ys, xs)).sum())
        n[i] = total
    return n, mean, m2, vmin, vmax


def _chip_features(
    labels: LabelSet, cand: np.ndarray, box: tuple[float, float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of ``cand`` inside pixel box ``(x0, y0, x1, y1)``.

    Returns the kept feature indices, their boxes (the pixel box of each feature
    clipped to the chip, in raster pixels) and clipped areas (pixels²).
    """
    x0, y0, x1, y1 = box
    b = labels.bounds[cand]
    poly = labels.polygonal[cand]
    # Polygons must overlap the chip's interior; points/lines use half-open edges.
    hit = (b[:, 0] < x1) & (b[:, 1] < y1) & np.where(poly, b[:, 2] > x0, b[:, 2] >= x0) & np.where(
        poly, b[:, 3] > y0, b[:, 3] >= y0
    )
    idx = cand[hit]
    boxes = b[hit].copy()
    areas = labels.areas[idx].copy()
    partial = (boxes[:, 0] < x0) | (boxes[:, 1] < y0) | (boxes[:, 2] > x1) | (boxes[:, 3] > y1)
    if partial.any():
        clipped = shapely.intersection(labels.geoms[idx[partial]], shapely.box(x0, y0, x1, y1))
        boxes[partial] = shapely.bounds(clipped)
        areas[partial] = shapely.area(clipped)
        keep = np.ones(len(idx), bool)
        keep[partial] = ~shapely.is_empty(clipped) & ((areas[partial] > 0) | ~labels.polygonal[idx[partial]])
        idx, boxes, areas = idx[keep], boxes[keep], areas[keep]
    return idx, boxes, areas


def _rasterize(labels: LabelSet, cand: np.ndarray, window: tuple[int, int, int, int],
               values: np.ndarray) -> np.ndarray:
    """Class values of the block's pixels (0 = background); later features win."""
    from rasterio.features import rasterize

    x0, y0, x1, y1 = window
    dtype = np.uint8 if values.max(initial=0) <= 255 else np.uint16
    if cand.size == 0:
        return np.zeros((y1 - y0, x1 - x0), dtype)
    shapes = zip(labels.geoms[cand].tolist(), values[labels.class_index[cand]].tolist(), strict=True)
    return rasterize(shapes, out_shape=(y1 - y0, x1 - x0), transform=Affine.translation(x0, y0),
                     fill=0, dtype=dtype)


def process_block(block: Block, job: Job, labels: LabelSet) -> BlockResult:
    """Export every chip of ``block`` and return its statistics."""
    src, grid, fmt = job.source, job.grid, get(job.metadata_format)
    bx0, by0, bx1, by1 = block.window
    pixels = read_window(src, block.window)
    valid = _valid_mask(pixels, src.nodata)
    any_valid = None if valid is None else valid.any(axis=0)
    # The raster's own extent inside the block (the block reaches past it under PAD).
    inside = (max(bx0, 0), max(by0, 0), min(bx1, src.width), min(by1, src.height))
    if any_valid is None and inside != block.window:
        any_valid = np.zeros(pixels.shape[1:], bool)
        any_valid[inside[1] - by0:inside[3] - by0, inside[0] - bx0:inside[2] - bx0] = True
    cand = labels.query(inside)
    class_values = np.asarray((0, *job.class_values), dtype=np.int64)  # index 0 unused
    mask = None
    if fmt.rasterize:
        mask = _rasterize(labels, cand, block.window, class_values[1:])
        if any_valid is not None:
            mask[~any_valid] = 0
    result = BlockResult(job.n_classes, src.count)
    ids: list[int] = []
    exported: list[tuple[int, int]] = []  # chip origins in block pixels
    xs, ys = grid.xs, grid.ys
    tx, ty = grid.tile_x, grid.tile_y
    a = src.affine
    for row in range(*block.rows):
        cy0 = int(ys[row])
        for col in range(*block.cols):
            cx0 = int(xs[col])
            sl = np.s_[cy0 - by0:cy0 - by0 + ty, cx0 - bx0:cx0 - bx0 + tx]
            if any_valid is not None and not any_valid[sl].any():
                continue  # entirely nodata: not exported
            box = (max(cx0, 0), max(cy0, 0), min(cx0 + tx, src.width), min(cy0 + ty, src.height))
            idx, boxes, areas = _chip_features(labels, cand, box)
            if job.only_with_features and idx.size == 0:
                continue
            chip_id = grid.chip_id(row, col)
            stem = f"{chip_id:09d}"
            transform = a @ Affine.translation(cx0, cy0)
            for suffix, data in job.encoder.image(pixels[(slice(None), *sl)], transform):
                job.store.put(f"images/{stem}{suffix}", data)
            boxes = np.clip(boxes - (cx0, cy0, cx0, cy0), 0, (tx, ty, tx, ty)) + 0.0
            chip_mask = None if mask is None else mask[sl]
            label = ChipLabel(
                stem=stem,
                image_name=f"{stem}.{job.encoder.extension}",
                width=tx, height=ty, depth=src.count,
                values=class_values[labels.class_index[idx] + 1],
                boxes=boxes,
                mask=chip_mask,
                encode_raster=lambda m, t=transform: job.encoder.label(m, t),
            )
            job.store.put(f"labels/{stem}.{job.label_extension}", fmt.encode(label))
            result.add_chip_features(labels.class_index[idx], areas * labels.pixel_area)
            if chip_mask is not None:
                counts = np.bincount(chip_mask.ravel(), minlength=int(class_values.max()) + 1)
                result.add_chip_pixels(counts[class_values[1:]])
            exported.append((cy0 - by0, cx0 - bx0))
            ids.append(chip_id)
    result.chip_ids = np.asarray(ids, np.int64)
    if ids:
        if inside != block.window:  # padding is not data
            pad = np.zeros(pixels.shape, bool) if valid is None else ~valid
            pad[:, ~any_valid] = True
            valid = ~pad
        result.add_band_moments(*_band_moments(pixels, valid, exported, (ty, tx)))
    job.store.commit_block(block.id, result.to_json())  # after every file of the block
    return result
