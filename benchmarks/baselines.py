"""Reference implementations chipflow is measured against.

``by_hand``
    The single-process loop a user writes by hand with rasterio, geopandas
    and a spatial index: one GeoTIFF and one PASCAL VOC XML per chip.
``floor``
    The unavoidable work, with no labels and no framework: a process pool
    where each worker decodes its strip of the raster once, slices the chips,
    encodes them and writes the bytes.

Both write every chip lying fully inside the raster, at offsets
``0, stride, 2 * stride, ...`` while ``offset + tile <= size``, numbered
row-major as ``images/{id:09d}.<ext>``.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
import tifffile
from PIL import Image
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds

EXTENSIONS = {"TIFF": "tif", "PNG": "png", "JPEG": "jpg"}
STRIP_ROWS = 1024  # target raster rows decoded per read in the floor


def chip_offsets(length: int, tile: int, stride: int) -> range:
    """Offsets of the chips fully inside ``length`` pixels."""
    return range(0, length - tile + 1, stride)


def by_hand(
    raster: str | os.PathLike,
    vector: str | os.PathLike,
    out_dir: str | os.PathLike,
    tile: int = 256,
    stride: int = 256,
) -> dict:
    """Export chips and PASCAL VOC labels with a hand-written loop.

    Parameters
    ----------
    raster, vector : path-like
        Input raster and label features (``classvalue`` field).
    out_dir : path-like
        Receives ``images/*.tif`` and ``labels/*.xml``.
    tile, stride : int
        Chip size and step, in pixels.

    Returns
    -------
    dict
        ``{"chips": n, "seconds": wall}``.
    """
    start = time.perf_counter()
    images, labels = Path(out_dir) / "images", Path(out_dir) / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    gdf = gpd.read_file(vector)
    sindex = gdf.sindex
    n = 0
    with rasterio.open(raster) as src:
        profile = dict(
            driver="GTiff",
            width=tile,
            height=tile,
            count=src.count,
            dtype=src.dtypes[0],
            crs=src.crs,
        )
        for row in chip_offsets(src.height, tile, stride):
            for col in chip_offsets(src.width, tile, stride):
                window = Window(col, row, tile, tile)
                transform = src.window_transform(window)
                data = src.read(window=window)
                chip_box = shapely.box(*window_bounds(window, src.transform))
                hits = gdf.iloc[sindex.query(chip_box, predicate="intersects")]
                clipped = hits.geometry.intersection(chip_box)
                keep = clipped.area > 0
                boxes = _pixel_boxes(clipped[keep].bounds.to_numpy(), transform, tile)
                name = f"{n:09d}"
                with rasterio.open(images / f"{name}.tif", "w", transform=transform, **profile) as dst:
                    dst.write(data)
                xml = voc_xml(f"{name}.tif", tile, src.count, boxes, hits["classvalue"][keep].to_numpy())
                (labels / f"{name}.xml").write_text(xml)
                n += 1
    return {"chips": n, "seconds": time.perf_counter() - start}


def _pixel_boxes(bounds: np.ndarray, transform: rasterio.Affine, tile: int) -> np.ndarray:
    """Map ``(minx, miny, maxx, maxy)`` map bounds to chip pixel boxes.

    Returns an ``(n, 4)`` array of ``(xmin, ymin, xmax, ymax)`` in pixels,
    clipped to the chip.
    """
    inverse = ~transform
    cols0, rows0 = inverse @ (bounds[:, 0], bounds[:, 3])
    cols1, rows1 = inverse @ (bounds[:, 2], bounds[:, 1])
    return np.clip(np.column_stack([cols0, rows0, cols1, rows1]), 0, tile)


def voc_xml(filename: str, tile: int, depth: int, boxes: np.ndarray, classes: np.ndarray) -> str:
    """PASCAL VOC annotation for one chip.

    Parameters
    ----------
    filename : str
        Chip image file name.
    tile : int
        Chip width and height in pixels.
    depth : int
        Number of bands.
    boxes : ndarray
        ``(n, 4)`` pixel boxes ``(xmin, ymin, xmax, ymax)``.
    classes : ndarray
        ``(n,)`` class values, used as object names.

    Returns
    -------
    str
        The XML document.
    """
    objects = "".join(
        f"<object><name>{c}</name><difficult>0</difficult><bndbox>"
        f"<xmin>{x0:.2f}</xmin><ymin>{y0:.2f}</ymin><xmax>{x1:.2f}</xmax><ymax>{y1:.2f}</ymax>"
        f"</bndbox></object>"
        for (x0, y0, x1, y1), c in zip(boxes, classes, strict=True)
    )
    return (
        f"<annotation><filename>{filename}</filename><size><width>{tile}</width>"
        f"<height>{tile}</height><depth>{depth}</depth></size>{objects}</annotation>\n"
    )


def floor(
    raster: str | os.PathLike,
    out_dir: str | os.PathLike,
    tile: int = 256,
    stride: int = 256,
    fmt: str = "TIFF",
    processes: int = 2,
    label_files: bool = False,
) -> dict:
    """Decode, slice, encode and write every chip with a process pool.

    The chip rows are split into ``processes`` contiguous groups, one per
    worker. Each worker opens the raster once and walks its group top to
    bottom, so every raster row is decoded once (rows shared by overlapping
    chips stay in GDAL's block cache).

    Parameters
    ----------
    raster : path-like
        Input raster.
    out_dir : path-like
        Receives ``images/{id:09d}.<ext>``.
    tile, stride : int
        Chip size and step, in pixels.
    fmt : {"TIFF", "PNG", "JPEG"}
        Chip encoding; PNG and JPEG keep the first 3 bands.
    processes : int
        Number of worker processes.
    label_files : bool
        Also write a fixed 600-byte file per chip into ``labels/`` (a diagnostic,
        ``floor_labels`` in run.py: what one label file per chip costs on this
        disk, with no label computed).

    Returns
    -------
    dict
        ``{"chips": n, "seconds": wall}``, wall including pool start-up.
    """
    start = time.perf_counter()
    images = Path(out_dir) / "images"
    images.mkdir(parents=True, exist_ok=True)
    if label_files:
        (Path(out_dir) / "labels").mkdir(exist_ok=True)
    with rasterio.open(raster) as src:
        rows = list(chip_offsets(src.height, tile, stride))
        n_cols = len(chip_offsets(src.width, tile, stride))
    groups = [g for g in np.array_split(np.arange(len(rows)), processes) if len(g)]
    with ProcessPoolExecutor(max_workers=len(groups), mp_context=_fast_context()) as pool:
        jobs = [
            pool.submit(
                _floor_worker,
                str(raster),
                str(images),
                [rows[i] for i in g],
                int(g[0]) * n_cols,
                tile,
                stride,
                fmt,
                label_files,
            )
            for g in groups
        ]
        chips = sum(job.result() for job in jobs)
    return {"chips": chips, "seconds": time.perf_counter() - start}


def _fast_context() -> multiprocessing.context.BaseContext:
    """``fork`` where available: the cheapest worker start-up, as a floor should have."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def _floor_worker(
    raster: str,
    images: str,
    rows: list[int],
    first_id: int,
    tile: int,
    stride: int,
    fmt: str,
    label_files: bool = False,
) -> int:
    """Write the chips of the chip rows ``rows``; return how many."""
    label = b"<annotation>" + b" " * 575 + b"</annotation>\n"
    labels = os.path.join(os.path.dirname(images), "labels")
    per_read = max(1, STRIP_ROWS // stride)
    chip_id = first_id
    with rasterio.open(raster) as src:
        cols = chip_offsets(src.width, tile, stride)
        for i in range(0, len(rows), per_read):
            strip_rows = rows[i : i + per_read]
            top = strip_rows[0]
            strip = src.read(window=Window(0, top, src.width, strip_rows[-1] + tile - top))
            for row in strip_rows:
                for col in cols:
                    chip = strip[:, row - top : row - top + tile, col : col + tile]
                    path = os.path.join(images, f"{chip_id:09d}.{EXTENSIONS[fmt]}")
                    with open(path, "wb") as f:
                        f.write(encode(chip, fmt))
                    if label_files:
                        with open(os.path.join(labels, f"{chip_id:09d}.xml"), "wb") as f:
                            f.write(label)
                    chip_id += 1
    return chip_id - first_id


def encode(chip: np.ndarray, fmt: str) -> bytes:
    """Encode a ``(bands, rows, cols)`` chip as TIFF, PNG or JPEG bytes.

    TIFF keeps every band, uncompressed, laid out as chipflow's chips are (so both
    do the same work): 4 bands of uint8 as RGB and an extra sample, pixel-interleaved
    (band by band into the interleaved array, chipflow's copy), others band after band;
    PNG (compress_level=1) and JPEG (quality 90) keep the first 3 bands.
    """
    buf = io.BytesIO()
    if fmt == "TIFF" and chip.dtype == np.uint8 and len(chip) == 4:
        interleaved = np.empty((chip.shape[1], chip.shape[2], 4), np.uint8)
        for i in range(4):
            interleaved[..., i] = chip[i]
        tifffile.imwrite(buf, interleaved, photometric="rgb", planarconfig="contig", extrasamples=[0])
    elif fmt == "TIFF":
        tifffile.imwrite(buf, chip, photometric="minisblack", planarconfig="separate")
    else:
        image = Image.fromarray(np.ascontiguousarray(chip[:3].transpose(1, 2, 0)))
        options = {"compress_level": 1} if fmt == "PNG" else {"quality": 90}
        image.save(buf, format=fmt, **options)
    return buf.getvalue()
