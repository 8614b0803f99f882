"""Shared fixtures: a real 2-process LocalCluster, real data, and small rasters built in code."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.errors
from affine import Affine

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
KAMPALA_IMAGE = ROOT / "sample" / "kampala" / "image.tif"
KAMPALA_BUILDINGS = ROOT / "sample" / "kampala" / "buildings.geojson"
NC = SHARED / "nc_landsat_landcover"


@pytest.fixture(scope="session")
def client():
    """Two single-threaded worker processes: the shape of the embedded default."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture
def make_raster(tmp_path: Path) -> Callable[..., Path]:
    """Write a GeoTIFF from an array: ``make_raster(data, transform=..., crs=..., nodata=...)``."""

    def make(
        data: np.ndarray,
        *,
        transform: Affine | None = Affine(2.0, 0, 500000.0, 0, -2.0, 4000000.0),
        crs: str | None = "EPSG:32633",
        nodata: float | None = None,
        name: str = "raster.tif",
        tiled: bool = True,
    ) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        count, height, width = data.shape
        profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype,
                       nodata=nodata, compress="deflate")
        if transform is not None:
            profile["transform"] = transform
        if crs is not None:
            profile["crs"] = crs
        if tiled:
            profile.update(tiled=True, blockxsize=128, blockysize=128)
        with warnings.catch_warnings():  # a raster without georeferencing is the point of some tests
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path, "w", **profile) as ds:
                ds.write(data)
        return path

    return make


def textured(shape: tuple[int, int, int], dtype: str = "uint8", seed: int = 0) -> np.ndarray:
    """A deterministic, non-constant test image."""
    rng = np.random.default_rng(seed)
    bands, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (b + 1) + yy * 3 + b * 17) % 251 for b in range(bands)])
    noise = rng.integers(0, 5, size=shape)
    return (base + noise).astype(dtype)
