"""Smoke tests of the benchmark harness in benchmarks/."""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
from PIL import Image
from rasterio.windows import Window

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.baselines import by_hand, floor  # noqa: E402
from benchmarks.generate import make_inputs  # noqa: E402


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"), size=1024, n_features=200)


def source_window(raster, row, col, tile=256):
    with rasterio.open(raster) as src:
        return src.read(window=Window(col, row, tile, tile))


def test_quick_run_measures_all_systems(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "run.py"),
            "--quick",
            "--scaling",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    systems = result["systems"]
    for name in ("by_hand", "floor", "chipflow"):
        assert systems[name]["chips_per_s"] > 0
    assert systems["by_hand"]["chips"] == systems["floor"]["chips"] == systems["chipflow"]["chips"]
    assert result["counts_equal"]
    # chipflow ran on chipflow.local_cluster (the CLI's cluster), whose servers tick every 200 ms
    assert all(run["worker_tick_ms"] == [200] for run in systems["chipflow"]["runs"])
    assert json.loads(out.read_text())["settings"]["cluster"] == "chipflow.local_cluster"
    scaling = result["scaling"]
    assert scaling["ratio"] == systems["chipflow"]["chips_per_s"] / systems["chipflow_1_worker"]["chips_per_s"]
    for name in ("by_hand", "floor", "chipflow_1_worker"):  # each repeat's own ratio, the other's time over chipflow's
        paired = result["paired_ratios"][f"chipflow/{name}"]
        assert paired["runs"] == [a["seconds"] / b["seconds"] for a, b in zip(
            systems[name]["runs"], systems["chipflow"]["runs"], strict=True)]
        assert paired["median"] == statistics.median(paired["runs"]) and len(paired["runs"]) == 1
    assert "chipflow/floor" in proc.stdout and "repeat by repeat: median" in proc.stdout
    # the export split at its block tasks: the parts add up to the export's time, each one measured
    for name in ("chipflow", "chipflow_1_worker"):
        for run in systems[name]["runs"]:
            phases = run["phases"]
            assert phases["blocks"] > 0 and phases["before_blocks"] > 0 and phases["after_blocks"] > 0
            # on the wall clock, which may be slewed against the interval timer by a few ms
            assert abs(phases["before_blocks"] + phases["blocks"] + phases["after_blocks"] - run["seconds"]) < 0.01
    assert systems["chipflow_1_worker"]["runs"][0]["phases"]["idle_at_end"] == 0  # one worker: never idle
    assert scaling["blocks"]["ratio"] == (systems["chipflow_1_worker"]["phases"]["blocks"]
                                          / systems["chipflow"]["phases"]["blocks"])
    assert "the block phase alone" in proc.stdout
    assert not any((tmp_path / "runs").iterdir()) and _trashed(tmp_path) == []  # deleted at the end
    # the floor's own scaling, 1 -> 2 processes, puts chipflow's in context
    assert systems["floor_1_process"]["chips"] == systems["floor"]["chips"]
    floor = result["floor_scaling"]
    assert floor["ratio"] == systems["floor"]["chips_per_s"] / systems["floor_1_process"]["chips_per_s"]
    assert floor["paired"]["runs"] == [systems["floor_1_process"]["runs"][0]["seconds"]
                                       / systems["floor"]["runs"][0]["seconds"]]
    assert "floor scaling 1 -> 2 processes" in proc.stdout
    against = scaling["against_floor"]  # chipflow's scaling over the machine's own, as the note reads it
    assert against["ratio"] == scaling["ratio"] / floor["ratio"]
    assert against["paired"]["runs"] == [
        result["paired_ratios"]["chipflow/chipflow_1_worker"]["runs"][0] / floor["paired"]["runs"][0]]
    assert "against the floor's own scaling" in proc.stdout
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) <= 2:  # --workers 2 has every core
        assert systems["chipflow_1_core"]["chips"] == systems["chipflow"]["chips"]
        assert scaling["per_core"]["ratio"] == (
            systems["chipflow"]["chips_per_s"] / systems["chipflow_1_core"]["chips_per_s"])


def test_block_phases_split_an_export_at_its_block_tasks():
    from benchmarks.run import block_phases

    def block(i, worker, sent, done):
        return {"key": f"chipflow-block-ab12cd34-{i}", "worker": worker, "sent": sent, "done": done}

    blocks = [block(0, "w1", 10.1, 10.5), block(1, "w2", 10.2, 10.6), block(2, "w1", 10.5, 11.0)]
    phases = block_phases(blocks, began=10.0, ended=11.3)
    assert phases == pytest.approx({"before_blocks": 0.1, "blocks": 0.9, "after_blocks": 0.3,
                                    "idle_at_end": 0.4})  # w2 finished at 10.6, w1 at 11.0
    assert block_phases([], 10.0, 11.3) == {}  # no block ran (a resumed export)
    assert block_phases(blocks, 10.0, 11.3, n_blocks=3) == phases
    assert block_phases(blocks[1:], 10.0, 11.3, n_blocks=3) == {}  # a block not stamped: no phases


def test_block_clock_stamps_blocks_on_the_schedulers_clock():
    """Causal stamps: the blocks start after the export is called and end before it returns."""
    from distributed import Client, LocalCluster

    from benchmarks.run import BlockClock, block_phases

    def block(i):
        time.sleep(0.02)
        return i

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.register_plugin(BlockClock())
        began = time.time()
        futures = [client.submit(block, i, key=f"chipflow-block-ab12cd34-{i}") for i in range(6)]
        assert client.gather(futures) == list(range(6))
        client.submit(block, 9, key="chipflow-reduce-ab12cd34-0").result()  # not a block
        ended = time.time()
        blocks = client.run_on_scheduler(BlockClock.collect)
        workers = set(client.scheduler_info()["workers"])
        assert BlockClock.name not in client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.plugins))
    assert sorted(b["key"] for b in blocks) == [f"chipflow-block-ab12cd34-{i}" for i in range(6)]
    assert {b["worker"] for b in blocks} <= workers
    assert all(began < b["sent"] < b["done"] < ended and b["done"] - b["sent"] >= 0.02 for b in blocks)
    phases = block_phases(blocks, began, ended, n_blocks=6)
    assert phases["before_blocks"] > 0 and phases["after_blocks"] > 0
    assert phases["before_blocks"] + phases["blocks"] + phases["after_blocks"] == pytest.approx(ended - began)


def test_features_scaling_runs_and_pairs_its_repeats(tmp_path):
    out = tmp_path / "f.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.features_scaling", "--size", "1024", "--features", "100", "1000",
         "--stride", "128", "--repeat", "2", "--workdir", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    small, large = json.loads(out.read_text())
    assert (small["features"], large["features"]) == (100, 1000)
    assert [r["chips"] for r in small["runs"] + large["runs"]] == [49] * 4  # 1024² at stride 128: 7 x 7
    assert large["ratio"] == large["seconds"] / small["seconds"] and small["ratio"] == 1
    pairs = zip(small["runs"], large["runs"], strict=True)
    assert large["paired_ratios"] == [b["seconds"] / a["seconds"] for a, b in pairs]
    assert all(r["peak_process_rss_mb"] > 50 for r in small["runs"] + large["runs"])
    assert "paired runs: median" in proc.stdout
    assert not any((tmp_path / "runs").iterdir()) and _trashed(tmp_path) == []  # deleted at the end


def _trashed(workdir):
    return sorted(p.name for p in (workdir / "trash").iterdir() if p.name != ".emptied")


def test_scratch_deletes_runs_only_away_from_measured_runs(tmp_path, monkeypatch):
    """Finished runs' folders go to the trash (nothing deleted); it is emptied when the disk needs the
    room or at the end, and a run right after an emptying waits until QUIET_SECONDS have passed."""
    import benchmarks.scratch as scratch_module
    from benchmarks.scratch import Scratch

    monkeypatch.setattr(scratch_module, "QUIET_SECONDS", 0.6)
    (tmp_path / "runs" / "left-over").mkdir(parents=True)  # an interrupted invocation's run
    scratch = Scratch(tmp_path)
    assert not any(scratch.runs.iterdir()) and _trashed(tmp_path)[0].startswith("left-over-")
    assert scratch.ready() == 0  # nothing deleted yet: no wait
    out = scratch.fresh("floor")
    (out / "chip.tif").write_bytes(b"x")
    scratch.discard(out)
    assert not out.exists() and len(_trashed(tmp_path)) == 2
    kept = tmp_path / "trash" / _trashed(tmp_path)[0]
    assert kept.exists()
    assert scratch.ready(need_bytes=2**20) == 0 and kept.exists()  # room enough: nothing deleted
    waited = scratch.ready(need_bytes=2**62)  # not enough room: emptied, then the quiet wait
    assert _trashed(tmp_path) == [] and 0.4 < waited <= 0.6
    os.utime(scratch.stamp, (0, time.time() - 1))  # the last deletion a second ago
    assert scratch.ready() == 0
    with Scratch(tmp_path) as again:  # a new invocation after a fresh deletion waits too
        os.utime(again.stamp, None)
        assert again.ready() > 0.4
        again.discard(again.fresh("cli"))
    assert _trashed(tmp_path) == []  # emptied on leaving


def test_pinned_child_runs_on_the_cpus_it_was_given():
    """--scaling's one-core run: the measured process and its children see one CPU."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("CPU affinity is Linux-only")
    from benchmarks.run import run_child

    result = run_child({"system": "affinity", "cpus": 1})
    assert result["cpus"] == [0] and result["child_cpus"] == [0]


def test_by_hand_chip_matches_source(small_inputs, tmp_path):
    raster, vector = small_inputs
    assert by_hand(raster, vector, tmp_path, tile=256, stride=128)["chips"] == 49
    with rasterio.open(tmp_path / "images" / "000000008.tif") as chip:  # row 1, col 1
        np.testing.assert_array_equal(chip.read(), source_window(raster, 128, 128))
        with rasterio.open(raster) as src:
            assert chip.crs == src.crs
            assert chip.transform == src.window_transform(Window(128, 128, 256, 256))
    assert (tmp_path / "labels" / "000000008.xml").read_text().startswith("<annotation>")


def read_floor_chip(folder, chip_id, fmt):
    if fmt == "TIFF":  # laid out as chipflow's 4-band uint8 chips: RGB and an extra sample, interleaved
        with tifffile.TiffFile(folder / "images" / f"{chip_id:09d}.tif") as tif:
            page = tif.pages[0]
            assert (page.photometric, page.planarconfig, page.extrasamples) == (
                tifffile.PHOTOMETRIC.RGB, tifffile.PLANARCONFIG.CONTIG, (0,))
            return np.moveaxis(page.asarray(), -1, 0)
    return np.asarray(Image.open(folder / "images" / f"{chip_id:09d}.png")).transpose(2, 0, 1)


@pytest.mark.parametrize("fmt", ["TIFF", "PNG"])
def test_floor_chips_match_source(small_inputs, tmp_path, fmt):
    raster, _ = small_inputs
    assert floor(raster, tmp_path, tile=256, stride=128, fmt=fmt)["chips"] == 49
    bands = 4 if fmt == "TIFF" else 3
    # chip 0 comes from the first worker's strip, chip 48 (row 6, col 6) from the second's
    for chip_id, offset in ((0, 0), (48, 768)):
        np.testing.assert_array_equal(
            read_floor_chip(tmp_path, chip_id, fmt), source_window(raster, offset, offset)[:bands]
        )
