"""Parameters: ESRI names and values in, one validated, frozen ``ExportConfig`` out.

Every check that does not need to open an input happens here, before anything
is read or written; the checks that need the raster (tile larger than the
raster, PNG with four bands, ...) happen in :func:`check_against_raster`, still
before the first byte of output.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, TypeVar

import numpy as np

from .errors import ChipflowDeprecationWarning, ChipflowWarning, InvalidParameterError
from .formats import LabelFormat
from .formats import get as get_format
from .grid import EdgePolicy

__all__ = [
    "DEFAULT_METADATA_FORMAT",
    "CropMode",
    "ExportConfig",
    "ProcessingMode",
    "ReferenceSystem",
    "ImageChipFormat",
    "NoFeatureTiles",
    "check_against_raster",
    "check_n_workers",
    "check_scheduler",
    "home_expanded",
    "make_config",
]


#: ArcGIS Pro 3's default ``metadata_format`` (the older tool's was ``KITTI_rectangles``).
DEFAULT_METADATA_FORMAT = "PASCAL_VOC_rectangles"


class ImageChipFormat(str, Enum):
    """Raster format of the image chips (ESRI ``image_chip_format``)."""

    TIFF = "TIFF"
    PNG = "PNG"
    JPEG = "JPEG"
    MRF = "MRF"
    #: chipflow's own: every chip in one Zarr v3 store, ``chips.zarr`` (see :mod:`chipflow.zarr_store`).
    ZARR = "ZARR"

    @property
    def extension(self) -> str:
        """File extension, as ArcGIS writes it (``zarr``: the store's, no file per chip)."""
        return {"TIFF": "tif", "PNG": "png", "JPEG": "jpg", "MRF": "mrf", "ZARR": "zarr"}[self.value]


class NoFeatureTiles(str, Enum):
    """ESRI ``output_nofeature_tiles``: export chips without features or not."""

    ALL_TILES = "ALL_TILES"
    ONLY_TILES_WITH_FEATURES = "ONLY_TILES_WITH_FEATURES"


class ReferenceSystem(str, Enum):
    """ESRI ``reference_system``: the space chips are cut in."""

    MAP_SPACE = "MAP_SPACE"
    PIXEL_SPACE = "PIXEL_SPACE"
    IMAGE_SPACE = "IMAGE_SPACE"


class ProcessingMode(str, Enum):
    """ESRI ``processing_mode``: several input rasters as one mosaic, or each on its own."""

    PROCESS_AS_MOSAICKED_IMAGE = "PROCESS_AS_MOSAICKED_IMAGE"
    PROCESS_ITEMS_SEPARATELY = "PROCESS_ITEMS_SEPARATELY"


class CropMode(str, Enum):
    """ESRI ``crop_mode`` (Labeled_Tiles, Imagenet): chips of the tile size, or the feature's box."""

    FIXED_SIZE = "FIXED_SIZE"
    BOUNDING_BOX = "BOUNDING_BOX"


E = TypeVar("E", bound=Enum)


def _enum(cls: type[E], parameter: str, value: Any) -> E:
    """Parse an ESRI string value case-insensitively (``"#"``/None are handled by callers)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        for member in cls:
            if member.value.lower() == value.strip().lower():
                return member
    allowed = ", ".join(m.value for m in cls)
    raise InvalidParameterError(parameter, value, f"must be one of {allowed}")


def _number(parameter: str, value: Any, *, low: float, high: float, high_open: bool = False) -> float:
    """A float (numbers or numeric strings) within ``[low, high]`` (or ``[low, high)``)."""
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        number = float("nan")
    ok = low <= number < high if high_open else low <= number <= high
    if isinstance(value, bool) or not ok:
        bound = f"{low} <= value {'<' if high_open else '<='} {high}"
        raise InvalidParameterError(parameter, value, f"must be a number with {bound}")
    return number


def _extent(value: Any) -> tuple[float, float, float, float] | None:
    """``(xmin, ymin, xmax, ymax)`` from a sequence or arcpy's ``"xmin ymin xmax ymax"`` string."""
    if value is None:
        return None
    parts = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    try:
        box = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
        raise InvalidParameterError(
            "extent", value, "must be (xmin, ymin, xmax, ymax) in the raster's CRS, with xmin < xmax "
            "and ymin < ymax")
    return box  # type: ignore[return-value]


def _splits(value: Any) -> tuple[tuple[str, float], ...]:
    """``"train=0.8,val=0.1,test=0.1"`` or a mapping → ``(("train", 0.8), ...)`` summing to 1."""
    if value is None or value == "" or value == {}:
        return ()
    items = (value.items() if isinstance(value, dict)
             else (part.split("=", 1) for part in str(value).split(",") if part.strip()))
    try:
        pairs = tuple((str(k).strip(), float(v)) for k, v in items)
    except (TypeError, ValueError):
        pairs = ()
    if not pairs:
        raise InvalidParameterError("split", value, "must name splits and fractions, like "
                                    "'train=0.8,val=0.1,test=0.1'")
    seen: set[str] = set()
    for name, fraction in pairs:
        if not (name and name.replace("_", "").replace("-", "").isalnum()):
            raise InvalidParameterError(
                "split", value, f"split name {name!r} must be letters, digits, _ and - (it names a folder)")
        if not fraction > 0:
            raise InvalidParameterError(
                "split", value, f"the fraction of {name!r} must be above 0, not {fraction:g}")
        if name.lower() in seen:
            raise InvalidParameterError(
                "split", value, f"names a split twice ({name.lower()!r}, in any case: splits are folders)")
        seen.add(name.lower())
    total = sum(fraction for _, fraction in pairs)
    if abs(total - 1) > 1e-6:
        raise InvalidParameterError("split", value, f"fractions must sum to 1, not {total:g}")
    return pairs


_YES, _NO = ("TRUE", "YES", "1"), ("FALSE", "NO", "0")


def _flag(parameter: str, value: Any, true: tuple[str, ...] = _YES, false: tuple[str, ...] = _NO) -> bool:
    """A bool, or one of its words in any case: ESRI's two-valued keywords, else true/yes/1, false/no/0.

    A YAML job's ``overwrite: "false"`` is False, not a (true) non-empty string.
    """
    if isinstance(value, bool):
        return value
    word = str(value).strip().upper() if isinstance(value, str | int) else None
    if word in true or word in false:
        return word in true
    raise InvalidParameterError(parameter, value, f"must be {true[0]} or {false[0]}")


def _absolute(path: Any) -> str:
    """Local paths made absolute (workers may run in another directory), ``~`` expanded; URLs as given."""
    text = os.fspath(path) if hasattr(path, "__fspath__") else str(path)
    return text if "://" in text else os.path.abspath(os.path.expanduser(text))


def home_expanded(data: Any) -> Any:
    """A path given for class data or mask polygons with a leading ``~`` expanded; anything else as given.

    (A class raster's path is made absolute where it is opened: workers open it
    themselves, maybe in another directory.)
    """
    if isinstance(data, str | os.PathLike) and os.fspath(data).startswith("~"):
        return os.path.expanduser(os.fspath(data))
    return data


def _positive_int(parameter: str, value: Any, unit: str = "pixels", *, low: int = 1,
                  high: int | None = None) -> int:
    """Accept ints and integer strings (the ESRI samples pass ``"256"``) within ``[low, high]``."""
    expected = (f"must be a whole number{f' of {unit}' if unit else ''} >= {low}"
                + ("" if high is None else f" and <= {high}"))
    if isinstance(value, bool):
        raise InvalidParameterError(parameter, value, expected)
    try:
        number = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(parameter, value, expected) from None
    if number != value and not isinstance(value, str) or number < low or high is not None and number > high:
        raise InvalidParameterError(parameter, value, expected)
    return number


def _rotation(value: Any) -> float:
    """``rotation_angle``: 0 (none) or an angle in (0, 360) giving at most 360 rotations of each chip."""
    angle = _number("rotation_angle", value, low=0, high=360, high_open=True)
    if 0 < angle < 1:
        raise InvalidParameterError("rotation_angle", value, f"gives {int(np.ceil(360 / angle - 1e-9))} "
                                    "rotations of every chip; use 0 (none) or an angle of at least 1 degree")
    return angle


def check_n_workers(n_workers: Any) -> int | None:
    """``n_workers``: None (one per core) or a whole number >= 1."""
    return None if n_workers is None else _positive_int("n_workers", n_workers, "worker processes")


def check_scheduler(scheduler: Any) -> Any:
    """``scheduler``: None, an address (``"tcp://host:8786"``) or a Dask cluster, as ``Client`` takes it."""
    if scheduler is None or hasattr(scheduler, "scheduler_address"):
        return scheduler
    expected = "must be a Dask scheduler's address, e.g. 'tcp://scheduler:8786'"
    if not isinstance(scheduler, str) or not scheduler.strip():
        raise InvalidParameterError("scheduler", scheduler, expected)
    from distributed.comm import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    try:
        scheme, location = parse_address(scheduler.strip())
        get_backend(scheme)  # tcp, tls, inproc, ws...: an unknown one (http://, a typo) is refused
        if scheme in ("tcp", "tls", "ws", "wss"):
            parse_host_port(location)
    except ValueError as error:
        dashboard = " (http:// is the dashboard's address)" if scheduler.strip().startswith("http") else ""
        raise InvalidParameterError("scheduler", scheduler, f"{expected}{dashboard} ({error})") from None
    return scheduler.strip()


@dataclass(frozen=True)
class ExportConfig:
    """Every normalised parameter of one export (inputs and outputs as given)."""

    in_raster: str
    out_folder: str
    image_chip_format: ImageChipFormat = ImageChipFormat.TIFF
    tile_size_x: int = 256
    tile_size_y: int = 256
    stride_x: int = 128
    stride_y: int = 128
    output_nofeature_tiles: NoFeatureTiles = NoFeatureTiles.ONLY_TILES_WITH_FEATURES
    metadata_format: str = DEFAULT_METADATA_FORMAT
    class_value_field: str | None = None
    buffer_radius: float = 0.0
    rotation_angle: float = 0.0
    reference_system: ReferenceSystem = ReferenceSystem.MAP_SPACE
    processing_mode: ProcessingMode = ProcessingMode.PROCESS_AS_MOSAICKED_IMAGE
    blacken_around_feature: bool = False
    crop_mode: CropMode = CropMode.FIXED_SIZE
    min_polygon_overlap_ratio: float = 0.0
    cell_size: float | None = None
    extent: tuple[float, float, float, float] | None = None
    split: tuple[tuple[str, float], ...] = ()
    split_block_size: int = 8
    seed: int = 0
    edge_policy: EdgePolicy = EdgePolicy.DROP
    overwrite: bool = False

    @property
    def label_format(self) -> LabelFormat:
        """The metadata format's writer."""
        return get_format(self.metadata_format)

    @property
    def angles(self) -> tuple[float, ...]:
        """Rotations of each chip: 0, then the angle again and again below 360 (ArcGIS)."""
        a = self.rotation_angle
        if a == 0:
            return (0.0,)
        return tuple(float(a * k) for k in range(int(np.ceil(360 / a - 1e-9))) if a * k < 360)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (enums as their ESRI strings, tuples as lists)."""
        out = {k: (v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v)
               for k, v in asdict(self).items()}
        out["split"] = dict(self.split)
        return out


def make_config(
    in_raster: Any,
    out_folder: Any,
    *,
    image_chip_format: Any = "TIFF",
    tile_size_x: Any = 256,
    tile_size_y: Any = 256,
    stride_x: Any = 128,
    stride_y: Any = 128,
    output_nofeature_tiles: Any = "ONLY_TILES_WITH_FEATURES",
    metadata_format: Any = DEFAULT_METADATA_FORMAT,
    class_value_field: Any = None,
    buffer_radius: Any = 0,
    rotation_angle: Any = 0,
    reference_system: Any = "MAP_SPACE",
    processing_mode: Any = "PROCESS_AS_MOSAICKED_IMAGE",
    blacken_around_feature: Any = "NO_BLACKEN",
    crop_mode: Any = "FIXED_SIZE",
    min_polygon_overlap_ratio: Any = 0,
    start_index: Any = None,
    cell_size: Any = None,
    extent: Any = None,
    split: Any = None,
    split_block_size: Any = 8,
    seed: Any = 0,
    edge_policy: Any = "DROP",
    overwrite: bool = False,
) -> ExportConfig:
    """Normalise and validate the parameters of :func:`chipflow.export_training_data`.

    Raises
    ------
    InvalidParameterError
        Naming the first parameter whose value cannot be used.
    """
    rasters = list(in_raster) if isinstance(in_raster, list | tuple) else [in_raster]
    for name, value in [*(("in_raster", r) for r in rasters), ("out_folder", out_folder)]:
        if not isinstance(value, str | bytes) and not hasattr(value, "__fspath__"):
            raise InvalidParameterError(name, value, "must be a path or URL (or, for in_raster, a list)")
        if not str(value).strip():
            raise InvalidParameterError(name, value, "must not be empty")
    if not rasters:
        raise InvalidParameterError("in_raster", in_raster, "must name at least one raster")
    if start_index not in (None, "#"):
        warnings.warn(
            f"start_index={start_index!r} is deprecated (as in ArcGIS) and ignored: chip names come "
            "from their grid position", ChipflowDeprecationWarning, stacklevel=3)
    if output_nofeature_tiles is True or output_nofeature_tiles is False or (
            isinstance(output_nofeature_tiles, str) and output_nofeature_tiles.strip().upper() in _YES + _NO):
        # arcpy's Boolean form (True, "true"): True exports every tile.
        output_nofeature_tiles = "ALL_TILES" if _flag("output_nofeature_tiles", output_nofeature_tiles) \
            else "ONLY_TILES_WITH_FEATURES"
    fmt = get_format(metadata_format)  # raises, listing the valid names
    if class_value_field is not None and (
        not isinstance(class_value_field, str) or not class_value_field.strip()
    ):
        raise InvalidParameterError(
            "class_value_field", class_value_field, "must be a field name, or None to detect it"
        )
    chip_format = _enum(ImageChipFormat, "image_chip_format", image_chip_format)
    if chip_format is ImageChipFormat.ZARR and fmt.feature_chips:
        raise InvalidParameterError(
            "image_chip_format", "ZARR", "stacks chips of one size by grid position, but "
            f"metadata_format={fmt.name!r} cuts one chip per feature (of any size with BOUNDING_BOX); "
            "use image_chip_format='TIFF'")
    if chip_format is ImageChipFormat.ZARR and fmt.image_files:
        raise InvalidParameterError(
            "image_chip_format", "ZARR", f"writes no image files, and metadata_format={fmt.name!r} "
            "names each chip's image file (COCO's file_name, YOLO's images/ folder); use "
            "image_chip_format='TIFF', 'PNG' or 'JPEG'")
    system = _enum(ReferenceSystem, "reference_system", reference_system)
    angle = _rotation(rotation_angle)
    if angle and fmt.feature_chips:
        raise InvalidParameterError(
            "rotation_angle", rotation_angle, "rotates the grid formats' chips; "
            f"metadata_format={fmt.name!r} cuts one unrotated chip per feature: leave rotation_angle at 0")
    for name, value in (("extent", extent), ("cell_size", cell_size)):
        if value is not None and system is not ReferenceSystem.MAP_SPACE:
            raise InvalidParameterError(
                name, value, f"is in map units and applies with reference_system='MAP_SPACE'; with "
                f"{system.value!r} chips are cut on the raster's own pixel grid: leave {name} out, or crop "
                "or resample the raster first (gdal_translate -srcwin / -tr)")
    return ExportConfig(
        in_raster=tuple(_absolute(r) for r in rasters),
        out_folder=_absolute(out_folder),
        image_chip_format=chip_format,
        tile_size_x=_positive_int("tile_size_x", tile_size_x),
        tile_size_y=_positive_int("tile_size_y", tile_size_y),
        stride_x=_positive_int("stride_x", stride_x),
        stride_y=_positive_int("stride_y", stride_y),
        output_nofeature_tiles=_enum(NoFeatureTiles, "output_nofeature_tiles", output_nofeature_tiles),
        metadata_format=fmt.name,
        class_value_field=class_value_field.strip() if class_value_field else None,
        buffer_radius=_number("buffer_radius", buffer_radius, low=0, high=float("inf")),
        rotation_angle=angle,
        reference_system=system,
        processing_mode=_enum(ProcessingMode, "processing_mode", processing_mode),
        blacken_around_feature=_flag("blacken_around_feature", blacken_around_feature,
                                     ("BLACKEN_AROUND_FEATURE", *_YES), ("NO_BLACKEN", *_NO)),
        crop_mode=_enum(CropMode, "crop_mode", crop_mode),
        min_polygon_overlap_ratio=_number("min_polygon_overlap_ratio", min_polygon_overlap_ratio,
                                          low=0, high=1),
        cell_size=None if cell_size is None else _number("cell_size", cell_size, low=1e-12,
                                                           high=float("inf")),
        extent=_extent(extent),
        split=_splits(split),
        split_block_size=_positive_int("split_block_size", split_block_size, "chips"),
        seed=_positive_int("seed", seed, "", low=0, high=2**63 - 1),
        edge_policy=_enum(EdgePolicy, "edge_policy", edge_policy),
        overwrite=_flag("overwrite", overwrite),
    )


def check_against_raster(cfg: ExportConfig, *, width: int, height: int, count: int, dtype: str) -> None:
    """The checks that need the raster's shape and type, before any output.

    Raises
    ------
    InvalidParameterError
        Tile larger than the raster (unless ``edge_policy="PAD"``), or PNG/JPEG
        chips of data they cannot hold.
    """
    if cfg.edge_policy is not EdgePolicy.PAD:
        # the raster as cut: cell_size resamples it, extent clips it
        cut = "".join(f" at {k}={v!r}" for k, v in (("cell_size", cfg.cell_size), ("extent", cfg.extent))
                      if v is not None)
        for name, tile, size in (("tile_size_x", cfg.tile_size_x, width),
                                 ("tile_size_y", cfg.tile_size_y, height)):
            if tile > size:
                raise InvalidParameterError(
                    name, tile,
                    f"is larger than the raster ({width} x {height} pixels{cut}); use a tile size "
                    f"<= {size}, or edge_policy='PAD' to pad the single chip",
                )
    fmt = cfg.image_chip_format
    if fmt in (ImageChipFormat.PNG, ImageChipFormat.JPEG):
        jpeg = fmt is ImageChipFormat.JPEG
        if count not in ((1, 3) if jpeg else (1, 2, 3)):
            raise InvalidParameterError(
                "image_chip_format", fmt.value,
                f"holds {'1 or 3' if jpeg else '1 to 3'} bands but the raster has {count}; "
                "use image_chip_format='TIFF'",
            )
        if dtype != "uint8":
            raise InvalidParameterError(
                "image_chip_format", fmt.value,
                f"holds 8-bit data only but the raster is {dtype}; use image_chip_format='TIFF'",
            )
        if count == 2:
            warnings.warn(
                "image_chip_format='PNG' stores 2 bands as grey + alpha (PNG has no other 2-band type): "
                "loaders that read RGB (PIL's convert('RGB'), OpenCV's imread) drop band 2; "
                "image_chip_format='TIFF' keeps both as they are", ChipflowWarning, stacklevel=4)
    if cfg.metadata_format in ("COCO", "YOLO", "YOLO_segmentation") and (
            count > 4 or dtype not in ("uint8", "uint16")):
        warnings.warn(
            f"metadata_format={cfg.metadata_format!r}: the raster has {count} bands of {dtype}, and the "
            "loaders these labels are for read images with OpenCV or Pillow (Ultralytics, torchvision's "
            "CocoDetection), which open 1 to 4 bands of 8 or 16 bits: they would find no image; select or "
            "scale bands to 8-bit RGB first (gdal_translate -b 1 -b 2 -b 3 -ot Byte -scale)",
            ChipflowWarning, stacklevel=4)
