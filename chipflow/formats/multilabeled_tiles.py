"""``MultiLabeled_Tiles``: the classes present in each chip, for multi-label classification."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Any
from xml.sax.saxutils import escape

import numpy as np

from ._common import class_pairs, distinct_spellings
from .base import ChipLabel, LabelFormat
from .rectangles import _VOC_HEAD, _check_box

__all__ = ["MultiLabeledTiles", "label_name"]

_OBJECT = """    <object>
        <name>{names}</name>
        <bndbox>
            <xmin>0.00</xmin>
            <ymin>0.00</ymin>
            <xmax>{w:.2f}</xmax>
            <ymax>{h:.2f}</ymax>
        </bndbox>
    </object>
"""


def label_name(name: str) -> str:
    """A class name as one label of the comma-separated list: commas become ``_``.

    >>> label_name("trees, shrubs")
    'trees_ shrubs'
    """
    return name.replace(",", "_")


class MultiLabeledTiles(LabelFormat):
    """``labels/<stem>.xml``: PASCAL VOC with one full-chip ``<object>`` naming every class present.

    ``<name>`` lists the class **names** of the chip's features, unique, sorted by
    class value and joined by commas (``building,tree``): the consumer splits it on
    commas and uses each part as the label as-is, so a comma inside a class name
    is written as ``_``. The box is the whole chip, ``0, 0, width, height``. A chip
    without features has no ``<object>``.

    Each file names each of its classes once, so :meth:`count` agrees with
    ``FeatureStats.NumImagesPerClass``.
    """

    name = "MultiLabeled_Tiles"
    counted = "NumImagesPerClass"

    def label_extension(self, image_extension: str) -> str:
        """Always ``xml``."""
        return "xml"

    def class_spellings(self, classes: tuple[Any, ...]) -> dict[int, str]:
        """Each name as :func:`label_name` writes it (names with a comma are renamed at planning)."""
        return distinct_spellings(classes, label_name)

    def encode(self, chip: ChipLabel) -> bytes:
        """The annotation XML."""
        head = _VOC_HEAD.format(name=escape(chip.image_name), w=chip.width, h=chip.height, d=chip.depth)
        body = ""
        if len(chip.class_index):
            present = np.unique(chip.class_index).tolist()  # classes are sorted by value
            names = ",".join(label_name(chip.classes[k].name) for k in present)
            body = _OBJECT.format(names=escape(names), w=chip.width, h=chip.height)
        return (head + body + "</annotation>\n").encode()

    def count(self, data: bytes, *, width: int, height: int, path: str | None = None,
              classes: Iterable[Any] | None = None) -> dict[int, int]:
        """Class value → 1 for each class the file names.

        The file holds class names, so ``classes`` (``ClassInfo`` objects or the
        emd's ``Classes``) are required to map them back to values.

        Raises
        ------
        ValueError
            Without ``classes``; for an unknown or repeated name, more than one
            ``<object>``, or a box that is not the whole chip.
        """
        if classes is None:
            raise ValueError("MultiLabeled_Tiles labels hold class names: count(..., classes=<emd "
                             "Classes>) is needed to map them to class values")
        by_name = {label_name(n): v for v, n in class_pairs(classes)}
        objects = ET.fromstring(data).findall("object")
        if not objects:
            return {}
        if len(objects) > 1:
            raise ValueError(f"needs at most one <object>, has {len(objects)}")
        box = objects[0].find("bndbox")
        if box is None:
            raise ValueError("the <object> has no <bndbox>")
        corners = [float(box.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax")]
        _check_box(corners, width, height, 1)
        if corners != [0, 0, width, height]:
            raise ValueError(f"the box {corners} is not the whole {width} x {height} chip")
        out: dict[int, int] = {}
        for part in objects[0].findtext("name", "").split(","):
            if part not in by_name:
                raise ValueError(f"label {part!r} is no class name ({sorted(by_name)})")
            if by_name[part] in out:
                raise ValueError(f"label {part!r} is repeated")
            out[by_name[part]] = 1
        return out
