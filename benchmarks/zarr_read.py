"""Read a random batch of chips: one Zarr store (``image_chip_format="ZARR"``) vs GeoTIFF chips.

Usage::

    python benchmarks/zarr_read.py [--size 8192] [--features 20000] [--stride 256] [--batch 64]
                                   [--batches 20] [--seed 0] [--workdir DIR] [--out results.json] [--quick]

The same input (``generate.make_inputs``) is exported twice with chipflow
(``ALL_TILES``, 256 px chips, PASCAL VOC labels): once as TIFF chips, once as ZARR.
Then, for ``--batches`` random batches of ``--batch`` chip ids (the same ids for
every reader), three readers load the batch into one ``(batch, band, y, x)``
array:

- ``tiff``: ``rasterio.open(...).read()`` of each chip's GeoTIFF, as a dataset class does;
- ``zarr``: ``images[i]`` of each chip from ``chips.zarr``, one chip at a time;
- ``zarr_oindex``: ``images.oindex[ids]``, the whole batch in one orthogonal
  selection (zarr fetches and decodes the chunks concurrently).

Times are medians over the batches, with the page cache warm (both exports were
just written). The first batch of every reader is compared pixel for pixel with the
``tiff`` one; a difference exits with status 1. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.generate import make_inputs  # noqa: E402

TILE = 256


def export(raster: Path, vector: Path, out: Path, fmt: str, stride: int, client) -> dict:
    """One chipflow export into ``out``; its chip count, seconds and bytes on disk."""
    import chipflow

    start = time.perf_counter()
    result = chipflow.export_training_data(
        str(raster), str(out), str(vector), image_chip_format=fmt, tile_size_x=TILE, tile_size_y=TILE,
        stride_x=stride, stride_y=stride, output_nofeature_tiles="ALL_TILES",
        metadata_format="PASCAL_VOC_rectangles", class_value_field="classvalue", client=client)
    seconds = time.perf_counter() - start
    images = out / ("chips.zarr" if fmt == "ZARR" else "images")
    size = sum(p.stat().st_size for p in images.rglob("*") if p.is_file())
    return {"chips": result.num_chips, "export_seconds": seconds, "image_bytes": size}


def readers(tiff_out: Path, zarr_out: Path) -> tuple[dict, np.ndarray]:
    """Name → function reading a batch of chip ids into one ``(n, band, y, x)`` array; the chip ids."""
    import geopandas as gpd
    import rasterio
    import zarr

    index = gpd.read_parquet(tiff_out / "chips.parquet")
    paths = dict(zip(index["chip_id"].tolist(), index["image_path"].tolist(), strict=True))
    images = zarr.open_group(zarr_out / "chips.zarr", mode="r")["images"]

    def tiff(ids: np.ndarray) -> np.ndarray:
        chips = []
        for i in ids.tolist():
            with rasterio.open(tiff_out / paths[i]) as ds:
                chips.append(ds.read())
        return np.stack(chips)

    def zarr_each(ids: np.ndarray) -> np.ndarray:
        return np.stack([images[i] for i in ids.tolist()])

    def zarr_oindex(ids: np.ndarray) -> np.ndarray:
        return images.oindex[ids]

    return {"tiff": tiff, "zarr": zarr_each, "zarr_oindex": zarr_oindex}, np.array(sorted(paths))


def measure(read: dict, ids: np.ndarray, batch: int, batches: int, seed: int) -> tuple[dict, bool]:
    """Median seconds per batch of each reader, and whether all readers agree on the first batch."""
    rng = np.random.default_rng(seed)
    draws = [rng.choice(ids, size=batch, replace=False) for _ in range(batches)]
    times: dict[str, list[float]] = {name: [] for name in read}
    reference = None
    same = True
    for k, draw in enumerate(draws):
        for name, fn in read.items():  # interleaved: machine noise hits every reader alike
            start = time.perf_counter()
            data = fn(draw)
            times[name].append(time.perf_counter() - start)
            if k == 0:
                if reference is None:
                    reference = data
                same &= data.shape == reference.shape and bool(np.array_equal(data, reference))
    return {name: statistics.median(t) for name, t in times.items()}, same


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=8192, help="raster px (default 8192)")
    parser.add_argument("--features", type=int, default=20000, help="building rectangles (default 20000)")
    parser.add_argument("--stride", type=int, default=256, help="chip stride px (default 256)")
    parser.add_argument("--batch", type=int, default=64, help="chips per batch (default 64)")
    parser.add_argument("--batches", type=int, default=20, help="random batches; medians kept (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="chipflow worker processes (default 2)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "chipflow-bench")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="1536 px, stride 128 (121 chips), 3 batches, inputs in a temporary folder "
                        "(smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.features, args.stride, args.batches = 1536, 300, 128, 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from distributed import Client, LocalCluster

    scratch = Path(tempfile.mkdtemp(prefix="zarr-read-"))
    workdir = scratch if args.quick else args.workdir
    try:
        raster, vector = make_inputs(workdir / "inputs", size=args.size, n_features=args.features)
        runs = scratch / "runs"
        with (LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                           dashboard_address=":0") as cluster, Client(cluster) as client):
            exports = {fmt: export(raster, vector, runs / fmt.lower(), fmt, args.stride, client)
                       for fmt in ("TIFF", "ZARR")}
        if exports["TIFF"]["chips"] != exports["ZARR"]["chips"]:
            print(f"chip counts differ: {exports}", file=sys.stderr)
            return 1
        read, ids = readers(runs / "tiff", runs / "zarr")
        if len(ids) < args.batch:
            print(f"only {len(ids)} chips, fewer than a batch of {args.batch}", file=sys.stderr)
            return 1
        medians, same = measure(read, ids, args.batch, args.batches, args.seed)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    base = medians["tiff"]
    print(f"{args.size} px raster, {len(ids)} chips of {TILE} px, batches of {args.batch}, "
          f"median of {args.batches}")
    print(f"{'reader':<13}{'ms/batch':>10}{'chips/s':>10}{'vs tiff':>9}")
    for name, seconds in medians.items():
        print(f"{name:<13}{seconds * 1e3:>10.1f}{args.batch / seconds:>10.0f}{seconds / base:>9.2f}")
    sizes = {fmt: e["image_bytes"] / 1e6 for fmt, e in exports.items()}
    print(f"ratio zarr/tiff (time per batch): {medians['zarr'] / base:.2f} one chip at a time, "
          f"{medians['zarr_oindex'] / base:.2f} with oindex")
    print(f"image bytes: tiff {sizes['TIFF']:.1f} MB, zarr {sizes['ZARR']:.1f} MB; export seconds: "
          f"tiff {exports['TIFF']['export_seconds']:.1f}, zarr {exports['ZARR']['export_seconds']:.1f}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "exports": exports, "median_seconds": medians,
                                        "ratio_zarr_tiff": medians["zarr"] / base,
                                        "ratio_zarr_oindex_tiff": medians["zarr_oindex"] / base}, indent=2))
    if not same:
        print("the readers disagree on the first batch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
