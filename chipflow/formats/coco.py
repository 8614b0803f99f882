"""``COCO``: one ``annotations.json`` (COCO instances) for the whole dataset.

Each block contributes its chips' image and annotation records (:meth:`COCO.block_part`);
:meth:`COCO.finalize` joins them, numbers the annotations and writes the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import shapely

from ._common import class_pairs
from .base import ChipLabel, LabelFormat

__all__ = ["COCO", "rle_encode"]

#: Decimals kept for pixel coordinates, boxes and areas.
_DIGITS = 4
_POLYGON, _MULTIPOLYGON = 3, 6


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE of a 2-D mask: runs in column-major order, starting with zeros.

    >>> rle_encode(np.array([[0, 1], [1, 1]]))
    {'size': [2, 2], 'counts': [1, 3]}
    """
    flat = np.asarray(mask, bool).ravel(order="F")
    if flat.size == 0:
        return {"size": list(mask.shape), "counts": []}
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _round(values: Iterable[float]) -> list[float]:
    return [round(float(v), _DIGITS) + 0.0 for v in values]


def _segmentation(geom: Any, height: int, width: int) -> list[list[float]] | dict[str, Any]:
    """COCO polygons (exterior rings, no closing vertex) or, for a polygon with holes, RLE."""
    parts = [p for p in shapely.get_parts(geom) if shapely.get_type_id(p) == _POLYGON]
    if not parts:  # points and lines: no area to segment
        return []
    if any(shapely.get_num_interior_rings(p) for p in parts):
        from affine import Affine
        from rasterio.features import rasterize

        mask = rasterize([(geom, 1)], out_shape=(height, width), transform=Affine.identity(),
                         fill=0, dtype=np.uint8)
        return rle_encode(mask)
    return [_round(np.asarray(p.exterior.coords)[:-1].ravel()) for p in parts]


class COCO(LabelFormat):
    """``annotations.json``: COCO instances for every chip; no per-chip label file.

    * ``images``: ``{id, file_name, width, height}``, ``id`` = the chip's number
      (its stem), ``file_name`` = ``images/<stem>.<ext>`` relative to the dataset
      folder.
    * ``annotations``: one per feature in a chip, ``id`` = 1..N in block order;
      ``category_id`` = class value; ``bbox`` = ``[x, y, w, h]`` of the feature
      clipped to the chip (pixels, origin top-left); ``area`` = area of the
      clipped feature in pixels²; ``iscrowd`` = 0; ``segmentation`` = the
      exterior ring of each polygon part as ``[x1, y1, x2, y2, ...]`` (chip
      pixels). COCO polygons cannot hold holes: a feature with a hole is written
      as an uncompressed RLE ``{"size": [h, w], "counts": [...]}`` of the
      feature rasterized into the chip (pixel centres inside), still with
      ``iscrowd`` 0 (pycocotools and the usual loaders read RLE whatever
      ``iscrowd`` says, while ``iscrowd`` 1 would make COCOeval ignore the
      object). Points and lines get ``segmentation`` ``[]``.
    * ``categories``: ``{id: class value, name, supercategory: ""}``.
    """

    name = "COCO"
    boxes = True
    image_files = True
    dataset_file = "annotations.json"
    per_chip_labels = False
    has_parts = True
    needs_geometry = True

    def label_extension(self, image_extension: str) -> str:
        """``json`` (the one dataset-wide file)."""
        return "json"

    def files(self, chip: ChipLabel, label_extension: str) -> list[tuple[str, bytes]]:
        """None: every label is in ``annotations.json``."""
        return []

    def encode(self, chip: ChipLabel) -> bytes:
        """The chip's image and annotation records as compact JSON."""
        return json.dumps(self._records(chip), separators=(",", ":")).encode()

    def _records(self, chip: ChipLabel) -> dict[str, Any]:
        if chip.geoms is None:
            raise ValueError("COCO needs the chip's clipped geometries")
        image_id = int(chip.stem)
        annotations = []
        for value, box, geom in zip(chip.values.tolist(), chip.boxes.tolist(), chip.geoms.tolist(),
                                    strict=True):
            x0, y0, x1, y1 = _round(box)
            annotations.append({
                "image_id": image_id,
                "category_id": int(value),
                "bbox": _round([x0, y0, x1 - x0, y1 - y0]),
                "area": _round([shapely.area(geom)])[0],
                "iscrowd": 0,
                "segmentation": _segmentation(geom, chip.height, chip.width),
            })
        image = {"id": image_id, "file_name": f"images/{chip.image_name}", "width": chip.width,
                 "height": chip.height}
        return {"images": [image], "annotations": annotations}

    def block_part(self, chips: list[ChipLabel]) -> bytes | None:
        """The block's ``{"images": [...], "annotations": [...]}`` (annotations not yet numbered)."""
        images, annotations = [], []
        for chip in chips:
            records = self._records(chip)
            images += records["images"]
            annotations += records["annotations"]
        return json.dumps({"images": images, "annotations": annotations}, separators=(",", ":")).encode()

    def finalize(self, store: Any, parts: list[bytes], classes: tuple[Any, ...]) -> None:
        """Join the parts in block order, number the annotations 1..N, write ``annotations.json``.

        Part by part, as text: only one block's records are Python objects at a
        time (all of them at once took one worker about 1.2 KB per annotation,
        1.9 GiB at 16384², stride 128, 200k features). The bytes are those of
        ``json.dumps`` of the whole document.
        """
        from .._version import __version__

        compact = {"separators": (",", ":")}
        images: list[str] = []
        annotations: list[str] = []
        numbered = 0
        for raw in parts:
            part = json.loads(raw) if raw else None
            if not part:
                continue
            for ann in part["annotations"]:
                numbered += 1
                ann["id"] = numbered
            for records, texts in ((part["images"], images), (part["annotations"], annotations)):
                if records:
                    texts.append(json.dumps(records, **compact)[1:-1])  # the list's items, no brackets
            del part
        info = {"description": "Training chips exported by chipflow", "version": __version__}
        head = json.dumps({"info": info, "licenses": []}, **compact)[:-1]
        categories = json.dumps([{"id": v, "name": n, "supercategory": ""} for v, n in class_pairs(classes)],
                                **compact)
        text = (f'{head},"images":[{",".join(images)}],"annotations":[{",".join(annotations)}],'
                f'"categories":{categories}}}')
        del images, annotations
        store.put("annotations.json", text.encode())

    def check_dataset(self, data: bytes, images: set[str], classes: Any) -> tuple[dict[int, int], list[str]]:
        """Annotations per category; every chip an image, every image a chip, categories the classes."""
        coco = json.loads(data)
        named = {img["file_name"] for img in coco["images"]}
        ids = {img["id"] for img in coco["images"]}
        problems = [f"{self.dataset_file} names {name}, which is not a chip"
                    for name in sorted(named - images)]
        if images - named:
            problems.append(f"{len(images - named)} chips are not in {self.dataset_file}, e.g. "
                            f"{sorted(images - named)[0]}")
        strays = sorted({ann["image_id"] for ann in coco["annotations"]} - ids)
        if strays:
            problems.append(f"annotations refer to image ids {strays[:5]} that {self.dataset_file} lacks")
        categories = [(c["id"], c["name"]) for c in coco["categories"]]
        if categories != list(class_pairs(classes)):
            problems.append(f"{self.dataset_file} categories are {categories}, the emd's classes "
                            f"{list(class_pairs(classes))}")
        return self.count(data, width=0, height=0), problems

    def count(self, data: bytes, *, width: int, height: int, **_: Any) -> dict[int, int]:
        """Annotations per category of a COCO file (``annotations.json`` or one chip's records).

        Raises
        ------
        ValueError
            For a box outside its ``width`` x ``height`` image.
        """
        coco = json.loads(data)
        sizes = {img["id"]: (img["width"], img["height"]) for img in coco.get("images", [])}
        counts: dict[int, int] = {}
        for n, ann in enumerate(coco.get("annotations", []), 1):
            w, h = sizes.get(ann["image_id"], (width, height))
            x, y, bw, bh = ann["bbox"]
            eps = 10.0 ** -_DIGITS  # rounding
            if not (-eps <= x <= x + bw <= w + eps and -eps <= y <= y + bh <= h + eps):
                raise ValueError(f"annotation {n} box {ann['bbox']} is not inside the {w} x {h} image")
            counts[int(ann["category_id"])] = counts.get(int(ann["category_id"]), 0) + 1
        return counts
