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
    if fmt.per_chip_labels and not fmt.instances:
        victim = next(p for p in sorted((out / "labels").rglob("*")) if p.is_file())
        victim.unlink()
        broken = validate_dataset(str(out))
        assert not broken.ok and "has no label file" in broken.summary()


def test_export_tiles_writes_no_labels_folder(client, tmp_path):
    out = tmp_path / "et"
    chipflow.export_training_data(KAMPALA_IMAGE, out, metadata_format="Export_Tiles", stride_x=512,
                                  stride_y=512, client=client)
    assert not (out / "labels").exists()  # arcgis.learn would read a labels/ folder as Pix2Pix
    assert (out / "map.txt").read_text().splitlines()[0] == "images\\000000000.tif "
    with pytest.raises(chipflow.InvalidParameterError, match=r"in_class_data=None: is required"):
        chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "x", metadata_format="KITTI_rectangles")
