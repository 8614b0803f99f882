import json

import pytest
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
    assert "9 chips written" in res.stderr
    stats = json.loads((out / "esri_accumulated_stats.json").read_text())
    assert stats["NumTiles"] == 9 and stats["TileSizeX"] == 512


def test_the_progress_bar_tells_positions_from_chips_written(client, tmp_path):
    """With ONLY_TILES_WITH_FEATURES most positions write no chip: the bar's count is of positions,
    and beside it the chips written, as many as the summary and the folder hold."""
    out = tmp_path / "o"
    res = CliRunner().invoke(main, [
        "export", str(NC / "landsat_multiband.tif"), str(out), "--in-class-data",
        str(NC / "landsat96_polygons.shp"), "--class-value-field", "ID", "--tile-size-x", "32",
        "--tile-size-y", "32", "--stride-x", "16", "--stride-y", "16", "--scheduler", client.scheduler.address,
    ])
    assert res.exit_code == 0, res.output
    written = len(list((out / "images").iterdir()))
    summary = int(next(line.split()[1] for line in res.output.splitlines() if line.strip().startswith("chips ")))
    positions = res.stderr.split("positions", 1)[1].split("/", 1)[1].split()[0]
    assert summary == written < int(positions)
    assert f"{written} chips written" in res.stderr


def test_warnings_are_lines_without_python_source():
    """A ChipflowWarning reads ``chipflow: warning: ...``, not a file, a line number and a line of code."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("default")  # as outside pytest
        res = CliRunner().invoke(main, ["plan", str(NC / "landsat_multiband.tif"), "--in-class-data",
                                        str(NC / "landsat96_points.shp"), "--metadata-format", "KITTI_rectangles"])
    assert res.exit_code == 0, res.output
    (line,) = [line for line in res.stderr.splitlines() if "warning" in line.lower()]
    assert line.startswith("chipflow: warning: in_class_data=") and "buffer_radius=0" in line
    assert ".py:" not in res.stderr and "export_training_data(" not in res.stderr


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
    assert "metadata_format='nope': must be one of " in res.output
    assert all(name in res.output for name in ("Classified_Tiles", "KITTI_rectangles", "PASCAL_VOC_rectangles"))
    assert not (tmp_path / "o").exists()
    help_text = CliRunner().invoke(main, ["export", "--help"]).output
    assert "PASCAL_VOC_rectangles" in help_text and "ONLY_TILES_WITH_FEATURES" in help_text


def test_config_file_with_flags_overriding_it(client, tmp_path):
    out = tmp_path / "cfg"
    job = tmp_path / "job.yaml"
    job.write_text(
        f"in_raster: {KAMPALA_IMAGE}\nout-folder: {out}\nin_class_data: {KAMPALA_BUILDINGS}\n"
        "stride_x: 256\nstride_y: 256\nmetadata_format: PASCAL_VOC_rectangles\n"
        f"scheduler: {client.scheduler.address}\n"
    )
    res = CliRunner().invoke(main, ["export", "--config", str(job), "--stride-y", "512", "-q"])
    assert res.exit_code == 0, res.output
    stats = json.loads((out / "esri_accumulated_stats.json").read_text())
    assert stats["NumTiles"] == 4 * 2 and stats["MetaDataMode"] == "PASCAL_VOC_rectangles"
    params = json.loads((out / ".chipflow" / "params.json").read_text())["parameters"]
    assert (params["stride_x"], params["stride_y"]) == (256, 512)


def test_config_file_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("in_raster: a.tif\nstrid_x: 3\n")
    res = CliRunner().invoke(main, ["export", "--config", str(bad)])
    assert res.exit_code == 2 and "unknown keys ['strid_x']" in res.output and "stride_x" in res.output
    bad.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    res = CliRunner().invoke(main, ["export", "--config", str(bad)])
    assert res.exit_code == 2 and "cannot read" in res.output and "pwned" not in res.output
    res = CliRunner().invoke(main, ["export", str(KAMPALA_IMAGE), str(tmp_path / "o")])
    assert res.exit_code == 2 and "--in-class-data is required" in res.output


def test_plan_is_a_dry_run(tmp_path):
    res = CliRunner().invoke(main, ["plan", str(KAMPALA_IMAGE), "--in-class-data", str(KAMPALA_BUILDINGS),
                                    "--stride-x", "256", "--stride-y", "256", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["grid"]["chips"] == 16 and plan["grid"]["rows"] == 4
    assert plan["features_over_raster"] == 98  # the data's README: 98 intersect the raster
    assert plan["chips_with_features"] == plan["expected_chips"] <= 16
    assert plan["blocks"] >= 1 and plan["tasks"] >= plan["blocks"]
    text = CliRunner().invoke(main, ["plan", str(KAMPALA_IMAGE), "--in-class-data", str(KAMPALA_BUILDINGS)])
    assert "7 rows x 7 columns = 49 chips" in text.output and "MB" in text.output
    assert "classes    1: 98 features over the raster" in text.output
    assert not list(tmp_path.iterdir())


def test_plan_of_a_class_raster_does_not_count_its_features_as_none(tmp_path):
    """A class raster's features are found as its pixels are read: unknown to the plan, not 0."""
    args = ["plan", str(NC / "landsat_multiband.tif"), "--in-class-data", str(NC / "strata.tif"),
            "--metadata-format", "Classified_Tiles", "--tile-size-x", "64", "--tile-size-y", "64"]
    plan = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    assert plan["class_raster"] and plan["features_over_raster"] is None
    assert len(plan["features_per_class"]) == 7 and set(plan["features_per_class"].values()) == {None}
    text = CliRunner().invoke(main, args).output
    assert "features   n/a: a class raster's features" in text and "classes    1, 2, 3, 4, 5, 6, 7\n" in text


def test_stats_prints_the_datasets_numbers(client, tmp_path):
    import chipflow

    out = tmp_path / "s"
    chipflow.export_training_data(NC / "landsat_multiband.tif", out, NC / "landsat96_polygons.shp",
                                  class_value_field="id", metadata_format="Classified_Tiles",
                                  tile_size_x=64, tile_size_y=64, stride_x=64, stride_y=64, client=client)
    res = CliRunner().invoke(main, ["stats", str(out)])
    assert res.exit_code == 0, res.output
    stats = json.loads((out / "esri_accumulated_stats.json").read_text())
    assert f"{stats['NumTiles']} chips of 64x64, 5 bands" in res.output
    assert "pixels" in res.output and len(res.output.splitlines()) == 2 + 7 + 1 + 5
    as_json = json.loads(CliRunner().invoke(main, ["stats", str(out), "--json"]).output)
    assert as_json["accumulated_stats"] == stats and len(as_json["AllTilesStats"]) == 5


def test_stats_refuses_a_damaged_or_missing_dataset_in_one_line(client, tmp_path):
    import chipflow

    out = tmp_path / "s"
    chipflow.export_training_data(KAMPALA_IMAGE, out, KAMPALA_BUILDINGS, stride_x=512, stride_y=512, client=client)
    emd = out / "esri_model_definition.emd"
    good = json.loads(emd.read_text())
    nameless = {**good, "Classes": [{k: v for k, v in c.items() if k != "Name"} for c in good["Classes"]]}
    for text, says in (("{not json", "esri_model_definition.emd is not valid JSON"),
                       (json.dumps(nameless), "esri_model_definition.emd lacks Classes[].Name"),
                       ("[]", "esri_model_definition.emd holds a list, not a mapping")):
        emd.write_text(text)
        res = CliRunner().invoke(main, ["stats", str(out)])
        (line,) = res.output.strip().splitlines()
        assert res.exit_code == 2 and line.startswith(f"chipflow: error: out_folder='{out}': {says}"), line
        if "Classes" not in says:  # validate reads it the same way, as a problem, not a traceback
            checked = CliRunner().invoke(main, ["validate", str(out)])
            assert checked.exit_code == 1 and f"problem: {says}" in checked.output, checked.output
    res = CliRunner().invoke(main, ["stats", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "no such folder" in res.output and "Traceback" not in res.output


def test_storage_option_flags_merge_into_the_job_files_nested_options():
    from chipflow.cli import _merged_storage_options

    config = {"storage_options": {"client_kwargs": {"endpoint_url": "http://minio:9000", "region_name": "us-east-1"},
                                  "anon": False}}
    merged = _merged_storage_options(config, ("client_kwargs.region_name=eu-west-1", "key=k"))
    assert merged == {"client_kwargs": {"endpoint_url": "http://minio:9000", "region_name": "eu-west-1"},
                      "anon": False, "key": "k"}
    assert config["storage_options"]["client_kwargs"]["region_name"] == "us-east-1"  # the file's own left as read


def test_a_scheduler_of_the_wrong_type_is_refused_before_any_output(tmp_path):
    import chipflow

    job = tmp_path / "job.yaml"
    job.write_text(f"in_raster: {KAMPALA_IMAGE}\nout_folder: {tmp_path / 'o'}\n"
                   f"in_class_data: {KAMPALA_BUILDINGS}\nscheduler: 8786\n")
    res = CliRunner().invoke(main, ["export", "--config", str(job)])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        "chipflow: error: Invalid scheduler=8786: must be a Dask scheduler's address, e.g. 'tcp://scheduler:8786'"]
    with pytest.raises(chipflow.InvalidParameterError, match=r"scheduler=5"):
        chipflow.export_training_data(KAMPALA_IMAGE, tmp_path / "o", KAMPALA_BUILDINGS, scheduler=5)
    assert not (tmp_path / "o").exists()


@pytest.mark.filterwarnings("ignore:Geometry is in a geographic CRS")  # buffering the 4326 sample
def test_every_parameter_has_its_option(client, tmp_path):
    out = tmp_path / "all"
    res = CliRunner().invoke(main, [
        "export", str(KAMPALA_IMAGE), str(out), "--in-class-data", str(KAMPALA_BUILDINGS),
        "--rotation-angle", "90", "--buffer-radius", "0.5", "--min-polygon-overlap-ratio", "0.2",
        "--reference-system", "map_space", "--processing-mode", "PROCESS_AS_MOSAICKED_IMAGE",
        "--crop-mode", "FIXED_SIZE", "--blacken-around-feature", "NO_BLACKEN", "--cell-size", "0.1492910708",
        "--extent", "3627854.236 38753.573 3627930.673 38830.010", "--edge-policy", "SHIFT",
        "--split", "train=0.5,val=0.5", "--split-block-size", "2", "--seed", "3",
        "--stride-x", "256", "--stride-y", "256", "--scheduler", client.scheduler.address, "-q",
    ])
    assert res.exit_code == 0, res.output
    params = json.loads((out / ".chipflow" / "params.json").read_text())["parameters"]
    assert params["rotation_angle"] == 90 and params["buffer_radius"] == 0.5
    assert params["min_polygon_overlap_ratio"] == 0.2 and params["cell_size"] == 0.1492910708
    assert params["split"] == {"train": 0.5, "val": 0.5} and params["seed"] == 3
    assert params["edge_policy"] == "SHIFT" and params["extent"][0] == 3627854.236
    res = CliRunner().invoke(main, ["export", str(KAMPALA_IMAGE), str(tmp_path / "t"), "-q",
                                    "--metadata-format", "Export_Tiles", "--stride-x", "512", "--stride-y", "512",
                                    "--scheduler", client.scheduler.address])
    assert res.exit_code == 0, res.output  # no class data needed


def test_quiet_prints_nothing_but_errors_not_even_warnings(client, tmp_path):
    """``-q`` in a cron job: a warning (points without buffer_radius) is not printed; without it, it is."""
    args = ["export", str(NC / "landsat_multiband.tif"), "", "--in-class-data", str(NC / "landsat96_points.shp"),
            "--class-value-field", "id", "--stride-x", "128", "--stride-y", "128",
            "--scheduler", client.scheduler.address]
    args[2] = str(tmp_path / "q")
    quiet = CliRunner().invoke(main, [*args, "-q"])
    assert quiet.exit_code == 0 and quiet.output == "", quiet.output
    args[2] = str(tmp_path / "loud")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("default")  # as outside pytest
        loud = CliRunner().invoke(main, args)
    assert loud.exit_code == 0 and "chips" in loud.output
    assert "chipflow: warning: " in loud.stderr and "buffer_radius=0" in loud.stderr


def test_the_cli_shows_chipflows_deprecation_warnings(tmp_path):
    """Python hides DeprecationWarnings outside ``__main__``; the CLI shows start_index's."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "from chipflow.cli import main; main()", "plan",
                           str(KAMPALA_IMAGE), "--in-class-data", str(KAMPALA_BUILDINGS), "--start-index", "5"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "start_index='5' is deprecated" in done.stderr


def test_verbose_shows_the_clusters_messages_and_a_taken_dashboard_port_is_not_warned_about(tmp_path):
    """-v: Dask's INFO lines (LocalCluster had silenced them); the dashboard's port taken: no Dask warning
    (the link printed is the one it took)."""
    import socket
    import subprocess
    import sys

    taken = socket.socket()
    try:
        try:
            taken.bind(("127.0.0.1", 8787))
            taken.listen()
        except OSError:
            pass  # taken already
        said = {}
        for flags in ([], ["-v"]):
            done = subprocess.run(
                [sys.executable, "-m", "chipflow", *flags, "export", str(KAMPALA_IMAGE), str(tmp_path / f"o{len(flags)}"),
                 "--in-class-data", str(KAMPALA_BUILDINGS), "--stride-x", "512", "--stride-y", "512",
                 "--n-workers", "1"], capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            said[len(flags)] = done.stderr
    finally:
        taken.close()
    assert "distributed.scheduler" not in said[0] and "distributed.scheduler" in said[1]
    assert "already in use" not in said[0] + said[1]
