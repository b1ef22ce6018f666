"""mergekit's inference for a model it has no definition for: every tensor named
``<prefix>.<N>.<suffix>`` is layer ``N`` of a module ``<prefix>``, whose layer count is the
largest ``N`` plus one; every other tensor is a pre-weight. A tensor that some of the models lack
is optional (a tied LM head, a bias), as in mergekit.

mergekit 0.1.5 also asks transformers for the model's class; nyxray plans from headers alone, so
it reads the names in the checkpoints. Both give the same tensors, the same layers and the same
optional ones for a checkpoint that holds what its class declares.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from ...errors import ModelError
from .record import Architecture, Module, config_value

_LAYER = re.compile(r"\.(\d+)\.")


def _split(names: set[str]) -> tuple[dict[str, int], dict[str, set[str]], set[str]]:
    """Layer counts and layer suffixes per prefix, and the tensors outside any layer."""
    counts: dict[str, int] = {}
    suffixes: dict[str, set[str]] = {}
    loose: set[str] = set()
    for name in names:
        m = _LAYER.search(name)
        if m is None:
            loose.add(name)
            continue
        prefix = name[: m.start()]
        counts[prefix] = max(counts.get(prefix, 0), int(m.group(1)) + 1)
        suffixes.setdefault(prefix, set()).add(name[m.end() :])
    return counts, suffixes, loose


def _vocab_size(config: dict) -> object:
    return config_value(config, "vocab_size") or config_value(config, "text_config.vocab_size")


def infer(name: str, config: dict, models: Sequence[Mapping[str, object]]) -> Architecture:
    """The architecture of models whose tensors (name -> expression, one mapping per model) show a
    repeated layer pattern; ``config`` (the donor's) gives the vocabulary size. A single layer
    prefix makes one module holding every tensor; several make a module per prefix, the loose
    tensors going to the longest prefix they start with (or to a module of their own)."""
    names = set().union(*models)
    counts, suffixes, loose = _split(names)
    if not counts:
        raise ModelError(
            f"architecture {name!r} is not in nyxray's catalogue, and its tensors have no repeated <prefix>.<N>.<suffix> layer pattern to infer one from"
        )
    vocab = _vocab_size(config)

    def everywhere(n: str) -> bool:
        return all(n in m for m in models)

    def module(label: str, prefix: str, pre: list[str]) -> Module:
        count = counts.get(prefix, 0)
        layer = tuple(sorted(suffixes.get(prefix, ())))
        optional = {n for n in pre if not everywhere(n)} | {s for s in layer if not all(everywhere(f"{prefix}.{i}.{s}") for i in range(count))}
        embeds = {n for n in pre if any(getattr(m.get(n), "shape", (None,))[0] == vocab for m in models)}
        # the layer count of one module is the config's when it agrees (so the output's config
        # follows a layer-changing merge); mergekit leaves the config's count as it was
        key = "num_hidden_layers" if len(counts) == 1 and config.get("num_hidden_layers") == count else None
        return Module(
            label, tuple(sorted(pre)), layer, (), layers=prefix, layers_key=key, fixed_layers=count, optional=frozenset(optional), embeds=frozenset(embeds)
        )

    if len(counts) == 1:
        (prefix,) = counts
        return Architecture(name, (module("default", prefix, sorted(loose)),), inferred=True, names=(name,))
    owner = {n: max((p for p in counts if n.startswith(p)), key=len, default="") for n in loose}
    modules = [module(p, p, [n for n in loose if owner[n] == p]) for p in sorted(counts)]
    rest = [n for n in loose if owner[n] == ""]
    if rest:
        modules.insert(0, module("default", "", rest))
    return Architecture(name, tuple(modules), inferred=True, names=(name,))
