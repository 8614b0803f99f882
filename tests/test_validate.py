"""``chipflow validate`` accepts every format's complete output and catches what breaks it."""

from __future__ import annotations

import pytest
from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE

import chipflow
from chipflow import formats
from chipflow.validate import validate_dataset


@pytest.mark.parametrize("name", formats.names())
def test_every_format_validates_complete(client, tmp_path, name):
    fmt = formats.get(name)
    out = tmp_path / name
    r = chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS if fmt.needs_labels else None,
                                      metadata_format=name, tile_size_x=512, tile_size_y=512,
                                      stride_x=512, stride_y=512, client=client)
    assert r.num_chips > 0
    report = validate_dataset(str(out))
    assert report.ok, report.summary()
    assert report.images == r.num_chips
    if fmt.per_chip_labels and fmt.instances:  # a mask map.txt names, deleted: not "at most the counts"
        first = (out / "map.txt").read_text().splitlines()[0].split("  ")[1].strip().replace("\\", "/")
        kept = (out / first).read_bytes()
        (out / first).unlink()
        broken = validate_dataset(str(out))
        assert not broken.ok and f"map.txt names {first}" in broken.summary(), broken.summary()
        (out / first).write_bytes(kept)
    if fmt.per_chip_labels:  # a label file no chip has (a chip deleted by hand, another run's leftovers)
        some = next(p for p in sorted((out / "labels").rglob("*")) if p.is_file())
        stray = some.with_name("999999999" + some.name[9:])
        stray.write_bytes(some.read_bytes())
        broken = validate_dataset(str(out))
        assert not broken.ok and "1 label files have no chip, e.g. labels/" in broken.summary(), broken.summary()
        stray.unlink()
        assert validate_dataset(str(out)).ok
    if fmt.per_chip_labels and not fmt.instances:
        victim = next(p for p in sorted((out / "labels").rglob("*")) if p.is_file())
        victim.write_bytes(b"<annotation><object>\xff\x00 1 2")  # cut short and garbled
        broken = validate_dataset(str(out))
        assert not broken.ok and f"{victim.name} does not parse" in broken.summary(), broken.summary()
        victim.unlink()
        broken = validate_dataset(str(out))
        assert not broken.ok and "has no label file" in broken.summary()
    if fmt.dataset_file:  # COCO's annotations.json, YOLO's data.yaml: cut short, then gone
        whole = out / fmt.dataset_file
        whole.write_bytes(whole.read_bytes()[:-2])
        broken = validate_dataset(str(out))
        assert not broken.ok and f"{fmt.dataset_file} does not parse" in broken.summary(), broken.summary()
        whole.unlink()
        broken = validate_dataset(str(out))
        assert broken.incomplete == [f"{fmt.dataset_file} is missing"], broken.summary()


def test_coco_and_yolo_dataset_files_must_agree_with_the_chips(client, tmp_path):
    import json

    import yaml

    out = tmp_path / "coco"
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, metadata_format="COCO",
                                  stride_x=256, stride_y=256, client=client)
    coco = json.loads((out / "annotations.json").read_text())
    coco["images"][0]["file_name"] = "images/nowhere.tif"
    (out / "annotations.json").write_text(json.dumps(coco))
    summary = validate_dataset(str(out)).summary()
    assert "annotations.json names images/nowhere.tif, which is not a chip" in summary, summary
    out = tmp_path / "yolo"
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, metadata_format="YOLO",
                                  stride_x=256, stride_y=256, client=client)
    data = yaml.safe_load((out / "data.yaml").read_text())
    data["names"] = {0: "not the class"}
    (out / "data.yaml").write_text(yaml.safe_dump(data))
    summary = validate_dataset(str(out)).summary()
    assert "data.yaml names {0: 'not the class'}, the emd's classes are {0: '1'}" in summary, summary


def test_class_names_with_spaces_in_map_txt_paths(client, tmp_path):
    """Columns of map.txt are separated by two spaces; a class folder may hold one (Imagenet)."""
    import geopandas as gpd

    named = gpd.read_file(KAMPALA_BUILDINGS).assign(classname="metal roof")
    out = tmp_path / "inet"
    with pytest.warns(chipflow.ChipflowWarning, match="1 of 98 features over the raster get no chip"):
        r = chipflow.export_training_data(KAMPALA_IMAGE, out, named, metadata_format="Imagenet", client=client)
    assert (out / "map.txt").read_text().startswith("images\\metal roof\\")
    report = validate_dataset(str(out))
    assert report.ok and report.images == r.num_chips, report.summary()


def test_export_tiles_writes_no_labels_folder(client, tmp_path):
    out = tmp_path / "et"
    chipflow.export_training_data(KAMPALA_IMAGE, out, metadata_format="Export_Tiles", stride_x=512,
                                  stride_y=512, client=client)
    assert not (out / "labels").exists()  # arcgis.learn would read a labels/ folder as Pix2Pix
    assert (out / "map.txt").read_text().splitlines()[0] == "images\\000000000.tif "
    with pytest.raises(chipflow.InvalidParameterError, match=r"in_class_data=None: is required"):
        chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "x", metadata_format="KITTI_rectangles")


def test_labels_are_counted_when_the_metadata_that_names_their_format_is_missing(client, tmp_path):
    """An interrupted run (no map.txt or emd yet) still reports the chips that have label files."""
    out = tmp_path / "o"
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, stride_x=512, stride_y=512,
                                  metadata_format="RCNN_Masks", client=client)
    labelled = {p.stem for p in (out / "labels").rglob("*.tif")}
    for name in ("map.txt", "esri_model_definition.emd"):
        (out / name).unlink()
        report = validate_dataset(str(out))
        assert not report.ok and (report.images, report.labels) == (4, len(labelled)) and len(labelled) > 0


def test_png_class_rasters_validate_without_a_warning_per_label(client, tmp_path):
    """PNG labels carry no georeferencing: reading them back is not worth a warning each."""
    import warnings

    out = tmp_path / "png"
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, stride_x=256, stride_y=256,
                                  metadata_format="Classified_Tiles", image_chip_format="PNG", client=client)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = validate_dataset(str(out))
    assert report.ok and report.labels == report.images > 0
