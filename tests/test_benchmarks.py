"""Smoke tests of the benchmark harness in benchmarks/."""

import json
import subprocess
import sys
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
    if fmt == "TIFF":
        return tifffile.imread(folder / "images" / f"{chip_id:09d}.tif")
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
