"""The safetensors format: parse and validate headers (every file is hostile), build shard headers.

A file is an 8-byte little-endian header length N, N bytes of JSON, then the tensor data. nyxray
reads headers with ranged reads and never trusts one before :func:`parse_header` has checked it.
Output headers are built by :func:`build_header` exactly as the ``safetensors`` library writes
them, so a shard can stream to storage with its header first and still match mergekit's bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from ..errors import ModelError

# name -> (bytes per element, rank). The rank is the declaration order of the dtype enum in the
# safetensors library: files are laid out by dtype, highest rank first, then by name.
DTYPES: dict[str, tuple[int, int]] = {
    "BOOL": (1, 0),
    "U8": (1, 4),
    "I8": (1, 5),
    "F8_E5M2": (1, 6),
    "F8_E4M3": (1, 7),
    "I16": (2, 9),
    "U16": (2, 10),
    "F16": (2, 11),
    "BF16": (2, 12),
    "I32": (4, 13),
    "U32": (4, 14),
    "F32": (4, 15),
    "F64": (8, 17),
    "I64": (8, 18),
    "U64": (8, 19),
}

# Recipe dtype names (mergekit's, with an optional "torch." prefix) -> safetensors names.
RECIPE_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64", "int64": "I64"}

MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: where its bytes are (absolute offsets in the file) and what they are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def header_length(prefix: bytes, url: str, file_size: int) -> int:
    """Decode and check the 8-byte header length of the file at ``url``."""
    if len(prefix) < 8:
        raise ModelError(f"{url}: not a safetensors file (only {len(prefix)} bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise ModelError(f"{url}: safetensors header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise ModelError(f"{url}: safetensors header length {n} runs past the end of the {file_size}-byte file")
    return n


def parse_header(raw: bytes, url: str, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header's JSON (the bytes after the length) and return (tensors, metadata).

    Checks: valid UTF-8 JSON object, known dtypes, integer shapes, offsets that match the shape,
    cover the data area exactly with no overlap or gap, and stay inside the file.
    """
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        # ValueError covers bad UTF-8, bad JSON and integers too long to convert; deep nesting
        # ("[[[[...") exhausts the parser's recursion instead.
        raise ModelError(f"{url}: malformed safetensors header ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(doc, dict):
        raise ModelError(f"{url}: malformed safetensors header (not a JSON object)")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelError(f"{url}: malformed safetensors header (__metadata__ must map strings to strings)")
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        where = f"{url}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ModelError(f"{where}: header entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:  # a list here is unhashable
            raise ModelError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ModelError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise ModelError(f"{where}: data_offsets {offsets!r} are not an ordered pair of integers")
        info = TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
        if info.numel * DTYPES[dtype][0] != info.nbytes:
            raise ModelError(f"{where}: data_offsets span {info.nbytes} bytes but shape {shape} of {dtype} needs {info.numel * DTYPES[dtype][0]}")
        if offsets[1] > data_len:
            raise ModelError(f"{where}: data runs past the end of the file (truncated?)")
        tensors[name] = info
    position = data_start
    for info in sorted(tensors.values(), key=lambda i: (i.start, i.end)):
        if info.start != position:
            kind = "overlaps the previous tensor" if info.start < position else "leaves a gap before it"
            raise ModelError(f"{url}: tensor {info.name!r} {kind}")
        position = info.end
    if position != file_size:
        raise ModelError(f"{url}: {file_size - position} bytes after the last tensor do not belong to any tensor")
    return tensors, metadata


@dataclass(frozen=True)
class ShardEntry:
    """A tensor as laid out in an output shard: offsets relative to the start of the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def build_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> tuple[bytes, list[ShardEntry]]:
    """Header bytes (length prefix included) and the data layout for ``(name, dtype, shape)`` tensors.

    Matches the ``safetensors`` library byte for byte: data ordered by dtype rank (descending) then
    name, compact JSON with ``__metadata__`` first, padded with spaces to a multiple of 8 bytes.
    """
    ordered = sorted(tensors, key=lambda t: (-DTYPES[t[1]][1], t[0]))
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = metadata
    offset = 0
    spans = []
    for name, dtype, shape in ordered:
        n = DTYPES[dtype][0]
        for d in shape:
            n *= d
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        spans.append((name, dtype, tuple(shape), offset, offset + n))
        offset += n
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    base = 8 + len(text)
    entries = [ShardEntry(name, dtype, shape, base + a, base + b) for name, dtype, shape, a, b in spans]
    return struct.pack("<Q", len(text)) + text, entries
