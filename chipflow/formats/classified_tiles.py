"""``Classified_Tiles``: one class-value raster per chip (0 = background/nodata)."""

from __future__ import annotations

from .base import ChipLabel, LabelFormat

__all__ = ["ClassifiedTiles"]


class ClassifiedTiles(LabelFormat):
    """``labels/<stem>.<ext>``: single-band integer raster of class values.

    Labels are TIFF when the chips are TIFF and PNG otherwise (a lossy JPEG
    would invent class values).
    """

    name = "Classified_Tiles"
    rasterize = True

    def label_extension(self, image_extension: str) -> str:
        """``tif`` for TIFF chips, ``png`` for PNG and JPEG chips."""
        return "tif" if image_extension == "tif" else "png"

    def encode(self, chip: ChipLabel) -> bytes:
        """The chip's class mask, georeferenced like the chip."""
        if chip.mask is None or chip.encode_raster is None:
            raise ValueError("Classified_Tiles needs the chip's rasterized mask")
        return chip.encode_raster(chip.mask)
