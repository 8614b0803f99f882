"""``Classified_Tiles``: one class-value raster per chip (0 = background/nodata)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import open_label, raster_label_extension
from .base import ChipLabel, LabelFormat

__all__ = ["ClassifiedTiles"]


class ClassifiedTiles(LabelFormat):
    """``labels/<stem>.<ext>``: single-band integer raster of class values.

    Labels are TIFF when the chips are TIFF and PNG otherwise (a lossy JPEG
    would invent class values).
    """

    name = "Classified_Tiles"
    rasterize = True
    counted = "NumPixelsPerClass"

    def label_extension(self, image_extension: str) -> str:
        """``tif`` for TIFF chips, ``png`` for PNG and JPEG chips."""
        return raster_label_extension(image_extension)

    def encode(self, chip: ChipLabel) -> bytes:
        """The chip's class mask, georeferenced like the chip."""
        if chip.mask is None or chip.encode_raster is None:
            raise ValueError("Classified_Tiles needs the chip's rasterized mask")
        return chip.encode_raster(chip.mask)

    def count(self, data: bytes, *, width: int, height: int, **_: Any) -> dict[int, int]:
        """Pixels per class value (0, background, not counted); one band of the chip's size."""
        with open_label(data) as ds:
            if ds.count != 1 or (ds.width, ds.height) != (width, height):
                raise ValueError(f"needs 1 band of {width} x {height}, has {ds.count} of "
                                 f"{ds.width} x {ds.height}")
            values, counts = np.unique(ds.read(1), return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True) if v != 0}
