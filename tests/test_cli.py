import json

from click.testing import CliRunner
from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE, NC

from chipflow.cli import main


def test_export_prints_a_summary_and_writes_the_dataset(client, tmp_path):
    out = tmp_path / "o"
    address = client.scheduler.address
    res = CliRunner().invoke(main, [
        "export", str(KAMPALA_IMAGE), str(out), "--in-class-data", str(KAMPALA_BUILDINGS),
        "--metadata-format", "pascal_voc_rectangles", "--tile-size-x", "512", "--tile-size-y", "512",
        "--stride-x", "256", "--stride-y", "256", "--output-nofeature-tiles", "ALL_TILES",
        "--scheduler", address,
    ])
    assert res.exit_code == 0, res.output
    assert "chips               9" in res.output and "chips/s" in res.output and str(out) in res.output
    assert "9/9" in res.stderr and "Dask dashboard: http" in res.stderr  # the progress bar
    stats = json.loads((out / "esri_accumulated_stats.json").read_text())
    assert stats["NumTiles"] == 9 and stats["TileSizeX"] == 512


def test_bad_input_is_one_line_and_exit_status_2(tmp_path):
    res = CliRunner().invoke(main, [
        "export", str(NC / "landsat_multiband.tif"), str(tmp_path / "o"),
        "--in-class-data", str(NC / "landsat96_polygons.shp"), "--image-chip-format", "PNG",
    ])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        "chipflow: error: Invalid image_chip_format='PNG': holds 1 to 3 bands but the raster has 5; "
        "use image_chip_format='TIFF'"
    ]
    assert not (tmp_path / "o").exists()


def test_unknown_format_is_refused_listing_the_valid_ones(tmp_path):
    res = CliRunner().invoke(main, ["export", "a.tif", str(tmp_path / "o"), "--in-class-data", "x",
                                    "--metadata-format", "nope"])
    assert res.exit_code == 2
    assert "metadata_format='nope': must be one of Classified_Tiles, KITTI_rectangles" in res.output
    assert not (tmp_path / "o").exists()
    help_text = CliRunner().invoke(main, ["export", "--help"]).output
    assert "PASCAL_VOC_rectangles" in help_text and "ONLY_TILES_WITH_FEATURES" in help_text
