"""End-to-end exports on real data and on rasters built in code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE, NC, textured
from labels_io import chip_ids, read_kitti, read_voc, source_window
from pyproj import Transformer
from shapely.geometry import Polygon, box

import chipflow
from chipflow.config import make_config
from chipflow.plan import plan_export

T = Affine(2.0, 0, 500000.0, 0, -2.0, 4000000.0)  # synthetic rasters: 2 m pixels, EPSG:32633


def px_polygon(coords: list[tuple[float, float]]) -> Polygon:
    """A polygon given in pixel (col, row) coordinates, placed in map coordinates with ``T``."""
    return Polygon([T * c for c in coords])


@pytest.fixture(scope="module")
def kampala_voc(client, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kampala") / "voc"
    chipflow.export_training_data(
        str(KAMPALA_IMAGE), str(out), str(KAMPALA_BUILDINGS),
        metadata_format="PASCAL_VOC_rectangles", client=client,
    )
    return out


def test_every_chip_equals_its_source_window(kampala_voc):
    ids = chip_ids(kampala_voc)
    assert ids
    for i in ids:
        chip, window = source_window(kampala_voc / "images" / f"{i:09d}.tif", KAMPALA_IMAGE)
        np.testing.assert_array_equal(chip, window)


def test_hand_computed_boxes_including_one_cut_by_the_chip_edge(client, make_raster, tmp_path):
    raster = make_raster(textured((3, 512, 512)))
    features = gpd.GeoDataFrame(
        {"classvalue": [1, 2, 1]},
        geometry=[
            px_polygon([(50, 50), (100, 50), (100, 100), (50, 100)]),  # inside chip (0, 0)
            px_polygon([(200, 10), (300, 10), (200, 60)]),  # triangle cut by x = 256
            px_polygon([(12.3456, 300), (40, 300), (40, 340.005), (12.3456, 340.005)]),
        ],
        crs="EPSG:32633",
    )
    for fmt, reader, ext in (("PASCAL_VOC_rectangles", read_voc, "xml"),
                             ("KITTI_rectangles", read_kitti, "txt")):
        out = tmp_path / fmt
        chipflow.export_training_data(raster, out, features, metadata_format=fmt, stride_x=256,
                                      stride_y=256, client=client)
        # 2 x 2 chips of 256; ids row * 2 + col.
        names, boxes = reader(out / "labels" / f"000000000.{ext}")
        assert names == [1, 2]
        # The triangle's part left of x=256 is (200,10),(256,10),(256,32),(200,60): y reaches 60.
        np.testing.assert_allclose(boxes, [[50, 50, 100, 100], [200, 10, 256, 60]])
        names, boxes = reader(out / "labels" / f"000000001.{ext}")
        # Right part (256,10),(300,10),(256,32): its own box, not the clipped bbox (y 10..60).
        assert names == [2]
        np.testing.assert_allclose(boxes, [[0, 10, 44, 32]])
        names, boxes = reader(out / "labels" / f"000000002.{ext}")
        assert names == [1]
        # 12.3456 rounds to 12.35 (truncation would give 12.34); 340.005 - 256 = 84.005 → 84.01 or 84.00
        assert boxes[0][0] == 12.35
        assert boxes[0][2] == 40.0 and boxes[0][1] == 44.0
        assert not (out / "labels" / f"000000003.{ext}").exists()  # no feature there
        text = (out / "labels" / f"000000002.{ext}").read_text()
        assert "12.35" in text and "12.34" not in text


def test_a_feature_only_touching_a_chip_edge_is_not_in_that_chip(client, make_raster, tmp_path):
    """Map → pixel float noise must not turn a shared edge into a sliver of overlap.

    NEON OSBS_029's grid (0.1 m pixels near 3.3e6 m): this box's pixel rows are
    153 and 192 up to 4e-9 px, so a chip starting at row 192 used to get a
    0.00-high box and be exported for it.
    """
    t = Affine(0.1, 0, 404211.9, 0, -0.1, 3285142.9000000004)  # as the file stores it
    raster = make_raster(textured((3, 400, 400)), transform=t, crs="EPSG:32617")
    feature = box(404223.9, 3285123.7, 404227.9, 3285127.6000000006)  # pixels x 120-160, y 153-192
    assert (~t * (404227.9, 3285123.7))[1] != 192  # the noise this test is about
    features = gpd.GeoDataFrame({"classvalue": [1]}, geometry=[feature], crs="EPSG:32617")
    out = tmp_path / "kitti"
    chipflow.export_training_data(raster, out, features, metadata_format="KITTI_rectangles",
                                  tile_size_x=128, tile_size_y=128, stride_x=64, stride_y=64,
                                  client=client)
    n = (400 - 128) // 64 + 1  # chips per row
    # chips whose interior the box (120..160, 153..192) overlaps: rows at y 64 and 128, columns at 0, 64, 128
    expected = {row * n + col for row in (1, 2) for col in (0, 1, 2)}
    assert set(chip_ids(out)) == expected
    plan = plan_export(make_config(raster, "x", tile_size_x=128, tile_size_y=128, stride_x=64, stride_y=64),
                       features)
    assert plan.describe()["chips_with_features"] == plan.describe()["expected_chips"] == 6  # the same rule
    for i in expected:
        names, boxes = read_kitti(out / "labels" / f"{i:09d}.txt")
        (x0, y0, x1, y1), = boxes
        row, col = divmod(i, n)
        assert (x0, y0, x1, y1) == (max(120 - 64 * col, 0), max(153 - 64 * row, 0),
                                    min(160 - 64 * col, 128), min(192 - 64 * row, 128))


def _half_mask() -> gpd.GeoDataFrame:
    """The western half of the Kampala raster, in its CRS."""
    with rasterio.open(KAMPALA_IMAGE) as ds:
        b, crs = ds.bounds, ds.crs
    return gpd.GeoDataFrame(geometry=[box(b.left, b.bottom, (b.left + b.right) / 2, b.top)], crs=crs)


@pytest.mark.parametrize("kw", [
    {},
    {"in_mask_polygons": "half"},
    {"in_mask_polygons": "half", "output_nofeature_tiles": "ALL_TILES"},
    {"split": "train=0.5,val=0.5", "split_block_size": 2},
    {"split": "train=0.5,val=0.5", "split_block_size": 2, "output_nofeature_tiles": "ALL_TILES"},
    {"rotation_angle": 90, "stride_x": 256, "stride_y": 256},
    {"rotation_angle": 45, "tile_size_x": 64, "tile_size_y": 64, "stride_x": 48, "stride_y": 48},
    {"rotation_angle": 90, "tile_size_x": 96, "tile_size_y": 32, "stride_x": 64, "stride_y": 64},
    {"min_polygon_overlap_ratio": 0.9},
    pytest.param({"metadata_format": "Labeled_Tiles", "tile_size_x": 64, "tile_size_y": 64,
                  "split": "train=0.5,val=0.5", "split_block_size": 4},
                 marks=pytest.mark.filterwarnings("ignore:.* features over the raster get no chip")),
], ids=["features", "mask", "mask, all tiles", "split", "split, all tiles", "rotation", "rotation 45",
        "rotation of oblong chips", "overlap ratio", "feature chips, split"])
def test_the_plan_predicts_the_chips_an_export_writes(client, tmp_path, kw):
    """``chipflow plan``'s count applies the export's rules: interiors, mask polygons, split cells,
    angles (a rotated chip's own footprint), the overlap ratio."""
    kw = {k: (_half_mask() if v == "half" else v) for k, v in kw.items()}
    mask = kw.pop("in_mask_polygons", None)
    plan = plan_export(make_config(KAMPALA_IMAGE, "x", **kw), KAMPALA_BUILDINGS, mask).describe()
    r = chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "o", KAMPALA_BUILDINGS, in_mask_polygons=mask,
                                      client=client, **kw)
    assert plan["expected_chips"] == r.num_chips > 0 and plan["expected_chips_upper_bound"] is True


def test_all_tiles_count_follows_the_grid_formula(client, tmp_path):
    with rasterio.open(KAMPALA_IMAGE) as ds:
        w, h = ds.width, ds.height
    for tile, stride in ((256, 128), (256, 200), (300, 250)):
        out = tmp_path / f"t{tile}s{stride}"
        r = chipflow.export_training_data(
            KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, tile_size_x=tile, tile_size_y=tile,
            stride_x=stride, stride_y=stride, output_nofeature_tiles="all_tiles", client=client,
        )
        expected = ((w - tile) // stride + 1) * ((h - tile) // stride + 1)
        assert r.num_chips == expected == len(chip_ids(out))


def test_only_tiles_with_features_keeps_exactly_the_chips_a_feature_intersects(client, tmp_path):
    buildings = gpd.read_file(KAMPALA_BUILDINGS).to_crs(3857)
    with rasterio.open(KAMPALA_IMAGE) as ds:
        t, w, h = ds.transform, ds.width, ds.height
    extent = box(t.c, t.f + h * t.e, t.c + w * t.a, t.f)
    some = buildings[buildings.intersects(extent)].iloc[::9]  # a sparse subset: some chips empty
    out = tmp_path / "only"
    r = chipflow.export_training_data(KAMPALA_IMAGE, out, some, tile_size_x=200, tile_size_y=200,
                                      stride_x=150, stride_y=150, client=client)
    n = (1024 - 200) // 150 + 1
    expected = set()
    for row in range(n):
        for col in range(n):
            x0, y0 = t * (col * 150, row * 150)
            x1, y1 = t * (col * 150 + 200, row * 150 + 200)
            chip = box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            if (shapely.area(shapely.intersection(some.geometry.values, chip)) > 0).any():
                expected.add(row * n + col)
    assert 0 < len(expected) < n * n
    assert set(chip_ids(out)) == expected
    assert r.num_chips == len(expected)


def test_labels_are_reprojected_from_4326(kampala_voc):
    """A building fully inside chip 0, projected by hand with pyproj."""
    buildings = gpd.read_file(KAMPALA_BUILDINGS)
    assert buildings.crs.to_epsg() == 4326
    with rasterio.open(KAMPALA_IMAGE) as ds:
        inv = ~ds.transform
    to_3857 = Transformer.from_crs(4326, 3857, always_xy=True)
    checked = 0
    for geom in buildings.geometry:
        xs, ys = to_3857.transform(*np.array(geom.exterior.coords).T)
        cols, rows = inv * (np.asarray(xs), np.asarray(ys))
        row, col = int(rows.min() // 128), int(cols.min() // 128)
        x0, y0 = col * 128, row * 128
        if rows.min() < 0 or cols.min() < 0 or rows.max() > y0 + 256 or cols.max() > x0 + 256:
            continue  # not fully inside one chip
        if row > 6 or col > 6:
            continue
        expected = np.round([cols.min() - x0, rows.min() - y0, cols.max() - x0, rows.max() - y0], 2)
        _, boxes = read_voc(kampala_voc / "labels" / f"{row * 7 + col:09d}.xml")
        assert np.abs(boxes - expected).max(axis=1).min() <= 0.011
        checked += 1
    assert checked >= 20


def test_metadata_files_agree_with_the_files(kampala_voc):
    out = kampala_voc
    ids = chip_ids(out)
    lines = (out / "map.txt").read_text().splitlines(keepends=True)
    assert len(lines) == len(ids)
    assert lines[0] == f"images\\{ids[0]:09d}.tif  labels\\{ids[0]:09d}.xml \n"
    for line in lines:
        image, label = line.split()
        assert (out / image.replace("\\", "/")).exists() and (out / label.replace("\\", "/")).exists()
    stats = json.loads((out / "esri_accumulated_stats.json").read_text())
    emd = json.loads((out / "esri_model_definition.emd").read_text())
    assert stats["MetaDataMode"] == emd["MetaDataMode"] == "PASCAL_VOC_rectangles"
    assert stats["NumTiles"] == len(ids)
    n_objects = sum(len(read_voc(out / "labels" / f"{i:09d}.xml")[0]) for i in ids)
    assert stats["FeatureStats"]["NumFeaturesPerClass"] == [n_objects]
    assert stats["FeatureStats"]["NumImagesPerClass"] == [len(ids)]
    assert emd["Classes"] == [{"Value": 1, "Name": "1", "Color": emd["Classes"][0]["Color"]}]
    assert len(emd["Classes"][0]["Color"]) == 3
    assert ' : ' in (out / "esri_model_definition.emd").read_text()
    # AllTilesStats: exact statistics of the exported chips' pixels (overlaps counted per chip).
    pixels = np.stack([rasterio.open(out / "images" / f"{i:09d}.tif").read() for i in ids])
    for b, band in enumerate(emd["AllTilesStats"]):
        values = pixels[:, b].astype(np.float64)
        assert band["Min"] == values.min() and band["Max"] == values.max()
        assert band["Mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert band["StdDev"] == pytest.approx(values.std(), rel=1e-12)
    assert (out / "stats.txt").read_text().startswith(f"images = {len(ids)} *3*256*256")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_one_and_two_workers_give_identical_trees(client, kampala_voc, tmp_path):
    from distributed import Client, LocalCluster

    out = tmp_path / "one"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as c1, \
         Client(c1) as one:
        chipflow.export_training_data(str(KAMPALA_IMAGE), str(out), str(KAMPALA_BUILDINGS),
                                      metadata_format="PASCAL_VOC_rectangles", client=one)
    a, b = _tree(out), _tree(kampala_voc)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_classified_tiles_match_an_independent_rasterization(client, make_raster, tmp_path):
    from rasterio.features import rasterize

    nodata = 0
    data = textured((3, 512, 512)) | 1  # no accidental nodata
    data[:, 400:, :100] = nodata  # a nodata corner: label 0 there
    raster = make_raster(data, nodata=nodata)
    features = gpd.GeoDataFrame(
        {"Value": [3, 7], "ClassName": ["roof", "pool"]},
        geometry=[px_polygon([(20, 20), (300, 20), (300, 200), (20, 200)]),
                  px_polygon([(10, 380), (120, 380), (120, 500), (10, 500)])],
        crs="EPSG:32633",
    )
    out = tmp_path / "ct"
    r = chipflow.export_training_data(raster, out, features, metadata_format="classified_tiles",
                                      output_nofeature_tiles="ALL_TILES", client=client)
    assert [c.name for c in r.classes] == ["roof", "pool"]
    total = np.zeros(2, np.int64)
    for i in chip_ids(out):
        with rasterio.open(out / "labels" / f"{i:09d}.tif") as lab:
            mask = lab.read(1)
            expected = rasterize(zip(features.geometry, features["Value"], strict=True), out_shape=mask.shape,
                                 transform=lab.transform, dtype=mask.dtype)
        chip, _ = source_window(out / "images" / f"{i:09d}.tif", raster)
        expected[(chip == nodata).all(axis=0)] = 0
        np.testing.assert_array_equal(mask, expected)
        total += [(mask == 3).sum(), (mask == 7).sum()]
    stats = json.loads((out / "esri_accumulated_stats.json").read_text())
    assert stats["ClassPixelStats"]["NumPixelsPerClass"] == total.tolist()
    emd = json.loads((out / "esri_model_definition.emd").read_text())
    assert [c["Value"] for c in emd["Classes"]] == [3, 7]


def test_chips_entirely_nodata_are_not_exported(client, make_raster, tmp_path):
    data = textured((1, 512, 512), "uint16") + 1
    data[:, :256, :256] = 0  # chip (0, 0) at stride 256 is all nodata
    raster = make_raster(data, nodata=0)
    features = gpd.GeoDataFrame(geometry=[box(*T * (0, 512), *T * (512, 0))], crs="EPSG:32633")
    out = tmp_path / "nd"
    r = chipflow.export_training_data(raster, out, features, stride_x=256, stride_y=256,
                                      output_nofeature_tiles="ALL_TILES", client=client)
    assert chip_ids(out) == [1, 2, 3] and r.num_chips == 3
    emd = json.loads((out / "esri_model_definition.emd").read_text())
    valid = data[0][data[0] != 0].astype(float)
    assert emd["AllTilesStats"][0]["Min"] == valid.min()
    assert emd["AllTilesStats"][0]["Mean"] == pytest.approx(valid.mean(), rel=1e-12)


def test_masked_pixels_are_nodata_when_the_raster_has_a_mask_but_an_alpha_band_is_a_band(client, tmp_path):
    """GDAL's per-dataset mask marks nodata as a nodata value does; a 4th band flagged alpha (GDAL's
    default for 4-band RGB GeoTIFFs, where it is often near infrared) is data like the others."""
    data = textured((4, 512, 512)) | 1  # no pixel is 0
    valid = np.ones((512, 512), bool)
    valid[:256, :256] = False  # chip (0, 0) at stride 256: wholly masked
    valid[256:300, 300:400] = False  # part of chip (1, 1)
    features = gpd.GeoDataFrame(geometry=[box(*T * (0, 512), *T * (512, 0))], crs="EPSG:32633")
    kw = dict(stride_x=256, stride_y=256, output_nofeature_tiles="ALL_TILES", client=client)
    profile = dict(driver="GTiff", width=512, height=512, dtype="uint8", crs="EPSG:32633", transform=T,
                   tiled=True, blockxsize=128, blockysize=128)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(tmp_path / "masked.tif", "w", count=3,
                                                                    **profile) as ds:
        ds.write(data[:3])
        ds.write_mask(valid.astype(np.uint8) * 255)
    r = chipflow.export_training_data(tmp_path / "masked.tif", tmp_path / "m", features, **kw)
    assert chip_ids(tmp_path / "m") == [1, 2, 3] and r.num_chips == 3
    with rasterio.open(tmp_path / "m" / "images" / "000000003.tif") as ds:
        chip = ds.read()
    part = valid[256:, 256:]
    assert (chip[:, ~part] == 0).all()  # masked pixels are 0 in the chip
    np.testing.assert_array_equal(chip[:, part], data[:3, 256:, 256:][:, part])
    emd = json.loads((tmp_path / "m" / "esri_model_definition.emd").read_text())
    for b in range(3):
        inside = data[b][valid].astype(float)
        assert emd["AllTilesStats"][b]["Min"] == inside.min()
        assert emd["AllTilesStats"][b]["Mean"] == pytest.approx(inside.mean(), rel=1e-12)

    rgbn = data.copy()
    rgbn[3][~valid] = 0  # the "alpha" band holds zeros where the mask was: still data
    with rasterio.open(tmp_path / "rgbn.tif", "w", count=4, photometric="RGB", alpha="YES", **profile) as ds:
        ds.write(rgbn)
        assert ds.colorinterp[3] == rasterio.enums.ColorInterp.alpha
    r = chipflow.export_training_data(tmp_path / "rgbn.tif", tmp_path / "n", features, **kw)
    assert r.num_chips == 4
    with rasterio.open(tmp_path / "n" / "images" / "000000000.tif") as ds:
        np.testing.assert_array_equal(ds.read(), rgbn[:, :256, :256])


def test_multiband_float_raster_with_nodata_keeps_dtype_and_values(client, tmp_path):
    out = tmp_path / "nc"
    r = chipflow.export_training_data(
        NC / "landsat_multiband.tif", out, NC / "landsat96_polygons.shp", class_value_field="ID",
        metadata_format="PASCAL_VOC_rectangles", tile_size_x=64, tile_size_y=64, stride_x=64,
        stride_y=64, client=client,
    )
    assert r.num_chips > 0 and len(r.classes) == 7
    for i in chip_ids(out):
        chip, window = source_window(out / "images" / f"{i:09d}.tif", NC / "landsat_multiband.tif")
        assert chip.dtype == np.float32 and chip.shape[0] == 5
        np.testing.assert_array_equal(chip, window)
    with rasterio.open(out / "images" / f"{chip_ids(out)[0]:09d}.tif") as ds:
        assert ds.nodata == -99999
    emd = json.loads((out / "esri_model_definition.emd").read_text())
    assert all(b["Min"] > 0 for b in emd["AllTilesStats"])  # -99999 ignored


@pytest.mark.parametrize("fmt,ext,world", [("PNG", "png", "pgw"), ("JPEG", "jpg", "jgw")])
def test_png_and_jpeg_chips_are_placed_by_world_file_and_aux_xml(client, tmp_path, fmt, ext, world):
    out = tmp_path / fmt
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, image_chip_format=fmt,
                                  stride_x=256, stride_y=256, client=client)
    ids = chip_ids(out, ext)
    assert ids
    with rasterio.open(KAMPALA_IMAGE) as src:
        for i in ids:
            row, col = divmod(i, 4)
            assert (out / "images" / f"{i:09d}.{world}").exists()
            assert (out / "images" / f"{i:09d}.{ext}.aux.xml").exists()
            with rasterio.open(out / "images" / f"{i:09d}.{ext}") as chip:
                assert chip.crs == src.crs
                assert chip.transform.almost_equals(src.transform @ Affine.translation(col * 256, row * 256))
                if fmt == "PNG":
                    window = rasterio.windows.Window(col * 256, row * 256, 256, 256)
                    np.testing.assert_array_equal(chip.read(), src.read(window=window))
    assert (out / "map.txt").read_text().startswith(f"images\\{ids[0]:09d}.{ext}  labels\\")


@pytest.mark.parametrize("policy,rows,cols", [("DROP", 1, 2), ("PAD", 2, 3), ("SHIFT", 2, 3)])
def test_edge_policies(client, make_raster, tmp_path, policy, rows, cols):
    data = textured((2, 300, 600), "uint16")
    raster = make_raster(data, nodata=None)
    features = gpd.GeoDataFrame(geometry=[box(*T * (0, 300), *T * (600, 0))], crs="EPSG:32633")
    out = tmp_path / policy
    r = chipflow.export_training_data(raster, out, features, tile_size_x=256, tile_size_y=256,
                                      stride_x=256, stride_y=256, edge_policy=policy, client=client,
                                      metadata_format="KITTI_rectangles")
    assert r.num_chips == rows * cols  # 300 x 600 pixels in chips of 256
    for i in chip_ids(out):
        chip, window = source_window(out / "images" / f"{i:09d}.tif", raster)
        np.testing.assert_array_equal(chip, window)  # PAD: zero fill beyond the edge
    _, boxes = read_kitti(out / "labels" / f"{cols - 1:09d}.txt")  # last chip of row 0
    width = {"DROP": 256, "PAD": 600 - 512, "SHIFT": 256}[policy]
    np.testing.assert_allclose(boxes, [[0, 0, width, 256]])


def test_planning_runs_without_cyclic_gc_and_restores_it(client, tmp_path, monkeypatch):
    """The client's planning pauses the cyclic collector (a full collection doubled it), then restores it."""
    import gc

    import chipflow.pipeline

    seen = []
    real = chipflow.pipeline.plan_export

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(chipflow.pipeline, "plan_export", spy)
    assert gc.isenabled()
    chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "out", KAMPALA_BUILDINGS, client=client,
                                  metadata_format="PASCAL_VOC_rectangles")
    assert seen == [False] and gc.isenabled()


def test_the_embedded_cluster_starts_while_the_client_plans(tmp_path, monkeypatch):
    """No client given: the LocalCluster comes up on a thread during the planning, and the export
    runs on it and closes it."""
    import threading

    import chipflow._dask
    import chipflow.pipeline

    monkeypatch.setattr(chipflow._dask, "_has_default_client", lambda: False)  # as in a fresh process
    seen, real_plan = [], chipflow.pipeline.plan_export

    def plan(*args, **kwargs):
        seen.append(any(t.name == "chipflow-cluster-start" for t in threading.enumerate()))
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(chipflow.pipeline, "plan_export", plan)
    made = []
    real_local = chipflow._dask._local_client
    monkeypatch.setattr(chipflow._dask, "_local_client", lambda *a: made.append(real_local(*a)) or made[-1])
    ticks = []
    real_run = chipflow.pipeline.run_blocks

    def run(client, *args, **kwargs):
        ticks.extend(client.run(_periodic_ms).values())
        return real_run(client, *args, **kwargs)

    monkeypatch.setattr(chipflow.pipeline, "run_blocks", run)
    result = chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "o", KAMPALA_BUILDINGS, n_workers=1,
                                           metadata_format="PASCAL_VOC_rectangles")
    assert seen == [True] and len(made) == 1 and made[0].status == "closed"
    assert ticks == [(200, 100)]  # chipflow.local_cluster's settings
    assert result.num_chips == len(list((tmp_path / "o" / "images").iterdir())) > 0


def _periodic_ms(dask_worker: Any) -> tuple[float, float | None]:
    """A worker's event-loop tick and profiler sampling intervals (ms); None: no profiler."""
    callbacks = dask_worker.periodic_callbacks
    return callbacks["tick"].callback_time, getattr(callbacks.get("profile"), "callback_time", None)


def test_local_cluster_does_less_periodic_work_and_leaves_the_callers_dask_config_alone():
    """chipflow.local_cluster: one single-threaded worker process per core; every server ticks
    every 200 ms (Dask: 20 ms) and workers sample their profile every 100 ms (Dask: 10 ms), while
    the process's own Dask config is unchanged."""
    import dask
    from distributed import Client, LocalCluster, Nanny

    before = dask.config.get("distributed")
    with chipflow.local_cluster(n_workers=2, dashboard_address=None) as cluster, Client(cluster) as c:
        assert dask.config.get("distributed") == before
        assert all(isinstance(w, Nanny) for w in cluster.workers.values())  # worker processes
        assert sorted(c.nthreads().values()) == [1, 1]
        assert set(c.run(_periodic_ms).values()) == {(200, 100)}
        assert cluster.scheduler.periodic_callbacks["tick"].callback_time == 200
        assert {w.periodic_callbacks["tick"].callback_time for w in cluster.workers.values()} == {200}
        c.restart()  # a worker the nanny starts again keeps the settings
        assert set(c.run(_periodic_ms).values()) == {(200, 100)}
    with chipflow.local_cluster(1, processes=False, dashboard_address=None) as threads, Client(threads) as c:
        assert set(c.run(_periodic_ms).values()) == {(200, 100)}  # workers in this process: the same
    assert dask.config.get("distributed") == before
    with LocalCluster(n_workers=1, processes=True, dashboard_address=None) as plain, Client(plain) as c:
        assert set(c.run(_periodic_ms).values()) == {(20, 10)}  # Dask's own defaults, for contrast


def test_a_failed_plan_closes_the_cluster_started_for_it_and_missing_inputs_start_none(tmp_path, monkeypatch):
    import chipflow._dask

    monkeypatch.setattr(chipflow._dask, "_has_default_client", lambda: False)
    made = []
    real_local = chipflow._dask._local_client
    monkeypatch.setattr(chipflow._dask, "_local_client", lambda *a: made.append(real_local(*a)) or made[-1])
    with pytest.raises(chipflow.LabelError, match="class_value_field='klass'"):
        chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "o", KAMPALA_BUILDINGS, n_workers=1,
                                      class_value_field="klass")
    assert len(made) == 1 and made[0].status == "closed" and made[0].cluster.status.name == "closed"
    assert not (tmp_path / "o").exists()
    with pytest.raises(FileNotFoundError, match="nope.gpkg"):  # fails at once: no cluster started
        chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "o", tmp_path / "nope.gpkg", n_workers=1)
    assert len(made) == 1


def _moments(seed: int) -> chipflow.stats.BlockResult:
    """A block result with one chip and band moments whose merged floats depend on the merge order."""
    rng = np.random.default_rng(seed)
    result = chipflow.stats.BlockResult(1, 2)
    result.set_rows([(seed, f"images/{seed:09d}.tif", f"labels/{seed:09d}.xml", np.array([seed % 3]),
                      np.array([0]))])
    result.add_band_moments(rng.integers(1, 1000, 2), rng.random(2) * 255, rng.random(2) * 1e5,
                            rng.random(2), rng.random(2) + 254)
    return result


def test_block_results_merge_in_one_fixed_tree_whatever_order_they_arrive_in():
    """The client merges each group of 8 (SPLIT_EVERY) as soon as its last result arrives, in the
    tree the block list alone shapes: the same bytes for any arrival order, and no result kept
    longer than its group needs it."""
    from chipflow._dask import SPLIT_EVERY, MergeTree
    from chipflow.stats import merge_all

    results = [_moments(i) for i in range(70)]
    level1 = [merge_all(*results[i:i + SPLIT_EVERY]) for i in range(0, 70, SPLIT_EVERY)]  # 9 nodes
    expected = merge_all(merge_all(*level1[:8]), merge_all(level1[8])).to_json()
    assert merge_all(*results).to_json() != expected  # a left fold's floats differ: the shape shows
    for order in (range(70), reversed(range(70)), np.random.default_rng(1).permutation(70)):
        tree = MergeTree(70)
        for i in order:
            assert tree.root() is None
            tree.add(int(i), results[i])
            if isinstance(order, range):  # in order, a group is merged and let go as it fills
                assert tree.held() <= 3 * (SPLIT_EVERY - 1) + 1
        assert tree.root().to_json() == expected
    in_order = MergeTree(70)
    for i in range(16):
        in_order.add(i, results[i])
    assert in_order.held() == 2  # two merged groups of 8, no leaf
    single = MergeTree(1)
    single.add(0, results[5])
    assert single.root() is results[5]
    with pytest.raises(ValueError, match="block 3 .* twice"):
        tree = MergeTree(9)
        tree.add(3, results[3])
        tree.add(3, results[3])


def test_the_cluster_runs_only_block_tasks_and_the_client_merges_their_results(client, tmp_path):
    """Only chipflow-block tasks reach the scheduler: their results come to the client as they
    finish and merge there, with no reduce tasks and no transfers between workers after the last
    block. The statistics are those of the fixed tree."""
    from distributed import get_task_stream

    from chipflow.config import make_config
    from chipflow.plan import plan_export

    kwargs = dict(metadata_format="PASCAL_VOC_rectangles", stride_x=64, stride_y=64)
    with get_task_stream(client) as stream:
        result = chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "d", KAMPALA_BUILDINGS,
                                               client=client, **kwargs)
    plan = plan_export(make_config(KAMPALA_IMAGE, str(tmp_path / "p"), **kwargs), KAMPALA_BUILDINGS)
    prefixes = {task["key"].split("-")[1] for task in stream.data}
    assert prefixes == {"block"}, prefixes
    assert len(stream.data) == len(plan.blocks) > 8  # more blocks than one group of the tree
    assert plan.describe()["tasks"] == len(plan.blocks)
    coco = plan_export(make_config(KAMPALA_IMAGE, str(tmp_path / "p"), **{**kwargs, "metadata_format": "COCO"}),
                       KAMPALA_BUILDINGS)
    assert coco.describe()["tasks"] == len(coco.blocks) + 1  # and one that writes annotations.json
    assert result.num_chips == len(list((tmp_path / "d" / "images").iterdir()))


def test_an_export_waits_for_its_results_on_its_own_clients_event_loop(client, tmp_path):
    """With another client made later in the process (Dask's default now), the export still
    follows its results on the given client's event loop: with the other client's loop stopped, it
    finishes, and nothing runs on the other cluster. (Dask's ``as_completed`` follows futures on
    the default client's loop unless told otherwise: that hung one export in about fifty.)"""
    import threading

    from distributed import Client, LocalCluster, default_client

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as other_cluster, \
         Client(other_cluster) as other:
        assert default_client() is other and other.loop is not client.loop
        release = threading.Event()
        other.loop.add_callback(release.wait, 60)  # the other client's event loop stops here
        done = []
        worker = threading.Thread(target=lambda: done.append(chipflow.export_training_data(
            KAMPALA_IMAGE, tmp_path / "d", KAMPALA_BUILDINGS, client=client, stride_x=64, stride_y=64,
            metadata_format="PASCAL_VOC_rectangles")), daemon=True)
        worker.start()
        worker.join(30)
        release.set()
        worker.join(60)
        assert done and done[0].elapsed_seconds < 30, "the export waited for the other client's loop"
        assert not other.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.tasks))
    assert done[0].num_chips == len(list((tmp_path / "d" / "images").iterdir())) > 0


def test_a_layer_of_a_geopackage_or_file_geodatabase_is_named_as_in_arcgis(client, kampala_voc, tmp_path):
    """``project.gpkg/buildings`` (ArcGIS: ``main.buildings``) and ``project.gdb/buildings`` pick one layer."""
    buildings = gpd.read_file(KAMPALA_BUILDINGS)
    other = buildings.iloc[:3]  # the first layer: what a reader would take by default
    half = _half_mask()  # in the raster's CRS, a little wider: FileGDB moves coordinates onto its grid
    mask = gpd.GeoDataFrame(geometry=half.buffer((half.total_bounds[2] - half.total_bounds[0]) / 1024,
                                                 join_style="mitre"), crs=half.crs)
    gpkg, gdb = tmp_path / "project.gpkg", tmp_path / "project.gdb"
    for path, driver in ((gpkg, "GPKG"), (gdb, "OpenFileGDB")):
        for name, frame in (("other", other), ("buildings", buildings), ("mask", mask)):
            frame.to_file(path, layer=name, driver=driver)
    expected = {p.name: p.read_bytes() for p in (kampala_voc / "labels").iterdir()}
    for layer in (f"{gpkg}/buildings", f"{gpkg}/main.buildings", f"{gdb}/buildings"):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        chipflow.export_training_data(KAMPALA_IMAGE, out, layer, metadata_format="PASCAL_VOC_rectangles",
                                      client=client)
        got = {p.name: p.read_bytes() for p in (out / "labels").iterdir()}
        if ".gdb" not in layer:
            assert got == expected, layer
        assert sorted(got) == sorted(expected)  # FileGDB stores coordinates on its grid (1e-9°): boxes agree
        for name in got:  # to a hundredth of a pixel, as written
            (names, boxes), (names_ref, boxes_ref) = read_voc(out / "labels" / name), read_voc(
                kampala_voc / "labels" / name)
            assert names == names_ref
            np.testing.assert_allclose(boxes, boxes_ref, atol=0.0101)
    masked = chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "m", KAMPALA_BUILDINGS, client=client,
                                           in_mask_polygons=f"{gdb}/mask")
    plan = plan_export(make_config(KAMPALA_IMAGE, "x"), KAMPALA_BUILDINGS, mask).describe()
    assert masked.num_chips == plan["expected_chips"] < len(expected)

    out = tmp_path / "refused"
    with pytest.raises(chipflow.InvalidParameterError,
                       match=r"in_class_data='.*project\.gpkg': holds 3 layers \('other', 'buildings', 'mask'\); "
                             r"name one, as '.*project\.gpkg/other'"):
        chipflow.export_training_data(KAMPALA_IMAGE, out, str(gpkg), client=client)
    with pytest.raises(chipflow.InputNotFoundError,
                       match=r"in_mask_polygons='.*project\.gdb/roads'.*no layer 'roads' with geometries; "
                             r"its layers: 'other', "):
        chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, client=client,
                                      in_mask_polygons=f"{gdb}/roads")
    # QGIS's layer_styles (a table without geometries) is no layer to choose from
    import pandas as pd
    import pyogrio

    styled = tmp_path / "styled.gpkg"
    buildings.to_file(styled, layer="buildings")
    pyogrio.write_dataframe(pd.DataFrame({"styleName": ["flat"]}), styled, layer="layer_styles")
    r = chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "styled", str(styled), client=client,
                                      metadata_format="PASCAL_VOC_rectangles")
    assert r.num_chips == len(expected)
    with pytest.raises(chipflow.InputNotFoundError, match=r"no layer 'layer_styles' with geometries"):
        chipflow.export_training_data(KAMPALA_IMAGE, out, f"{styled}/layer_styles", client=client)
    pd.DataFrame({"x": [1.0], "y": [2.0]}).to_csv(tmp_path / "table.csv", index=False)
    with pytest.raises(chipflow.LabelError, match=r"in_class_data='.*table\.csv' has no geometries"):
        chipflow.export_training_data(KAMPALA_IMAGE, out, str(tmp_path / "table.csv"), client=client)
    assert not out.exists()
