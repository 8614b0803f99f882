"""chipflow: deep-learning training chips from georeferenced rasters, on Dask.

>>> import chipflow
>>> result = chipflow.export_training_data(  # doctest: +SKIP
...     "image.tif", "out/", "buildings.gpkg", metadata_format="PASCAL_VOC_rectangles")
"""

from ._dask import local_cluster
from ._version import __version__
from .config import ExportConfig
from .errors import (
    ChipflowDeprecationWarning,
    ChipflowError,
    ChipflowWarning,
    InputNotFoundError,
    InvalidParameterError,
    LabelError,
    OutputError,
    RasterError,
)
from .esri import ExportTrainingDataForDeepLearning
from .labels import ClassInfo
from .pipeline import ExportResult, export_training_data

__all__ = [
    "ChipflowDeprecationWarning",
    "ChipflowError",
    "ChipflowWarning",
    "ClassInfo",
    "ExportConfig",
    "ExportResult",
    "ExportTrainingDataForDeepLearning",
    "InputNotFoundError",
    "InvalidParameterError",
    "LabelError",
    "OutputError",
    "RasterError",
    "__version__",
    "export_training_data",
    "local_cluster",
]

