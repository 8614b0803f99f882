"""Chip encoders: GeoTIFF (tifffile), PNG and JPEG (Pillow) with georeferencing sidecars.

GeoTIFF chips are written with tifffile, about 3x faster than a GDAL
``MemoryFile`` per chip. The CRS is encoded exactly as GDAL encodes it: GDAL
writes one 1x1 template per CRS and process, and its GeoKey tags are copied
into every chip; only the tie point and pixel scale change from chip to chip.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from xml.sax.saxutils import escape

import numpy as np
import tifffile
from affine import Affine
from PIL import Image

__all__ = ["ChipEncoder", "world_file", "pam_xml"]

_GEOKEY_TAGS = (34735, 34736, 34737)  # GeoKeyDirectory, GeoDoubleParams, GeoAsciiParams
_DOUBLE, _ASCII = 12, 2


@functools.lru_cache(maxsize=32)
def _geokeys(crs_wkt: str) -> tuple[tuple[int, int, int, object, bool], ...]:
    """GDAL's GeoKey tags for ``crs_wkt``, as tifffile ``extratags``."""
    from rasterio.io import MemoryFile

    with MemoryFile() as memfile:
        with memfile.open(
            driver="GTiff", width=1, height=1, count=1, dtype="uint8",
            crs=crs_wkt, transform=Affine(1, 0, 10, 0, -1, 10),
        ) as ds:
            ds.write(np.zeros((1, 1, 1), np.uint8))
        data = memfile.read()
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        tags = tif.pages[0].tags
        return tuple(
            (code, int(tags[code].dtype), tags[code].count, tags[code].value, True)
            for code in _GEOKEY_TAGS
            if code in tags
        )


def _georef_tags(transform: Affine) -> list[tuple[int, int, int, object, bool]]:
    a, b, c, d, e, f = transform[:6]
    if b == 0 and d == 0 and a > 0 and e < 0:  # north-up: scale and tie point, as GDAL writes
        return [
            (33550, _DOUBLE, 3, (a, -e, 0.0), True),  # ModelPixelScale
            (33922, _DOUBLE, 6, (0.0, 0.0, 0.0, c, f, 0.0), True),  # ModelTiepoint
        ]
    matrix = (a, b, 0.0, c, d, e, 0.0, f, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    return [(34264, _DOUBLE, 16, matrix, True)]  # ModelTransformation


def world_file(transform: Affine) -> bytes:
    """An ESRI world file: pixel sizes and the centre of the upper-left pixel, 10 decimals.

    >>> print(world_file(Affine(0.5, 0, 100, 0, -0.5, 200)).decode(), end="")
    0.5000000000
    0.0000000000
    0.0000000000
    -0.5000000000
    100.2500000000
    199.7500000000
    """
    a, b, c, d, e, f = transform[:6]
    x, y = transform * (0.5, 0.5)
    return "".join(f"{v:.10f}\n" for v in (a, d, b, e, x, y)).encode()


def pam_xml(crs_wkt: str, axis_mapping: str, nodata: float | None, count: int) -> bytes:
    """A GDAL PAM ``.aux.xml`` holding the CRS (and nodata) of a PNG/JPEG chip."""
    bands = ""
    if nodata is not None:
        bands = "".join(
            f'  <PAMRasterBand band="{i}">\n    <NoDataValue>{nodata!r}</NoDataValue>\n'
            "  </PAMRasterBand>\n"
            for i in range(1, count + 1)
        )
    srs = f'  <SRS dataAxisToSRSAxisMapping="{axis_mapping}">{escape(crs_wkt)}</SRS>\n'
    return f"<PAMDataset>\n{srs}{bands}</PAMDataset>\n".encode()


@dataclass(frozen=True)
class ChipEncoder:
    """Encodes chips of one raster in one format.

    Parameters
    ----------
    extension : str
        ``"tif"``, ``"png"`` or ``"jpg"``.
    crs_wkt : str
        The raster's CRS as WKT.
    axis_mapping : str
        GDAL's data-axis-to-SRS-axis mapping (``"1,2"``, or ``"2,1"`` for lat/lon CRSs).
    nodata : float or None
        Written as the chips' nodata value.
    """

    extension: str
    crs_wkt: str
    axis_mapping: str = "1,2"
    nodata: float | None = None

    def image(self, pixels: np.ndarray, transform: Affine) -> list[tuple[str, bytes]]:
        """Encode one ``(bands, h, w)`` chip.

        Returns
        -------
        list of (suffix, bytes)
            The chip file (suffix ``".tif"`` ...) and its sidecars (``".jgw"``,
            ``".jpg.aux.xml"``), to be written next to each other.
        """
        if self.extension == "tif":
            return [(".tif", self.geotiff(pixels, transform, self.nodata))]
        if self.extension == "mrf":
            return self.mrf(pixels, transform)
        hwc = pixels[0] if pixels.shape[0] == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0))
        buf = io.BytesIO()
        if self.extension == "png":
            Image.fromarray(hwc).save(buf, format="PNG", compress_level=1)
            world = ".pgw"
        else:
            Image.fromarray(hwc).save(buf, format="JPEG", quality=90)
            world = ".jgw"
        aux = pam_xml(self.crs_wkt, self.axis_mapping, self.nodata, pixels.shape[0])
        return [
            (f".{self.extension}", buf.getvalue()),
            (world, world_file(transform)),
            (f".{self.extension}.aux.xml", aux),
        ]

    def mrf(self, pixels: np.ndarray, transform: Affine) -> list[tuple[str, bytes]]:
        """An MRF chip (GDAL's driver, DEFLATE): the ``.mrf`` header, its ``.idx`` index and data file."""
        import os
        import tempfile

        import rasterio

        with tempfile.TemporaryDirectory(prefix="chipflow-mrf-") as tmp:
            path = os.path.join(tmp, "chip.mrf")
            with rasterio.open(path, "w", driver="MRF", width=pixels.shape[2], height=pixels.shape[1],
                               count=pixels.shape[0], dtype=pixels.dtype, crs=self.crs_wkt or None,
                               transform=transform, nodata=self.nodata, compress="DEFLATE") as ds:
                ds.write(pixels)
            parts = []
            for name in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, name), "rb") as f:
                    parts.append((name[len("chip"):], f.read()))
        return parts

    def label(self, mask: np.ndarray, transform: Affine) -> bytes:
        """Encode a ``(h, w)`` class raster: GeoTIFF for TIFF chips, PNG otherwise."""
        if self.extension == "tif":
            return self.geotiff(mask[None], transform, None)
        buf = io.BytesIO()
        Image.fromarray(mask).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def geotiff(self, pixels: np.ndarray, transform: Affine, nodata: float | None) -> bytes:
        """An uncompressed, georeferenced GeoTIFF of a ``(bands, h, w)`` array."""
        extratags = [*_georef_tags(transform), *_geokeys(self.crs_wkt)]
        if nodata is not None:
            extratags.append((42113, _ASCII, 0, _nodata_text(nodata), True))  # GDAL_NODATA
        rgb = pixels.shape[0] == 3 and pixels.dtype == np.uint8
        buf = io.BytesIO()
        tifffile.imwrite(
            buf,
            pixels[0] if pixels.shape[0] == 1 else pixels,
            photometric="rgb" if rgb else "minisblack",
            planarconfig="separate" if pixels.shape[0] > 1 else None,
            extratags=extratags,
            metadata=None,
            software=False,
        )
        return buf.getvalue()


def _nodata_text(nodata: float) -> str:
    """GDAL's spelling of a nodata value (``-99999``, ``nan``, ``255``)."""
    if np.isnan(nodata):
        return "nan"
    return str(int(nodata)) if float(nodata).is_integer() else repr(float(nodata))
