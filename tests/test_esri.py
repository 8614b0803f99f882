"""arcpy's signature and the feature-centred formats (Labeled_Tiles, Imagenet)."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE, textured
from labels_io import read_voc
from shapely.geometry import box
from test_export import T, px_polygon

import chipflow
from chipflow import ExportTrainingDataForDeepLearning
from chipflow.config import make_config
from chipflow.errors import ChipflowDeprecationWarning
from chipflow.plan import plan_export


@pytest.fixture
def arcgis_paths(tmp_path, monkeypatch):
    """The seed's paths (c:/test/...) made real, relative to a scratch working directory."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("c:/test")
    image = rasterio.open(KAMPALA_IMAGE)
    with image, rasterio.open("c:/test/image.tif", "w", **image.profile) as dst:
        dst.write(image.read())
    os.link("c:/test/image.tif", "c:/test/InputRaster.tif")
    buildings = gpd.read_file(KAMPALA_BUILDINGS)
    buildings["Classvalue"] = [1 + i % 2 for i in range(len(buildings))]
    buildings.to_file("c:/test/training.shp")
    buildings.to_file("c:/test/TrainingData.shp")
    with rasterio.open(KAMPALA_IMAGE) as ds:
        t = ds.transform
    mask = gpd.GeoDataFrame(geometry=[box(*(t * (0, 1024)), *(t * (1024, 0)))], crs=3857)
    mask.to_file("MaskPolygon", driver="ESRI Shapefile")
    return tmp_path


def test_seed_example_1_runs_verbatim(client, arcgis_paths):
    with pytest.warns(chipflow.ChipflowWarning) as caught:
        r = ExportTrainingDataForDeepLearning("c:/test/image.tif", "c:/test/outfolder",
                                              "c:/test/training.shp", "TIFF", "256",
                                              "256", "128", "128", "ONLY_TILES_WITH_FEATURES",
                                              "Labeled_Tiles", 0, "Classvalue", 0, None, 0,
                                              "MAP_SPACE", "PROCESS_AS_MOSAICKED_IMAGE",
                                              "NO_BLACKEN", "FIXED_SIZE")
    out = arcgis_paths / "c:/test/outfolder"
    stats = json.loads((out / "esri_accumulated_stats.json").read_text())
    assert stats["MetaDataMode"] == "Labeled_Tiles" and [c.value for c in r.classes] == [1, 2]
    said = [(type(w.message), str(w.message)) for w in caught]
    assert [m for t, m in said if t is ChipflowDeprecationWarning and "start_index" in m], said
    assert [m for _, m in said if m.startswith("1 of 98 features over the raster get no chip")], said
    # one chip per building over the raster (the data's README: 98), but for one whose centre lies
    # 138 px past the right edge: its centred chip holds no raster pixel
    assert r.num_chips == 97
    emd = json.loads((out / "esri_model_definition.emd").read_text())
    assert emd["CropTileMode"] == "Fixed_Size" and emd["BlackenAroundFeature"] is False


def test_seed_example_2_runs_verbatim(client, arcgis_paths):
    inRaster = "c:/test/InputRaster.tif"  # noqa: N806 - the seed's names
    out_folder = "c:/test/OutputFolder"
    in_training = "c:/test/TrainingData.shp"
    image_chip_format = "TIFF"
    tile_size_x = "256"
    tile_size_y = "256"
    stride_x = "128"
    stride_y = "128"
    output_nofeature_tiles = "ONLY_TILES_WITH_FEATURES"
    metadata_format = "Labeled_Tiles"
    start_index = 0
    classvalue_field = "Classvalue"
    buffer_radius = 0
    in_mask_polygons = "MaskPolygon"
    rotation_angle = 0
    reference_system = "MAP_SPACE"
    processing_mode = "PROCESS_AS_MOSAICKED_IMAGE"
    blacken_around_feature = "NO_BLACKEN"
    crop_mode = "FIXED_SIZE"
    with pytest.warns(chipflow.ChipflowWarning) as caught:
        r = ExportTrainingDataForDeepLearning(inRaster, out_folder, in_training,
                                              image_chip_format, tile_size_x, tile_size_y, stride_x,
                                              stride_y, output_nofeature_tiles, metadata_format, start_index,
                                              classvalue_field, buffer_radius, in_mask_polygons, rotation_angle,
                                              reference_system, processing_mode, blacken_around_feature, crop_mode)
    # the mask is the raster's extent: only chips completely inside it (centred chips near the edge go)
    assert 0 < r.num_chips < 97
    said = [(type(w.message), str(w.message)) for w in caught]
    assert [m for t, m in said if t is ChipflowDeprecationWarning and "start_index" in m], said
    assert [m for _, m in said if "get no chip" in m], said  # the building past the raster's edge


def test_hash_and_none_mean_default_and_unsupported_parameters_are_named(client, tmp_path):
    with pytest.raises(chipflow.InvalidParameterError, match=r"in_raster2='b.tif': a second raster"):
        ExportTrainingDataForDeepLearning(KAMPALA_IMAGE, tmp_path / "x", KAMPALA_BUILDINGS, "#", "#", "#",
                                          "#", "#", "#", "#", "#", "#", "#", "#", "#", "#", "#", "#", "#",
                                          "b.tif")
    r = ExportTrainingDataForDeepLearning(str(KAMPALA_IMAGE), str(tmp_path / "o"), str(KAMPALA_BUILDINGS),
                                          "#", "#", "#", "512", "512", None, "PASCAL_VOC_rectangles")
    assert r.num_chips == 4 and r.statistics["TileSizeX"] == 256


def test_labeled_tiles_centre_one_feature_per_chip(client, make_raster, tmp_path):
    raster = make_raster(textured((3, 512, 512)))
    features = gpd.GeoDataFrame(
        {"value": [4, 9]}, geometry=[px_polygon([(100, 100), (140, 100), (140, 120), (100, 120)]),
                                     px_polygon([(300, 300), (330, 300), (315, 340)])], crs="EPSG:32633")
    out = tmp_path / "lt"
    r = chipflow.export_training_data(raster, out, features, metadata_format="Labeled_Tiles", tile_size_x=64,
                                      tile_size_y=64, blacken_around_feature="BLACKEN_AROUND_FEATURE",
                                      client=client)
    assert r.num_chips == 2
    names, boxes = read_voc(out / "labels" / "000000000.xml")
    # centre (120, 110) → window x 88..152, y 78..142: the feature's box in the chip
    assert names == [4]
    np.testing.assert_allclose(boxes, [[12, 22, 52, 42]])
    with rasterio.open(out / "images" / "000000000.tif") as ds, rasterio.open(raster) as src:
        chip = ds.read()
        assert ds.transform.almost_equals(T @ rasterio.Affine.translation(88, 78))
        window = src.read(window=rasterio.windows.Window(88, 78, 64, 64))
    inside = np.zeros((64, 64), bool)
    inside[22:42, 12:52] = True
    np.testing.assert_array_equal(chip[:, inside], window[:, inside])
    assert (chip[:, ~inside] == 0).all()  # blackened around the feature
    names, _ = read_voc(out / "labels" / "000000001.xml")
    assert names == [9]


def test_a_feature_whose_centred_chip_misses_the_raster_is_counted_in_a_warning(client, make_raster, tmp_path):
    """A long feature centred beyond the raster's edge, but reaching into it: no chip, and the user is told."""
    raster = make_raster(textured((3, 512, 512)))
    features = gpd.GeoDataFrame(
        {"value": [4, 9]}, geometry=[px_polygon([(100, 100), (140, 100), (140, 120), (100, 120)]),
                                     px_polygon([(480, 200), (620, 200), (620, 210), (480, 210)])],
        crs="EPSG:32633")
    # feature 1: centre x 550, so its 64-px chip spans x 518..582, wholly right of the raster (512 px)
    cfg = make_config(raster, "x", metadata_format="Labeled_Tiles", tile_size_x=64, tile_size_y=64)
    with pytest.warns(chipflow.ChipflowWarning, match=r"1 of 2 features .* no chip: .*64 x 64 px chip lies wholly outside it"):
        assert plan_export(cfg, features).describe()["expected_chips"] == 1
    out = tmp_path / "lt"
    with pytest.warns(chipflow.ChipflowWarning, match=r"1 of 2 features .* no chip"):
        r = chipflow.export_training_data(raster, out, features, metadata_format="Labeled_Tiles", tile_size_x=64,
                                          tile_size_y=64, client=client)
    assert r.num_chips == 1 and sorted(os.listdir(out / "images")) == ["000000000.tif"]
    assert read_voc(out / "labels" / "000000000.xml")[0] == [4]


def test_a_feature_whose_centred_chip_misses_its_own_pixels_still_gets_its_chip(client, make_raster, tmp_path):
    """One chip per feature, as ArcGIS: a ring round its centre, or two parts far apart, included."""
    import shapely

    raster = make_raster(textured((3, 512, 512)))
    ring = shapely.Polygon([(100, 100), (260, 100), (260, 260), (100, 260)],
                           [[(120, 120), (240, 120), (240, 240), (120, 240)]])  # hole around the centre
    parts = shapely.MultiPolygon([shapely.box(300, 300, 310, 310), shapely.box(490, 490, 500, 500)])
    to_map = [T.a, T.b, T.d, T.e, T.c, T.f]
    features = gpd.GeoDataFrame({"value": [3, 5]}, geometry=[
        shapely.affinity.affine_transform(g, to_map) for g in (ring, parts)], crs="EPSG:32633")
    out = tmp_path / "lt"
    r = chipflow.export_training_data(raster, out, features, metadata_format="Labeled_Tiles", tile_size_x=64,
                                      tile_size_y=64, client=client)
    assert r.num_chips == 2 and r.features_per_class == {"3": 1, "5": 1}
    # centres (180, 180) and (400, 400): chips 148..212 and 368..432, each inside its feature's box
    for stem, value, origin in (("000000000", 3, 148), ("000000001", 5, 368)):
        names, boxes = read_voc(out / "labels" / f"{stem}.xml")
        assert names == [value]
        np.testing.assert_allclose(boxes, [[0, 0, 64, 64]])
        with rasterio.open(out / "images" / f"{stem}.tif") as ds, rasterio.open(raster) as src:
            assert ds.transform.almost_equals(T @ rasterio.Affine.translation(origin, origin))
            np.testing.assert_array_equal(ds.read(), src.read(window=rasterio.windows.Window(origin, origin, 64, 64)))


def test_bounding_box_crop_and_imagenet_folders(client, make_raster, tmp_path):
    raster = make_raster(textured((3, 512, 512)))
    features = gpd.GeoDataFrame(
        {"value": [1, 2], "classname": ["../evil", "tree"]},
        geometry=[px_polygon([(100, 100), (140, 100), (140, 120), (100, 120)]),
                  px_polygon([(300.5, 300), (330, 300), (330, 341.2), (300.5, 341.2)])], crs="EPSG:32633")
    out = tmp_path / "in"
    with pytest.warns(chipflow.ChipflowWarning, match=r"class '\.\./evil' is renamed '\.\._evil'"):
        r = chipflow.export_training_data(raster, out, features, metadata_format="Imagenet",
                                          crop_mode="BOUNDING_BOX", client=client)
    assert r.num_chips == 2
    with rasterio.open(out / "images" / ".._evil" / "000000000.tif") as ds:
        assert (ds.width, ds.height) == (40, 20)
    with rasterio.open(out / "images" / "tree" / "000000001.tif") as ds:
        assert (ds.width, ds.height) == (30, 42)  # 300..330 x 300..342, rounded outwards
    assert not (out / "labels").exists() or not any((out / "labels").iterdir())
    lines = (out / "map.txt").read_text().splitlines()
    assert lines == ["images\\.._evil\\000000000.tif ", "images\\tree\\000000001.tif "]
    emd = json.loads((out / "esri_model_definition.emd").read_text())
    assert emd["CropTileMode"] == "Variable_Size"
    assert [c["Name"] for c in emd["Classes"]] == [".._evil", "tree"]  # the class is named as its folder
    assert ET  # the XML module is used by read_voc
