"""chips.parquet: one row per chip, footprints that equal the chips' georeferencing."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import rasterio
from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE
from labels_io import chip_ids, read_voc

import chipflow


def test_chip_index_rows_and_footprints(client, tmp_path):
    out = tmp_path / "idx"
    r = chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, rotation_angle=180,
                                      stride_x=256, stride_y=256, metadata_format="PASCAL_VOC_rectangles",
                                      client=client)
    index = gpd.read_parquet(out / "chips.parquet")
    assert index.crs.to_epsg() == 3857
    assert index["chip_id"].tolist() == chip_ids(out) and len(index) == r.num_chips
    assert sorted(set(index["rotation"])) == [0.0, 180.0]
    for row in index.itertuples():
        with rasterio.open(out / row.image_path) as ds:
            corners = [ds.transform * c for c in [(0, 0), (256, 0), (256, 256), (0, 256)]]
        assert np.allclose(sorted(row.geometry.exterior.coords[:-1]), sorted(corners))
        names, _ = read_voc(out / row.label_path)
        assert row.features_1 == len(names)
        assert row.source.endswith("image.tif")
