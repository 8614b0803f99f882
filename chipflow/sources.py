"""Lazy raster inputs: one file, a folder, a glob, a list or a VRT; mosaicked or item by item.

The client reads only metadata. A :class:`RasterSource` describes the *virtual
grid* chips are cut from (the file's own grid, or a mosaic of several files,
clipped to an ``extent`` and resampled to a ``cell_size``) plus the items that
fill it; block tasks read their windows through one GDAL dataset per worker
thread, so only paths travel in the task graph and each block is decoded once.
:meth:`RasterSource.to_dataarray` gives the same raster as a lazy, chunked
``xarray.DataArray`` (rioxarray) for users who want to look at it.
"""

from __future__ import annotations

import glob
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import rasterio.windows
from affine import Affine
from rasterio.enums import MaskFlags, Resampling

from . import _cloud
from .errors import InputNotFoundError, InvalidParameterError, RasterError

__all__ = ["RasterSource", "SourceItem", "open_raster", "open_sources", "read_window", "resolve_rasters"]

_RASTER_EXTENSIONS = (".tif", ".tiff", ".vrt", ".img", ".jp2", ".png", ".jpg", ".mrf", ".nc")


@dataclass(frozen=True)
class SourceItem:
    """One input file and where its pixels are (its own transform)."""

    path: str
    transform: tuple[float, ...]
    width: int
    height: int
    #: Which state of the file was planned (:func:`chipflow._cloud.version`): a worker's open
    #: handle of an older state (a file replaced at the same path) is not reused.
    version: str = ""
    #: GDAL's per-dataset mask (an internal or .msk mask, not an alpha band) marks its nodata
    #: pixels; set only for files without a nodata value.
    masked: bool = False


@dataclass(frozen=True)
class RasterSource:
    """The grid chips are cut from, and the files that fill it (picklable, no handles).

    ``transform`` maps the virtual grid's pixels to map coordinates (the raster's
    CRS). With ``pixel_space``, chips are written in pixel coordinates without a
    CRS, and labels reach pixels through ``gcps``/``rpcs`` when the raster has them.
    """

    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs_wkt: str
    transform: tuple[float, ...]
    nodata: float | None
    block_shape: tuple[int, int]
    band_names: tuple[str, ...]
    axis_mapping: str
    epsg: int | None
    items: tuple[SourceItem, ...] = ()
    resampling: str = "nearest"
    pixel_space: bool = False
    gcps: tuple[tuple[float, float, float, float], ...] = ()
    rpcs: dict[str, Any] | None = None

    @property
    def affine(self) -> Affine:
        """The virtual grid's pixel → map transform."""
        return Affine(*self.transform[:6])

    @property
    def cell_size(self) -> tuple[float, float]:
        """``(x, y)`` pixel size in map units."""
        a, b, _, d, e, _ = self.transform[:6]
        return (float(np.hypot(a, d)), float(np.hypot(b, e)))

    @property
    def chip_affine(self) -> Affine:
        """Pixel → chip-file coordinates: the map transform, or the identity in pixel space."""
        return Affine.identity() if self.pixel_space else self.affine

    def to_dataarray(self, chunks: tuple[int, int] | None = None) -> Any:
        """The (first) input as a lazy, chunked ``xarray.DataArray`` (rioxarray).

        Parameters
        ----------
        chunks : tuple of int, optional
            ``(y, x)`` chunk size; defaults to the file's internal tiling.
        """
        import rioxarray

        cy, cx = chunks or self.block_shape
        return rioxarray.open_rasterio(
            self.items[0].path if self.items else self.path,
            chunks={"band": -1, "y": cy, "x": cx}, lock=False, masked=False,
        )


def resolve_rasters(in_raster: tuple[str, ...]) -> list[str]:
    """Expand folders (their raster files) and glob patterns; keep URLs and files as given.

    Object-store URLs (``s3://bucket/prefix/*.tif``, ``s3://bucket/prefix/``) expand
    alike, listed through fsspec with the storage options in force; ``http(s)://``
    URLs and GDAL ``/vsi`` paths are kept as given.

    Raises
    ------
    InputNotFoundError
        A folder or pattern that matches no raster.
    """
    paths: list[str] = []
    for entry in in_raster:
        if _cloud.is_remote(entry):
            paths.extend(_cloud.expand_url(entry, _RASTER_EXTENSIONS))
        elif os.path.isdir(entry):
            found = sorted(p for p in glob.glob(os.path.join(entry, "*"))
                           if p.lower().endswith(_RASTER_EXTENSIONS))
            if not found:
                raise InputNotFoundError("in_raster", entry, "the folder holds no raster files "
                                         f"({', '.join(_RASTER_EXTENSIONS)})")
            paths.extend(found)
        elif any(ch in entry for ch in "*?["):
            found = sorted(glob.glob(entry))
            if not found:
                raise InputNotFoundError("in_raster", entry, "the pattern matches no file")
            paths.extend(found)
        else:
            paths.append(entry)
    return paths


def _open(path: str) -> rasterio.DatasetReader:
    """``rasterio.open``, quiet about rasters without georeferencing (pixel space is legitimate).

    ``s3://`` URLs open through GDAL's ``/vsis3/`` (range requests) inside a
    ``rasterio.Env`` holding the storage options in force (:func:`chipflow._cloud.raster_env`);
    the open dataset keeps its endpoint and credentials for later reads. ``http(s)://``
    URLs open through ``/vsicurl/``.
    """
    with warnings.catch_warnings(), _cloud.raster_env(path):
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        return rasterio.open(path)


def _open_item(path: str, *, need_crs: bool) -> dict[str, Any]:
    try:
        with _open(path) as ds:
            try:  # decode the last internal block: catches truncated and corrupt files early
                ds.read(1, window=rasterio.windows.Window(ds.width - 1, ds.height - 1, 1, 1))
            except rasterio.RasterioIOError as exc:
                raise RasterError(f"in_raster={path!r} cannot be decoded: {exc}") from None
            if np.dtype(ds.dtypes[0]).kind == "c":
                raise RasterError(f"in_raster={path!r} has data type {ds.dtypes[0]}: chips hold real "
                                  "numbers; write its amplitude (or real and imaginary parts) as bands first")
            gcps, gcp_crs = ds.gcps
            if ds.crs is None and gcps and need_crs:
                raise RasterError(
                    f"in_raster={path!r} is georeferenced by {len(gcps)} ground control points only, not "
                    "by a geotransform; pass reference_system='PIXEL_SPACE' (labels are placed through "
                    "the points) or warp it first (gdalwarp)")
            if ds.crs is None and gcp_crs is None and need_crs:
                raise RasterError(
                    f"in_raster={path!r} has no coordinate reference system; chips in map space need "
                    "one. Set it with `rio edit-info --crs EPSG:XXXX` or rioxarray's `.rio.write_crs(...)`, "
                    "or pass reference_system='PIXEL_SPACE' to cut chips on the raw pixel grid."
                )
            names = tuple(
                d or (ci.name.capitalize() if ci.name not in ("undefined", "gray") else f"Band_{i}")
                for i, (d, ci) in enumerate(zip(ds.descriptions, ds.colorinterp, strict=True), 1)
            )
            crs = ds.crs or gcp_crs
            return {
                "path": str(path), "version": _cloud.version(str(path)), "width": ds.width,
                "height": ds.height, "count": ds.count,
                "dtype": ds.dtypes[0], "crs": crs, "transform": ds.transform, "nodata": ds.nodata,
                "block_shape": tuple(ds.block_shapes[0]), "band_names": names,
                "gcps": tuple((g.col, g.row, g.x, g.y) for g in gcps),
                # an internal or .msk mask; not an alpha band: GDAL marks the 4th band of any
                # 4-band RGB GeoTIFF as alpha by default, and there it is near infrared (NAIP)
                "masked": ds.nodata is None and MaskFlags.per_dataset in ds.mask_flag_enums[0]
                and MaskFlags.alpha not in ds.mask_flag_enums[0],
                "rpcs": ds.rpcs.to_dict() if ds.rpcs else None,
            }
    except rasterio.RasterioIOError as exc:
        raise InputNotFoundError("in_raster", path, str(exc)) from None


def _axis_mapping(crs: Any) -> str:
    """GDAL's data-axis mapping: ``2,1`` when the CRS's first axis is northing/latitude."""
    from pyproj import CRS

    if crs is None:
        return "1,2"
    axes = CRS.from_wkt(crs.to_wkt()).axis_info
    return "2,1" if axes and axes[0].direction in ("north", "south") else "1,2"


def _grid(items: list[dict[str, Any]], cell_size: float | None,
          extent: tuple[float, float, float, float] | None) -> tuple[Affine, int, int]:
    """The virtual grid over the items' union (clipped to ``extent``), at their or ``cell_size``'s size."""
    first = items[0]["transform"]
    res = {(round(abs(i["transform"].a), 12), round(abs(i["transform"].e), 12)) for i in items}
    if cell_size is None and len(res) > 1:
        raise InvalidParameterError(
            "in_raster", [i["path"] for i in items],
            f"mosaics items of different cell sizes {sorted(res)}; pass cell_size= to resample them "
            "to one, or processing_mode='PROCESS_ITEMS_SEPARATELY'")
    rotated = [i["path"] for i in items if i["transform"].b or i["transform"].d or i["transform"].a < 0
               or i["transform"].e > 0]
    if rotated:
        why = ("mosaicked with other rasters" if len(items) > 1
               else f"resampled to cell_size={cell_size!r}" if cell_size is not None
               else f"clipped to extent={extent!r}")
        raise RasterError(f"in_raster={rotated[0]!r} has a rotated or flipped geotransform and cannot be "
                          f"{why}; warp it north-up first (gdalwarp) or use reference_system='PIXEL_SPACE'")
    left = min(i["transform"].c for i in items)
    top = max(i["transform"].f for i in items)
    right = max(i["transform"].c + i["width"] * i["transform"].a for i in items)
    bottom = min(i["transform"].f + i["height"] * i["transform"].e for i in items)
    rx, ry = (cell_size, cell_size) if cell_size else (abs(first.a), abs(first.e))
    if extent is not None:
        xmin, ymin, xmax, ymax = extent
        if xmin >= right or xmax <= left or ymin >= top or ymax <= bottom:
            raise InvalidParameterError(
                "extent", extent, f"does not overlap the raster's extent {(left, bottom, right, top)}")
        # snap to the raster's own grid so that clipping alone never resamples
        c0 = max(0, math.floor((xmin - left) / rx + 1e-9))
        r0 = max(0, math.floor((top - ymax) / ry + 1e-9))
        c1 = math.ceil((min(xmax, right) - left) / rx - 1e-9)
        r1 = math.ceil((top - max(ymin, bottom)) / ry - 1e-9)
        return Affine(rx, 0, left + c0 * rx, 0, -ry, top - r0 * ry), c1 - c0, r1 - r0
    width = math.ceil((right - left) / rx - 1e-9)
    height = math.ceil((top - bottom) / ry - 1e-9)
    return Affine(rx, 0, left, 0, -ry, top), width, height


def open_sources(in_raster: tuple[str, ...], *, mosaic: bool, pixel_space: bool,
                 cell_size: float | None = None,
                 extent: tuple[float, float, float, float] | None = None) -> list[RasterSource]:
    """Open the inputs' metadata (no pixels): one source for a mosaic, else one per item.

    Raises
    ------
    InputNotFoundError, RasterError, InvalidParameterError
        Missing or unreadable files, no CRS in map space, items that cannot be
        mosaicked or exported together (band counts, data types, CRSs differ).
    """
    infos = [_open_item(p, need_crs=not pixel_space) for p in resolve_rasters(in_raster)]
    first = infos[0]
    for info in infos[1:]:
        for key in ("count", "dtype"):
            if info[key] != first[key]:
                raise InvalidParameterError(
                    "in_raster", info["path"],
                    f"has {key} {info[key]!r} but {first['path']!r} has {first[key]!r}; all inputs of "
                    "one export need the same band count and data type")
    if pixel_space and len(infos) > 1 and mosaic:
        raise InvalidParameterError(
            "reference_system", "PIXEL_SPACE", "cannot mosaic several rasters (pixel grids do not "
            "join); use processing_mode='PROCESS_ITEMS_SEPARATELY'")
    groups = [infos] if mosaic else [[i] for i in infos]
    if mosaic and len({repr(i["nodata"]) for i in infos}) > 1:  # repr: NaN equals NaN
        shown = ", ".join(f"{os.path.basename(i['path'])}: {_shown_nodata(i['nodata'])}" for i in infos[:6])
        raise InvalidParameterError(
            "in_raster", [i["path"] for i in infos],
            f"mosaics items of different nodata values ({shown}{', ...' if len(infos) > 6 else ''}): "
            "one item's nodata would read as another's data; give them one nodata value "
            "(gdal_edit.py -a_nodata) or use processing_mode='PROCESS_ITEMS_SEPARATELY'")
    if mosaic and len(infos) > 1:
        crss = {str(i["crs"]) for i in infos}
        if len({i["crs"] for i in infos}) > 1:
            raise InvalidParameterError(
                "in_raster", [i["path"] for i in infos],
                f"mixes coordinate reference systems ({len(crss)}); reproject them to one first or use "
                "processing_mode='PROCESS_ITEMS_SEPARATELY'")
    return [_source(group, pixel_space=pixel_space, cell_size=cell_size, extent=extent)
            for group in groups]


def _shown_nodata(nodata: float | None) -> str:
    """A nodata value as error messages show it: ``0``, ``-99999``, ``nan``, ``none``."""
    return "none" if nodata is None else f"{nodata:g}"


def _resampling(cell_size: float | None, native: float) -> str:
    """Nearest on the native grid; average when coarsening (no aliasing); bilinear when refining."""
    if cell_size is None or math.isclose(cell_size, native):
        return "nearest"
    return "average" if cell_size > native else "bilinear"


def open_raster(path: str) -> RasterSource:
    """One raster in map space, on its own grid (see :func:`open_sources`)."""
    return open_sources((str(path),), mosaic=True, pixel_space=False)[0]


def _source(group: list[dict[str, Any]], *, pixel_space: bool, cell_size: float | None,
            extent: tuple[float, float, float, float] | None) -> RasterSource:
    first = group[0]
    simple = len(group) == 1 and cell_size is None and extent is None
    if simple or (pixel_space and len(group) == 1):
        transform, width, height = first["transform"], first["width"], first["height"]
    else:
        transform, width, height = _grid(group, cell_size, extent)
    crs = first["crs"]
    return RasterSource(
        path=first["path"] if len(group) == 1 else f"mosaic of {len(group)} rasters ({first['path']}, ...)",
        width=width, height=height, count=first["count"], dtype=first["dtype"],
        crs_wkt=crs.to_wkt() if crs is not None else "",
        transform=tuple(transform)[:6], nodata=first["nodata"], block_shape=first["block_shape"],
        band_names=first["band_names"], axis_mapping=_axis_mapping(crs),
        epsg=crs.to_epsg() if crs is not None else None,
        items=tuple(SourceItem(i["path"], tuple(i["transform"])[:6], i["width"], i["height"], i["version"],
                               i["masked"]) for i in group),
        resampling=_resampling(cell_size, abs(first["transform"].a)),
        pixel_space=pixel_space,
        gcps=first["gcps"] if pixel_space else (),
        rpcs=first["rpcs"] if pixel_space else None,
    )


_local = threading.local()


def _dataset(item: SourceItem) -> rasterio.DatasetReader:
    """One open GDAL dataset per input and thread (GDAL handles are not thread-safe).

    In a worker the storage options in force are those of the task's ``Store``
    (remembered when it was unpickled), so an ``s3://`` item is opened with the
    export's endpoint and credentials, not the worker's environment only. A
    handle is reused only for the same file state (``item.version``) and the same
    options: on a long-lived cluster, a raster replaced at the same path, or the
    same URL on another endpoint, is opened anew (the old handle is closed).
    """
    cache = _local.__dict__.setdefault("datasets", {})
    key = (item.version, repr(sorted(_cloud.current().items())))
    held = cache.get(item.path)
    if held is not None and (held[0] != key or held[1].closed):
        held[1].close()
        held = None
    if held is None:
        held = cache[item.path] = (key, _open(item.path))
    return held[1]


#: Attempts of a window read that fails, each on a newly opened file, before the block fails.
READ_ATTEMPTS = 3


def read_window(source: RasterSource,
                window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Read virtual-grid pixels ``(x0, y0, x1, y1)`` as ``(bands, y1 - y0, x1 - x0)``.

    See :func:`_read_window`. A read that fails is tried again on newly opened
    files (an object store's 503, a reset connection), up to
    :data:`READ_ATTEMPTS` times; a read that keeps failing (a damaged tile, a
    cut download) raises :class:`RasterError` naming the raster and the pixels.
    """
    for attempt in range(READ_ATTEMPTS):
        try:
            return _read_window(source, window)
        except rasterio.errors.RasterioIOError as error:
            failed = error
            _forget_datasets(source)
            if attempt + 1 < READ_ATTEMPTS and any(_cloud.is_remote(item.path) for item in source.items):
                time.sleep(0.5 * 2**attempt)
    detail = failed.__cause__ or failed  # GDAL's own message, not rasterio's "see previous exception"
    x0, y0, x1, y1 = window
    raise RasterError(f"in_raster={source.path!r}: pixels ({x0}, {y0}) to ({x1}, {y1}) cannot be read "
                      f"({detail}), {READ_ATTEMPTS} times; is the file damaged or cut short?")


def _forget_datasets(source: RasterSource) -> None:
    """Close this thread's handles of ``source``'s files: the next read opens them anew."""
    cache = _local.__dict__.get("datasets", {})
    for item in source.items:
        held = cache.pop(item.path, None)
        if held is not None:
            held[1].close()


def _read_window(source: RasterSource,
                 window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Read virtual-grid pixels ``(x0, y0, x1, y1)`` as ``(bands, y1 - y0, x1 - x0)``.

    Returns the pixels and a mask of the pixels some input covers with data
    (None when all are covered). Uncovered pixels (past the edge, gaps between
    mosaic items, and pixels a file's per-dataset mask marks as nodata) hold
    the nodata value, or 0 without one. Mosaic items overlap
    first-come: an earlier item's valid pixels are kept.
    """
    x0, y0, x1, y1 = window
    fill = source.nodata if source.nodata is not None else 0
    items = source.items
    if len(items) == 1 and items[0].transform == source.transform and source.resampling == "nearest":
        ds = _dataset(items[0])  # the file's own grid: a plain windowed read
        win = rasterio.windows.Window(x0, y0, x1 - x0, y1 - y0)
        inside = x0 >= 0 and y0 >= 0 and x1 <= source.width and y1 <= source.height
        if inside and not items[0].masked:
            return ds.read(window=win), None
        # past the edge: the part inside the file, placed into a filled window (rasterio's boundless
        # read goes through a VRT, which warps a rotated geotransform north-up: resampled pixels)
        data = np.full((source.count, y1 - y0, x1 - x0), fill, dtype=source.dtype)
        covered = np.zeros((y1 - y0, x1 - x0), bool)
        cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(x1, source.width), min(y1, source.height)
        if cx0 < cx1 and cy0 < cy1:
            part = rasterio.windows.Window(cx0, cy0, cx1 - cx0, cy1 - cy0)
            sub = np.s_[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
            data[(slice(None), *sub)] = ds.read(window=part)
            covered[sub] = ds.read_masks(1, window=part) > 0 if items[0].masked else True
        if items[0].masked:
            data[:, ~covered] = fill
        return data, (None if covered.all() else covered)
    out = np.full((source.count, y1 - y0, x1 - x0), fill, dtype=source.dtype)
    covered = np.zeros(out.shape[1:], bool)
    vt = source.affine
    for item in items:
        to_virtual = ~vt @ Affine(*item.transform)
        ix0, iy0 = to_virtual @ (0, 0)
        ix1, iy1 = to_virtual @ (item.width, item.height)
        ox0, oy0 = max(x0, math.floor(min(ix0, ix1) + 1e-9)), max(y0, math.floor(min(iy0, iy1) + 1e-9))
        ox1, oy1 = min(x1, math.ceil(max(ix0, ix1) - 1e-9)), min(y1, math.ceil(max(iy0, iy1) - 1e-9))
        if ox0 >= ox1 or oy0 >= oy1:
            continue
        to_item = ~to_virtual
        fx0, fy0 = to_item @ (ox0, oy0)
        fx1, fy1 = to_item @ (ox1, oy1)
        with _cloud.raster_env(item.path):  # boundless reads open the file again, in a VRT
            data = _dataset(item).read(
                window=rasterio.windows.Window(fx0, fy0, fx1 - fx0, fy1 - fy0),
                out_shape=(source.count, oy1 - oy0, ox1 - ox0),
                resampling=Resampling[source.resampling], boundless=True, fill_value=fill,
            )
            sub = np.s_[oy0 - y0:oy1 - y0, ox0 - x0:ox1 - x0]
            valid = np.ones(data.shape[1:], bool)
            if source.nodata is not None and np.isnan(fill):
                valid = ~np.isnan(data).all(axis=0)
            elif source.nodata is not None:
                valid = ~(data == np.asarray(fill).astype(data.dtype)).all(axis=0)
            elif item.masked:
                valid = _dataset(item).read_masks(
                    1, window=rasterio.windows.Window(fx0, fy0, fx1 - fx0, fy1 - fy0), out_shape=valid.shape,
                    resampling=Resampling.nearest, boundless=True) > 0
        take = valid & ~covered[sub]
        region = out[(slice(None), *sub)]
        region[:, take] = data[:, take]
        covered[sub] |= take
    return out, (None if covered.all() else covered)
