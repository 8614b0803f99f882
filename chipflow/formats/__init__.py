"""Metadata formats, looked up by their ESRI name (case-insensitive).

>>> get("pascal_voc_rectangles").name
'PASCAL_VOC_rectangles'
>>> names()[:3]
['COCO', 'Classified_Tiles', 'Export_Tiles']
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidParameterError
from .base import ChipLabel, LabelFormat
from .classified_tiles import ClassifiedTiles
from .coco import COCO
from .export_tiles import ExportTiles
from .multilabeled_tiles import MultiLabeledTiles
from .panoptic import PanopticSegmentation
from .rcnn_masks import RCNNMasks
from .rectangles import KittiRectangles, PascalVocRectangles
from .yolo import Yolo, YoloSegmentation

__all__ = ["ChipLabel", "LabelFormat", "get", "names", "register"]

_REGISTRY: dict[str, LabelFormat] = {}


def register(fmt: LabelFormat) -> LabelFormat:
    """Add a format to the registry; a name may be registered once."""
    key = fmt.name.lower()
    if key in _REGISTRY:
        raise ValueError(f"metadata format {fmt.name!r} is already registered")
    _REGISTRY[key] = fmt
    return fmt


def names() -> list[str]:
    """The registered formats' ESRI names, sorted."""
    return sorted(f.name for f in _REGISTRY.values())


def get(name: Any) -> LabelFormat:
    """The format called ``name`` (any case).

    Raises
    ------
    InvalidParameterError
        For an unknown name, listing the valid ones.
    """
    fmt = _REGISTRY.get(name.strip().lower()) if isinstance(name, str) else None
    if fmt is None:
        raise InvalidParameterError(
            "metadata_format", name, f"must be one of {', '.join(names())}"
        )
    return fmt


for _fmt in (KittiRectangles(), PascalVocRectangles(), ClassifiedTiles(), RCNNMasks(), MultiLabeledTiles(),
             ExportTiles(), PanopticSegmentation(), COCO(), Yolo(), YoloSegmentation()):
    register(_fmt)

from .labeled_tiles import Imagenet, LabeledTiles  # noqa: E402

for _fmt in (LabeledTiles(), Imagenet()):
    register(_fmt)
