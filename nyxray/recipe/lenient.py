"""mergekit's leniency, made visible: the keys mergekit 0.1.5 ignores, found and set aside.

mergekit reads a recipe with pydantic models that drop keys they do not declare, at every level,
so published models were made from recipes with typos (``dype:``), notes (``metadata:``) and keys
of other tools (``revision:`` beside ``model:``). Such a recipe must give mergekit's output, so
nyxray ignores the same keys, but never silently: each one becomes an :class:`Ignored` record
(its key path and a did-you-mean) that the plan turns into a warning, or into an error under
``strict``. The recipe's shape is declared once, in :data:`SHAPE`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import RecipeError, did_you_mean
from .tokenizer import BLOCK_KEYS, TOKEN_KEYS, TOKEN_SOURCE_KINDS


@dataclass(frozen=True)
class Ignored:
    """A key mergekit 0.1.5 ignores: where it is, and why (with what it probably meant)."""

    path: str
    why: str

    def message(self) -> str:
        return f"{self.path}: {self.why}"


def refuse(ignored: tuple[Ignored, ...], origin: str) -> None:
    """``strict``: the first ignored key is an error."""
    if ignored:
        raise RecipeError(ignored[0].path, f"{ignored[0].why}; refused under strict", origin)


@dataclass(frozen=True)
class Mapping:
    """One kind of mapping in a recipe: the keys mergekit reads there, and what each nested key holds."""

    keys: tuple[str, ...]
    nested: tuple[tuple[str, str], ...] = ()  # (key, kind): a mapping of that kind, or a list of them
    inert: tuple[tuple[str, str], ...] = ()  # (key, why): read by mergekit but never used


# Keys mergekit declares but nyxray refuses (the parser names why) are listed too: they are not ignored.
SHAPE: dict[str, Mapping] = {
    "recipe": Mapping(
        keys=(
            "name",
            "merge_method",
            "slices",
            "models",
            "base_model",
            "parameters",
            "dtype",
            "out_dtype",
            "tokenizer_source",
            "random_seed",
            "modules",
            "tokenizer",
            "chat_template",
        ),
        nested=(("slices", "slice"), ("models", "model"), ("parameters", "parameters"), ("tokenizer", "tokenizer")),
    ),
    "tokenizer": Mapping(keys=BLOCK_KEYS, nested=(("tokens", "tokens"),)),
    "token": Mapping(keys=TOKEN_KEYS, nested=(("source", "token_source"),)),
    "token_source": Mapping(keys=tuple(dict.fromkeys(k for keys in TOKEN_SOURCE_KINDS.values() for k in keys))),
    "slice": Mapping(
        keys=("sources", "base_model", "parameters"),
        nested=(("sources", "source"), ("parameters", "parameters")),
        inert=(("residual_weight", "has no effect: mergekit 0.1.5 reads it but never uses it"),),
    ),
    "source": Mapping(keys=("model", "layer_range", "parameters"), nested=(("parameters", "parameters"),)),
    "model": Mapping(keys=("model", "parameters"), nested=(("parameters", "parameters"),)),
    "conditional": Mapping(keys=("filter", "value")),
}


def set_aside(doc: Any) -> tuple[Any, tuple[Ignored, ...]]:
    """``doc`` without the keys mergekit ignores, and those keys. Anything malformed is left as it
    is, for the parser to name."""
    found: list[Ignored] = []
    return _walk(doc, "recipe", "", found), tuple(found)


def _walk(node: Any, kind: str, path: str, found: list[Ignored]) -> Any:
    if kind == "parameters":
        return _parameters(node, path, found)
    if kind == "tokens":  # token -> its settings: the keys are the user's tokens
        return {k: _walk(v, "token", f"{path}.{k}", found) for k, v in node.items()} if isinstance(node, dict) else node
    if isinstance(node, list):
        return [_walk(item, kind, f"{path}[{i}]", found) for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    shape, nested, inert = SHAPE[kind], dict(SHAPE[kind].nested), dict(SHAPE[kind].inert)
    kept = {}
    for key, value in node.items():
        sub = f"{path}.{key}" if path else str(key)
        if key in inert or key not in shape.keys:
            found.append(Ignored(sub, inert.get(key) or f"unknown key, ignored as mergekit 0.1.5 ignores it{did_you_mean(str(key), shape.keys)}"))
        else:
            kept[key] = _walk(value, nested[key], sub, found) if key in nested else value
    return kept


def _parameters(node: Any, path: str, found: list[Ignored]) -> Any:
    """Parameter names are the method's (the parser checks them, as mergekit refuses unknown ones);
    only the conditionals inside a setting have keys of their own."""
    if not isinstance(node, dict):
        return node
    out = {}
    for name, setting in node.items():
        sub = f"{path}.{name}"
        if isinstance(setting, dict) or (isinstance(setting, list) and setting and all(isinstance(c, dict) for c in setting)):
            out[name] = _walk(setting, "conditional", sub, found)
        else:
            out[name] = setting
    return out
