"""Large class data, spatially partitioned: each block reads only the partitions it needs.

Up to ``PARTITION_THRESHOLD`` features, the class data is broadcast whole to every
worker (deserialised and indexed once per worker). Beyond it, the features are
sorted along a Hilbert curve (as dask-geopandas' ``spatial_shuffle`` does) into
spatially compact partitions,
each written once to the run folder (``.chipflow/labels/<item>-part-NNNNN.parquet``,
one set per input item, through the output store, so it works on object storage too); a block task gets
only the partitions' bounds and reads, caches and indexes just the partitions
that meet its window. Worker memory then follows the block, not the class data.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely

from .labels import LabelSet
from .store import RUN_DIR, Store

__all__ = ["PARTITION_THRESHOLD", "PartitionedLabels", "partition_labels"]

#: Class data with more features than this is partitioned instead of broadcast.
PARTITION_THRESHOLD = 500_000
#: Features per partition.
PARTITION_SIZE = 20_000


@dataclass(frozen=True)
class PartitionedLabels:
    """Where the partitions are, their bounds, and what every block needs besides (small, picklable)."""

    store: Store
    parts: tuple[tuple[str, tuple[float, float, float, float]], ...]
    classes: tuple[Any, ...]
    pixel_area: float
    mask: Any = None
    #: The class data's fingerprint: part of the workers' cache keys, so a long-lived worker never
    #: reuses the partitions of another run written under the same names (an ``overwrite``).
    token: str = ""

    def subset(self, window: tuple[float, float, float, float]) -> LabelSet:
        """The features of the partitions whose bounds meet ``window``, as one LabelSet.

        Blocks that meet the same partitions share one LabelSet (and its spatial
        index) per worker process.
        """
        x0, y0, x1, y1 = window
        rels = tuple(rel for rel, (bx0, by0, bx1, by1) in self.parts
                     if bx0 <= x1 and bx1 >= x0 and by0 <= y1 and by1 >= y0)
        labels = _subset(self.store.url, self.store.storage_options, self.token, rels, self.classes,
                         self.pixel_area)
        labels.mask = self.mask
        return labels


@functools.lru_cache(maxsize=1)  # consecutive blocks of a worker usually meet the same parts
def _subset(url: str, storage_options: tuple[tuple[str, Any], ...], token: str, rels: tuple[str, ...],
            classes: tuple[Any, ...], pixel_area: float) -> LabelSet:
    geoms, index, fids = [np.array([], dtype=object)], [np.zeros(0, np.int32)], [np.zeros(0, np.int64)]
    for rel in rels:
        g, i, f = _read_part(url, storage_options, token, rel)
        geoms.append(g)
        index.append(i)
        fids.append(f)
    order = np.argsort(np.concatenate(fids), kind="stable")  # the class data's own order
    return LabelSet(geoms=np.concatenate(geoms)[order], class_index=np.concatenate(index)[order],
                    classes=classes, pixel_area=pixel_area)


@functools.lru_cache(maxsize=8)
def _read_part(url: str, storage_options: tuple[tuple[str, Any], ...], token: str, rel: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One partition's geometries, class indices and feature ids (cached per worker process and data)."""
    import geopandas as gpd

    raw = Store(url, storage_options).read(rel)
    frame = gpd.read_parquet(io.BytesIO(raw))
    return (frame.geometry.to_numpy(), frame["class_index"].to_numpy(np.int32),
            frame["fid"].to_numpy(np.int64))


def partition_labels(labels: LabelSet, store: Store, *, size: int | None = None,
                     item: int = 0) -> PartitionedLabels:
    """Sort the features along a Hilbert curve and write them as spatially compact partitions.

    The Hilbert distances are geopandas' (the ones dask-geopandas' ``spatial_shuffle``
    sorts by), computed once over all features; consecutive runs of ``size`` features
    become the partitions, written through the output store, named by input
    ``item`` (items processed separately each have their own pixel space).
    """
    import geopandas as gpd

    size = size or PARTITION_SIZE
    frame = gpd.GeoDataFrame({"class_index": labels.class_index, "fid": np.arange(len(labels))},
                             geometry=labels.geoms)
    order = np.argsort(frame.geometry.hilbert_distance().to_numpy(), kind="stable")
    parts = []
    for i, start in enumerate(range(0, len(order), size)):
        part = frame.iloc[np.sort(order[start:start + size])].reset_index(drop=True)
        rel = f"{RUN_DIR}/labels/{item:05d}-part-{i:05d}.parquet"
        buf = io.BytesIO()
        part.to_parquet(buf, index=False)
        store.put(rel, buf.getvalue())
        parts.append((rel, tuple(float(v) for v in shapely.total_bounds(part.geometry.to_numpy()))))
    return PartitionedLabels(store, tuple(parts), labels.classes, labels.pixel_area, labels.mask,
                             token=labels.fingerprint())
