"""``Panoptic_Segmentation``: a class raster plus per-class instance masks for every chip."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from ._common import class_pairs, count_instance_mask, folder_class, instance_files, raster_label_extension
from .base import ChipLabel, LabelFormat
from .classified_tiles import ClassifiedTiles

__all__ = ["PanopticSegmentation"]


class PanopticSegmentation(LabelFormat):
    """A class raster and per-class instance masks for every chip.

    ``labels/<stem>.<ext>`` holds class values (as ``Classified_Tiles``) and
    ``labels2/<class folder>/<stem>.<ext>`` instance masks (as ``RCNN_Masks``).
    The semantic label is always written (all zero for a chip without features)
    and is the file ``map.txt`` names; instance masks exist only for classes with
    an instance in the chip. Class folders follow ``RCNN_Masks``' rule
    (a class is named as its folder). Every class is an
    instance ("thing") class: each feature is an instance.
    """

    name = "Panoptic_Segmentation"
    rasterize = True
    instances = True
    class_folders = True
    counted = "NumPixelsPerClass"

    def label_extension(self, image_extension: str) -> str:
        """``tif`` for TIFF chips, ``png`` for PNG and JPEG chips."""
        return raster_label_extension(image_extension)

    def files(self, chip: ChipLabel, label_extension: str) -> list[tuple[str, bytes]]:
        """The class raster first, then one instance mask per class with an instance."""
        semantic = (f"labels/{chip.stem}.{label_extension}", self.encode(chip))
        return [semantic, *instance_files(chip, label_extension, "labels2")]

    def encode(self, chip: ChipLabel) -> bytes:
        """The chip's class raster, georeferenced like the chip."""
        return ClassifiedTiles().encode(chip)

    def emd_extra(self, classes: Iterable[Any] = ()) -> dict[str, Any]:
        """``Panoptic_Segmentation_Instance_Classes``: ``[{Value, Name}]`` of every class.

        The pipeline calls ``emd_extra()`` without the classes (then nothing is
        added); it needs to pass them for the consumer to find the key.
        """
        pairs = class_pairs(classes)
        if not pairs:
            return {}
        return {"Panoptic_Segmentation_Instance_Classes": [{"Value": v, "Name": n} for v, n in pairs]}

    def count(self, data: bytes, *, width: int, height: int, path: str | None = None,
              classes: Iterable[Any] | None = None) -> dict[int, int]:
        """Pixels per class value of the class raster (the file ``map.txt`` names).

        An instance mask (a path under ``labels2/``) is counted as ``RCNN_Masks``
        counts one: instances of its folder's class.
        """
        if path is not None and path.replace("\\", "/").startswith("labels2/"):
            value = folder_class(path, classes, self.name)
            n = count_instance_mask(data, width=width, height=height)
            return {value: n} if n else {}
        from rasterio.errors import NotGeoreferencedWarning

        with warnings.catch_warnings():  # PNG labels carry no georeferencing
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return ClassifiedTiles().count(data, width=width, height=height)
