"""Dask glue: which cluster to run on, the map over blocks, and the tree-merge of their results."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from ._block import BlockFailed, Job, run_block
from .errors import ClusterError
from .grid import Block
from .labels import LabelSet
from .progress import Progress
from .stats import BlockResult, merge_all

__all__ = ["CLUSTER_CONFIG", "MergeTree", "StartingCluster", "WorkerTuning", "cluster_client",
           "ensure_workers", "finalize_format", "local_cluster", "run_blocks", "tune_allocator"]

#: Fan-in of the reduction tree.
SPLIT_EVERY = 8

#: Dask settings of the clusters chipflow starts (:func:`local_cluster`): periodic work that every
#: Dask process does whether it computes or not, made lighter. On 2 cores an idle 2-worker
#: ``LocalCluster`` with Dask's defaults costs its processes 5-9% of the machine (the client
#: process's event loop alone, hosting the scheduler and the nannies, wakes 190 times a second);
#: with these settings 3-6%, and an export at 8192² stride 256 takes 0.93-0.95x the time
#: (paired runs; benchmarks/README.md).
CLUSTER_CONFIG = {
    "distributed.admin.tick.interval": "200ms",  # every server's event-loop health check (Dask: 20ms)
    "distributed.worker.profile.interval": "100ms",  # the dashboard's profile samples (Dask: 10ms)
}


def tune_allocator() -> None:
    """Keep freed memory in this process for reuse (glibc only; elsewhere nothing).

    glibc returns freed blocks of 128 KiB and more to the kernel, and memory
    the kernel hands back costs a page fault per 4 KiB on first touch: slow on a
    VM. Arrays below 32 MiB then come from the heap, and up to 128 MiB of freed
    heap is kept: about where glibc's own dynamic thresholds drift to after the
    first large free, set from the start. On the client, 200k features' planning
    (reading, parsing, fingerprint, pickling) re-faulted about 70 MB per export:
    0.18-0.22 → 0.15 s. Process-wide and lasting: the workers (see
    :class:`WorkerTuning`) and the process calling ``export_training_data``.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 * 2**20)  # M_TRIM_THRESHOLD


class WorkerTuning(WorkerPlugin):
    """Worker plugin: allocator and GDAL settings for block tasks.

    **malloc**: :func:`tune_allocator`. distributed starts workers with
    ``MALLOC_TRIM_THRESHOLD_=65536``, which also freezes glibc's mmap threshold at
    128 KiB: every chip buffer (a 256² x 4 chip is 256 KiB) is then mmap'd and
    unmapped, with a page fault per 4 KiB. Measured on a block task: 9x the page
    faults of a plain process, and about a third of its time.

    **GDAL's block cache**: by default 5% of the machine's RAM per process, which
    a worker fills with decoded tiles it never reads again (each block reads its
    window once): a 32768² raster would take a worker past 1 GiB. It is capped at
    ``GDAL_CACHE_MB``, enough for the tiles neighbouring windows share, unless
    ``GDAL_CACHEMAX`` is set in the worker's environment.
    """

    name = "chipflow-worker-tuning"
    idempotent = True
    GDAL_CACHE_MB = 128

    def setup(self, worker: Any = None) -> None:
        """Apply the settings in this process."""
        if "GDAL_CACHEMAX" not in os.environ:
            from rasterio.env import set_gdal_config

            # bytes: rasterio gives an integer to GDALSetCacheMax64, which applies it at once (128 was
            # 128 bytes: no block cache at all, and GDAL's MRF driver then wrote wrong pixels)
            set_gdal_config("GDAL_CACHEMAX", self.GDAL_CACHE_MB * 2**20)
        tune_allocator()

    def teardown(self, worker: Any = None) -> None:
        """Nothing to undo."""


@contextlib.contextmanager
def cluster_client(client: Any = None, scheduler: str | None = None,
                   n_workers: int | None = None) -> Iterator[Any]:
    """The Dask client to use: the caller's, one for ``scheduler``, the process's default, or a new one.

    The embedded default is a ``distributed.LocalCluster`` with one single-threaded
    worker process per core (GDAL decoding and Python encoding both scale with
    processes, not threads). It is closed when the export ends.
    """
    from distributed import Client, default_client

    if client is not None:
        yield client
        return
    if scheduler is not None:
        try:
            c = Client(scheduler, set_as_default=False)
        except OSError as error:  # unreachable: raised before the output folder is touched
            raise ClusterError(f"scheduler={scheduler!r} cannot be reached: {error}") from None
        with c:
            yield c
        return
    if _has_default_client():  # a client already made in this process (a notebook's): Dask's default
        yield default_client()
        return
    with contextlib.ExitStack() as stack:
        yield _local_client(n_workers, stack)


def _local_client(n_workers: int | None, stack: contextlib.ExitStack) -> Any:
    """A new LocalCluster (one single-threaded worker process per core) and its Client, closed by ``stack``.

    The Client is not entered as a context (that sets a context variable), so
    another thread may close it.
    """
    from distributed import Client

    cluster = stack.enter_context(local_cluster(n_workers))
    # not the process's default client: another export started meanwhile (a thread) makes its own
    client = Client(cluster, set_as_default=False)
    stack.callback(client.close)
    return client


def local_cluster(n_workers: int | None = None, **kwargs: Any) -> Any:
    """A ``distributed.LocalCluster`` shaped for chipflow: what exports without a client run on.

    One single-threaded worker process per core (GDAL decoding and Python
    encoding scale with processes, not threads), and :data:`CLUSTER_CONFIG`:
    every server checks its event loop every 200 ms instead of 20 ms, and
    workers sample their profile for the dashboard every 100 ms instead of 10 ms.
    The settings hold for this cluster's scheduler, nannies and workers (also
    workers restarted later); the process's own Dask config is left as it was.
    Its worker processes ignore SIGINT (:mod:`chipflow._worker_preload`): a
    Ctrl-C at a terminal interrupts the main process alone, which closes them.

    Parameters
    ----------
    n_workers : int, optional
        Worker processes; default one per core.
    **kwargs
        Passed on to ``LocalCluster`` (``dashboard_address``, ``memory_limit``,
        ``threads_per_worker``...).

    Examples
    --------
    >>> from distributed import Client
    >>> with chipflow.local_cluster() as cluster, Client(cluster) as client:  # doctest: +SKIP
    ...     chipflow.export_training_data("image.tif", "out/", "buildings.gpkg", client=client)
    """
    import logging

    import dask
    from distributed import LocalCluster

    # LocalCluster sets Dask's loggers to WARNING (silence_logs), which hid what `chipflow -v` asks
    # for: with chipflow's logger at INFO or DEBUG, the cluster's messages are left to show
    verbose = logging.getLogger("chipflow").getEffectiveLevel() < logging.WARNING
    quiet = False if verbose else logging.WARNING
    options = {"n_workers": n_workers or os.cpu_count() or 1, "threads_per_worker": 1, "processes": True,
               "silence_logs": quiet, **kwargs}
    if options["processes"]:  # Ctrl-C is the main process's to handle (chipflow._worker_preload)
        given = options.get("preload") or []
        options["preload"] = [*([given] if isinstance(given, str) else given), "chipflow._worker_preload"]
    with dask.config.set(CLUSTER_CONFIG):  # servers read it as they start
        if options["processes"]:  # each nanny starts its worker (again after a restart) with this copy
            options["config"] = dask.config.merge(dask.config.config, kwargs.get("config", {}))
        return LocalCluster(**options)


class StartingCluster:
    """:func:`cluster_client`, with the embedded local cluster started at once on a thread.

    An export first reads its inputs on the client (the first read of a process
    also imports the readers); a new ``LocalCluster`` takes about as long to
    start. Started here before the planning, it comes up meanwhile: the CLI's
    whole run is shorter by the smaller of the two (about 0.5 s). A given
    client, a scheduler address or the process's default client are used as
    :func:`cluster_client` uses them, when :meth:`client` is first called.
    Use as a context manager: leaving it closes what it started, also when the
    planning failed.
    """

    def __init__(self, client: Any = None, scheduler: str | None = None, n_workers: int | None = None,
                 start_now: bool = True):
        self._given = (client, scheduler, n_workers)
        self._stack = contextlib.ExitStack()
        self._client: Any = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if start_now and client is None and scheduler is None and not _has_default_client():
            self._thread = threading.Thread(target=self._start, name="chipflow-cluster-start", daemon=True)
            self._thread.start()

    def _start(self) -> None:
        try:
            self._client = _local_client(self._given[2], self._stack)
        except BaseException as error:  # raised in the caller's thread by client()
            self._error = error

    def client(self) -> Any:
        """The Dask client (waits for the cluster the thread is starting)."""
        if self._thread is not None:
            self._thread.join()
            if self._error is not None:
                raise self._error
        elif self._client is None:
            self._client = self._stack.enter_context(cluster_client(*self._given))
            ensure_workers(self._client)
        return self._client

    def __enter__(self) -> StartingCluster:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if self._thread is not None:
            self._thread.join()
        interrupted = kind is not None and issubclass(kind, KeyboardInterrupt)
        # an interrupted run's shutdown chatter (cancelled gathers, closed comms) is not shown
        with _quiet_logs("distributed", "tornado.application") if interrupted else contextlib.nullcontext():
            self._stack.close()


@contextlib.contextmanager
def _quiet_logs(*names: str) -> Iterator[None]:
    """These loggers show only critical messages while inside."""
    import logging

    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _ready() -> None:
    """A task that does nothing: its result says a worker is there."""


def ensure_workers(client: Any) -> None:
    """Return once the cluster has a worker; raise :class:`ClusterError` when none comes.

    A cluster without workers (an adaptive one at ``minimum=0``, a scheduler
    whose workers are still starting) gets a task that does nothing, which an
    adaptive cluster scales up for; it is given Dask's connect timeout
    (``distributed.comm.timeouts.connect``) to run it. Called before the output
    folder is touched.
    """
    if client.scheduler_info().get("workers"):
        return
    import dask
    from dask.utils import parse_timedelta

    timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s")
    probe = client.submit(_ready, key=f"chipflow-ready-{uuid.uuid4().hex[:8]}", pure=False)
    try:
        probe.result(timeout=timeout)
    except TimeoutError:
        raise ClusterError(
            f"the Dask cluster ({client.scheduler.address}) has no worker: none joined within {timeout:g} s "
            "(distributed.comm.timeouts.connect); start workers, or give an adaptive cluster "
            "minimum=1") from None
    finally:
        probe.release()


def _has_default_client() -> bool:
    from distributed import default_client

    try:
        default_client()
    except ValueError:
        return False
    return True


def run_blocks(
    client: Any,
    work: list[tuple[Block, Job, LabelSet]],
    *,
    committed: dict[int, BlockResult] | None = None,
    progress: Progress | None = None,
) -> BlockResult:
    """Run one task per block not yet committed, and tree-merge all results as they arrive.

    ``work`` lists each block with its job and labels (one pair per input item).
    Each item's class data is broadcast once to every worker (each deserializes
    it and builds its spatial index once). ``committed`` blocks (from an
    interrupted run) are not run again: their stored results take their place in
    the tree. Each result comes to the client as its block finishes and is
    merged there (:class:`MergeTree`): the tree's shape depends only on the block
    list, so merged statistics are identical on any cluster and after any resume.
    A killed worker's blocks are rerun by Dask; when every worker holding the class
    data is lost (Dask cannot recompute scattered data, and cancels the tasks that
    need it), the class data is scattered again and those blocks are submitted
    again, up to :data:`_RESUBMITS` times each.
    """
    from distributed import as_completed

    committed = committed or {}
    if not work:
        return BlockResult(0, 0)
    angles = len(work[0][1].angles)
    todo = [(i, b, job, labels) for i, (b, job, labels) in enumerate(work) if b.id not in committed]
    token = uuid.uuid4().hex[:8]
    scattered: dict[int, Any] = {}
    where: dict[str, tuple[int, Any, Job, Any]] = {}  # task key → (place in work, block, job, labels)
    direct = _direct(client)

    def submit(items: list[tuple[int, Any, Job, Any]], attempt: int = 0) -> list[Any]:
        """One task per block; each item's class data broadcast once, again when it was lost."""
        for _, _, _, labels in items:
            held = scattered.get(id(labels))
            if held is None or held.status != "finished":
                scattered[id(labels)] = client.scatter(labels, broadcast=True, hash=False, direct=direct)
        futures = client.map(
            run_block, [b for _, b, _, _ in items], [j for _, _, j, _ in items],
            [scattered[id(lab)] for _, _, _, lab in items],
            key=[f"chipflow-block-{token}-{b.id}" + (f"-again{attempt}" if attempt else "")
                 for _, b, _, _ in items],
            retries=3, pure=False,
        )
        where.update({f.key: item for item, f in zip(items, futures, strict=True)})
        return futures

    futures = []
    if todo:
        client.register_plugin(WorkerTuning(), name=WorkerTuning.name)
        futures = submit(todo)
    # on the client's own event loop: Dask's default is the process's default client's loop,
    # which with a second client in the process left this one's results unseen (a hang)
    arriving = as_completed(futures, loop=client.loop, with_results=True, raise_errors=False)
    del futures  # each block's result is let go on the cluster once the client has it
    again: dict[int, int] = {}  # block index → times its task was submitted again
    erred: list[Any] = []  # the block task whose error the export raises

    def results() -> Iterator[tuple[int, BlockResult]]:
        """Each block's place in ``work`` and its result: the committed ones, then as they finish."""
        yield from ((i, committed[b.id]) for i, (b, _, _) in enumerate(work) if b.id in committed)
        for future, result in arriving:
            item = where.pop(future.key)
            if future.status == "error":
                erred.append(future)
                future.result()  # raises the block's error, with its traceback
            if future.status == "finished":
                if isinstance(result, BlockFailed):  # bad input found by the block: not retried
                    erred.append(future)
                    result.error.during_run = True
                    raise result.error
                yield item[0], result
                continue
            # cancelled: the client closed or the scheduler went away, or every worker holding the
            # class data died (Dask cannot recompute scattered data): scattered again, the block rerun
            if client.status != "running":
                raise RuntimeError(
                    f"the export lost the Dask cluster ({future.key} {future.status}: the client was "
                    "closed or the scheduler stopped); rerun the same export to resume: the blocks "
                    "already committed are kept")
            again[item[0]] = again.get(item[0], 0) + 1
            if again[item[0]] > _RESUBMITS:
                raise RuntimeError(
                    f"block {item[1].id} was cancelled {again[item[0]]} times ({future.key}: the workers "
                    "holding its class data were lost each time); rerun the same export to resume: the "
                    "blocks already committed are kept")
            arriving.update(submit([item], again[item[0]]))

    tree = MergeTree(len(work))
    if progress is not None:  # this run's blocks: a resumed run's bar and rate leave the committed out
        progress.start(blocks=len(todo), chips=sum(b.n_chips for _, b, _, _ in todo) * angles,
                       dashboard=getattr(client, "dashboard_link", None))
    try:
        for i, result in results():
            tree.add(i, result)
            if progress is not None and work[i][0].id not in committed:
                progress.update(chips_written=result.num_chips, chips_planned=work[i][0].n_chips * angles)
    except BaseException:
        # the error's traceback holds this frame, and with it the futures: cancelled, they leave the
        # cluster now (on a long-lived client, a failed export's class data and tasks stayed there)
        leftover = [*arriving.futures, *scattered.values(), *erred]
        arriving.clear()
        if client.status == "running":
            client.cancel(leftover)
        raise
    finally:
        if progress is not None:
            progress.finish()
    root = tree.root()
    assert root is not None, "every block's result was merged"
    return root


#: How often a block whose class data was lost with its workers is submitted again.
_RESUBMITS = 3


class MergeTree:
    """The merge of a run's block results in one fixed tree, filled in any order.

    Leaf ``i`` is the ``i``-th block of the run; every node merges up to
    :data:`SPLIT_EVERY` consecutive nodes of the level below (:func:`merge_all`,
    left to right) as soon as the last of them is there, and lets them go. The
    shape depends only on the number of blocks, so the merged floats (band
    moments) are the same bytes whatever order blocks finish in.

    The merge runs on the client as results arrive. It used to be a tree of
    Dask tasks, which after the last block cost two more rounds of scheduling
    and transfers between workers: 48 → 25 ms from the last block's end to the
    export's return at 8192² stride 256 (benchmarks/HISTORY.md).
    """

    def __init__(self, n: int):
        sizes = [n]
        while sizes[-1] > 1:
            sizes.append(-(-sizes[-1] // SPLIT_EVERY))
        self._levels: list[list[BlockResult | None]] = [[None] * size for size in sizes]
        self._seen = [False] * n

    def add(self, i: int, result: BlockResult) -> None:
        """Place block ``i``'s result, and merge every group it completes."""
        if self._seen[i]:
            raise ValueError(f"block {i} of the merge tree was given twice")
        self._seen[i] = True
        level = 0
        while True:
            nodes = self._levels[level]
            nodes[i] = result
            if level + 1 == len(self._levels):
                return
            first = i - i % SPLIT_EVERY
            group = nodes[first:first + SPLIT_EVERY]
            if any(node is None for node in group):
                return
            nodes[first:first + len(group)] = [None] * len(group)
            result, i, level = merge_all(*group), i // SPLIT_EVERY, level + 1  # type: ignore[arg-type]

    def held(self) -> int:
        """Results held, waiting for the rest of their group."""
        return sum(node is not None for nodes in self._levels for node in nodes)

    def root(self) -> BlockResult | None:
        """The merge of every block, once all are in."""
        return self._levels[-1][0]


def _direct(client: Any) -> bool | None:
    """Whether to send the class data to the workers straight from the client.

    Through the scheduler (Dask's default for a client outside the cluster) it
    travels client → scheduler → one worker → the others; straight, client →
    worker → the others: 0.05 → 0.03 s for 200k features on a local cluster.
    Straight when the client says so (``direct_to_workers``), or when every
    worker is on this machine, which the client can always reach; else Dask's
    default (workers in a Kubernetes cluster may be out of the client's reach).
    """
    if client.direct_to_workers is not None:
        return client.direct_to_workers
    workers = client.scheduler_info().get("workers", {})
    return True if workers and all(_loopback(address) for address in workers) else None


def _loopback(address: str) -> bool:
    """Whether a Dask address is on this machine's loopback (or in this process)."""
    import ipaddress
    from urllib.parse import urlsplit

    if address.startswith("inproc://"):
        return True
    host = urlsplit(address).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _finalize(store: Any, metadata_format: str, block_ids: list[int], classes: tuple[Any, ...]) -> None:
    from .formats import get
    from .store import RUN_DIR

    parts = [store.read(f"{RUN_DIR}/parts/{i:07d}.part") or b"" for i in block_ids]
    get(metadata_format).finalize(store, parts, classes)


def finalize_format(client: Any, job: Job, blocks: list[Block] | tuple[Block, ...],
                    classes: tuple[Any, ...]) -> None:
    """Build a format's dataset-wide files (COCO annotations...) from the blocks' parts, on a worker."""
    from .formats import get

    if get(job.metadata_format).has_parts:
        client.submit(_finalize, job.store, job.metadata_format, [b.id for b in blocks], classes,
                      key=f"chipflow-finalize-{uuid.uuid4().hex[:8]}", pure=False).result()
