"""Object storage: one set of ``storage_options`` for the output folder, the rasters and the class data.

``storage_options`` are fsspec's keyword arguments for the object store's filesystem
(s3fs's for ``s3://``: ``key``, ``secret``, ``token``, ``endpoint_url``, ``anon``,
``profile``, ``client_kwargs={"region_name": ...}``...). Without them every reader
falls back to its standard credential chain (environment, profiles, instance roles).
Three readers meet an object store in an export, and all take the same options:

- the output folder: fsspec, through :class:`chipflow.store.Store`, the options as given;
- rasters: GDAL's ``/vsis3/`` (HTTP range requests: only the tiles a block needs),
  the options translated to GDAL configuration options by :func:`gdal_s3_config` and
  applied by :func:`raster_env` (a ``rasterio.Env``) around each open; ``https://``
  rasters go through ``/vsicurl/`` and need no options;
- class data: pyogrio's own GDAL, the same translation, set while :func:`use` is active
  (``s3://`` GeoJSON, GeoPackage, Shapefile...); :func:`vector_input` reads any fsspec
  URL (GeoParquet, ``gs://``, ``az://``) with the options instead.

How the options reach the code that opens files. On the client, the export plans
inside ``with use(options):`` (a context variable: this thread and context only). In
the Dask workers, the picklable ``Store`` of every block task carries the options:
unpickling a ``Store`` calls :func:`remember`, which makes them the process's default,
so the worker's ``sources._dataset`` opens the task's rasters with the options of the
export the task belongs to. Only URLs travel in the task graph besides the ``Store``;
each worker opens its rasters itself. A worker serving two exports with different
options at the same time in two threads is not supported (a worker opens a raster once
per thread and keeps it open).

The options are secrets: nothing here prints, logs or stores them, and ``Store`` leaves
them out of its ``repr``; runs record no options in ``.chipflow/params.json``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import os
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from .errors import InputNotFoundError, InvalidParameterError

__all__ = [
    "Options", "current", "expand_url", "freeze", "gdal_s3_config", "is_remote", "raster_env",
    "remember", "use", "vector_input",
]

#: Storage options as carried by ``Store``: ``(key, value)`` pairs sorted by key.
Options = tuple[tuple[str, Any], ...]

_active: contextvars.ContextVar[Options | None] = contextvars.ContextVar("chipflow_storage_options",
                                                                         default=None)
_remembered: list[Options] = [()]


def freeze(storage_options: Mapping[str, Any] | Options | None, *urls: Any) -> Options:
    """``storage_options`` (a mapping, or pairs) as sorted pairs, checked without echoing any value.

    With ``urls`` (the export's paths), keys s3fs does not take are refused when one is ``s3://``.

    Raises
    ------
    InvalidParameterError
        Not a mapping of string keys; a nested option of the wrong type; an unknown key for ``s3://``.
    """
    if storage_options is None:
        return ()
    if isinstance(storage_options, Mapping):
        items = list(storage_options.items())
    elif isinstance(storage_options, tuple) and all(
            isinstance(p, tuple) and len(p) == 2 for p in storage_options):
        items = list(storage_options)
    else:  # never put the value in the message: it may hold a secret
        raise InvalidParameterError("storage_options", f"<{type(storage_options).__name__}>",
                                    "must be a mapping of fsspec options, e.g. {'endpoint_url': ...}")
    if not all(isinstance(k, str) for k, _ in items):
        raise InvalidParameterError("storage_options", "<mapping>", "keys must be strings")
    _check_types(dict(items))
    if any(isinstance(u, str) and _is_s3(u) for u in urls):
        _check_s3_keys([k for k, _ in items])
    return tuple(sorted(items, key=lambda kv: kv[0]))


def _check_s3_keys(keys: list[str]) -> None:
    """Refuse keys s3fs does not take.

    It takes its own, fsspec's listings cache's, and aiobotocore's session's, which
    gets the rest and fails on an unknown one deep in the first request (a TypeError).
    """
    import difflib
    import inspect

    import aiobotocore.session
    import s3fs

    named = {p.name for f in (s3fs.S3FileSystem.__init__, aiobotocore.session.AioSession.__init__)
             for p in inspect.signature(f).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    known = named | {"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache"}
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise InvalidParameterError(
                f"storage_options.{key}", "<value>", f"is not an option of s3fs (s3:// paths); {hint}"
                "e.g. endpoint_url, key, secret, token, anon, client_kwargs, config_kwargs")


#: s3fs's options that are mappings themselves, and those of botocore's ``Config`` (config_kwargs).
_NESTED = ("client_kwargs", "config_kwargs", "s3_additional_kwargs")
_NESTED_CONFIG = ("retries", "s3", "proxies")


def _check_types(options: dict[str, Any]) -> None:
    """The options s3fs/botocore would fail on deep inside a task, named here (values unshown).

    Raises
    ------
    InvalidParameterError
        A nested option that is not a mapping, or an ``endpoint_url`` that is no http(s) URL.
    """
    def mapping(name: str, value: Any) -> None:
        if not isinstance(value, Mapping):
            raise InvalidParameterError(f"storage_options.{name}", f"<{type(value).__name__}>",
                                        "must be a mapping of options, e.g. --storage-option "
                                        f"{name}.<option>=<value>")

    for name in _NESTED:
        if name in options:
            mapping(name, options[name])
    for name in _NESTED_CONFIG:
        if name in options.get("config_kwargs", {}):
            mapping(f"config_kwargs.{name}", options["config_kwargs"][name])
    endpoint = options.get("endpoint_url", options.get("client_kwargs", {}).get("endpoint_url"))
    if endpoint is not None:  # an address, not a secret: shown
        parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidParameterError("storage_options.endpoint_url", endpoint,
                                        "must be an http:// or https:// URL, e.g. http://127.0.0.1:9000")


def remember(options: Options) -> None:
    """Make ``options`` this process's default (called when a ``Store`` is unpickled in a worker)."""
    _remembered[0] = options


def current() -> dict[str, Any]:
    """The storage options in force: :func:`use`'s in this context, else the process's remembered ones."""
    active = _active.get()
    return dict(active if active is not None else _remembered[0])


def access_errors() -> tuple[type[BaseException], ...]:
    """What reaching a folder or object can raise: ``OSError``, and botocore's own errors.

    botocore's connection and credential errors (``EndpointConnectionError``,
    ``NoCredentialsError``) are not ``OSError``s; s3fs lets them through.
    """
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError)


def gdal_path(url: str) -> str:
    """GDAL's name of an object-store or web URL (``s3://b/k`` → ``/vsis3/b/k``); others unchanged."""
    scheme, _, rest = url.partition("://")
    prefix = {"s3": "/vsis3/", "s3a": "/vsis3/", "gs": "/vsigs/", "az": "/vsiaz/", "abfs": "/vsiaz/",
              "http": "/vsicurl/http://", "https": "/vsicurl/https://"}.get(scheme.lower()) if rest else None
    return prefix + rest if prefix else url


def version(path: str) -> str:
    """Which state of an input file this is: size and modification time, or an object's ETag.

    ``""`` when it cannot be told (``http(s)://`` and ``/vsi`` paths). Recorded in the
    run's parameters (a changed input is not resumed) and keying the workers' open
    handles (a replaced file is read anew).
    """
    if not is_remote(path):
        try:
            stat = os.stat(path)
        except OSError:
            return ""
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    found = _filesystem(path)
    if found is None:
        return ""
    fs, inner = found
    try:
        info = fs.info(inner)
    except (ValueError, *access_errors()):  # botocore's credential errors are no OSErrors
        return ""
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    return f"{info.get('size', '')}:{str(tag).strip(chr(34))}"


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL (``s3://``, ``https://``...) or a GDAL ``/vsi`` path, not a local file."""
    return ("://" in path and not path.startswith("file://")) or path.startswith("/vsi")


def _is_s3(path: str) -> bool:
    return path.startswith(("s3://", "s3a://", "/vsis3/", "/vsis3_streaming/"))


def gdal_s3_config(options: Mapping[str, Any]) -> dict[str, str]:
    """GDAL configuration options for ``/vsis3/`` equivalent to s3fs's ``options``.

    ``endpoint_url`` (or ``client_kwargs["endpoint_url"]``; else the environment's
    ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, as botocore) gives ``AWS_S3_ENDPOINT``
    (``host:port``), ``AWS_HTTPS`` (``NO`` for ``http://``) and path-style requests
    (``AWS_VIRTUAL_HOSTING=FALSE``). ``key``/``secret``/``token`` give the AWS credential
    options, ``client_kwargs["region_name"]`` ``AWS_REGION``, ``anon`` unsigned requests,
    ``profile`` ``AWS_PROFILE``, ``requester_pays`` ``AWS_REQUEST_PAYER``. What is not
    given is left to GDAL's own chain (environment, ``~/.aws``, instance roles).
    """
    client_kwargs = dict(options.get("client_kwargs") or {})
    out: dict[str, str] = {}
    endpoint = options.get("endpoint_url") or client_kwargs.get("endpoint_url")
    if not endpoint and "AWS_S3_ENDPOINT" not in os.environ:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        out["AWS_S3_ENDPOINT"] = parts.netloc + parts.path.rstrip("/")
        out["AWS_HTTPS"] = "NO" if parts.scheme == "http" else "YES"
        out["AWS_VIRTUAL_HOSTING"] = "FALSE"
    credentials = {
        "AWS_ACCESS_KEY_ID": options.get("key") or client_kwargs.get("aws_access_key_id"),
        "AWS_SECRET_ACCESS_KEY": options.get("secret") or client_kwargs.get("aws_secret_access_key"),
        "AWS_SESSION_TOKEN": options.get("token") or client_kwargs.get("aws_session_token"),
        "AWS_REGION": client_kwargs.get("region_name") or options.get("region_name"),
        "AWS_PROFILE": options.get("profile"),
    }
    out.update({k: str(v) for k, v in credentials.items() if v})
    if options.get("anon"):
        out["AWS_NO_SIGN_REQUEST"] = "YES"
    if options.get("requester_pays"):
        out["AWS_REQUEST_PAYER"] = "requester"
    return out


@functools.cache
def _session_class() -> type:
    """A rasterio session that hands GDAL given options as its credentials (no boto3 needed).

    rasterio refuses AWS credential options passed to ``rasterio.Env`` directly; a
    session is its way. Without explicit credentials, rasterio adds its own
    ``AWSSession`` (boto3's default chain) when it opens an ``s3://`` path.
    """
    from rasterio.session import AWSSession, Session

    class GDALS3Session(Session):
        hascreds = AWSSession.hascreds

        def __init__(self, config: dict[str, str]):
            self._config = config

        def get_credential_options(self) -> dict[str, str]:
            return dict(self._config)

    return GDALS3Session


def raster_env(path: str) -> contextlib.AbstractContextManager[Any]:
    """The ``rasterio.Env`` to open ``path`` in: the S3 options in force for ``s3://``, else nothing.

    A URL is opened outside GDAL's cache of objects' sizes and bytes
    (``CPL_VSIL_CURL_NON_CACHED``), which outlives the handle: an object replaced at
    the same URL is then read anew by the next handle (a long-lived cluster's next
    export), not from what an earlier one cached. The handle itself reads each
    range once all the same.
    """
    if not is_remote(path):
        return contextlib.nullcontext()
    import rasterio

    config = gdal_s3_config(current()) if _is_s3(path) else {}
    session = {"session": _session_class()(config)} if config else {}
    return rasterio.Env(**session, CPL_VSIL_CURL_NON_CACHED=gdal_path(path))


@contextlib.contextmanager
def use(options: Options) -> Iterator[None]:
    """Open inputs with ``options`` in this context (the client's planning).

    Also sets pyogrio's GDAL configuration (process-wide, restored on exit) so that
    ``s3://`` class data read through pyogrio sees the same endpoint and credentials.
    """
    token = _active.set(options)
    config = gdal_s3_config(dict(options))  # without options too: an endpoint the environment names
    restore: dict[str, Any] = {}
    try:
        if config:
            import pyogrio

            # GDAL falls back to the environment: an option the environment gives is unset on exit
            restore = {k: None if k in os.environ else pyogrio.get_gdal_config_option(k) for k in config}
            pyogrio.set_gdal_config_options(config)
        yield
    finally:
        if restore:
            import pyogrio

            pyogrio.set_gdal_config_options(restore)  # None unsets
        _active.reset(token)


def _filesystem(url: str) -> tuple[Any, str] | None:
    """The fsspec filesystem and path of an object-store URL (None: http(s), /vsi, unknown schemes)."""
    if url.startswith("/vsi") or url.split("://", 1)[0].lower() in ("http", "https", "ftp"):
        return None
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **current())
    except (ImportError, ValueError):  # a scheme fsspec has no (installed) implementation for
        return None
    fs.invalidate_cache()  # fsspec shares instances: listings cached earlier may be stale
    return fs, path


def expand_url(url: str, extensions: tuple[str, ...], parameter: str = "in_raster") -> list[str]:
    """An object-store URL as raster URLs: a glob pattern's matches, a prefix's rasters, else itself.

    Raises
    ------
    InputNotFoundError
        A pattern that matches nothing, a prefix without rasters, or a store that cannot be
        reached (credentials, endpoint, permissions).
    """
    try:
        return _expanded(url, extensions, parameter)
    except InputNotFoundError:  # listed, and found nothing: said as it is (it is an OSError too)
        raise
    except access_errors() as exc:
        raise InputNotFoundError(parameter, url, f"cannot be listed: {type(exc).__name__}: {exc}") from None


def _expanded(url: str, extensions: tuple[str, ...], parameter: str) -> list[str]:
    found = _filesystem(url)
    if found is None:
        return [url]
    fs, path = found
    if any(ch in path for ch in "*?["):
        matches = sorted(fs.glob(path))
        if not matches:
            raise InputNotFoundError(parameter, url, "the pattern matches no object")
        return [fs.unstrip_protocol(p) for p in matches]
    if path.lower().endswith(extensions):
        return [url]
    try:
        is_dir = fs.isdir(path)
    except OSError:
        is_dir = False
    if not is_dir:
        return [url]
    matches = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(extensions))
    if not matches:
        raise InputNotFoundError(parameter, url, f"the prefix holds no raster ({', '.join(extensions)})")
    return [fs.unstrip_protocol(p) for p in matches]


def vector_input(path: str) -> Any:
    """What geopandas should read for ``path``: an object-store URL's bytes (fsspec, the options in force).

    Local paths, ``http(s)://`` URLs and ``/vsi`` paths are returned unchanged. An
    object is read whole into memory (class data is read whole anyway); a Shapefile
    needs its sidecar files, so on object stores prefer GeoPackage, GeoJSON,
    FlatGeobuf or GeoParquet.
    """
    if not is_remote(path):
        return path
    found = _filesystem(path)
    if found is None:
        return path
    fs, inner = found
    return io.BytesIO(fs.cat_file(inner))
