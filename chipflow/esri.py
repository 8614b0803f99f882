"""``ExportTrainingDataForDeepLearning``: the arcpy signature, so a script ports by changing one import.

>>> from chipflow import ExportTrainingDataForDeepLearning  # instead of: from arcpy.ia import *
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidParameterError
from .pipeline import ExportResult, export_training_data

__all__ = ["ExportTrainingDataForDeepLearning", "POSITIONAL"]

#: The tool's parameters in ArcGIS Pro 3's positional order (the first 19 are the classic tool's).
POSITIONAL = (
    "in_raster", "out_folder", "in_class_data", "image_chip_format", "tile_size_x", "tile_size_y",
    "stride_x", "stride_y", "output_nofeature_tiles", "metadata_format", "start_index",
    "class_value_field", "buffer_radius", "in_mask_polygons", "rotation_angle", "reference_system",
    "processing_mode", "blacken_around_feature", "crop_mode", "in_raster2", "in_instance_data",
    "instance_class_value_field", "min_polygon_overlap_ratio",
)
_UNSUPPORTED = {
    "in_raster2": "a second raster (change detection, pix2pix, CycleGAN) is not supported yet",
    "in_instance_data": "separate instance data is not supported yet; Panoptic_Segmentation takes "
                        "instances from in_class_data",
    "instance_class_value_field": "separate instance data is not supported yet",
}


def _is_default(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() in ("#", ""))


def ExportTrainingDataForDeepLearning(*args: Any, **kwargs: Any) -> ExportResult:  # noqa: N802
    """Run :func:`chipflow.export_training_data` with arcpy's positional parameters.

    Values are ESRI's: numbers may be strings (``"256"``), and ``"#"`` or None
    means the default. Keyword arguments (also chipflow's own, like ``client=``)
    are accepted too.

    Raises
    ------
    TypeError
        Too many positional arguments, or a parameter given twice.
    InvalidParameterError
        A parameter chipflow does not support yet, named.
    """
    if len(args) > len(POSITIONAL):
        raise TypeError(f"ExportTrainingDataForDeepLearning takes at most {len(POSITIONAL)} positional "
                        f"arguments ({len(args)} given)")
    params = dict(zip(POSITIONAL, args, strict=False))
    twice = sorted(set(params) & set(kwargs))
    if twice:
        raise TypeError(f"ExportTrainingDataForDeepLearning got {twice} both by position and by name")
    params.update(kwargs)
    params = {k: v for k, v in params.items() if not _is_default(v)}
    for name, why in _UNSUPPORTED.items():
        if name in params:
            raise InvalidParameterError(name, params[name], why)
    missing = [n for n in ("in_raster", "out_folder") if n not in params]
    if missing:
        raise TypeError(f"ExportTrainingDataForDeepLearning needs {missing}")
    return export_training_data(params.pop("in_raster"), params.pop("out_folder"),
                                params.pop("in_class_data", None), **params)
