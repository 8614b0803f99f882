"""Dask worker preload of chipflow's own local cluster (:func:`chipflow._dask.local_cluster`).

Ctrl-C at a terminal sends SIGINT to the whole process group, worker processes
included: each printed its KeyboardInterrupt traceback while the main process
was already closing the cluster. The workers of the cluster chipflow starts
ignore SIGINT; the main process closes them (they are terminated, as after any
export). Closing them cancels the blocks they were running, which Dask's worker
logged as a warning per block ("Async instruction ... ended with
CancelledError"), even under ``chipflow export -q``: those lines are dropped.
Workers of a cluster the user started are left alone.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any


def _not_a_cancellation(record: logging.LogRecord) -> bool:
    """False for the worker's note that a task it was running was cancelled (the cluster is closing)."""
    return "ended with CancelledError" not in record.getMessage()


def dask_setup(worker: Any) -> None:
    """Ignore SIGINT in this worker process (run in its main thread, where the event loop runs)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed.worker.state_machine").addFilter(_not_a_cancellation)
