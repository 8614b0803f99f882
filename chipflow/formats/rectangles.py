"""Box formats: ``KITTI_rectangles`` and ``PASCAL_VOC_rectangles``.

Both write the numeric class value as the object's class (the consumer looks
classes up by value and silently drops anything else), boxes as pixel
coordinates of the feature clipped to the chip, rounded to two decimals.
"""

from __future__ import annotations

import functools
import itertools
import re
import xml.etree.ElementTree as ET
from collections import Counter
from typing import Any

import numpy as np

from .base import ChipLabel, LabelFormat

__all__ = ["KittiRectangles", "PascalVocRectangles"]

# KITTI's 15 columns; the 3-D fields are 0.00 because the consumer's tokenizer
# cannot split negative numbers (KITTI's usual -1/-10/-1000).
_KITTI_ROW = "%d 0.00 0 0.00 %.2f %.2f %.2f %.2f 0.00 0.00 0.00 0.00 0.00 0.00 0.00\n"

_VOC_HEAD = """<?xml version="1.0"?>
<annotation>
    <filename>{name}</filename>
    <source>
        <annotation>ArcGIS Pro 2.1</annotation>
    </source>
    <size>
        <width>{w}</width>
        <height>{h}</height>
        <depth>{d}</depth>
    </size>
"""
_VOC_OBJECT = """    <object>
        <name>%d</name>
        <bndbox>
            <xmin>%.2f</xmin>
            <ymin>%.2f</ymin>
            <xmax>%.2f</xmax>
            <ymax>%.2f</ymax>
        </bndbox>
    </object>
"""


_TABLE_LIMIT = 409_600  # hundredths: boxes of chips up to 4096 px are formatted through the tables
_WHOLE = np.array([f"{i}." for i in range(_TABLE_LIMIT // 100)], dtype=object)  # "12."


def _hundredths(values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``"%.2f" % v`` of each value in two parts: the text up to the point, and the decimals' index.

    The decimals' index is ``0..99``, or 100 where the first part is the whole
    text already. None when a value is out of the tables' range (negative,
    NaN, huge). Formatting floats one by one was most of a box format's label
    time with hundreds of boxes a chip. A value is looked up by ``rint(100 v)``,
    which is the decimal rounding ``%.2f`` does except within rounding error of
    half a hundredth: those few are formatted with ``%`` as before, so the text
    is the same to the byte (a test checks ties and near-ties). Small tables
    rather than one of every hundredth: a chip's lookups then stay in the CPU's
    cache (a table of 25,601 strings cost 70 µs a chip of 200 boxes in an
    export, 17 µs when cached).
    """
    scaled = values * 100.0
    nearest = np.rint(scaled)
    if not float(nearest.max(initial=0.0)) < _TABLE_LIMIT or np.signbit(values).any():  # NaN, -0.00 too
        return None
    whole, cents = np.divmod(nearest.astype(np.intp), 100)
    whole = _WHOLE[whole]
    # within 1e-6 of a tie (rint is at most half away): those few go through `%`
    for i in np.flatnonzero(np.abs(scaled - nearest, out=scaled) > 0.5 - 1e-6).tolist():
        whole[i], cents[i] = f"{values[i]:.2f}", 100
    return whole, cents


def _rows(chip: ChipLabel, template: str) -> str:
    """``template`` (``%``-style: ``%d`` the value, then ``%.2f`` the box) once per feature of the chip."""
    if chip.rows is not None:  # rendered with the rest of its block (:meth:`LabelFormat.block_rows`)
        return chip.rows
    return _block_rows(chip.values, chip.boxes, np.array([0, len(chip.values)]), template)[0]


def _block_rows(values: np.ndarray, boxes: np.ndarray, cuts: np.ndarray, template: str) -> list[str]:
    """:func:`_rows` of many chips at once: chip ``i``'s features are ``cuts[i]:cuts[i + 1]``.

    A block's chips are rendered together: with hundreds of boxes a chip, the
    set-up of :func:`_hundredths` and of the row list cost as much per chip as
    the rows themselves (block by block: 0.13 → 0.07 s of CPU for the 1,024
    chips of 200k boxes).
    """
    n = len(values)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(n, 4)
    bounds = np.asarray(cuts).tolist()
    text = _hundredths(boxes.T.ravel()) if n >= 40 else None  # below, `%` costs less than the set-up
    if text is None:
        fields: list[Any] = [None] * (5 * n)  # value, x0, y0, x1, y1 of each feature in turn
        fields[0::5] = np.asarray(values).tolist()
        for k, column in enumerate(boxes.T.tolist(), 1):
            fields[k::5] = column
        return [(template * (b - a)) % tuple(fields[5 * a:5 * b]) for a, b in itertools.pairwise(bounds)]
    # per row: its head (the text up to the first number, with the class value), then per number
    # the text up to its point and its decimals with the text after them: 3x faster than `%`
    tails = _tails(template)
    whole, cents = text[0].reshape(4, n).tolist(), text[1].reshape(4, n)
    out: list[str] = [""] * (9 * n)
    out[0::9] = map(_heads(template).__getitem__, np.asarray(values).tolist())
    for k in range(4):
        out[1 + 2 * k::9], out[2 + 2 * k::9] = whole[k], tails[k][cents[k]].tolist()
    return ["".join(out[9 * a:9 * b]) for a, b in itertools.pairwise(bounds)]


def _slivers(boxes: np.ndarray) -> np.ndarray:
    """Boxes of some width (or height) whose two x (or y) print alike with 2 decimals, as 0.00.

    A polygon reaching 0.004 px into a chip would get ``128.00 ... 128.00``,
    which detection trainers refuse (torchvision: boxes need a positive width).

    Found by their hundredths, then each one that is within a hundredth checked
    with ``%`` itself (a tie may round either way). A point's or a line's box,
    of no width or height at all, is not one: it is written as it is, as
    ArcGIS does, and the export warns of it (``buffer_radius``).
    """
    sliver = np.zeros(len(boxes), bool)
    hundredths = np.rint(boxes * 100.0)
    close = np.flatnonzero((np.abs(hundredths[:, 2] - hundredths[:, 0]) <= 1)
                           | (np.abs(hundredths[:, 3] - hundredths[:, 1]) <= 1))
    for i, (x0, y0, x1, y1) in zip(close.tolist(), boxes[close].tolist(), strict=True):
        sliver[i] = (x1 > x0 and f"{x0:.2f}" == f"{x1:.2f}") or (y1 > y0 and f"{y0:.2f}" == f"{y1:.2f}")
    return sliver


class _Heads(dict[int, str]):
    """Row heads by class value: a template's text up to its first number, with the value in it."""

    def __init__(self, template: str):
        super().__init__()
        self.before, self.after = _pieces(template)[:2]

    def __missing__(self, value: int) -> str:
        head = self[value] = f"{self.before}{value}{self.after}"
        return head


@functools.cache
def _heads(template: str) -> _Heads:
    """The row heads of ``template`` (one per class value, made on first use)."""
    return _Heads(template)


@functools.cache
def _tails(template: str) -> tuple[np.ndarray, ...]:
    """Per number of a row template, the texts that follow its point.

    Index ``0..99``: the two decimals, then the template's text up to the next
    field; index 100: that text alone (after a number formatted whole).
    """
    pieces = _pieces(template)
    return tuple(np.array([f"{c:02d}{pieces[k + 2]}" for c in range(100)] + [pieces[k + 2]], dtype=object)
                 for k in range(4))


@functools.cache
def _pieces(template: str) -> tuple[str, ...]:
    """The six runs of text around a row template's five fields."""
    return tuple(re.split(r"%d|%\.2f", template))


class _PrintedBoxes(LabelFormat):
    """A format whose boxes are printed with 2 decimals."""

    def dropped_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Polygon slivers whose box prints 0.00 wide or high (:func:`_slivers`)."""
        return _slivers(boxes)


class KittiRectangles(_PrintedBoxes):
    """``labels/<stem>.txt``: one 15-column KITTI row per feature."""

    name = "KITTI_rectangles"
    boxes = True

    def encode(self, chip: ChipLabel) -> bytes:
        """KITTI rows for the chip's features (an empty file for none)."""
        return _rows(chip, _KITTI_ROW).encode()

    def block_rows(self, values: np.ndarray, boxes: np.ndarray, cuts: np.ndarray) -> list[str]:
        """Every chip's KITTI rows (:meth:`LabelFormat.block_rows`)."""
        return _block_rows(values, boxes, cuts, _KITTI_ROW)

    def count(self, data: bytes, *, width: int, height: int, **_: Any) -> dict[int, int]:
        """Rows per class; each row 15 numeric columns, no negatives, box inside the chip."""
        counts: Counter[int] = Counter()
        for n, line in enumerate(data.decode().splitlines(), 1):
            cols = line.split()
            if len(cols) != 15 or "-" in line:
                raise ValueError(f"row {n} needs 15 non-negative columns: {line!r}")
            counts[int(cols[0])] += 1
            _check_box([float(c) for c in cols[4:8]], width, height, n)
        return dict(counts)


class PascalVocRectangles(_PrintedBoxes):
    """``labels/<stem>.xml``: a PASCAL VOC annotation as ArcGIS writes it."""

    name = "PASCAL_VOC_rectangles"
    boxes = True

    def label_extension(self, image_extension: str) -> str:
        """Always ``xml``."""
        return "xml"

    def encode(self, chip: ChipLabel) -> bytes:
        """The annotation XML (no ``<object>`` for a chip without features)."""
        head = _VOC_HEAD.format(name=chip.image_name, w=chip.width, h=chip.height, d=chip.depth)
        return (head + _rows(chip, _VOC_OBJECT) + "</annotation>\n").encode()

    def block_rows(self, values: np.ndarray, boxes: np.ndarray, cuts: np.ndarray) -> list[str]:
        """Every chip's ``<object>`` elements (:meth:`LabelFormat.block_rows`)."""
        return _block_rows(values, boxes, cuts, _VOC_OBJECT)

    def count(self, data: bytes, *, width: int, height: int, **_: Any) -> dict[int, int]:
        """Objects per class; numeric ``<name>`` and a box inside the chip."""
        counts: Counter[int] = Counter()
        for n, obj in enumerate(ET.fromstring(data).findall("object"), 1):
            counts[int(obj.findtext("name", ""))] += 1
            box = obj.find("bndbox")
            if box is None:
                raise ValueError(f"object {n} has no <bndbox>")
            _check_box([float(box.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax")],
                       width, height, n)
        return dict(counts)


def _check_box(box: list[float], width: int, height: int, n: int) -> None:
    x0, y0, x1, y1 = box
    if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
        raise ValueError(f"box {n} {box} is not inside the {width} x {height} chip")
