"""The ``chipflow`` command: a thin click layer over the Python API.

Exit status: 0 success; 2 bad input (a parameter, a missing or unusable input,
an output folder that cannot be used), reported in one line before anything is
written; 1 a failure during the run.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from . import formats
from .config import ImageChipFormat, NoFeatureTiles
from .errors import ChipflowError
from .grid import EdgePolicy
from .pipeline import export_training_data
from .progress import RichProgress

__all__ = ["main"]


def _values(values: list[str]) -> str:
    """Help text listing ESRI values (validated, case-insensitively, by the library)."""
    return "One of " + ", ".join(values) + " (any case)."


@click.group()
@click.version_option(package_name="chipflow")
def main() -> None:
    """Cut georeferenced rasters and labels into deep-learning training chips."""


@main.command()
@click.argument("in_raster")
@click.argument("out_folder")
@click.option("--in-class-data", required=True, help="Vector class data (GPKG, GeoJSON, SHP, Parquet).")
@click.option("--image-chip-format", default="TIFF", show_default=True,
              help=_values([f.value for f in ImageChipFormat]))
@click.option("--tile-size-x", type=int, default=256, show_default=True)
@click.option("--tile-size-y", type=int, default=256, show_default=True)
@click.option("--stride-x", type=int, default=128, show_default=True)
@click.option("--stride-y", type=int, default=128, show_default=True)
@click.option("--output-nofeature-tiles", default="ONLY_TILES_WITH_FEATURES", show_default=True,
              help=_values([f.value for f in NoFeatureTiles]))
@click.option("--metadata-format", default="KITTI_rectangles", show_default=True,
              help=_values(formats.names()))
@click.option("--class-value-field", default=None, help="Integer class field (default: value/classvalue).")
@click.option("--edge-policy", default="DROP", show_default=True,
              help="Last partial row/column of chips. " + _values([e.value for e in EdgePolicy]))
@click.option("--overwrite", is_flag=True, help="Replace the contents of a non-empty OUT_FOLDER.")
@click.option("--scheduler", default=None, help="Dask scheduler address (default: a local cluster).")
@click.option("--n-workers", type=int, default=None, help="Local cluster worker processes (default: cores).")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
def export(in_raster: str, out_folder: str, quiet: bool, **kwargs: Any) -> None:
    """Export chips and labels from IN_RASTER into OUT_FOLDER."""
    in_class_data = kwargs.pop("in_class_data")
    started = time.perf_counter()
    try:
        result = export_training_data(in_raster, out_folder, in_class_data,
                                      progress=None if quiet else RichProgress(), **kwargs)
    except ChipflowError as exc:
        click.echo(f"chipflow: error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # a failure during the run, not bad input
        click.echo(f"chipflow: export failed: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    if quiet:
        return
    elapsed = time.perf_counter() - started
    classes = ", ".join(f"{name} ({n})" for name, n in result.features_per_class.items())
    click.echo(
        "\n".join([
            f"chipflow export: {result.statistics['MetaDataMode']} → {result.out_folder}",
            f"  chips      {result.num_chips:>10,}   in {result.num_blocks} blocks",
            f"  features   {result.num_features:>10,}   (instances over all chips)",
            f"  classes    {len(result.classes):>10}   {classes}",
            f"  time       {elapsed:>10.1f} s",
            f"  speed      {result.num_chips / elapsed if elapsed else 0:>10.1f} chips/s",
            f"  output     {result.out_folder}",
        ])
    )


@main.command()
@click.argument("out_folder")
def validate(out_folder: str) -> None:
    """Check that OUT_FOLDER is a complete, consistent dataset (exit 0 only then)."""
    from .validate import validate_dataset

    try:
        report = validate_dataset(out_folder)
    except ChipflowError as exc:
        click.echo(f"chipflow: error: {exc}", err=True)
        sys.exit(2)
    click.echo(report.summary())
    sys.exit(0 if report.ok else 1)
