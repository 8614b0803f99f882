"""What a user sees on the Dask dashboard: named task groups and per-phase time."""

from __future__ import annotations

import time

from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE

import chipflow


def test_task_groups_and_phase_metrics_are_named(client, tmp_path):
    chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "d", KAMPALA_BUILDINGS, client=client)

    def seen(dask_scheduler):  # the "Fine Performance Metrics" page: (execute, task prefix, activity, unit)
        return [key[1:3] for key in dask_scheduler.cumulative_worker_metrics
                if isinstance(key, tuple) and key[0] == "execute"]

    deadline = time.time() + 20
    while time.time() < deadline:  # workers report with their heartbeats
        keys = set(client.run_on_scheduler(seen))
        if {("chipflow-block", "write"), ("chipflow-reduce", "thread-cpu")} <= keys:
            break
        time.sleep(0.2)
    assert {("chipflow-block", "read"), ("chipflow-block", "labels"), ("chipflow-block", "write")} <= keys
    assert any(prefix == "chipflow-reduce" for prefix, _ in keys)


def test_workers_are_tuned_for_block_tasks(client, tmp_path):
    """GDAL's block cache is capped (not 5% of RAM per worker) and glibc's mmap threshold raised."""
    chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "out", KAMPALA_BUILDINGS, client=client)

    def settings():
        from rasterio.env import get_gdal_config

        return get_gdal_config("GDAL_CACHEMAX")

    from chipflow._dask import WorkerTuning

    assert set(client.run(settings).values()) == {WorkerTuning.GDAL_CACHE_MB}
