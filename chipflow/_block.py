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


def _band_moments(pixels: np.ndarray, valid: np.ndarray | None, weights: np.ndarray) -> tuple:
    """Per-band n, mean, M2, min, max over pixels weighted by how many chips hold them."""
    n_bands = pixels.shape[0]
    covered = weights > 0
    n = np.zeros(n_bands, np.int64)
    mean, m2 = np.zeros(n_bands), np.zeros(n_bands)
    vmin, vmax = np.full(n_bands, np.inf), np.full(n_bands, -np.inf)
    exact = pixels.dtype.kind in "ub"
    for i in range(n_bands):
        band = pixels[i]
        w = weights if valid is None else weights * valid[i]
        total = int(w.sum(dtype=np.int64))
        if total == 0:
            continue
        sel = covered if valid is None else (covered & valid[i])
        vals = band[sel]
        vmin[i], vmax[i] = vals.min(), vals.max()
        if exact:  # integer sums are exact: mean and M2 without cancellation error
            s = int((w.astype(np.int64) * band).sum(dtype=np.int64))
            ss = int((w.astype(np.int64) * band.astype(np.int64) ** 2).sum(dtype=np.int64))
            mean[i] = s / total
            m2[i] = (total * ss - s * s) / total
        else:
            wf = w.astype(np.float64)
            bf = np.where(w > 0, band, 0).astype(np.float64)
            mean[i] = float((wf * bf).sum() / total)
            m2[i] = float((wf * (bf - mean[i]) ** 2).sum())
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
    weights = np.zeros(pixels.shape[1:], np.int32)
    ids: list[int] = []
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
            weights[sl] += 1
            ids.append(chip_id)
    result.chip_ids = np.asarray(ids, np.int64)
    if inside != block.window:  # padding is not data
        keep = np.zeros_like(weights)
        iy, ix = np.s_[inside[1] - by0:inside[3] - by0], np.s_[inside[0] - bx0:inside[2] - bx0]
        keep[iy, ix] = weights[iy, ix]
        weights = keep
    if ids:
        result.add_band_moments(*_band_moments(pixels, valid, weights))
    return result
