"""Model references -> locations -> what a model holds, from its config, index and shard headers.

Resolution order for a reference: an explicit ``--model NAME=URL`` mapping; a URL; the
``--models-root`` mirror (``ROOT/org/name``; a mirror has no revisions, so ``@revision`` is refused
there rather than silently dropped); an existing local path; a Hugging Face repo id (``org/name``
or ``org/name@revision``: the local hub cache when offline, ``hf://`` otherwise).
Only metadata is read here: ``config.json``, the shard index and each shard's header (two ranged
reads per shard). Pickle checkpoints are refused: loading them can run code.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelError, StorageError
from ..io.location import Location, location, redact
from ..io.safetensors import TensorInfo, header_length, parse_header
from .architectures import Architecture, adapt, architecture_of
from .expr import Expr, Leaf

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "generation_config.json",
    "chat_template.json",
)


@dataclass
class Resolver:
    """How model references become locations (``--model``, ``--models-root``, storage options)."""

    mapping: dict[str, str] = field(default_factory=dict)
    models_root: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def locate(self, ref: str) -> Location:
        if ref in self.mapping:
            return location(self.mapping[ref], self.storage_options)
        if "://" in ref:
            return location(ref, self.storage_options)
        if self.models_root and not os.path.isabs(ref):
            if "@" in ref:  # a mirror is one copy per name: it cannot honour a pinned revision
                raise ModelError(
                    f"model {ref!r}: --models-root {redact(self.models_root)} holds one copy per model name and cannot serve revision "
                    f"{ref.partition('@')[2]!r}; map it with --model {ref}=URL, or drop the revision or --models-root"
                )
            return location(f"{self.models_root.rstrip('/')}/{ref}", self.storage_options)
        local = os.path.expanduser(ref)
        if os.path.exists(local):
            return location(local)
        if HF_REPO.match(ref):
            return _huggingface(ref)
        raise ModelError(f"model {ref!r}: not found (no --model mapping, not a URL, not an existing path, not a Hugging Face repo id)")


def _huggingface(ref: str) -> Location:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = ref.partition("@")
    if constants.HF_HUB_OFFLINE:
        try:
            path = snapshot_download(repo, revision=revision or None, local_files_only=True)
        except (LocalEntryNotFoundError, HfHubHTTPError, ValueError, OSError) as e:
            raise ModelError(f"model {ref!r}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set ({type(e).__name__})") from None
        return location(path)
    loc = location(f"hf://{repo}@{revision}" if revision else f"hf://{repo}")
    loc.display = f"hf://{ref}"
    return loc


@dataclass
class Model:
    """An input model as the planner sees it: config, architecture and tensor expressions.

    For a source model each tensor is a :class:`Leaf`; for a pipeline stage it is whatever the
    stage computes. ``loc`` is None for stages (they have no files unless written).
    """

    ref: str
    config: dict
    arch: Architecture
    tensors: dict[str, Expr]
    loc: Location | None = None
    header_bytes: int = 0
    extra_files: tuple[str, ...] = ()  # tokenizer and generation files present
    files_loc: Location | None = None  # where extra_files are (a stage: its donor's location)
    converted: frozenset[str] = frozenset()  # tensors read through a checkpoint conversion (.architectures.layout)
    tokenizer_files: dict[str, bytes] | None = None  # a tokenizer a stage built (then extra_files are not its own)
    adapter: Any = None  # a model+adapter reference: the adapter's plan (nyxray.plan.lora.AdapterPlan)

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers(self.config)

    def twin(self, name: str) -> tuple[str, Expr] | None:
        """The tensor a tied ``name`` (an LM head its checkpoint leaves out) is read as, if any."""
        for m in self.arch.modules:
            for tied, other in m.tied:
                if tied == name and other in self.tensors:
                    return other, self.tensors[other]
        return None

    def label(self, name: str) -> str:
        """The checkpoint name mergekit reads ``name`` under ("" when converted), which orders its writes."""
        if name in self.converted:
            return ""
        e = self.tensors.get(name)
        if e is None:
            found = self.twin(name)
            return found[0] if found else name
        return e.name if isinstance(e, Leaf) and self.loc is not None else name


def read_json(loc: Location, name: str, ref: str, what: str = "model") -> Any:
    """A small JSON file of ``what`` ``ref`` (a model, an adapter), parsed; errors name both."""
    try:
        raw = loc.read(name)
    except StorageError as e:
        raise ModelError(f"{what} {ref!r}: cannot read {name}: {e}") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, over-long integers, deep nesting
        raise ModelError(f"{what} {ref!r}: {loc.url(name)} is not valid JSON ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def read_header(loc: Location, name: str) -> tuple[dict[str, TensorInfo], int]:
    """A safetensors file's tensors, from two ranged reads, and the bytes its header takes."""
    size = loc.size(name)
    url = loc.url(name)
    n = header_length(loc.read_range(name, 0, min(8, size)), url, size)
    tensors, _ = parse_header(loc.read_range(name, 8, 8 + n), url, size)
    return tensors, 8 + n


def _safe_file_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".safetensors"):
        raise ModelError(f"{where}: shard file name {name!r} is not a plain .safetensors file name")
    return name


def _tagalong(arch: Architecture, config: dict) -> tuple[str, ...]:
    """Files the output carries besides the tokenizer's, as mergekit's does: the architecture's (a
    multimodal processor's config), and the module of a remote-code config class (transformers
    writes it next to the config it saves, and the config's ``auto_map`` names it)."""
    auto_map = config.get("auto_map")
    ref = auto_map.get("AutoConfig") if isinstance(auto_map, dict) else None
    code = (ref.split("--")[-1].rsplit(".", 1)[0] + ".py",) if isinstance(ref, str) and "." in ref else ()
    return arch.tagalong + code


def _check_layer_counts(ref: str, loc: Location, arch: Architecture, config: dict, tensors: dict[str, Expr]) -> None:
    """The planner builds every layer the config claims before it looks for tensors, so a config
    claiming 10**8 layers would hang it: the last claimed layer of each module must be in the checkpoint."""
    for m in arch.modules:
        try:
            n = m.num_layers(config)
        except ModelError as e:
            raise ModelError(f"model {ref!r}: {e}") from None
        if n and not any(m.layer_name(n - 1, suffix) in tensors for suffix in m.layer_suffixes(n - 1, config)):
            raise ModelError(f"model {ref!r}: {loc.url('config.json')} says {m.config_key(config)}={n}, but the checkpoint has no tensors of layer {n - 1}")


def load_model(ref: str, loc: Location, allow_pickle: bool = False) -> Model:
    """Read a model's config, index and shard headers (no tensor data)."""
    files = loc.listdir()
    if not files:
        raise ModelError(f"model {ref!r}: {loc.display} does not exist or is empty")
    if "config.json" not in files:
        raise ModelError(f"model {ref!r}: {loc.display} has no config.json")
    config = read_json(loc, "config.json", ref)
    if not isinstance(config, dict):
        raise ModelError(f"model {ref!r}: {loc.url('config.json')} is not a JSON object")
    if INDEX in files:
        index = read_json(loc, INDEX, ref)
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise ModelError(f"model {ref!r}: {loc.url(INDEX)} has no weight_map")
        where = f"model {ref!r}: {loc.url(INDEX)}"
        shard_names = sorted({_safe_file_name(v, where) for v in wmap.values()})
    elif SINGLE in files:
        wmap, shard_names = None, [SINGLE]
    else:
        pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if pickles:
            raise ModelError(
                f"model {ref!r}: only pickle checkpoints ({', '.join(pickles[:3])}); nyxray refuses them because loading a pickle can run code. "
                "Convert the model to safetensors first."
            )
        raise ModelError(f"model {ref!r}: {loc.display} has no model.safetensors or {INDEX}")
    missing = [s for s in shard_names if s not in files]
    if missing:
        raise ModelError(f"model {ref!r}: the index names shard(s) that do not exist: {', '.join(missing)}")

    def header(shard: str) -> tuple[str, dict, int]:
        return (shard, *read_header(loc, shard))

    with ThreadPoolExecutor(max_workers=min(16, len(shard_names))) as pool:
        headers = list(pool.map(header, shard_names))
    tensors: dict[str, Expr] = {}
    header_bytes = 0
    for shard, infos, hb in headers:
        header_bytes += hb
        for name, info in infos.items():
            if wmap is not None and wmap.get(name) != shard:
                continue  # the index is authoritative about which shard holds a tensor
            tensors[name] = Leaf(loc, shard, info.start, info.end, info.dtype, info.shape, ref, name)
    if wmap is not None:
        absent = [n for n in wmap if n not in tensors]
        if absent:
            raise ModelError(f"model {ref!r}: the index lists {absent[0]!r} in {wmap[absent[0]]}, but that shard's header lacks it")
    arch = architecture_of(config, tensors, f"model {ref!r}")
    _check_layer_counts(ref, loc, arch, config, tensors)
    canonical, converted = adapt(arch, config, tensors)
    extra = tuple(f for f in (*TOKENIZER_FILES, *_tagalong(arch, config)) if f in files)
    return Model(ref, config, arch, canonical, loc, header_bytes, extra, loc, converted)
