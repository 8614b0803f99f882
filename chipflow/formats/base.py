"""The one small base class every metadata format implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

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
    class_index : numpy.ndarray
        ``(n,)`` index of each feature's class in ``classes``.
    classes : tuple of ClassInfo
        Every class of the export, sorted by value.
    mask : numpy.ndarray or None
        ``(height, width)`` class-value raster (0 = background/nodata), for
        formats with ``rasterize = True``.
    instances : numpy.ndarray or None
        ``(height, width)`` raster of feature positions ``1..n`` (0 = none), for
        formats with ``instances = True``.
    geoms : numpy.ndarray or None
        ``(n,)`` shapely geometries clipped to the chip, in chip pixels, for
        formats with ``needs_geometry = True``.
    encode_raster : callable or None
        Encodes a ``(height, width)`` array as a georeferenced chip in the
        dataset's label raster format.
    rows : str or None
        The chip's features already rendered as text by the format's
        :meth:`LabelFormat.block_rows` (with the rest of its block), or None.
    """

    stem: str
    image_name: str
    width: int
    height: int
    depth: int
    values: np.ndarray
    boxes: np.ndarray
    class_index: np.ndarray
    classes: tuple[Any, ...] = ()
    mask: np.ndarray | None = None
    instances: np.ndarray | None = None
    geoms: np.ndarray | None = None
    encode_raster: Callable[[np.ndarray], bytes] | None = None
    rows: str | None = None


class LabelFormat(ABC):
    """A metadata format: how one chip's features become its label file(s).

    Subclasses set the class attributes and implement :meth:`encode` and
    :meth:`count`; formats with another layout override :meth:`image_relpath`
    and :meth:`files`.
    """

    #: The ESRI ``metadata_format`` spelling.
    name: ClassVar[str]
    #: Written to ``esri_accumulated_stats.json`` as ``OutputFeatures``.
    output_features: ClassVar[bool] = True
    #: Whether the pipeline must rasterize the features into ``ChipLabel.mask``.
    rasterize: ClassVar[bool] = False
    #: Whether the pipeline must rasterize feature instances into ``ChipLabel.instances``.
    instances: ClassVar[bool] = False
    #: Whether the pipeline must pass clipped chip-space geometries in ``ChipLabel.geoms``.
    needs_geometry: ClassVar[bool] = False
    #: Which statistics block of ``esri_accumulated_stats.json`` :meth:`count` agrees with.
    counted: ClassVar[str] = "NumFeaturesPerClass"
    #: False for formats that export chips without labels (``in_class_data`` optional).
    needs_labels: ClassVar[bool] = True
    #: True for formats with a dataset-wide file built from :meth:`block_part` / :meth:`finalize`.
    has_parts: ClassVar[bool] = False
    #: True for formats with one chip per feature, centred on it (Labeled_Tiles, Imagenet).
    feature_chips: ClassVar[bool] = False
    #: False for formats without a label file per chip (COCO, Export_Tiles, Imagenet).
    per_chip_labels: ClassVar[bool] = True
    #: True for formats with a folder per class, named as the class (RCNN_Masks, Panoptic, Imagenet):
    #: a class whose name is no safe folder name is renamed to its folder's name at planning.
    class_folders: ClassVar[bool] = False
    #: True for formats whose labels name the chips' image files (COCO's ``file_name``, YOLO's
    #: ``images/``), which ``image_chip_format="ZARR"`` does not write.
    image_files: ClassVar[bool] = False
    #: The dataset-wide file the format writes besides the ArcGIS ones (COCO's ``annotations.json``,
    #: YOLO's ``data.yaml``), which ``validate`` checks with :meth:`check_dataset`.
    dataset_file: ClassVar[str | None] = None
    #: True for formats whose labels are boxes of the features (KITTI, PASCAL VOC, Labeled_Tiles,
    #: COCO, YOLO): a point's box has no area, so points without ``buffer_radius`` get a warning.
    boxes: ClassVar[bool] = False

    def label_extension(self, image_extension: str) -> str:
        """The label file's extension, given the image chips' extension."""
        return "txt"

    def image_relpath(self, chip: ChipLabel) -> str:
        """Where the chip's image goes, without extension (``images/<stem>``)."""
        return f"images/{chip.stem}"

    def files(self, chip: ChipLabel, label_extension: str) -> list[tuple[str, bytes]]:
        """The chip's label files as ``(relative path, bytes)``; the first one goes in map.txt."""
        return [(f"labels/{chip.stem}.{label_extension}", self.encode(chip))]

    def label_paths(self, stem: str, label_extension: str, classes: Any) -> list[str]:
        """Every label file chip ``stem`` may have (``validate`` reads those that exist)."""
        return [f"labels/{stem}.{label_extension}"]

    def check_dataset(self, data: bytes, images: set[str], classes: Any) -> tuple[dict[int, int], list[str]]:
        """:attr:`dataset_file` against the dataset: its labels per class value, and its problems.

        ``images`` are the chips' paths (``images/<stem>.<ext>``), ``classes`` the
        emd's ``Classes``. Raises ``ValueError`` (or ``KeyError``/``TypeError``)
        when the file does not parse.
        """
        return {}, []

    def class_spellings(self, classes: tuple[Any, ...]) -> dict[int, str] | None:
        """Class value → the class name as this format writes it into its labels; None: it writes none.

        Formats with :attr:`class_folders` write each name as a folder
        (:func:`chipflow.formats._common.class_folders`). A class whose spelling
        differs is renamed to it at planning, so that the emd names what the labels hold.

        Raises
        ------
        ValueError
            When two classes would be written alike.
        """
        if not self.class_folders:
            return None
        from ._common import class_folders

        return class_folders(classes)

    def emd_extra(self, classes: tuple[Any, ...] = ()) -> dict[str, Any]:
        """Keys this format adds to ``esri_model_definition.emd``, given the export's classes."""
        return {}

    def block_part(self, chips: list[ChipLabel]) -> bytes | None:
        """A block's share of a dataset-wide label file (COCO's annotations), or None.

        Called once per block with the labels of the chips it exported, in chip-id
        order; the bytes are stored with the block and handed to :meth:`finalize`.
        """
        return None

    def finalize(self, store: Any, parts: list[bytes], classes: tuple[Any, ...]) -> None:
        """Write dataset-wide files from the blocks' parts (in block order), after every block."""
        return None

    def dropped_boxes(self, boxes: np.ndarray) -> np.ndarray | None:
        """Which features, by their boxes in a chip's pixels, the chip's label cannot hold; None: none.

        Dropped before anything counts them, so the statistics, the chip index
        and ``ONLY_TILES_WITH_FEATURES`` agree with the label files.
        """
        return None

    def block_rows(self, values: np.ndarray, boxes: np.ndarray, cuts: np.ndarray) -> list[str] | None:
        """The text of every chip's features of a block, rendered at once (``ChipLabel.rows``), or None.

        ``values`` and ``boxes`` are as in :class:`ChipLabel`, for the features
        of all the block's chips, chip ``i``'s being ``cuts[i]:cuts[i + 1]``.
        Formats whose label is a row per feature render them here, where numpy
        works on a block's thousands of boxes rather than a chip's dozens; the
        others (the default) render each chip in :meth:`encode`.
        """
        return None

    @abstractmethod
    def encode(self, chip: ChipLabel) -> bytes:
        """The label file's bytes for one chip."""

    @abstractmethod
    def count(self, data: bytes, *, width: int, height: int, path: str | None = None,
              classes: Any = None) -> dict[int, int]:
        """Parse a label file as its consumer would: class value → features (or pixels).

        ``path`` (the file's path in the dataset) and ``classes`` (the emd's
        ``Classes``) let formats whose files hold no class values map them back.

        Raises
        ------
        ValueError
            Saying what is wrong with the file.
        """
