"""Output through fsspec: local folders and object stores (``s3://``, ``gs://``, ``az://``) alike.

Metadata files and commit markers never appear under their final name
half-written: locally they are written to a hidden temporary name in the same
folder and renamed; on object stores a single PUT is atomic. A block's chip and
label files are written in place (``put(..., atomic=False)``): the block's
commit marker, written after them, is what vouches for them, and a block that
did not commit is run again and rewrites them. In-place writes never truncate
a file before writing it, so a stray second run of a block (a worker Dask
presumed dead) rewriting the same bytes cannot leave a committed file short.

A ``Store`` carries the export's storage options (fsspec's keyword arguments:
endpoint, credentials) to the Dask workers, pickled with each block task; it never
shows them (not in its ``repr``) and never writes them into the folder. Unpickled
in a worker, it also makes them the options the worker opens its ``s3://`` rasters
with (see :mod:`chipflow._cloud`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from . import _cloud
from .errors import InputNotFoundError, InvalidParameterError, OutputError

__all__ = ["RUN_DIR", "Store", "Writer", "safe_name"]

#: chipflow's own bookkeeping inside the output folder (ignored by arcgis.learn).
RUN_DIR = ".chipflow"
#: fsspec protocols whose first path component is a bucket (a container), which their
#: ``makedirs`` would create: chipflow refuses a missing one instead (see ``open_run``).
_BUCKETED = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


@dataclass(frozen=True)
class Store:
    """The output folder; picklable, opened lazily in each process that writes.

    ``storage_options`` are ``(key, value)`` pairs (see :func:`chipflow._cloud.freeze`):
    fsspec's options for an object store (ignored for a local folder), and the
    options the export's ``s3://`` inputs are read with. Secrets: left out of ``repr``.
    """

    url: str
    storage_options: tuple[tuple[str, Any], ...] = field(default=(), repr=False)
    _fs: list[Any] = field(default_factory=list, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "url", state["url"])
        object.__setattr__(self, "storage_options", state["storage_options"])
        object.__setattr__(self, "_fs", [])
        # Unpickled in a worker: the block tasks' s3:// rasters are opened with these options.
        _cloud.remember(self.storage_options)

    def _resolve(self) -> tuple[Any, str]:
        if not self._fs:
            local = fsspec.utils.get_protocol(self.url) in ("file", "local")
            options = {} if local else dict(self.storage_options)
            fs, root = fsspec.core.url_to_fs(self.url, **options)
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

    def put(self, relpath: str, data: bytes, *, atomic: bool = True) -> None:
        """Write ``data`` to ``relpath``: atomically, or (local files, ``atomic=False``) in place.

        In place halves the filesystem's metadata work per file (no rename): on a
        2-core machine a block's 128 chip and label files went from about a third
        of its time to a tenth.
        """
        full = self.path(relpath)
        if not self.is_local:
            self.fs.pipe_file(full, data if isinstance(data, bytes) else bytes(data))
            return
        try:
            if not atomic:
                _write_in_place(full, data)
                return
            folder = os.path.dirname(full)
            tmp = os.path.join(folder, f".{os.path.basename(full)}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                f = open(tmp, "wb")  # noqa: SIM115 - closed below
            except FileNotFoundError:  # a subfolder (a class folder) not made yet
                os.makedirs(folder, exist_ok=True)
                f = open(tmp, "wb")  # noqa: SIM115
            try:
                with f:
                    f.write(data)
                os.replace(tmp, full)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            if exc.filename is None and exc.errno is not None:  # os.write's errors name no file
                raise OSError(exc.errno, exc.strerror, full) from exc
            raise

    def child(self, name: str) -> Store:
        """The subfolder ``name`` (a split's dataset) as a store with the same options."""
        return Store(f"{self.url.rstrip('/')}/{name}", self.storage_options)

    def run_params(self) -> dict[str, Any] | None:
        """The parameters of the chipflow run in this folder (None for a folder chipflow did not write).

        Raises
        ------
        OutputError
            ``.chipflow/params.json`` is there but damaged (not a JSON mapping).
        """
        raw = self.read(f"{RUN_DIR}/params.json")
        return None if raw is None else self._parsed_params(raw)

    def _parsed_params(self, raw: bytes) -> dict[str, Any]:
        params, why = json_mapping(raw)
        if why:
            raise OutputError(
                f"out_folder={self.url!r} holds a damaged chipflow run: {RUN_DIR}/params.json {why}; "
                "pass overwrite=True (--overwrite) to start again"
            )
        return params

    @staticmethod
    def split_names(params: dict[str, Any] | None) -> list[str]:
        """The splits of a run with ``params`` (:meth:`run_params`): each a dataset in :meth:`child`."""
        return list(((params or {}).get("parameters") or {}).get("split") or {})

    def require_folder(self) -> list[str]:
        """The entries of ``out_folder``, read as a folder (``validate``, ``stats``); [] when absent.

        Raises
        ------
        InputNotFoundError
            It cannot be reached (endpoint, credentials, permissions).
        InvalidParameterError
            It names a file.
        """
        try:
            is_file = self.fs.isfile(self.root)
            entries = [] if is_file else self.listdir()
        except _cloud.access_errors() as exc:
            raise InputNotFoundError("out_folder", self.url, f"{type(exc).__name__}: {exc}") from None
        if is_file:
            raise InvalidParameterError("out_folder", self.url, "is a file, not a dataset folder")
        return entries

    def read(self, relpath: str) -> bytes | None:
        """The bytes at ``relpath``, or None when it does not exist."""
        try:
            return self.fs.cat_file(self.path(relpath))
        except FileNotFoundError:
            return None

    def listdir(self, relpath: str = "") -> list[str]:
        """Names of the entries of the folder (or a subfolder); [] when it does not exist."""
        path = self.path(relpath).rstrip("/") if relpath else self.root
        self.fs.invalidate_cache(path)  # object stores: other processes (the workers) wrote here
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(os.path.basename(p.rstrip("/")) for p in entries)

    def find(self, relpath: str) -> list[str]:
        """Relative paths of every file below ``relpath`` (recursive; [] when it does not exist)."""
        base = self.path(relpath).rstrip("/")
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        root = self.root.rstrip("/") + "/"
        return sorted(p[len(root):] if p.startswith(root) else p.split(root, 1)[-1] for p in found)

    def commit_block(self, block_id: int, payload: bytes) -> None:
        """Record that block ``block_id`` wrote all its files (its marker holds its statistics)."""
        self.put(f"{RUN_DIR}/blocks/{block_id:07d}.json", payload)

    def committed_blocks(self) -> dict[int, bytes]:
        """Block id → marker payload of every committed block."""
        names = [n for n in self.listdir(f"{RUN_DIR}/blocks") if n.endswith(".json")]
        markers = self.fs.cat([self.path(f"{RUN_DIR}/blocks/{n}") for n in names]) if names else {}
        return {int(os.path.basename(p)[:-5]): data for p, data in markers.items()}

    def open_run(self, params: dict[str, Any], subfolders: list[str], *, overwrite: bool) -> dict[int, bytes]:
        """Start or resume a run in this folder; returns the markers of blocks already committed.

        A new or empty folder starts a run. A folder holding a run with the same
        ``params`` resumes it. Anything else is refused unless ``overwrite``, which
        empties the folder first. The parameters are stored in ``.chipflow/params.json``.

        Raises
        ------
        OutputError
            The folder holds something else, or cannot be written, or its bucket does not exist.
        """
        try:
            is_file = self.fs.isfile(self.root)  # an object store would list an object as itself
            entries = [] if is_file else self.listdir()
            previous = self.read(f"{RUN_DIR}/params.json") if entries else None
            missing = None if entries or is_file else self._missing_bucket()  # the endpoint answered
        except _cloud.access_errors() as exc:
            raise OutputError(f"out_folder={self.url!r} cannot be written: {exc}") from None
        if is_file:
            raise OutputError(f"out_folder={self.url!r} is a file, not a folder; name a folder (a new one "
                              "is created) for the dataset")
        if missing:
            raise OutputError(
                f"out_folder={self.url!r}: bucket {missing!r} does not exist (or these credentials "
                "cannot see it); chipflow does not create buckets: create it first, or fix the "
                "bucket's name or the storage options"
            )
        committed: dict[int, bytes] = {}
        if entries and not overwrite:
            if previous is None and RUN_DIR in entries:
                raise OutputError(
                    f"out_folder={self.url!r} holds a chipflow run without its {RUN_DIR}/params.json: "
                    "another export may be starting in it right now (wait for it, then rerun to "
                    "resume), or one was stopped while starting (then pass overwrite=True "
                    "(--overwrite) to start again)")
            if previous is None:
                raise OutputError(
                    f"out_folder={self.url!r} is not empty ({len(entries)} entries, e.g. "
                    f"{entries[:3]}) and holds no chipflow run; choose a new folder or pass "
                    "overwrite=True (--overwrite) to replace its contents"
                )
            old = self._parsed_params(previous)
            if old != params:
                changed = _differences(old, params)
                modified = " (an input file was modified since that run began)" if (
                    "mtime_ns" in changed or ".bytes:" in changed or ".version:" in changed) else ""
                raise OutputError(
                    f"out_folder={self.url!r} holds a chipflow run with different parameters "
                    f"({changed}){modified}; rerun with the same parameters to resume it, or pass "
                    "overwrite=True (--overwrite) to start again"
                )
            committed = self.committed_blocks()
        try:
            if entries and overwrite:
                for name in entries:
                    self.fs.rm(self.path(name), recursive=True)
            # the run file first: another export looking at the folder meanwhile finds this run
            self.put(f"{RUN_DIR}/params.json", json.dumps(params, indent=2, sort_keys=True).encode())
            for sub in [*subfolders, f"{RUN_DIR}/blocks"]:
                self.fs.makedirs(self.path(sub), exist_ok=True)
            if self.is_local and committed:
                self._remove_temporaries()
        except _cloud.access_errors() as exc:
            raise OutputError(f"out_folder={self.url!r} cannot be written: {exc}") from None
        return committed

    def _missing_bucket(self) -> str | None:
        """The bucket of an object-store folder when it does not exist (s3fs and gcsfs would create it).

        Asked only once the folder's listing succeeded: s3fs's ``exists`` answers False
        for an endpoint it cannot reach too.
        """
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        bucket = self.root.split("/", 1)[0]
        if _BUCKETED.intersection(protocols) and bucket and not self.fs.exists(bucket):
            return bucket
        return None

    def remove_temporaries(self) -> None:
        """Delete temporary files a killed writer left behind (local folders; none on object stores)."""
        if self.is_local:
            self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        """Delete temporary files a killed run left behind (never visible under a final name).

        Only atomic puts make them: the metadata in the folder and in its split
        folders, and chipflow's own files under ``.chipflow/``. The chip folders
        (written in place) are never listed, however many files they hold.
        """
        def scan(folder: str, recursive: bool) -> None:
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                return
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        scan(entry.path, True)
                elif entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    os.remove(entry.path)

        scan(self.root, False)
        scan(os.path.join(self.root, RUN_DIR), True)
        for entry in os.scandir(self.root):  # split folders' metadata
            if entry.is_dir(follow_symlinks=False) and entry.name != RUN_DIR:
                scan(entry.path, False)


def json_mapping(raw: bytes) -> tuple[dict[str, Any], str]:
    """A JSON file's mapping, and what is wrong with it: ``""``, or why it is not a JSON mapping."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:  # JSON's errors and undecodable bytes
        return {}, f"is not valid JSON: {exc}"
    return (doc, "") if isinstance(doc, dict) else ({}, f"holds a {type(doc).__name__}, not a mapping")


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """``a: 1 → 2, b.c: x → y, d[0].e: 3 → 4`` for the values that differ (into mappings and lists alike).

    >>> _differences({"in_raster": {"items": [{"path": "a.tif", "mtime_ns": 1}]}},
    ...              {"in_raster": {"items": [{"path": "a.tif", "mtime_ns": 2}]}})
    'in_raster.items[0].mtime_ns: 1 → 2'
    """
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b, f"{prefix}{key}.")
            if inner:
                out.append(inner)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and len(a) <= 8 \
                and any(isinstance(x, dict) for x in a):  # input items: name the field that changed
            places = [f"[{i}]" for i in range(len(a))]
            inner = _differences(dict(zip(places, a, strict=True)), dict(zip(places, b, strict=True)),
                                 f"{prefix}{key}")
            if inner:
                out.append(inner)
        elif a != b:
            out.append(f"{prefix}{key}: {_brief(a)} → {_brief(b)}")
    return ", ".join(out)


def _brief(value: Any) -> str:
    """``repr(value)``, a long list (the planned blocks) as its length and ends.

    >>> _brief(list(range(100)))
    '[0, 1, 2, ..., 99] (100 items)'
    """
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(map(repr, value[:3]))}, ..., {value[-1]!r}] ({len(value)} items)"
    return repr(value)


_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
             *(f"LPT{i}" for i in range(1, 10))}


def safe_name(name: str) -> str:
    """A user string (class name) made safe as one path component inside the output folder.

    Path separators, ``..``, NUL and control characters, characters Windows
    forbids, and reserved device names cannot escape or break the folder.

    >>> safe_name("../../etc/passwd")
    '.._.._etc_passwd'
    >>> safe_name("Building / Roof"), safe_name("CON"), safe_name(".."), safe_name("")
    ('Building _ Roof', '_CON', '_..', '_')
    """
    cleaned = "".join("_" if (c in '/\\:*?"<>|' or ord(c) < 32) else c for c in str(name)).strip()
    if cleaned in ("", ".", "..") or cleaned.split(".")[0].upper() in _RESERVED:
        cleaned = "_" + cleaned
    return cleaned[:128]


def _write_in_place(path: str, data: bytes) -> None:
    """Write ``data`` as the whole content of ``path``, never truncating before the write."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags | os.O_EXCL, 0o666)
        existed = False
    except FileExistsError:  # a rerun of a block that did not commit
        fd, existed = os.open(path, flags, 0o666), True
    except FileNotFoundError:  # a subfolder (a class folder) not made yet
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_in_place(path, data)
        return
    try:
        view, done = memoryview(data), 0
        while done < len(view):
            done += os.write(fd, view[done:])
        if existed:
            os.ftruncate(fd, len(view))  # after the write: the file is never shorter than its bytes
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=2)
def _writer_threads(n: int) -> ThreadPoolExecutor:
    """The file-writing threads of this process (made on first use, in each worker)."""
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="chipflow-write")


class Writer:
    """A block's chip and label files, written in place (object stores: by background threads).

    Object-store PUTs wait on the network: up to ``REMOTE_THREADS`` of them are in
    flight while the block computes, at most ``MAX_PENDING`` chips' files queued.
    Local files are written by the task itself (``THREADS = 0``): with one worker
    per core every core is already busy, and 2 writer threads per worker only
    added kernel contention on the output folders (8192², stride 128, 2 cores,
    interleaved runs: 4.2-4.6 s with the threads, 3.0-4.5 s inline).
    :meth:`close` waits for all of them and raises the first error: call it before
    the block's commit marker.
    """

    #: Background threads per worker process: local disks (0: the task writes), object stores.
    THREADS, REMOTE_THREADS = 0, 8
    #: Chips whose files may be queued at once.
    MAX_PENDING = 16

    def __init__(self, store: Store):
        self.store = store
        self.pending: deque[Future] = deque()
        n = self.THREADS if store.is_local else self.REMOTE_THREADS
        self.threads = _writer_threads(n) if n else None

    def put(self, files: list[tuple[str, bytes]]) -> None:
        """Queue ``(relpath, data)`` files, written one after the other (``Store.put(..., atomic=False)``).

        One chip's files go in one call: one hand-over to the threads per chip, not per file.
        """
        if self.threads is None:
            self._write(files)
            return
        while len(self.pending) >= self.MAX_PENDING:
            self.pending.popleft().result()
        self.pending.append(self.threads.submit(self._write, files))

    def _write(self, files: list[tuple[str, bytes]]) -> None:
        for relpath, data in files:
            self.store.put(relpath, data, atomic=False)

    def close(self) -> None:
        """Wait until every queued file is written; raise the first error."""
        errors = []
        while self.pending:
            error = self.pending.popleft().exception()
            if error is not None:
                errors.append(error)
        if errors:
            raise errors[0]
