"""Shared type aliases."""

from __future__ import annotations

from typing import Literal, TypeAlias

__all__ = ["BBox", "PixelWindow", "ImageChipFormatName", "MetadataFormatName"]

#: ``(minx, miny, maxx, maxy)`` in map units.
BBox: TypeAlias = tuple[float, float, float, float]

#: ``(col_off, row_off, width, height)`` in whole pixels of the source raster.
PixelWindow: TypeAlias = tuple[int, int, int, int]

ImageChipFormatName: TypeAlias = Literal["TIFF", "PNG", "JPEG", "MRF", "ZARR"]
MetadataFormatName: TypeAlias = Literal[
    "KITTI_rectangles", "PASCAL_VOC_rectangles", "Classified_Tiles", "RCNN_Masks", "Labeled_Tiles",
    "MultiLabeled_Tiles", "Imagenet", "Export_Tiles", "Panoptic_Segmentation", "COCO", "YOLO",
    "YOLO_segmentation",
]
