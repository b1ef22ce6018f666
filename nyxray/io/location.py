"""One storage interface over fsspec: locations, ranged and coalesced reads, atomic writes.

What differs between storages (atomic writes, parts, compare-and-swap, cleanup) is a location's
:attr:`Location.backend`, chosen by protocol in :mod:`nyxray.io.backends`.

Every byte nyxray moves goes through :class:`Location`: local paths, ``file://``, ``s3://``
(s3fs), ``gs://``, ``memory://`` and any other fsspec URL, and Hugging Face repos (resolved by
:mod:`nyxray.plan.sources` to a cache snapshot or an ``hf://`` location). A Location pickles as
(protocol, root, options), so Ray actors rebuild the filesystem on their side.

Errors are turned into :class:`StorageError` messages that name the URL and never carry
credentials. Transient failures (connection resets, throttling, 5xx) are retried with capped
exponential backoff and jitter (:mod:`nyxray.io.retry`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec

from ..errors import StorageError
from .backends import backend_class
from .backends.base import DEFAULT_PART, Backend, Writer
from .retry import redact, with_retries

COALESCE_CAP = 64 * 2**20  # bytes: one ranged request never asks for more


@dataclass
class Location:
    """A directory-like place in some storage: ``protocol`` + ``root`` + fsspec ``options``."""

    protocol: str
    root: str
    options: dict[str, Any] = field(default_factory=dict)
    display: str = ""

    def __post_init__(self) -> None:
        self.root = self.root.rstrip("/") if self.root not in ("/", "") else self.root
        if not self.display:
            self.display = self.root if self.protocol == "file" else f"{self.protocol}://{self.root}"
        self._fs: Any = None
        self._backend: Backend | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fs", "_backend")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fs, self._backend = None, None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            try:
                self._fs = fsspec.filesystem(self.protocol, **self.options)
            except (ImportError, ValueError, TypeError) as e:
                raise StorageError(redact(f"{self.display}: cannot use storage {self.protocol!r}: {e}", self.options)) from None
        return self._fs

    @property
    def backend(self) -> Backend:
        """This location's storage primitives (:mod:`nyxray.io.backends`)."""
        if self._backend is None:
            self._backend = backend_class(self.protocol)(self)
        return self._backend

    def path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise StorageError(f"{self.display}: refusing a name that escapes the location: {name!r}")
        return f"{self.root}/{name}" if name else self.root

    def url(self, name: str) -> str:
        return f"{self.display}/{name}" if name else self.display

    def child(self, name: str) -> Location:
        return Location(self.protocol, self.path(name), self.options, self.url(name))

    # -- reads ---------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return with_retries(lambda: bool(self.fs.exists(self.path(name))), self.url(name), self.options)

    def size(self, name: str) -> int:
        return with_retries(lambda: int(self.fs.size(self.path(name))), self.url(name), self.options)

    def read(self, name: str) -> bytes:
        return with_retries(lambda: self.fs.cat_file(self.path(name)), self.url(name), self.options)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        data = with_retries(lambda: self._read_range(self.path(name), start, end), self.url(name), self.options)
        if len(data) != end - start:
            raise StorageError(f"{self.url(name)}: short read at bytes {start}-{end} ({len(data)} bytes; truncated file?)")
        return data

    def _read_range(self, path: str, start: int, end: int) -> bytes:
        return self.backend.read_range(path, start, end)

    def sha256(self, name: str, size: int, piece: int = 64 * 2**20, start: int = 0) -> str:
        """sha256 of bytes ``start..size-1`` of a file (default: the first ``size``), read in pieces (bounded memory)."""
        h = hashlib.sha256()
        for at in range(start, size, piece):
            h.update(self.read_range(name, at, min(size, at + piece)))
        return h.hexdigest()

    def listdir(self, name: str = "") -> list[str]:
        """Base names of the files directly under ``name`` (empty when it does not exist)."""
        path = self.path(name)

        def ls() -> list[str]:
            self.fs.invalidate_cache(path)  # object-store listings are cached; resume needs the truth
            try:
                entries = self.fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path.rstrip("/"))

        return with_retries(ls, self.url(name), self.options)

    # -- writes --------------------------------------------------------------------------------
    def open_atomic(self, name: str, part_size: int | None = None) -> Writer:
        """A writer for ``name``, which appears whole on ``commit`` and never on ``discard``.
        Multipart uploads use ``part_size`` bytes per part, else the ``default_block_size``
        storage option, else 16 MiB."""
        return self.backend.open_atomic(name, part_size or int(self.options.get("default_block_size", DEFAULT_PART)))

    def write_atomic(self, name: str, data: bytes) -> None:
        w = self.open_atomic(name)
        try:
            w.write(data)
        except BaseException:
            w.discard()
            raise
        w.commit()

    def delete(self, name: str) -> None:
        def rm() -> None:
            try:
                self.fs.rm_file(self.path(name))
            except FileNotFoundError:
                pass

        with_retries(rm, self.url(name), self.options)

    def delete_tree(self, name: str) -> None:
        """Remove ``name`` and everything under it (nothing when absent)."""

        def rm() -> None:
            try:
                self.fs.rm(self.path(name), recursive=True)
            except FileNotFoundError:
                pass

        with_retries(rm, self.url(name), self.options)

    def remove_partial_writes(self, keep: Iterable[str] = ()) -> int:
        """Drop what killed writers left under this location: hidden ``.nyxray-*.tmp`` files, and
        a store's pending (never completed, so invisible) uploads, except those whose upload id is
        in ``keep`` (a killed run's uploads that this run may adopt: its driver then adopts or
        aborts each, :mod:`nyxray.output.assemble`). Only call this when no writer of this
        location is running (under its lease). Returns how many were removed."""
        return self.backend.remove_partial_writes(set(keep))

    def makedirs(self) -> None:
        self.backend.makedirs()


def location(url: str, options: dict[str, Any] | None = None) -> Location:
    """Turn a path or fsspec URL into a Location (no I/O)."""
    options = dict(options or {})
    if "://" not in url:
        return Location("file", os.path.abspath(os.path.expanduser(url)), {}, os.path.abspath(os.path.expanduser(url)))
    protocol, rest = url.split("://", 1)
    protocol = protocol.lower()
    if protocol == "file":
        return Location("file", "/" + rest.lstrip("/"), {})
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        raise StorageError(f"{redact(url)}: unsupported storage {protocol!r} ({e})") from None
    root = cls._strip_protocol(url)
    display = redact(url).rstrip("/")
    return Location(protocol, root, backend_class(protocol).storage_options(options), display)


def parse_storage_options(pairs: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--storage-option``) -> options; dotted keys nest, values are YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise StorageError(f"--storage-option {pair.split('=')[0]!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            node[parts[-1]] = value
        if not isinstance(node[parts[-1]], (str, int, float, bool, type(None))):
            node[parts[-1]] = value
    return out


@dataclass(frozen=True)
class Range:
    """A byte range of one file of one location."""

    loc: Location
    name: str
    start: int
    end: int


def read_ranges(ranges: list[Range], cap: int = COALESCE_CAP, threads: int = 8) -> tuple[list[bytes], int]:
    """Read many ranges: adjacent ranges of a file are coalesced into requests of at most ``cap``
    bytes, which run concurrently. Returns the data of each range, in order, and bytes fetched."""
    order = sorted(range(len(ranges)), key=lambda i: (ranges[i].loc.display, ranges[i].name, ranges[i].start))
    groups: list[list[int]] = []
    for i in order:
        r = ranges[i]
        if groups:
            g = ranges[groups[-1][0]]
            last = ranges[groups[-1][-1]]
            if (g.loc.display, g.name) == (r.loc.display, r.name) and last.end == r.start and r.end - g.start <= cap:
                groups[-1].append(i)
                continue
        groups.append([i])

    def fetch(group: list[int]) -> bytes:
        first, last = ranges[group[0]], ranges[group[-1]]
        return first.loc.read_range(first.name, first.start, last.end)

    out: list[bytes] = [b""] * len(ranges)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(groups)))) as pool:
        blobs = list(pool.map(fetch, groups))
    fetched = 0
    for group, blob in zip(groups, blobs):
        fetched += len(blob)
        base = ranges[group[0]].start
        view = memoryview(blob)
        for i in group:
            out[i] = view[ranges[i].start - base : ranges[i].end - base]  # type: ignore[assignment]
    return out, fetched
