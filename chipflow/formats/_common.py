"""Helpers shared by the instance, multi-label and dataset-wide formats.

* per-class instance masks (``RCNN_Masks``, ``Panoptic_Segmentation``);
* class folders named by :func:`chipflow.store.safe_name` of the class name;
* reading a class list given either as ``ClassInfo`` objects or as the emd's
  ``{"Value", "Name", ...}`` dicts, so ``count(..., classes=...)`` accepts both.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from ..store import safe_name
from .base import ChipLabel

__all__ = ["class_folders", "class_pairs", "count_instance_mask", "folder_class", "instance_files",
           "instance_masks", "open_label", "raster_label_extension"]


def raster_label_extension(image_extension: str) -> str:
    """``tif`` for TIFF chips, ``png`` for PNG and JPEG chips (a lossy JPEG would invent ids)."""
    return "tif" if image_extension == "tif" else "png"


def class_pairs(classes: Iterable[Any]) -> list[tuple[int, str]]:
    """``(value, name)`` of each class: ``ClassInfo``-like objects or emd ``Classes`` dicts."""
    out = []
    for c in classes:
        if isinstance(c, dict):
            out.append((int(c.get("Value", c.get("ClassValue"))), str(c.get("Name", c.get("ClassName")))))
        else:
            out.append((int(c.value), str(c.name)))
    return out


def class_folders(classes: Iterable[Any]) -> dict[int, str]:
    """Class value → folder name: the class name made safe by :func:`chipflow.store.safe_name`.

    The consumer finds a class's masks in the folder named exactly like the class
    ``Name``; a name that is not a safe path component (``"a/b"``, ``".."``, ``"CON"``)
    gets the safe spelling instead, which the consumer cannot match to the name.

    Raises
    ------
    ValueError
        When two classes would share a folder.
    """
    return distinct_spellings(classes, safe_name, fold_case=True)  # case-insensitive file systems


def distinct_spellings(classes: Iterable[Any], spell: Callable[[str], str], *,
                       fold_case: bool = False) -> dict[int, str]:
    """Class value → ``spell(name)``, the class name as a format writes it (a folder, a label).

    Raises
    ------
    ValueError
        When two classes would be written alike (``fold_case``: alike but for case).
    """
    spelled: dict[int, str] = {}
    owner: dict[str, str] = {}
    for value, name in class_pairs(classes):
        written = spell(name)
        key = written.lower() if fold_case else written
        if key in owner:
            raise ValueError(
                f"classes {owner[key]!r} and {name!r} would be written alike in the labels ({written!r}); "
                "give them distinct names (class_value_field's ClassName)"
            )
        owner[key] = name
        spelled[value] = written
    return spelled


@functools.lru_cache(maxsize=16)
def _chip_folders(classes: tuple[Any, ...]) -> dict[int, str]:
    return class_folders(classes)


def instance_masks(chip: ChipLabel) -> list[tuple[int, np.ndarray]]:
    """Per class present in ``chip.instances``, in class order: ``(class index, instance mask)``.

    Instance ids are ``1..k`` within the chip and class, given to the class's
    features in the order of their positions in ``chip.values``; a feature with no
    pixel in ``chip.instances`` (a sliver between pixel centres, or hidden by a later
    feature) is not an instance of the mask. Masks are uint8 up to 255 instances,
    uint16 up to 65535, else uint32.
    """
    if chip.instances is None:
        raise ValueError("instance masks need the chip's rasterized feature instances")
    inst = chip.instances
    n = len(chip.class_index)
    if n == 0:
        return []
    seen = np.bincount(inst.ravel(), minlength=n + 1)[1:n + 1] > 0  # per feature position
    class_index = np.asarray(chip.class_index)
    out = []
    for k in np.unique(class_index[seen]).tolist():
        members = seen & (class_index == k)
        lookup = np.zeros(n + 1, np.int64)
        lookup[1:][members] = np.arange(1, int(members.sum()) + 1)
        count = int(members.sum())
        dtype = np.uint8 if count <= 255 else np.uint16 if count <= 65535 else np.uint32
        out.append((int(k), lookup[inst].astype(dtype)))
    return out


def instance_files(chip: ChipLabel, label_extension: str, root: str) -> list[tuple[str, bytes]]:
    """``<root>/<class folder>/<stem>.<ext>`` per class with an instance, in class order."""
    if chip.encode_raster is None:
        raise ValueError("instance masks need the chip's label raster encoder")
    folders = _chip_folders(tuple(chip.classes))
    values = [c.value for c in chip.classes]
    return [
        (f"{root}/{folders[values[k]]}/{chip.stem}.{label_extension}", chip.encode_raster(mask))
        for k, mask in instance_masks(chip)
    ]


def folder_class(path: str | None, classes: Iterable[Any] | None, fmt: str) -> int:
    """The class value of a mask from its folder (``labels/<class folder>/<stem>.<ext>``)."""
    if path is None or classes is None:
        raise ValueError(
            f"a {fmt} mask's class is its folder: count(..., path=<label path>, "
            "classes=<emd Classes>) is needed to count it"
        )
    parts = path.replace("\\", "/").split("/")
    folder = parts[-2] if len(parts) >= 2 else ""
    by_folder = {f: v for v, f in class_folders(classes).items()}
    if folder not in by_folder:
        raise ValueError(f"{path}: folder {folder!r} is no class's folder ({sorted(by_folder)})")
    return by_folder[folder]


@contextlib.contextmanager
def open_label(data: bytes) -> Iterator[Any]:
    """A label raster's bytes opened with rasterio (PNG labels carry no georeferencing: no warning)."""
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.io import MemoryFile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(data) as mem, mem.open() as ds:
            yield ds


def count_instance_mask(data: bytes, *, width: int, height: int) -> int:
    """Instances in a mask file: one integer band of the chip's size, ids exactly ``1..k``."""
    with open_label(data) as ds:
        if ds.count != 1 or (ds.width, ds.height) != (width, height):
            raise ValueError(f"needs 1 band of {width} x {height}, has {ds.count} of "
                             f"{ds.width} x {ds.height}")
        mask = ds.read(1)
    if mask.dtype.kind not in "ui":
        raise ValueError(f"an instance mask must be integer, not {mask.dtype}")
    ids = np.unique(mask)
    ids = ids[ids != 0]
    if ids.size and (ids[0] < 1 or ids[-1] != ids.size):
        raise ValueError(f"instance ids must be 1..k without gaps, found {ids.tolist()[:10]}")
    return int(ids.size)
