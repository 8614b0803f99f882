"""Leak-free splits: whole spatial cells per split, overlapping chips never in two splits."""

from __future__ import annotations

import itertools
from pathlib import Path

import geopandas as gpd
import pytest
import rasterio
from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE
from shapely.geometry import box

import chipflow
from chipflow.validate import validate_dataset


def export(client, out, seed=0):
    return chipflow.export_training_data(
        KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, split="train=0.5,val=0.25,test=0.25", split_block_size=4,
        seed=seed, output_nofeature_tiles="ALL_TILES", metadata_format="PASCAL_VOC_rectangles", client=client)


def test_splits_are_whole_cells_and_complete_datasets(client, tmp_path):
    r = export(client, tmp_path / "s")
    # cells of 4 x 128 = 512 px: chips at x0 = 384 straddle the cell edge and are dropped (6 of 7 per axis)
    assert r.num_chips == 36
    index = gpd.read_parquet(tmp_path / "s" / "chips.parquet")
    assert sorted(index["chip_id"]) == sorted(row * 7 + col for row in range(7) for col in range(7)
                                              if row != 3 and col != 3)
    for name in ("train", "val", "test"):
        part = index[index["split"] == name]
        for path in part["image_path"]:
            assert (tmp_path / "s" / path).exists() and path.startswith(f"{name}/images/")
        if len(part):
            report = validate_dataset(str(tmp_path / "s" / name))
            assert report.ok, report.summary()
            assert report.images == len(part)
    assert sorted(r.paths) == ["chips.parquet", "test", "train", "val"]  # what the top folder holds
    assert all(Path(p).exists() for p in r.paths.values())
    # the whole folder validates: its run and every split, their images added up
    report = validate_dataset(str(tmp_path / "s"))
    assert report.ok and report.images == 36, report.summary()
    assert not (tmp_path / "s" / "images").exists()  # the chips are in the splits' folders only
    import json

    from click.testing import CliRunner

    from chipflow.cli import main

    shown = CliRunner().invoke(main, ["stats", str(tmp_path / "s"), "--json"])
    assert shown.exit_code == 0, shown.output
    per_split = json.loads(shown.output)
    assert sorted(per_split) == ["test", "train", "val"]
    assert sum(d["accumulated_stats"]["NumTiles"] for d in per_split.values()) == 36
    text = CliRunner().invoke(main, ["stats", str(tmp_path / "s")]).output
    assert all(f"{tmp_path / 's' / name}: PASCAL_VOC_rectangles" in text for name in per_split)
    (tmp_path / "s" / "val" / "map.txt").unlink()
    broken = validate_dataset(str(tmp_path / "s"))
    assert not broken.ok and "val: map.txt is missing" in broken.summary()
    for a, b in itertools.combinations(index.itertuples(), 2):
        if a.split != b.split:
            assert a.geometry.intersection(b.geometry).area == pytest.approx(0, abs=1e-6)
    cells = {(row // 4, col // 4): split for row, col, split in
             ((i // 7, i % 7, s) for i, s in zip(index["chip_id"], index["split"], strict=True))}
    assert len(cells) == 4  # every chip of a cell shares its split
    assert index.groupby(index["chip_id"].map(lambda i: (i // 7 // 4, i % 7 // 4)))["split"].nunique().max() == 1


def test_splits_are_deterministic_given_the_seed(client, tmp_path):
    a = gpd.read_parquet(export(client, tmp_path / "a").paths["chips.parquet"])
    b = gpd.read_parquet(export(client, tmp_path / "b").paths["chips.parquet"])
    assert a["split"].tolist() == b["split"].tolist()
    seeds = [gpd.read_parquet(export(client, tmp_path / f"s{s}", seed=s).paths["chips.parquet"])["split"].tolist()
             for s in (1, 2, 3)]
    assert any(s != a["split"].tolist() for s in seeds)


@pytest.mark.parametrize("kwargs,match", [
    ({"split": "train=0.8,val=0.3"}, r"split='train=0.8,val=0.3': fractions must sum to 1, not 1.1"),
    ({"split": "train=0,val=1"}, r"split='train=0,val=1': the fraction of 'train' must be above 0, not 0"),
    ({"split": "Train=0.5,train=0.5"}, r"names a split twice \('train', in any case: splits are folders\)"),
    ({"split": "a b=1"}, r"split name 'a b' must be letters, digits, _ and -"),
    ({"split": "train:1"}, r"split='train:1': must name splits and fractions, like 'train=0.8,val=0.1"),
    ({"split": "train=1", "split_block_size": 1}, r"split_block_size=1: gives split cells of 128 px"),
    ({"split": "train=1", "metadata_format": "COCO"}, r"split=\{'train': 1.0\}: is not supported with"),
])
def test_bad_split_parameters(tmp_path, kwargs, match):
    with pytest.raises(chipflow.InvalidParameterError, match=match):
        chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "o", KAMPALA_BUILDINGS, **kwargs)
    assert not (tmp_path / "o").exists()


def test_rotated_chips_read_no_pixel_of_another_splits_cell(client, tmp_path):
    """A chip turned by 45° reads past its window (a 256 px chip: 53 px each side): a position is kept
    only when every angle's chip stays within its split cell, so no two splits share a pixel; the
    plan counts the same chips."""
    from chipflow.config import make_config
    from chipflow.plan import plan_export

    kw = dict(split="train=0.5,val=0.25,test=0.25", split_block_size=4, seed=0, rotation_angle=45,
              output_nofeature_tiles="ALL_TILES", metadata_format="PASCAL_VOC_rectangles")
    r = chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "r", KAMPALA_BUILDINGS, client=client, **kw)
    index = gpd.read_parquet(tmp_path / "r" / "chips.parquet")
    assert len(index) == r.num_chips > 0 and set(index["rotation"]) == {0, 45, 90, 135, 180, 225, 270, 315}
    with rasterio.open(KAMPALA_IMAGE) as ds:
        raster = box(*ds.bounds)
    for a, b in itertools.combinations(index.itertuples(), 2):
        if a.split != b.split:  # footprints within the raster: past it there are no pixels
            shared = a.geometry.intersection(b.geometry).intersection(raster)
            assert shared.area == pytest.approx(0, abs=1e-6), (a.chip_id, b.chip_id)
    plan = plan_export(make_config(KAMPALA_IMAGE, "x", **kw), KAMPALA_BUILDINGS).describe()
    assert plan["expected_chips"] == r.num_chips
