"""Dask worker preload of chipflow's own local cluster (:func:`chipflow._dask.local_cluster`).

Ctrl-C at a terminal sends SIGINT to the whole process group, worker processes
included: each printed its KeyboardInterrupt traceback while the main process
was already closing the cluster. The workers of the cluster chipflow starts
ignore SIGINT; the main process closes them (they are terminated, as after any
export). Workers of a cluster the user started are left alone.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


def dask_setup(worker: Any) -> None:
    """Ignore SIGINT in this worker process (run in its main thread, where the event loop runs)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
