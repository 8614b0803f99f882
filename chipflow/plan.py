"""The plan of an export: plain data, computed before any pixel is read.

``plan_export`` validates the parameters, opens the rasters' metadata, reads
the class data and lays out each input's chip grid and blocks (dropping blocks
outside the mask polygons and, with ``ONLY_TILES_WITH_FEATURES``, blocks no
feature touches). The same plan drives :func:`chipflow.export_training_data`
and ``chipflow plan`` (a dry run).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from affine import Affine

from ._block import Job, chip_reach, crosses_split_cell
from .config import (
    CropMode,
    ExportConfig,
    NoFeatureTiles,
    ProcessingMode,
    ReferenceSystem,
    check_against_raster,
)
from .encode import ChipEncoder
from .errors import ChipflowWarning, InvalidParameterError, LabelError
from .formats.base import LabelFormat
from .grid import Block, ChipGrid, FeatureBlock, feature_windows, plan_blocks, plan_feature_blocks
from .labels import LabelSet, class_keys, describe, empty_labels, read_class_data, read_mask
from .sources import RasterSource, open_sources
from .store import Store

__all__ = ["ExportPlan", "PlanItem", "plan_export"]

#: Above this many chips, ``chipflow plan`` reports the upper bound instead of testing every chip.
_MAX_COUNTED_CHIPS = 5_000_000


@dataclass(frozen=True)
class PlanItem:
    """One chip grid: a raster (or mosaic), its labels in its pixel space, its blocks.

    Chip ids of this item start at ``id_offset``, so names stay unique across items.
    """

    source: RasterSource
    labels: LabelSet
    grid: ChipGrid
    blocks: tuple[Block | FeatureBlock, ...]
    id_offset: int


@dataclass(frozen=True)
class ExportPlan:
    """Everything decided before the run: inputs, grids, and the blocks to run."""

    cfg: ExportConfig
    items: tuple[PlanItem, ...]

    @property
    def source(self) -> RasterSource:
        """The first item's raster (band names, CRS and cell size of the dataset)."""
        return self.items[0].source

    @property
    def labels(self) -> LabelSet:
        """The first item's labels (the classes are the same in every item)."""
        return self.items[0].labels

    @property
    def blocks(self) -> tuple[Block | FeatureBlock, ...]:
        """Every block of every item (ids unique)."""
        return tuple(b for item in self.items for b in item.blocks)

    @property
    def only_with_features(self) -> bool:
        """Whether chips without features are skipped."""
        return (self.cfg.label_format.needs_labels
                and self.cfg.output_nofeature_tiles is NoFeatureTiles.ONLY_TILES_WITH_FEATURES)

    @property
    def n_chip_ids(self) -> int:
        """One past the largest chip id of any item (ids are stable, so the exported ones have gaps)."""
        last = self.items[-1]
        ids = len(last.labels) if self.cfg.label_format.feature_chips else last.grid.n_chips * len(
            self.cfg.angles)
        return last.id_offset + ids

    @property
    def image_extension(self) -> str:
        """The chips' file extension."""
        return self.cfg.image_chip_format.extension

    @property
    def label_extension(self) -> str:
        """The labels' file extension."""
        return self.cfg.label_format.label_extension(self.image_extension)

    def job(self, item: PlanItem, store: Store) -> Job:
        """What each block task of ``item`` needs (small and picklable)."""
        src = item.source
        return Job(
            source=src,
            grid=item.grid,
            store=store,
            encoder=ChipEncoder(self.image_extension, "" if src.pixel_space else src.crs_wkt,
                                src.axis_mapping, src.nodata),
            metadata_format=self.cfg.label_format.name,
            label_extension=self.label_extension,
            only_with_features=self.only_with_features,
            n_classes=len(item.labels.classes),
            class_values=tuple(c.value for c in item.labels.classes),
            angles=(0.0,) if self.cfg.label_format.feature_chips else self.cfg.angles,
            id_offset=item.id_offset,
            min_overlap_ratio=self.cfg.min_polygon_overlap_ratio,
            blacken_around_feature=self.cfg.blacken_around_feature,
            splits=self.cfg.split,
            split_block=self.split_block,
            seed=self.cfg.seed,
        )

    @property
    def split_block(self) -> int:
        """The side, in pixels, of the cells whole chips are assigned to splits by."""
        cfg = self.cfg
        step = (max(cfg.tile_size_x, cfg.tile_size_y) if cfg.label_format.feature_chips
                else max(cfg.stride_x, cfg.stride_y))
        return cfg.split_block_size * step

    def _grid_chips(self, item: PlanItem) -> np.ndarray:
        """The boxes of the grid chips of ``item`` an export can write.

        Inside the mask polygons, and with splits inside one split cell (chips
        crossing a cell edge are dropped).
        """
        g = item.grid
        x0, y0 = (a.ravel() for a in np.meshgrid(np.asarray(g.xs, np.int64), np.asarray(g.ys, np.int64)))
        ok = np.ones(x0.size, bool)
        if self.cfg.split:
            reach = chip_reach(x0, y0, g.tile_x, g.tile_y, self.cfg.angles,  # rotated chips read past
                               (item.source.width, item.source.height))
            ok &= ~crosses_split_cell(*reach, self.split_block)
        boxes = shapely.box(x0[ok], y0[ok], x0[ok] + g.tile_x, y0[ok] + g.tile_y)
        return boxes if item.labels.mask is None else boxes[shapely.covers(item.labels.mask, boxes)]

    def chips_with_features(self) -> int | None:
        """Chips a feature overlaps, as the export counts them, over all items and angles.

        Polygons must overlap a chip's interior, by ``min_polygon_overlap_ratio``
        of their area at least; a rotated chip is its own footprint, turned about
        the grid chip's centre; only chips the export can write count
        (:meth:`_grid_chips`). None for huge grids and for class rasters, whose
        features are only found while their pixels are read.
        """
        total = 0
        for item in self.items:
            if item.grid.n_chips > _MAX_COUNTED_CHIPS or item.labels.raster is not None:
                return None
            if len(item.labels) == 0:
                continue
            boxes, labels = self._grid_chips(item), item.labels
            tree = shapely.STRtree(labels.geoms)
            for angle in self.cfg.angles:
                frames = _footprints(boxes, angle, (item.source.width, item.source.height))
                chips, features = tree.query(frames, predicate="intersects")
                geoms, poly = labels.geoms[features], labels.polygonal[features]
                keep = ~poly | shapely.relate_pattern(geoms, frames[chips], "T********")  # not just an edge
                ratio = self.cfg.min_polygon_overlap_ratio
                if ratio > 0:  # as the blocks test it: the part in the chip against the whole
                    full = labels.areas[features]
                    keep &= (full <= 0) | (shapely.area(shapely.intersection(geoms, frames[chips]))
                                           >= ratio * full)
                total += int(np.unique(chips[keep]).size)
        return total

    def chips_in_grid(self) -> int | None:
        """Grid chips the export can write whatever their features, over all items and angles."""
        if any(item.grid.n_chips > _MAX_COUNTED_CHIPS for item in self.items):
            return None
        return sum(len(self._grid_chips(item)) for item in self.items) * len(self.cfg.angles)

    def describe(self) -> dict[str, Any]:
        """The dry run's numbers (``chipflow plan``)."""
        src, n_angles = self.source, len(self.cfg.angles)
        grids = [item.grid for item in self.items]
        chips_in_blocks = sum(b.n_chips for b in self.blocks) * n_angles
        with_features = self.chips_with_features()
        if self.cfg.label_format.feature_chips:
            expected = chips_in_blocks
            if self.cfg.split:  # a feature's window across a split cell's edge gets no chip (no leak)
                windows = np.array([w for item in self.items for b in item.blocks for w in b.windows],
                                   np.int64).reshape(-1, 4)
                expected = int((~crosses_split_cell(*windows.T, self.split_block)).sum()) * n_angles
        elif self.only_with_features and with_features is not None:
            expected = with_features
        else:
            expected = self.chips_in_grid() or chips_in_blocks
        raw = grids[0].tile_x * grids[0].tile_y * src.count * np.dtype(src.dtype).itemsize
        per_chip = {"tif": raw + 1024, "png": raw * 0.6, "jpg": raw * 0.15, "zarr": raw * 0.8,
                    "mrf": raw * 0.8}[
            self.image_extension]
        per_label = grids[0].tile_x * grids[0].tile_y if self.cfg.label_format.rasterize else 600
        per_class = np.zeros(len(self.labels.classes), np.int64)
        features = 0
        for item in self.items:
            inside = item.labels.query((0, 0, item.source.width, item.source.height))
            features += int(inside.size)
            per_class += np.bincount(item.labels.class_index[inside], minlength=len(per_class))
        # one Dask task per block (the client merges their results), and one that builds a
        # format's dataset-wide file from the blocks' parts (COCO's annotations)
        n_tasks = len(self.blocks) + int(self.cfg.label_format.has_parts)
        g = grids[0]
        return {
            "in_raster": src.path,
            "items": len(self.items),
            "raster": {"width": src.width, "height": src.height, "bands": src.count, "dtype": src.dtype,
                       "crs_epsg": src.epsg, "cell_size": list(src.cell_size)},
            "grid": {"rows": g.n_rows, "columns": g.n_cols, "chips": sum(x.n_chips for x in grids),
                     "tile": [g.tile_x, g.tile_y], "stride": [g.stride_x, g.stride_y],
                     "edge_policy": g.edge.value, "angles": list(self.cfg.angles)},
            "blocks": len(self.blocks),
            "tasks": n_tasks,
            "chips_in_blocks": chips_in_blocks,
            "chips_with_features": with_features,
            "expected_chips": expected,
            # chips wholly nodata, boxes too thin to keep and instances without a pixel are only
            # found as the blocks read the pixels: the export writes this many or fewer
            "expected_chips_upper_bound": True,
            "estimated_bytes": int(expected * (per_chip + per_label)),
            "metadata_format": self.cfg.label_format.name,
            "image_chip_format": self.cfg.image_chip_format.value,
            # a class raster's features (its regions) are only found as the blocks read its pixels
            "class_raster": self.labels.raster is not None,
            "features_over_raster": None if self.labels.raster is not None else features,
            "features_per_class": {k: None if self.labels.raster is not None else int(n)
                                   for k, n in zip(class_keys(self.labels.classes), per_class, strict=True)},
        }


def _feature_blocks(cfg: ExportConfig, source: RasterSource, labels: LabelSet) -> list[FeatureBlock]:
    """One chip per feature over the raster (inside the mask polygons, if any).

    A feature larger than the tile, centred beyond the raster's edge, may reach into
    the raster while its centred chip lies wholly outside it: it gets no chip (there
    are no pixels to cut), and such features are counted in a warning.
    """
    w, h = source.width, source.height
    inside = labels.query((0, 0, w, h))
    inside = inside[shapely.intersects(labels.geometries(inside), shapely.box(0, 0, w, h))]
    windows = feature_windows(labels.bounds[inside], tile_x=cfg.tile_size_x, tile_y=cfg.tile_size_y,
                              fixed=cfg.crop_mode is CropMode.FIXED_SIZE)
    on = (windows[:, 0] < w) & (windows[:, 1] < h) & (windows[:, 2] > 0) & (windows[:, 3] > 0)
    if not on.all():
        warnings.warn(
            f"{int((~on).sum())} of {len(on)} features over the raster get no chip: each reaches into "
            f"the raster, but its centred {cfg.tile_size_x} x {cfg.tile_size_y} px chip lies wholly "
            "outside it (a feature larger than the chip, centred beyond the raster's edge); "
            "crop_mode='BOUNDING_BOX' gives every feature its chip", ChipflowWarning, stacklevel=5)
        inside, windows = inside[on], windows[on]
    if labels.mask is not None and len(inside):
        keep = shapely.covers(labels.mask, shapely.box(*windows.T))
        inside, windows = inside[keep], windows[keep]
    return plan_feature_blocks(inside, windows)


def _named_as_written(labels: LabelSet, in_class_data: Any, fmt: LabelFormat) -> None:
    """Rename classes whose names the format cannot write as they are (with a warning).

    Formats that write class names into their labels are read by the class ``Name``
    of the emd: arcgis.learn looks for ``labels/<Name>/`` (a folder per class), or
    splits MultiLabeled_Tiles' ``<name>`` on commas. A name such as ``"a/b"`` cannot
    be a folder, and ``"a,b"`` would read as two labels, so the class is called as
    the format writes it (``"a_b"``) everywhere.
    """
    try:
        spelled = fmt.class_spellings(labels.classes)
    except ValueError as error:  # two names with one spelling
        raise InvalidParameterError("in_class_data", describe(in_class_data), str(error)) from None
    if spelled is None:
        return
    renamed = [(c.name, spelled[c.value]) for c in labels.classes if spelled[c.value] != c.name]
    if renamed:
        how = "a folder after each class, and a folder cannot be named so" if fmt.class_folders else (
            "the classes of each chip in one comma-separated label, and a name cannot hold a comma")
        warnings.warn(
            f"metadata_format={fmt.name!r} names {how}: "
            + ", ".join(f"class {old!r} is renamed {new!r}" for old, new in renamed)
            + " (its labels, the emd and the statistics)", ChipflowWarning, stacklevel=4)
        labels.classes = tuple(dataclasses.replace(c, name=spelled[c.value]) for c in labels.classes)


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
    if cfg.split:
        if fmt.has_parts:
            raise InvalidParameterError(
                "split", dict(cfg.split), f"is not supported with metadata_format={fmt.name!r} yet (its "
                "dataset-wide file); use the chip index's split column, or an ArcGIS format")
        step = max(cfg.stride_x, cfg.stride_y) if not fmt.feature_chips else max(cfg.tile_size_x,
                                                                                  cfg.tile_size_y)
        if cfg.split_block_size * step < max(cfg.tile_size_x, cfg.tile_size_y):
            raise InvalidParameterError(
                "split_block_size", cfg.split_block_size,
                f"gives split cells of {cfg.split_block_size * step} px, smaller than a chip "
                f"({max(cfg.tile_size_x, cfg.tile_size_y)} px); use a larger split_block_size")
    if cfg.reference_system is ReferenceSystem.IMAGE_SPACE:
        warnings.warn(
            "reference_system='IMAGE_SPACE' needs the sensor model's top-up rotation, which chipflow "
            "does not read; chips are cut on the raw pixel grid as with PIXEL_SPACE",
            ChipflowWarning, stacklevel=3)
    sources = open_sources(
        cfg.in_raster, mosaic=cfg.processing_mode is ProcessingMode.PROCESS_AS_MOSAICKED_IMAGE,
        pixel_space=cfg.reference_system is not ReferenceSystem.MAP_SPACE,
        cell_size=cfg.cell_size, extent=cfg.extent)
    items: list[PlanItem] = []
    id_offset = block_offset = 0
    for source in sources:
        check_against_raster(cfg, width=source.width, height=source.height, count=source.count,
                             dtype=source.dtype)
        if in_class_data is None:
            labels = empty_labels(source)
        else:
            labels = read_class_data(in_class_data, class_value_field=cfg.class_value_field,
                                     source=source, buffer_radius=cfg.buffer_radius,
                                     require_overlap=len(sources) == 1)
        labels.mask = read_mask(in_mask_polygons, source)
        if fmt.boxes and cfg.buffer_radius == 0 and not labels.polygonal.all():
            warnings.warn(
                f"in_class_data={describe(in_class_data)} holds {int((~labels.polygonal).sum())} points "
                f"or lines and buffer_radius=0: their {fmt.name} boxes have no area or no width, which "
                "detectors' training code rejects; set buffer_radius (in the class data's CRS units) to "
                "give them an area", ChipflowWarning, stacklevel=3)
        _named_as_written(labels, in_class_data, fmt)
        if labels.raster is not None and fmt.feature_chips:
            raise InvalidParameterError(
                "in_class_data", in_class_data, f"is a class raster, and metadata_format={fmt.name!r} makes "
                "one chip per feature, which chipflow needs vector class data for; use a grid format "
                "(Classified_Tiles, RCNN_Masks, the box formats) or polygonize the raster "
                "(gdal_polygonize.py)")
        if labels.raster is not None and source.pixel_space:
            raise InvalidParameterError(
                "in_class_data", in_class_data, f"is a class raster, which chipflow reads in map space: "
                f"reference_system={cfg.reference_system.value!r} needs vector class data (in pixels); "
                "use reference_system='MAP_SPACE'")
        grid = ChipGrid(source.width, source.height, cfg.tile_size_x, cfg.tile_size_y,
                        cfg.stride_x, cfg.stride_y, cfg.edge_policy)
        if fmt.feature_chips:
            fblocks = _feature_blocks(cfg, source, labels)
            fblocks = [dataclasses.replace(b, id=b.id + block_offset) for b in fblocks]
            items.append(PlanItem(source, labels, grid, tuple(fblocks), id_offset))
            id_offset += len(labels)
            block_offset += len(fblocks)
            continue
        blocks = plan_blocks(grid, align=source.block_shape)
        if labels.mask is not None:  # blocks with no chip inside the mask polygons
            blocks = [b for b in blocks if shapely.intersects(labels.mask, shapely.box(*b.window))]
        if (fmt.needs_labels and labels.raster is None
                and cfg.output_nofeature_tiles is NoFeatureTiles.ONLY_TILES_WITH_FEATURES):
            blocks = [b for b in blocks if labels.query(b.window).size]
        blocks = [dataclasses.replace(b, id=b.id + block_offset) for b in blocks]
        items.append(PlanItem(source, labels, grid, tuple(blocks), id_offset))
        id_offset += grid.n_chips * len(cfg.angles)
        block_offset += grid.n_chips  # an upper bound on the item's block count
    if in_class_data is not None and len(items) > 1 and not any(
            item.labels.query((0, 0, item.source.width, item.source.height)).size for item in items):
        raise LabelError(f"in_class_data={describe(in_class_data)} does not overlap any of the "
                         f"{len(items)} input rasters ({items[0].source.path!r}, ...)")
    return ExportPlan(cfg, tuple(items))


def _footprints(boxes: np.ndarray, angle: float, size: tuple[int, int]) -> np.ndarray:
    """Chips' footprints in raster pixels, as the blocks see them.

    Unrotated, their boxes clipped to the raster; rotated by ``angle``, each box
    turned about its centre (``_block._rotation``, whose exact quarter turns these share).
    """
    x0, y0, x1, y1 = shapely.bounds(boxes).T
    if angle == 0:
        return shapely.box(np.maximum(x0, 0), np.maximum(y0, 0), np.minimum(x1, size[0]),
                           np.minimum(y1, size[1]))
    turn = Affine.rotation(angle)
    u = np.stack([-(x1 - x0) / 2, (x1 - x0) / 2, (x1 - x0) / 2, -(x1 - x0) / 2], axis=1)
    v = np.stack([-(y1 - y0) / 2, -(y1 - y0) / 2, (y1 - y0) / 2, (y1 - y0) / 2], axis=1)
    xs = ((x0 + x1) / 2)[:, None] + turn.a * u + turn.b * v
    ys = ((y0 + y1) / 2)[:, None] + turn.d * u + turn.e * v
    return shapely.polygons(np.stack([xs, ys], axis=-1))
