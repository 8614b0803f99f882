"""Runs that survive faults, resume, and refuse bad input before writing anything."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from click.testing import CliRunner
from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE, NC, textured
from shapely.geometry import Point, box

import chipflow
from chipflow.cli import main
from chipflow.store import Store, safe_name
from chipflow.validate import validate_dataset


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_tree(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb)
    assert [k for k in ta if ta[k] != tb[k]] == []


@pytest.fixture(scope="module")
def slow_inputs(tmp_path_factory):
    """A raster with many small chips (a run that lasts long enough to be killed)."""
    import rasterio
    from affine import Affine

    folder = tmp_path_factory.mktemp("slow")
    raster = folder / "big.tif"
    data = textured((3, 2048, 2048))
    t = Affine(1.0, 0, 300000.0, 0, -1.0, 5000000.0)
    with rasterio.open(raster, "w", driver="GTiff", width=2048, height=2048, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=t, tiled=True, blockxsize=256, blockysize=256,
                       compress="deflate") as ds:
        ds.write(data)
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 2048, size=(400, 2))
    features = gpd.GeoDataFrame({"classvalue": rng.integers(1, 4, 400)},
                                geometry=[box(*(t * (x, y)), *(t * (x + 20, y - 20))) for x, y in xy],
                                crs="EPSG:32633")
    vector = folder / "f.gpkg"
    features.to_file(vector)
    return raster, vector


SLOW = dict(tile_size_x=64, tile_size_y=64, stride_x=32, stride_y=32, metadata_format="PASCAL_VOC_rectangles",
            output_nofeature_tiles="ALL_TILES")


@pytest.fixture(scope="module")
def slow_clean(client, slow_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    chipflow.export_training_data(*slow_inputs[:1], out, slow_inputs[1], client=client, **SLOW)
    return out


def slow_cli(slow_inputs, out: Path, *extra: str) -> list[str]:
    """``chipflow export`` of the slow inputs with ``SLOW``'s parameters, on 2 workers."""
    raster, vector = slow_inputs
    return [sys.executable, "-m", "chipflow", "export", str(raster), str(out), "--in-class-data", str(vector),
            "--tile-size-x", "64", "--tile-size-y", "64", "--stride-x", "32", "--stride-y", "32",
            "--metadata-format", "PASCAL_VOC_rectangles", "--output-nofeature-tiles", "ALL_TILES",
            "--n-workers", "2", *extra]


def markers(out: Path) -> int:
    folder = out / ".chipflow" / "blocks"
    return len(list(folder.glob("*.json"))) if folder.exists() else 0


def test_reruns_give_the_same_names_and_bytes(client, slow_inputs, slow_clean, tmp_path):
    out = tmp_path / "again"
    chipflow.export_training_data(*slow_inputs[:1], out, slow_inputs[1], client=client, **SLOW)
    assert_same_tree(out, slow_clean)
    report = validate_dataset(str(out))
    assert report.ok, report.summary()
    assert report.images == 63 * 63


@pytest.mark.parametrize("n_workers", [2, 1], ids=["one of two", "the only one"])
def test_a_killed_worker_still_gives_the_full_dataset(slow_inputs, slow_clean, tmp_path, n_workers):
    """Killed mid-run, its blocks run again; the only worker: the class data it held is scattered again
    (Dask cannot recompute scattered data) to the worker its nanny restarts, and the rest runs."""
    from distributed import Client, LocalCluster

    out = tmp_path / "killed-worker"
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
         Client(cluster) as c:
        pids = list(c.run(os.getpid).values())
        errors = []

        def run():
            try:
                chipflow.export_training_data(*slow_inputs[:1], out, slow_inputs[1], client=c, **SLOW)
            except Exception as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.time() + 60
        while markers(out) < 2 and time.time() < deadline:
            time.sleep(0.01)
        total = markers(out)
        os.kill(pids[0], signal.SIGKILL)
        thread.join(180)
        assert pids[0] not in c.run(os.getpid).values()  # its blocks were done by another process
    assert not errors, errors
    assert total < 16  # it was killed mid-run
    assert_same_tree(out, slow_clean)


def test_a_killed_cli_then_rerun_equals_a_clean_run(slow_inputs, slow_clean, tmp_path):
    out = tmp_path / "killed-cli"
    cmd = slow_cli(slow_inputs, out, "--quiet")
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.time() + 120
    while markers(out) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = markers(out)
    assert 0 < done < 16
    report = validate_dataset(str(out))
    assert not report.ok and report.incomplete and "blocks not committed" in report.summary()
    assert CliRunner().invoke(main, ["validate", str(out)]).exit_code == 1
    subprocess.run(cmd, check=True, timeout=300)
    assert_same_tree(out, slow_clean)
    assert CliRunner().invoke(main, ["validate", str(out)]).exit_code == 0


def test_ctrl_c_at_a_terminal_stops_quietly_and_the_rerun_resumes(slow_inputs, slow_clean, tmp_path):
    """SIGINT to the whole process group (a terminal's Ctrl-C): no worker tracebacks, a short exit."""
    out = tmp_path / "ctrl-c"
    cmd = slow_cli(slow_inputs, out)
    proc = subprocess.Popen(cmd + ["--quiet"], start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while markers(out) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    said = proc.communicate(timeout=30)[0].decode()
    # -q: not a warning either (the closing cluster's workers logged each cancelled block)
    assert proc.returncode == 1 and said.strip() == "Aborted!", said
    assert 0 < markers(out) < 16
    subprocess.run(cmd + ["--quiet"], check=True, timeout=300)
    assert_same_tree(out, slow_clean)


def test_resume_skips_committed_blocks_and_refuses_other_parameters(client, tmp_path):
    out = tmp_path / "resume"
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, client=client)
    clean = tree(out)
    # Simulate a run killed after some blocks: blocks 2 (chips 4, 5, 11, 12) and 5 (16, 17, 23, 24)
    # uncommitted.
    (out / "map.txt").unlink()
    (out / ".chipflow/blocks/0000002.json").unlink()
    (out / ".chipflow/blocks/0000005.json").unlink()
    # ... whose writers died mid-file: one chip gone, one cut short, one label cut short
    (out / "images" / "000000012.tif").unlink()
    half = out / "images" / "000000011.tif"
    half.write_bytes(half.read_bytes()[:5000])
    label = next((out / "labels").glob("000000016.*"))
    label.write_bytes(label.read_bytes()[:10])
    (out / ".chipflow" / ".params.json.deadbeef.tmp").write_bytes(b"half")  # an atomic put's temp file
    before = {p.name: p.stat().st_mtime_ns for p in (out / "labels").iterdir()}
    assert not validate_dataset(str(out)).ok

    class Recorder:  # the progress of the rerun: its two blocks, not the committed ones
        def start(self, **kw):
            self.started, self.updates = kw, []

        def update(self, **kw):
            self.updates.append(kw)

        def finish(self):
            pass

    progress = Recorder()
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, client=client, progress=progress)
    assert tree(out) == clean
    assert progress.started["blocks"] == len(progress.updates) == 2
    assert progress.started["chips"] == sum(u["chips_planned"] for u in progress.updates) > 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "labels").iterdir()}
    rewritten = sorted(n for n in before if after[n] != before[n])
    assert rewritten and len(rewritten) < len(before)  # only the two uncommitted blocks ran
    with pytest.raises(chipflow.OutputError, match=r"different parameters \(parameters.stride_x: 128 → 256\)"):
        chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, stride_x=256, client=client)
    from chipflow.store import _differences  # a long list (the planned blocks) is shown by its length

    said = _differences({"blocks": list(range(100)), "x": [1, 2]}, {"blocks": list(range(40)), "x": [1, 3]})
    assert said == "blocks: [0, 1, 2, ..., 99] (100 items) → [0, 1, 2, ..., 39] (40 items), x: [1, 2] → [1, 3]"
    r = chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, stride_x=256,
                                      overwrite=True, client=client)
    assert r.num_chips == len(list((out / "images").glob("*.tif"))) == 4 * 7


def test_overwrite_refuses_to_empty_a_folder_holding_the_inputs(tmp_path):
    """``overwrite`` empties ``out_folder``: inputs inside it would be deleted before being read."""
    import shutil

    for out in (tmp_path / "here", tmp_path):  # inputs in the folder, or in a subfolder of it
        data = tmp_path / "here"
        data.mkdir(exist_ok=True)
        raster, vector = shutil.copy(KAMPALA_IMAGE, data), shutil.copy(KAMPALA_BUILDINGS, data)
        before = sorted(p.name for p in out.iterdir())
        for kw, name in (({}, "in_raster"), ({"in_raster": KAMPALA_IMAGE}, "in_class_data"),
                         ({"in_raster": KAMPALA_IMAGE, "in_class_data": KAMPALA_BUILDINGS,
                           "in_mask_polygons": vector}, "in_mask_polygons")):
            args = {"in_raster": raster, "in_class_data": vector} | kw
            with pytest.raises(chipflow.InvalidParameterError,
                               match=rf"out_folder='{out}'.* holds {name}=.*overwrite=True would delete it"):
                chipflow.export_training_data(args.pop("in_raster"), out, args.pop("in_class_data"),
                                              overwrite=True, **args)
            assert sorted(p.name for p in out.iterdir()) == before, name
    res = CliRunner().invoke(main, ["export", raster, str(tmp_path), "--in-class-data", vector, "--overwrite"])
    assert res.exit_code == 2 and "overwrite=True would delete it" in res.output
    assert (data / "image.tif").exists()
    # without overwrite, the refusal says what to do, not to pass --overwrite (which is refused too)
    res = CliRunner().invoke(main, ["export", raster, str(data), "--in-class-data", vector])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        f"chipflow: error: Invalid out_folder='{data}': holds in_raster='{raster}'; write the dataset to a "
        "folder that holds none of the inputs"]
    assert sorted(p.name for p in data.iterdir()) == ["buildings.geojson", "image.tif"]


def test_a_run_still_starting_in_the_folder_is_named_not_called_foreign(tmp_path):
    """Another export's run folder before its run file: the advice is to wait, not only to overwrite."""
    (tmp_path / "o" / ".chipflow" / "blocks").mkdir(parents=True)
    (tmp_path / "o" / "images").mkdir()
    with pytest.raises(chipflow.OutputError, match=r"another export may be starting in it right now"):
        Store(str(tmp_path / "o")).open_run({"a": 1}, ["images"], overwrite=False)
    assert sorted(os.listdir(tmp_path / "o")) == [".chipflow", "images"]


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2]", b"\xff\xfe"], ids=["syntax", "a list", "bytes"])
def test_a_damaged_run_file_is_reported_not_a_traceback(client, tmp_path, damage):
    """A damaged ``.chipflow/params.json``: export refuses the folder (exit 2) naming it and the file,
    and changes nothing; validate reports it as a problem; stats refuses it in one line."""
    out = tmp_path / "o"
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, stride_x=512, stride_y=512, client=client)
    (out / ".chipflow" / "params.json").write_bytes(damage)
    before = tree(out)
    args = ["export", str(KAMPALA_IMAGE), str(out), "--in-class-data", str(KAMPALA_BUILDINGS),
            "--stride-x", "512", "--stride-y", "512", "--scheduler", client.scheduler.address]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    (line,) = res.output.strip().splitlines()
    assert line.startswith(f"chipflow: error: out_folder='{out}' holds a damaged chipflow run: "
                           ".chipflow/params.json ") and "--overwrite" in line
    assert tree(out) == before
    res = CliRunner().invoke(main, ["validate", str(out)])
    assert res.exit_code == 1 and "problem: out_folder=" in res.output and "Traceback" not in res.output
    assert "(4 images, 4 labels)" in res.output
    res = CliRunner().invoke(main, ["stats", str(out)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "params.json" in res.output
    res = CliRunner().invoke(main, [*args, "--overwrite"])  # the way out it names
    assert res.exit_code == 0 and json.loads((out / ".chipflow" / "params.json").read_text())


def test_a_file_never_appears_half_written(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    (tmp_path / "images").mkdir()
    store.put("images/a.tif", b"complete")

    def crash(src, dst):
        raise OSError("killed during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.put("images/b.tif", b"new bytes")
    with pytest.raises(OSError):
        store.put("images/a.tif", b"new bytes")
    assert not (tmp_path / "images" / "b.tif").exists()
    assert (tmp_path / "images" / "a.tif").read_bytes() == b"complete"


def test_a_full_disk_names_the_file_leaves_no_temporary_and_the_export_says_how_to_go_on(tmp_path, monkeypatch):
    import errno

    from chipflow.pipeline import _storage_error

    store = Store(str(tmp_path))
    (tmp_path / "images").mkdir()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)  # a chip written in place: os.write's error names no file
    with pytest.raises(OSError, match=r"No space left on device: '.*images/c\.tif'") as caught:
        store.put("images/c.tif", b"chip", atomic=False)
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", full)  # a metadata file: its temporary is removed
    with pytest.raises(OSError, match=r"No space left on device: '.*map\.txt'"):
        store.put("map.txt", b"images\\0.tif ")
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "map.txt").exists()
    said = _storage_error(caught.value, "/data/out")
    assert isinstance(said, chipflow.OutputError) and said.errno is None
    assert str(said).startswith("out_folder='/data/out' cannot be written: [Errno 28] No space left on device: ")
    assert str(said).endswith("rerun the same export to resume: the blocks already committed are kept")
    assert _storage_error(OSError(errno.ECONNRESET, "Connection reset"), "/data/out") is None  # not the folder's


def test_in_place_writes_leave_exactly_the_new_bytes_and_never_cut_a_file_first(tmp_path, monkeypatch):
    """Chip files (``atomic=False``): a rerun's bytes replace a longer or shorter file exactly."""
    store = Store(str(tmp_path))
    store.put("labels/new/x.xml", b"first version, long", atomic=False)  # makes the subfolder
    store.put("labels/new/x.xml", b"short", atomic=False)
    assert (tmp_path / "labels/new/x.xml").read_bytes() == b"short"
    store.put("labels/new/x.xml", b"longer than before", atomic=False)
    assert (tmp_path / "labels/new/x.xml").read_bytes() == b"longer than before"
    # a second writer of the same block dies before writing: the committed file is untouched
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        store.put("labels/new/x.xml", b"longer than before", atomic=False)
    assert (tmp_path / "labels/new/x.xml").read_bytes() == b"longer than before"
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(
    "name,expected",
    [("../../etc/passwd", ".._.._etc_passwd"), ("/abs/path", "_abs_path"), ("a\x00b", "a_b"),
     ("..", "_.."), (".", "_."), ("", "_"), ("CON", "_CON"), ("nul.txt", "_nul.txt"),
     ("C:\\Windows", "C__Windows"), ("Roof: flat?", "Roof_ flat_"), ("Gebäude", "Gebäude")],
)
def test_user_strings_in_paths_cannot_escape_the_output_folder(tmp_path, name, expected):
    safe = safe_name(name)
    assert safe == expected
    target = (tmp_path / safe).resolve()
    assert target.parent == tmp_path.resolve()


# ---- bad input: each refused before any output, naming the parameter and value ----

def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def bad_inputs(tmp: Path, make_raster) -> list[tuple[dict, type, str]]:
    corrupt = _write(tmp / "corrupt.tif", b"II*\x00garbage" * 100)
    truncated = _write(tmp / "truncated.tif", KAMPALA_IMAGE.read_bytes()[: 1_000_000])
    no_crs = make_raster(textured((3, 300, 300)), crs=None, name="nocrs.tif")
    shp = tmp / "nocrs.shp"
    with pytest.warns(UserWarning, match="crs"):
        gpd.GeoDataFrame(geometry=[box(0, 0, 1, 1)]).to_file(shp)
    far = tmp / "far.gpkg"
    gpd.GeoDataFrame(geometry=[box(0, 0, 1, 1)], crs=3857).to_file(far)
    empty_collection = _write(tmp / "empty.geojson", b'{"type": "FeatureCollection", "features": []}')
    empty_file = _write(tmp / "zero.geojson", b"")
    mixed = tmp / "mixed.geojson"
    gpd.GeoDataFrame(geometry=[box(3627860, 38760, 3627870, 38770), Point(3627880, 38780)],
                     crs=3857).to_file(mixed)
    blocker = _write(tmp / "a-file", b"x")
    with_null = gpd.read_file(KAMPALA_BUILDINGS)
    with_null["classvalue"] = pd.array([None if i == 3 else 1 for i in range(len(with_null))], dtype="Int64")
    return [
        ({"in_raster": tmp / "missing.tif"}, FileNotFoundError, r"in_raster='.*missing.tif' does not exist"),
        ({"in_raster": corrupt}, FileNotFoundError, r"in_raster='.*corrupt.tif' .*cannot be opened"),
        ({"in_raster": truncated}, ValueError, r"in_raster='.*truncated.tif' cannot be decoded"),
        ({"in_raster": no_crs}, ValueError, r"in_raster='.*nocrs.tif' has no coordinate reference system"),
        ({"in_class_data": shp}, ValueError, r"in_class_data='.*nocrs.shp' has no coordinate reference"),
        ({"in_class_data": far}, ValueError, r"in_class_data='.*far.gpkg' does not overlap .* map units"),
        ({"class_value_field": "height"}, ValueError, r"class_value_field='height' .*fields are \['osm_id'\]"),
        ({"tile_size_x": 2000}, ValueError, r"tile_size_x=2000.*larger than the raster \(1024 x 1024"),
        ({"stride_y": 0}, ValueError, r"stride_y=0"),
        ({"stride_x": -3}, ValueError, r"stride_x=-3"),
        ({"in_raster": NC / "landsat_multiband.tif", "in_class_data": NC / "landsat96_polygons.shp",
          "image_chip_format": "JPEG"}, ValueError, r"image_chip_format='JPEG'.*raster has 5"),
        ({"out_folder": blocker / "sub"}, OSError, r"out_folder='.*a-file/sub' cannot be written"),
        ({"in_class_data": empty_collection}, ValueError, r"in_class_data='.*empty.geojson' holds no"),
        ({"in_class_data": empty_file}, FileNotFoundError, r"in_class_data='.*zero.geojson'.*cannot be read"),
        ({"in_class_data": mixed}, ValueError, r"in_class_data='.*mixed.geojson' mixes geometry types "
                                                r"\(1 points, 1 polygons\)"),
        ({"metadata_format": "COCO_json"}, ValueError, r"metadata_format='COCO_json': must be one of"),
        ({"in_mask_polygons": far}, ValueError, r"in_mask_polygons='.*far.gpkg' does not overlap the raster"),
        ({"n_workers": -1}, ValueError, r"n_workers=-1: must be a whole number of worker processes >= 1"),
        ({"n_workers": 0}, ValueError, r"n_workers=0"),
        ({"overwrite": "maybe"}, ValueError, r"overwrite='maybe': must be TRUE or FALSE"),
        ({"rotation_angle": 0.001}, ValueError, r"rotation_angle=0.001: gives 360000 rotations of every chip"),
        ({"cell_size": 1000}, ValueError, r"tile_size_x=256: is larger than the raster \(1 x 1 pixels at "
                                          r"cell_size=1000.0\)"),
        ({"in_class_data": with_null, "class_value_field": "classvalue"}, ValueError,
         r"class_value_field='classvalue' holds no value in 1 of \d+ features \(the first: row 3\)"),
        ({"in_class_data": pd.DataFrame({"a": [1, 2]})}, ValueError,
         r"in_class_data=<DataFrame of 2 rows> must be a vector file path or a GeoDataFrame"),
    ]


def test_bad_input_is_refused_before_any_output(make_raster, tmp_path):
    for overrides, builtin, match in bad_inputs(tmp_path, make_raster):
        args = {"in_raster": KAMPALA_IMAGE, "out_folder": tmp_path / "out",
                "in_class_data": KAMPALA_BUILDINGS} | overrides
        with pytest.raises(chipflow.ChipflowError, match=match) as info:
            chipflow.export_training_data(args.pop("in_raster"), args.pop("out_folder"),
                                          args.pop("in_class_data"), **args)
        assert isinstance(info.value, builtin), (overrides, type(info.value))
        assert not (tmp_path / "out").exists(), overrides


def test_the_cli_reports_bad_input_in_one_line_with_status_2(tmp_path):
    res = CliRunner().invoke(main, ["export", str(KAMPALA_IMAGE), str(tmp_path / "o"),
                                    "--in-class-data", str(KAMPALA_BUILDINGS), "--stride-x", "0"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        "chipflow: error: Invalid stride_x=0: must be a whole number of pixels >= 1"]
    res = CliRunner().invoke(main, ["validate", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "out_folder=" in res.output
    (tmp_path / "a-file").write_bytes(b"x")
    for command in ("validate", "stats"):
        res = CliRunner().invoke(main, [command, str(tmp_path / "a-file")])
        assert res.exit_code == 2 and res.output.strip().splitlines() == [
            f"chipflow: error: Invalid out_folder='{tmp_path / 'a-file'}': is a file, not a dataset folder"], res.output


def test_a_long_lived_cluster_reads_a_replaced_raster_anew(client, make_raster, tmp_path):
    """Workers keep rasters open between tasks: a file replaced at the same path must be read again."""
    import shutil

    first, second = make_raster(textured((3, 256, 256), seed=1), name="a.tif"), \
        make_raster(textured((3, 256, 256), seed=2), name="b.tif")
    raster = tmp_path / "scene.tif"
    features = gpd.GeoDataFrame({"classvalue": [1]}, geometry=[box(500050, 3999600, 500100, 3999650)],
                                crs="EPSG:32633")
    for source, out in ((first, tmp_path / "one"), (second, tmp_path / "two")):
        shutil.copy(source, raster)
        chipflow.export_training_data(raster, out, features, stride_x=256, stride_y=256,
                                      output_nofeature_tiles="ALL_TILES", client=client)
        with rasterio.open(out / "images" / "000000000.tif") as chip, rasterio.open(source) as src:
            np.testing.assert_array_equal(chip.read(), src.read())


def test_a_cluster_lost_mid_run_is_reported_as_such_and_the_rerun_resumes(slow_inputs, slow_clean, tmp_path):
    """The client closed under a running export (as when its scheduler dies): a clear error, then a resume."""
    from distributed import Client

    class CloseAfterFirstBlock:
        def start(self, **_):
            pass

        def update(self, **_):
            if not closing.is_alive() and not closing.ident:
                closing.start()

        def finish(self):
            pass

    out = tmp_path / "lost"
    with chipflow.local_cluster(2, dashboard_address=None) as cluster, Client(cluster) as own:
        closing = threading.Thread(target=own.close)
        with pytest.raises(RuntimeError, match=r"lost the Dask cluster .*rerun the same export to resume"):
            chipflow.export_training_data(*slow_inputs[:1], out, slow_inputs[1], client=own,
                                          progress=CloseAfterFirstBlock(), **SLOW)
        closing.join()
    assert 0 < markers(out) < markers(slow_clean)
    chipflow.export_training_data(*slow_inputs[:1], out, slow_inputs[1], n_workers=1, **SLOW)
    assert_same_tree(out / "images", slow_clean / "images")


def test_overwrite_takes_true_and_false_spelled_as_words(client, tmp_path):
    """A YAML job's ``overwrite: "false"`` is False, never a non-empty (true) string."""
    out = tmp_path / "done"
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, metadata_format="KITTI_rectangles",
                                  stride_x=512, stride_y=512, client=client)
    before = tree(out)
    for no in ("false", "No", 0):
        with pytest.raises(chipflow.OutputError, match="different parameters"):
            chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, metadata_format="PASCAL_VOC_rectangles",
                                          stride_x=512, stride_y=512, overwrite=no, client=client)
    assert tree(out) == before
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, metadata_format="PASCAL_VOC_rectangles",
                                  stride_x=512, stride_y=512, overwrite="TRUE", client=client)
    assert (out / "labels" / "000000000.xml").exists()


def test_an_unreachable_scheduler_leaves_the_output_folder_alone(client, tmp_path):
    """The cluster is reached before ``overwrite`` empties the folder (or a new one is made)."""
    import dask

    out = tmp_path / "done"
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, stride_x=512, stride_y=512, client=client)
    before = tree(out)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        for folder in (out, tmp_path / "new"):
            with pytest.raises(chipflow.errors.ClusterError, match="scheduler='tcp://127.0.0.1:1' cannot be reached"):
                chipflow.export_training_data(KAMPALA_IMAGE, folder, KAMPALA_BUILDINGS, overwrite=True,
                                              scheduler="tcp://127.0.0.1:1")
    assert tree(out) == before
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("threads", [0, 2], ids=["inline (local disks)", "background threads (object stores)"])
def test_block_writes_all_land_and_their_errors_reach_the_block(tmp_path, monkeypatch, threads):
    """Every queued file lands; a failed write raises, at the latest from close() (before the commit marker)."""
    from chipflow.store import Writer

    monkeypatch.setattr(Writer, "THREADS", threads)
    store = Store(str(tmp_path))
    writer = Writer(store)
    assert (writer.threads is None) == (threads == 0)
    payloads = {f"images/{i:09d}.tif": os.urandom(1000 + i) for i in range(4 * Writer.MAX_PENDING + 10)}
    items = list(payloads.items())
    for i in range(0, len(items), 2):  # a chip's files go together: here image + "label"
        writer.put(items[i:i + 2])
    writer.close()
    assert {rel: (tmp_path / rel).read_bytes() for rel in payloads} == payloads
    (tmp_path / "blocker").write_bytes(b"a file where a folder must go")
    writer = Writer(store)
    writer.put([("images/ok.tif", b"fine")])
    with pytest.raises(OSError):
        writer.put([("blocker/x.tif", b"cannot be written")])
        writer.close()
    assert (tmp_path / "images/ok.tif").read_bytes() == b"fine"


@pytest.mark.parametrize(("address", "says"), [
    ("notanaddress", "missing port"), ("tpc://127.0.0.1:8786", "unknown address scheme 'tpc'"),
    ("http://127.0.0.1:8787", r"http:// is the dashboard's address"),
])
def test_a_malformed_scheduler_address_is_bad_input(tmp_path, address, says):
    with pytest.raises(chipflow.InvalidParameterError, match=rf"scheduler='{re.escape(address)}'.*{says}"):
        chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "o", KAMPALA_BUILDINGS, scheduler=address)
    result = CliRunner().invoke(main, ["export", str(KAMPALA_IMAGE), str(tmp_path / "o"), "--in-class-data",
                                       str(KAMPALA_BUILDINGS), "--scheduler", address])
    assert result.exit_code == 2 and f"scheduler='{address}'" in result.output
    assert not (tmp_path / "o").exists()


def test_a_cluster_without_workers_scales_up_or_is_refused_before_any_output(tmp_path):
    """An adaptive cluster at minimum=0 gets a worker for the export; a cluster that gets none is named."""
    import dask
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=0, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as c:
        with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
            with pytest.raises(chipflow.errors.ClusterError, match=r"has no worker: none joined within 2 s"):
                chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "none", KAMPALA_BUILDINGS,
                                              stride_x=512, stride_y=512, client=c)
        assert not (tmp_path / "none").exists()
        cluster.adapt(minimum=0, maximum=1)
        r = chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "adaptive", KAMPALA_BUILDINGS,
                                          stride_x=512, stride_y=512, client=c)
    assert r.num_chips > 0 and validate_dataset(tmp_path / "adaptive").ok


def test_a_relative_class_raster_is_read_by_workers_in_another_directory(client, tmp_path, monkeypatch):
    """Workers open a class raster themselves: its path is made absolute, as the raster's is."""
    import shutil

    shutil.copy(NC / "strata.tif", tmp_path / "strata.tif")
    monkeypatch.chdir(tmp_path)  # the workers' directory stays the repository's
    r = chipflow.export_training_data(NC / "landsat_multiband.tif", "out", "strata.tif",
                                      metadata_format="Classified_Tiles", tile_size_x=128, tile_size_y=128,
                                      stride_x=128, stride_y=128, client=client)
    assert r.num_chips > 0 and validate_dataset(tmp_path / "out").ok


def test_a_failed_export_leaves_nothing_on_a_long_lived_cluster(client, make_raster, tmp_path):
    """A block that fails (a damaged tile) cancels the export's tasks and class data on the user's client."""
    raster = make_raster(textured((1, 512, 512)), tiled=True)
    with rasterio.open(raster) as ds:
        offset = int(ds.get_tag_item("BLOCK_OFFSET_2_2", "TIFF", bidx=1))
        size = int(ds.get_tag_item("BLOCK_SIZE_2_2", "TIFF", bidx=1))
    data = bytearray(raster.read_bytes())
    data[offset:offset + size] = b"\xff" * size  # one tile of the middle damaged, as a cut download
    raster.write_bytes(bytes(data))
    features = gpd.GeoDataFrame({"value": [1]}, geometry=[box(500000, 3999000, 501024, 4000000)], crs="EPSG:32633")

    def tasks():
        return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))

    before = tasks()
    for attempt in range(2):
        with pytest.raises(chipflow.RasterError, match=rf"in_raster='{raster}': pixels \(256, 256\) to \(384, 384\) cannot be read \(.*TIFFReadEncodedTile.*\), 3 times"):
            chipflow.export_training_data(raster, tmp_path / f"o{attempt}", features, tile_size_x=128,
                                          tile_size_y=128, stride_x=128, stride_y=128, client=client)
    deadline = time.monotonic() + 10
    while tasks() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tasks() == before
    # from the command line: one line, exit 1 (found during the run, after blocks were written); no worker
    # tracebacks (the bad block is not retried by Dask either)
    features.to_file(tmp_path / "features.gpkg")
    done = subprocess.run([sys.executable, "-m", "chipflow", "export", "-q", str(raster), str(tmp_path / "cli"),
                           "--in-class-data", str(tmp_path / "features.gpkg"), "--tile-size-x", "128",
                           "--tile-size-y", "128", "--n-workers", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"chipflow: export failed: RasterError: in_raster='{raster}': pixels (256, 256) to "
                           "(384, 384) cannot be read")


def test_a_raster_modified_since_the_run_began_is_named_field_by_field(client, tmp_path):
    import shutil

    raster = tmp_path / "image.tif"
    shutil.copy(KAMPALA_IMAGE, raster)
    out = tmp_path / "o"
    chipflow.export_training_data(raster, out, KAMPALA_BUILDINGS, stride_x=512, stride_y=512, client=client)
    stamp = raster.stat().st_mtime_ns
    os.utime(raster, ns=(stamp + 10**9, stamp + 10**9))  # touched: the same bytes, a new time
    with pytest.raises(chipflow.OutputError, match=rf"in_raster\.items\[0\]\.mtime_ns: {stamp} → {stamp + 10**9}\) "
                                                   r"\(an input file was modified since that run began\)"):
        chipflow.export_training_data(raster, out, KAMPALA_BUILDINGS, stride_x=512, stride_y=512, client=client)


def test_stats_of_an_unfinished_run_says_how_far_it_got(client, tmp_path):
    out = tmp_path / "o"
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, stride_x=256, stride_y=256, client=client)
    blocks = sorted((out / ".chipflow" / "blocks").iterdir())
    for path in [out / "esri_accumulated_stats.json", out / "esri_model_definition.emd", *blocks[1:]]:
        path.unlink()  # as a run stopped after its first block
    res = CliRunner().invoke(main, ["stats", str(out)])
    assert res.exit_code == 2
    assert res.output.strip() == (f"chipflow: error: out_folder='{out}' holds an unfinished chipflow run (1 of "
                                  f"{len(blocks)} blocks written, no statistics yet): rerun the same export to "
                                  "finish it")


def _fail_the_first_read():
    """On a worker: the next window read raises as a dropped connection would, once."""
    import rasterio.errors

    import chipflow.sources as sources

    real, state = sources._read_window, {"failed": False}

    def flaky(source, window):
        if not state["failed"]:
            state["failed"] = True
            raise rasterio.errors.RasterioIOError("simulated transient read failure (HTTP 503)")
        return real(source, window)

    sources._read_window = flaky


def test_a_read_that_fails_once_is_tried_again(tmp_path):
    """A transient error (an object store's 503) costs a second read, not the export."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as c:
        c.run(_fail_the_first_read)
        r = chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "o", KAMPALA_BUILDINGS, stride_x=256,
                                          stride_y=256, client=c)
    assert r.num_chips > 0 and validate_dataset(tmp_path / "o").ok
