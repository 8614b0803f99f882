"""One export, end to end: validate → open → plan → map blocks → reduce → metadata."""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import shapely

from . import _cloud, zarr_store
from ._dask import StartingCluster, finalize_format, run_blocks, tune_allocator
from ._partition import PARTITION_THRESHOLD, partition_labels
from ._version import __version__
from .config import (
    DEFAULT_METADATA_FORMAT,
    ExportConfig,
    check_n_workers,
    check_scheduler,
    home_expanded,
    make_config,
)
from .errors import InvalidParameterError, OutputError
from .index import chip_index
from .labels import ClassInfo, class_keys, split_layer
from .plan import ExportPlan, plan_export
from .progress import Progress
from .stats import BlockResult, Summary, esri_json
from .store import RUN_DIR, Store

__all__ = ["ExportResult", "export_training_data"]


@dataclass(frozen=True)
class ExportResult:
    """What an export produced.

    Attributes
    ----------
    out_folder : str
        Where the dataset is.
    num_chips : int
        Image chips written.
    num_features : int
        Feature instances over all chips (a feature in two chips counts twice).
    classes : tuple of ClassInfo
        The classes, sorted by value.
    features_per_class : dict
        Class name → feature instances (a name two classes share: ``"name (value)"``).
    statistics : dict
        The content of ``esri_accumulated_stats.json``.
    paths : dict
        Name → path of what the export wrote at the top of ``out_folder``: ``images``,
        ``labels`` (``labels2``), each metadata file, ``chips.parquet``, ``chips.zarr``,
        ``annotations.json`` or ``data.yaml``, and with splits each split's folder.
    elapsed_seconds : float
        Wall time of the whole call.
    timings : dict
        Seconds spent planning (inputs, labels, grid), starting the cluster, running the
        blocks, and writing the metadata.
    num_blocks : int
        Blocks of the run, those committed by an earlier run (a resume) included.
    chips_per_second : float
        ``num_chips / elapsed_seconds`` (a resume counts the chips it skipped too).
    """

    out_folder: str
    num_chips: int
    num_features: int
    classes: tuple[ClassInfo, ...]
    features_per_class: dict[str, int]
    statistics: dict[str, Any]
    paths: dict[str, str]
    elapsed_seconds: float
    num_blocks: int
    timings: dict[str, float]

    @property
    def chips_per_second(self) -> float:
        """Chips of the dataset per second of the call's wall time."""
        return self.num_chips / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0


def export_training_data(
    in_raster: Any,
    out_folder: Any,
    in_class_data: Any = None,
    *,
    image_chip_format: str = "TIFF",
    tile_size_x: int = 256,
    tile_size_y: int = 256,
    stride_x: int = 128,
    stride_y: int = 128,
    output_nofeature_tiles: str = "ONLY_TILES_WITH_FEATURES",
    metadata_format: str = DEFAULT_METADATA_FORMAT,
    class_value_field: str | None = None,
    buffer_radius: float = 0,
    in_mask_polygons: Any = None,
    rotation_angle: float = 0,
    reference_system: str = "MAP_SPACE",
    processing_mode: str = "PROCESS_AS_MOSAICKED_IMAGE",
    blacken_around_feature: str | bool = "NO_BLACKEN",
    crop_mode: str = "FIXED_SIZE",
    min_polygon_overlap_ratio: float = 0,
    start_index: Any = None,
    cell_size: float | None = None,
    extent: Any = None,
    split: Any = None,
    split_block_size: int = 8,
    seed: int = 0,
    edge_policy: str = "DROP",
    overwrite: bool = False,
    client: Any = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    progress: Progress | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ExportResult:
    """Cut a raster into image chips with labels, as ArcGIS's *Export Training Data For Deep Learning*.

    Parameters
    ----------
    in_raster : str or list of str
        A GeoTIFF/COG (any band count; uint8, uint16 or float), a folder, a glob, a
        list of rasters, or a VRT; local paths or object-store URLs.
    out_folder : str
        The dataset folder: created, or empty, or holding the same run (same parameters
        and inputs), which is resumed; anything else is refused unless ``overwrite``.
    in_class_data : str or geopandas.GeoDataFrame, optional
        Vector class data (GeoPackage, GeoJSON, Shapefile, GeoParquet), any CRS, or a
        single-band class raster; None only for ``Export_Tiles``.
    image_chip_format : {"TIFF", "PNG", "JPEG", "MRF", "ZARR"}
        Chip format. PNG/JPEG hold at most 3 bands of uint8 and get a world file
        and a ``.aux.xml`` with the CRS. ZARR puts every chip into one Zarr v3 store,
        ``chips.zarr`` (see :mod:`chipflow.zarr_store`).
    tile_size_x, tile_size_y : int
        Chip size in pixels.
    stride_x, stride_y : int
        Distance between chips in pixels; below the tile size, chips overlap.
    output_nofeature_tiles : {"ONLY_TILES_WITH_FEATURES", "ALL_TILES"}
        Whether chips without any feature are exported.
    metadata_format : str
        Label format: ``KITTI_rectangles``, ``PASCAL_VOC_rectangles``, ``Classified_Tiles``,
        ``RCNN_Masks``, ``Labeled_Tiles``, ``MultiLabeled_Tiles``, ``Imagenet``,
        ``Export_Tiles``, ``Panoptic_Segmentation`` (ArcGIS's), ``COCO``, ``YOLO`` or
        ``YOLO_segmentation`` (any case; :func:`chipflow.formats.names`).
    class_value_field : str, optional
        Integer class field; default: a ``value`` or ``classvalue`` field, else class 1.
    buffer_radius : float
        Buffer features by this distance (class data CRS units): points become discs.
    in_mask_polygons : str or geopandas.GeoDataFrame, optional
        Only chips that fall completely inside these polygons are exported.
    rotation_angle : float
        Each chip again rotated by this angle, and again, below 360° (extra chips).
    reference_system : {"MAP_SPACE", "PIXEL_SPACE", "IMAGE_SPACE"}
        Map space, or the raw pixel grid (see the README).
    processing_mode : {"PROCESS_AS_MOSAICKED_IMAGE", "PROCESS_ITEMS_SEPARATELY"}
        Several input rasters as one mosaic, or each on its own grid.
    blacken_around_feature, crop_mode
        Labeled_Tiles and Imagenet options (ESRI values).
    min_polygon_overlap_ratio : float
        Drop a feature from a chip's label when less than this fraction of it is inside.
    start_index : int, optional
        Deprecated in ArcGIS; accepted and ignored with a warning.
    cell_size : float, optional
        Resample the raster to this cell size (raster CRS units) first.
    extent : tuple of float, optional
        ``(xmin, ymin, xmax, ymax)`` in the raster's CRS: only chips inside it.
    split : str or dict, optional
        Leak-free splits, like ``"train=0.8,val=0.1,test=0.1"``: whole spatial cells of
        ``split_block_size`` x stride pixels go to one split (chosen by a hash of the cell
        and ``seed``); chips crossing a cell edge are dropped, so overlapping chips never
        straddle splits. Each split is a complete ArcGIS dataset in ``out_folder/<split>``.
    edge_policy : {"DROP", "PAD", "SHIFT"}
        The last partial row/column of chips: see :mod:`chipflow.grid` (chipflow's own).
    overwrite : bool
        Replace the contents of a non-empty ``out_folder``.
    client : distributed.Client, optional
        Run on this cluster.
    scheduler : str, optional
        Address of a Dask scheduler to connect to (``tcp://host:8786``).
    n_workers : int, optional
        Worker processes of the local cluster started when neither ``client`` nor
        ``scheduler`` is given (default: one per core). It starts on a thread
        while the inputs are read, and is closed when the export ends.
    progress : chipflow.progress.Progress, optional
        Told when the run starts and as each block finishes (the CLI passes a
        live progress bar).
    storage_options : dict, optional
        fsspec options for object-store URLs (``s3://``, ``gs://``, ``az://``) in
        ``out_folder``, ``in_raster`` and ``in_class_data``: for s3fs e.g.
        ``{"endpoint_url": "http://127.0.0.1:9000", "key": ..., "secret": ...}``.
        Without them the standard credential chains apply. They reach the workers
        inside the output ``Store`` and are never written to ``out_folder`` (see the
        README's *Object storage*).

    Returns
    -------
    ExportResult
        Counts, statistics and paths. Parameter names and values are ESRI's, and
        string values are accepted in any case.

    Raises
    ------
    chipflow.errors.ChipflowError
        Bad input, before anything is written; its message names the parameter.

    Notes
    -----
    With glibc, the calling process (like each worker) is set to keep up to
    128 MiB of freed memory for reuse (:func:`chipflow._dask.tune_allocator`).
    """
    started = time.perf_counter()
    cfg = make_config(
        in_raster, out_folder,
        image_chip_format=image_chip_format, tile_size_x=tile_size_x, tile_size_y=tile_size_y,
        stride_x=stride_x, stride_y=stride_y, output_nofeature_tiles=output_nofeature_tiles,
        metadata_format=metadata_format, class_value_field=class_value_field,
        buffer_radius=buffer_radius, rotation_angle=rotation_angle, reference_system=reference_system,
        processing_mode=processing_mode, blacken_around_feature=blacken_around_feature,
        crop_mode=crop_mode, min_polygon_overlap_ratio=min_polygon_overlap_ratio,
        start_index=start_index, cell_size=cell_size, extent=extent, split=split,
        split_block_size=split_block_size, seed=seed,
        edge_policy=edge_policy, overwrite=overwrite,
    )
    n_workers, scheduler = check_n_workers(n_workers), check_scheduler(scheduler)
    in_class_data, in_mask_polygons = home_expanded(in_class_data), home_expanded(in_mask_polygons)
    _check_inputs_outside(cfg, in_class_data=in_class_data, in_mask_polygons=in_mask_polygons)
    options = _cloud.freeze(storage_options, cfg.out_folder, *cfg.in_raster, in_class_data, in_mask_polygons)
    tune_allocator()  # this process re-uses the memory it frees (planning, pickling, the index)
    # the embedded cluster starts on a thread while the client plans; closed on leaving, also on errors
    early = _inputs_exist(cfg, in_class_data)
    with StartingCluster(client, scheduler, n_workers, start_now=early) as cluster:
        with _cloud.use(options), _gc_paused():  # the client reads the inputs' metadata and the class data
            plan = plan_export(cfg, in_class_data, in_mask_polygons)
        timings = {"plan": time.perf_counter() - started}
        source, labels, blocks = plan.source, plan.labels, list(plan.blocks)
        mark = time.perf_counter()
        c = cluster.client()  # reached before out_folder is touched: a cluster that fails changes nothing
        timings["cluster"] = time.perf_counter() - mark  # what was left of its start-up
        store = Store(cfg.out_folder, options)  # carries the options to the workers
        markers = store.open_run(_run_params(cfg, plan),
                                 [] if zarr_store.enabled(cfg) or cfg.split else ["images"],
                                 overwrite=cfg.overwrite)
        zarr_store.create(store, plan)  # image_chip_format="ZARR": chips.zarr, before any block task
        committed = {i: BlockResult.from_json(raw) for i, raw in markers.items()}
        jobs = [plan.job(item, store) for item in plan.items]
        fmt = cfg.label_format
        shipped = [_shipped(item.labels, store, fmt, k) for k, item in enumerate(plan.items)]
        work = [(b, job, labels_) for item, job, labels_ in zip(plan.items, jobs, shipped, strict=True)
                for b in item.blocks]
        mark = time.perf_counter()
        try:
            merged = run_blocks(c, work, committed=committed, progress=progress)
        except OSError as exc:
            said = _storage_error(exc, cfg.out_folder)
            if said is None:
                raise
            raise said from exc
        if not work:
            merged = BlockResult(len(labels.classes), source.count)
        finalize_format(c, jobs[0], blocks, labels.classes)
        timings["run"] = time.perf_counter() - mark
    mark = time.perf_counter()
    summary = Summary(
        metadata_format=fmt.name,
        output_features=fmt.output_features and labels.raster is None,
        rasterized=fmt.rasterize,
        tile_size_x=cfg.tile_size_x,
        tile_size_y=cfg.tile_size_y,
        image_extension=plan.image_extension,
        label_extension=plan.label_extension,
        classes=labels.classes,
        band_names=source.band_names,
        cell_size=source.cell_size,
        epsg=source.epsg,
        crs_wkt=source.crs_wkt,
        emd_extra={**fmt.emd_extra(labels.classes), **_feature_chip_keys(cfg)},
        image_space="PIXEL_SPACE" if source.pixel_space else "MAP_SPACE",
        raster_count=len(plan.items[0].source.items) if len(plan.items) == 1 else len(plan.items),
        class_raster=labels.raster is not None,
    )
    store.remove_temporaries()  # a killed worker's half-written files (their blocks were re-run)
    with _gc_paused():
        index = chip_index(plan, merged)
    store.put("chips.parquet", index)
    if cfg.split:
        for name, _ in cfg.split:
            part = merged.children.get(name, BlockResult(len(labels.classes), source.count))
            _write_metadata(store.child(name), summary, part)
        statistics = summary.accumulated_stats(merged)
    else:
        statistics = _write_metadata(store, summary, merged)
    timings["metadata"] = time.perf_counter() - mark
    return ExportResult(
        out_folder=cfg.out_folder,
        num_chips=merged.num_chips,
        num_features=int(merged.features_per_class.sum()),
        classes=labels.classes,
        features_per_class={k: int(n) for k, n in zip(class_keys(labels.classes), merged.features_per_class,
                                                      strict=True)},
        statistics=statistics,
        paths={name: store.path(name) for name in store.listdir() if name != RUN_DIR},  # what is there
        elapsed_seconds=time.perf_counter() - started,
        num_blocks=len(blocks),
        timings=timings,
    )


def _check_inputs_outside(cfg: ExportConfig, **inputs: Any) -> None:
    """Refuse an ``out_folder`` an input lies in.

    It is not empty, so no run starts there, and ``overwrite`` would delete the input.

    Raises
    ------
    InvalidParameterError
        Naming ``out_folder`` and the input inside it.
    """
    remote = _cloud.is_remote(cfg.out_folder)
    out = cfg.out_folder.rstrip("/") if remote else os.path.realpath(cfg.out_folder)
    sep = "/" if remote else os.sep
    named = [("in_raster", r) for r in cfg.in_raster] + [
        (name, value) for name, value in inputs.items() if isinstance(value, str | os.PathLike)]
    for name, value in named:
        path = os.fspath(value)
        if _cloud.is_remote(path) != remote:
            continue
        real = path.rstrip("/") if remote else os.path.realpath(path)
        if real == out or real.startswith(out.rstrip(sep) + sep):
            raise InvalidParameterError(
                "out_folder", cfg.out_folder,
                f"holds {name}={path!r}" + (", and overwrite=True would delete it before it is read"
                                             if cfg.overwrite else "") +
                "; write the dataset to a folder that holds none of the inputs")


#: Errors of the output's storage (full, over quota, read-only, too large a file): the folder's.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def _storage_error(exc: OSError, out_folder: str) -> OutputError | None:
    """A block's storage error as :class:`OutputError` naming ``out_folder`` and how to go on; else None."""
    if isinstance(exc, OutputError) or exc.errno not in _STORAGE_ERRNOS:
        return None
    return OutputError(f"out_folder={out_folder!r} cannot be written: {exc}; make room (or fix the "
                       "folder) and rerun the same export to resume: the blocks already committed are kept")


def _inputs_exist(cfg: ExportConfig, in_class_data: Any) -> bool:
    """Whether the local input paths exist: if not, the plan fails at once, and no cluster is started."""
    paths = [cfg.in_raster] if isinstance(cfg.in_raster, str | os.PathLike) else list(cfg.in_raster)
    if isinstance(in_class_data, str | os.PathLike):
        paths.append(split_layer(os.fspath(in_class_data))[0])  # a layer: its GeoPackage or FileGDB
    return all(os.path.exists(p) for p in map(os.fspath, paths) if "://" not in p)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: the client's planning and index work.

    They make many objects and no reference cycles; a full collection of the
    client's heap in the middle of a plan doubled it (20k features: 0.08 → 0.16 s;
    200k features: 0.97 → 0.67 s with collection paused).
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _shipped(labels: Any, store: Store, fmt: Any, item: int) -> Any:
    """Input ``item``'s class data as the block tasks get it: whole (broadcast), or partitioned when large."""
    if len(labels) > PARTITION_THRESHOLD and not fmt.feature_chips and labels.raster is None:
        return partition_labels(labels, store, item=item)
    return labels


def _feature_chip_keys(cfg: ExportConfig) -> dict[str, Any]:
    """The emd keys of feature-centred formats (Labeled_Tiles, Imagenet)."""
    if not cfg.label_format.feature_chips:
        return {}
    fixed = cfg.crop_mode.value == "FIXED_SIZE"
    return {"CropTileMode": "Fixed_Size" if fixed else "Variable_Size",
            "BlackenAroundFeature": cfg.blacken_around_feature}


def _run_params(cfg: ExportConfig, plan: ExportPlan) -> dict[str, Any]:
    """What identifies a run: parameters, input fingerprints, the planned blocks.

    A rerun with equal params resumes; anything else must start afresh. No
    timestamps and no credentials: equal runs store equal bytes.
    """
    params = cfg.to_dict()
    params.pop("overwrite")
    params.pop("out_folder")  # the folder may move between runs
    rasters = []
    for item in plan.items:
        src = item.source
        for part in src.items:
            entry: dict[str, Any] = {"path": part.path, "width": part.width, "height": part.height,
                                     "transform": list(part.transform)}
            if os.path.exists(part.path):
                stat = os.stat(part.path)
                entry.update(bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
            elif part.version:  # an object: its size and ETag
                entry["version"] = part.version
            rasters.append(entry)
    labels = plan.labels
    return {
        "chipflow": __version__,
        "parameters": params,
        "in_raster": {"items": rasters, "count": plan.source.count, "dtype": plan.source.dtype,
                      "crs": plan.source.crs_wkt},
        "in_class_data": {"sha256": labels.fingerprint(), "features": len(labels)},
        "in_mask_polygons": None if labels.mask is None else hashlib.sha256(
            shapely.to_wkb(labels.mask)).hexdigest(),
        "blocks": [b.id for b in plan.blocks],
    }


def _write_metadata(store: Store, summary: Summary, merged: BlockResult) -> dict[str, Any]:
    """Write the four metadata files, after every chip; returns the accumulated stats."""
    statistics = summary.accumulated_stats(merged)
    store.put("map.txt", summary.map_txt(merged))
    store.put("stats.txt", summary.stats_txt(merged))
    store.put("esri_accumulated_stats.json", esri_json(statistics))
    store.put("esri_model_definition.emd", esri_json(summary.emd(merged)))
    return statistics
