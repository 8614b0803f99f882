"""Lazy raster inputs.

The raster is opened once in the client with rioxarray, lazily: only its
metadata is read. The chunked ``DataArray`` (chunks aligned to the block grid and
the file's internal tiles) is what a user gets from :meth:`RasterSource.to_dataarray`;
block tasks read their windows through one GDAL dataset per worker thread, so
only a path travels in the task graph and each block is decoded once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
import rasterio.windows
from affine import Affine

from .errors import InputNotFoundError, RasterError

__all__ = ["RasterSource", "open_raster", "read_window"]


@dataclass(frozen=True)
class RasterSource:
    """What chipflow needs to know about the input raster (picklable, no handles)."""

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

    @property
    def affine(self) -> Affine:
        """The raster's pixel → map transform."""
        return Affine(*self.transform[:6])

    @property
    def cell_size(self) -> tuple[float, float]:
        """``(x, y)`` pixel size in map units."""
        a, b, _, d, e, _ = self.transform[:6]
        return (float(np.hypot(a, d)), float(np.hypot(b, e)))

    def to_dataarray(self, chunks: tuple[int, int] | None = None) -> Any:
        """The raster as a lazy, chunked ``xarray.DataArray`` (rioxarray).

        Parameters
        ----------
        chunks : tuple of int, optional
            ``(y, x)`` chunk size; defaults to the file's internal tiling.
        """
        import rioxarray

        cy, cx = chunks or self.block_shape
        return rioxarray.open_rasterio(
            self.path, chunks={"band": -1, "y": cy, "x": cx}, lock=False, masked=False
        )


def open_raster(path: str) -> RasterSource:
    """Read the raster's metadata (no pixels) and check it can be chipped.

    Raises
    ------
    InputNotFoundError
        ``in_raster`` does not exist or GDAL cannot open it.
    RasterError
        It has no CRS (chips in map space need one).
    """
    try:
        with rasterio.open(path) as ds:
            if ds.crs is None:
                raise RasterError(
                    f"in_raster={path!r} has no coordinate reference system; chips in map "
                    "space need one. Set it with `rio edit-info --crs EPSG:XXXX` or "
                    "rioxarray's `.rio.write_crs(...)`."
                )
            crs = ds.crs
            names = tuple(
                d or (ci.name.capitalize() if ci.name not in ("undefined", "gray") else f"Band_{i}")
                for i, (d, ci) in enumerate(zip(ds.descriptions, ds.colorinterp, strict=True), 1)
            )
            by, bx = ds.block_shapes[0]
            try:  # decode the last internal block: catches truncated and corrupt files early
                ds.read(1, window=rasterio.windows.Window(ds.width - 1, ds.height - 1, 1, 1))
            except rasterio.RasterioIOError as exc:
                raise RasterError(f"in_raster={path!r} cannot be decoded: {exc}") from None
            return RasterSource(
                path=str(path),
                width=ds.width,
                height=ds.height,
                count=ds.count,
                dtype=ds.dtypes[0],
                crs_wkt=crs.to_wkt(),
                transform=tuple(ds.transform)[:6],
                nodata=ds.nodata,
                block_shape=(by, bx),
                band_names=names,
                axis_mapping=_axis_mapping(crs),
                epsg=crs.to_epsg(),
            )
    except rasterio.RasterioIOError as exc:
        raise InputNotFoundError("in_raster", path, str(exc)) from None


def _axis_mapping(crs: rasterio.crs.CRS) -> str:
    """GDAL's data-axis mapping: ``2,1`` when the CRS's first axis is northing/latitude."""
    from pyproj import CRS

    axes = CRS.from_wkt(crs.to_wkt()).axis_info
    return "2,1" if axes and axes[0].direction in ("north", "south") else "1,2"


_local = threading.local()


def _dataset(path: str) -> rasterio.DatasetReader:
    """One open GDAL dataset per path and thread (GDAL handles are not thread-safe)."""
    cache = _local.__dict__.setdefault("datasets", {})
    ds = cache.get(path)
    if ds is None or ds.closed:
        ds = cache[path] = rasterio.open(path)
    return ds


def read_window(source: RasterSource, window: tuple[int, int, int, int]) -> np.ndarray:
    """Read ``(x0, y0, x1, y1)`` as ``(bands, y1 - y0, x1 - x0)``.

    Parts past the raster's edge (``EdgePolicy.PAD``) are filled with the nodata
    value, or 0 without one.
    """
    x0, y0, x1, y1 = window
    ds = _dataset(source.path)
    win = rasterio.windows.Window(x0, y0, x1 - x0, y1 - y0)
    inside = x0 >= 0 and y0 >= 0 and x1 <= source.width and y1 <= source.height
    if inside:
        return ds.read(window=win)
    fill = source.nodata if source.nodata is not None else 0
    return ds.read(window=win, boundless=True, fill_value=fill)
