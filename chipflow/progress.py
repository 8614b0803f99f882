"""Progress reporting for long exports: a tiny protocol and a terminal progress bar."""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol

__all__ = ["Progress", "RichProgress"]


class Progress(Protocol):
    """What :func:`chipflow.export_training_data` tells a progress reporter."""

    def start(self, *, blocks: int, chips: int, dashboard: str | None) -> None:
        """The run starts: ``blocks`` to run, ``chips`` the most they can write.

        Before empty chips are skipped; a resumed run's committed blocks are
        neither in them nor reported.
        """

    def update(self, *, chips_written: int, chips_planned: int) -> None:
        """One block finished, having written ``chips_written`` of its ``chips_planned``."""

    def finish(self) -> None:
        """The run ended (successfully or not)."""


class RichProgress:
    """A live bar on stderr: chip positions done/total, chips written, chips/s, ETA, the dashboard link.

    The bar moves over the grid's positions (every chip the run may write), so
    that its ETA holds when most positions are skipped (``ONLY_TILES_WITH_FEATURES``);
    beside it, the chips actually written and their rate.
    """

    def __init__(self, console: Any = None):
        from rich.console import Console

        self.console = console or Console(file=sys.stderr)
        self._bar: Any = None
        self._task: Any = None
        self._written = 0
        self._started = 0.0

    def start(self, *, blocks: int, chips: int, dashboard: str | None) -> None:
        """Print the dashboard link and open the bar."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if dashboard:
            self.console.print(f"Dask dashboard: {dashboard}")
        self._bar = Progress(
            TextColumn("positions"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[written]:>8} chips written {task.fields[rate]:>8.1f} chips/s"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self._task = self._bar.add_task("export", total=chips, rate=0.0, written=0)
        self._started = time.perf_counter()
        self._bar.start()

    def update(self, *, chips_written: int, chips_planned: int) -> None:
        """Advance by the block's planned chips; the rate counts chips actually written."""
        self._written += chips_written
        rate = self._written / max(time.perf_counter() - self._started, 1e-9)
        self._bar.update(self._task, advance=chips_planned, rate=rate, written=self._written)

    def finish(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.stop()
