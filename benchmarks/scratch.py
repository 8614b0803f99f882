"""Where measured runs write, and when their folders are deleted.

Deleting a run's files just before the next run starts made that next run slow
on this development VM, whose root file system is ext4 without a journal: when
ext4 (no journal) allocates an inode it skips every inode of the block group
freed in the last ``vm.dirty_expire_centisecs`` (30 s, +5 s while the inode's
block is dirty), reading an inode-table block for each (``perf``:
``recently_deleted`` under ``find_inode_bit``, a quarter of the samples). A run
creating its files right after the run before it deleted thousands then paid
250-370 µs of CPU a file instead of 7-30 µs: the benchmark measured the
previous run's deletion as much as the run, and chipflow (two files a chip)
more than the floor (one).

So a run's folder is moved into ``trash/`` when it is done (a rename frees no
inode), and the trash is emptied only when the disk needs the room and at the
end; a measured run starts only once the last emptying is
:data:`QUIET_SECONDS` old (the time is kept in ``trash/.emptied``, so the next
invocation waits too).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path


def _quiet_seconds() -> float:
    """How long freed inodes count as recently deleted: the write-back expiry, +5 s, +1 s to spare."""
    try:
        centisecs = int(Path("/proc/sys/vm/dirty_expire_centisecs").read_text())
    except (OSError, ValueError):
        return 0.0  # not Linux: no such rule known
    return centisecs / 100 + 6


QUIET_SECONDS = _quiet_seconds()


class Scratch:
    """Fresh output folders under ``workdir/runs``, deleted in batches away from measured runs.

    As a context manager, the trash is emptied on leaving.
    """

    def __init__(self, workdir: Path | str):
        workdir = Path(workdir)
        self.runs, self.trash = workdir / "runs", workdir / "trash"
        self.stamp = self.trash / ".emptied"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.trash.mkdir(parents=True, exist_ok=True)
        for left in self.runs.iterdir():  # an interrupted invocation's folders
            self.discard(left)

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.empty()

    def fresh(self, name: str) -> Path:
        """A new empty folder for one run."""
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.runs))

    def discard(self, *paths: Path | str) -> None:
        """Move finished runs' folders into the trash (no file is deleted now)."""
        for path in paths:
            if os.path.lexists(path):
                os.rename(path, self.trash / f"{Path(path).name}-{uuid.uuid4().hex[:8]}")

    def ready(self, need_bytes: int = 0) -> float:
        """Call right before a measured run: room for ``need_bytes`` more, no recent deletion, disk synced.

        Empties the trash first when the disk's free space is below twice
        ``need_bytes`` plus 1 GiB. Returns the seconds spent waiting.
        """
        if shutil.disk_usage(self.runs).free < 2 * need_bytes + 2**30:
            self.empty()
        waited = 0.0
        if self.stamp.exists():
            waited = max(0.0, QUIET_SECONDS - (time.time() - self.stamp.stat().st_mtime))
            time.sleep(waited)
        os.sync()  # earlier runs' files reach the disk before this one starts
        return waited

    def empty(self) -> None:
        """Delete everything in the trash, and note when."""
        entries = [p for p in self.trash.iterdir() if p != self.stamp]
        for path in entries:
            shutil.rmtree(path, ignore_errors=True)
        if entries:
            self.stamp.touch()
