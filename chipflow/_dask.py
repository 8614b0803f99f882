"""Dask glue: which cluster to run on, and the map → tree-reduce over blocks."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

from ._block import Job, process_block
from .grid import Block
from .labels import LabelSet
from .progress import Progress
from .stats import BlockResult, merge_all

__all__ = ["cluster_client", "run_blocks"]

#: Fan-in of the reduction tree.
SPLIT_EVERY = 8


@contextlib.contextmanager
def cluster_client(client: Any = None, scheduler: str | None = None,
                   n_workers: int | None = None) -> Iterator[Any]:
    """The Dask client to use: the caller's, one for ``scheduler``, or a new LocalCluster.

    The embedded default is a ``distributed.LocalCluster`` with one single-threaded
    worker process per core (GDAL decoding and Python encoding both scale with
    processes, not threads). It is closed when the export ends.
    """
    from distributed import Client, LocalCluster

    if client is not None:
        yield client
        return
    if scheduler is not None:
        with Client(scheduler) as c:
            yield c
        return
    workers = n_workers or os.cpu_count() or 1
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True) as cluster,
        Client(cluster) as c,
    ):
        yield c


def run_blocks(
    client: Any,
    blocks: list[Block],
    job: Job,
    labels: LabelSet,
    *,
    progress: Progress | None = None,
) -> BlockResult:
    """Run one task per block and tree-merge their results on the cluster.

    The class data is broadcast once to every worker (each deserializes it and
    builds its spatial index once). The reduction tree's shape depends only on
    the block order, so merged statistics are identical on any cluster.
    """
    from distributed import as_completed

    empty = BlockResult(job.n_classes, job.source.count)
    if not blocks:
        return empty
    token = uuid.uuid4().hex[:8]
    labels_future = client.scatter(labels, broadcast=True, hash=False)
    futures = client.map(
        process_block, blocks, job=job, labels=labels_future,
        key=[f"chipflow-block-{token}-{b.id}" for b in blocks], retries=3, pure=False,
    )
    level, depth = list(futures), 0
    while len(level) > 1:
        level = [
            client.submit(merge_all, *level[i:i + SPLIT_EVERY],
                          key=f"chipflow-reduce-{token}-{depth}-{i}", retries=3, pure=False)
            for i in range(0, len(level), SPLIT_EVERY)
        ]
        depth += 1
    if progress is not None:
        progress.start(blocks=len(blocks), chips=sum(b.n_chips for b in blocks),
                       dashboard=getattr(client, "dashboard_link", None))
        planned = {f.key: b.n_chips for f, b in zip(futures, blocks, strict=True)}
        try:
            for future in as_completed(futures):
                progress.update(chips_written=future.result().num_chips,
                                chips_planned=planned[future.key])
        finally:
            progress.finish()
    result = level[0].result()
    del futures, level, labels_future
    return result
