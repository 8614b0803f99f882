"""The plan of an export: plain data, computed before any pixel is read.

``plan_export`` validates the parameters, opens the raster's metadata, reads
the class data and lays out the chip grid and its blocks (dropping, with
``ONLY_TILES_WITH_FEATURES``, blocks that no feature touches). The same plan
drives :func:`chipflow.export_training_data` and ``chipflow plan`` (a dry run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely

from ._block import Job
from .config import ExportConfig, NoFeatureTiles, check_against_raster
from .encode import ChipEncoder
from .grid import Block, ChipGrid, plan_blocks
from .errors import InvalidParameterError
from .labels import LabelSet, empty_labels, read_class_data, read_mask
from .sources import RasterSource, open_raster
from .store import Store

__all__ = ["ExportPlan", "plan_export"]

#: Above this many chips, ``chipflow plan`` reports the upper bound instead of testing every chip.
_MAX_COUNTED_CHIPS = 5_000_000


@dataclass(frozen=True)
class ExportPlan:
    """Everything decided before the run: inputs, grid, and the blocks to run."""

    cfg: ExportConfig
    source: RasterSource
    labels: LabelSet
    grid: ChipGrid
    blocks: tuple[Block, ...]

    @property
    def only_with_features(self) -> bool:
        """Whether chips without features are skipped."""
        return (self.cfg.label_format.needs_labels
                and self.cfg.output_nofeature_tiles is NoFeatureTiles.ONLY_TILES_WITH_FEATURES)

    @property
    def image_extension(self) -> str:
        """The chips' file extension."""
        return self.cfg.image_chip_format.extension

    @property
    def label_extension(self) -> str:
        """The labels' file extension."""
        return self.cfg.label_format.label_extension(self.image_extension)

    def job(self, store: Store) -> Job:
        """What each block task needs (small and picklable)."""
        src = self.source
        return Job(
            source=src,
            grid=self.grid,
            store=store,
            encoder=ChipEncoder(self.image_extension, src.crs_wkt, src.axis_mapping, src.nodata),
            metadata_format=self.cfg.label_format.name,
            label_extension=self.label_extension,
            only_with_features=self.only_with_features,
            n_classes=len(self.labels.classes),
            class_values=tuple(c.value for c in self.labels.classes),
            angles=self.cfg.angles,
            min_overlap_ratio=self.cfg.min_polygon_overlap_ratio,
        )

    def chips_with_features(self) -> int | None:
        """Chips of the grid whose box meets a feature's bounds (None for huge grids)."""
        g = self.grid
        if g.n_chips > _MAX_COUNTED_CHIPS:
            return None
        x0, y0 = np.meshgrid(g.xs, g.ys)
        boxes = shapely.box(x0.ravel(), y0.ravel(), x0.ravel() + g.tile_x, y0.ravel() + g.tile_y)
        tree = shapely.STRtree(self.labels.geoms)
        hits, _ = tree.query(boxes, predicate="intersects")
        return int(np.unique(hits).size)

    def describe(self) -> dict[str, Any]:
        """The dry run's numbers (``chipflow plan``)."""
        g, src = self.grid, self.source
        chips_in_blocks = sum(b.n_chips for b in self.blocks)
        with_features = self.chips_with_features()
        expected = (with_features if self.only_with_features and with_features is not None
                    else chips_in_blocks)
        itemsize = np.dtype(src.dtype).itemsize
        raw = g.tile_x * g.tile_y * src.count * itemsize
        per_chip = {"tif": raw + 1024, "png": raw * 0.6, "jpg": raw * 0.15}[self.image_extension]
        per_label = g.tile_x * g.tile_y if self.cfg.label_format.rasterize else 600
        inside = self.labels.query((0, 0, src.width, src.height))
        per_class = np.bincount(self.labels.class_index[inside], minlength=len(self.labels.classes))
        n_tasks = len(self.blocks)
        level = n_tasks
        while level > 1:
            level = -(-level // 8)
            n_tasks += level
        return {
            "in_raster": src.path,
            "raster": {"width": src.width, "height": src.height, "bands": src.count, "dtype": src.dtype,
                       "crs_epsg": src.epsg, "cell_size": list(src.cell_size)},
            "grid": {"rows": g.n_rows, "columns": g.n_cols, "chips": g.n_chips,
                     "tile": [g.tile_x, g.tile_y], "stride": [g.stride_x, g.stride_y],
                     "edge_policy": g.edge.value},
            "blocks": len(self.blocks),
            "tasks": n_tasks,
            "chips_in_blocks": chips_in_blocks,
            "chips_with_features": with_features,
            "expected_chips": expected,
            "estimated_bytes": int(expected * (per_chip + per_label)),
            "metadata_format": self.cfg.label_format.name,
            "image_chip_format": self.cfg.image_chip_format.value,
            "features_over_raster": int(inside.size),
            "features_per_class": {c.name: int(n) for c, n in zip(self.labels.classes, per_class,
                                                                  strict=True)},
        }


def plan_export(cfg: ExportConfig, in_class_data: Any, in_mask_polygons: Any = None) -> ExportPlan:
    """Validate against the inputs and lay out the run, reading no pixels.

    Raises
    ------
    chipflow.errors.ChipflowError
        Any input that cannot be used, naming the parameter.
    """
    fmt = cfg.label_format
    if in_class_data is None and fmt.needs_labels:
        raise InvalidParameterError(
            "in_class_data", None, f"is required for metadata_format={fmt.name!r}; only formats "
            "without labels (Export_Tiles) run without class data")
    source = open_raster(cfg.in_raster[0])
    check_against_raster(cfg, width=source.width, height=source.height, count=source.count,
                         dtype=source.dtype)
    if in_class_data is None:
        labels = empty_labels(source)
    else:
        labels = read_class_data(in_class_data, class_value_field=cfg.class_value_field, source=source,
                                 buffer_radius=cfg.buffer_radius)
    labels.mask = read_mask(in_mask_polygons, source)
    grid = ChipGrid(source.width, source.height, cfg.tile_size_x, cfg.tile_size_y,
                    cfg.stride_x, cfg.stride_y, cfg.edge_policy)
    blocks = plan_blocks(grid, align=source.block_shape)
    if labels.mask is not None:  # blocks with no chip inside the mask polygons
        blocks = [b for b in blocks if shapely.intersects(labels.mask, shapely.box(*b.window))]
    if fmt.needs_labels and cfg.output_nofeature_tiles is NoFeatureTiles.ONLY_TILES_WITH_FEATURES:
        blocks = [b for b in blocks if labels.query(b.window).size]
    return ExportPlan(cfg, source, labels, grid, tuple(blocks))
