"""Per-block statistics, their order-free merge, and the ESRI metadata files.

A block task returns a :class:`BlockResult`: counts, per-class feature/pixel
statistics and per-band moments of the chips it exported. Results merge
pairwise (counts add, min/max combine, band moments by Chan's formula), in a
tree whose shape depends only on the block list, so the metadata is identical
whatever the number of workers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["BlockResult", "Summary", "merge", "merge_all"]


def _summary(values: np.ndarray | list[float]) -> np.ndarray:
    """``[min, max, sum, count]`` of some values (inf/-inf/0/0 for none)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return np.array([np.inf, -np.inf, 0.0, 0.0])
    return np.array([v.min(), v.max(), v.sum(), float(v.size)])


def _merge_summary(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Merge ``[..., 4]`` summaries element-wise."""
    return np.stack(
        [np.minimum(a[..., 0], b[..., 0]), np.maximum(a[..., 1], b[..., 1]),
         a[..., 2] + b[..., 2], a[..., 3] + b[..., 3]],
        axis=-1,
    )


def _empty_summaries(n: int) -> np.ndarray:
    out = np.zeros((n, 4))
    out[:, 0], out[:, 1] = np.inf, -np.inf
    return out


@dataclass
class BlockResult:
    """What one block (or a merge of blocks) reports. Small: never pixels.

    Per-class arrays are indexed like ``LabelSet.classes``; per-band ones by band.
    Summaries are ``[min, max, sum, count]``.
    """

    n_classes: int
    n_bands: int
    chip_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    features_per_image: np.ndarray = field(default_factory=lambda: _summary([]))
    images_per_class: np.ndarray = field(init=False)
    features_per_class: np.ndarray = field(init=False)
    area_per_class: np.ndarray = field(init=False)
    pixel_images_per_class: np.ndarray = field(init=False)
    pixels_per_class: np.ndarray = field(init=False)
    classes_per_image: np.ndarray = field(default_factory=lambda: _summary([]))
    band_n: np.ndarray = field(init=False)
    band_mean: np.ndarray = field(init=False)
    band_m2: np.ndarray = field(init=False)
    band_min: np.ndarray = field(init=False)
    band_max: np.ndarray = field(init=False)
    image_paths: list[str] = field(default_factory=list)
    label_paths: list[str] = field(default_factory=list)
    chip_class_counts: np.ndarray = field(init=False)
    chip_pixel_counts: np.ndarray = field(init=False)
    children: dict[str, BlockResult] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c, b = self.n_classes, self.n_bands
        self.images_per_class = np.zeros(c, np.int64)
        self.features_per_class = np.zeros(c, np.int64)
        self.area_per_class = _empty_summaries(c)
        self.pixel_images_per_class = np.zeros(c, np.int64)
        self.pixels_per_class = _empty_summaries(c)
        self.band_n = np.zeros(b, np.int64)
        self.band_mean = np.zeros(b)
        self.band_m2 = np.zeros(b)
        self.band_min = np.full(b, np.inf)
        self.band_max = np.full(b, -np.inf)
        self.chip_class_counts = np.zeros((0, c), np.int32)
        self.chip_pixel_counts = np.zeros((0, c), np.int64)

    def set_rows(self, rows: list[tuple[int, str, str, np.ndarray, np.ndarray]]) -> None:
        """Record the exported chips: id, image path, first label path, features and pixels per class."""
        self.chip_ids = np.asarray([r[0] for r in rows], np.int64)
        self.image_paths = [r[1] for r in rows]
        self.label_paths = [r[2] for r in rows]
        self.chip_class_counts = np.asarray([r[3] for r in rows], np.int32).reshape(len(rows), self.n_classes)
        self.chip_pixel_counts = np.asarray([r[4] for r in rows], np.int64).reshape(len(rows), self.n_classes)

    @property
    def num_chips(self) -> int:
        """Chips exported."""
        return int(self.chip_ids.size)

    _ARRAYS = ("chip_ids", "features_per_image", "images_per_class", "features_per_class",
               "area_per_class", "pixel_images_per_class", "pixels_per_class", "classes_per_image",
               "band_n", "band_mean", "band_m2", "band_min", "band_max", "chip_class_counts",
               "chip_pixel_counts")

    def to_json(self) -> bytes:
        """Serialise exactly (floats round-trip; ±inf as ``Infinity``): a block's commit marker."""
        data: dict[str, Any] = {"n_classes": self.n_classes, "n_bands": self.n_bands,
                                "image_paths": self.image_paths, "label_paths": self.label_paths,
                                "children": {k: json.loads(v.to_json()) for k, v in self.children.items()}}
        for name in self._ARRAYS:
            value = getattr(self, name)
            data[name] = {"dtype": value.dtype.str, "shape": list(value.shape),
                          "data": value.ravel().tolist()}
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> BlockResult:
        """Inverse of :meth:`to_json`."""
        data = json.loads(raw) if isinstance(raw, bytes | str) else raw
        out = cls(int(data["n_classes"]), int(data["n_bands"]), image_paths=data["image_paths"],
                  label_paths=data["label_paths"])
        for name in cls._ARRAYS:
            item = data[name]
            setattr(out, name, np.asarray(item["data"], dtype=np.dtype(item["dtype"])).reshape(item["shape"]))
        out.children = {k: cls.from_json(v) for k, v in data.get("children", {}).items()}
        return out

    def add_chips(self, class_indices: list[np.ndarray], areas: list[np.ndarray],
                  pixel_counts: np.ndarray | None = None) -> None:
        """Account exported chips: each one's feature classes and areas (map units²), all at once.

        ``pixel_counts`` (chips x classes), for class-map formats: each chip's label
        pixels per class.
        """
        n, c = len(class_indices), self.n_classes
        if n == 0:
            return
        sizes = np.fromiter(map(len, class_indices), np.int64, n)
        cls = np.concatenate(class_indices).astype(np.int64)
        area = np.concatenate(areas).astype(np.float64)
        per_chip = np.bincount(np.repeat(np.arange(n), sizes) * c + cls, minlength=n * c).reshape(n, c)
        self.features_per_class += per_chip.sum(axis=0)
        self.images_per_class += (per_chip > 0).sum(axis=0)
        self.features_per_image = _merge_summary(self.features_per_image, _summary(sizes))
        for k in np.flatnonzero(per_chip.any(axis=0)):
            self.area_per_class[k] = _merge_summary(self.area_per_class[k], _summary(area[cls == k]))
        if pixel_counts is None:
            return
        present = pixel_counts > 0
        self.pixel_images_per_class += present.sum(axis=0)
        self.classes_per_image = _merge_summary(self.classes_per_image, _summary(present.sum(axis=1)))
        for k in np.flatnonzero(present.any(axis=0)):
            self.pixels_per_class[k] = _merge_summary(self.pixels_per_class[k],
                                                      _summary(pixel_counts[present[:, k], k]))

    def add_band_moments(self, n: np.ndarray, mean: np.ndarray, m2: np.ndarray,
                         vmin: np.ndarray, vmax: np.ndarray) -> None:
        """Fold in per-band moments of some pixels (Chan et al.'s parallel update)."""
        self.band_n, self.band_mean, self.band_m2 = _chan(
            (self.band_n, self.band_mean, self.band_m2), (n, mean, m2)
        )
        self.band_min = np.minimum(self.band_min, vmin)
        self.band_max = np.maximum(self.band_max, vmax)


def _chan(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    safe = np.where(n > 0, n, 1).astype(np.float64)
    delta = mb - ma
    mean = np.where(n > 0, ma + delta * (nb / safe), 0.0)
    m2 = m2a + m2b + delta * delta * (na.astype(np.float64) * nb / safe)
    return n, mean, np.where(n > 0, m2, 0.0)


def merge(a: BlockResult, b: BlockResult) -> BlockResult:
    """Merge two results (associative; the tree's fixed shape makes it deterministic)."""
    out = BlockResult(a.n_classes, a.n_bands)
    out.chip_ids = np.concatenate([a.chip_ids, b.chip_ids])
    out.image_paths = a.image_paths + b.image_paths
    out.label_paths = a.label_paths + b.label_paths
    out.chip_class_counts = np.concatenate([a.chip_class_counts, b.chip_class_counts])
    out.chip_pixel_counts = np.concatenate([a.chip_pixel_counts, b.chip_pixel_counts])
    for key in sorted(set(a.children) | set(b.children)):
        if key in a.children and key in b.children:
            out.children[key] = merge(a.children[key], b.children[key])
        else:
            out.children[key] = a.children.get(key) or b.children[key]
    out.features_per_image = _merge_summary(a.features_per_image, b.features_per_image)
    out.classes_per_image = _merge_summary(a.classes_per_image, b.classes_per_image)
    for name in ("images_per_class", "features_per_class", "pixel_images_per_class"):
        setattr(out, name, getattr(a, name) + getattr(b, name))
    for name in ("area_per_class", "pixels_per_class"):
        setattr(out, name, _merge_summary(getattr(a, name), getattr(b, name)))
    out.band_n, out.band_mean, out.band_m2 = _chan(
        (a.band_n, a.band_mean, a.band_m2), (b.band_n, b.band_mean, b.band_m2)
    )
    out.band_min = np.minimum(a.band_min, b.band_min)
    out.band_max = np.maximum(a.band_max, b.band_max)
    return out


def merge_all(*results: BlockResult) -> BlockResult:
    """Merge results left to right (one node of the reduction tree)."""
    out = results[0]
    for r in results[1:]:
        out = merge(out, r)
    return out


def _stat_obj(s: np.ndarray, counts: bool = False) -> dict[str, float | int]:
    """``{Min, Max, Mean, Sum, Count}`` as ArcGIS writes them (zeros when empty).

    ``Count`` is a whole number; so are ``Min``, ``Max`` and ``Sum`` of ``counts``
    (features or pixels per image), as in ArcGIS's files.
    """
    count = int(s[3])
    whole = int if counts else float
    if count == 0:
        return {"Min": whole(0), "Max": whole(0), "Mean": 0.0, "Sum": whole(0), "Count": 0}
    return {"Min": whole(s[0]), "Max": whole(s[1]), "Mean": float(s[2] / count),
            "Sum": whole(s[2]), "Count": count}


def esri_json(obj: Any) -> bytes:
    """JSON as ArcGIS writes it: 2-space indent, ``" : "`` between key and value."""
    return (json.dumps(obj, indent=2, separators=(",", " : ")) + "\n").encode()


@dataclass(frozen=True)
class Summary:
    """Everything the metadata writers need, besides the merged :class:`BlockResult`."""

    metadata_format: str
    output_features: bool
    rasterized: bool
    tile_size_x: int
    tile_size_y: int
    image_extension: str
    label_extension: str
    classes: tuple[Any, ...]  # ClassInfo
    band_names: tuple[str, ...]
    cell_size: tuple[float, float]
    epsg: int | None
    crs_wkt: str
    emd_extra: dict[str, Any] = field(default_factory=dict)
    image_space: str = "MAP_SPACE"
    raster_count: int = 1
    class_raster: bool = False  # the class data is a classified raster (no features)

    def band_stats(self, r: BlockResult) -> list[dict[str, Any]]:
        """``AllTilesStats``: Min/Max/Mean/StdDev per band over the exported chips' valid pixels."""
        out = []
        for i, name in enumerate(self.band_names):
            n = int(r.band_n[i])
            std = float(np.sqrt(r.band_m2[i] / n)) if n else 0.0
            out.append({
                "BandName": name,
                "Min": float(r.band_min[i]) if n else 0.0,
                "Max": float(r.band_max[i]) if n else 0.0,
                "Mean": float(r.band_mean[i]) if n else 0.0,
                "StdDev": std,
            })
        return out

    def _cell(self) -> dict[str, Any]:
        sr = {"wkid": self.epsg, "latestWkid": self.epsg} if self.epsg else {"wkt": self.crs_wkt}
        return {"x": self.cell_size[0], "y": self.cell_size[1], "spatialReference": sr}

    def emd(self, r: BlockResult) -> dict[str, Any]:
        """``esri_model_definition.emd``."""
        return {
            "ImageHeight": self.tile_size_y,
            "ImageWidth": self.tile_size_x,
            "ExtractBands": list(range(len(self.band_names))),
            "MetaDataMode": self.metadata_format,
            "ImageSpaceUsed": self.image_space,
            "IsMultidimensional": False,
            "MinCellSize": self._cell(),
            "MaxCellSize": self._cell(),
            "InputRastersProps": {
                "RasterCount": self.raster_count,
                "SensorName": "",
                "BandNames": list(self.band_names),
            },
            "AllTilesStats": self.band_stats(r),
            "Classes": [{"Value": c.value, "Name": c.name, "Color": list(c.color)}
                        for c in self.classes],
            **self.emd_extra,
        }

    def accumulated_stats(self, r: BlockResult) -> dict[str, Any]:
        """``esri_accumulated_stats.json``."""
        n_classes = len(self.classes)
        out: dict[str, Any] = {
            "Version": 1,
            "NumBands": len(self.band_names),
            "TileSizeX": self.tile_size_x,
            "TileSizeY": self.tile_size_y,
            "NumClasses": n_classes,
            "NumTiles": r.num_chips,
            "OutputFeatures": self.output_features,
            "MetaDataMode": self.metadata_format,
            "MinCellSize": self._cell(),
            "Classes": [{"ClassValue": c.value, "ClassName": c.name} for c in self.classes],
            "FeatureStats": {
                "NumClasses": n_classes,
                "NumImagesTotal": r.num_chips,
                "NumFeaturesTotal": int(r.features_per_class.sum()),
                "NumImagesPerClass": r.images_per_class.tolist(),
                "NumFeaturesPerClass": r.features_per_class.tolist(),
                "NumFeaturesPerImage": _stat_obj(r.features_per_image, counts=True),
                "FeatureAreaPerClass": [_stat_obj(s) for s in r.area_per_class],
            },
        }
        if self.rasterized:
            out["ClassPixelStats"] = {
                "NumClasses": n_classes,
                "NumImagesTotal": r.num_chips,
                "NumImagesPerClass": r.pixel_images_per_class.tolist(),
                "NumPixelsPerClass": [int(s[2]) for s in r.pixels_per_class],
                "NumClassesPerImage": _stat_obj(r.classes_per_image, counts=True),
                "PixelsPerClass": [_stat_obj(s, counts=True) for s in r.pixels_per_class],
            }
        out["BandStatsState"] = [
            {"Min": float(r.band_min[i]) if r.band_n[i] else 0.0,
             "Max": float(r.band_max[i]) if r.band_n[i] else 0.0,
             "M1": float(r.band_mean[i]), "M2": float(r.band_m2[i]), "Num": int(r.band_n[i])}
            for i in range(len(self.band_names))
        ]
        return out

    def map_txt(self, r: BlockResult) -> bytes:
        r"""``map.txt``: one ``images\<stem>.<ext>  labels\<stem>.<ext> `` line per chip, by id.

        arcgis.learn takes the label files' extension from the last column of the
        first line, so when the first chip has no label file (RCNN_Masks: a chip
        without an instance) the first chip that has one comes first.
        """
        order = np.argsort(r.chip_ids, kind="stable").tolist()
        if order and not r.label_paths[order[0]]:
            labelled = next((k for k, i in enumerate(order) if r.label_paths[i]), 0)
            order.insert(0, order.pop(labelled))
        lines = []
        for i in order:
            image, label = r.image_paths[i].replace("/", "\\"), r.label_paths[i].replace("/", "\\")
            lines.append(f"{image}  {label} \n" if label else f"{image} \n")
        return "".join(lines).encode()

    def stats_txt(self, r: BlockResult) -> bytes:
        """``stats.txt``: the human-readable summary (never read by the consumer).

        ArcGIS's layout: for features, their count per image and per class with
        their sizes (map units²); from a class raster, classes per image and
        pixels per class, sizes in pixels (per image holding the class).
        """
        n_bands = len(self.band_names)
        lines = [f"images = {r.num_chips} *{n_bands}*{self.tile_size_y}*{self.tile_size_x}"]
        if self.class_raster and self.rasterized:
            cpi = _stat_obj(r.classes_per_image)
            lines += [f"pixels = {int(sum(s[2] for s in r.pixels_per_class))}",
                      f"classes per image = [min = {cpi['Min']:.0f}, mean = {cpi['Mean']:.2f}, "
                      f"max = {cpi['Max']:.0f}]",
                      f"classes = {len(self.classes)}",
                      f"{'cls name':<20}{'cls value':>11}{'images':>11}{'pixels':>14}"
                      f"{'min size':>12}{'mean size':>12}{'max size':>12}"]
            for k, c in enumerate(self.classes):
                p = _stat_obj(r.pixels_per_class[k])
                lines.append(f"{c.name[:19]:<20}{c.value:>11}{int(r.pixel_images_per_class[k]):>11}"
                             f"{int(p['Sum']):>14}{p['Min']:>12.0f}{p['Mean']:>12.2f}{p['Max']:>12.0f}")
            return ("\n".join(lines) + "\n").encode()
        fpi = _stat_obj(r.features_per_image)
        lines.append(f"features = {int(r.features_per_class.sum())}")
        lines.append(
            f"features per image = [min = {fpi['Min']:.0f}, mean = {fpi['Mean']:.2f}, "
            f"max = {fpi['Max']:.0f}]"
        )
        if self.rasterized:
            cpi = _stat_obj(r.classes_per_image)
            lines.append(
                f"classes per image = [min = {cpi['Min']:.0f}, mean = {cpi['Mean']:.2f}, "
                f"max = {cpi['Max']:.0f}]"
            )
        lines.append(f"classes = {len(self.classes)}")
        lines.append(
            f"{'cls name':<20}{'cls value':>11}{'images':>11}{'features':>11}"
            f"{'min size':>12}{'mean size':>12}{'max size':>12}"
            + (f"{'pixels':>14}" if self.rasterized else "")
        )
        for k, c in enumerate(self.classes):
            a = _stat_obj(r.area_per_class[k])
            row = (
                f"{c.name[:19]:<20}{c.value:>11}{int(r.images_per_class[k]):>11}"
                f"{int(r.features_per_class[k]):>11}{a['Min']:>12.2f}{a['Mean']:>12.2f}{a['Max']:>12.2f}"
            )
            if self.rasterized:
                row += f"{int(r.pixels_per_class[k][2]):>14}"
            lines.append(row)
        return ("\n".join(lines) + "\n").encode()
