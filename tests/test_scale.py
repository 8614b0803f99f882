"""Scale: a 200,000² raster plans from block geometry alone; large class data is partitioned."""

from __future__ import annotations

import math
import tracemalloc

import geopandas as gpd
import numpy as np
import rasterio
from affine import Affine
from shapely.geometry import box

from chipflow.config import make_config
from chipflow.plan import plan_export


def test_a_200k_raster_plans_in_blocks_within_client_memory(tmp_path):
    path = tmp_path / "huge.tif"  # a sparse GeoTIFF: 200,000² pixels in about a megabyte
    with rasterio.open(path, "w", driver="GTiff", width=200_000, height=200_000, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=Affine(0.5, 0, 500000, 0, -0.5, 4100000), tiled=True,
                       blockxsize=512, blockysize=512, compress="deflate", sparse_ok=True) as ds:
        ds.write(np.full((3, 512, 512), 7, np.uint8), window=rasterio.windows.Window(0, 0, 512, 512))
    assert path.stat().st_size < 5_000_000
    features = gpd.GeoDataFrame(geometry=[box(500000 + 100 * i, 4000100, 500020 + 100 * i, 4000120)
                                          for i in range(50)], crs=32633)
    tracemalloc.start()
    plan = plan_export(make_config(str(path), str(tmp_path / "out"), stride_x=256, stride_y=256,
                                   output_nofeature_tiles="ALL_TILES"), features)
    described = plan.describe()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n = (200_000 - 256) // 256 + 1
    assert described["grid"]["chips"] == n * n == 609_961  # about 600k chips ...
    assert sum(b.n_chips for b in plan.blocks) == n * n
    k = max(b.rows[1] - b.rows[0] for b in plan.blocks)
    assert len(plan.blocks) == math.ceil(n / k) ** 2  # ... in blocks: one task each
    assert described["tasks"] == len(plan.blocks)  # the client merges their results
    assert peak < 1 << 30
    # features at columns 200i..200i+40, rows 199760..199800 (chip row 780 only)
    touched = {c for i in range(50) for c in range(n) if c * 256 < 200 * i + 40 and c * 256 + 256 > 200 * i}
    assert described["chips_with_features"] == len(touched)
    assert not (tmp_path / "out").exists()


def test_partitioned_class_data_gives_the_same_dataset(client, tmp_path, monkeypatch):
    from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE

    import chipflow
    import chipflow._partition
    import chipflow.pipeline

    args = dict(metadata_format="Classified_Tiles", client=client)
    chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "whole", KAMPALA_BUILDINGS, **args)
    monkeypatch.setattr(chipflow.pipeline, "PARTITION_THRESHOLD", 50)
    monkeypatch.setattr(chipflow._partition, "PARTITION_SIZE", 30)
    chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "parts", KAMPALA_BUILDINGS, **args)
    parts = sorted((tmp_path / "parts" / ".chipflow" / "labels").glob("*-part-*.parquet"))
    assert len(parts) >= 5  # 206 features in partitions of 30
    bounds = np.array([gpd.read_parquet(p).total_bounds for p in parts])
    area = (bounds[:, 2] - bounds[:, 0]) * (bounds[:, 3] - bounds[:, 1])
    total = (bounds[:, 2].max() - bounds[:, 0].min()) * (bounds[:, 3].max() - bounds[:, 1].min())
    assert area.mean() < 0.5 * total  # spatially compact (Hilbert order), not the whole extent each

    def tree(folder):
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file() and "-part-" not in str(p)}

    whole, partitioned = tree(tmp_path / "whole"), tree(tmp_path / "parts")
    assert sorted(whole) == sorted(partitioned)
    assert [k for k in whole if whole[k] != partitioned[k]] == []


def _dataset(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".chipflow" not in p.parts}


def test_partitioned_class_data_of_items_processed_separately_stays_each_items(client, tmp_path, monkeypatch):
    """Each item's partitions are its own: they were written under the same names, the last item's won."""
    from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE

    import chipflow
    import chipflow._partition
    import chipflow.pipeline

    items = []
    with rasterio.open(KAMPALA_IMAGE) as src:
        profile = src.profile
        for k, window in enumerate([rasterio.windows.Window(0, 0, 1024, 512), rasterio.windows.Window(0, 512, 1024, 512)]):
            profile.update(width=1024, height=512, transform=src.window_transform(window))
            items.append(tmp_path / f"item{k}.tif")
            with rasterio.open(items[-1], "w", **profile) as dst:
                dst.write(src.read(window=window))
    args = dict(processing_mode="PROCESS_ITEMS_SEPARATELY", stride_x=256, stride_y=256, client=client)
    chipflow.export_training_data([str(i) for i in items], tmp_path / "whole", KAMPALA_BUILDINGS, **args)
    monkeypatch.setattr(chipflow.pipeline, "PARTITION_THRESHOLD", 50)
    monkeypatch.setattr(chipflow._partition, "PARTITION_SIZE", 30)
    chipflow.export_training_data([str(i) for i in items], tmp_path / "parts", KAMPALA_BUILDINGS, **args)
    whole, partitioned = _dataset(tmp_path / "whole"), _dataset(tmp_path / "parts")
    assert sorted(whole) == sorted(partitioned) and len(whole) > 10
    assert [k for k in whole if whole[k] != partitioned[k]] == []


def test_a_long_lived_worker_never_reuses_another_runs_partitions(client, tmp_path, monkeypatch):
    """Other features exported into the same folder (overwrite) on the same cluster: their own labels."""
    from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE

    import chipflow
    import chipflow._partition
    import chipflow.pipeline

    monkeypatch.setattr(chipflow.pipeline, "PARTITION_THRESHOLD", 50)
    monkeypatch.setattr(chipflow._partition, "PARTITION_SIZE", 30)
    first = gpd.read_file(KAMPALA_BUILDINGS)
    moved = first.copy()
    moved["geometry"] = first.geometry.translate(3e-5, -2e-5)  # degrees: a few pixels
    args = dict(stride_x=256, stride_y=256, client=client)
    chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "o", first, **args)
    chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "o", moved, overwrite=True, **args)
    chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "fresh", moved, **args)
    again, fresh = _dataset(tmp_path / "o"), _dataset(tmp_path / "fresh")
    assert sorted(again) == sorted(fresh)
    assert [k for k in fresh if again[k] != fresh[k]] == []


def test_class_data_goes_straight_to_local_workers_and_through_the_scheduler_to_others(client, tmp_path,
                                                                                      monkeypatch):
    """On a cluster of this machine the broadcast skips the scheduler; a client that says
    ``direct_to_workers=False``, or workers elsewhere, keep Dask's way."""
    from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE
    from distributed import Client

    import chipflow
    from chipflow._dask import _direct, _loopback

    assert [_loopback(a) for a in ("tcp://127.0.0.1:8786", "tls://localhost:1", "tcp://[::1]:9", "inproc://x/1/2",
                                   "tcp://10.0.0.5:8786", "tcp://dask-worker-0.dask:8786", "ucx://192.168.1.2:1")] \
        == [True, True, True, True, False, False, False]
    calls = []
    real = type(client).scatter
    monkeypatch.setattr(type(client), "scatter", lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    result = chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "out", KAMPALA_BUILDINGS, client=client,
                                           metadata_format="PASCAL_VOC_rectangles")
    assert result.num_chips > 0
    assert [(k["broadcast"], k["direct"]) for k in calls] == [(True, True)]
    with Client(client.scheduler.address, direct_to_workers=False) as other:
        assert _direct(other) is False
