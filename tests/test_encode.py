"""The chip encoders: GeoTIFF chips as GDAL reads them, for every dtype, band count and georeferencing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import rasterio
import tifffile
from affine import Affine
from rasterio.crs import CRS
from rasterio.io import MemoryFile

from chipflow.encode import ChipEncoder

NORTH_UP = Affine(0.6, 0, 500000.25, 0, -0.6, 4000000.75)
ROTATED = Affine.translation(500000, 4000000) * Affine.rotation(30) * Affine.scale(0.6, -0.6)


def _gdal(data: bytes) -> dict:
    with MemoryFile(data) as mem, mem.open() as ds:
        return {"pixels": ds.read(), "transform": ds.transform, "crs": ds.crs, "nodata": ds.nodata,
                "colorinterp": ds.colorinterp, "dtypes": ds.dtypes}


@pytest.mark.parametrize("epsg", [26917, 4326])
@pytest.mark.parametrize("transform", [NORTH_UP, ROTATED], ids=["north-up", "rotated"])
@pytest.mark.parametrize(("shape", "dtype", "nodata"), [
    ((4, 256, 256), "uint8", None),
    ((3, 64, 32), "uint8", None),
    ((1, 20, 30), "uint32", None),
    ((2, 16, 16), "float32", np.nan),
    ((1, 16, 16), "int16", -9999),
    ((5, 8, 8), "float64", -1.5),
    ((1, 3, 1), "uint16", 0),
])
def test_geotiff_chip_reads_back_in_gdal_exactly(epsg, transform, shape, dtype, nodata):
    rng = np.random.default_rng(len(shape) + shape[0])
    pixels = (rng.random(shape) * 200 - (50 if dtype[0] in "if" else 0)).astype(dtype)
    view = np.pad(pixels, ((0, 0), (1, 0), (2, 0)))[:, 1:, 2:]  # a block slice: not contiguous
    crs = CRS.from_epsg(epsg)
    data = ChipEncoder("tif", crs.to_wkt()).geotiff(view, transform, nodata)
    got = _gdal(data)
    np.testing.assert_array_equal(got["pixels"], pixels)
    assert got["dtypes"] == (dtype,) * shape[0]
    assert got["transform"].almost_equals(transform, precision=1e-9)
    assert got["crs"] == crs
    if nodata is None:
        assert got["nodata"] is None
    else:
        assert got["nodata"] == nodata or (np.isnan(got["nodata"]) and np.isnan(nodata))
    rgb = shape[0] in (3, 4) and dtype == "uint8"
    assert got["colorinterp"][0].name == ("red" if rgb else "gray")
    assert [c.name for c in got["colorinterp"][3 if rgb else 1:]] == ["undefined"] * (shape[0] - (3 if rgb else 1))
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        interleaved = shape[0] > 1 and tif.pages[0].planarconfig == tifffile.PLANARCONFIG.CONTIG
        read = tif.asarray()
    assert interleaved == (dtype == "uint8" and shape[0] in (2, 4))
    np.testing.assert_array_equal(np.moveaxis(read, -1, 0) if interleaved else read.reshape(shape), pixels)


@pytest.mark.parametrize(("bands", "mode"), [(1, "L"), (2, "L"), (3, "RGB"), (4, "RGB")])
def test_uint8_geotiff_chips_open_in_pillow(bands, mode):
    """Pillow (Ultralytics checks every image with it, and skips what it cannot open) reads a
    uint8 chip of 1-4 bands: grey, its first band of 2 (the second is an extra sample), RGB, and the
    RGB of 4 (the 4th is an extra sample, as Pillow's RGBX)."""
    from PIL import Image

    pixels = np.random.default_rng(bands).integers(0, 255, (bands, 24, 40), dtype=np.uint8)
    data = ChipEncoder("tif", CRS.from_epsg(26917).to_wkt()).geotiff(pixels, NORTH_UP, None)
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == mode and im.size == (40, 24)
        got = np.asarray(im)
    np.testing.assert_array_equal(got if mode == "L" else np.moveaxis(got, -1, 0),
                                  pixels[0] if mode == "L" else pixels[:3])


def test_geotiff_chips_carry_the_crs_as_gdal_writes_it(tmp_path):
    """Same GeoKeys as a chip GDAL itself writes (so any GeoTIFF reader agrees with GDAL)."""
    crs = CRS.from_epsg(32633)
    pixels = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    ours = ChipEncoder("tif", crs.to_wkt()).geotiff(pixels, NORTH_UP, None)
    with rasterio.open(tmp_path / "gdal.tif", "w", driver="GTiff", width=8, height=8, count=2, dtype="uint8",
                       crs=crs, transform=NORTH_UP) as ds:
        ds.write(pixels)
    tags = {}
    for name, source in (("ours", io.BytesIO(ours)), ("gdal", tmp_path / "gdal.tif")):
        with tifffile.TiffFile(source) as tif:
            tags[name] = {t.code: t.value for t in tif.pages[0].tags.values()
                          if t.code in (33550, 33922, 34735, 34736, 34737)}
    assert tags["ours"] == tags["gdal"]


def test_geotiff_without_crs_keeps_its_pixel_transform():
    data = ChipEncoder("tif", "").geotiff(np.ones((1, 4, 4), np.uint8), Affine(1, 0, 8, 0, -1, -4), None)
    got = _gdal(data)
    assert got["crs"] is None and got["transform"] == Affine(1, 0, 8, 0, -1, -4)
