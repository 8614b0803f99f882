"""``YOLO`` and ``YOLO_segmentation``: Ultralytics' text labels and ``data.yaml``.

Layout: ``images/<stem>.<ext>``, ``labels/<stem>.txt`` (Ultralytics finds a label
by replacing ``images`` with ``labels`` in the image path), and ``data.yaml`` in
the dataset folder. Class ids are 0-based indices into the classes sorted by
value (``names`` in ``data.yaml``); coordinates are normalised to [0, 1] by the
chip's width and height, 6 decimals.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import shapely

from ._common import class_pairs
from .base import ChipLabel, LabelFormat

__all__ = ["Yolo", "YoloSegmentation"]

_POLYGON = 3


def _numbers(values: np.ndarray) -> str:
    return " ".join(f"{v:.6f}" for v in (np.clip(values, 0.0, 1.0) + 0.0).tolist())


class Yolo(LabelFormat):
    """``labels/<stem>.txt``: one ``class cx cy w h`` row per feature (empty file for none).

    ``data.yaml`` holds ``train: images``, ``val: images`` and ``names`` (id → class
    name); split the chips into train/val folders as needed. It has no ``path``
    key: Ultralytics resolves a relative ``path`` (``.``) against the working
    directory, while without ``path`` it uses the folder of ``data.yaml``.
    """

    name = "YOLO"
    boxes = True
    image_files = True
    dataset_file = "data.yaml"
    #: Only for ``data.yaml``, written once by :meth:`finalize` (blocks add nothing).
    has_parts = True

    def row(self, chip: ChipLabel, i: int) -> str:
        """Feature ``i``'s numbers after the class id."""
        x0, y0, x1, y1 = chip.boxes[i]
        w, h = chip.width, chip.height
        return _numbers(np.array([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]))

    def encode(self, chip: ChipLabel) -> bytes:
        """One row per feature: the 0-based class id, then :meth:`row`."""
        return "".join(f"{int(k)} {self.row(chip, i)}\n"
                       for i, k in enumerate(chip.class_index.tolist())).encode()

    def finalize(self, store: Any, parts: list[bytes], classes: tuple[Any, ...]) -> None:
        """Write ``data.yaml``."""
        import yaml

        names = {i: name for i, (_, name) in enumerate(class_pairs(classes))}
        data = {"train": "images", "val": "images", "names": names}
        store.put("data.yaml", yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode())

    def check_dataset(self, data: bytes, images: set[str], classes: Any) -> tuple[dict[int, int], list[str]]:
        """``data.yaml``: ``names`` the classes in value order, ``train``/``val`` the images folder."""
        import yaml

        try:
            doc = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise ValueError(str(exc).replace("\n", " ")) from None
        if not isinstance(doc, dict):
            raise ValueError(f"holds {type(doc).__name__}, not a mapping")
        names = {i: name for i, (_, name) in enumerate(class_pairs(classes))}
        problems = [] if doc.get("names") == names else [
            f"{self.dataset_file} names {doc.get('names')}, the emd's classes are {names}"]
        problems += [f"{self.dataset_file} has {key}: {doc.get(key)!r}, not 'images'"
                     for key in ("train", "val") if doc.get(key) != "images"]
        return {}, problems

    def count(self, data: bytes, *, width: int, height: int, path: str | None = None,
              classes: Iterable[Any] | None = None) -> dict[int, int]:
        """Rows per class value: the rows hold 0-based class ids, mapped through ``classes``.

        Raises
        ------
        ValueError
            Without ``classes`` (``ClassInfo`` objects or the emd's ``Classes``), or
            for a row with a bad class id, column count, or a number outside [0, 1].
        """
        if classes is None:
            raise ValueError(f"{self.name} rows hold 0-based class ids: count(..., classes=<emd "
                             "Classes>) is needed to map them to class values")
        values = [v for v, _ in class_pairs(classes)]
        counts: dict[int, int] = {}
        for n, line in enumerate(data.decode().splitlines(), 1):
            cols = line.split()
            self._check_columns(cols, n)
            if not cols[0].isdigit() or int(cols[0]) >= len(values):
                raise ValueError(f"row {n}: class id {cols[0]!r} is not in 0..{len(values) - 1}")
            numbers = [float(c) for c in cols[1:]]
            if not all(0.0 <= v <= 1.0 for v in numbers):
                raise ValueError(f"row {n}: coordinates must be normalised to [0, 1]: {line!r}")
            value = values[int(cols[0])]
            counts[value] = counts.get(value, 0) + 1
        return counts

    def _check_columns(self, cols: list[str], n: int) -> None:
        if len(cols) != 5:
            raise ValueError(f"row {n} needs 5 columns (class cx cy w h), has {len(cols)}")


class YoloSegmentation(Yolo):
    """``labels/<stem>.txt``: one ``class x1 y1 x2 y2 ...`` polygon row per feature.

    The polygon is the exterior ring (without the closing vertex) of the
    feature's largest polygon part in the chip: a multi-part feature keeps only
    its largest part, and holes are not representable. Points and lines get
    their box as a 4-vertex polygon.
    """

    name = "YOLO_segmentation"
    needs_geometry = True

    def row(self, chip: ChipLabel, i: int) -> str:
        """Feature ``i``'s normalised polygon ``x1 y1 x2 y2 ...``."""
        if chip.geoms is None:
            raise ValueError("YOLO_segmentation needs the chip's clipped geometries")
        parts = [p for p in shapely.get_parts(chip.geoms[i]) if shapely.get_type_id(p) == _POLYGON]
        if parts:
            largest = parts[int(np.argmax(shapely.area(parts)))]
            xy = np.asarray(largest.exterior.coords)[:-1]
        else:
            x0, y0, x1, y1 = chip.boxes[i]
            xy = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        return _numbers((xy / (chip.width, chip.height)).ravel())

    def _check_columns(self, cols: list[str], n: int) -> None:
        if len(cols) < 7 or len(cols) % 2 == 0:
            raise ValueError(f"row {n} needs a class and 3 or more x y pairs, has {len(cols)} columns")
