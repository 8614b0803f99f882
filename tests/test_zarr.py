"""image_chip_format="ZARR": every chip in one Zarr v3 store, chips.zarr (chipflow.zarr_store)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import zarr
from affine import Affine
from click.testing import CliRunner
from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE, textured
from rasterio.windows import Window

import chipflow
from chipflow import formats, zarr_store
from chipflow.cli import main
from chipflow.errors import InvalidParameterError
from chipflow.grid import ChipGrid
from chipflow.validate import validate_dataset

REPO = Path(__file__).resolve().parent.parent
#: 49 chips of 256 px at stride 128 over the 1024 px sample, every one exported.
JOB = {"metadata_format": "Classified_Tiles", "output_nofeature_tiles": "ALL_TILES"}


def tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root``: relative path → bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def zarr_export(client, tmp_path_factory):
    out = tmp_path_factory.mktemp("zarr") / "out"
    result = chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, image_chip_format="ZARR",
                                           client=client, **JOB)
    return out, result


@pytest.fixture(scope="module")
def tiff_export(client, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiff") / "out"
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, client=client, **JOB)
    return out


def test_layout_metadata_and_index(zarr_export, tiff_export):
    out, result = zarr_export
    assert result.num_chips == 49 and result.paths["chips.zarr"] == str(out / "chips.zarr")
    assert sorted(p.name for p in out.iterdir()) == [
        ".chipflow", "chips.parquet", "chips.zarr", "esri_accumulated_stats.json", "esri_model_definition.emd",
        "map.txt", "stats.txt"]  # no images/ or labels/ folder: the class rasters are in the store
    group = zarr.open_group(out / "chips.zarr", mode="r")
    images, labels = group["images"], group["labels"]
    assert images.shape == (49, 3, 256, 256) and images.chunks == (1, 3, 256, 256) and images.dtype == np.uint8
    assert labels.shape == (49, 256, 256) and labels.chunks == (1, 256, 256) and labels.dtype == np.uint8
    assert images.metadata.zarr_format == 3
    with rasterio.open(KAMPALA_IMAGE) as src:
        assert rasterio.crs.CRS.from_wkt(group.attrs["crs_wkt"]) == src.crs
    assert group.attrs["band_names"] == ["Red", "Green", "Blue"]
    assert group.attrs["tile_size"] == [256, 256] and group.attrs["metadata_format"] == "Classified_Tiles"
    # map.txt names the chips in the store; the statistics are those of the TIFF export
    lines = (out / "map.txt").read_text().splitlines()
    assert lines[0] == "chips.zarr#images[0]  chips.zarr#labels[0] " and len(lines) == 49
    for name in ("esri_accumulated_stats.json", "stats.txt"):
        assert (out / name).read_bytes() == (tiff_export / name).read_bytes()
    emd, tiff_emd = (json.loads((o / "esri_model_definition.emd").read_text()) for o in (out, tiff_export))
    assert emd == tiff_emd
    # chips.parquet: where each chip is, and its georeferencing (the TIFF chip's transform)
    index = gpd.read_parquet(out / "chips.parquet")
    assert index["image_path"].tolist() == [f"chips.zarr#images[{i}]" for i in range(49)]
    assert index["label_path"].tolist() == [f"chips.zarr#labels[{i}]" for i in range(49)]
    tiff_index = gpd.read_parquet(tiff_export / "chips.parquet")
    assert index.geometry.equals(tiff_index.geometry)
    for row in tiff_index.itertuples():
        with rasterio.open(tiff_export / row.image_path) as chip:
            assert Affine(*index.loc[row.Index, "transform"]) == chip.transform == Affine(*row.transform)


def test_every_chip_equals_its_source_window(zarr_export):
    out, _ = zarr_export
    images = zarr.open_group(out / "chips.zarr", mode="r")["images"]
    index = gpd.read_parquet(out / "chips.parquet")
    grid = ChipGrid(1024, 1024, 256, 256, 128, 128)
    with rasterio.open(KAMPALA_IMAGE) as src:
        for row in index.itertuples():
            r, c = divmod(row.chip_id, grid.n_cols)  # chip id → grid position
            x0, y0 = int(grid.xs[c]), int(grid.ys[r])
            assert ~src.transform * (Affine(*row.transform) * (0, 0)) == pytest.approx((x0, y0))
            window = src.read(window=Window(x0, y0, 256, 256))
            np.testing.assert_array_equal(images[row.chip_id], window)


def test_classified_tiles_labels_equal_the_tiff_export(zarr_export, tiff_export):
    out, _ = zarr_export
    group = zarr.open_group(out / "chips.zarr", mode="r")
    tiffs = sorted((tiff_export / "labels").glob("*.tif"))
    assert len(tiffs) == 49
    covered = 0
    for path in tiffs:
        chip_id = int(path.stem)
        with rasterio.open(path) as label:
            expected = label.read(1)
        np.testing.assert_array_equal(group["labels"][chip_id], expected)
        with rasterio.open(tiff_export / "images" / f"{path.stem}.tif") as image:
            np.testing.assert_array_equal(group["images"][chip_id], image.read())
        covered += int((expected > 0).sum())
    assert covered > 0  # the sample's buildings are in the labels


def test_validate_passes_and_catches_a_missing_chip(zarr_export, tmp_path):
    out, result = zarr_export
    report = validate_dataset(str(out))
    assert report.ok, report.summary()
    assert report.images == report.labels == result.num_chips
    done = CliRunner().invoke(main, ["validate", str(out)])
    assert done.exit_code == 0 and "complete" in done.output, done.output
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "chips.zarr" / "images" / "c.7.0.0.0").unlink()
    (broken / "chips.zarr" / "labels" / "c.9.0.0").unlink()
    summary = validate_dataset(str(broken)).summary()
    assert "map.txt lists 49 images, chips.zarr/images holds 48" in summary
    assert "have no labels chunk" in summary
    (broken / "chips.zarr" / "images" / "c.8.0.0.0").write_bytes(b"not zstd")
    assert "chips.zarr#images[8] does not decode" in validate_dataset(str(broken)).summary()


def test_a_resumed_run_gives_identical_bytes(zarr_export, client, tmp_path):
    clean, _ = zarr_export
    out = tmp_path / "resume"
    shutil.copytree(clean, out)
    # A run killed after some blocks: blocks 2 and 5 uncommitted, their chips half there.
    (out / "map.txt").unlink()
    (out / "chips.parquet").unlink()
    for block in (2, 5):
        (out / f".chipflow/blocks/{block:07d}.json").unlink()
    (out / "chips.zarr" / "images" / "c.12.0.0.0").unlink()
    (out / "chips.zarr" / "labels" / "c.12.0.0").write_bytes(b"half")
    assert not validate_dataset(str(out)).ok
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, image_chip_format="ZARR", client=client,
                                  **JOB)
    assert tree(out) == tree(clean)
    # and a rerun of the finished run changes nothing
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, image_chip_format="ZARR", client=client,
                                  **JOB)
    assert tree(out) == tree(clean)
    assert validate_dataset(str(out)).ok


@pytest.mark.parametrize("name", ["Labeled_Tiles", "Imagenet", "COCO", "YOLO", "YOLO_segmentation"])
def test_feature_chip_formats_and_those_naming_image_files_are_refused_before_any_output(tmp_path, name):
    """One chip per feature does not stack; COCO's file_name and YOLO's images/ would name no file."""
    out = tmp_path / "out"
    with pytest.raises(InvalidParameterError, match="image_chip_format") as err:
        chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, image_chip_format="zarr",
                                      metadata_format=name)
    assert err.value.parameter == "image_chip_format" and "ZARR" in str(err.value)
    assert not out.exists()
    done = CliRunner().invoke(main, ["export", str(KAMPALA_IMAGE), str(out), "--in-class-data",
                                     str(KAMPALA_BUILDINGS), "--image-chip-format", "ZARR",
                                     "--metadata-format", name])
    assert done.exit_code == 2 and not out.exists(), done.output


GRID_FORMATS = [n for n in formats.names() if not formats.get(n).feature_chips and not formats.get(n).image_files]


@pytest.mark.parametrize("name", GRID_FORMATS)
def test_every_grid_format_validates_with_zarr(client, tmp_path, name):
    fmt = formats.get(name)
    out = tmp_path / name
    r = chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS if fmt.needs_labels else None,
                                      metadata_format=name, image_chip_format="ZARR", tile_size_x=512,
                                      tile_size_y=512, stride_x=512, stride_y=512, client=client)
    assert r.num_chips > 0
    report = validate_dataset(str(out))
    assert report.ok, report.summary()
    assert report.images == r.num_chips
    assert not (out / "images").exists()
    assert ("labels" in zarr.open_group(out / "chips.zarr", mode="r")) == fmt.rasterize


def test_gaps_nodata_rotation_and_splits(client, make_raster, tmp_path):
    """uint16 with nodata, rotated chips, a split per folder: each split's store holds its chips."""
    data = textured((2, 384, 384), "uint16", seed=3) + 1
    data[:, :128, :128] = 0  # chip 0 is all nodata: not exported, a gap in the store
    raster = make_raster(data, nodata=0)
    out = tmp_path / "out"
    r = chipflow.export_training_data(raster, out, None, metadata_format="Export_Tiles", image_chip_format="ZARR",
                                      tile_size_x=128, tile_size_y=128, stride_x=128, stride_y=128,
                                      rotation_angle=180, split="a=0.5,b=0.5", split_block_size=1,
                                      client=client)
    index = gpd.read_parquet(out / "chips.parquet")
    assert len(index) == r.num_chips == 2 * 8  # 8 cells with data, each at 0° and 180°
    with rasterio.open(raster) as src:
        for split in ("a", "b"):
            chips = zarr_store.open_chips(str(out), f"{split}/")
            assert chips.images.shape == (18, 2, 128, 128) and chips.images.fill_value == 0
            rows = index[index["split"] == split]
            assert chips.chip_ids.tolist() == rows["chip_id"].tolist()
            assert rows["image_path"].tolist() == [f"{split}/chips.zarr#images[{i}]" for i in rows["chip_id"]]
            for row in rows.itertuples():
                x0, y0 = ~src.transform * (Affine(*row.transform) * (0, 0))
                window = src.read(window=Window(round(x0) - (128 if row.rotation else 0),
                                                round(y0) - (128 if row.rotation else 0), 128, 128))
                expected = window[:, ::-1, ::-1] if row.rotation else window  # 180°: flipped both ways
                np.testing.assert_array_equal(chips.images[row.chip_id], expected)
            assert validate_dataset(str(out / split)).ok, validate_dataset(str(out / split)).summary()
            assert (chips.images[0] == 0).all()  # the gap reads as the fill value
            named = zarr.open_group(str(out / split / "chips.zarr"), mode="r").attrs["chip_index"]
            assert (out / split / named).resolve() == (out / "chips.parquet").resolve()  # the index, found
    assert not (out / "chips.zarr").exists()


def test_the_read_benchmark_runs_quick(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "zarr_read.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "ratio zarr/tiff" in proc.stdout
    result = json.loads(out.read_text())
    assert result["exports"]["TIFF"]["chips"] == result["exports"]["ZARR"]["chips"] > 64


def test_an_s3_export_writes_the_same_store_and_validates(zarr_export, client):
    """Through zarr's FsspecStore: moto's S3 server on 127.0.0.1, options carried by the Store only."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    clean, _ = zarr_export
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
        boto = boto3.client("s3", endpoint_url=options["endpoint_url"], region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")
        boto.create_bucket(Bucket="zarr-out")
        url = "s3://zarr-out/kampala"
        r = chipflow.export_training_data(KAMPALA_IMAGE, url, KAMPALA_BUILDINGS, image_chip_format="ZARR",
                                          client=client, storage_options=options, **JOB)
        assert r.num_chips == 49
        keys = [o["Key"] for page in boto.get_paginator("list_objects_v2").paginate(Bucket="zarr-out")
                for o in page.get("Contents", [])]
        got = {k[len("kampala/"):]: boto.get_object(Bucket="zarr-out", Key=k)["Body"].read() for k in keys}
        assert got == tree(clean)  # byte for byte the local export, chips.zarr included
        report = validate_dataset(url, storage_options=options)
        assert report.ok and report.images == 49, report.summary()
    finally:
        server.stop()


def test_items_processed_separately_share_one_store(client, make_raster, tmp_path):
    first = make_raster(textured((1, 256, 384), "float32", seed=1), name="a.tif")
    second = make_raster(textured((1, 256, 256), "float32", seed=2), name="b.tif",
                         transform=Affine(2.0, 0, 600000.0, 0, -2.0, 4000000.0))
    out = tmp_path / "out"
    r = chipflow.export_training_data([str(first), str(second)], out, None, metadata_format="Export_Tiles",
                                      image_chip_format="ZARR", processing_mode="PROCESS_ITEMS_SEPARATELY",
                                      tile_size_x=128, tile_size_y=128, stride_x=128, stride_y=128, client=client)
    chips = zarr_store.open_chips(str(out))
    assert r.num_chips == 6 + 4 and chips.images.shape == (10, 1, 128, 128) and chips.images.dtype == np.float32
    index = gpd.read_parquet(out / "chips.parquet")
    assert chips.chip_ids.tolist() == index["chip_id"].tolist() == list(range(10))
    for row in index.itertuples():
        with rasterio.open(row.source) as src:
            x0, y0 = ~src.transform * (Affine(*row.transform) * (0, 0))
            window = src.read(window=Window(round(x0), round(y0), 128, 128))
        np.testing.assert_array_equal(chips.images[row.chip_id], window)
    assert validate_dataset(str(out)).ok
