import pickle
import re

import geopandas as gpd
import numpy as np
import pandas as pd
import pyproj
import pytest
from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE, NC, textured
from shapely.geometry import box

import chipflow
from chipflow.config import ImageChipFormat, NoFeatureTiles, make_config
from chipflow.errors import ChipflowError, InvalidParameterError
from chipflow.labels import _strictly_convex, read_class_data
from chipflow.plan import plan_export
from chipflow.sources import open_raster


def test_esri_values_are_accepted_in_any_case_and_as_strings():
    cfg = make_config("in.tif", "out", image_chip_format="png", tile_size_x="512",
                      stride_y=" 64 ", output_nofeature_tiles="all_tiles",
                      metadata_format="pascal_voc_RECTANGLES")
    assert cfg.image_chip_format is ImageChipFormat.PNG
    assert (cfg.tile_size_x, cfg.tile_size_y, cfg.stride_x, cfg.stride_y) == (512, 256, 128, 64)
    assert cfg.output_nofeature_tiles is NoFeatureTiles.ALL_TILES
    assert cfg.metadata_format == "PASCAL_VOC_rectangles"


def test_defaults_are_the_esri_tools():
    cfg = make_config("in.tif", "out")
    assert cfg.to_dict() | {"in_raster": 0, "out_folder": 0} == {
        "in_raster": 0, "out_folder": 0, "image_chip_format": "TIFF", "tile_size_x": 256,
        "tile_size_y": 256, "stride_x": 128, "stride_y": 128,
        "output_nofeature_tiles": "ONLY_TILES_WITH_FEATURES", "metadata_format": "PASCAL_VOC_rectangles",
        "class_value_field": None, "edge_policy": "DROP", "overwrite": False,
        "buffer_radius": 0.0, "rotation_angle": 0.0, "reference_system": "MAP_SPACE",
        "processing_mode": "PROCESS_AS_MOSAICKED_IMAGE", "blacken_around_feature": False,
        "crop_mode": "FIXED_SIZE", "min_polygon_overlap_ratio": 0.0, "cell_size": None, "extent": None,
        "split": {}, "split_block_size": 8, "seed": 0,
    }


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tile_size_x": 0}, r"tile_size_x=0.*>= 1"),
        ({"stride_y": -5}, r"stride_y=-5"),
        ({"stride_x": 2.5}, r"stride_x=2.5"),
        ({"tile_size_y": "abc"}, r"tile_size_y='abc'"),
        ({"image_chip_format": "GIF"}, r"image_chip_format='GIF'.*TIFF, PNG, JPEG"),
        ({"metadata_format": "YOLO9000"}, r"metadata_format='YOLO9000'.*Classified_Tiles, .*KITTI_rectangles, .*PASCAL_VOC_rectangles"),
        ({"output_nofeature_tiles": "SOME"}, r"output_nofeature_tiles='SOME'.*ALL_TILES"),
        ({"edge_policy": "wrap"}, r"edge_policy='wrap'.*DROP, PAD, SHIFT"),
        ({"rotation_angle": 360}, r"rotation_angle=360: must be a number with 0 <= value < 360"),
        ({"rotation_angle": "x"}, r"rotation_angle='x'"),
        ({"min_polygon_overlap_ratio": 1.5}, r"min_polygon_overlap_ratio=1.5: .*0 <= value <= 1"),
        ({"buffer_radius": -1}, r"buffer_radius=-1"),
        ({"cell_size": 0}, r"cell_size=0"),
        ({"extent": (5, 0, 1, 1)}, r"extent=\(5, 0, 1, 1\): must be \(xmin, ymin, xmax, ymax\)"),
        ({"reference_system": "GLOBE"}, r"reference_system='GLOBE'.*MAP_SPACE, PIXEL_SPACE, IMAGE_SPACE"),
        ({"processing_mode": "ALL"}, r"processing_mode='ALL'.*PROCESS_ITEMS_SEPARATELY"),
        ({"crop_mode": "TIGHT"}, r"crop_mode='TIGHT'.*FIXED_SIZE, BOUNDING_BOX"),
        ({"blacken_around_feature": "MAYBE"}, r"blacken_around_feature='MAYBE'.*BLACKEN_AROUND_FEATURE or NO_BLACKEN"),
        ({"seed": 1.7}, r"seed=1.7: must be a whole number >= 0 and <= 9223372036854775807"),
        ({"seed": "0.9"}, r"seed='0.9': must be a whole number"),
        ({"seed": 2**63}, r"seed=9223372036854775808: must be a whole number >= 0 and <= 9223372036854775807"),
        ({"split_block_size": 0}, r"split_block_size=0: must be a whole number of chips >= 1"),
        ({"extent": "1 2 3 4", "reference_system": "PIXEL_SPACE"},
         r"extent='1 2 3 4': is in map units and applies with reference_system='MAP_SPACE'; with 'PIXEL_SPACE'"),
        ({"cell_size": 0.15, "reference_system": "image_space"}, r"cell_size=0.15: .* with 'IMAGE_SPACE' chips"),
        ({"rotation_angle": 90, "metadata_format": "Labeled_Tiles"},
         r"rotation_angle=90: rotates the grid formats' chips; metadata_format='Labeled_Tiles' cuts one unrotated"),
        ({"rotation_angle": "45", "metadata_format": "imagenet"}, r"rotation_angle='45': .*'Imagenet'"),
    ],
)
def test_bad_parameters_name_the_parameter_and_value(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match) as info:
        make_config("in.tif", "out", **kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ChipflowError)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"image_chip_format": "PNG"}, r"image_chip_format='PNG'.*raster has 5"),
        ({"tile_size_x": 600}, r"tile_size_x=600.*larger than the raster \(489 x 443"),
    ],
)
def test_raster_dependent_errors_come_before_any_output(tmp_path, kwargs, match):
    out = tmp_path / "never"
    with pytest.raises(InvalidParameterError, match=match):
        chipflow.export_training_data(NC / "landsat_multiband.tif", out,
                                      NC / "landsat96_polygons.shp", **kwargs)
    assert not out.exists()


def test_jpeg_of_uint16_is_refused(make_raster, tmp_path):
    raster = make_raster(textured((3, 300, 300), "uint16"))
    with pytest.raises(InvalidParameterError, match=r"8-bit data only but the raster is uint16"):
        chipflow.export_training_data(raster, tmp_path / "o", KAMPALA_BUILDINGS,
                                      image_chip_format="JPEG")
    assert not (tmp_path / "o").exists()


def test_png_of_two_bands_warns_that_the_second_is_stored_as_alpha(client, make_raster, tmp_path):
    """PNG has no 2-band type but grey + alpha: both bands are kept, and the user is told."""
    from PIL import Image

    data = textured((2, 256, 256))
    raster = make_raster(data)
    boxes = gpd.GeoDataFrame(geometry=[box(500010, 3999700, 500050, 3999740)], crs="EPSG:32633")
    with pytest.warns(chipflow.ChipflowWarning, match=r"image_chip_format='PNG' stores 2 bands as grey \+ "
                                                      r"alpha.*drop band 2"):
        chipflow.export_training_data(raster, tmp_path / "o", boxes, image_chip_format="PNG",
                                      tile_size_x=256, tile_size_y=256, client=client)
    with Image.open(tmp_path / "o" / "images" / "000000000.png") as png:
        assert png.mode == "LA"
        np.testing.assert_array_equal(np.moveaxis(np.asarray(png), -1, 0), data)


def test_counts_per_class_keep_two_classes_of_one_name_apart(client, tmp_path):
    """Box labels hold class values, so two classes may share a name; their counts are not merged."""
    buildings = gpd.read_file(KAMPALA_BUILDINGS)
    named = buildings.assign(value=np.where(np.arange(len(buildings)) % 2, 1, 2), classname="roof")
    r = chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "o", named, client=client,
                                      metadata_format="PASCAL_VOC_rectangles")
    assert set(r.features_per_class) == {"roof (1)", "roof (2)"}
    assert sum(r.features_per_class.values()) == r.num_features
    plan = plan_export(make_config(KAMPALA_IMAGE, "x"), named).describe()
    assert set(plan["features_per_class"]) == {"roof (1)", "roof (2)"}


def test_missing_inputs_and_bad_class_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"in_raster='.*nope.tif' does not exist"):
        chipflow.export_training_data("nope.tif", tmp_path / "o", KAMPALA_BUILDINGS)
    with pytest.raises(FileNotFoundError, match=r"in_class_data='nope.gpkg'"):
        chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "o", "nope.gpkg")
    with pytest.raises(ValueError, match=r"class_value_field='klass'.*fields are \['osm_id'\]"):
        chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "o", KAMPALA_BUILDINGS,
                                      class_value_field="klass")
    with pytest.raises(ValueError, match=r"class_value_field='label' must hold whole numbers"):
        chipflow.export_training_data(NC / "landsat_multiband.tif", tmp_path / "o",
                                      NC / "landsat96_polygons.shp", class_value_field="label")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("column", "shown"), [
    (pd.Series([1.0, 2.5, np.nan]), "float64 (e.g. 2.5)"),
    (pd.Series([1, "2", "roof", 4], dtype=object), "object (e.g. 'roof')"),
])
def test_a_class_field_that_is_not_whole_numbers_names_its_first_bad_value(column, shown):
    from chipflow.labels import _class_values

    frame = pd.DataFrame({"Value": column, "name": ["x"] * len(column)})
    with pytest.raises(chipflow.LabelError, match=rf"class_value_field='Value' must hold whole numbers, "
                                                  rf"but it is {re.escape(shown)}; fields: Value .*, name"):
        _class_values(frame, None)
    assert _class_values(frame.iloc[:1], None)[0].tolist() == [1]  # the rows before it are fine


@pytest.mark.parametrize(("column", "shown"), [
    (pd.Series([1, 2, 1e20]), "1e+20"),
    (pd.Series([1, 2**63 + 5], dtype="uint64"), str(2**63 + 5)),
    (pd.Series([3, 0, 2]), "0"),
    (pd.Series([70000, 1]), "70000"),
])
def test_a_class_value_out_of_range_is_shown_as_given(column, shown):
    from chipflow.labels import _class_values

    with pytest.raises(chipflow.LabelError, match=rf"class_value_field='Value' holds {re.escape(shown)}: "
                                                  r"class values must be 1\.\.65535"):
        _class_values(pd.DataFrame({"Value": column}), None)


@pytest.mark.parametrize("column", [pd.Series([1, 2, None, 3, None], dtype="Int32"),
                                    pd.Series([1.0, 2.0, np.nan, 3.0, np.nan])])
def test_a_class_field_with_empty_values_says_how_many(column):
    from chipflow.labels import _class_values

    frame = pd.DataFrame({"Value": column})
    with pytest.raises(chipflow.LabelError, match=r"class_value_field='Value' holds no value in 2 of 5 "
                                                  r"features \(the first: row 2\)"):
        _class_values(frame, None)


def test_class_values_given_as_text_of_digits_are_read_as_numbers():
    from chipflow.labels import _class_values

    frame = pd.DataFrame({"classvalue": pd.Series([1, "2", " 3"], dtype=object)})
    values, name = _class_values(frame, None)
    assert name == "classvalue" and values.tolist() == [1, 2, 3] and values.dtype == np.int64


@pytest.mark.parametrize("with_empty", [False, True])
def test_class_index_of_a_file_ranks_values_with_gaps(tmp_path, with_empty):
    """The numpy reader's class index: classes sorted by value, each feature's index into them
    (values unsorted, with gaps, up to 65535); a missing geometry is dropped with its value."""
    source = open_raster(str(KAMPALA_IMAGE))
    from chipflow.labels import _read_polygons_fast

    frame = gpd.read_file(KAMPALA_BUILDINGS).iloc[:6].to_crs(source.crs_wkt)  # the raster's: numpy reads it
    frame["classvalue"] = [65535, 7, 300, 7, 1, 300]
    if with_empty:
        frame.loc[1, "geometry"] = None
    path = tmp_path / "classes.gpkg"
    frame.to_file(path)
    labels = _read_polygons_fast(str(path), (str(path), None), class_value_field=None, source=source, buffer_radius=0,
                                 require_overlap=True)
    assert labels is not None
    expected = [v for i, v in enumerate(frame["classvalue"]) if not (with_empty and i == 1)]
    assert [c.value for c in labels.classes] == sorted(set(expected))
    assert labels.values.tolist() == expected and labels.class_index.dtype == np.int32
    assert len(labels.bounds) == len(expected)


def test_non_empty_out_folder_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(chipflow.OutputError, match=r"out_folder=.*is not empty.*overwrite=True"):
        chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS)
    assert (out / "keep.txt").read_text() == "mine"


def test_class_field_detection_names_and_repair():
    source = open_raster(str(KAMPALA_IMAGE))
    # No value field: every feature is class 1, named "1".
    labels = read_class_data(str(KAMPALA_BUILDINGS), class_value_field=None, source=source)
    assert [(c.value, c.name) for c in labels.classes] == [(1, "1")]
    frame = gpd.read_file(KAMPALA_BUILDINGS).iloc[:4].copy()
    frame["CLASSVALUE"] = [2, 5, 2, 5]
    frame["ClassName"] = ["hut", "tower", "hut", "tower"]
    bowtie = gpd.GeoSeries.from_wkt(["POLYGON ((0 0, 1 1, 1 0, 0 1, 0 0))"], crs=4326)
    x0, y0, x1, y1 = frame.total_bounds
    frame.loc[3, "geometry"] = gpd.GeoSeries(bowtie).scale(x1 - x0, y1 - y0, origin=(0, 0)).translate(x0, y0).iloc[0]
    frame.loc[2, "geometry"] = None
    labels = read_class_data(frame, class_value_field=None, source=source)
    assert [(c.value, c.name) for c in labels.classes] == [(2, "hut"), (5, "tower")]
    assert len(labels) == 3  # the empty one dropped
    import shapely
    assert shapely.is_valid(labels.geoms).all()  # the bow-tie repaired
    assert labels.values.tolist() == [2, 5, 5]
    relabelled = pickle.loads(pickle.dumps(labels))
    b = labels.bounds
    inside = np.flatnonzero((b[:, 0] <= 1024) & (b[:, 1] <= 1024) & (b[:, 2] >= 0) & (b[:, 3] >= 0))
    assert inside.size and relabelled.query((0, 0, 1024, 1024)).tolist() == inside.tolist()
    for name in ("bounds", "areas", "polygonal", "rectangles"):  # shipped, not recomputed: still equal
        np.testing.assert_array_equal(getattr(relabelled, name), getattr(labels, name))
    assert relabelled.fingerprint() == labels.fingerprint()


def _mixed_features(n: int = 3000, seed: int = 1) -> np.ndarray:
    """Rectangles in all eight vertex orders, rotated boxes, polygons with holes, multipolygons."""
    import shapely

    rng = np.random.default_rng(seed)
    x, y = rng.uniform(0, 2000, n), rng.uniform(0, 2000, n)
    w, h = rng.uniform(0.5, 40, n), rng.uniform(0.5, 40, n)
    h[:5] = 1500  # a few tall ones
    out = []
    for i in range(n):
        x0, y0, x1, y1 = x[i], y[i], x[i] + w[i], y[i] + h[i]
        kind = i % 5
        if kind < 3:
            ring = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
            start, step = i % 4, 1 if (i // 4) % 2 else -1
            out.append(shapely.Polygon([ring[(start + step * k) % 4] for k in range(4)]))
        elif kind == 3:
            out.append(shapely.affinity.rotate(shapely.box(x0, y0, x1, y1), 15 + i % 60))
        elif i % 2:
            out.append(shapely.box(x0, y0, x1, y1).difference(shapely.box(x0 + w[i] / 4, y0 + h[i] / 4,
                                                                          x0 + w[i] / 2, y0 + h[i] / 2)))
        else:
            out.append(shapely.MultiPolygon([shapely.box(x0, y0, x1, y1), shapely.box(x1 + 1, y0, x1 + 2, y1)]))
    return np.array(out, dtype=object)


def test_label_set_ships_rectangles_as_bounds_and_decodes_lazily_and_exactly():
    import shapely

    from chipflow.labels import ClassInfo, LabelSet

    geoms = _mixed_features()
    labels = LabelSet(geoms=geoms, class_index=np.zeros(len(geoms), np.int32),
                      classes=(ClassInfo(1, "a", (0, 0, 0)),), pixel_area=1.0)
    assert labels.rectangles.sum() == 3 * len(geoms) // 5  # every vertex order of a box is one
    shipped = pickle.dumps(labels)
    others = shapely.to_wkb(geoms[~labels.rectangles])
    # the derived arrays take 55 bytes a feature; a box's WKB alone would take 93 more
    assert sum(map(len, others)) < len(shipped) < sum(map(len, others)) + 60 * len(geoms)
    copy = pickle.loads(shipped)
    picked = np.array([7, 3, 8, 2999])  # rectangles and others
    np.testing.assert_array_equal(shapely.to_wkb(copy.geometries(picked)), shapely.to_wkb(geoms[picked]))
    assert copy._decoded.sum() == len(picked)  # only those were decoded
    # every geometry comes back coordinate for coordinate, vertex order included
    np.testing.assert_array_equal(shapely.to_wkb(copy.geoms), shapely.to_wkb(geoms))
    assert copy.fingerprint() == labels.fingerprint()
    moved = LabelSet(geoms=shapely.transform(geoms, lambda xy: xy + (0, 1e-6)), class_index=labels.class_index,
                     classes=labels.classes, pixel_area=1.0)
    assert moved.fingerprint() != labels.fingerprint()


@pytest.mark.parametrize("points", [False, True])
def test_label_set_query_finds_exactly_the_features_whose_bounds_meet_the_window(points):
    import shapely

    from chipflow.labels import ClassInfo, LabelSet

    geoms = _mixed_features(seed=2)
    if points:  # zero-size bounds, and windows whose edges they lie on
        geoms = shapely.points(np.round(shapely.get_coordinates(shapely.centroid(geoms))))
    labels = LabelSet(geoms=geoms, class_index=np.zeros(len(geoms), np.int32),
                      classes=(ClassInfo(1, "a", (0, 0, 0)),), pixel_area=1.0)
    b = labels.bounds
    rng = np.random.default_rng(3)
    for _ in range(200):
        x0, y0 = np.round(rng.uniform(-100, 2000, 2))
        x1, y1 = x0 + np.round(rng.uniform(0, 600)), y0 + np.round(rng.uniform(0, 600))
        expected = np.flatnonzero((b[:, 0] <= x1) & (b[:, 2] >= x0) & (b[:, 1] <= y1) & (b[:, 3] >= y0))
        assert labels.query((x0, y0, x1, y1)).tolist() == expected.tolist()
    tree = shapely.STRtree(geoms)  # the same as an R-tree's envelope query
    window = (500.0, 500.0, 900.0, 700.0)
    assert labels.query(window).tolist() == np.sort(tree.query(shapely.box(*window))).tolist()


def _pixel_features_in_map_space(source, seed: int = 4, multi: bool = True) -> gpd.GeoDataFrame:
    """Mixed features over ``source``, in its CRS: boxes, rotated boxes, holes, a bow-tie, a null
    and an empty geometry; and multipolygons (else their places get boxes)."""
    import shapely

    geoms = list(shapely.transform(_mixed_features(400, seed=seed), lambda xy: xy / 2))  # over 1024 px
    if not multi:
        geoms = [shapely.box(*g.bounds) if g.geom_type == "MultiPolygon" else g for g in geoms]
    geoms[5] = shapely.Polygon([(10, 10), (60, 60), (60, 10), (10, 60)])  # bow-tie: repaired
    geoms[6] = None
    geoms[7] = shapely.Polygon()
    geoms[8] = shapely.box(2000, 2000, 2010, 2010)  # off the raster: kept, as the general path does
    geoms[9] = shapely.Polygon([(100, 100), (140, 100), (140, 110), (110, 110), (110, 140), (100, 140)])  # L
    geoms[11] = shapely.Polygon([(200, 200), (240, 200), (210, 210), (200, 240)])  # a dart: concave
    pixels = np.array(geoms, dtype=object)
    a = source.affine
    mapped = shapely.transform(pixels, lambda xy: np.column_stack([a.a * xy[:, 0] + a.c, a.e * xy[:, 1] + a.f]))
    return gpd.GeoDataFrame({"classvalue": np.arange(400) % 3 + 1, "classname": ["x", "y", "z", "x"] * 100},
                            geometry=mapped, crs=source.crs_wkt)


@pytest.mark.parametrize("multi", [False, True], ids=["polygons", "promoted-to-multipolygons"])
@pytest.mark.parametrize("suffix", [".gpkg", ".parquet"])
@pytest.mark.parametrize("batch", [None, 90], ids=["one-batch", "batches-parsed-on-threads-as-read"])
def test_plain_polygons_read_with_numpy_equal_the_general_path(tmp_path, multi, suffix, batch, monkeypatch):
    """A layer of Polygons, and one GeoPackage stores as MultiPolygons (its features mix both);
    GeoParquet keeps each feature's own type. Read in one batch, and in five batches parsed on
    threads while the next is read, as large inputs are."""
    import threading

    import shapely

    import chipflow.labels
    from chipflow._wkb import simple_polygons
    from chipflow.labels import _arrow_vector

    if batch:
        monkeypatch.setattr(chipflow.labels, "_BATCH_ROWS", batch)
        monkeypatch.setattr(chipflow.labels.os, "cpu_count", lambda: 4)
        threads = []
        real = chipflow.labels._wkb_features
        monkeypatch.setattr(chipflow.labels, "_wkb_features", lambda wkb, source: threads.append(
            (len(wkb), threading.current_thread() is threading.main_thread())) or real(wkb, source))

    source = open_raster(str(KAMPALA_IMAGE))
    frame = _pixel_features_in_map_space(source, multi=multi)
    path = tmp_path / f"features{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)
        promoted = False
        general_frame = gpd.read_parquet(path)
    else:
        frame.to_file(path)
        promoted = multi
        general_frame = gpd.read_file(path)
    with _arrow_vector(str(path)) as (batches, column, crs):
        table = batches.read_all()
    assert pyproj.CRS.from_user_input(crs).equals(pyproj.CRS.from_user_input(source.crs_wkt))
    parsed = simple_polygons(table.column(column))
    several = 400 // 10 if multi else 0  # every 10th has a hole; with multi the next has two parts
    assert parsed.simple.sum() == 400 - 2 - 400 // 10 - several + 1  # nor the null and the empty; the L
    assert parsed.multi.all() == promoted
    fast = read_class_data(str(path), class_value_field=None, source=source)
    general = read_class_data(general_frame, class_value_field=None, source=source)
    assert len(fast) == len(general) == 398  # the null and the empty dropped
    if batch:  # the first four on the pool, the last on the reading thread
        assert sorted(threads) == [(40, True)] + [(90, False)] * 4
    if not promoted:  # rectangles never became shapely objects
        assert fast.rectangles.sum() > 200 and (fast._geoms[fast.rectangles] == None).all()  # noqa: E711
    assert fast.classes == general.classes
    np.testing.assert_array_equal(fast.class_index, general.class_index)
    for name in ("bounds", "polygonal", "rectangles", "_corners"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(general, name), err_msg=name)
    repaired = 5  # repaired in pixel space by one, in map space by the other: the same up to rounding
    same = np.arange(len(fast)) != repaired
    np.testing.assert_array_equal(fast.areas[same], general.areas[same])  # GEOS's areas, to the bit
    np.testing.assert_allclose(fast.areas, general.areas, rtol=1e-12)
    if not promoted:  # one-ring polygons travel as coordinates, the rest as WKB
        assert fast._plain.sum() > 40 and not (fast._plain & fast.rectangles).any()
        assert fast._plain[[7, 9]].all()  # the L and the dart (rows 9 and 11; rows 6 and 7 dropped)
    np.testing.assert_array_equal(shapely.to_wkb(fast.geoms[same]), shapely.to_wkb(general.geoms[same]))
    assert shapely.equals_exact(shapely.normalize(fast.geoms[repaired]),
                                shapely.normalize(general.geoms[repaired]), tolerance=1e-6)
    pickled = pickle.loads(pickle.dumps(fast))
    np.testing.assert_array_equal(shapely.to_wkb(pickled.geoms[same]), shapely.to_wkb(general.geoms[same]))


def _wkb_column(geoms, byte_order: int = 1):
    import pyarrow as pa
    import shapely

    return pa.array(shapely.to_wkb(np.asarray(geoms, dtype=object), byte_order=byte_order).tolist(), pa.binary())


def test_a_file_failing_part_way_is_read_by_the_general_path_and_a_parsing_error_is_not_hidden(
        tmp_path, monkeypatch):
    """The numpy reader streams batches: a read error after the first batch sends the file to the
    general path (the same features as reading it there); an error in chipflow's own parsing is
    raised, not taken for an unreadable file."""
    import contextlib

    import chipflow.labels

    source = open_raster(str(KAMPALA_IMAGE))
    path = tmp_path / "features.gpkg"
    _pixel_features_in_map_space(source, multi=False).to_file(path)
    general = read_class_data(gpd.read_file(path), class_value_field=None, source=source)
    real = chipflow.labels._arrow_vector
    monkeypatch.setattr(chipflow.labels, "_BATCH_ROWS", 100)

    @contextlib.contextmanager
    def failing(name):
        with real(name) as (batches, column, crs):
            def stream():
                yield next(iter(batches))
                raise OSError("disk gone")
            yield stream(), column, crs

    monkeypatch.setattr(chipflow.labels, "_arrow_vector", failing)
    parsed = []
    monkeypatch.setattr(chipflow.labels, "_wkb_features", lambda wkb, src: parsed.append(len(wkb)))
    fallback = read_class_data(str(path), class_value_field=None, source=source)
    assert parsed == []  # the first batch was never parsed: the error came before the next batch
    np.testing.assert_array_equal(fallback.bounds, general.bounds)
    np.testing.assert_array_equal(fallback.class_index, general.class_index)

    monkeypatch.setattr(chipflow.labels, "_arrow_vector", real)
    monkeypatch.setattr(chipflow.labels, "_wkb_features", lambda wkb, src: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        read_class_data(str(path), class_value_field=None, source=source)


@pytest.mark.parametrize("case", ["boxes", "one-part-multipolygons", "hexagons", "one-big-endian", "one-open",
                                  "a-null"])
def test_wkb_of_one_record_size_parses_as_a_table_like_the_gather(case, monkeypatch):
    """Every row's WKB of one size (a layer of boxes): read as a table of records when each is a
    plain polygon, else by the general gather; the two give the same arrays."""
    import shapely

    import chipflow._wkb as wkb

    rng = np.random.default_rng(7)
    x, y = rng.uniform(0, 1000, (2, 300))
    boxes = shapely.box(x, y, x + rng.uniform(1, 30, 300), y + rng.uniform(1, 30, 300))
    from shapely.affinity import rotate

    rows: list = [rotate(b, float(a)) for b, a in zip(boxes, rng.uniform(0, 90, 300), strict=True)]
    if case == "one-part-multipolygons":
        rows = [shapely.MultiPolygon([r]) for r in rows]
    elif case == "hexagons":
        rows = [shapely.Polygon([(a + 5 * np.cos(t), b + 5 * np.sin(t)) for t in np.linspace(0, 2 * np.pi, 6, endpoint=False)])
                for a, b in zip(x, y, strict=True)]
    column = _wkb_column(rows)
    if case == "one-big-endian":
        column = _wkb_column(rows[:100]).to_pylist() + [shapely.to_wkb(rows[100], byte_order=0)] + \
            _wkb_column(rows[101:]).to_pylist()
    elif case == "one-open":  # the last point of row 50 moved: not closed, left to shapely
        column = column.to_pylist()
        column[50] = column[50][:-8] + np.float64(1e6).tobytes()
    elif case == "a-null":
        column = column.to_pylist()
        column[20] = None
    import pyarrow as pa

    column = pa.array(column, pa.binary()) if isinstance(column, list) else column
    assert len(set(map(len, (v for v in column.to_pylist() if v is not None)))) == 1  # one record size
    used = []
    real = wkb._uniform
    monkeypatch.setattr(wkb, "_uniform", lambda records: used.append(real(records)) or used[-1])
    table = wkb.simple_polygons(column)
    monkeypatch.setattr(wkb, "_uniform", lambda records: None)
    gathered = wkb.simple_polygons(column)
    for name in ("simple", "coords", "counts", "multi"):
        expected, got = getattr(gathered, name), getattr(table, name)
        assert got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    as_table = case in ("boxes", "one-part-multipolygons", "hexagons")
    assert (used[-1] is not None) == as_table if used else case == "a-null"
    assert table.simple.sum() == 300 - (case in ("one-big-endian", "one-open", "a-null"))
    assert table.multi.all() == (case == "one-part-multipolygons")
    np.testing.assert_array_equal(table.coords, shapely.get_coordinates(
        np.asarray(rows, dtype=object)[table.simple]))


def test_a_layer_of_quadrilaterals_only_reads_like_the_general_path(tmp_path):
    """Boxes and rotated boxes only (every ring five points: no gather needed)."""
    import shapely

    source = open_raster(str(KAMPALA_IMAGE))
    frame = _pixel_features_in_map_space(source, multi=False)
    quads = shapely.get_num_coordinates(frame.geometry.to_numpy()) == 5
    frame = frame[quads & (frame.index != 5)]  # no bow-tie
    frame.to_file(tmp_path / "quads.gpkg")
    fast = read_class_data(str(tmp_path / "quads.gpkg"), class_value_field=None, source=source)
    general = read_class_data(frame, class_value_field=None, source=source)
    assert len(fast) == len(frame) > 300 and fast._plain.sum() > 50
    for name in ("bounds", "areas", "rectangles", "_corners"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(general, name), err_msg=name)
    np.testing.assert_array_equal(shapely.to_wkb(fast.geoms), shapely.to_wkb(general.geoms))
    # the convex ones that are not rectangles (rotated boxes) are marked, on the wire too, with their corners
    rings = shapely.get_coordinates(general.geoms).reshape(-1, 5, 2)
    expected = _strictly_convex(rings) & ~general.rectangles
    assert expected.sum() > 50 and (~expected).sum() > 200  # the dart is not convex
    for labels in (fast, pickle.loads(pickle.dumps(fast))):
        np.testing.assert_array_equal(labels.quads, expected)
        which = np.flatnonzero(expected)[::-1]
        np.testing.assert_array_equal(labels.quad_vertices(which), rings[which, :4])
    assert not general.quads.any()  # frames: none (GEOS clips them)


def test_a_layer_named_in_a_geopackage_is_read_on_the_numpy_path(tmp_path, monkeypatch):
    """``file.gpkg/layer`` in the raster's CRS: the fast reader reads that layer, not the file's first."""
    from chipflow import labels as labels_mod
    from chipflow.pipeline import _inputs_exist

    source = open_raster(str(KAMPALA_IMAGE))
    frame = _pixel_features_in_map_space(source, multi=False)
    gpkg = tmp_path / "two.gpkg"
    frame.iloc[:3].to_file(gpkg, layer="first")
    frame.to_file(gpkg, layer="second")
    general = read_class_data(frame, class_value_field=None, source=source)

    def no_general_path(*args, **kwargs):
        raise AssertionError("the general path read the layer")

    monkeypatch.setattr(labels_mod, "_read_frame", no_general_path)
    fast = read_class_data(f"{gpkg}/second", class_value_field=None, source=source)
    assert len(fast) == len(general) > 300
    np.testing.assert_array_equal(fast.bounds, general.bounds)
    assert _inputs_exist(make_config(KAMPALA_IMAGE, "x"), f"{gpkg}/second")  # the cluster starts early
    assert not _inputs_exist(make_config(KAMPALA_IMAGE, "x"), f"{tmp_path}/none.gpkg/second")


@pytest.mark.parametrize("fmt", ["PASCAL_VOC_rectangles", "KITTI_rectangles"])
def test_box_labels_of_rotated_boxes_clipped_with_numpy_equal_geos(tmp_path, client, fmt):
    """A file's rotated boxes (clipped with numpy in the blocks) label every chip byte for byte as
    the same features from a GeoDataFrame do (GEOS's clipping)."""
    import shapely

    source = open_raster(str(KAMPALA_IMAGE))
    frame = _pixel_features_in_map_space(source, multi=False)
    frame.to_file(tmp_path / "features.gpkg")
    fast = read_class_data(str(tmp_path / "features.gpkg"), class_value_field=None, source=source)
    assert fast.quads.sum() > 50
    kw = dict(metadata_format=fmt, tile_size_x=200, tile_size_y=200, stride_x=150, stride_y=150, client=client)
    chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "file", tmp_path / "features.gpkg", **kw)
    chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "frame", frame, **kw)
    files = sorted(p.name for p in (tmp_path / "file" / "labels").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "frame" / "labels").iterdir()) and len(files) > 20
    for name in files:
        assert (tmp_path / "file" / "labels" / name).read_bytes() == \
            (tmp_path / "frame" / "labels" / name).read_bytes(), name
    # and the chips' edges cut many rotated boxes
    quads, cut = fast.geoms[fast.quads], 0
    for y in range(0, source.height - 199, 150):
        for x in range(0, source.width - 199, 150):
            part = shapely.area(shapely.clip_by_rect(quads, x, y, x + 200, y + 200))
            cut += int(((part > 0) & (part < shapely.area(quads))).sum())
    assert cut > 20


def test_plain_polygon_reading_keeps_the_general_errors(tmp_path):
    source = open_raster(str(KAMPALA_IMAGE))
    frame = _pixel_features_in_map_space(source).iloc[:20]
    mixed = pd.concat([frame, gpd.GeoDataFrame({"classvalue": [1]}, geometry=[frame.geometry.iloc[0].centroid],
                                               crs=frame.crs)], ignore_index=True)
    mixed.to_file(tmp_path / "mixed.gpkg")
    with pytest.raises(chipflow.LabelError, match=r"mixes geometry types \(1 points, 18 polygons\)"):
        read_class_data(str(tmp_path / "mixed.gpkg"), class_value_field=None, source=source)
    far = frame.copy()
    far["geometry"] = far.geometry.translate(10_000, 0)
    far.to_file(tmp_path / "far.gpkg")
    with pytest.raises(chipflow.LabelError, match=r"does not overlap"):
        read_class_data(str(tmp_path / "far.gpkg"), class_value_field=None, source=source)
    with pytest.raises(chipflow.LabelError, match=r"class_value_field='klass' is not a field.*'classname'"):
        read_class_data(str(tmp_path / "far.gpkg"), class_value_field="klass", source=source)


def test_class_names_are_each_values_first_name_blanks_and_missing_skipped():
    from chipflow.labels import _class_names

    frame = pd.DataFrame({"classname": [None, " ", "  roof ", "pool", "other roof", np.nan, 7]})
    values = np.array([1, 1, 1, 2, 1, 3, 4])
    names = _class_names(gpd.GeoDataFrame(frame, geometry=[None] * 7), values)
    assert names == {1: "roof", 2: "pool", 4: "7"}


def test_class_data_without_crs_or_overlap_is_refused():
    source = open_raster(str(KAMPALA_IMAGE))
    frame = gpd.GeoDataFrame(geometry=[box(0, 0, 1, 1)])
    with pytest.raises(chipflow.LabelError, match="no coordinate reference system"):
        read_class_data(frame, class_value_field=None, source=source)
    far = gpd.GeoDataFrame(geometry=[box(3627854.0 + 1000, 38753.0, 3627854.0 + 1010, 38763.0)],
                           crs=3857)
    with pytest.raises(chipflow.LabelError, match=r"does not overlap.*923.3\d* map units"):
        read_class_data(far, class_value_field=None, source=source)
    assert np.isfinite(source.cell_size).all()


def _kampala_box(source, x0, y0, x1, y1):
    """A box in the Kampala raster's CRS, from pixel coordinates."""
    a = source.affine
    return box(*(a @ (x0, y1)), *(a @ (x1, y0)))


def test_class_data_in_degrees_whose_coordinates_are_not_degrees_is_refused():
    # GeoJSON is read as WGS 84: projected coordinates in it became a GEOSException deep in the repair
    source = open_raster(str(KAMPALA_IMAGE))
    frame = gpd.GeoDataFrame(geometry=[_kampala_box(source, 10, 10, 50, 50)], crs=4326)
    with pytest.raises(chipflow.LabelError,
                       match=r"in_class_data=<GeoDataFrame.*EPSG:4326.*outside longitude/latitude"):
        read_class_data(frame, class_value_field=None, source=source)


@pytest.mark.parametrize("crs", ["raster", "EPSG:4326"])
def test_a_geometry_geos_cannot_read_names_the_class_data(tmp_path, crs):
    import json

    source = open_raster(str(KAMPALA_IMAGE))
    good = _kampala_box(source, 10, 10, 50, 50)
    if crs != "raster":
        good = gpd.GeoSeries([good], crs=source.crs_wkt).to_crs(crs).iloc[0]
    ring = [list(xy) for xy in good.exterior.coords]
    features = [{"type": "Feature", "properties": {"value": 1},
                 "geometry": {"type": "Polygon", "coordinates": [ring]}},
                {"type": "Feature", "properties": {"value": 2},  # a ring not closed: GDAL reads it
                 "geometry": {"type": "Polygon", "coordinates": [ring[:4]]}}]
    srs = pyproj.CRS(source.crs_wkt if crs == "raster" else crs).to_epsg()
    path = tmp_path / "unclosed.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features, "crs": {
        "type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{srs}"}}}))
    with pytest.raises(chipflow.LabelError, match=rf"in_class_data='{re.escape(str(path))}'.*geometr"):
        read_class_data(str(path), class_value_field=None, source=source)
    from chipflow.labels import read_mask

    with pytest.raises(chipflow.LabelError, match=rf"in_mask_polygons='{re.escape(str(path))}'.*geometr"):
        read_mask(str(path), source)


@pytest.mark.parametrize("given", ["frame", "gpkg"])
def test_features_that_collapse_when_repaired_are_counted_in_a_warning(tmp_path, given):
    source = open_raster(str(KAMPALA_IMAGE))
    a = source.affine
    flat = shapely_polygon([a @ (100, 100), a @ (120, 100), a @ (140, 100), a @ (100, 100)])  # zero area
    frame = gpd.GeoDataFrame({"value": [1, 2]}, geometry=[_kampala_box(source, 10, 10, 50, 50), flat],
                             crs=source.crs_wkt)
    data = frame
    if given == "gpkg":  # the numpy reader's path (same CRS as the raster)
        data = str(tmp_path / "flat.gpkg")
        frame.to_file(data)
    with pytest.warns(chipflow.ChipflowWarning, match=r"in_class_data=.*1 feature .*collapsed.*dropped"):
        labels = read_class_data(data, class_value_field=None, source=source)
    assert len(labels) == 1 and labels.values.tolist() == [1]


def shapely_polygon(points):
    import shapely

    return shapely.Polygon(points)


def test_arcpy_booleans_spelled_as_words_and_home_relative_paths(tmp_path, monkeypatch):
    cfg = make_config("in.tif", "out", output_nofeature_tiles="true", blacken_around_feature="False")
    assert cfg.output_nofeature_tiles is NoFeatureTiles.ALL_TILES and cfg.blacken_around_feature is False
    cfg = make_config("in.tif", "out", output_nofeature_tiles="FALSE", blacken_around_feature="true")
    assert cfg.output_nofeature_tiles is NoFeatureTiles.ONLY_TILES_WITH_FEATURES and cfg.blacken_around_feature
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = make_config("~/image.tif", "~/chips")
    assert cfg.in_raster == (str(tmp_path / "image.tif"),) and cfg.out_folder == str(tmp_path / "chips")
    from chipflow.config import home_expanded

    assert home_expanded("~/b.gpkg/layer") == str(tmp_path / "b.gpkg" / "layer")
    assert home_expanded("b.gpkg") == "b.gpkg" and home_expanded(None) is None


def test_the_embedded_cluster_is_not_the_process_default_client():
    """A second export started meanwhile (another thread) must not borrow, then lose, the first's cluster."""
    import subprocess
    import sys

    script = (  # a fresh process: this one's session client is the current client of every test
        "import contextlib\n"
        "from chipflow._dask import _has_default_client, _local_client\n"
        "if __name__ == '__main__':\n"
        "    with contextlib.ExitStack() as stack:\n"
        "        made = _local_client(1, stack)\n"
        "        print(made.status, _has_default_client())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["running", "False"], done.stderr[-2000:]
