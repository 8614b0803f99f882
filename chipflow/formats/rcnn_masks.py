"""``RCNN_Masks``: per chip, one instance mask per class present, in a folder per class."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._common import (
    class_folders,
    count_instance_mask,
    folder_class,
    instance_files,
    raster_label_extension,
)
from .base import ChipLabel, LabelFormat

__all__ = ["RCNNMasks"]


class RCNNMasks(LabelFormat):
    """``labels/<class folder>/<stem>.<ext>``: single-band instance masks, 0 = background.

    For each class with at least one instance in the chip, ids ``1..k`` number the
    class's features in the order of their positions in the chip (a feature with
    no pixel is no instance); classes without an instance get no file, and a chip
    without any instance gets no label file (the consumer drops it). Masks are
    uint8 (uint16 past 255 instances), GeoTIFF for TIFF chips and PNG otherwise.

    The class folder is the class ``Name`` of the emd, which is what the consumer
    looks for. A name that is not a safe path component (``"a/b"``, ``".."``) is
    renamed at planning, with a warning, to its safe spelling
    (:func:`chipflow.store.safe_name`: ``"a_b"``, ``"_.."``), in the emd and the
    statistics too: nothing is written outside the output folder, and the
    consumer finds every class's masks. Two classes whose safe names collide
    fail the export with a message.

    ``map.txt`` pairs each image with the mask of its first class (by value).
    """

    name = "RCNN_Masks"
    instances = True
    class_folders = True

    def label_extension(self, image_extension: str) -> str:
        """``tif`` for TIFF chips, ``png`` for PNG and JPEG chips."""
        return raster_label_extension(image_extension)

    def files(self, chip: ChipLabel, label_extension: str) -> list[tuple[str, bytes]]:
        """One mask per class with an instance, in class order (none for a chip without any)."""
        return instance_files(chip, label_extension, "labels")

    def encode(self, chip: ChipLabel) -> bytes:
        """The first class's mask (the file ``map.txt`` names), or empty bytes for none."""
        files = self.files(chip, "tif")
        return files[0][1] if files else b""

    def label_paths(self, stem: str, label_extension: str, classes: Iterable[Any]) -> list[str]:
        """Every label file a chip may have (one per class; only those present exist)."""
        return [f"labels/{folder}/{stem}.{label_extension}" for folder in class_folders(classes).values()]

    def count(self, data: bytes, *, width: int, height: int, path: str | None = None,
              classes: Iterable[Any] | None = None) -> dict[int, int]:
        """Instances in one class's mask, keyed by that class's value.

        The file itself holds no class: the class is its folder, so ``path`` (the
        label's relative path) and ``classes`` (``ClassInfo`` objects or the emd's
        ``Classes``) are required.

        Raises
        ------
        ValueError
            Without ``path``/``classes``, for a folder that is no class's, or for a
            mask that is not one integer band of the chip's size with ids ``1..k``.
        """
        value = folder_class(path, classes, self.name)
        n = count_instance_mask(data, width=width, height=height)
        return {value: n} if n else {}
