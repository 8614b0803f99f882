"""Chip and block geometry: pure functions and frozen values, no I/O.

A chip is a window of ``tile_y x tile_x`` pixels of the source raster. Chips are
laid out on a regular grid with the given stride; they are grouped into
rectangular *blocks* of chips, and each block is one Dask task that decodes the
union of its chips' windows once.

Edge policy (what happens at the last, partial row/column of chips):

``DROP`` (default)
    Only chips that lie completely inside the raster. Along one axis of
    ``size`` pixels there are ``(size - tile) // stride + 1`` chips. Every chip
    holds real pixels; up to ``stride - 1`` trailing pixels are not covered.
``PAD``
    Chips start at ``0, stride, 2*stride, ...`` until the raster is covered:
    ``ceil((size - tile) / stride) + 1`` chips. Pixels past the raster's edge are
    filled with the raster's nodata value (0 without one) and label 0.
``SHIFT``
    As many chips as ``PAD``, but the last one is moved back to end exactly at
    the raster's edge, so every chip holds real pixels and the raster is covered
    (the last stride is shorter).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

__all__ = ["Block", "ChipGrid", "EdgePolicy", "FeatureBlock", "chip_offsets", "plan_blocks",
           "plan_feature_blocks"]


class EdgePolicy(str, Enum):
    """How the last, partial row/column of chips is handled."""

    DROP = "DROP"
    PAD = "PAD"
    SHIFT = "SHIFT"


def chip_offsets(*, size: int, tile: int, stride: int, edge: EdgePolicy) -> np.ndarray:
    """Pixel offsets of the chips along one axis.

    Parameters
    ----------
    size : int
        Raster size along the axis, in pixels.
    tile : int
        Chip size along the axis.
    stride : int
        Distance between consecutive chips.
    edge : EdgePolicy
        What to do with the last, partial chip.

    Returns
    -------
    numpy.ndarray
        int64 offsets, ascending.

    Examples
    --------
    >>> chip_offsets(size=1000, tile=256, stride=256, edge=EdgePolicy.DROP).tolist()
    [0, 256, 512]
    >>> chip_offsets(size=1000, tile=256, stride=256, edge=EdgePolicy.PAD).tolist()
    [0, 256, 512, 768]
    >>> chip_offsets(size=1000, tile=256, stride=256, edge=EdgePolicy.SHIFT).tolist()
    [0, 256, 512, 744]
    """
    if size < tile:
        if edge is EdgePolicy.PAD:
            return np.zeros(1, dtype=np.int64)
        return np.zeros(0, dtype=np.int64)
    if edge is EdgePolicy.DROP:
        n = (size - tile) // stride + 1
        return np.arange(n, dtype=np.int64) * stride
    n = math.ceil((size - tile) / stride) + 1
    offsets = np.arange(n, dtype=np.int64) * stride
    if edge is EdgePolicy.SHIFT:
        offsets[-1] = size - tile
    return offsets


@dataclass(frozen=True)
class ChipGrid:
    """The chip layout over one raster.

    Chip ``(row, col)`` has id ``row * n_cols + col``: its name depends only on its
    grid position, never on which task wrote it or when.
    """

    width: int
    height: int
    tile_x: int
    tile_y: int
    stride_x: int
    stride_y: int
    edge: EdgePolicy = EdgePolicy.DROP

    @functools.cached_property
    def xs(self) -> np.ndarray:
        """Column offsets of the chip columns (computed once per grid: block tasks ask per chip)."""
        return chip_offsets(size=self.width, tile=self.tile_x, stride=self.stride_x, edge=self.edge)

    @functools.cached_property
    def ys(self) -> np.ndarray:
        """Row offsets of the chip rows (computed once per grid: block tasks ask per chip)."""
        return chip_offsets(size=self.height, tile=self.tile_y, stride=self.stride_y, edge=self.edge)

    @property
    def n_cols(self) -> int:
        """Number of chip columns."""
        return len(self.xs)

    @property
    def n_rows(self) -> int:
        """Number of chip rows."""
        return len(self.ys)

    @property
    def n_chips(self) -> int:
        """Number of chips in the full grid (before any filtering)."""
        return self.n_rows * self.n_cols

    def chip_id(self, row: int, col: int) -> int:
        """The stable id of chip ``(row, col)``."""
        return row * self.n_cols + col


@dataclass(frozen=True)
class Block:
    """A rectangle of chips processed by one task.

    ``rows``/``cols`` are the chip-grid index ranges ``[start, stop)``; ``window`` is
    the union of the chips' pixel windows as ``(x0, y0, x1, y1)``, which may reach
    past the raster's edge under ``EdgePolicy.PAD``.
    """

    id: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    window: tuple[int, int, int, int]

    @property
    def n_chips(self) -> int:
        """Chips in the block."""
        return (self.rows[1] - self.rows[0]) * (self.cols[1] - self.cols[0])


def _block_side(n: int, tile: int, stride: int, max_pixels: int, align: int) -> int:
    """Chips per block along one axis.

    At most ``max_pixels`` of window, at least 4 blocks along the axis where the
    grid allows, and a block step that is a multiple of ``align`` (the file's
    internal tile size) where possible.
    """
    k = max(1, (max_pixels - tile) // stride + 1)
    k = min(k, max(1, math.ceil(n / 4)))
    if align > stride and align % stride == 0 and k >= align // stride:
        k -= k % (align // stride)
    return k


def plan_blocks(
    grid: ChipGrid, *, max_block_pixels: int = 2048, align: tuple[int, int] = (1, 1)
) -> list[Block]:
    """Group the chip grid into blocks.

    The layout depends only on the grid and the file's internal tiling, never on
    the number of workers, so outputs and statistics are identical on any cluster.

    Parameters
    ----------
    grid : ChipGrid
        The chip layout.
    max_block_pixels : int
        Upper bound on a block window's side, in pixels (the memory knob).
    align : tuple of int
        The raster's internal ``(tile_y, tile_x)``; block steps are aligned to it
        where the stride allows.

    Examples
    --------
    >>> g = ChipGrid(1024, 1024, 256, 256, 128, 128)
    >>> blocks = plan_blocks(g)
    >>> len(blocks), sum(b.n_chips for b in blocks) == g.n_chips
    (16, True)
    """
    ys, xs = grid.ys, grid.xs
    ky = _block_side(len(ys), grid.tile_y, grid.stride_y, max_block_pixels, align[0])
    kx = _block_side(len(xs), grid.tile_x, grid.stride_x, max_block_pixels, align[1])
    blocks = []
    for r0 in range(0, len(ys), ky):
        r1 = min(r0 + ky, len(ys))
        for c0 in range(0, len(xs), kx):
            c1 = min(c0 + kx, len(xs))
            window = (
                int(xs[c0]),
                int(ys[r0]),
                int(xs[c1 - 1]) + grid.tile_x,
                int(ys[r1 - 1]) + grid.tile_y,
            )
            blocks.append(Block(len(blocks), (r0, r1), (c0, c1), window))
    return blocks


@dataclass(frozen=True)
class FeatureBlock:
    """Feature-centred chips (Labeled_Tiles, Imagenet) processed by one task.

    ``features`` are feature positions; ``windows`` each one's chip window
    ``(x0, y0, x1, y1)``; ``window`` their union, read once.
    """

    id: int
    features: tuple[int, ...]
    windows: tuple[tuple[int, int, int, int], ...]
    window: tuple[int, int, int, int]

    @property
    def n_chips(self) -> int:
        """Chips in the block (one per feature)."""
        return len(self.features)


def feature_windows(bounds: np.ndarray, *, tile_x: int, tile_y: int, fixed: bool) -> np.ndarray:
    """Each feature's chip window: ``tile`` centred on its box (``fixed``), or its box rounded out.

    >>> feature_windows(np.array([[10.0, 20.0, 30.5, 41.0]]), tile_x=64, tile_y=64, fixed=True).tolist()
    [[-12, -1, 52, 63]]
    >>> feature_windows(np.array([[10.2, 20.0, 30.5, 41.0]]), tile_x=64, tile_y=64, fixed=False).tolist()
    [[10, 20, 31, 41]]
    """
    if fixed:
        cx = (bounds[:, 0] + bounds[:, 2]) / 2
        cy = (bounds[:, 1] + bounds[:, 3]) / 2
        x0 = np.floor(cx - tile_x / 2 + 0.5).astype(np.int64)
        y0 = np.floor(cy - tile_y / 2 + 0.5).astype(np.int64)
        return np.column_stack([x0, y0, x0 + tile_x, y0 + tile_y])
    x0, y0 = np.floor(bounds[:, 0]).astype(np.int64), np.floor(bounds[:, 1]).astype(np.int64)
    x1 = np.maximum(np.ceil(bounds[:, 2]).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.ceil(bounds[:, 3]).astype(np.int64), y0 + 1)
    return np.column_stack([x0, y0, x1, y1])


def plan_feature_blocks(features: np.ndarray, windows: np.ndarray, *, cell: int = 1024,
                        max_features: int = 128) -> list[FeatureBlock]:
    """Group feature chips into blocks by the ``cell`` their window's centre falls in.

    The grouping depends only on the features, never on the cluster.
    """
    if len(features) == 0:
        return []
    cx = (windows[:, 0] + windows[:, 2]) // 2 // cell
    cy = (windows[:, 1] + windows[:, 3]) // 2 // cell
    order = np.lexsort((features, cx, cy))
    blocks: list[FeatureBlock] = []
    start = 0
    keys = list(zip(cy[order].tolist(), cx[order].tolist(), strict=True))
    for i in range(1, len(order) + 1):
        if i == len(order) or keys[i] != keys[start] or i - start == max_features:
            sel = order[start:i]
            w = windows[sel]
            blocks.append(FeatureBlock(
                len(blocks), tuple(int(f) for f in features[sel]), tuple(tuple(int(v) for v in r) for r in w),
                (int(w[:, 0].min()), int(w[:, 1].min()), int(w[:, 2].max()), int(w[:, 3].max()))))
            start = i
    return blocks
