"""Parameters: ESRI names and values in, one validated, frozen ``ExportConfig`` out.

Every check that does not need to open an input happens here, before anything
is read or written; the checks that need the raster (tile larger than the
raster, PNG with four bands, ...) happen in :func:`check_against_raster`, still
before the first byte of output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, TypeVar

from .errors import InvalidParameterError
from .formats import LabelFormat
from .formats import get as get_format
from .grid import EdgePolicy

__all__ = [
    "ExportConfig",
    "ImageChipFormat",
    "NoFeatureTiles",
    "check_against_raster",
    "make_config",
]


class ImageChipFormat(str, Enum):
    """Raster format of the image chips (ESRI ``image_chip_format``)."""

    TIFF = "TIFF"
    PNG = "PNG"
    JPEG = "JPEG"

    @property
    def extension(self) -> str:
        """File extension, as ArcGIS writes it."""
        return {"TIFF": "tif", "PNG": "png", "JPEG": "jpg"}[self.value]


class NoFeatureTiles(str, Enum):
    """ESRI ``output_nofeature_tiles``: export chips without features or not."""

    ALL_TILES = "ALL_TILES"
    ONLY_TILES_WITH_FEATURES = "ONLY_TILES_WITH_FEATURES"


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


def _positive_int(parameter: str, value: Any) -> int:
    """Accept ints and integer strings (the ESRI samples pass ``"256"``)."""
    if isinstance(value, bool):
        raise InvalidParameterError(parameter, value, "must be a whole number of pixels >= 1")
    try:
        number = int(str(value).strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(
            parameter, value, "must be a whole number of pixels >= 1"
        ) from None
    if number != value and not isinstance(value, str):
        raise InvalidParameterError(parameter, value, "must be a whole number of pixels >= 1")
    if number < 1:
        raise InvalidParameterError(parameter, value, "must be a whole number of pixels >= 1")
    return number


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
    metadata_format: str = "KITTI_rectangles"
    class_value_field: str | None = None
    edge_policy: EdgePolicy = EdgePolicy.DROP
    overwrite: bool = False

    @property
    def label_format(self) -> LabelFormat:
        """The metadata format's writer."""
        return get_format(self.metadata_format)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (enums as their ESRI strings)."""
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}


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
    metadata_format: Any = "KITTI_rectangles",
    class_value_field: Any = None,
    edge_policy: Any = "DROP",
    overwrite: bool = False,
) -> ExportConfig:
    """Normalise and validate the parameters of :func:`chipflow.export_training_data`.

    Raises
    ------
    InvalidParameterError
        Naming the first parameter whose value cannot be used.
    """
    for name, value in (("in_raster", in_raster), ("out_folder", out_folder)):
        if not isinstance(value, str | bytes) and not hasattr(value, "__fspath__"):
            raise InvalidParameterError(name, value, "must be a path or URL")
        if not str(value).strip():
            raise InvalidParameterError(name, value, "must not be empty")
    if output_nofeature_tiles is True or output_nofeature_tiles is False:
        # arcpy's Boolean form: True exports every tile.
        output_nofeature_tiles = "ALL_TILES" if output_nofeature_tiles else "ONLY_TILES_WITH_FEATURES"
    fmt = get_format(metadata_format)  # raises, listing the valid names
    if class_value_field is not None and (
        not isinstance(class_value_field, str) or not class_value_field.strip()
    ):
        raise InvalidParameterError(
            "class_value_field", class_value_field, "must be a field name, or None to detect it"
        )
    return ExportConfig(
        in_raster=str(in_raster),
        out_folder=str(out_folder),
        image_chip_format=_enum(ImageChipFormat, "image_chip_format", image_chip_format),
        tile_size_x=_positive_int("tile_size_x", tile_size_x),
        tile_size_y=_positive_int("tile_size_y", tile_size_y),
        stride_x=_positive_int("stride_x", stride_x),
        stride_y=_positive_int("stride_y", stride_y),
        output_nofeature_tiles=_enum(NoFeatureTiles, "output_nofeature_tiles", output_nofeature_tiles),
        metadata_format=fmt.name,
        class_value_field=class_value_field.strip() if class_value_field else None,
        edge_policy=_enum(EdgePolicy, "edge_policy", edge_policy),
        overwrite=bool(overwrite),
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
        for name, tile, size in (("tile_size_x", cfg.tile_size_x, width),
                                 ("tile_size_y", cfg.tile_size_y, height)):
            if tile > size:
                raise InvalidParameterError(
                    name, tile,
                    f"is larger than the raster ({width} x {height} pixels); use a tile size "
                    f"<= {size}, or edge_policy='PAD' to pad the single chip",
                )
    fmt = cfg.image_chip_format
    if fmt is not ImageChipFormat.TIFF:
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
