"""Chip encoders: GeoTIFF, PNG and JPEG (Pillow) with georeferencing sidecars.

GeoTIFF chips are uncompressed baseline TIFFs with one strip per band. Every
chip of an export has the same header but for its tie point and pixel scale, so
the header is laid out once per chip shape (:func:`_tiff_header`) and each chip
is that header, its georeferencing doubles and its pixel bytes: about 20x
faster than tifffile per chip, and 60x faster than a GDAL ``MemoryFile``. The
CRS is encoded exactly as GDAL encodes it: GDAL writes one 1x1 template per CRS
and process, and its GeoKey tags are copied into every chip.
"""

from __future__ import annotations

import functools
import io
import struct
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
    x, y = transform @ (0.5, 0.5)
    return "".join(f"{v:.10f}\n" for v in (a, d, b, e, x, y)).encode()


@functools.lru_cache(maxsize=8)
def pam_xml(crs_wkt: str, axis_mapping: str, nodata: float | None, count: int) -> bytes:
    """A GDAL PAM ``.aux.xml`` holding the CRS (and nodata) of a PNG/JPEG chip (the same for every chip)."""
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

    def image(self, pixels: np.ndarray, transform: Affine) -> list[tuple[str, bytes | bytearray]]:
        """Encode one ``(bands, h, w)`` chip.

        Returns
        -------
        list of (suffix, bytes-like)
            The chip file (suffix ``".tif"`` ...) and its sidecars (``".jgw"``,
            ``".jpg.aux.xml"``), to be written next to each other. A TIFF chip is
            a ``bytearray`` its pixels were copied into once.
        """
        if self.extension == "tif":
            return [(".tif", self._geotiff(pixels, transform, self.nodata))]
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
        return bytes(self._geotiff(pixels, transform, nodata))

    def _geotiff(self, pixels: np.ndarray, transform: Affine, nodata: float | None) -> bytearray:
        """:meth:`geotiff` as a buffer the pixels are copied into once (a chip copied out of its block)."""
        a, b, c, d, e, f = transform[:6]
        north_up = b == 0 and d == 0 and a > 0 and e < 0
        bands, h, w = pixels.shape
        header = _tiff_header(bands, h, w, pixels.dtype.str, north_up, self.crs_wkt,
                              None if nodata is None else _nodata_text(nodata))
        if north_up:  # ModelPixelScale, then ModelTiepoint, as GDAL writes them
            georef = struct.pack("<9d", a, -e, 0.0, 0.0, 0.0, 0.0, c, f, 0.0)
        else:  # ModelTransformation
            georef = struct.pack("<16d", a, b, 0.0, c, d, e, 0.0, f, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
        out = bytearray(len(header) + len(georef) + pixels.nbytes)  # one copy of the pixels, straight in
        out[:len(header)] = header
        out[len(header):len(header) + len(georef)] = georef
        body = np.frombuffer(out, pixels.dtype.newbyteorder("<"), offset=len(header) + len(georef))
        if _interleaved(bands, pixels.dtype):
            body = body.reshape(h, w, bands)
            for i in range(bands):  # band by band: 2.5x faster than copying the transposed view
                body[..., i] = pixels[i]
        else:
            body.reshape(pixels.shape)[...] = pixels
        return out


_SHORT, _LONG = 3, 4
_SAMPLE_FORMAT = {"u": 1, "b": 1, "i": 2, "f": 3}


@functools.lru_cache(maxsize=64)
def _tiff_header(bands: int, h: int, w: int, dtype: str, north_up: bool, crs_wkt: str,
                 nodata: str | None) -> bytes:
    """Everything of a chip's GeoTIFF before its georeferencing doubles and pixels.

    Little-endian classic TIFF: the IFD, then the out-of-line tag values, then
    (8-byte aligned, at the end of the header) the 9 doubles of ModelPixelScale +
    ModelTiepoint (``north_up``) or the 16 of ModelTransformation, which the
    caller appends, then the pixels: one strip per band (PlanarConfiguration 2), or
    one strip of interleaved pixels for 2 and 4 bands of uint8 (:func:`_interleaved`).
    """
    dt = np.dtype(dtype)
    rgb = bands in (3, 4) and dt == np.uint8
    planes = 1 if _interleaved(bands, dt) else bands
    strip = h * w * dt.itemsize * (bands // planes)
    n_georef = 9 if north_up else 16
    tags: list[tuple[int, int, list | bytes]] = [  # (code, type, values); ASCII values are bytes
        (256, _LONG, [w]),
        (257, _LONG, [h]),
        (258, _SHORT, [dt.itemsize * 8] * bands),
        (259, _SHORT, [1]),  # no compression
        (262, _SHORT, [2 if rgb else 1]),  # RGB (and an unspecified 4th band), or min-is-black
        (273, _LONG, [0] * planes),  # strip offsets: filled in below
        (277, _SHORT, [bands]),
        (278, _LONG, [h]),
        (279, _LONG, [strip] * planes),
        (284, _SHORT, [2 if planes > 1 else 1]),  # one plane per band, or pixel-interleaved
    ]
    extra = bands - (3 if rgb else 1)
    if extra > 0:
        tags.append((338, _SHORT, [0] * extra))  # ExtraSamples: unspecified
    tags.append((339, _SHORT, [_SAMPLE_FORMAT[dt.kind]] * bands))
    if north_up:
        tags += [(33550, _DOUBLE, None), (33922, _DOUBLE, None)]  # filled by the caller's doubles
    else:
        tags.append((34264, _DOUBLE, None))
    for code, kind, count, value, _ in _geokeys(crs_wkt) if crs_wkt else ():
        values = (value.encode("ascii") + b"\0") if kind == _ASCII else list(np.atleast_1d(value))
        tags.append((code, kind, values))
        assert kind == _ASCII or len(values) == count
    if nodata is not None:
        tags.append((42113, _ASCII, nodata.encode("ascii") + b"\0"))  # GDAL_NODATA
    tags.sort(key=lambda t: t[0])

    formats = {_SHORT: "H", _LONG: "I", _DOUBLE: "d"}
    ifd_size = 2 + 12 * len(tags) + 4
    data_start = 8 + ifd_size
    georef_start = None

    def layout(strip_offsets: list[int]) -> tuple[bytes, int, bytes]:
        """IFD entries, where the pixels start, out-of-line values."""
        nonlocal georef_start
        entries, blob = [], bytearray()
        for code, kind, values in tags:
            if code == 273:
                values = strip_offsets
            if values is None:  # the georeferencing doubles, after the header
                count = 3 if code == 33550 else (6 if code == 33922 else 16)
                entries.append(struct.pack("<HHII", code, kind, count, 0))
                continue
            raw = values if kind == _ASCII else struct.pack(f"<{len(values)}{formats[kind]}", *values)
            count = len(values)
            if len(raw) <= 4:
                entries.append(struct.pack("<HHI", code, kind, count) + raw.ljust(4, b"\0"))
            else:
                if len(blob) % 2:
                    blob.append(0)  # values start on a word boundary
                entries.append(struct.pack("<HHII", code, kind, count, data_start + len(blob)))
                blob += raw
        while (data_start + len(blob)) % 8:
            blob.append(0)
        georef_start = data_start + len(blob)
        pixels_start = georef_start + 8 * n_georef
        return b"".join(entries), pixels_start, bytes(blob)

    _, pixels_start, _ = layout([0] * planes)
    entries, again, blob = layout([pixels_start + i * strip for i in range(planes)])
    assert again == pixels_start  # offsets fit inline or not alike: same layout
    entries = bytearray(entries)
    for i, (code, _, values) in enumerate(tags):  # point the georef tags at the caller's doubles
        if values is None:
            offset = georef_start + (24 if code == 33922 else 0)
            struct.pack_into("<I", entries, 12 * i + 8, offset)
    return b"".join((b"II*\0", struct.pack("<I", 8), struct.pack("<H", len(tags)), bytes(entries),
                     b"\0\0\0\0", blob))


def _interleaved(bands: int, dtype: np.dtype) -> bool:
    """Whether a chip's pixels are stored interleaved (RGBNRGBN...) rather than band after band.

    2 and 4 bands of uint8 are, as GDAL stores them by default: Pillow cannot
    open them band after band (Ultralytics then skips every chip as corrupt),
    and OpenCV reads only their first band. Interleaved, Pillow opens them (as
    grey, and as RGB without the 4th band) and OpenCV reads all 4 bands. Other
    chips stay band after band, a plain copy of each band: 1 and 3 bands of
    uint8 read alike both ways, and neither reader opens the other types.
    """
    return dtype == np.uint8 and bands in (2, 4)


def _nodata_text(nodata: float) -> str:
    """GDAL's spelling of a nodata value (``-99999``, ``nan``, ``255``)."""
    if np.isnan(nodata):
        return "nan"
    return str(int(nodata)) if float(nodata).is_integer() else repr(float(nodata))
