"""Feature-centred formats: ``Labeled_Tiles`` (one class per chip) and ``Imagenet`` (class folders).

Each feature gets its own chip: the tile centred on it (``crop_mode="FIXED_SIZE"``)
or its bounding box (``"BOUNDING_BOX"``, chips of varying size), optionally with
the pixels around it blackened.
"""

from __future__ import annotations

from typing import Any

from ..store import safe_name
from .base import ChipLabel, LabelFormat
from .rectangles import PascalVocRectangles

__all__ = ["Imagenet", "LabeledTiles"]


class LabeledTiles(PascalVocRectangles):
    """``labels/<stem>.xml``: a PASCAL VOC annotation with the chip's one feature."""

    name = "Labeled_Tiles"
    feature_chips = True


class Imagenet(LabelFormat):
    """``images/<class name>/<stem>.<ext>``: the class is the folder; no label files.

    Class names become folder names through :func:`chipflow.store.safe_name`, so
    no name can escape the output folder; a class whose name changes is renamed
    so at planning (as for ``RCNN_Masks``).
    """

    name = "Imagenet"
    per_chip_labels = False
    feature_chips = True
    class_folders = True

    def image_relpath(self, chip: ChipLabel) -> str:
        """``images/<safe class name>/<stem>``."""
        return f"images/{safe_name(chip.classes[int(chip.class_index[0])].name)}/{chip.stem}"

    def files(self, chip: ChipLabel, label_extension: str) -> list[tuple[str, bytes]]:
        """None: the folder is the label."""
        return []

    def encode(self, chip: ChipLabel) -> bytes:
        """Imagenet chips have no label file."""
        return b""

    def count(self, data: bytes, *, width: int, height: int, **_: Any) -> dict[int, int]:
        """Imagenet chips have no label file to count."""
        return {}

