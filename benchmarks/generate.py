"""Synthetic NAIP-like benchmark inputs.

The raster is a 4-band (R, G, B, NIR) uint8 tiled GeoTIFF (512 px internal
tiles, DEFLATE) in EPSG:26917 with 0.6 m pixels. Its texture mixes smooth
low-frequency fields (upsampled random noise at two scales), flat
"roof" rectangles and mild per-pixel noise, so that it compresses and decodes
roughly like real aerial imagery. It is written strip by strip, so memory
stays small even for 32768 x 32768 px.

The vector layer holds building-like rectangles (5-30 m sides, axis-aligned
or slightly rotated) with an integer ``classvalue`` (1..3) and a
``classname``, written as a GeoPackage in the same CRS.

Files are cached by their parameters: calling :func:`make_inputs` again with
the same arguments reuses the files already in the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.windows import Window

CRS = "EPSG:26917"
PIXEL_SIZE = 0.6
ORIGIN = (500_000.0, 4_000_000.0)  # upper-left corner, UTM 17N
TRANSFORM = Affine(PIXEL_SIZE, 0.0, ORIGIN[0], 0.0, -PIXEL_SIZE, ORIGIN[1])
BANDS = 4
BLOCK = 512
CLASS_NAMES = np.array(["", "residential", "commercial", "industrial"])  # by classvalue

# Per-band base level and response to the two smooth fields (R, G, B, NIR).
_BASE = np.array([105.0, 110.0, 95.0, 140.0], dtype=np.float32)
_COARSE_GAIN = np.array([35.0, 30.0, 25.0, -45.0], dtype=np.float32)
_FINE_GAIN = np.array([14.0, 16.0, 12.0, 22.0], dtype=np.float32)
_COARSE_CELL = 512  # px per coarse noise cell (~300 m)
_FINE_CELL = 48  # px per fine noise cell (~30 m)
_NOISE_LEVELS = 12  # per-pixel noise amplitude, in grey levels
_PX_PER_ROOF = 20_000  # one roof rectangle per this many pixels


def make_inputs(
    folder: str | os.PathLike, size: int = 8192, n_features: int = 20000, seed: int = 0
) -> tuple[Path, Path]:
    """Create (or reuse) a benchmark raster and its label vector.

    Parameters
    ----------
    folder : path-like
        Folder receiving the files; created if missing.
    size : int
        Raster width and height in pixels.
    n_features : int
        Number of building rectangles in the vector layer.
    seed : int
        Random seed; the same parameters always give the same files.

    Returns
    -------
    tuple of Path
        ``(raster_path, vector_path)``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raster_path = folder / f"naip_{size}px_seed{seed}.tif"
    vector_path = folder / f"buildings_{size}px_{n_features}f_seed{seed}.gpkg"
    if not raster_path.exists():
        _atomic(raster_path, lambda tmp: write_raster(tmp, size, seed))
    if not vector_path.exists():
        _atomic(vector_path, lambda tmp: write_vector(tmp, size, n_features, seed))
    return raster_path, vector_path


def rgb_of(raster_path: str | os.PathLike) -> Path:
    """The first three bands of a benchmark raster (PNG and JPEG chips hold at most 3), cached beside it."""
    import rasterio
    from rasterio.windows import Window

    raster_path = Path(raster_path)
    rgb = raster_path.with_name(f"{raster_path.stem}_rgb.tif")

    def write(tmp: Path) -> None:
        with rasterio.open(raster_path) as src:
            profile = {**src.profile, "count": 3}
            with rasterio.open(tmp, "w", **profile) as dst:
                for row in range(0, src.height, 2048):  # strips: memory stays flat
                    window = Window(0, row, src.width, min(2048, src.height - row))
                    dst.write(src.read([1, 2, 3], window=window), window=window)

    if not rgb.exists():
        _atomic(rgb, write)
    return rgb


def _atomic(path: Path, write) -> None:
    """Call ``write`` on a temporary name, then rename it to ``path``.

    An interrupted run therefore never leaves a truncated file that a later
    run would reuse.
    """
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_raster(path: str | os.PathLike, size: int, seed: int = 0) -> None:
    """Write the NAIP-like raster strip by strip.

    Parameters
    ----------
    path : path-like
        Output GeoTIFF.
    size : int
        Width and height in pixels.
    seed : int
        Random seed.
    """
    rng = np.random.default_rng(seed)
    coarse = _noise_grid(rng, size, _COARSE_CELL)
    fine = _noise_grid(rng, size, _FINE_CELL)
    roofs = _roofs(rng, size)
    profile = dict(
        driver="GTiff",
        width=size,
        height=size,
        count=BANDS,
        dtype="uint8",
        crs=CRS,
        transform=TRANSFORM,
        tiled=True,
        blockxsize=BLOCK,
        blockysize=BLOCK,
        compress="deflate",
        interleave="pixel",
        bigtiff="IF_SAFER",
        num_threads="ALL_CPUS",
    )
    strip = _strip_height(size)
    with rasterio.open(path, "w", **profile) as dst:
        for row0 in range(0, size, strip):
            nrows = min(strip, size - row0)
            data = _render_strip(rng, coarse, fine, roofs, row0, nrows, size)
            dst.write(data, window=Window(0, row0, size, nrows))


def _strip_height(size: int) -> int:
    """Rows per strip: whole internal tile rows, about 16 Mpx per strip."""
    rows = max(BLOCK, min(2048, (1 << 24) // size // BLOCK * BLOCK))
    return min(rows, size)


def _noise_grid(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """Coarse standard-normal grid covering ``size`` px with ``cell`` px cells."""
    n = size // cell + 2
    return rng.standard_normal((n, n)).astype(np.float32)


def _bilinear(grid: np.ndarray, cell: int, row0: int, nrows: int, width: int) -> np.ndarray:
    """Bilinearly upsample the rows ``row0:row0+nrows`` of a coarse grid.

    Parameters
    ----------
    grid : ndarray
        Coarse grid, one value per ``cell`` x ``cell`` px.
    cell : int
        Cell size in pixels.
    row0, nrows : int
        First output row and number of rows.
    width : int
        Output width in pixels.

    Returns
    -------
    ndarray
        float32 array of shape ``(nrows, width)``.
    """
    y = np.arange(row0, row0 + nrows, dtype=np.float32) / cell
    iy = y.astype(np.int64)
    fy = (y - np.floor(y))[:, None]
    x = np.arange(width, dtype=np.float32) / cell
    ix = x.astype(np.int64)
    fx = x - np.floor(x)
    sub = grid[iy[0] : iy[-1] + 2]
    rows = sub[:, ix] * (1 - fx) + sub[:, ix + 1] * fx
    local = iy - iy[0]
    out = rows[local]  # in-place from here: full-strip temporaries are large
    out *= 1 - fy
    bottom = rows[local + 1]
    bottom *= fy
    out += bottom
    return out


def _roofs(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """Random roof rectangles (pixel bounds) and their band values."""
    n = max(1, size * size // _PX_PER_ROOF)
    w = rng.integers(8, 50, n)
    h = rng.integers(8, 50, n)
    x0 = rng.integers(0, max(1, size - 50), n)
    y0 = rng.integers(0, max(1, size - 50), n)
    grey = rng.uniform(60, 230, n)
    tint = rng.uniform(0.85, 1.1, (n, BANDS)) * np.array([1.0, 1.0, 1.0, 0.6])
    colour = np.clip(grey[:, None] * tint, 0, 255 - _NOISE_LEVELS).astype(np.uint8)
    return {"x0": x0, "x1": x0 + w, "y0": y0, "y1": y0 + h, "colour": colour}


def _render_strip(
    rng: np.random.Generator,
    coarse: np.ndarray,
    fine: np.ndarray,
    roofs: dict[str, np.ndarray],
    row0: int,
    nrows: int,
    width: int,
) -> np.ndarray:
    """Pixels of rows ``row0:row0+nrows`` as a ``(BANDS, nrows, width)`` uint8 array."""
    low = _bilinear(coarse, _COARSE_CELL, row0, nrows, width)
    mid = _bilinear(fine, _FINE_CELL, row0, nrows, width)
    out = np.empty((BANDS, nrows, width), dtype=np.uint8)
    band, term = np.empty_like(low), np.empty_like(low)
    for b in range(BANDS):
        np.multiply(low, _COARSE_GAIN[b], out=band)
        band += np.multiply(mid, _FINE_GAIN[b], out=term)
        band += _BASE[b]
        out[b] = np.clip(band, 0, 255 - _NOISE_LEVELS, out=band)
    _draw_roofs(out, roofs, row0)
    for b in range(BANDS):  # noise last, so roofs are textured too; cannot overflow
        out[b] += rng.integers(0, _NOISE_LEVELS, (nrows, width), dtype=np.uint8)
    return out


def _draw_roofs(out: np.ndarray, roofs: dict[str, np.ndarray], row0: int) -> None:
    """Paint the roofs overlapping the strip starting at ``row0`` into ``out``."""
    row1 = row0 + out.shape[1]
    hit = np.flatnonzero((roofs["y1"] > row0) & (roofs["y0"] < row1))
    for i in hit:
        ya = max(roofs["y0"][i] - row0, 0)
        yb = min(roofs["y1"][i] - row0, out.shape[1])
        out[:, ya:yb, roofs["x0"][i] : roofs["x1"][i]] = roofs["colour"][i][:, None, None]


def write_vector(path: str | os.PathLike, size: int, n_features: int, seed: int = 0) -> None:
    """Write building rectangles covering the raster extent as a GeoPackage.

    Parameters
    ----------
    path : path-like
        Output GeoPackage.
    size : int
        Raster size in pixels (sets the extent).
    n_features : int
        Number of rectangles.
    seed : int
        Random seed.
    """
    rng = np.random.default_rng([seed, n_features])
    extent = size * PIXEL_SIZE
    margin = 30.0
    cx = ORIGIN[0] + rng.uniform(margin, extent - margin, n_features)
    cy = ORIGIN[1] - rng.uniform(margin, extent - margin, n_features)
    half = rng.uniform(5.0, 30.0, (n_features, 2)) / 2
    rotated = rng.random(n_features) < 0.5
    angle = np.where(rotated, np.radians(rng.uniform(-20, 20, n_features)), 0.0)
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1], [-1, -1]], dtype=float)
    local = corners[None] * half[:, None, :]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    xs = cx[:, None] + local[..., 0] * cos - local[..., 1] * sin
    ys = cy[:, None] + local[..., 0] * sin + local[..., 1] * cos
    geometry = shapely.polygons(np.stack([xs, ys], axis=-1))
    classvalue = rng.integers(1, 4, n_features).astype(np.int32)
    gdf = gpd.GeoDataFrame(
        {"classvalue": classvalue, "classname": CLASS_NAMES[classvalue]},
        geometry=geometry,
        crs=CRS,
    )
    gdf.to_file(path, driver="GPKG", layer="buildings", engine="pyogrio")
