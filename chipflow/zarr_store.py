"""``image_chip_format="ZARR"``: every chip of an export in one Zarr v3 store, ``chips.zarr``.

Instead of one image file per chip, the chips go into one store in the output
folder (with ``split``, one in each split's folder)::

    chips.zarr/
      zarr.json     the group; attributes crs_wkt, band_names, tile_size, metadata_format, ...
      images/       [n, band, y, x], the raster's dtype, one chunk per chip: (1, band, tile_y, tile_x)
      labels/       [n, y, x] class values, uint8 (uint16 past 255), one chunk per chip;
                    only for formats with ``rasterize = True`` (Classified_Tiles, Panoptic_Segmentation)

Index ``n`` is the chip id: ``chip_id`` in ``chips.parquet`` and the 9-digit stem
the other formats name files by. Ids come from the chip's grid position (and
angle), so the exported chips leave gaps: a chip that was not exported has no
chunk and reads as the fill value (the raster's nodata, else 0; labels 0).
``n`` spans every id the plan can give (:attr:`chipflow.plan.ExportPlan.n_chip_ids`).

How it is written. The client creates the group and its arrays before any block
task runs (:func:`create`; a resumed run finds and checks them). Each block task
writes its chips straight into the store (:func:`write_chip`), through zarr's
``LocalStore`` for a local folder or ``FsspecStore`` for any fsspec URL
(``s3://``...), opened from the output ``Store``'s URL and storage options once per
worker process. A chunk holds exactly one chip and is written whole, so tasks never
read, lock or share a chunk, and a rerun of a task writes the same bytes again.
Chunks are Zstandard (level 1) compressed; ``write_empty_chunks`` is on, so an
exported chip always has its chunk, even when all its pixels equal the fill value
(which is how ``chipflow validate`` tells exported chips from gaps). Chunk keys use
the default v3 encoding with a ``.`` separator (``images/c.42.0.0.0``): one file
per chip, no folder per chip.

Where a chip is. ``map.txt`` and ``chips.parquet``'s ``image_path`` name chip ``n``
``chips.zarr#images[n]`` (``<split>/chips.zarr#images[n]`` in the index of a split
export), and its class raster ``chips.zarr#labels[n]``: references to an array and
an index, not files. Label files of the other formats (KITTI and PASCAL VOC boxes,
YOLO rows, instance masks) are still written as files next to the store, named by
the chip's stem as usual; formats that name the image inside a label file (PASCAL
VOC's ``<filename>``, COCO's ``file_name``) say ``<stem>.zarr``. The chips'
georeferencing: the CRS is the group attribute ``crs_wkt`` (empty in pixel space),
and each chip's transform is the ``transform`` column of ``chips.parquet`` (with
its footprint ``geometry``).

Not supported: the one-chip-per-feature formats (Labeled_Tiles, Imagenet), whose
chips may differ in size; refused by :func:`chipflow.config.make_config`.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import OutputError
from .store import Store

__all__ = ["EXTENSION", "NAME", "ZarrChips", "create", "enabled", "image_ref", "label_ref", "open_chips",
           "write_chip"]

#: The store's folder name in the output folder (and in each split's folder).
NAME = "chips.zarr"
#: ``ImageChipFormat.ZARR.extension``: how a block task recognises a ZARR export.
EXTENSION = "zarr"
_IMAGES, _LABELS = "images", "labels"
_CONFIG = {"write_empty_chunks": True}
_REF = re.compile(r"^(?:(?P<split>.+)/)?" + re.escape(NAME) + r"#(?P<array>\w+)\[(?P<id>\d+)\]$")


def enabled(cfg: Any) -> bool:
    """Whether the export ``cfg`` writes its chips into ``chips.zarr``."""
    return cfg.image_chip_format.extension == EXTENSION


def image_ref(chip_id: int) -> str:
    """How ``map.txt`` and ``chips.parquet`` name a chip: ``chips.zarr#images[42]``."""
    return f"{NAME}#{_IMAGES}[{chip_id}]"


def label_ref(chip_id: int) -> str:
    """How ``map.txt`` names a chip's class raster: ``chips.zarr#labels[42]``."""
    return f"{NAME}#{_LABELS}[{chip_id}]"


def parse_ref(ref: str) -> tuple[str, int] | None:
    """``(array, chip id)`` of a reference such as ``train/chips.zarr#images[42]``; None for a file path."""
    match = _REF.match(ref.replace("\\", "/"))
    return (match["array"], int(match["id"])) if match else None


# ------------------------------------------------------------------------------------------ stores


_STORES: dict[tuple[str, str, bool], Any] = {}
_LOCK = threading.Lock()


def _zarr_store(store: Store, prefix: str = "", *, read_only: bool = False) -> Any:
    """Zarr's store for ``<store>/<prefix>chips.zarr``: opened once per process and cached.

    Parameters
    ----------
    store : Store
        The output folder (its URL and storage options).
    prefix : str
        ``""``, or ``"<split>/"`` for a split's store.
    read_only : bool
        Open without write access (validation, readers).

    Returns
    -------
    zarr.storage.LocalStore or zarr.storage.FsspecStore
    """
    from zarr.storage import FsspecStore, LocalStore

    url = f"{store.url.rstrip('/')}/{prefix}{NAME}"
    key = (url, repr(store.storage_options), read_only)  # the options stay in memory, never shown
    with _LOCK:
        found = _STORES.get(key)
        if found is None:
            if store.is_local:
                found = LocalStore(store.path(f"{prefix}{NAME}"), read_only=read_only)
            else:
                found = FsspecStore.from_url(url, storage_options=dict(store.storage_options),
                                             read_only=read_only)
            _STORES[key] = found
    return found


def _put_chunk(store: Store, prefix: str, name: str, chip_id: int, data: np.ndarray) -> None:
    """Write chip ``chip_id`` of array ``name`` as its chunk file, exactly as zarr encodes it.

    The arrays' codecs are ``bytes`` (little-endian, C order) then Zstandard level 1, and
    their chunk keys ``c.<n>.0.0[.0]``; encoding here with numcodecs gives zarr's own bytes
    (a test checks it), written with one ``Store.put`` (in place: the block's commit marker
    vouches for it). Block tasks thus never run zarr's asynchronous machinery, whose event
    loop could wait forever inside a Dask worker thread (seen under load).
    """
    import numcodecs

    little = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
    key = ".".join(["c", str(chip_id), *("0" * data.ndim)])
    store.put(f"{prefix}{NAME}/{name}/{key}", bytes(numcodecs.Zstd(level=1).encode(little)), atomic=False)


# ------------------------------------------------------------------------------------------ create


def _label_dtype(plan: Any) -> np.dtype:
    """The class rasters' dtype, as the block tasks rasterize them (uint8, or uint16 past 255)."""
    top = max((c.value for c in plan.labels.classes), default=0)
    return np.dtype(np.uint8 if top <= 255 else np.uint16)


def _fill(dtype: np.dtype, nodata: float | None) -> Any:
    """The images' fill value: the raster's nodata where the dtype holds it exactly, else 0."""
    if nodata is None:
        return 0
    if dtype.kind == "f":
        return float(nodata)
    info = np.iinfo(dtype)
    whole = float(nodata).is_integer() and info.min <= nodata <= info.max
    return int(nodata) if whole else 0


def _attributes(plan: Any) -> dict[str, Any]:
    """The group's attributes: what a reader needs to use the chips without the other files."""
    src, cfg = plan.source, plan.cfg
    nodata = src.nodata
    return {
        "crs_wkt": "" if src.pixel_space else src.crs_wkt,
        "band_names": list(src.band_names),
        "tile_size": [cfg.tile_size_x, cfg.tile_size_y],
        "metadata_format": cfg.label_format.name,
        "nodata": None if nodata is None else float(nodata) if np.isfinite(nodata) else str(nodata),
        "image_space": "PIXEL_SPACE" if src.pixel_space else "MAP_SPACE",
        "classes": [{"value": int(c.value), "name": str(c.name)} for c in plan.labels.classes],
        "chip_index": "chips.parquet",
    }


def _specs(plan: Any) -> dict[str, dict[str, Any]]:
    """Array name → ``zarr.create_array`` arguments."""
    from zarr.codecs import ZstdCodec

    src, cfg = plan.source, plan.cfg
    n, tx, ty = plan.n_chip_ids, cfg.tile_size_x, cfg.tile_size_y
    dtype = np.dtype(src.dtype)
    common = {"compressors": ZstdCodec(level=1), "config": _CONFIG,
              "chunk_key_encoding": {"name": "default", "separator": "."}}
    specs = {_IMAGES: dict(shape=(n, src.count, ty, tx), chunks=(1, src.count, ty, tx), dtype=dtype,
                           fill_value=_fill(dtype, src.nodata), dimension_names=("chip", "band", "y", "x"),
                           **common)}
    if cfg.label_format.rasterize:
        specs[_LABELS] = dict(shape=(n, ty, tx), chunks=(1, ty, tx), dtype=_label_dtype(plan), fill_value=0,
                              dimension_names=("chip", "y", "x"), **common)
    return specs


def create(store: Store, plan: Any) -> None:
    """Create ``chips.zarr`` (in each split's folder with ``split``) before the block tasks run.

    A no-op unless the plan's ``image_chip_format`` is ``ZARR``. A resumed run finds
    the group and arrays of the interrupted one and keeps their chunks; a node an
    interrupted creation did not reach is created.

    Parameters
    ----------
    store : Store
        The output folder, opened by ``Store.open_run``.
    plan : ExportPlan
        The export's plan (sizes, dtype, classes, georeferencing).

    Raises
    ------
    OutputError
        The folder holds a ``chips.zarr`` whose arrays do not match this export.
    """
    if not enabled(plan.cfg):
        return
    import zarr

    attributes, specs = _attributes(plan), _specs(plan)
    prefixes = [f"{name}/" for name, _ in plan.cfg.split] or [""]
    for prefix in prefixes:
        zstore = _zarr_store(store, prefix)
        # the index is in the output folder: beside the store, or one level up from a split's
        own = {**attributes, "chip_index": "../chips.parquet" if prefix else "chips.parquet"}
        try:
            group = zarr.open_group(zstore, mode="r+")
        except FileNotFoundError:
            group = zarr.create_group(zstore, attributes=own)
        if dict(group.attrs) != own:
            group.attrs.put(own)
        present = set(group.array_keys())
        for name, spec in specs.items():
            if name not in present:
                zarr.create_array(zstore, name=name, **spec)
                continue
            arr = group[name]
            expected = (spec["shape"], spec["chunks"], spec["dtype"])
            if (arr.shape, arr.chunks, arr.dtype) != expected:
                raise OutputError(
                    f"{store.url.rstrip('/')}/{prefix}{NAME}/{name} is {arr.shape} {arr.dtype} in chunks "
                    f"{arr.chunks}, this export needs {expected[0]} {expected[2]} in chunks {expected[1]}; "
                    "pass overwrite=True (--overwrite) to start again")


# ------------------------------------------------------------------------------------------- write


def write_chip(store: Store, prefix: str, label: Any, chip: np.ndarray, fmt: Any,
               label_extension: str) -> tuple[str, list[tuple[str, bytes]]]:
    """Write one chip into ``chips.zarr`` (and its class raster), its other label files as files.

    Parameters
    ----------
    store : Store
        The output folder.
    prefix : str
        ``""``, or ``"<split>/"`` for a chip of a split.
    label : ChipLabel
        The chip's label; its ``stem`` is the chip id, its ``mask`` the class raster.
    chip : numpy.ndarray
        ``(band, tile_y, tile_x)`` pixels.
    fmt : LabelFormat
        The metadata format.
    label_extension : str
        The label files' extension.

    Returns
    -------
    tuple
        The chip's reference (``chips.zarr#images[n]``) and its label files as
        ``(relative path, bytes)``, as ``_Output.write`` returns them. For formats with
        ``rasterize = True`` the first entry is the reference ``chips.zarr#labels[n]``
        of the class raster, with no bytes: nothing is written under that name.
    """
    chip_id = int(label.stem)
    _put_chunk(store, prefix, _IMAGES, chip_id, chip)
    if not fmt.rasterize:
        files = fmt.files(label, label_extension)
    else:
        top = max((c.value for c in label.classes), default=0)  # as _label_dtype decides
        mask = np.asarray(label.mask).astype(np.uint8 if top <= 255 else np.uint16, copy=False)
        _put_chunk(store, prefix, _LABELS, chip_id, mask)
        # The class raster (labels/<stem>.<ext>, as Classified_Tiles and Panoptic_Segmentation name
        # it) is in the store: it is not encoded (b"" stands in) and not written. Other rasters the
        # format encodes (instance masks) are encoded as usual.
        encode = label.encode_raster
        lean = dataclasses.replace(label, encode_raster=lambda m: b"" if m is label.mask else encode(m))
        semantic = f"labels/{label.stem}.{label_extension}"
        files = [(label_ref(chip_id), b"")] + [f for f in fmt.files(lean, label_extension)
                                               if f[0] != semantic]
    for rel, data in files:
        if parse_ref(rel) is None:
            store.put(f"{prefix}{rel}", data, atomic=False)
    return image_ref(chip_id), files


# -------------------------------------------------------------------------------------------- read


@dataclass(frozen=True)
class ZarrChips:
    """An export's ``chips.zarr``, opened for reading.

    Attributes
    ----------
    images : zarr.Array
        ``[n, band, y, x]`` chips.
    labels : zarr.Array or None
        ``[n, y, x]`` class rasters (formats with ``rasterize = True``).
    attrs : dict
        The group's attributes (``crs_wkt``, ``band_names``, ``tile_size``, ...).
    chip_ids : numpy.ndarray
        Sorted ids of the chips written (a chunk in ``images``).
    label_ids : numpy.ndarray
        Sorted ids with a chunk in ``labels`` (empty without ``labels``).
    """

    images: Any
    labels: Any
    attrs: dict[str, Any]
    chip_ids: np.ndarray
    label_ids: np.ndarray


def _chunk_ids(store: Store, relpath: str) -> np.ndarray:
    """Chip ids with a chunk in the array at ``relpath`` (``c.<id>.0.0.0`` or ``c/<id>/0/0/0`` keys)."""
    base = relpath.rstrip("/") + "/"
    ids = []
    for path in store.find(relpath):
        parts = re.split(r"[./]", path[len(base):]) if path.startswith(base) else []
        if len(parts) > 1 and parts[0] == "c" and parts[1].isdigit():
            ids.append(int(parts[1]))
    return np.unique(np.asarray(ids, dtype=np.int64))


def open_chips(store: Store | str, prefix: str = "") -> ZarrChips | None:
    """Open ``<folder>/<prefix>chips.zarr`` for reading; None when the folder has none.

    Parameters
    ----------
    store : Store or str
        The output folder (a ``Store``, or a local path or URL).
    prefix : str
        ``""``, or ``"<split>/"``.

    Examples
    --------
    >>> chips = open_chips("out/kampala")                    # doctest: +SKIP
    >>> pixels = chips.images[chips.chip_ids[0]]            # (band, y, x)  # doctest: +SKIP
    """
    import zarr

    store = store if isinstance(store, Store) else Store(str(store))
    if store.read(f"{prefix}{NAME}/zarr.json") is None:
        return None
    group = zarr.open_group(_zarr_store(store, prefix, read_only=True), mode="r")
    names = set(group.array_keys())
    images = group[_IMAGES] if _IMAGES in names else None
    labels = group[_LABELS] if _LABELS in names else None
    if images is None:
        raise OutputError(f"{store.url.rstrip('/')}/{prefix}{NAME} has no {_IMAGES} array")
    label_ids = (np.zeros(0, np.int64) if labels is None
                 else _chunk_ids(store, f"{prefix}{NAME}/{_LABELS}"))
    return ZarrChips(images, labels, dict(group.attrs), _chunk_ids(store, f"{prefix}{NAME}/{_IMAGES}"),
                     label_ids)
