"""How chipflow's time and worker memory grow with the number of label features.

``python benchmarks/features_scaling.py [--size 8192] [--stride 256] [--features 20000 200000 2000000]``
exports the same raster with each label set (PASCAL VOC, ALL_TILES) on a
2-worker ``chipflow.local_cluster`` and prints wall time, its ratio to the smallest set (of the
medians, and per repeat: the runs of one repeat follow one another), and the peak RSS
of the largest worker process. Above 500k features chipflow partitions the class
data (sorted along a Hilbert curve, as dask-geopandas orders it) instead of broadcasting it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import psutil

from benchmarks.generate import make_inputs
from benchmarks.scratch import Scratch


def _peak_worker_rss(stop: threading.Event, out: list[float]) -> None:
    me = psutil.Process()
    peak = 0.0
    while not stop.is_set():
        for child in me.children(recursive=True):
            try:
                peak = max(peak, child.memory_info().rss / 2**20)
            except psutil.Error:
                pass
        time.sleep(0.05)
    out.append(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--features", type=int, nargs="+", default=[20_000, 200_000, 2_000_000])
    parser.add_argument("--stride", type=int, default=256, help="chip stride in pixels (256 px chips)")
    parser.add_argument("--workdir", default="/tmp/chipflow-bench")
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeat", type=int, default=1, help="runs per label set, interleaved; medians kept")
    args = parser.parse_args()

    from distributed import Client

    import chipflow

    runs: dict[int, list[dict]] = {n: [] for n in args.features}
    with (Scratch(args.workdir) as scratch,
          chipflow.local_cluster(2, dashboard_address=":0") as cluster,
          Client(cluster) as client):
        folder = Path(args.workdir) / "inputs"
        files = {n: make_inputs(folder, size=args.size, n_features=n) for n in args.features}
        # warm-up (imports, GDAL set-up on the workers), not measured: the first set would pay it alone
        _export(client, *files[args.features[0]], scratch, args.stride)
        for _ in range(args.repeat):
            for n in args.features:
                stop, peak = threading.Event(), []
                watcher = threading.Thread(target=_peak_worker_rss, args=(stop, peak))
                watcher.start()
                result, seconds = _export(client, *files[n], scratch, args.stride)
                stop.set()
                watcher.join()
                runs[n].append({"chips": result.num_chips, "seconds": seconds, "timings": result.timings,
                                "peak_process_rss_mb": peak[0]})
                print(f"{n:>10,} features: {seconds:7.2f} s ({result.timings}), peak RSS {peak[0]:.0f} MiB",
                      flush=True)
    rows = [{"features": n, "seconds": statistics.median(r["seconds"] for r in runs[n]),
             "peak_process_rss_mb": max(r["peak_process_rss_mb"] for r in runs[n]), "runs": runs[n]}
            for n in args.features]
    base = rows[0]["seconds"]
    for row in rows:
        row["ratio"] = row["seconds"] / base
        # each repeat's runs follow one another, so their ratio is the least disturbed by the machine's drift
        row["paired_ratios"] = [r["seconds"] / b["seconds"] for r, b in zip(row["runs"], rows[0]["runs"],
                                                                            strict=True)]
        print(f"{row['features']:>10,}  x{row['features'] / rows[0]['features']:>6.0f} features  "
              f"x{row['ratio']:.2f} time (ratio of medians; paired runs: median "
              f"x{statistics.median(row['paired_ratios']):.2f}, "
              f"x{min(row['paired_ratios']):.2f}-{max(row['paired_ratios']):.2f})  "
              f"{row['peak_process_rss_mb']:.0f} MiB")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


def _export(client: object, raster: Path, vector: Path, scratch: Scratch,
            stride: int) -> tuple[object, float]:
    """One export of ``raster`` with ``vector`` into a fresh folder (then trashed): result, seconds."""
    import rasterio

    import chipflow

    with rasterio.open(raster) as src:  # the chips' bytes, uncompressed
        need = src.width * src.height * src.count * (256 // stride) ** 2
    folder = scratch.fresh("features")
    scratch.ready(need)  # synced, and no deletion of files in the last half-minute (benchmarks/scratch.py)
    started = time.perf_counter()
    result = chipflow.export_training_data(
        raster, folder / "out", vector, stride_x=stride, stride_y=stride,
        metadata_format="PASCAL_VOC_rectangles", output_nofeature_tiles="ALL_TILES",
        class_value_field="classvalue", client=client)
    seconds = time.perf_counter() - started
    scratch.discard(folder)
    return result, seconds


if __name__ == "__main__":
    main()
