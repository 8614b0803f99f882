"""``Export_Tiles``: image chips only (super-resolution, image-to-image, unlabelled sets)."""

from __future__ import annotations

from typing import Any

from .base import ChipLabel, LabelFormat

__all__ = ["ExportTiles"]


class ExportTiles(LabelFormat):
    """Images only: no label file, ``map.txt`` lines with the image path alone.

    Class data is optional. The consumer treats an ``Export_Tiles`` folder that
    also holds ``labels/`` or ``images2/`` as Pix2Pix, so neither may be created.
    """

    name = "Export_Tiles"
    per_chip_labels = False
    output_features = False
    needs_labels = False

    def files(self, chip: ChipLabel, label_extension: str) -> list[tuple[str, bytes]]:
        """No label files."""
        return []

    def encode(self, chip: ChipLabel) -> bytes:
        """Nothing: the format has no label file."""
        return b""

    def count(self, data: bytes, *, width: int, height: int, **_: Any) -> dict[int, int]:
        """Nothing to count; a non-empty label file does not belong to this format.

        Raises
        ------
        ValueError
            For any non-empty data.
        """
        if data:
            raise ValueError("Export_Tiles writes no label files")
        return {}
