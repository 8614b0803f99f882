"""The ArcGIS tool's parameters beyond the core: each changes the output exactly as documented."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE, NC, textured
from labels_io import chip_ids, read_kitti, read_voc, source_window
from pyproj import Transformer
from shapely.geometry import Polygon, box
from test_export import T, px_polygon

import chipflow
from chipflow.errors import ChipflowDeprecationWarning
from chipflow.validate import validate_dataset


def test_buffer_radius_turns_points_into_discs(client, tmp_path):
    out = tmp_path / "buf"
    chipflow.export_training_data(
        NC / "landsat_multiband.tif", out, NC / "landsat96_points.shp", class_value_field="id",
        buffer_radius=100, metadata_format="PASCAL_VOC_rectangles", tile_size_x=64, tile_size_y=64,
        stride_x=64, stride_y=64, client=client)
    points = gpd.read_file(NC / "landsat96_points.shp")
    with rasterio.open(NC / "landsat_multiband.tif") as ds:
        t, crs = ds.transform, ds.crs
    to_raster = Transformer.from_crs(points.crs, crs, always_xy=True)
    r = 100 / 28.5  # the buffer radius in pixels
    checked = 0
    for p, value in zip(points.geometry, points["id"], strict=True):
        col, row = ~t * to_raster.transform(p.x, p.y)
        c, rw = int(col // 64), int(row // 64)
        x, y = col - c * 64, row - rw * 64
        if not (r < x < 64 - r and r < y < 64 - r) or not (0 <= c < 489 // 64 and 0 <= rw < 443 // 64):
            continue
        path = out / "labels" / f"{rw * (489 // 64) + c:09d}.xml"
        if not path.exists():
            continue  # an all-nodata chip
        names, boxes = read_voc(path)
        expected = np.round([x - r, y - r, x + r, y + r], 2)
        d = np.abs(boxes - expected).max(axis=1)
        assert d.min() <= 0.03 and names[int(d.argmin())] == value, (path.name, x, y, expected, boxes)
        checked += 1
    assert checked > 50


def test_points_without_buffer_radius_warn_for_box_formats_only(client, tmp_path):
    """A point's box has no area: box formats warn (the discs above do not); raster labels burn a pixel."""
    kw = dict(class_value_field="id", tile_size_x=64, tile_size_y=64, stride_x=64, stride_y=64, client=client)
    with pytest.warns(chipflow.ChipflowWarning, match=r"holds \d+ points or lines and buffer_radius=0"):
        chipflow.export_training_data(NC / "landsat_multiband.tif", tmp_path / "kitti", NC / "landsat96_points.shp",
                                      metadata_format="KITTI_rectangles", **kw)
    rows = [line.split() for p in (tmp_path / "kitti" / "labels").glob("*.txt") for line in p.read_text().splitlines()]
    assert rows and all(r[4] == r[6] and r[5] == r[7] for r in rows)  # the zero-size boxes it warned of
    chipflow.export_training_data(NC / "landsat_multiband.tif", tmp_path / "ct", NC / "landsat96_points.shp",
                                  metadata_format="Classified_Tiles", **kw)  # no warning (errors in tests)


def test_mask_polygons_keep_only_chips_completely_inside(client, tmp_path):
    with rasterio.open(KAMPALA_IMAGE) as ds:
        t = ds.transform
    mask = gpd.GeoDataFrame(geometry=[Polygon([t * (100, 50), t * (700, 50), t * (700, 600), t * (100, 600)])],
                            crs=3857)
    out = tmp_path / "mask"
    r = chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, in_mask_polygons=mask,
                                      output_nofeature_tiles="ALL_TILES", client=client)
    # chips of 256 at stride 128 fully inside columns 100..700 and rows 50..600
    cols = [c for c in range(7) if c * 128 >= 100 and c * 128 + 256 <= 700]
    rows = [rw for rw in range(7) if rw * 128 >= 50 and rw * 128 + 256 <= 600]
    assert cols == [1, 2, 3] and rows == [1, 2]
    assert chip_ids(out) == sorted(rw * 7 + c for rw in rows for c in cols) and r.num_chips == 6


def test_rotation_angle_adds_rotated_chips_with_rotated_labels(client, make_raster, tmp_path):
    raster = make_raster(textured((3, 768, 768)))
    feature = px_polygon([(300, 290), (340, 290), (340, 330), (300, 330)])  # in chip (1, 1) of 256
    features = gpd.GeoDataFrame({"value": [2]}, geometry=[feature], crs="EPSG:32633")
    out = tmp_path / "rot"
    chipflow.export_training_data(raster, out, features, rotation_angle=90, stride_x=256, stride_y=256,
                                  metadata_format="KITTI_rectangles", client=client)
    base = (1 * 3 + 1) * 4  # chip (1, 1), 4 angles: ids base + k
    assert chip_ids(out) == [base, base + 1, base + 2, base + 3]
    with rasterio.open(out / "images" / f"{base:09d}.tif") as ds:
        chip0 = ds.read()
    x0, y0, x1, y1 = 300 - 256, 290 - 256, 340 - 256, 330 - 256
    n = 256
    expected = {0: (x0, y0, x1, y1), 1: (y0, n - x1, y1, n - x0), 2: (n - x1, n - y1, n - x0, n - y0),
                3: (n - y1, x0, n - y0, x1)}
    for k in range(4):
        with rasterio.open(out / "images" / f"{base + k:09d}.tif") as ds:
            np.testing.assert_array_equal(ds.read(), np.rot90(chip0, k, axes=(1, 2)))
            centre = ds.transform * (128, 128)
            assert np.allclose(centre, T * (256 + 128, 256 + 128))  # same centre, rotated frame
        names, boxes = read_kitti(out / "labels" / f"{base + k:09d}.txt")
        assert names == [2]
        np.testing.assert_allclose(boxes[0], expected[k], atol=0.01)


def test_rotation_at_45_degrees_samples_the_source_and_clips_labels(client, make_raster, tmp_path):
    raster = make_raster(textured((1, 512, 512), "uint16") + 1, nodata=0)
    feature = px_polygon([(200, 200), (312, 200), (312, 312), (200, 312)])
    features = gpd.GeoDataFrame(geometry=[feature], crs="EPSG:32633")
    out = tmp_path / "rot45"
    chipflow.export_training_data(raster, out, features, rotation_angle=45, tile_size_x=128,
                                  tile_size_y=128, stride_x=128, stride_y=128, client=client,
                                  metadata_format="PASCAL_VOC_rectangles")
    n_angles = 8
    for i in chip_ids(out):
        k = i % n_angles
        with rasterio.open(out / "images" / f"{i:09d}.tif") as ds:
            chip = ds.read(1)
            rows, cols = np.nonzero(chip)
            rows, cols = rows[::97], cols[::97]  # a spread-out sample of the valid pixels
            xs, ys = ds.transform * (cols + 0.5, rows + 0.5)
            with rasterio.open(raster) as src:
                sampled = np.array(list(src.sample(zip(xs, ys, strict=True))))[:, 0]
        assert (chip[rows, cols] == sampled).all(), k  # nearest: every pixel is a source pixel
        _, boxes = read_voc(out / "labels" / f"{i:09d}.xml")
        assert ((boxes >= 0) & (boxes <= 128)).all()


def test_min_polygon_overlap_ratio_drops_small_parts(client, make_raster, tmp_path):
    raster = make_raster(textured((3, 512, 512)))
    triangle = gpd.GeoDataFrame(geometry=[px_polygon([(200, 10), (300, 10), (200, 60)])], crs="EPSG:32633")
    # left part (x < 256): 2016 of 2500 px² (0.81); right part 484 (0.19)
    for ratio, expected in ((0.0, [0, 1]), (0.5, [0]), (0.9, [])):
        out = tmp_path / f"r{ratio}"
        r = chipflow.export_training_data(raster, out, triangle, min_polygon_overlap_ratio=ratio,
                                          stride_x=256, stride_y=256, client=client)
        assert chip_ids(out) == expected and r.num_chips == len(expected)


@pytest.mark.parametrize("fmt", ["Classified_Tiles", "Panoptic_Segmentation"])
def test_min_polygon_overlap_ratio_leaves_small_parts_out_of_class_rasters(client, make_raster, tmp_path, fmt):
    """A feature below the ratio in a chip is left out of that chip's class raster too, unrotated as
    rotated: class 2 has 10% of its area in chip 0 (x 118-128), so chip 0 holds class 1 alone."""
    raster = make_raster(textured((3, 128, 256)))
    features = gpd.GeoDataFrame({"klass": [1, 2]}, crs="EPSG:32633", geometry=[
        px_polygon([(20, 20), (60, 20), (60, 60), (20, 60)]),
        px_polygon([(118, 40), (218, 40), (218, 100), (118, 100)])])
    out = tmp_path / fmt
    chipflow.export_training_data(raster, out, features, metadata_format=fmt, class_value_field="klass",
                                  tile_size_x=128, tile_size_y=128, stride_x=128, stride_y=128,
                                  min_polygon_overlap_ratio=0.5, rotation_angle=180, client=client)

    def label(chip_id):
        with rasterio.open(out / "labels" / f"{chip_id:09d}.tif") as ds:
            return ds.read(1)

    unrotated, rotated = label(0), label(1)  # chip 0 at 0° and at 180°
    expected = np.zeros((128, 128), np.uint8)
    expected[20:60, 20:60] = 1
    np.testing.assert_array_equal(unrotated, expected)
    np.testing.assert_array_equal(np.rot90(unrotated, 2), rotated)
    second = label(2)  # chip 1 at 0°: 90% of class 2, kept whole within the chip
    assert set(np.unique(second)) == {0, 2} and (second == 2).sum() == 90 * 60


@pytest.mark.parametrize("fmt", ["PASCAL_VOC_rectangles", "KITTI_rectangles"])
def test_a_sliver_narrower_than_a_printed_hundredth_gets_no_box(client, make_raster, tmp_path, fmt):
    """Class 2 reaches 0.004 px into chip 0: its box there would print as 128.00-128.00, which
    detection trainers refuse (torchvision: boxes need a positive width), so chip 0 lists class 1
    alone; chip 1 has class 2's box, from its left edge."""
    raster = make_raster(textured((3, 128, 256)))
    features = gpd.GeoDataFrame({"klass": [1, 2] * 30}, crs="EPSG:32633", geometry=[
        px_polygon(ring) for _ in range(30) for ring in (
            [(20, 20), (60, 20), (60, 60), (20, 60)],
            [(127.996, 10), (140, 10), (140, 30), (127.996, 30)])])  # 60 rows: the tables' path too
    out = tmp_path / fmt
    result = chipflow.export_training_data(
        raster, out, features, metadata_format=fmt, class_value_field="klass", tile_size_x=128, tile_size_y=128,
        stride_x=128, stride_y=128, rotation_angle=180, client=client)
    read = read_voc if fmt.startswith("PASCAL") else read_kitti
    ext = "xml" if fmt.startswith("PASCAL") else "txt"
    for chip_id in (0, 1):  # chip 0 at 0° and at 180°
        names, boxes = read(out / "labels" / f"{chip_id:09d}.{ext}")
        assert names == [1] * 30 and (boxes == ([20, 20, 60, 60] if chip_id == 0 else [68, 68, 108, 108])).all()
    names, boxes = read(out / "labels" / f"000000002.{ext}")  # chip 1 at 0°
    assert names == [2] * 30 and (boxes == [0, 10, 12, 30]).all()
    # counted nowhere either: the statistics and the chip index agree with the files (validate)
    stats = json.loads((out / "esri_accumulated_stats.json").read_text())
    assert stats["FeatureStats"]["NumFeaturesPerClass"] == [2 * 30, 2 * 30] == list(result.features_per_class.values())
    assert validate_dataset(str(out)).ok


def test_start_index_is_accepted_and_ignored_with_a_deprecation_warning(client, tmp_path):
    with pytest.warns(ChipflowDeprecationWarning, match=r"start_index=5 is deprecated"):
        r = chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "s", KAMPALA_BUILDINGS, start_index=5,
                                          stride_x=512, stride_y=512, client=client)
    assert chip_ids(tmp_path / "s") == [0, 1, 2, 3] and r.num_chips == 4


def test_source_window_helper_still_matches(client, tmp_path):
    out = tmp_path / "plain"
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, stride_x=512, stride_y=512,
                                  client=client)
    chip, window = source_window(out / "images" / "000000003.tif", KAMPALA_IMAGE)
    np.testing.assert_array_equal(chip, window)
    emd = json.loads((out / "esri_model_definition.emd").read_text())
    assert emd["ImageSpaceUsed"] == "MAP_SPACE"
    assert box(0, 0, 1, 1).area == 1


def test_mrf_chips_of_uint8_rgb_equal_the_source_window(client, tmp_path):
    """GDAL's MRF driver wrote wrong pixels with the workers' block cache set to 128 bytes."""
    out = tmp_path / "mrf8"
    r = chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, image_chip_format="MRF",
                                      tile_size_x=64, tile_size_y=64, stride_x=64, stride_y=64, client=client)
    ids = chip_ids(out, "mrf")
    assert len(ids) == r.num_chips > 100
    for i in ids:
        chip, window = source_window(out / "images" / f"{i:09d}.mrf", KAMPALA_IMAGE)
        np.testing.assert_array_equal(chip, window)


def test_mrf_chips_open_with_gdal_and_equal_the_source(client, tmp_path):
    out = tmp_path / "mrf"
    r = chipflow.export_training_data(NC / "landsat_multiband.tif", out, NC / "landsat96_polygons.shp",
                                      class_value_field="id", image_chip_format="mrf", tile_size_x=128,
                                      tile_size_y=128, stride_x=128, stride_y=128, client=client)
    ids = chip_ids(out, "mrf")
    assert ids and len(ids) == r.num_chips
    for i in ids:
        chip, window = source_window(out / "images" / f"{i:09d}.mrf", NC / "landsat_multiband.tif")
        np.testing.assert_array_equal(chip, window)
    first = (out / "map.txt").read_text().splitlines()[0]
    assert first.startswith(f"images\\{ids[0]:09d}.mrf  labels\\")
    names = sorted(p.name for p in (out / "images").glob(f"{ids[0]:09d}.*"))
    stem = f"{ids[0]:09d}"
    assert names == [f"{stem}.idx", f"{stem}.mrf", f"{stem}.mrf.aux.xml", f"{stem}.pzp"]


def test_classified_raster_as_class_data_for_classified_tiles(client, tmp_path):
    out = tmp_path / "strata"
    r = chipflow.export_training_data(NC / "landsat_multiband.tif", out, NC / "strata.tif",
                                      metadata_format="Classified_Tiles", tile_size_x=128, tile_size_y=128,
                                      stride_x=128, stride_y=128, client=client)
    assert [c.value for c in r.classes] == [1, 2, 3, 4, 5, 6, 7]
    stats = json.loads((out / "esri_accumulated_stats.json").read_text())
    assert stats["OutputFeatures"] is False
    agree = total = 0
    with rasterio.open(NC / "strata.tif") as strata:
        for i in chip_ids(out):
            with rasterio.open(out / "labels" / f"{i:09d}.tif") as lab:
                mask = lab.read(1)
                col, row = ~strata.transform * (lab.transform.c, lab.transform.f)
                window = rasterio.windows.Window(round(col), round(row), 128, 128)
                expected = strata.read(1, window=window).astype(np.int64)
            expected[expected < 0] = 0  # its nodata (-99999) is background
            image, _ = source_window(out / "images" / f"{i:09d}.tif", NC / "landsat_multiband.tif")
            expected[(image == -99999).all(axis=0)] = 0  # and so is the image's nodata
            agree += (mask == expected).sum()
            total += mask.size
            assert set(np.unique(mask).tolist()) <= {0, *range(1, 8)}  # nodata is 0, never a wrapped -99999
    assert agree / total > 0.995  # the same grid, in a CRS whose datum differs by < 1 m
    assert stats["ClassPixelStats"]["NumPixelsPerClass"][4] > stats["ClassPixelStats"]["NumPixelsPerClass"][1]
    # ArcGIS writes counts as whole numbers: "Sum" : 1658, "Count" : 482
    pixels = stats["ClassPixelStats"]["PixelsPerClass"]
    assert all(type(p[k]) is int for p in pixels for k in ("Min", "Max", "Sum", "Count"))
    assert [p["Sum"] for p in pixels] == stats["ClassPixelStats"]["NumPixelsPerClass"]
    assert type(stats["ClassPixelStats"]["NumClassesPerImage"]["Count"]) is int
    # stats.txt as ArcGIS lays it out for a class raster: classes per image, then pixels per class
    lines = (out / "stats.txt").read_text().splitlines()
    assert lines[1] == f"pixels = {sum(stats['ClassPixelStats']['NumPixelsPerClass'])}"
    assert lines[2].startswith("classes per image = [min = ") and lines[3] == "classes = 7"
    assert lines[4].split() == ["cls", "name", "cls", "value", "images", "pixels", "min", "size", "mean",
                                "size", "max", "size"]
    row = lines[5].split()
    assert row[:4] == ["1", "1", str(stats["ClassPixelStats"]["NumImagesPerClass"][0]), str(pixels[0]["Sum"])]
    assert row[4:] == [f"{pixels[0]['Min']}", f"{pixels[0]['Mean']:.2f}", f"{pixels[0]['Max']}"]


@pytest.mark.parametrize("nodata", [-99999.0, float("nan")])
def test_a_class_rasters_nodata_is_background_in_the_labels(client, make_raster, tmp_path, nodata):
    raster = make_raster(textured((3, 128, 128)))
    classes = np.ones((1, 128, 128), np.float32)
    classes[0, :, 64:] = 2
    classes[0, :40, :50] = nodata
    class_raster = make_raster(classes, name="classes.tif", nodata=nodata)
    out = tmp_path / "nd"
    chipflow.export_training_data(raster, out, class_raster, metadata_format="Classified_Tiles",
                                  tile_size_x=128, tile_size_y=128, client=client)
    with rasterio.open(out / "labels" / "000000000.tif") as ds:
        label = ds.read(1)
    expected = np.where(np.isnan(classes[0]) | (classes[0] == nodata), 0, classes[0]).astype(np.uint8)
    np.testing.assert_array_equal(label, expected)
    assert validate_dataset(str(out)).ok


def test_class_raster_regions_become_boxes(client, make_raster, tmp_path):
    raster = make_raster(textured((3, 256, 256)))
    classes = np.zeros((1, 256, 256), np.uint8)
    classes[0, 10:30, 40:90] = 3  # one region of class 3
    classes[0, 100:104, 200:256] = 5  # one of class 5, cut by the chip's edge (x = 128 with tile 128)
    class_raster = make_raster(classes, name="classes.tif")
    out = tmp_path / "regions"
    chipflow.export_training_data(raster, out, class_raster, metadata_format="PASCAL_VOC_rectangles",
                                  tile_size_x=128, tile_size_y=128, stride_x=128, stride_y=128, client=client)
    names, boxes = read_voc(out / "labels" / "000000000.xml")
    assert names == [3]
    np.testing.assert_allclose(boxes, [[40, 10, 90, 30]])
    names, boxes = read_voc(out / "labels" / "000000001.xml")
    assert names == [5]
    np.testing.assert_allclose(boxes, [[72, 100, 128, 104]])
    assert chip_ids(out) == [0, 1]  # the two chips without a class pixel are skipped


@pytest.mark.parametrize(("kw", "says"), [
    ({"metadata_format": "Labeled_Tiles"}, r"metadata_format='Labeled_Tiles' makes one chip per feature"),
    ({"reference_system": "PIXEL_SPACE"}, r"reference_system='PIXEL_SPACE' needs vector class data"),
])
def test_a_class_raster_where_vector_data_is_needed_is_refused_naming_the_cause(tmp_path, kw, says):
    with pytest.raises(chipflow.InvalidParameterError, match=rf"in_class_data=.*strata.tif.* is a class raster.*{says}"):
        chipflow.export_training_data(NC / "landsat_multiband.tif", tmp_path / "o", NC / "strata.tif", **kw)
    assert not (tmp_path / "o").exists()
