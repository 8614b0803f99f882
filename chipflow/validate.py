"""``chipflow validate``: check that a folder is a complete, consistent training dataset.

Reads the folder as its consumer would: the three files ``arcgis.learn`` needs,
every image decoded, every label parsed by its format, counts compared with the
statistics, ``map.txt`` compared with the files, and, for chipflow runs, every
planned block committed. An export with splits is its run plus a dataset per split
(``out_folder/<split>``), each checked so. Works on any fsspec URL.

A folder with ``chips.zarr`` (``image_chip_format="ZARR"``) is checked through the
store instead of image files: every chip with a chunk in ``images`` is decoded
(and its size compared with the tile size), ``map.txt`` must list exactly those
chips (``chips.zarr#images[n]``), and for formats with ``rasterize = True`` each
chip's class raster is ``labels[n]`` of the store, counted like a label file.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _cloud, zarr_store
from .errors import InputNotFoundError, OutputError
from .formats import get
from .stats import BlockResult
from .store import Store, json_mapping

__all__ = ["ValidationReport", "validate_dataset"]

_IMAGE_EXTENSIONS = (".tif", ".png", ".jpg", ".mrf")
_MAX_LISTED = 10


@dataclass
class ValidationReport:
    """The outcome: ``ok`` only for a complete dataset with no problem."""

    out_folder: str
    images: int = 0
    labels: int = 0
    incomplete: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Complete and consistent."""
        return not self.incomplete and not self.problems

    def summary(self) -> str:
        """A short human report."""
        head = "complete" if self.ok else ("INCOMPLETE" if self.incomplete else "INVALID")
        lines = [f"{self.out_folder}: {head} ({self.images} images, {self.labels} labels)"]
        for kind, items in (("incomplete", self.incomplete), ("problem", self.problems)):
            lines += [f"  {kind}: {p}" for p in items[:_MAX_LISTED]]
            if len(items) > _MAX_LISTED:
                lines.append(f"  ... and {len(items) - _MAX_LISTED} more {kind} lines")
        return "\n".join(lines)


def _json(store: Store, name: str, report: ValidationReport) -> Any:
    raw = store.read(name)
    if raw is None:
        report.incomplete.append(f"{name} is missing")
        return None
    doc, why = json_mapping(raw)
    if why:
        report.problems.append(f"{name} {why}")
        return None
    return doc


def _check_run(store: Store, params: dict[str, Any] | None, report: ValidationReport) -> None:
    if params is None:
        return  # not written by chipflow (or by an older version): files only
    planned = set(params.get("blocks", []))
    committed = store.committed_blocks()
    missing = planned - set(committed)
    if missing:
        report.incomplete.append(f"{len(missing)} of {len(planned)} blocks not committed "
                                 "(rerun the same export to finish it)")
    for block_id, payload in committed.items():
        try:
            BlockResult.from_json(payload)
        except (ValueError, KeyError) as exc:
            report.problems.append(f"block marker {block_id} is unreadable: {exc}")


def _check_emd(emd: dict[str, Any], stats: dict[str, Any], report: ValidationReport, *,
               needs_classes: bool) -> list[int]:
    classes = emd.get("Classes")
    if not isinstance(classes, list) or (needs_classes and not classes):
        report.problems.append("esri_model_definition.emd has no Classes")
        return []
    values = []
    for c in classes:
        ok = (isinstance(c.get("Value"), int) and isinstance(c.get("Name"), str)
              and isinstance(c.get("Color"), list) and len(c["Color"]) == 3)
        if not ok:
            report.problems.append(f"emd class {c} needs an int Value, a str Name and 3-int Color")
        values.append(c.get("Value"))
    if values != sorted(values):
        report.problems.append(f"emd Classes are not sorted by Value: {values}")
    if emd.get("MetaDataMode") != stats.get("MetaDataMode"):
        report.problems.append(f"MetaDataMode differs: emd {emd.get('MetaDataMode')!r}, "
                               f"stats {stats.get('MetaDataMode')!r}")
    return values


def validate_dataset(out_folder: str, *, storage_options: dict[str, Any] | None = None) -> ValidationReport:
    """Check ``out_folder`` as a training dataset.

    Raises
    ------
    InputNotFoundError
        When ``out_folder`` does not exist.
    """
    store = Store(str(out_folder), _cloud.freeze(storage_options, str(out_folder)))
    if not store.require_folder():
        raise InputNotFoundError("out_folder", str(out_folder), "no such folder, or it is empty")
    report = ValidationReport(str(out_folder))
    try:
        params = store.run_params()
    except OutputError as exc:  # checked as a folder chipflow did not write
        report.problems.append(str(exc))
        params = None
    _check_run(store, params, report)
    splits = store.split_names(params)
    if splits:  # a dataset per split, in out_folder/<split>
        for name in splits:
            try:
                part = validate_dataset(store.child(name).url, storage_options=storage_options)
            except InputNotFoundError:
                report.incomplete.append(f"{name}: the split's folder is missing")
                continue
            report.images += part.images
            report.labels += part.labels
            report.incomplete += [f"{name}: {line}" for line in part.incomplete]
            report.problems += [f"{name}: {line}" for line in part.problems]
        return report
    emd = _json(store, "esri_model_definition.emd", report)
    stats = _json(store, "esri_accumulated_stats.json", report)
    map_txt = store.read("map.txt")
    if map_txt is None:
        report.incomplete.append("map.txt is missing")
    if store.read("stats.txt") is None:
        report.incomplete.append("stats.txt is missing")
    try:
        chips = zarr_store.open_chips(store)
    except Exception as exc:  # an unreadable store is the finding
        report.problems.append(f"{zarr_store.NAME} does not open: {exc}")
        return report
    if chips is None:
        images = [p for p in store.find("images") if p.lower().endswith(_IMAGE_EXTENSIONS)
                  and not p.rsplit("/", 1)[-1].startswith(".")]
    else:
        images = [zarr_store.image_ref(i) for i in chips.chip_ids.tolist()]
    report.images = len(images)
    if emd is None or stats is None or map_txt is None:
        report.labels = _labelled_chips(store)
        return report
    try:
        fmt = get(stats.get("MetaDataMode"))
    except ValueError:
        report.problems.append(f"MetaDataMode {stats.get('MetaDataMode')!r} is not a known format")
        report.labels = _labelled_chips(store)
        return report
    class_values = _check_emd(emd, stats, report, needs_classes=fmt.needs_labels)
    pairs: dict[str, str | None] = {}
    for line in map_txt.decode().splitlines():
        cols = _map_columns(line)
        if len(cols) not in (0, 1, 2):
            report.problems.append(f"map.txt line {line!r} needs 1 or 2 columns")
        elif cols:
            pairs[cols[0]] = cols[1] if len(cols) == 2 else None
    listed = set(images)
    where = "images/" if chips is None else f"{zarr_store.NAME}/images"
    if set(pairs) != listed:
        report.problems.append(f"map.txt lists {len(pairs)} images, {where} holds {len(listed)} "
                               f"({len(set(pairs) ^ listed)} differ)")
    if stats.get("NumTiles") != len(images):
        report.problems.append(f"NumTiles is {stats.get('NumTiles')} but {where} holds {len(images)}")
    size = (stats.get("TileSizeX"), stats.get("TileSizeY"))
    fixed_size = emd.get("CropTileMode", "Fixed_Size") == "Fixed_Size"
    label_ext = next((p.rsplit(".", 1)[-1] for p in pairs.values()
                      if p and zarr_store.parse_ref(p) is None), None)
    counts: Counter[int] = Counter()
    stems: set[str] = set()  # of the chips, to find label files without one
    if chips is not None:
        _check_zarr(chips, fmt, size, class_values, counts, report)
    if fmt.dataset_file:
        _check_dataset_file(store, fmt, listed, emd["Classes"], counts, report)
    for image in sorted(listed):
        if chips is None:
            shape = _check_image(store, image, size if fixed_size else None, report)
            stem = image.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        elif fmt.rasterize:
            continue  # the chip and its class raster are in the store: checked by _check_zarr
        else:  # the chip was decoded by _check_zarr; its label files are files
            shape = (chips.images.shape[3], chips.images.shape[2])
            stem = f"{zarr_store.parse_ref(image)[1]:09d}"  # type: ignore[index]
        stems.add(stem)
        if not fmt.per_chip_labels or shape is None:
            continue
        paths = fmt.label_paths(stem, label_ext, emd["Classes"]) if label_ext else []
        found = [(p, raw) for p in paths if (raw := store.read(p)) is not None]
        named = pairs.get(image)  # map.txt's label column: the file arcgis.learn opens
        if named and zarr_store.parse_ref(named) is None and named not in {p for p, _ in found}:
            report.problems.append(f"map.txt names {named} for {image}, which does not exist")
        if not found and not fmt.instances:
            report.problems.append(f"{image} has no label file")
            continue
        report.labels += bool(found)
        for label, raw in found:
            try:
                per_class = fmt.count(raw, width=shape[0], height=shape[1], path=label,
                                      classes=emd["Classes"])
            except (ValueError, TypeError, OSError, SyntaxError) as exc:  # SyntaxError: XML's ParseError
                report.problems.append(f"{label} does not parse: {exc}")
                continue
            unknown = set(per_class) - set(class_values)
            if unknown:
                report.problems.append(f"{label} uses class values {sorted(unknown)} not in the emd")
            counts.update(per_class)
    if fmt.per_chip_labels and (chips is None or not fmt.rasterize):
        names = [p for folder in ("labels", "labels2") for p in store.find(folder)
                 if not p.rsplit("/", 1)[-1].startswith(".")]
        strays = [p for p in names if p.rsplit("/", 1)[-1].split(".", 1)[0] not in stems]
        if strays:
            report.problems.append(f"{len(strays)} label files have no chip, e.g. {strays[0]}")
    if fmt.per_chip_labels or fmt.dataset_file:
        _check_counts(fmt, stats, class_values, counts, report)
    return report


def _labelled_chips(store: Store) -> int:
    """How many chips have a file in ``labels/`` (by stem), without the metadata that says its format."""
    return len({p.rsplit("/", 1)[-1].split(".", 1)[0] for p in store.find("labels")
                if not p.rsplit("/", 1)[-1].startswith(".")})


def _map_columns(line: str) -> list[str]:
    r"""A map.txt line's paths (``/`` for ``\``): columns are split by two spaces, a path may hold one."""
    text = line.rstrip("\r\n")
    text = text[:-1] if text.endswith(" ") else text  # each line ends with one space
    return [c.replace("\\", "/") for c in text.split("  ")] if text.strip() else []


def _check_dataset_file(store: Store, fmt: Any, images: set[str], classes: Any, counts: Counter[int],
                        report: ValidationReport) -> None:
    """The format's dataset-wide file (COCO's annotations.json, YOLO's data.yaml): there, and agreeing."""
    raw = store.read(fmt.dataset_file)
    if raw is None:
        report.incomplete.append(f"{fmt.dataset_file} is missing")
        return
    try:
        per_class, problems = fmt.check_dataset(raw, images, classes)
    except (ValueError, KeyError, TypeError) as exc:
        report.problems.append(f"{fmt.dataset_file} does not parse: {exc!r}")
        return
    report.problems += problems
    counts.update(per_class)


def _check_counts(fmt: Any, stats: dict[str, Any], class_values: list[int], counts: Counter[int],
                  report: ValidationReport) -> None:
    """The label files' per-class counts against esri_accumulated_stats.json."""
    block = stats.get("ClassPixelStats" if fmt.counted == "NumPixelsPerClass" else "FeatureStats", {})
    expected = block.get(fmt.counted)
    actual = [counts.get(v, 0) for v in class_values]
    # instance masks hold only features that cover a pixel: at most the feature counts
    agrees = (expected is not None and len(expected) == len(actual)
              and all(a <= e for a, e in zip(actual, expected, strict=True))) if (
        fmt.instances and fmt.counted == "NumFeaturesPerClass") else expected == actual
    if not agrees:
        report.problems.append(f"{fmt.counted} in esri_accumulated_stats.json is {expected}, "
                               f"the label files hold {actual}")


def _check_zarr(chips: zarr_store.ZarrChips, fmt: Any, size: tuple[Any, Any], class_values: list[int],
                counts: Counter[int], report: ValidationReport) -> None:
    """Decode every chip of ``chips.zarr`` and, for raster label formats, count its class raster."""
    _, _, height, width = chips.images.shape
    if (width, height) != tuple(size):
        report.problems.append(f"{zarr_store.NAME}/images holds {width} x {height} chips, the tile size is "
                               f"{size[0]} x {size[1]}")
    rasters = fmt.rasterize and fmt.per_chip_labels
    if rasters and chips.labels is None:
        report.problems.append(f"{zarr_store.NAME} has no labels array for {fmt.name}")
        rasters = False
    if rasters:
        report.labels = len(set(chips.label_ids.tolist()) & set(chips.chip_ids.tolist()))
        missing = len(chips.chip_ids) - report.labels
        if missing:
            report.problems.append(f"{missing} chips of {zarr_store.NAME} have no labels chunk")
    for chip_id in chips.chip_ids.tolist():
        try:
            chips.images[chip_id]
            mask = chips.labels[chip_id] if rasters else None
        except Exception as exc:  # any decode failure is the finding
            report.problems.append(f"{zarr_store.image_ref(chip_id)} does not decode: {exc}")
            continue
        if mask is not None:
            values, n = np.unique(mask, return_counts=True)
            per_class = {int(v): int(c) for v, c in zip(values, n, strict=True) if v != 0}
            unknown = set(per_class) - set(class_values)
            if unknown:
                report.problems.append(f"{zarr_store.label_ref(chip_id)} uses class values "
                                       f"{sorted(unknown)} not in the emd")
            counts.update(per_class)


def _check_image(store: Store, image: str, size: tuple[Any, Any] | None,
                 report: ValidationReport) -> tuple[int, int] | None:
    """Decode ``image`` (GDAL); its ``(width, height)``, or None when it does not decode."""
    import warnings

    import rasterio
    from rasterio.io import MemoryFile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            if store.is_local:
                with rasterio.open(store.path(image)) as ds:
                    shape = (ds.width, ds.height)
                    ds.read()
            elif image.lower().endswith(".mrf"):  # header, index and data: side by side, as GDAL needs them
                import os
                import tempfile

                with tempfile.TemporaryDirectory(prefix="chipflow-validate-") as tmp:
                    for suffix in (".mrf", ".idx", ".pzp"):
                        raw = store.read(image[:-4] + suffix)
                        if raw is not None:
                            with open(os.path.join(tmp, "chip" + suffix), "wb") as f:
                                f.write(raw)
                    with rasterio.open(os.path.join(tmp, "chip.mrf")) as ds:
                        shape = (ds.width, ds.height)
                        ds.read()
            else:
                with MemoryFile(store.read(image)) as mem, mem.open() as ds:
                    shape = (ds.width, ds.height)
                    ds.read()
    except Exception as exc:  # any decode failure is the finding
        report.problems.append(f"{image} does not decode: {exc}")
        return None
    if size is not None and shape != tuple(size):
        report.problems.append(f"{image} is {shape[0]} x {shape[1]}, the tile size is {size[0]} x {size[1]}")
    return shape
