"""Inputs: several rasters (mosaic or item by item), extent, cell size, pixel space."""

from __future__ import annotations

import json
import warnings

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE, textured
from labels_io import chip_ids, read_kitti, read_voc, source_window
from rasterio.control import GroundControlPoint
from shapely.geometry import box
from test_export import T

import chipflow
from chipflow.errors import ChipflowWarning


@pytest.fixture(scope="module")
def kampala_tiles(tmp_path_factory):
    """The Kampala image cut into 4 files of 512² (a folder of scenes)."""
    folder = tmp_path_factory.mktemp("tiles")
    with rasterio.open(KAMPALA_IMAGE) as src:
        profile = src.profile
        for r in range(2):
            for c in range(2):
                window = rasterio.windows.Window(c * 512, r * 512, 512, 512)
                profile.update(width=512, height=512, transform=src.window_transform(window))
                with rasterio.open(folder / f"scene_{r}{c}.tif", "w", **profile) as dst:
                    dst.write(src.read(window=window))
    return folder


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".chipflow" not in p.parts}


def test_a_folder_mosaicked_equals_the_single_raster(client, kampala_tiles, tmp_path):
    args = dict(metadata_format="PASCAL_VOC_rectangles", stride_x=256, stride_y=256, client=client)
    chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "one", KAMPALA_BUILDINGS, **args)
    r = chipflow.export_training_data(str(kampala_tiles), tmp_path / "mosaic", KAMPALA_BUILDINGS, **args)
    one, mosaic = tree(tmp_path / "one"), tree(tmp_path / "mosaic")
    assert sorted(one) == sorted(mosaic)
    emd = json.loads(mosaic.pop("esri_model_definition.emd"))
    assert emd["InputRastersProps"]["RasterCount"] == 4
    one.pop("esri_model_definition.emd")
    one.pop("chips.parquet"), mosaic.pop("chips.parquet")  # its source column names the inputs
    assert [k for k in one if one[k] != mosaic[k]] == []  # chips, labels, stats: byte for byte
    assert r.num_chips == 16


def test_items_separately_each_on_its_own_grid_with_unique_names(client, kampala_tiles, tmp_path):
    out = tmp_path / "items"
    files = sorted(str(p) for p in kampala_tiles.glob("*.tif"))
    r = chipflow.export_training_data(str(kampala_tiles / "scene_*.tif"), out, KAMPALA_BUILDINGS,
                                      processing_mode="PROCESS_ITEMS_SEPARATELY", stride_x=200,
                                      stride_y=200, output_nofeature_tiles="ALL_TILES", client=client)
    per_item = ((512 - 256) // 200 + 1) ** 2  # 2 x 2 chips in each 512² item
    assert r.num_chips == 4 * per_item and chip_ids(out) == list(range(16))
    for i in range(16):
        chip, window = source_window(out / "images" / f"{i:09d}.tif", files[i // per_item])
        np.testing.assert_array_equal(chip, window)
    assert len((out / "map.txt").read_text().splitlines()) == 16
    from click.testing import CliRunner

    from chipflow.cli import main

    text = CliRunner().invoke(main, ["plan", str(kampala_tiles / "scene_*.tif"), "--in-class-data",
                                     str(KAMPALA_BUILDINGS), "--processing-mode", "PROCESS_ITEMS_SEPARATELY",
                                     "--stride-x", "200", "--stride-y", "200"]).output
    assert "2 rows x 2 columns = 16 chips" in text  # the first item's grid, every item's chips
    assert "4 rasters on their own grids: the raster, rows and columns above are the first's" in text


def test_extent_clips_the_grid_to_whole_source_pixels(client, tmp_path):
    with rasterio.open(KAMPALA_IMAGE) as ds:
        t = ds.transform
    x0, y1 = t * (300.4, 200.2)
    x1, y0 = t * (900, 800)
    out = tmp_path / "extent"
    r = chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, extent=(x0, y0, x1, y1),
                                      stride_x=256, stride_y=256, output_nofeature_tiles="ALL_TILES",
                                      client=client)
    # the window snaps outward to columns 300..900 and rows 200..800: 600 x 600 pixels, 2 x 2 chips
    assert r.num_chips == 4
    chip, window = source_window(out / "images" / "000000003.tif", KAMPALA_IMAGE)
    np.testing.assert_array_equal(chip, window)
    with rasterio.open(out / "images" / "000000000.tif") as ds:
        assert ds.transform.almost_equals(t @ Affine.translation(300, 200))


def test_cell_size_resamples_image_and_labels(client, make_raster, tmp_path):
    data = np.kron(textured((1, 64, 64)), np.ones((1, 4, 4), np.uint8))  # 4x4 blocks of one value
    raster = make_raster(data, transform=Affine(1.0, 0, 1000.0, 0, -1.0, 2000.0))
    feature = box(1000 + 40, 2000 - 100, 1000 + 80, 2000 - 60)  # pixels 40..80, 60..100 at 1 m
    features = gpd.GeoDataFrame(geometry=[feature], crs="EPSG:32633")
    out = tmp_path / "cell"
    r = chipflow.export_training_data(raster, out, features, cell_size=4, tile_size_x=32, tile_size_y=32,
                                      stride_x=32, stride_y=32, output_nofeature_tiles="ALL_TILES",
                                      metadata_format="KITTI_rectangles", client=client)
    assert r.num_chips == 4  # 256 m at 4 m = 64 px: 2 x 2 chips of 32
    with rasterio.open(out / "images" / "000000000.tif") as ds:
        assert ds.res == (4.0, 4.0)
        np.testing.assert_array_equal(ds.read(1), data[0, ::4, ::4][:32, :32])
    _, boxes = read_kitti(out / "labels" / "000000000.txt")
    np.testing.assert_allclose(boxes, [[10, 15, 20, 25]])


def test_pixel_space_on_a_raster_without_crs(client, make_raster, tmp_path):
    raster = make_raster(textured((3, 300, 300)), crs=None, transform=None)
    boxes = gpd.GeoDataFrame(geometry=[box(10, 20, 50, 60)])  # pixel coordinates, no CRS
    with pytest.raises(chipflow.RasterError, match="PIXEL_SPACE"):
        chipflow.export_training_data(raster, tmp_path / "map", boxes, client=client)
    out = tmp_path / "px"
    chipflow.export_training_data(raster, out, boxes, reference_system="pixel_space", tile_size_x=128,
                                  tile_size_y=128, stride_x=128, stride_y=128, client=client,
                                  metadata_format="PASCAL_VOC_rectangles")
    _, got = read_voc(out / "labels" / "000000000.xml")
    np.testing.assert_allclose(got, [[10, 20, 50, 60]])
    emd = json.loads((out / "esri_model_definition.emd").read_text())
    assert emd["ImageSpaceUsed"] == "PIXEL_SPACE"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        ds, src = rasterio.open(out / "images" / "000000000.tif"), rasterio.open(raster)
    with ds, src:
        assert ds.crs is None and ds.transform == Affine.identity()
        if True:
            np.testing.assert_array_equal(ds.read(), src.read(window=rasterio.windows.Window(0, 0, 128, 128)))


def test_pixel_space_maps_labels_through_gcps(client, tmp_path):
    raster = tmp_path / "gcps.tif"
    # a raster placed only by 4 GCPs: a 10 m grid rotated by 90 degrees relative to the image
    gcps = [GroundControlPoint(row=0, col=0, x=500000, y=4000000),
            GroundControlPoint(row=0, col=300, x=500000, y=4000000 - 3000),
            GroundControlPoint(row=300, col=0, x=500000 - 3000, y=4000000),
            GroundControlPoint(row=300, col=300, x=500000 - 3000, y=4000000 - 3000)]
    with rasterio.open(raster, "w", driver="GTiff", width=300, height=300, count=1, dtype="uint8",
                       gcps=gcps, crs="EPSG:32633") as ds:
        ds.write(textured((1, 300, 300)))
    # map box x in [499500, 499800] (rows 20..50), y in [3999000, 3999400] (cols 60..100)
    features = gpd.GeoDataFrame(geometry=[box(499500, 3999000, 499800, 3999400)], crs="EPSG:32633")
    out = tmp_path / "px"
    chipflow.export_training_data(raster, out, features, reference_system="PIXEL_SPACE", tile_size_x=128,
                                  tile_size_y=128, stride_x=128, stride_y=128, client=client,
                                  metadata_format="KITTI_rectangles")
    _, got = read_kitti(out / "labels" / "000000000.txt")
    np.testing.assert_allclose(got, [[60, 20, 100, 50]], atol=0.01)
    # in map space (the default) the points are no geotransform: said so, not "no overlap"
    with pytest.raises(chipflow.RasterError, match=r"in_raster=.*gcps\.tif.*4 ground control points only.*"
                                                   "reference_system='PIXEL_SPACE'"):
        chipflow.export_training_data(raster, tmp_path / "map", features, client=client)
    assert not (tmp_path / "map").exists()


def test_a_flipped_raster_names_the_parameter_that_would_resample_it(client, make_raster, tmp_path):
    south_up = make_raster(textured((3, 128, 128)), transform=Affine(2.0, 0, 500000.0, 0, 2.0, 3999744.0))
    boxes = gpd.GeoDataFrame(geometry=[box(500010, 3999760, 500050, 3999800)], crs="EPSG:32633")
    for kw, says in (({"cell_size": 4.0}, "resampled to cell_size=4.0"),
                     ({"extent": (500000, 3999744, 500128, 3999872)}, r"clipped to extent=\(500000")):
        with pytest.raises(chipflow.RasterError, match=rf"flipped geotransform and cannot be {says}"):
            chipflow.export_training_data(south_up, tmp_path / "o", boxes, **kw)
    assert not (tmp_path / "o").exists()


def test_image_space_is_pixel_space_with_a_warning(client, make_raster, tmp_path):
    raster = make_raster(textured((3, 256, 256)), crs=None, transform=None)
    boxes = gpd.GeoDataFrame(geometry=[box(10, 20, 50, 60)])
    with pytest.warns(ChipflowWarning, match="IMAGE_SPACE"):
        chipflow.export_training_data(raster, tmp_path / "img", boxes, reference_system="IMAGE_SPACE",
                                      client=client)
    assert chip_ids(tmp_path / "img") == [0]


def test_mismatched_inputs_are_refused(make_raster, tmp_path, kampala_tiles):
    other = make_raster(textured((4, 256, 256)), name="four.tif")
    with pytest.raises(chipflow.InvalidParameterError, match=r"in_raster=.*four.tif.*band count"):
        chipflow.export_training_data([str(kampala_tiles / "scene_00.tif"), str(other)], tmp_path / "o",
                                      KAMPALA_BUILDINGS)
    with pytest.raises(chipflow.InputNotFoundError, match=r"in_raster=.*nothing_\*.tif.*matches no file"):
        chipflow.export_training_data(str(tmp_path / "nothing_*.tif"), tmp_path / "o", KAMPALA_BUILDINGS)
    with pytest.raises(chipflow.InvalidParameterError, match=r"extent=.*does not overlap"):
        chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "o", KAMPALA_BUILDINGS, extent=(0, 0, 1, 1))
    assert not (tmp_path / "o").exists()


def test_a_mosaic_of_items_with_other_nodata_values_and_complex_rasters_are_refused(make_raster, tmp_path):
    """Mosaicked, b's nodata (255) would read as data and a's (0) would hide b's valid zeros: refused."""
    a = make_raster(textured((3, 128, 128)), name="a.tif", nodata=0)
    b = make_raster(textured((3, 128, 128)), name="b.tif", nodata=255,
                    transform=T @ rasterio.Affine.translation(128, 0))
    none = make_raster(textured((3, 128, 128)), name="none.tif", transform=T @ rasterio.Affine.translation(0, 128))
    boxes = gpd.GeoDataFrame(geometry=[box(*(T * (10, 20)), *(T * (40, 5)))], crs="EPSG:32633")
    for items, shown in (([a, b], r"a\.tif: 0, b\.tif: 255"), ([a, none], r"a\.tif: 0, none\.tif: none")):
        with pytest.raises(chipflow.InvalidParameterError,
                           match=rf"in_raster=.*mosaics items of different nodata values \({shown}\).*"
                                 "PROCESS_ITEMS_SEPARATELY"):
            chipflow.export_training_data([str(p) for p in items], tmp_path / "o", boxes)
    with rasterio.open(tmp_path / "cx.tif", "w", driver="GTiff", width=64, height=64, count=1, dtype="complex64",
                       crs="EPSG:32633", transform=T) as ds:
        ds.write(np.ones((1, 64, 64), np.complex64))
    with pytest.raises(chipflow.RasterError, match=r"in_raster=.*cx\.tif.*data type complex64"):
        chipflow.export_training_data(str(tmp_path / "cx.tif"), tmp_path / "o", boxes)
    assert not (tmp_path / "o").exists()


def test_items_in_other_crss_get_footprints_in_the_index_crs(client, kampala_tiles, tmp_path):
    """chips.parquet has one CRS (the first item's): a UTM item's footprints are reprojected into it."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    folder = tmp_path / "mixed"
    folder.mkdir()
    first = kampala_tiles / "scene_00.tif"
    (folder / "a.tif").write_bytes(first.read_bytes())
    with rasterio.open(first) as src:
        transform, width, height = calculate_default_transform(src.crs, "EPSG:32636", src.width, src.height,
                                                               *src.bounds)
        profile = src.profile | {"crs": "EPSG:32636", "transform": transform, "width": width, "height": height}
        with rasterio.open(folder / "b.tif", "w", **profile) as dst:
            for band in range(1, src.count + 1):
                reproject(rasterio.band(src, band), rasterio.band(dst, band), resampling=Resampling.nearest)
        area = shapely.box(*src.bounds)
    r = chipflow.export_training_data(str(folder), tmp_path / "out", KAMPALA_BUILDINGS, client=client,
                                      processing_mode="PROCESS_ITEMS_SEPARATELY", stride_x=256, stride_y=256,
                                      output_nofeature_tiles="ALL_TILES")
    index = gpd.read_parquet(tmp_path / "out" / "chips.parquet")
    assert index.crs.to_epsg() == 3857 and len(index) == r.num_chips
    utm = index[index["source"].str.endswith("b.tif")]
    assert len(utm) > 0
    assert utm.geometry.within(area.buffer(50)).all(), utm.geometry.bounds  # on Kampala, not at x≈450,000


def _source_pixels_under(chip_path, raster):
    """Each chip pixel and the source pixel under its centre, for the pixels inside the source."""
    with rasterio.open(raster) as src, rasterio.open(chip_path) as chip:
        source = src.read(1)
        to_source = ~src.transform * chip.transform
        rows, cols = np.mgrid[0:chip.height, 0:chip.width] + 0.5
        sx = np.floor(to_source.a * cols + to_source.b * rows + to_source.c).astype(int)
        sy = np.floor(to_source.d * cols + to_source.e * rows + to_source.f).astype(int)
        inside = (sx >= 0) & (sy >= 0) & (sx < src.width) & (sy < src.height)
        return chip.read(1)[inside], source[sy[inside], sx[inside]]


@pytest.mark.parametrize("kw", [{"edge_policy": "PAD"}, {"rotation_angle": 90}])
def test_a_rotated_geotransform_reads_past_its_edge_without_resampling(client, make_raster, tmp_path, kw):
    # rasterio's boundless read warps a rotated geotransform north-up: every pixel read past the
    # edge (PAD's edge chips, a rotated chip's reach) came back resampled
    transform = Affine(1.8, 0.6, 1000, 0.6, -1.8, 2000)
    raster = make_raster(textured((1, 200, 300), seed=3), transform=transform)
    ring = [transform @ xy for xy in ((10, 20), (30, 20), (30, 50), (10, 50))]
    features = gpd.GeoDataFrame({"value": [1]}, geometry=[shapely.Polygon(ring)], crs="EPSG:32633")
    chipflow.export_training_data(raster, tmp_path / "o", features, tile_size_x=64, tile_size_y=64,
                                  stride_x=64, stride_y=64, output_nofeature_tiles="ALL_TILES",
                                  client=client, **kw)
    chips = sorted((tmp_path / "o" / "images").glob("*.tif"))
    assert len(chips) >= 20
    for chip in chips:
        got, want = _source_pixels_under(chip, raster)
        assert got.size and np.array_equal(got, want), chip.name


def test_a_mosaic_with_nan_nodata_fills_an_earlier_items_nan_from_a_later_item(client, make_raster, tmp_path):
    # NaN == NaN is False: NaN pixels counted as data and hid the later item's pixels under them
    a = np.full((1, 100, 100), 10, "float32")
    a[:, :, 50:] = np.nan
    make_raster(a, transform=Affine(2, 0, 1000, 0, -2, 2000), nodata=np.nan, name="scenes/a.tif")
    make_raster(np.full((1, 100, 100), 20, "float32"), transform=Affine(2, 0, 1100, 0, -2, 2000),
                nodata=np.nan, name="scenes/b.tif")
    features = gpd.GeoDataFrame({"value": [1]}, geometry=[box(1000, 1600, 1400, 2000)], crs="EPSG:32633")
    chipflow.export_training_data(tmp_path / "scenes", tmp_path / "o", features, tile_size_x=150,
                                  tile_size_y=100, stride_x=150, stride_y=100, client=client)
    with rasterio.open(tmp_path / "o" / "images" / "000000000.tif") as chip:
        row = chip.read(1)[0]
    assert row[:50].tolist() == [10] * 50 and row[50:150].tolist() == [20] * 100
