"""Benchmark chipflow against a hand-written loop and the no-framework floor.

Usage::

    python benchmarks/run.py [--size 8192] [--features 20000] [--stride 256 --stride 128]
                             [--format TIFF] [--repeat 3] [--quick] [--scaling] [--cli]
                             [--out results.json] [--plot plot.png] [--workdir DIR]

Every measured run happens in a fresh Python process, so that the peak RSS of
one system is not inflated by what another left behind. See
``benchmarks/README.md`` for what each number means.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from distributed.diagnostics.plugin import SchedulerPlugin

if TYPE_CHECKING:
    from benchmarks.scratch import Scratch

REPO = Path(__file__).resolve().parent.parent
TILE = 256
SYSTEMS = ("by_hand", "floor", "chipflow")
FORMATS = ("TIFF", "PNG", "JPEG")
RESULT_MARKER = "CHIPFLOW-BENCH-RESULT "
# A child is started with `python -c`, so processes it spawns (dask workers)
# do not re-import this module as their __main__.
CHILD_CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from benchmarks.run import child_main; child_main(sys.argv[2])"
)


# --------------------------------------------------------------------- child side


def child_main(spec_json: str) -> None:
    """Entry point of a measurement process: run one system, print its result."""
    result = measure(json.loads(spec_json))
    print(RESULT_MARKER + json.dumps(result), flush=True)


def measure(spec: dict) -> dict:
    """Run one system once.

    Parameters
    ----------
    spec : dict
        ``system``, ``raster``, ``vector``, ``out``, ``stride``, ``format`` and
        ``workers``.

    Returns
    -------
    dict
        ``chips`` and ``seconds``, plus ``startup_seconds`` for chipflow.
    """
    if spec["system"] == "chipflow":
        return measure_chipflow(spec)
    if spec["system"] == "affinity":  # the CPUs this process and a child of it may run on (a test)
        child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                               capture_output=True, text=True, check=True)
        return {"cpus": sorted(os.sched_getaffinity(0)), "child_cpus": json.loads(child.stdout),
                "chips": 0, "seconds": 0.0}
    from benchmarks.baselines import by_hand, floor

    if spec["system"] == "by_hand":
        return by_hand(spec["raster"], spec["vector"], spec["out"], TILE, spec["stride"])
    return floor(spec["raster"], spec["out"], TILE, spec["stride"], spec["format"], processes=spec["workers"],
                 label_files=spec["system"] == "floor_labels")


def measure_chipflow(spec: dict) -> dict:
    """Time cluster start-up, a small warm-up export, then ``chipflow.export_training_data``.

    The warm-up exports a separate small input (``spec["warmup_inputs"]``: 4096 px,
    4k features, four blocks) into its own folder: it pays what only a
    process's first export pays (imports on the client and the workers, GDAL
    set-up, the workers' tuning), reported on its own as ``warmup_seconds``. Its
    raster is not the measured one, so no decoded tile of the measured raster is
    cached. ``seconds`` is the full export that follows (steady state). The
    whole-process cost, cold, is what ``--cli`` measures.
    """
    from distributed import Client, LocalCluster

    import chipflow

    kwargs = dict(
        image_chip_format=spec["format"],
        tile_size_x=TILE,
        tile_size_y=TILE,
        stride_x=spec["stride"],
        stride_y=spec["stride"],
        output_nofeature_tiles="ALL_TILES",
        metadata_format="PASCAL_VOC_rectangles",
        class_value_field="classvalue",
    )
    start = time.perf_counter()
    cluster = (  # chipflow's own cluster (the CLI's), or Dask's defaults with --dask-defaults
        LocalCluster(n_workers=spec["workers"], threads_per_worker=1, processes=True, dashboard_address=None)
        if spec.get("dask_defaults") else chipflow.local_cluster(spec["workers"], dashboard_address=None)
    )
    with cluster, Client(cluster) as client:
        startup = time.perf_counter() - start
        start = time.perf_counter()
        warm_raster, warm_vector = spec["warmup_inputs"]
        chipflow.export_training_data(warm_raster, spec["warmup"], warm_vector, client=client,
                                      **{**kwargs, "stride_x": 256, "stride_y": 256})
        warmup = time.perf_counter() - start
        os.sync()  # the warm-up's files reach the disk before the measured run starts
        client.register_plugin(BlockClock())  # the scheduler's own clock, which is this process's
        began, start = time.time(), time.perf_counter()
        result = chipflow.export_training_data(
            spec["raster"], spec["out"], spec["vector"], client=client, **kwargs
        )
        seconds, ended = time.perf_counter() - start, time.time()
        blocks = client.run_on_scheduler(BlockClock.collect)  # after the export, untimed
        phases = block_phases(blocks, began, ended, n_blocks=result.num_blocks)
        tick_ms = sorted(set(client.run(
            lambda dask_worker: dask_worker.periodic_callbacks["tick"].callback_time).values()))
    return {"chips": int(result.num_chips), "seconds": seconds, "startup_seconds": startup,
            "warmup_seconds": warmup, "worker_tick_ms": tick_ms, "phases": phases}


class BlockClock(SchedulerPlugin):
    """A Dask scheduler plugin that stamps chipflow's block tasks on the scheduler's clock.

    It records when each block was first sent to a worker and when the
    scheduler learned it was done, and by which worker. The scheduler of a
    ``LocalCluster`` runs in the client's process, so these stamps and the
    client's ``time.time()`` are one clock, and they are causal: a block is sent
    after the export was called, and its result is known before the export
    returns. The workers' own task-stream stamps are not: Dask shifts them by
    each worker's estimate of its offset from the scheduler (``scheduler_delay``),
    which on one machine is noise of a few ms, and it once put the last block's
    end 3 ms after the export's return.
    """

    name = "chipflow-benchmark-block-clock"

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.done: dict[str, tuple[str, float]] = {}

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if not str(key).startswith("chipflow-block-"):
            return
        if finish == "processing":
            self.sent.setdefault(str(key), time.time())
        elif start == "processing" and finish == "memory":
            self.done[str(key)] = (kwargs["worker"], time.time())

    @staticmethod
    def collect(dask_scheduler) -> list[dict]:
        """The blocks stamped, as ``block_phases`` reads them, and the plugin removed."""
        clock = dask_scheduler.plugins.pop(BlockClock.name)
        return [{"key": key, "worker": worker, "sent": clock.sent[key], "done": done}
                for key, (worker, done) in clock.done.items()]


def block_phases(blocks: list[dict], began: float, ended: float, *, n_blocks: int | None = None) -> dict:
    """Split an export's wall time at its block tasks, as ``BlockClock`` stamped them.

    ``before_blocks``: from the call to the first block's dispatch (planning,
    the broadcast, scheduling); ``blocks``: from there to the scheduler learning
    that the last one was done; ``after_blocks``: from there to the return
    (fetching the last results and merging them, the chip index, the metadata);
    ``idle_at_end``: how long the first worker to finish its last block waited
    for the last one (0 with one worker). Empty when no block ran (a resumed
    export), or when fewer than ``n_blocks`` finished once each.
    """
    if not blocks or (n_blocks is not None and len(blocks) < n_blocks):
        return {}
    last_done: dict[str, float] = {}
    for block in blocks:
        last_done[block["worker"]] = max(last_done.get(block["worker"], 0.0), block["done"])
    first, last = min(block["sent"] for block in blocks), max(last_done.values())
    return {"before_blocks": first - began, "blocks": last - first, "after_blocks": ended - last,
            "idle_at_end": last - min(last_done.values())}


# -------------------------------------------------------------------- parent side


class PeakRss(threading.Thread):
    """Sample, in the background, the largest RSS of a process tree.

    Every ``interval`` seconds the process and all its descendants are
    visited; the peak is the largest RSS seen for any single process.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        """Sample until :meth:`stop` is called or the process is gone."""
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            for proc in procs:
                try:
                    self.peak = max(self.peak, proc.memory_info().rss)
                except psutil.Error:
                    pass
            self._done.wait(self.interval)

    def stop(self) -> float:
        """Stop sampling and return the peak in MiB."""
        self._done.set()
        self.join()
        return self.peak / 2**20


def run_child(spec: dict) -> dict:
    """Run :func:`measure` in a fresh process and add its peak RSS.

    Raises
    ------
    RuntimeError
        If the child fails; the message holds the end of its stderr.
    """
    cpus = spec.get("cpus")
    with tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD_CODE, str(REPO), json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            # pinned runs: the process and everything it starts share these CPUs
            preexec_fn=(lambda: os.sched_setaffinity(0, range(cpus))) if cpus else None,
        )
        sampler = PeakRss(proc.pid)
        sampler.start()
        stdout, _ = proc.communicate()
        process_seconds = time.perf_counter() - start
        peak = sampler.stop()
        if proc.returncode != 0:
            stderr.seek(0)
            raise RuntimeError(f"{spec['system']} failed (exit {proc.returncode}):\n" + stderr.read()[-4000:])
    line = next(s for s in reversed(stdout.splitlines()) if s.startswith(RESULT_MARKER))
    return {**json.loads(line[len(RESULT_MARKER) :]), "peak_rss_mb": peak,
            "process_seconds": process_seconds}


def run_cli(raster: Path, vector: Path, stride: int, out: Path) -> dict:
    """Time the ``chipflow export`` command from the outside.

    Returns
    -------
    dict
        ``seconds`` (launch to exit), ``first_file_seconds`` (launch to the
        first file in ``out/images``), ``chips`` and ``peak_rss_mb``.
    """
    exe = shutil.which("chipflow")
    if exe is None:
        raise RuntimeError("the `chipflow` command is not on PATH (pip install -e .)")
    cmd = [
        exe,
        "export",
        str(raster),
        str(out),
        "--in-class-data",
        str(vector),
        "--metadata-format",
        "PASCAL_VOC_rectangles",
        "--output-nofeature-tiles",
        "ALL_TILES",
        "--stride-x",
        str(stride),
        "--stride-y",
        str(stride),
        "--class-value-field",
        "classvalue",
    ]
    images = out / "images"
    first = None
    with tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        sampler = PeakRss(proc.pid)
        sampler.start()
        while first is None and proc.poll() is None:
            if _has_file(images):
                first = time.perf_counter() - start
            else:
                time.sleep(0.01)
        proc.wait()
        seconds = time.perf_counter() - start
        peak = sampler.stop()
        if proc.returncode != 0:
            stderr.seek(0)
            raise RuntimeError(f"chipflow export failed (exit {proc.returncode}):\n" + stderr.read()[-4000:])
    return {
        "chips": sum(1 for _ in images.iterdir()),
        "seconds": seconds,
        "first_file_seconds": first,
        "peak_rss_mb": peak,
    }


def _has_file(folder: Path) -> bool:
    """Whether ``folder`` exists and holds at least one entry."""
    try:
        with os.scandir(folder) as entries:
            return any(True for _ in entries)
    except FileNotFoundError:
        return False


def summarize(runs: list[dict], chip_bytes: int) -> dict:
    """Medians over repeated runs of one system.

    ``seconds`` and ``startup_seconds`` are medians, ``peak_rss_mb`` the
    maximum; ``chips_per_s`` and ``mb_per_s`` (raw decoded chip bytes, 1 MB =
    1e6 bytes) derive from the median seconds.
    """
    seconds = statistics.median(r["seconds"] for r in runs)
    chips = runs[0]["chips"]
    summary = {
        "chips": chips,
        "seconds": seconds,
        "chips_per_s": chips / seconds,
        "mb_per_s": chips * chip_bytes / 1e6 / seconds,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "runs": runs,
    }
    for key in ("startup_seconds", "warmup_seconds", "first_file_seconds", "process_seconds"):
        if key in runs[0]:
            summary[key] = statistics.median(r[key] for r in runs if r[key] is not None)
    if all(r.get("phases") for r in runs):  # chipflow, every run's stream complete
        summary["phases"] = {key: statistics.median(r["phases"][key] for r in runs)
                             for key in runs[0]["phases"]}
    return summary


def run_once(spec: dict, scratch: Scratch, name: str, need_bytes: int) -> dict:
    """Run one system once in a fresh, empty output folder, then put it in the trash.

    The disk is synced before each run, so no run pays for writing back the
    files of the one before (gigabytes of dirty pages at large sizes), and no
    run follows a deletion of files by less than ``scratch.QUIET_SECONDS``
    (see :mod:`benchmarks.scratch`).
    """
    out = scratch.fresh(name)
    warmup = scratch.fresh(f"{name}-warmup")
    try:
        scratch.ready(need_bytes)
        return run_child({**spec, "out": str(out), "warmup": str(warmup)})
    finally:
        scratch.discard(out, warmup)


def bench_config(config: dict, args: argparse.Namespace, systems: list[str]) -> dict:
    """Generate the inputs of one configuration and measure every system on it.

    Repeats are interleaved (all systems once, then again) so that machine
    noise hits every system alike. With ``--scaling``, chipflow also runs with
    a single worker, recorded as ``chipflow_1_worker``, and with a single worker
    whose whole process tree (client, scheduler, worker and its writer threads)
    is pinned to one CPU, recorded as ``chipflow_1_core``.
    """
    from benchmarks.baselines import chip_offsets

    start = time.perf_counter()
    raster, vector = inputs(config, args.workdir)
    generate_seconds = time.perf_counter() - start
    base = {
        "raster": str(raster),
        "vector": str(vector),
        "stride": config["stride"],
        "format": config["format"],
        "workers": args.workers,
        "dask_defaults": args.dask_defaults,
    }
    if "chipflow" in systems:
        warm = {"size": 4096, "features": 4000, "format": config["format"]}
        base["warmup_inputs"] = [str(p) for p in inputs(warm, args.workdir)]
    specs = {name: {**base, "system": name} for name in systems}
    if args.floor_labels:
        specs["floor_labels"] = {**base, "system": "floor_labels"}
    if args.scaling and "floor" in systems:  # the machine's own scaling, for comparison
        specs["floor_1_process"] = {**base, "system": "floor", "workers": 1}
    if args.scaling and "chipflow" in systems:
        specs["chipflow_1_worker"] = {**base, "system": "chipflow", "workers": 1}
        if hasattr(os, "sched_setaffinity") and args.workers >= (os.cpu_count() or 1):
            # per core: only when the main run has every core (one worker per core)
            specs["chipflow_1_core"] = {**base, "system": "chipflow", "workers": 1, "cpus": 1}
    chip_bytes = chip_nbytes(raster)
    expected_chips = len(chip_offsets(config["size"], TILE, config["stride"])) ** 2
    need_bytes = run_bytes(expected_chips, chip_bytes)
    runs: dict[str, list[dict]] = {name: [] for name in specs}
    for _ in range(args.repeat):
        for name, spec in specs.items():
            print(f"   {name} ...", end=" ", flush=True)
            runs[name].append(run_once(spec, args.scratch, name, need_bytes))
            print(f"{runs[name][-1]['seconds']:.2f} s", flush=True)
    entry = {
        "config": {**config, "tile": TILE},
        "inputs": [str(raster), str(vector)],
        "generate_seconds": generate_seconds,
        "expected_chips": expected_chips,
        "systems": {name: summarize(r, chip_bytes) for name, r in runs.items()},
    }
    add_comparisons(entry, args.workers)
    return entry


def inputs(config: dict, workdir: Path) -> tuple[Path, Path]:
    """Generate, or reuse from ``workdir/inputs``, the files of a configuration."""
    from benchmarks.generate import make_inputs, rgb_of

    raster, vector = make_inputs(workdir / "inputs", config["size"], config["features"])
    if config.get("format") in ("PNG", "JPEG"):  # at most 3 bands: every system reads the RGB copy
        raster = rgb_of(raster)
    return raster, vector


def chip_nbytes(raster: Path) -> int:
    """Raw decoded size of one chip of ``raster``, all bands."""
    import numpy as np
    import rasterio

    with rasterio.open(raster) as src:
        return TILE * TILE * src.count * np.dtype(src.dtypes[0]).itemsize


def run_bytes(chips: int, chip_bytes: int) -> int:
    """The disk room one run needs: its chips uncompressed, and 30% for labels and metadata."""
    return int(chips * chip_bytes * 1.3)


def add_comparisons(entry: dict, workers: int) -> None:
    """Add chip-count agreement, speed ratios and worker scaling to ``entry``."""
    systems = entry["systems"]
    counts = {name: s["chips"] for name, s in systems.items()}
    entry["counts_equal"] = len(set(counts.values())) == 1
    if not entry["counts_equal"]:
        print(f"WARNING: systems wrote different numbers of chips: {counts}", file=sys.stderr)
    speed = {name: s["chips_per_s"] for name, s in systems.items()}
    if "floor_1_process" in speed:
        entry["floor_scaling"] = {
            "chips_per_s": {"1": speed["floor_1_process"], str(workers): speed["floor"]},
            "ratio": speed["floor"] / speed["floor_1_process"],
            "paired": _paired(systems["floor_1_process"], systems["floor"]),
        }
    if "chipflow" not in systems:
        return
    entry["ratios"] = {f"chipflow/{name}": speed["chipflow"] / speed[name]
                       for name in ("by_hand", "floor", "floor_labels") if name in speed}
    entry["paired_ratios"] = {f"chipflow/{name}": _paired(systems[name], systems["chipflow"])
                              for name in ("by_hand", "floor", "floor_labels") if name in speed}
    for name in ("chipflow_1_worker", "chipflow_1_core"):
        if name in speed:
            entry["paired_ratios"][f"chipflow/{name}"] = _paired(systems[name], systems["chipflow"])
    if "chipflow_1_worker" in speed:
        entry["scaling"] = {
            "chips_per_s": {"1": speed["chipflow_1_worker"], str(workers): speed["chipflow"]},
            "ratio": speed["chipflow"] / speed["chipflow_1_worker"],
        }
        if "phases" in systems["chipflow_1_worker"] and "phases" in systems["chipflow"]:
            # the same for the block phase alone: what the workers' part scales, Amdahl's serial part aside
            blocks = {name: systems[name]["phases"]["blocks"] for name in ("chipflow_1_worker", "chipflow")}
            entry["scaling"]["blocks"] = {"seconds": {"1": blocks["chipflow_1_worker"],
                                                      str(workers): blocks["chipflow"]},
                                          "ratio": blocks["chipflow_1_worker"] / blocks["chipflow"]}
        if "floor_scaling" in entry:  # against the machine's own scaling, measured alongside
            one, many = (systems[name]["runs"] for name in ("chipflow_1_worker", "chipflow"))
            entry["scaling"]["against_floor"] = {
                "ratio": entry["scaling"]["ratio"] / entry["floor_scaling"]["ratio"],
                "paired": _spread([(a["seconds"] / b["seconds"]) / floor for a, b, floor in zip(
                    one, many, entry["floor_scaling"]["paired"]["runs"], strict=True)]),
            }
        if "chipflow_1_core" in speed:  # the same, per core: one worker given one CPU
            cores = os.cpu_count() or workers
            entry["scaling"]["per_core"] = {
                "chips_per_s": {"1": speed["chipflow_1_core"], str(cores): speed["chipflow"]},
                "ratio": speed["chipflow"] / speed["chipflow_1_core"],
            }


def _paired(other: dict, chipflow: dict) -> dict:
    """A system's speed (``chipflow``) over ``other``'s, repeat by repeat (the two ran minutes apart at most).

    The machine's drift moves both runs of a repeat alike, so these ratios
    scatter less than the medians' ratio does.
    """
    return _spread([a["seconds"] / b["seconds"]
                    for a, b in zip(other["runs"], chipflow["runs"], strict=True)])


def _spread(ratios: list[float]) -> dict:
    """Repeat-by-repeat ratios with their median, min and max."""
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "runs": ratios}


def bench_cli(entry: dict, args: argparse.Namespace) -> dict:
    """Time ``chipflow export`` as a whole process on the inputs of ``entry``."""
    raster, vector = (Path(p) for p in entry["inputs"])
    stride = entry["config"]["stride"]
    runs = []
    chip_bytes = chip_nbytes(raster)
    need_bytes = run_bytes(entry["expected_chips"], chip_bytes)
    for _ in range(args.repeat):
        out = args.scratch.fresh("cli")
        try:
            args.scratch.ready(need_bytes)
            runs.append(run_cli(raster, vector, stride, out))
        finally:
            args.scratch.discard(out)
    cli = {"config": entry["config"], **summarize(runs, chip_bytes)}
    floor = entry["systems"].get("floor")
    if floor:  # both timed from the outside: interpreter, imports, pools or cluster, metadata
        cli["floor_process_seconds"] = floor["process_seconds"]
        cli["cli/floor_process"] = cli["seconds"] / floor["process_seconds"]
    return cli


def chipflow_import_error() -> str | None:
    """``None`` if chipflow's entry point imports, else the error as text."""
    try:
        from chipflow import export_training_data  # noqa: F401
    except Exception:  # any failure means chipflow cannot be benchmarked
        return traceback.format_exc(limit=0).strip()
    return None


def configs(args: argparse.Namespace) -> list[dict]:
    """Every combination of size, features, stride and format to measure."""
    return [
        {"size": size, "features": features, "stride": stride, "format": fmt}
        for size, features, stride, fmt in itertools.product(
            args.size, args.features, args.stride, args.format
        )
    ]


def machine() -> dict:
    """Description of the machine the numbers come from."""
    return {
        "cpus": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def print_entry(entry: dict) -> None:
    """Print the table of one configuration."""
    print(
        f"{'system':<18}{'chips':>8}{'wall s':>9}{'chips/s':>10}{'MB/s':>9}"
        f"{'peak RSS MiB':>14}{'startup s':>11}{'warm-up s':>11}"
    )
    for name, s in entry["systems"].items():
        startup = f"{s['startup_seconds']:.2f}" if "startup_seconds" in s else "-"
        warmup = f"{s['warmup_seconds']:.2f}" if "warmup_seconds" in s else "-"
        print(
            f"{name:<18}{s['chips']:>8}{s['seconds']:>9.2f}{s['chips_per_s']:>10.1f}"
            f"{s['mb_per_s']:>9.1f}{s['peak_rss_mb']:>14.0f}{startup:>11}{warmup:>11}"
        )
    for name, value in entry.get("ratios", {}).items():
        paired = entry["paired_ratios"][name]
        print(f"{name}: {value:.2f}x (repeat by repeat: median {paired['median']:.2f}x, "
              f"{paired['min']:.2f}-{paired['max']:.2f}x)")
    if "floor_scaling" in entry:
        floor = entry["floor_scaling"]
        print(f"floor scaling {' -> '.join(floor['chips_per_s'])} processes: {floor['ratio']:.2f}x "
              f"(repeat by repeat: median {floor['paired']['median']:.2f}x)")
    if "scaling" in entry:
        scaling, paired = entry["scaling"], entry["paired_ratios"]
        print(f"chipflow scaling {' -> '.join(scaling['chips_per_s'])} workers: {scaling['ratio']:.2f}x "
              f"(repeat by repeat: median {paired['chipflow/chipflow_1_worker']['median']:.2f}x)")
        if "blocks" in scaling:
            one, two = (entry["systems"][name]["phases"] for name in ("chipflow_1_worker", "chipflow"))
            print(f"  the block phase alone (the first block's dispatch to the last one's result): "
                  f"{scaling['blocks']['ratio']:.2f}x; with {' / '.join(scaling['chips_per_s'])} workers: "
                  f"{one['before_blocks']:.3f} / {two['before_blocks']:.3f} s before the first block, "
                  f"{one['after_blocks']:.3f} / {two['after_blocks']:.3f} s after the last, "
                  f"a worker idle at the end for {two['idle_at_end']:.3f} s")
        if "against_floor" in scaling:
            against = scaling["against_floor"]
            print(f"  against the floor's own scaling: {against['ratio']:.2f}x (repeat by repeat: median "
                  f"{against['paired']['median']:.2f}x, {against['paired']['min']:.2f}-"
                  f"{against['paired']['max']:.2f}x)")
        if "per_core" in scaling:
            print(f"chipflow scaling {' -> '.join(scaling['per_core']['chips_per_s'])} cores "
                  f"(one worker per core, pinned): {scaling['per_core']['ratio']:.2f}x "
                  f"(repeat by repeat: median {paired['chipflow/chipflow_1_core']['median']:.2f}x)")
    print(flush=True)


def label(config: dict) -> str:
    """Short human-readable name of a configuration."""
    return f"{config['size']}px {config['features']}f stride {config['stride']} {config['format']}"


def plot(report: dict, path: Path) -> None:
    """Bar chart of chips/s per system and configuration, if matplotlib exists."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot written", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = list(results[0]["systems"])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(3.5 + 1.8 * len(results), 4))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(results))]
        ax.bar(xs, [r["systems"][name]["chips_per_s"] for r in results], width, label=name)
    ax.set_xticks(range(len(results)), [label(r["config"]) for r in results], fontsize=8)
    ax.set_ylabel("chips/s")
    ax.set_title(f"{TILE}x{TILE} chips, {report['settings']['workers']} workers")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; ``--quick`` overrides sizes, features and repeats."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, action="append", help="raster px (default 8192)")
    parser.add_argument(
        "--features", type=int, action="append", help="number of label features (default 20000)"
    )
    parser.add_argument("--stride", type=int, action="append", help="chip stride px (default 256)")
    parser.add_argument("--format", action="append", choices=FORMATS, help="chip format (default TIFF)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per system; medians kept")
    parser.add_argument(
        "--workers", type=int, default=2, help="processes for the floor and chipflow (default 2)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1024 px, 200 features, one stride, one repeat (smoke test)",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="also run chipflow with 1 worker and report the speed-up",
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated systems to run (default all: by_hand,floor,chipflow); "
        "ratios need by_hand, floor and chipflow",
    )
    parser.add_argument(
        "--floor-labels",
        action="store_true",
        help="also run the floor writing a 600-byte file per chip into labels/ (diagnostic)",
    )
    parser.add_argument(
        "--cli",
        action="store_true",
        help="also time the `chipflow export` command on the first config",
    )
    parser.add_argument(
        "--dask-defaults",
        action="store_true",
        help="run chipflow on a LocalCluster with Dask's default settings instead of "
        "chipflow.local_cluster (the CLI's cluster)",
    )
    parser.add_argument("--out", type=Path, help="JSON results (default WORKDIR/results.json)")
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart of chips/s")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/chipflow-bench"),
        help="inputs cache and scratch outputs (default /tmp/chipflow-bench)",
    )
    args = parser.parse_args(argv)
    args.size = args.size or [8192]
    args.features = args.features or [20000]
    args.stride = args.stride or [256]
    args.format = args.format or ["TIFF"]
    if args.quick:
        args.size, args.features, args.stride, args.repeat = [1024], [200], args.stride[:1], 1
    args.workdir = args.workdir.resolve()
    args.out = args.out or args.workdir / "results.json"
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the process exit code."""
    args = parse_args(argv)
    error = chipflow_import_error()
    if error:
        print(f"chipflow is unavailable ({error}); measuring the baselines only", file=sys.stderr)
    wanted = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(SYSTEMS))
    if unknown:
        print(f"error: unknown system(s) {unknown}; choose from {list(SYSTEMS)}", file=sys.stderr)
        return 2
    systems = [s for s in SYSTEMS if s in wanted and (s != "chipflow" or error is None)]
    report = {
        "machine": machine(),
        "chipflow_error": error,
        "results": [],
        "settings": {
            "tile": TILE,
            "repeat": args.repeat,
            "workers": args.workers,
            "cluster": "LocalCluster" if args.dask_defaults else "chipflow.local_cluster",
            "workdir": str(args.workdir),
        },
    }
    from benchmarks.scratch import Scratch

    args.scratch = Scratch(args.workdir)
    try:
        for config in configs(args):
            print(f"== {label(config)}", flush=True)
            report["results"].append(bench_config(config, args, systems))
            print_entry(report["results"][-1])
        if args.cli and error is None:
            report["cli"] = bench_cli(report["results"][0], args)
            cli = report["cli"]
            print(
                f"chipflow export CLI ({label(cli['config'])}): {cli['seconds']:.2f} s whole "
                f"process, first chip after {cli['first_file_seconds']:.2f} s"
            )
            if "cli/floor_process" in cli:
                print(f"floor whole process: {cli['floor_process_seconds']:.2f} s; "
                      f"chipflow CLI / floor: {cli['cli/floor_process']:.2f}x")
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        args.scratch.empty()  # the runs' folders, deleted only now (see benchmarks/scratch.py)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"results written to {args.out}")
    if args.plot:
        plot(report, args.plot)
    if error:
        print(
            "error: chipflow is required for a complete benchmark; only the baselines ran",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
