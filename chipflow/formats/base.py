"""The one small base class every metadata format implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

__all__ = ["ChipLabel", "LabelFormat"]


@dataclass(frozen=True)
class ChipLabel:
    """Everything a format needs to write one chip's label.

    Attributes
    ----------
    stem : str
        The chip's file stem (``"000000042"``).
    image_name : str
        The chip's image file name (``"000000042.tif"``).
    width, height, depth : int
        Chip size in pixels and its band count.
    values : numpy.ndarray
        ``(n,)`` int class value of each feature in the chip.
    boxes : numpy.ndarray
        ``(n, 4)`` float64 ``xmin, ymin, xmax, ymax`` in chip pixels (origin
        top-left), the pixel box of each feature clipped to the chip.
    mask : numpy.ndarray or None
        ``(height, width)`` class-value raster (0 = background/nodata), for
        formats with ``rasterize = True``.
    encode_raster : callable or None
        Encodes a ``(height, width)`` array as a georeferenced chip in the
        dataset's label raster format.
    """

    stem: str
    image_name: str
    width: int
    height: int
    depth: int
    values: np.ndarray
    boxes: np.ndarray
    mask: np.ndarray | None = None
    encode_raster: Callable[[np.ndarray], bytes] | None = None


class LabelFormat(ABC):
    """A metadata format: how one chip's features become one label file.

    Subclasses set the class attributes and implement :meth:`encode`.
    """

    #: The ESRI ``metadata_format`` spelling.
    name: ClassVar[str]
    #: Written to ``esri_accumulated_stats.json`` as ``OutputFeatures``.
    output_features: ClassVar[bool] = True
    #: Whether the pipeline must rasterize the features into ``ChipLabel.mask``.
    rasterize: ClassVar[bool] = False

    def label_extension(self, image_extension: str) -> str:
        """The label file's extension, given the image chips' extension."""
        return "txt"

    #: Which statistics block of ``esri_accumulated_stats.json`` :meth:`count` agrees with.
    counted: ClassVar[str] = "NumFeaturesPerClass"

    @abstractmethod
    def encode(self, chip: ChipLabel) -> bytes:
        """The label file's bytes for one chip."""

    @abstractmethod
    def count(self, data: bytes, *, width: int, height: int) -> dict[int, int]:
        """Parse a label file as its consumer would: class value → features (or pixels).

        Raises
        ------
        ValueError
            Saying what is wrong with the file.
        """
