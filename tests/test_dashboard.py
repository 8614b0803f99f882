"""What a user sees on the Dask dashboard: named task groups and per-phase time."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

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
        if {("chipflow-block", "read"), ("chipflow-block", "labels"), ("chipflow-block", "write")} <= keys:
            break
        time.sleep(0.2)
    assert {("chipflow-block", "read"), ("chipflow-block", "labels"), ("chipflow-block", "write")} <= keys
    assert {prefix for prefix, _ in keys} == {"chipflow-block"}  # the client merges the results


def _refaults() -> int:
    """Page faults of allocating and filling 100 MB (5 arrays of 20 MB) again after freeing them.

    A process that keeps freed memory for reuse faults almost never; one whose
    allocator hands it back to the kernel faults once per 4 KiB page (about
    25,000 times; numpy's transparent huge pages are turned off for the count).
    """
    import resource

    import numpy as np
    from numpy._core.multiarray import _set_madvise_hugepage

    _set_madvise_hugepage(False)
    arrays = [np.ones(20 * 2**20, np.uint8) for _ in range(5)]
    del arrays
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    again = [np.ones(20 * 2**20, np.uint8) for _ in range(5)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del again
    return faults


def test_workers_are_tuned_for_block_tasks(client, tmp_path):
    """GDAL's block cache is capped (not 5% of RAM per worker) and freed memory is kept for reuse."""
    chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "out", KAMPALA_BUILDINGS, client=client)

    def settings():
        from rasterio.env import get_gdal_config

        return get_gdal_config("GDAL_CACHEMAX")

    from chipflow._dask import WorkerTuning

    # in bytes: rasterio hands an integer to GDALSetCacheMax64 (128 was once set: 128 bytes, no cache at
    # all, which also made GDAL's MRF driver write wrong pixels)
    assert set(client.run(settings).values()) == {WorkerTuning.GDAL_CACHE_MB * 2**20}
    # distributed's MALLOC_TRIM_THRESHOLD_ alone: every page faults again (the next test shows the count)
    assert max(client.run(_refaults).values()) < 1_000


def test_the_exporting_process_keeps_freed_memory_for_reuse(client, tmp_path):
    """The client's planning (200k features: about 70 MB of arrays per export) reuses its memory."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_dashboard import _refaults
import chipflow
before = _refaults()
chipflow.export_training_data({str(KAMPALA_IMAGE)!r}, {str(tmp_path / "out")!r}, {str(KAMPALA_BUILDINGS)!r},
                              scheduler={client.scheduler.address!r})
print(before, _refaults())
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    before, after = map(int, run.stdout.split())
    assert before > 20_000  # glibc's defaults: the freed arrays went back to the kernel
    assert after < 1_000
