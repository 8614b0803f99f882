"""chips.parquet: one row per chip, footprints that equal the chips' georeferencing."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
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


@pytest.mark.parametrize("crs", ["EPSG:32617", None], ids=["map space", "pixel space"])
@pytest.mark.parametrize("rows", [3, 0], ids=["chips", "no chips"])
def test_the_index_reads_back_as_geopandas_writes_it(tmp_path, crs, rows):
    """chipflow writes the GeoParquet itself (pyarrow): geopandas reads the same frame, CRS and all."""
    import io
    import json

    import pandas as pd
    import pyarrow.parquet as pq
    import pyproj
    import shapely
    from geopandas.testing import assert_geodataframe_equal

    from chipflow.index import _geoparquet

    transforms = np.arange(rows * 6, dtype=np.float64).reshape(rows, 6) + 0.5
    columns = {"chip_id": np.arange(rows, dtype=np.int64) * 7,
               "image_path": [f"train/images/{i:09d}.tif" for i in range(rows)],
               "label_path": [f"train/labels/{i:09d}.xml" for i in range(rows)],
               "source": ["/data/a.tif"] * rows, "rotation": np.linspace(0, 90, rows),
               "transform": transforms, "split": ["train"] * rows,
               "features_3": np.arange(rows, dtype=np.int32), "pixels_3": np.arange(rows, dtype=np.int64) * 9}
    polygons = shapely.box(np.arange(rows) * 256.0, 0, np.arange(rows) * 256.0 + 256, 256)
    wkt = None if crs is None else pyproj.CRS.from_user_input(crs).to_wkt()
    data = _geoparquet(columns, polygons, wkt)
    mine = gpd.read_parquet(io.BytesIO(data))
    frame = gpd.GeoDataFrame(pd.DataFrame({**columns, "transform": list(transforms)}), geometry=list(polygons),
                             crs=wkt)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    theirs = gpd.read_parquet(io.BytesIO(buf.getvalue()))
    assert list(mine.columns) == list(theirs.columns)
    assert (mine.crs is None) == (crs is None) and (crs is None or mine.crs.equals(pyproj.CRS(crs)))
    for name in ("transform",):  # lists of floats: compared row by row
        assert [list(t) for t in mine.pop(name)] == [list(t) for t in theirs.pop(name)] == transforms.tolist()
    assert_geodataframe_equal(mine, theirs, check_dtype=rows > 0)
    geo = json.loads(pq.read_schema(io.BytesIO(data)).metadata[b"geo"])["columns"]["geometry"]
    assert geo["encoding"] == "WKB" and ("crs" in geo) and (geo["crs"] is None) == (crs is None)
