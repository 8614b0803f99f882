"""The ``chipflow`` command: a thin click layer over the Python API.

Exit status: 0 success (``validate``: the dataset is complete); 2 bad input (a
parameter, a missing or unusable input, an output folder that cannot be used),
reported in one line before anything is written; 1 a failure during the run
(``validate``: the dataset is incomplete or inconsistent).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import click

from . import formats
from .config import (
    DEFAULT_METADATA_FORMAT,
    CropMode,
    ImageChipFormat,
    NoFeatureTiles,
    ProcessingMode,
    ReferenceSystem,
    make_config,
)
from .errors import (
    ChipflowDeprecationWarning,
    ChipflowError,
    ChipflowWarning,
    InputNotFoundError,
    OutputError,
)
from .grid import EdgePolicy
from .pipeline import export_training_data
from .progress import RichProgress

__all__ = ["load_job_config", "main"]

#: Keys a job config file may set: the API's keyword arguments.
CONFIG_KEYS = tuple(
    name for name in inspect.signature(export_training_data).parameters
    if name not in ("client", "progress")
)


def _values(values: list[str]) -> str:
    """Help text listing ESRI values (validated, case-insensitively, by the library)."""
    return "One of " + ", ".join(values) + " (any case)."


def load_job_config(path: str) -> dict[str, Any]:
    """Read a job config (YAML or JSON, safely): keys are the API's parameter names.

    Keys may be spelt like the CLI options (``stride-x``) or the API (``stride_x``).

    Raises
    ------
    click.BadParameter
        Unreadable file, not a mapping, or an unknown key (listing the valid ones).
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {path!r}: {exc}", param_hint="--config") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path!r} must hold a mapping of parameters", param_hint="--config")
    config = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise click.BadParameter(
            f"{path!r} has unknown keys {unknown}; valid keys: {', '.join(CONFIG_KEYS)}",
            param_hint="--config",
        )
    return config


def parse_storage_options(values: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``--storage-option KEY=VALUE`` flags as fsspec ``storage_options``.

    A dotted key nests (``client_kwargs.region_name=eu-west-1``); a value that
    parses as JSON is taken as JSON (``anon=true``, ``max_concurrency=4``, ``'key="123"'``
    for a string of digits), anything else as a string. Values are never echoed: they
    may be secrets.

    Raises
    ------
    click.BadParameter
        A flag without ``=`` or with an empty key.
    """
    options: dict[str, Any] = {}
    for i, item in enumerate(values, 1):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"flag number {i} is not KEY=VALUE (value not shown)",
                                     param_hint="--storage-option")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = key.split(".")
        target = options
        for name in parents:
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise click.BadParameter(f"{key!r} nests into a key that already has a value",
                                         param_hint="--storage-option")
        target[leaf] = value
    return options


def _storage_option_flag(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--storage-option KEY=VALUE`` (repeatable)."""
    return click.option(
        "--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
        help="fsspec option for s3:// (gs://, az://) paths, repeatable: e.g. "
             "endpoint_url=http://127.0.0.1:9000. Never printed or stored.",
    )(f)


def _merged_storage_options(config: dict[str, Any], flags: tuple[str, ...]) -> dict[str, Any] | None:
    """The config file's ``storage_options`` updated by the command line's flags."""
    base = config.get("storage_options") or {}
    if not isinstance(base, dict):
        raise click.BadParameter("'storage_options' in the config file must be a mapping",
                                 param_hint="--config")
    merged = _deep_merge(base, parse_storage_options(flags))
    return merged or None


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s keys, mappings merged key by key.

    A flag's ``client_kwargs.region_name`` keeps the file's ``client_kwargs.endpoint_url``.
    """
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _deep_merge(merged[key], value) if both else value
    return merged


def _export_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The export parameters, shared by ``export`` and ``plan`` (ESRI names in kebab case)."""
    options = [
        click.option("--in-class-data", help="Class data: a vector file or layer (GPKG, GeoJSON, SHP, "
                     "Parquet, file.gpkg/layer, file.gdb/layer) or a classified raster; optional for "
                     "Export_Tiles."),
        click.option("--image-chip-format", default="TIFF", show_default=True,
                     help=_values([f.value for f in ImageChipFormat])),
        click.option("--tile-size-x", type=int, default=256, show_default=True),
        click.option("--tile-size-y", type=int, default=256, show_default=True),
        click.option("--stride-x", type=int, default=128, show_default=True),
        click.option("--stride-y", type=int, default=128, show_default=True),
        click.option("--output-nofeature-tiles", default="ONLY_TILES_WITH_FEATURES", show_default=True,
                     help=_values([f.value for f in NoFeatureTiles])),
        click.option("--metadata-format", default=DEFAULT_METADATA_FORMAT, show_default=True,
                     help=_values(formats.names())),
        click.option("--class-value-field", default=None,
                     help="Integer class field (default: a value/classvalue field, else class 1)."),
        click.option("--edge-policy", default="DROP", show_default=True,
                     help="Last partial row/column of chips. " + _values([e.value for e in EdgePolicy])),
        click.option("--buffer-radius", type=float, default=None,
                     help="Buffer features by this distance (class data CRS units): points become discs. "
                     "[default: 0]"),
        click.option("--in-mask-polygons", default=None,
                     help="Only chips completely inside these polygons (a vector file)."),
        click.option("--rotation-angle", type=float, default=None,
                     help="Extra chips rotated by this angle, again and again below 360. [default: 0]"),
        click.option("--reference-system", default=None,
                     help=_values([r.value for r in ReferenceSystem]) + " [default: MAP_SPACE]"),
        click.option("--processing-mode", default=None, help=_values([m.value for m in ProcessingMode])
                     + " [default: PROCESS_AS_MOSAICKED_IMAGE]"),
        click.option("--blacken-around-feature", default=None,
                     help="Labeled_Tiles/Imagenet: NO_BLACKEN or BLACKEN_AROUND_FEATURE. "
                     "[default: NO_BLACKEN]"),
        click.option("--crop-mode", default=None, help="Labeled_Tiles/Imagenet: " + _values(
            [m.value for m in CropMode]) + " [default: FIXED_SIZE]"),
        click.option("--min-polygon-overlap-ratio", type=float, default=None,
                     help="Leave out features with less than this fraction inside the chip. [default: 0]"),
        click.option("--start-index", default=None, help="Deprecated in ArcGIS: accepted and ignored."),
        click.option("--cell-size", type=float, default=None,
                     help="Resample the raster to this cell size (raster CRS units)."),
        click.option("--extent", default=None,
                     help='Clip to "xmin ymin xmax ymax" (raster CRS).'),
        click.option("--split", default=None,
                     help='Leak-free splits, e.g. "train=0.8,val=0.1,test=0.1" (one dataset per split).'),
        click.option("--split-block-size", type=int, default=None,
                     help="Side of the spatial cells assigned whole to one split, in chips (default 8)."),
        click.option("--seed", type=int, default=None, help="Seed of the split assignment (default 0)."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False),
                     help="A YAML job file with the same keys as the Python API; flags override it."),
        _storage_option_flag,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _gather(ctx: click.Context, positional: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Merge the config file with the flags actually given on the command line."""
    config_path = kwargs.pop("config_path")
    params = load_job_config(config_path) if config_path else {}
    storage_options = _merged_storage_options(params, kwargs.pop("storage_option", ()))
    params.pop("storage_options", None)
    if storage_options:
        params["storage_options"] = storage_options
    for name, value in {**positional, **kwargs}.items():
        source = ctx.get_parameter_source(name)
        given = source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
        if given and value is not None:
            params[name] = value
        elif name not in params and value is not None:
            params[name] = value
    try:
        needs_labels = formats.get(params.get("metadata_format", DEFAULT_METADATA_FORMAT)).needs_labels
    except ChipflowError:
        needs_labels = False  # the export reports the unknown format, naming the valid ones
    for name in ("in_raster", "in_class_data") if needs_labels else ("in_raster",):
        if not params.get(name):
            flag = "IN_RASTER" if name == "in_raster" else "--in-class-data"
            raise click.UsageError(f"{flag} is required (on the command line or as {name!r} in --config)")
    return params


def _fail(exc: Exception) -> None:
    if isinstance(exc, ChipflowError) and not exc.during_run:
        click.echo(f"chipflow: error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"chipflow: export failed: {type(exc).__name__}: {exc}", err=True)
    sys.exit(1)


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Show chipflow's warnings as ``chipflow: warning: ...`` lines on stderr (no source line).

    Python hides DeprecationWarnings outside ``__main__``: a CLI user is who should see
    ``start_index``'s. Filters and the display are restored when the command ends.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("default", ChipflowDeprecationWarning)
        # Dask's note that the dashboard took another port: the link export prints is the one it took
        warnings.filterwarnings("ignore", r"Port \d+ is already in use", UserWarning)
        shown = warnings.showwarning

        def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, ChipflowWarning):
                click.echo(f"chipflow: warning: {message}", err=True)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


@click.group()
@click.version_option(package_name="chipflow")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Cut georeferenced rasters and labels into deep-learning training chips."""
    ctx.with_resource(_warnings_as_lines())
    if verbose:
        level = logging.INFO if verbose == 1 else logging.DEBUG
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        for name in ("chipflow", "distributed"):
            logging.getLogger(name).setLevel(level)
        for name in ("botocore", "aiobotocore", "boto3", "s3fs"):  # their debug lines show request
            logging.getLogger(name).setLevel(max(level, logging.INFO))  # headers (access key ids)


@main.command()
@click.argument("in_raster", required=False)
@click.argument("out_folder", required=False)
@_export_options
@click.option("--overwrite", is_flag=True, default=None,
              help="Replace the contents of a non-empty OUT_FOLDER (otherwise a rerun resumes).")
@click.option("--scheduler", default=None, help="Dask scheduler address (default: a local cluster).")
@click.option("--n-workers", type=int, default=None, help="Local cluster worker processes (default: cores).")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@click.pass_context
def export(ctx: click.Context, in_raster: str | None, out_folder: str | None, quiet: bool,
           **kwargs: Any) -> None:
    """Export chips and labels from IN_RASTER into OUT_FOLDER."""
    params = _gather(ctx, {"in_raster": in_raster, "out_folder": out_folder}, kwargs)
    if not params.get("out_folder"):
        raise click.UsageError("OUT_FOLDER is required (on the command line or as 'out_folder' in --config)")
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            if quiet:  # nothing but errors (cron jobs): no ChipflowWarning, no Dask port notice
                warnings.simplefilter("ignore")
            result = export_training_data(
                params.pop("in_raster"), params.pop("out_folder"), params.pop("in_class_data", None),
                progress=None if quiet else RichProgress(), **params,
            )
    except Exception as exc:
        _fail(exc)
    if quiet:
        return
    elapsed = time.perf_counter() - started
    classes = ", ".join(f"{name} ({n})" for name, n in result.features_per_class.items())
    click.echo("\n".join([
        f"chipflow export: {result.statistics['MetaDataMode']} → {result.out_folder}",
        f"  chips      {result.num_chips:>10,}   in {result.num_blocks} blocks",
        f"  features   {result.num_features:>10,}   (instances over all chips)",
        f"  classes    {len(result.classes):>10}   {classes}",
        f"  time       {elapsed:>10.1f} s",
        f"  speed      {result.num_chips / elapsed if elapsed else 0:>10.1f} chips/s",
        f"  output     {result.out_folder}",
    ]))


@main.command()
@click.argument("in_raster", required=False)
@_export_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.pass_context
def plan(ctx: click.Context, in_raster: str | None, as_json: bool, **kwargs: Any) -> None:
    """Dry run: chips, blocks, tasks, output size and class balance, writing nothing."""
    from . import _cloud
    from .plan import plan_export

    params = _gather(ctx, {"in_raster": in_raster}, kwargs)
    in_class_data = params.pop("in_class_data", None)
    in_mask_polygons = params.pop("in_mask_polygons", None)
    options = params.pop("storage_options", None)
    params = {k: v for k, v in params.items() if k in inspect.signature(make_config).parameters}
    params.setdefault("out_folder", "(dry run)")
    try:
        rasters = params.get("in_raster")
        rasters = [rasters] if isinstance(rasters, str) else list(rasters or ())
        with _cloud.use(_cloud.freeze(options, *rasters, in_class_data, in_mask_polygons)):
            described = plan_export(make_config(**params), in_class_data, in_mask_polygons).describe()
    except Exception as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    g, r = described["grid"], described["raster"]
    with_features = described["chips_with_features"]
    click.echo("\n".join([
        f"chipflow plan: {described['in_raster']}",
        f"  raster     {r['width']} x {r['height']} px, {r['bands']} x {r['dtype']}, EPSG:{r['crs_epsg']}",
        f"  grid       {g['rows']} rows x {g['columns']} columns = {g['chips']:,} chips "
        f"(tile {g['tile'][0]}x{g['tile'][1]}, stride {g['stride'][0]}x{g['stride'][1]}, "
        f"edge {g['edge_policy']})",
        *([f"  items      {described['items']} rasters on their own grids: the raster, rows and columns "
           "above are the first's, the chips all items'"] if described["items"] > 1 else []),
        "  features   " + ("n/a: a class raster's features are found as the blocks read its pixels"
                           if described["class_raster"] else
                           f"{with_features if with_features is not None else '?'} chips meet a feature"
                           + (f", over {len(g['angles'])} angles" if len(g["angles"]) > 1 else "")),
        f"  export     ~{described['expected_chips']:,} chips as {described['image_chip_format']} + "
        f"{described['metadata_format']}, ~{described['estimated_bytes'] / 1e6:,.1f} MB",
        f"  tasks      {described['blocks']} blocks, {described['tasks']} Dask tasks",
        "  classes    " + ", ".join(k if v is None else f"{k}: {v} features over the raster"
                                    for k, v in described["features_per_class"].items()),
    ]))


@main.command()
@click.argument("out_folder")
@click.option("--json", "as_json", is_flag=True,
              help="Print esri_accumulated_stats.json, AllTilesStats and Classes as JSON.")
@_storage_option_flag
def stats(out_folder: str, as_json: bool, storage_option: tuple[str, ...]) -> None:
    """Print a dataset's statistics: classes, counts, band statistics (each split's, for splits)."""
    from . import _cloud
    from .store import Store

    try:
        store = Store(out_folder, _cloud.freeze(parse_storage_options(storage_option), out_folder))
        if not store.require_folder():
            raise InputNotFoundError("out_folder", out_folder, "no such folder, or it is empty")
        params = store.run_params()
        splits = store.split_names(params)
        datasets = [store.child(name) for name in splits] or [store]
        found = {d.url: _read_stats(d) for d in datasets}
        committed = len(store.committed_blocks()) if params and any(v is None for v in found.values()) else 0
    except ChipflowError as exc:
        _fail(exc)
    if any(v is None for v in found.values()):
        if params:  # a run stopped before its metadata: it can be finished
            click.echo(f"chipflow: error: out_folder={out_folder!r} holds an unfinished chipflow run "
                       f"({committed} of {len(params.get('blocks') or [])} blocks written, no statistics "
                       "yet): rerun the same export to finish it", err=True)
        else:
            click.echo(f"chipflow: error: out_folder={out_folder!r} holds no chipflow/ArcGIS statistics "
                       "(esri_accumulated_stats.json, esri_model_definition.emd)", err=True)
        sys.exit(2)
    if as_json:
        doc = {folder: {"accumulated_stats": s, "AllTilesStats": emd.get("AllTilesStats", []),
                        "Classes": emd.get("Classes", [])} for folder, (s, emd) in found.items()}
        click.echo(json.dumps(doc[store.url] if not splits else dict(zip(splits, doc.values(), strict=True)),
                              indent=2))
        return
    click.echo("\n".join(_stats_lines(folder, s, emd) for folder, (s, emd) in found.items()))


def _read_stats(store: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A dataset's statistics json and emd, or None when it has not both.

    Raises
    ------
    OutputError
        One of them is not a JSON mapping, or the emd's classes or band statistics lack their keys.
    """
    from .store import json_mapping

    names = ("esri_accumulated_stats.json", "esri_model_definition.emd")
    raws = [store.read(name) for name in names]
    if any(raw is None for raw in raws):
        return None
    docs = []
    for name, raw in zip(names, raws, strict=True):
        doc, why = json_mapping(raw)
        if not why and name.endswith(".emd"):
            keys = [("Classes", k) for k in ("Name", "Value")] + [("AllTilesStats", k) for k in _BAND_KEYS]
            lost = sorted({f"{part}[].{k}" for part, k in keys for entry in doc.get(part) or []
                           if not isinstance(entry, dict) or k not in entry})
            why = f"lacks {', '.join(lost)}" if lost else ""
        if why:
            raise OutputError(f"out_folder={store.url!r}: {name} {why}; `chipflow validate` checks it")
        docs.append(doc)
    return docs[0], docs[1]


_BAND_KEYS = ("Min", "Max", "Mean", "StdDev")


def _stats_lines(out_folder: str, s: dict[str, Any], emd: dict[str, Any]) -> str:
    """``chipflow stats``'s text for one dataset."""
    fs = s.get("FeatureStats", {})
    ps = s.get("ClassPixelStats", {})
    lines = [f"{out_folder}: {s.get('MetaDataMode')}, {s.get('NumTiles')} chips of "
             f"{s.get('TileSizeX')}x{s.get('TileSizeY')}, {s.get('NumBands')} bands",
             f"  {'class':<20}{'value':>7}{'images':>9}{'features':>10}" + (f"{'pixels':>13}" if ps else "")]
    for i, c in enumerate(emd.get("Classes", [])):
        row = (f"  {c['Name'][:19]:<20}{c['Value']:>7}{fs.get('NumImagesPerClass', [0] * 99)[i]:>9}"
               f"{fs.get('NumFeaturesPerClass', [0] * 99)[i]:>10}")
        if ps:
            row += f"{ps['NumPixelsPerClass'][i]:>13}"
        lines.append(row)
    lines.append(f"  {'band':<20}{'min':>10}{'max':>10}{'mean':>12}{'std':>12}")
    for b in emd.get("AllTilesStats", []):
        lines.append(f"  {b.get('BandName', '')[:19]:<20}{b['Min']:>10.4g}{b['Max']:>10.4g}"
                     f"{b['Mean']:>12.4f}{b['StdDev']:>12.4f}")
    return "\n".join(lines)


@main.command()
@click.argument("out_folder")
@_storage_option_flag
def validate(out_folder: str, storage_option: tuple[str, ...]) -> None:
    """Check that OUT_FOLDER is a complete, consistent dataset (exit 0 only then)."""
    from .validate import validate_dataset

    try:
        report = validate_dataset(out_folder, storage_options=parse_storage_options(storage_option))
    except ChipflowError as exc:
        click.echo(f"chipflow: error: {exc}", err=True)
        sys.exit(2)
    click.echo(report.summary())
    sys.exit(0 if report.ok else 1)
