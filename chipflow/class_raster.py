"""Class data as a classified raster (an integer raster of class values, e.g. Classify Raster output).

The raster is never resampled in the client: each block task warps the part it
needs onto the chips' grid with nearest-neighbour resampling (GDAL), so any CRS,
cell size and alignment works. Class names come from a raster attribute table
(GDAL's ``.aux.xml`` or ArcGIS's ``.vat.dbf``) when there is one.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import rasterio.windows
import shapely
from affine import Affine

from . import _cloud
from .errors import InputNotFoundError, LabelError
from .sources import RasterSource

__all__ = ["ClassRaster", "is_class_raster", "open_class_raster", "region_features"]

_EXTENSIONS = (".tif", ".tiff", ".img", ".vrt", ".crf", ".mrf")
_MAX_CLASS_VALUE = 65535


@dataclass(frozen=True)
class ClassRaster:
    """Where the class raster is and how to read it (picklable, no handles)."""

    path: str
    nodata: float | None
    crs_wkt: str

    def read(self, source: RasterSource, window: tuple[int, int, int, int]) -> np.ndarray:
        """Class values on the source grid's pixels ``(x0, y0, x1, y1)`` (0 where there are none)."""
        from rasterio.warp import Resampling, reproject

        x0, y0, x1, y1 = window
        nodata = 0 if self.nodata is None else self.nodata
        with _cloud.raster_env(self.path), rasterio.open(self.path) as ds:  # s3://: the export's options
            # warped in the file's own type, nodata kept as nodata (GDAL's warper copied a float
            # raster's -99999 into an int32 destination as it was), then made 0 here
            warped = np.full((y1 - y0, x1 - x0), nodata, ds.dtypes[0])
            reproject(rasterio.band(ds, 1), warped, src_nodata=nodata,
                      dst_transform=source.affine @ Affine.translation(x0, y0), dst_crs=source.crs_wkt,
                      dst_nodata=nodata, resampling=Resampling.nearest)
        return np.where(_holds_data(warped, nodata), warped, 0).astype(np.int32)


def _holds_data(values: np.ndarray, nodata: float | None) -> np.ndarray:
    """Which ``values`` are neither ``nodata`` nor (floats) NaN."""
    valid = np.ones(values.shape, bool) if nodata is None or np.isnan(nodata) else (
        values != np.asarray(nodata).astype(values.dtype))
    if values.dtype.kind == "f":
        valid &= ~np.isnan(values)
    return valid


def is_class_raster(in_class_data: Any) -> bool:
    """Whether ``in_class_data`` names a raster file (rather than vector data)."""
    return isinstance(in_class_data, str | os.PathLike) and os.fspath(in_class_data).lower().endswith(
        _EXTENSIONS)


def _attribute_names(path: str) -> dict[int, str]:
    """Class names from a raster attribute table: GDAL PAM ``.aux.xml`` or ArcGIS ``.vat.dbf``."""
    names: dict[int, str] = {}
    aux = path + ".aux.xml"
    if os.path.exists(aux):
        root = ET.parse(aux).getroot()
        table = root.find(".//GDALRasterAttributeTable")
        if table is not None:
            fields = [(f.findtext("Name") or "").lower() for f in table.findall("FieldDefn")]
            vi = next((i for i, f in enumerate(fields) if f in ("value", "classvalue")), None)
            ni = next((i for i, f in enumerate(fields) if f in ("classname", "class_name", "name")), None)
            if vi is not None and ni is not None:
                for row in table.findall("Row"):
                    cells = [c.text or "" for c in row.findall("F")]
                    names[int(float(cells[vi]))] = cells[ni]
    vat = os.path.splitext(path)[0] + ".vat.dbf"
    if not names and os.path.exists(vat):
        import pyogrio

        frame = pyogrio.read_dataframe(vat, read_geometry=False)
        lower = {c.lower(): c for c in frame.columns}
        value, name = lower.get("value"), lower.get("classname") or lower.get("class_name")
        if value and name:
            names = {int(v): str(n) for v, n in zip(frame[value], frame[name], strict=True)}
    return names


def open_class_raster(path: str, source: RasterSource) -> tuple[ClassRaster, dict[int, str], np.ndarray]:
    """Check the class raster and list its classes (one pass over its pixels, block by block).

    Returns the reader, names from its attribute table, and the sorted class values.

    Raises
    ------
    InputNotFoundError, LabelError
        Unreadable, not one integer band, no CRS, values outside 1..65535, or no
        overlap with the image.
    """
    with _cloud.raster_env(path):  # an s3:// class raster: the storage options in force, as for in_raster
        return _open_class_raster(path, source)


def _open_class_raster(path: str, source: RasterSource) -> tuple[ClassRaster, dict[int, str], np.ndarray]:
    try:
        ds = rasterio.open(path)
    except rasterio.RasterioIOError as exc:
        raise InputNotFoundError("in_class_data", path, str(exc)) from None
    with ds:
        if ds.count != 1:
            raise LabelError(f"in_class_data={path!r} must be a single-band class raster, it has {ds.count}")
        if ds.crs is None:
            raise LabelError(f"in_class_data={path!r} has no coordinate reference system; set one")
        from rasterio.warp import transform_bounds

        left, bottom, right, top = transform_bounds(ds.crs, source.crs_wkt, *ds.bounds)
        x0, y0 = source.affine @ (0, 0)
        x1, y1 = source.affine @ (source.width, source.height)
        if not shapely.intersects(shapely.box(left, bottom, right, top),
                                  shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))):
            raise LabelError(f"in_class_data={path!r} does not overlap in_raster={source.path!r}")
        values: set[int] = set()
        for _, window in ds.block_windows(1):
            data = ds.read(1, window=window)
            valid = _holds_data(data, ds.nodata)
            found = np.unique(data[valid])
            fractional = found[found != np.round(found)]
            if fractional.size:
                raise LabelError(f"in_class_data={path!r} holds non-integer values (e.g. {fractional[0]}); "
                                 "a class raster holds whole class values")
            values.update(int(v) for v in found if v != 0)
        bad = [v for v in values if not 1 <= v <= _MAX_CLASS_VALUE]
        if bad:
            raise LabelError(f"in_class_data={path!r} holds class value {min(bad)}: class values must be "
                             "1..65535 (0 is background/NoData)")
        # workers open it themselves, maybe in another directory: a local path made absolute
        where = str(path) if "://" in str(path) else os.path.abspath(path)  # as config's _absolute
        return (ClassRaster(where, ds.nodata, ds.crs.to_wkt()), _attribute_names(str(path)),
                np.array(sorted(values), np.int64))


def region_features(mask: np.ndarray, class_values: np.ndarray, *, regions: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A chip's features from its class mask: connected regions (8-connected), or one per class.

    Returns class indices, boxes ``(n, 4)`` in chip pixels, areas (pixels²) and
    the region polygons (chip pixels); with ``regions=False`` each class present
    is one feature spanning its pixels' box (enough for Classified_Tiles).
    """
    if not regions:
        present = np.intersect1d(np.unique(mask), class_values)
        out_idx, out_boxes, out_areas = [], [], []
        for v in present.tolist():
            rows, cols = np.nonzero(mask == v)
            out_idx.append(int(np.searchsorted(class_values, v)))
            out_boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
            out_areas.append(float(rows.size))
        geoms = np.array([shapely.box(*b) for b in out_boxes], dtype=object)
        return (np.asarray(out_idx, np.int64), np.asarray(out_boxes, float).reshape(-1, 4),
                np.asarray(out_areas, float), geoms)
    shapes = [(shapely.geometry.shape(g), int(v)) for g, v in rasterio.features.shapes(
        mask.astype(np.int32), mask=mask > 0, connectivity=8)]
    shapes = [(g, v) for g, v in shapes if v in set(class_values.tolist())]
    geoms = np.array([g for g, _ in shapes], dtype=object)
    idx = np.searchsorted(class_values, np.array([v for _, v in shapes], np.int64))
    return (idx.astype(np.int64), shapely.bounds(geoms).reshape(-1, 4) if len(geoms) else np.zeros((0, 4)),
            shapely.area(geoms) if len(geoms) else np.zeros(0), geoms)
