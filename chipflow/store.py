"""Output through fsspec: local folders now, object stores (``s3://``...) alike.

A file never appears under its final name half-written: locally it is written
to a hidden temporary name in the same folder and renamed; on object stores a
single PUT is atomic.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import OutputError

__all__ = ["Store"]


@dataclass(frozen=True)
class Store:
    """The output folder; picklable, opened lazily in each process that writes."""

    url: str
    storage_options: tuple[tuple[str, Any], ...] = ()
    _fs: list[Any] = field(default_factory=list, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "url", state["url"])
        object.__setattr__(self, "storage_options", state["storage_options"])
        object.__setattr__(self, "_fs", [])

    def _resolve(self) -> tuple[Any, str]:
        if not self._fs:
            fs, root = fsspec.core.url_to_fs(self.url, **dict(self.storage_options))
            self._fs.append((fs, root.rstrip("/")))
        return self._fs[0]

    @property
    def fs(self) -> Any:
        """The fsspec filesystem."""
        return self._resolve()[0]

    @property
    def root(self) -> str:
        """The folder's path inside ``fs``."""
        return self._resolve()[1]

    @property
    def is_local(self) -> bool:
        """Whether the folder is on the local filesystem."""
        return isinstance(self.fs, LocalFileSystem)

    def path(self, relpath: str) -> str:
        """Full path of ``relpath`` in the store."""
        return f"{self.root}/{relpath}"

    def put(self, relpath: str, data: bytes) -> None:
        """Write ``data`` to ``relpath`` atomically."""
        full = self.path(relpath)
        if self.is_local:
            tmp = os.path.join(os.path.dirname(full), f".{os.path.basename(full)}.{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, full)
        else:
            self.fs.pipe_file(full, data)

    def listdir(self) -> list[str]:
        """Names of the folder's entries ([] when it does not exist)."""
        if not self.fs.exists(self.root):
            return []
        return sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False))

    def prepare(self, subfolders: list[str], *, overwrite: bool) -> None:
        """Create the folder and its subfolders, refusing to mix with an existing dataset.

        Raises
        ------
        OutputError
            The folder is not empty (without ``overwrite``) or cannot be written.
        """
        entries = self.listdir()
        if entries and not overwrite:
            raise OutputError(
                f"out_folder={self.url!r} is not empty ({len(entries)} entries, e.g. "
                f"{entries[:3]}); choose a new folder or pass overwrite=True (--overwrite) "
                "to replace its contents"
            )
        try:
            if entries and overwrite:
                for name in entries:
                    self.fs.rm(self.path(name), recursive=True)
            for sub in subfolders:
                self.fs.makedirs(self.path(sub), exist_ok=True)
            probe = f".chipflow-probe-{uuid.uuid4().hex[:8]}"
            self.put(probe, b"")
            self.fs.rm(self.path(probe))
        except OSError as exc:
            raise OutputError(f"out_folder={self.url!r} cannot be written: {exc}") from None
