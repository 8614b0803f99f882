"""Readers for the label files, written the way consumers parse them."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import rasterio


def read_voc(path: Path) -> tuple[list[int], np.ndarray]:
    root = ET.parse(path).getroot()
    names, boxes = [], []
    for obj in root.findall("object"):
        names.append(int(obj.findtext("name")))
        bb = obj.find("bndbox")
        boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
    return names, np.array(boxes, dtype=float).reshape(-1, 4)


def read_kitti(path: Path) -> tuple[list[int], np.ndarray]:
    names, boxes = [], []
    for line in path.read_text().splitlines():
        cols = line.split()
        assert len(cols) == 15, line
        assert "-" not in line, line
        names.append(int(cols[0]))
        boxes.append([float(c) for c in cols[4:8]])
    return names, np.array(boxes, dtype=float).reshape(-1, 4)


def source_window(chip: Path, source: Path) -> tuple[np.ndarray, np.ndarray]:
    """The chip's pixels and the source's pixels at the window its georeferencing claims."""
    with rasterio.open(chip) as c, rasterio.open(source) as s:
        assert c.crs == s.crs
        col, row = ~s.transform * (c.transform.c, c.transform.f)
        col, row = round(col), round(row)
        assert np.allclose(~s.transform * (c.transform.c, c.transform.f), (col, row), atol=1e-6)
        window = rasterio.windows.Window(col, row, c.width, c.height)
        return c.read(), s.read(window=window, boundless=True, fill_value=s.nodata or 0)


def chip_ids(folder: Path, ext: str = "tif") -> list[int]:
    return sorted(int(p.stem) for p in (folder / "images").glob(f"*.{ext}"))
