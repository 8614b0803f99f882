"""Object storage end to end against a real S3 API: moto's standalone server on 127.0.0.1.

The server runs in its own process: a server thread inside the test process would
stall whenever GDAL holds the GIL while waiting for it (measured: every sidecar probe
of a /vsicurl/ open then waits for curl's timeout). The Dask workers are separate
processes started before the server: they learn its endpoint and the credentials
only from the storage options the export carries to them, never from their environment.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import boto3
import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
from click.testing import CliRunner
from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE

import chipflow
from chipflow import _cloud
from chipflow.cli import main, parse_storage_options
from chipflow.errors import InputNotFoundError, InvalidParameterError
from chipflow.sources import open_raster, read_window, resolve_rasters
from chipflow.store import Store
from chipflow.validate import validate_dataset

IN, OUT = "chipflow-in", "chipflow-out"
IMAGE_KEY, BUILDINGS_KEY = "kampala/image.tif", "kampala/buildings.geojson"
#: Recognisable fake credentials: moto accepts any; they must never surface anywhere.
FAKE_KEY = "AKIACHIPFLOWFAKEKEY7"
FAKE_SECRET = "chipflow-fake-secret-5f0c2b9e41d7"
JOB = {"metadata_format": "PASCAL_VOC_rectangles"}
REQUEST = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours some status lines


class RequestLog:
    """The requests moto's server answered, (method, path, status), from its access log (a file)."""

    def __init__(self, path: Path, boto) -> None:
        self.path, self.boto, self.offset = path, boto, 0

    def start(self) -> None:
        """Forget the requests so far."""
        self.offset = self.path.stat().st_size

    def requests(self) -> list[tuple[str, str, int]]:
        """The requests since :meth:`start` (a marker request ensures earlier lines are written)."""
        marker = f"log-marker-{uuid.uuid4().hex}"
        self.boto.put_object(Bucket=IN, Key=marker, Body=b"")
        deadline = time.monotonic() + 10
        while True:
            text = self.path.read_bytes()[self.offset:].decode(errors="replace")
            if marker in text or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        found = [REQUEST.search(ANSI.sub("", line)) for line in text.splitlines()]
        return [(m["method"], m["path"], int(m["status"])) for m in found if m and marker not in m["path"]]


@pytest.fixture(scope="module")
def s3(client, tmp_path_factory):
    """moto's server with an input bucket (the Kampala sample) and an empty output bucket.

    Requests ``client`` first, so the workers' environment predates every variable set here.
    """
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                                  stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"Running on (http://127\.0\.0\.1:\d+)", log_path.read_text())):
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        endpoint = found[1]
        with pytest.MonkeyPatch.context() as mp:
            # Dummy credentials for this process only (boto3 below); never the real AWS.
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                         "AWS_S3_ENDPOINT"):
                mp.delenv(name, raising=False)
            boto = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            for bucket in (IN, OUT):
                boto.create_bucket(Bucket=bucket)
            boto.upload_file(str(KAMPALA_IMAGE), IN, IMAGE_KEY)
            boto.upload_file(str(KAMPALA_BUILDINGS), IN, BUILDINGS_KEY)
            yield SimpleNamespace(
                endpoint=endpoint, boto=boto, log=RequestLog(log_path, boto),
                options={"endpoint_url": endpoint, "key": FAKE_KEY, "secret": FAKE_SECRET},
            )
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def local_ref(client, tmp_path_factory) -> Path:
    """The same job exported from local files to a local folder."""
    out = tmp_path_factory.mktemp("s3ref") / "local"
    chipflow.export_training_data(str(KAMPALA_IMAGE), str(out), str(KAMPALA_BUILDINGS), client=client, **JOB)
    return out


def s3_objects(boto, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object below ``prefix``: relative key → bytes."""
    keys = [o["Key"] for page in boto.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: boto.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def local_files(root: Path) -> dict[str, bytes]:
    """Every file below ``root``: relative path (``/``) → bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def cli_options(options: dict[str, str]) -> list[str]:
    return [arg for k, v in options.items() for arg in ("--storage-option", f"{k}={v}")]


def test_workers_cannot_know_the_endpoint_from_their_environment(s3, client):
    envs = client.run(lambda: dict(os.environ))
    assert len(envs) == 2
    for env in envs.values():
        assert not [k for k, v in env.items() if s3.endpoint.split("//")[1] in v or FAKE_SECRET in v]


def test_local_to_s3_is_byte_identical_to_a_local_export(s3, client, local_ref):
    url = f"s3://{OUT}/local-to-s3"
    result = chipflow.export_training_data(str(KAMPALA_IMAGE), url, str(KAMPALA_BUILDINGS), client=client,
                                           storage_options=s3.options, **JOB)
    assert result.num_chips > 0
    expected = local_files(local_ref)
    got = s3_objects(s3.boto, OUT, "local-to-s3")
    assert sorted(got) == sorted(expected)
    assert all(got[k] == expected[k] for k in expected), [k for k in expected if got[k] != expected[k]]
    report = validate_dataset(url, storage_options=s3.options)
    assert report.ok, report.summary()


def test_s3_to_s3_reads_ranges_matches_a_local_export_validates_and_resumes(s3, client, local_ref, tmp_path):
    url = f"s3://{OUT}/s3-to-s3"
    job = (f"s3://{IN}/{IMAGE_KEY}",)
    s3.log.start()
    chipflow.export_training_data(job[0], url, f"s3://{IN}/{BUILDINGS_KEY}", client=client,
                                  storage_options=s3.options, **JOB)
    # GDAL's /vsis3/ read the raster in HTTP ranges (206), never whole (200).
    image_gets = [st for m, p, st in s3.log.requests() if m == "GET" and p.startswith(f"/{IN}/{IMAGE_KEY}")]
    assert image_gets and set(image_gets) == {206}, image_gets
    got = s3_objects(s3.boto, OUT, "s3-to-s3")

    # The same job (same inputs) into a local folder: identical keys and bytes, params.json included.
    local = tmp_path / "s3-to-local"
    chipflow.export_training_data(job[0], str(local), f"s3://{IN}/{BUILDINGS_KEY}", client=client,
                                  storage_options=s3.options, **JOB)
    expected = local_files(local)
    assert sorted(got) == sorted(expected)
    assert all(got[k] == expected[k] for k in expected), [k for k in expected if got[k] != expected[k]]
    # ... and the chips, labels and metadata of the all-local export (only the input's path differs).
    reference = local_files(local_ref)
    same = [k for k in reference if k.startswith(("images/", "labels/")) or "/" not in k and k != "chips.parquet"]
    assert len(same) > 10
    assert all(got[k] == reference[k] for k in same), [k for k in same if got[k] != reference[k]]

    runner = CliRunner()
    done = runner.invoke(main, ["validate", url, *cli_options(s3.options)])
    assert done.exit_code == 0, done.output
    assert "complete" in done.output

    # A rerun into the same prefix resumes: no block runs again, no chip is rewritten, same bytes.
    s3.log.start()
    chipflow.export_training_data(job[0], url, f"s3://{IN}/{BUILDINGS_KEY}", client=client,
                                  storage_options=s3.options, **JOB)
    puts = [p for m, p, _ in s3.log.requests() if m == "PUT"]
    assert not [p for p in puts if "/images/" in p or "/labels/" in p or "/blocks/" in p], puts
    assert s3_objects(s3.boto, OUT, "s3-to-s3") == got


def test_storage_options_are_neither_stored_nor_printed(s3, client):
    runner = CliRunner()
    url = f"s3://{OUT}/cli"
    inputs = [f"s3://{IN}/{IMAGE_KEY}", "--in-class-data", f"s3://{IN}/{BUILDINGS_KEY}"]
    done = runner.invoke(main, ["export", inputs[0], url, *inputs[1:], "--scheduler", client.scheduler.address,
                                *cli_options(s3.options)])
    assert done.exit_code == 0, done.output
    planned = runner.invoke(main, ["plan", *inputs, *cli_options(s3.options)])
    assert planned.exit_code == 0, planned.output
    for result in (done, planned):
        text = result.output + (result.stderr if result.stderr_bytes is not None else "")
        assert FAKE_SECRET not in text and FAKE_KEY not in text
    assert "chips" in done.output and url in done.output
    objects = s3_objects(s3.boto, OUT, "cli")
    params = json.loads(objects[".chipflow/params.json"])
    assert "storage_options" not in params
    leaks = [k for k, data in objects.items() if FAKE_SECRET.encode() in data or FAKE_KEY.encode() in data]
    assert not leaks
    assert FAKE_SECRET not in repr(Store(url, _cloud.freeze(s3.options)))
    assert validate_dataset(url, storage_options=s3.options).ok


def test_https_style_raster_urls_read_through_vsicurl(s3):
    key = "public/image.tif"  # a public object's plain http(s) URL: /vsicurl/, no S3 API, no options
    s3.boto.upload_file(str(KAMPALA_IMAGE), IN, key, ExtraArgs={"ACL": "public-read"})
    s3.log.start()
    source = open_raster(f"{s3.endpoint}/{IN}/{key}")
    pixels, covered = read_window(source, (300, 200, 556, 456))
    with rasterio.open(KAMPALA_IMAGE) as ds:
        np.testing.assert_array_equal(pixels, ds.read(window=((200, 456), (300, 556))))
    assert covered is None
    requests = s3.log.requests()
    gets = [st for m, p, st in requests if m == "GET" and p == f"/{IN}/{key}"]
    assert gets and set(gets) == {206}, requests  # ranges only, never the whole file


def test_remote_globs_and_prefixes_expand(s3):
    with _cloud.use(_cloud.freeze(s3.options)):
        assert resolve_rasters((f"s3://{IN}/kampala/*.tif",)) == [f"s3://{IN}/{IMAGE_KEY}"]
        assert resolve_rasters((f"s3://{IN}/kampala/",)) == [f"s3://{IN}/{IMAGE_KEY}"]
        assert resolve_rasters((f"s3://{IN}/{IMAGE_KEY}",)) == [f"s3://{IN}/{IMAGE_KEY}"]
        with pytest.raises(InputNotFoundError, match="matches no object") as refused:
            resolve_rasters((f"s3://{IN}/kampala/*.jp2",))
        said = str(refused.value)  # once, not wrapped in "cannot be listed" (the listing worked)
        assert said.count("does not exist") == 1 and "cannot be listed" not in said


def test_vector_input_reads_class_data_through_fsspec(s3, tmp_path):
    frame = gpd.read_file(KAMPALA_BUILDINGS)
    buf = io.BytesIO()
    frame.to_parquet(buf)
    s3.boto.put_object(Bucket=IN, Key="kampala/buildings.parquet", Body=buf.getvalue())
    with _cloud.use(_cloud.freeze(s3.options)):
        geojson = gpd.read_file(_cloud.vector_input(f"s3://{IN}/{BUILDINGS_KEY}"), engine="pyogrio")
        parquet = gpd.read_parquet(_cloud.vector_input(f"s3://{IN}/kampala/buildings.parquet"))
    assert len(geojson) == len(parquet) == len(frame)
    assert geojson.geometry.equals(frame.geometry) and parquet.geometry.equals(frame.geometry)
    assert _cloud.vector_input(str(KAMPALA_BUILDINGS)) == str(KAMPALA_BUILDINGS)
    # use() lent pyogrio's GDAL the options for the planning only
    assert pyogrio.get_gdal_config_option("AWS_SECRET_ACCESS_KEY") == "testing"  # the environment's again
    assert pyogrio.get_gdal_config_option("AWS_S3_ENDPOINT") is None


def test_storage_options_map_to_gdal_and_parse_from_flags():
    config = _cloud.gdal_s3_config({"endpoint_url": "http://127.0.0.1:5555", "key": "k", "secret": "s",
                                    "client_kwargs": {"region_name": "eu-west-1"}})
    assert config == {"AWS_S3_ENDPOINT": "127.0.0.1:5555", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
                      "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "eu-west-1"}
    assert _cloud.gdal_s3_config({"client_kwargs": {"endpoint_url": "https://minio.example:9000/"},
                                  "anon": True}) == {
        "AWS_S3_ENDPOINT": "minio.example:9000", "AWS_HTTPS": "YES", "AWS_VIRTUAL_HOSTING": "FALSE",
        "AWS_NO_SIGN_REQUEST": "YES"}
    assert parse_storage_options(["endpoint_url=http://127.0.0.1:5555", "anon=false", "key=\"123\"",
                                  "client_kwargs.region_name=eu-west-1", "secret=a=b"]) == {
        "endpoint_url": "http://127.0.0.1:5555", "anon": False, "key": "123",
        "client_kwargs": {"region_name": "eu-west-1"}, "secret": "a=b"}
    runner = CliRunner()
    bad = runner.invoke(main, ["validate", "s3://x/y", "--storage-option", FAKE_SECRET])
    assert bad.exit_code == 2 and FAKE_SECRET not in bad.output
    with pytest.raises(InvalidParameterError) as err:
        _cloud.freeze([FAKE_SECRET])  # type: ignore[arg-type]
    assert FAKE_SECRET not in str(err.value)


@pytest.mark.parametrize("flag, match", [
    ("client_kwargs=X", r"storage_options\.client_kwargs='<str>': must be a mapping of options"),
    ("config_kwargs.retries=X", r"storage_options\.config_kwargs\.retries='<str>': must be a mapping"),
    ("endpoint_url=notaurl", r"storage_options\.endpoint_url='notaurl': must be an http:// or https:// URL"),
])
def test_badly_typed_storage_options_are_bad_input_named_before_anything_is_written(tmp_path, flag, match):
    """Even for a local export: a wrong type is reported as bad input (status 2), its value unshown;
    by validate and stats too (they crashed inside aiobotocore)."""
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["export", str(KAMPALA_IMAGE), str(out), "--in-class-data",
                                    str(KAMPALA_BUILDINGS), "--storage-option", flag])
    assert res.exit_code == 2 and re.search(match, res.output) and "X'" not in res.output, res.output
    assert not out.exists()
    for command in ("validate", "stats"):
        res = CliRunner().invoke(main, [command, "s3://nobucket/x", "--storage-option", flag])
        assert res.exit_code == 2 and re.search(match, res.output) and "Traceback" not in res.output, res.output


@pytest.mark.parametrize(("flag", "says"), [
    ("a=2", r"storage_options\.a='<value>': is not an option of s3fs \(s3:// paths\); e\.g\. endpoint_url"),
    (f"endpoint={FAKE_SECRET}", r"storage_options\.endpoint='<value>': .*did you mean 'endpoint_url'\?"),
])
def test_an_unknown_storage_option_for_s3_is_bad_input_named(tmp_path, flag, says):
    """s3fs hands unknown keys to aiobotocore's session, which failed on the first request with a
    TypeError (exit 1, or a traceback); now one line naming the key, its value unshown, exit 2."""
    out = f"s3://{OUT}/unknown"
    for args in (["export", str(KAMPALA_IMAGE), out, "--in-class-data", str(KAMPALA_BUILDINGS)],
                 ["plan", f"s3://{IN}/{IMAGE_KEY}", "--in-class-data", str(KAMPALA_BUILDINGS)],
                 ["validate", out], ["stats", out]):
        res = CliRunner().invoke(main, [*args, "--storage-option", flag])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
        assert re.search(says, res.output) and FAKE_SECRET not in res.output, res.output
    res = CliRunner().invoke(main, ["plan", str(KAMPALA_IMAGE), "--in-class-data", str(KAMPALA_BUILDINGS),
                                    "--storage-option", flag])  # no s3:// path: fsspec's other stores differ
    assert res.exit_code == 0, res.output


def test_a_replaced_object_is_neither_resumed_nor_read_from_an_old_handle(s3, client, make_raster, tmp_path):
    """The same URL with other bytes: the rerun is refused, and with overwrite the workers read the new ones."""
    key, url = "replaced/image.tif", f"s3://{OUT}/replaced"
    with rasterio.open(KAMPALA_IMAGE) as ds:
        data, profile = ds.read(), ds.profile
    other = tmp_path / "other.tif"
    with rasterio.open(other, "w", **profile) as ds:
        ds.write(data[:, ::-1, ::-1])  # the same size and grid, other pixels
    s3.boto.upload_file(str(KAMPALA_IMAGE), IN, key)
    args = (f"s3://{IN}/{key}", url, f"s3://{IN}/{BUILDINGS_KEY}")
    chipflow.export_training_data(*args, client=client, storage_options=s3.options, **JOB)
    s3.boto.upload_file(str(other), IN, key)
    with pytest.raises(chipflow.OutputError, match=r"different parameters \(in_raster\.items.*version"):
        chipflow.export_training_data(*args, client=client, storage_options=s3.options, **JOB)
    chipflow.export_training_data(*args, client=client, storage_options=s3.options, overwrite=True, **JOB)
    chip = s3.boto.get_object(Bucket=OUT, Key="replaced/images/000000000.tif")["Body"].read()
    with rasterio.io.MemoryFile(chip) as mem, mem.open() as ds, rasterio.open(other) as src:
        np.testing.assert_array_equal(ds.read(), src.read(window=((0, 256), (0, 256))))


def test_an_unreachable_endpoint_is_bad_input_named_for_validate_stats_and_export(tmp_path):
    """botocore's connection errors are no OSErrors: they are still one line naming out_folder, status 2."""
    flags = ["--storage-option", "endpoint_url=http://127.0.0.1:1", "--storage-option", "key=a",
             "--storage-option", f"secret={FAKE_SECRET}", "--storage-option",
             'config_kwargs.retries={"max_attempts": 1}']
    url = "s3://nobucket/x"
    for args, says in ((["validate", url], "cannot be opened: EndpointConnectionError"),
                       (["stats", url], "cannot be opened: EndpointConnectionError"),
                       (["export", str(KAMPALA_IMAGE), url, "--in-class-data", str(KAMPALA_BUILDINGS), "-q"],
                        "cannot be written: Could not connect")):
        res = CliRunner().invoke(main, [*args, *flags])
        assert res.exit_code == 2 and f"out_folder='{url}'" in res.output and says in res.output, res.output
        assert FAKE_SECRET not in res.output and "Traceback" not in res.output


def test_an_output_bucket_that_does_not_exist_is_refused_not_created(s3, client):
    """s3fs's makedirs would create the bucket (on AWS: a new bucket in the default region); refused instead."""
    url = "s3://chipflow-no-such-bucket/out"
    before = {b["Name"] for b in s3.boto.list_buckets()["Buckets"]}
    with pytest.raises(chipflow.OutputError, match=r"out_folder='s3://chipflow-no-such-bucket/out'.*"
                                                   r"bucket 'chipflow-no-such-bucket' does not exist"):
        chipflow.export_training_data(str(KAMPALA_IMAGE), url, str(KAMPALA_BUILDINGS), client=client,
                                      storage_options=s3.options, **JOB)
    res = CliRunner().invoke(main, ["export", str(KAMPALA_IMAGE), url, "--in-class-data", str(KAMPALA_BUILDINGS),
                                    "--scheduler", client.scheduler.address, "-q", *cli_options(s3.options)])
    assert res.exit_code == 2 and "bucket 'chipflow-no-such-bucket' does not exist" in res.output, res.output
    assert {b["Name"] for b in s3.boto.list_buckets()["Buckets"]} == before


def test_a_layer_of_a_geopackage_on_s3_is_named_as_locally(s3, client, local_ref, tmp_path):
    """``s3://bucket/project.gpkg/buildings``: GDAL reads that layer of the object, not its first."""
    frame = gpd.read_file(KAMPALA_BUILDINGS)
    gpkg = tmp_path / "project.gpkg"
    frame.iloc[:2].to_file(gpkg, layer="other")
    frame.to_file(gpkg, layer="buildings")
    s3.boto.upload_file(str(gpkg), IN, "kampala/project.gpkg")
    url = f"s3://{OUT}/layer"
    chipflow.export_training_data(str(KAMPALA_IMAGE), url, f"s3://{IN}/kampala/project.gpkg/buildings",
                                  client=client, storage_options=s3.options, **JOB)
    got = s3_objects(s3.boto, OUT, "layer")
    expected = local_files(local_ref)
    labels = [k for k in expected if k.startswith("labels/")]
    assert len(labels) > 10 and all(got[k] == expected[k] for k in labels)
    with pytest.raises(InvalidParameterError, match=r"holds 2 layers \('other', 'buildings'\)"):
        chipflow.export_training_data(str(KAMPALA_IMAGE), f"s3://{OUT}/no-layer", f"s3://{IN}/kampala/project.gpkg",
                                      client=client, storage_options=s3.options, **JOB)


@pytest.mark.parametrize("case", ["PAD past the edge", "a mosaic of a prefix"])
def test_boundless_reads_of_s3_rasters_use_the_storage_options(s3, client, tmp_path, case):
    """Reads past a raster's edge, and of mosaic items, go through a VRT that opens the object again:
    with the export's endpoint too (they went to AWS). The chips equal the same job's on local files."""
    with rasterio.open(KAMPALA_IMAGE) as src:
        profile, data = src.profile, src.read()
    halves = tmp_path / "halves"
    halves.mkdir()
    for name, rows in (("a.tif", slice(0, 512)), ("b.tif", slice(512, 1024))):
        window = rasterio.windows.Window(0, rows.start, data.shape[2], rows.stop - rows.start)
        with rasterio.open(halves / name, "w", **{**profile, "height": window.height,
                                                  "transform": rasterio.windows.transform(window, profile["transform"])}) as ds:
            ds.write(data[:, rows])
        s3.boto.upload_file(str(halves / name), IN, f"halves/{name}")
    if case.startswith("PAD"):
        local, remote, kw = str(KAMPALA_IMAGE), f"s3://{IN}/{IMAGE_KEY}", {"edge_policy": "PAD", "stride_x": 300,
                                                                          "stride_y": 300}
    else:
        local, remote, kw = str(halves), f"s3://{IN}/halves/", {}
    for source, out in ((local, tmp_path / "local"), (remote, tmp_path / "remote")):
        chipflow.export_training_data(source, str(out), str(KAMPALA_BUILDINGS), client=client,
                                      storage_options=s3.options if source == remote else None, **kw)
    expected, got = local_files(tmp_path / "local"), local_files(tmp_path / "remote")
    chips = sorted(k for k in expected if k.startswith(("images/", "labels/")))
    assert chips and chips == sorted(k for k in got if k.startswith(("images/", "labels/")))
    assert all(got[k] == expected[k] for k in chips)


def test_an_s3_folder_holding_the_inputs_is_refused_and_they_are_kept(s3, client):
    """As locally: overwrite would delete the inputs before they are read (it did, on S3)."""
    s3.boto.upload_file(str(KAMPALA_IMAGE), OUT, "job/image.tif")
    s3.boto.upload_file(str(KAMPALA_BUILDINGS), OUT, "job/buildings.geojson")
    before = s3_objects(s3.boto, OUT, "job")
    args = (f"s3://{OUT}/job/image.tif", f"s3://{OUT}/job", f"s3://{OUT}/job/buildings.geojson")
    for overwrite, says in ((True, "overwrite=True would delete it"), (False, "holds none of the inputs")):
        with pytest.raises(chipflow.InvalidParameterError,
                           match=rf"out_folder='s3://{OUT}/job': holds in_raster='{args[0]}'.*{says}"):
            chipflow.export_training_data(*args, client=client, storage_options=s3.options,
                                          overwrite=overwrite, **JOB)
    assert s3_objects(s3.boto, OUT, "job") == before


def test_a_pattern_that_cannot_be_listed_is_bad_input_naming_in_raster():
    """A store that cannot be reached while expanding a glob (botocore's errors): one line, exit 2."""
    flags = ["--storage-option", "endpoint_url=http://127.0.0.1:1", "--storage-option", "key=a",
             "--storage-option", f"secret={FAKE_SECRET}", "--storage-option",
             'config_kwargs.retries={"max_attempts": 1}']
    res = CliRunner().invoke(main, ["plan", f"s3://{IN}/kampala/*.tif", "--in-class-data", str(KAMPALA_BUILDINGS),
                                    *flags])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert f"in_raster='s3://{IN}/kampala/*.tif'" in res.output and "cannot be listed" in res.output
    assert "EndpointConnectionError" in res.output and FAKE_SECRET not in res.output


def test_class_data_on_s3_uses_an_endpoint_the_environment_names(s3, monkeypatch):
    """AWS_ENDPOINT_URL alone (the Kubernetes example's Secret) reaches GDAL for s3:// class data too,
    as it does for rasters and the output (it went to AWS without any storage option)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    res = CliRunner().invoke(main, ["plan", str(KAMPALA_IMAGE), "--in-class-data", f"s3://{IN}/{BUILDINGS_KEY}",
                                    "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["features_over_raster"] == 98


def test_an_out_folder_that_is_a_file_or_an_object_is_refused_and_kept(s3, client, tmp_path):
    """A file (or an S3 object) named as out_folder: one clear line, with or without overwrite, and it stays."""
    local = tmp_path / "afile"
    local.write_bytes(b"mine")
    s3.boto.put_object(Bucket=OUT, Key="anobject", Body=b"mine")
    for out, options in ((str(local), None), (f"s3://{OUT}/anobject", s3.options)):
        for overwrite in (False, True):
            with pytest.raises(chipflow.OutputError, match=rf"out_folder='{out}' is a file, not a folder"):
                chipflow.export_training_data(str(KAMPALA_IMAGE), out, str(KAMPALA_BUILDINGS), client=client,
                                              storage_options=options, overwrite=overwrite, **JOB)
    assert local.read_bytes() == b"mine"
    assert s3.boto.get_object(Bucket=OUT, Key="anobject")["Body"].read() == b"mine"


def test_a_class_raster_on_s3_is_read_with_the_storage_options(s3, client, tmp_path):
    """Planning and the workers' blocks open it as they open in_raster (it went to AWS's endpoint)."""
    from conftest import NC

    s3.boto.upload_file(str(NC / "strata.tif"), IN, "strata.tif")
    job = dict(metadata_format="Classified_Tiles", tile_size_x=128, tile_size_y=128, stride_x=128,
               stride_y=128, client=client)
    chipflow.export_training_data(str(NC / "landsat_multiband.tif"), str(tmp_path / "local"),
                                  str(NC / "strata.tif"), **job)
    chipflow.export_training_data(str(NC / "landsat_multiband.tif"), str(tmp_path / "remote"),
                                  f"s3://{IN}/strata.tif", storage_options=s3.options, **job)
    expected, got = local_files(tmp_path / "local"), local_files(tmp_path / "remote")
    labels = sorted(k for k in expected if k.startswith("labels/"))
    assert labels and labels == sorted(k for k in got if k.startswith("labels/"))
    assert all(got[k] == expected[k] for k in labels)


def test_mrf_chips_on_s3_validate_as_locally(s3, client):
    """An MRF chip is three objects (header, index, data): validate reads them side by side."""
    out = f"s3://{OUT}/mrf"
    chipflow.export_training_data(f"s3://{IN}/{IMAGE_KEY}", out, str(KAMPALA_BUILDINGS), image_chip_format="MRF",
                                  stride_x=512, stride_y=512, storage_options=s3.options, client=client)
    report = validate_dataset(out, storage_options=s3.options)
    assert report.ok and report.images == report.labels > 0, report.summary()
