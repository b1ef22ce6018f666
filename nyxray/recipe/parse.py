"""mergekit YAML recipes -> typed, validated objects. Every rule of the recipe format lives here.

Keys mergekit 0.1.5 ignores are set aside first and recorded on the recipe (:mod:`.lenient`);
everything else mergekit would refuse, and more (wrong types, reversed layer ranges, unsupported
features), is an error that names the key path (``slices[1].sources[0].layer_range``), raised
before any model is opened. A file may hold several ``---``-separated documents: a
pipeline of named stages (mergekit-multi's format), see :func:`parse_pipeline`.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import RecipeError, did_you_mean
from ..io.safetensors import RECIPE_DTYPES
from ..methods.registry import METHODS, unknown_method_hint
from .lenient import Ignored, set_aside
from .tokenizer import TokenizerSpec, chat_template, tokenizer_spec

Scalar = float | int | bool | str
# A setting as written: a scalar, a gradient list, or a list of {filter, value} conditionals.
Setting = Any

UNSUPPORTED = {
    "modules": "multi-module architectures are not supported; use slices:",
}


@dataclass(frozen=True)
class Source:
    """An input slice: layers ``[start, end)`` of one model (``layer_range`` None = every layer)."""

    model: str
    layer_range: tuple[int, int] | None
    parameters: dict[str, Setting] = field(default_factory=dict)
    path: str = ""


@dataclass(frozen=True)
class Slice:
    """An output slice: its sources are merged layer by layer."""

    sources: tuple[Source, ...]
    base_model: str | None
    parameters: dict[str, Setting] = field(default_factory=dict)
    path: str = ""


@dataclass(frozen=True)
class Recipe:
    """One merge. Exactly one of ``slices`` and ``models`` is set."""

    merge_method: str
    slices: tuple[Slice, ...] | None
    models: tuple[Source, ...] | None
    base_model: str | None
    parameters: dict[str, Setting]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    name: str | None
    text: str
    origin: str
    random_seed: int | None = None  # seeds random methods (DARE, DELLA); --random-seed overrides it
    ignored: tuple[Ignored, ...] = ()  # keys mergekit ignores, set aside: warnings, or errors when strict
    tokenizer: TokenizerSpec | None = None  # the output vocabulary (tokenizer_source: or tokenizer:); None keeps the donor's
    chat_template: str | None = None  # auto, a built-in name or Jinja text

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def model_refs(self) -> list[str]:
        """Every model this recipe names, in recipe order, without repeats."""
        refs: list[str] = []
        for s in self.slices or ():
            refs += [src.model for src in s.sources] + ([s.base_model] if s.base_model else [])
        refs += [m.model for m in self.models or ()]
        if self.base_model:
            refs.append(self.base_model)
        return list(dict.fromkeys(refs))


def _check_keys(node: Any, path: str, origin: str) -> dict:
    """``node`` is a mapping without keys nyxray refuses (unknown ones were set aside before)."""
    if not isinstance(node, dict):
        raise RecipeError(path or "recipe", f"expected a mapping, got {type(node).__name__}", origin)
    for key in node:
        if key in UNSUPPORTED:
            raise RecipeError(f"{path}.{key}" if path else str(key), UNSUPPORTED[key], origin)
    return node


def split_reference(ref: str) -> tuple[str, str | None]:
    """``model+adapter`` -> (model, adapter); a plain reference -> (ref, None). mergekit splits on
    every ``+`` (URLs included), so a reference holds at most one."""
    model, plus, adapter = ref.partition("+")
    return (model, adapter) if plus else (ref, None)


def _model_ref(value: Any, path: str, origin: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(path, f"a model reference must be a non-empty string, got {value!r}", origin)
    value = value.strip()
    if value.count("+") > 1:
        raise RecipeError(path, f"{value!r} has more than one '+': a reference is MODEL or MODEL+LORA_ADAPTER", origin)
    for part in split_reference(value):
        if part is not None and not part.strip():
            raise RecipeError(path, f"{value!r}: MODEL+LORA_ADAPTER needs both parts", origin)
        if part is not None and part.count("@") > 1 and "://" not in part:
            raise RecipeError(path, f"{value!r} has more than one '@revision' in {part!r}", origin)
    return value


def _number(v: Any) -> bool:
    # .nan / .inf are YAML floats; a non-finite t would silently fill the output with NaNs.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_value(value: Any, path: str, origin: str) -> None:
    if _number(value) or isinstance(value, bool):
        return
    if isinstance(value, list) and value and (all(_number(v) for v in value) or all(isinstance(v, bool) for v in value)):
        return
    raise RecipeError(path, f"a value must be a finite number, a boolean, or a non-empty list of either (a gradient), got {value!r}", origin)


def _setting(value: Any, path: str, origin: str) -> Setting:
    """Validate one parameter setting; returns it in normal form (conditionals as a list)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, cond in enumerate(value):
            p = f"{path}[{i}]"
            _check_keys(cond, p, origin)
            if "value" not in cond:
                raise RecipeError(p, "a conditional needs a value:", origin)
            if "filter" in cond and not isinstance(cond["filter"], str):
                raise RecipeError(f"{p}.filter", f"a filter must be a string, got {cond['filter']!r}", origin)
            _check_value(cond["value"], f"{p}.value", origin)
        return [{"filter": c.get("filter"), "value": c["value"]} for c in value]
    _check_value(value, path, origin)
    return value


def _parameters(node: Any, method: str, scope: str, path: str, origin: str) -> dict[str, Setting]:
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise RecipeError(path, "parameters must be a mapping", origin)
    known = {p.name: p for p in METHODS[method].params}
    out = {}
    for name, value in node.items():
        p = f"{path}.{name}"
        if name not in known:
            takes = f"; it takes {', '.join(known)}" if known else "; it takes none"
            raise RecipeError(p, f"{method} takes no parameter {name!r}{did_you_mean(str(name), tuple(known))}{takes}", origin)
        if scope == "source" and known[name].scope == "shared":
            raise RecipeError(p, f"{name!r} is shared by all inputs of a {method} merge; set it on the slice or at the top level, not per source", origin)
        out[name] = _setting(value, p, origin)
    return out


def _layer_range(value: Any, path: str, origin: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise RecipeError(path, f"must be [start, end] with two integers, got {value!r}", origin)
    start, end = value
    if start < 0:
        raise RecipeError(path, f"start {start} is negative", origin)
    if end < start:
        raise RecipeError(path, f"[{start}, {end}] is reversed (the range is half-open [start, end))", origin)
    return start, end


def _dtype(value: Any, path: str, origin: str) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in RECIPE_DTYPES:
        raise RecipeError(path, f"unknown dtype {value!r}{did_you_mean(name, tuple(RECIPE_DTYPES))}; one of {', '.join(RECIPE_DTYPES)}", origin)
    return name


def _method(value: Any, origin: str) -> str:
    if value is None:
        raise RecipeError("merge_method", "is required", origin)
    if not isinstance(value, str):  # a list or mapping here would crash the lookup below
        raise RecipeError("merge_method", f"must be a method name, got {value!r}", origin)
    if value not in METHODS:
        raise RecipeError("merge_method", f"unknown or unsupported merge method {value!r}{unknown_method_hint(value)}", origin)
    return value


def _optional_ref(node: dict, key: str, path: str, origin: str) -> str | None:
    return _model_ref(node[key], path, origin) if node.get(key) is not None else None


def _entries(raw: Any, path: str, origin: str) -> Iterator[tuple[str, dict]]:
    """Each mapping of the non-empty list at ``path`` with its key path, its keys checked. Lazily:
    an entry is checked only once the one before it is fully parsed, so the first error in the
    file is the one reported."""
    if not isinstance(raw, list) or not raw:
        raise RecipeError(path, "must be a non-empty list", origin)
    for i, node in enumerate(raw):
        yield f"{path}[{i}]", _check_keys(node, f"{path}[{i}]", origin)


def _source(src: dict, method: str, path: str, origin: str) -> Source:
    """One entry of a slice's ``sources:``."""
    if "model" not in src:
        raise RecipeError(f"{path}.model", "is required", origin)
    if "layer_range" not in src:
        raise RecipeError(f"{path}.layer_range", "is required", origin)
    return Source(
        _model_ref(src["model"], f"{path}.model", origin),
        _layer_range(src["layer_range"], f"{path}.layer_range", origin),
        _parameters(src.get("parameters"), method, "source", f"{path}.parameters", origin),
        path,
    )


def _slices(raw: Any, method: str, origin: str) -> tuple[Slice, ...]:
    out = []
    for sp, s in _entries(raw, "slices", origin):
        sources = tuple(_source(src, method, p, origin) for p, src in _entries(s.get("sources"), f"{sp}.sources", origin))
        sbase = _optional_ref(s, "base_model", f"{sp}.base_model", origin)
        out.append(Slice(sources, sbase, _parameters(s.get("parameters"), method, "slice", f"{sp}.parameters", origin), sp))
    return tuple(out)


def _models(raw: Any, method: str, origin: str) -> tuple[Source, ...]:
    ms = []
    for p, m in _entries(raw, "models", origin):
        if "model" not in m:
            raise RecipeError(f"{p}.model", "is required", origin)
        ms.append(Source(_model_ref(m["model"], f"{p}.model", origin), None, _parameters(m.get("parameters"), method, "source", f"{p}.parameters", origin), p))
    return tuple(ms)


def _check_base(method: str, base: str | None, slices: tuple[Slice, ...] | None, origin: str) -> None:
    """The method's base policy, for every slice (or the models: form) before any model is opened."""
    m = METHODS[method]
    for sl in slices if slices is not None else (None,):
        where = f" (or {sl.path}.base_model)" if sl is not None and base is None else ""
        problem = m.base_problem(m.slice_base(sl.base_model if sl else None, base), where)
        if problem:
            raise RecipeError("base_model", problem, origin)


def _random_seed(seed: Any, origin: str) -> int | None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise RecipeError("random_seed", f"must be an integer in [0, 2**63), got {seed!r}", origin)
    return seed


def _stage_name(name: Any, origin: str) -> str | None:
    if name is not None and (not isinstance(name, str) or not name or "/" in name or name.startswith(".")):
        raise RecipeError("name", f"a stage name must be a plain non-empty string without '/', got {name!r}", origin)
    return name


# keys of a mergekit-moe config, which has no merge_method: told apart before leniency would
# turn them into warnings and the error into "merge_method is required"
MOE_KEYS = ("gate_mode", "experts", "shared_experts", "experts_per_token")


def _refuse_moe_config(doc: Any, origin: str) -> None:
    found = [k for k in MOE_KEYS if isinstance(doc, dict) and "merge_method" not in doc and k in doc]
    if found:
        raise RecipeError(
            "",
            f"this is a mergekit-moe config ({', '.join(f'{k}:' for k in found)}), not a mergekit-yaml recipe; "
            "nyxray does not assemble mixture-of-experts models yet",
            origin,
        )


def parse_recipe(doc: Any, text: str, origin: str = "<recipe>") -> Recipe:
    """Validate one parsed YAML document; ``text`` is its source, kept for the model card.

    Keys mergekit ignores are set aside first; an error the recipe then has names them too, since
    a misspelt key (``merge_methd``) is the likely cause of a missing one."""
    _refuse_moe_config(doc, origin)
    doc, ignored = set_aside(doc)
    try:
        return _parse(doc, text, origin, ignored)
    except RecipeError as e:
        if not ignored:
            raise
        aside = "; ".join(i.message() for i in ignored)
        raise RecipeError(e.path, f"{e.detail} [{aside}]", origin) from None


def _parse(doc: Any, text: str, origin: str, ignored: tuple[Ignored, ...]) -> Recipe:
    """The checks run in the order of the helpers below: which error a recipe with several gets is
    part of the error corpus."""
    _check_keys(doc, "", origin)
    method = _method(doc.get("merge_method"), origin)
    has = [k for k in ("slices", "models") if doc.get(k) is not None]
    if len(has) != 1:
        raise RecipeError("", "exactly one of slices: and models: must be given", origin)
    base = _optional_ref(doc, "base_model", "base_model", origin)
    slices = _slices(doc["slices"], method, origin) if "slices" in has else None
    models = _models(doc["models"], method, origin) if slices is None else None
    _check_base(method, base, slices, origin)
    return Recipe(
        merge_method=method,
        slices=slices,
        models=models,
        base_model=base,
        tokenizer_source=doc.get("tokenizer_source"),
        tokenizer=tokenizer_spec(doc, origin, _check_keys, _model_ref),
        chat_template=chat_template(doc.get("chat_template"), origin),
        random_seed=_random_seed(doc.get("random_seed"), origin),
        name=_stage_name(doc.get("name"), origin),
        parameters=_parameters(doc.get("parameters"), method, "top", "parameters", origin),
        dtype=_dtype(doc.get("dtype"), "dtype", origin),
        out_dtype=_dtype(doc.get("out_dtype"), "out_dtype", origin),
        text=text,
        origin=origin,
        ignored=ignored,
    )


def _split_documents(text: str) -> list[str]:
    """The source text of each ``---``-separated YAML document (for mergekit_config.yml)."""
    docs, current = [], []
    for line in text.splitlines(keepends=True):
        if line.rstrip() == "---" or line.startswith("--- "):
            docs.append("".join(current))
            current = []
        else:
            current.append(line)
    docs.append("".join(current))
    return [d for d in docs if d.strip() and not all(line.strip().startswith("#") or not line.strip() for line in d.splitlines())]


# What loading hostile YAML can raise: PyYAML's errors, RecursionError (nesting deeper than its
# composer's stack) and its constructors' own slips on empty or odd tagged scalars ("!!int" alone).
YAML_FAILURES = (yaml.YAMLError, RecursionError, ValueError, IndexError, TypeError, OverflowError)


class _StrictLoader(yaml.SafeLoader):
    """The safe loader (no ``!!python/...`` tags), refusing repeated keys.

    PyYAML keeps the last of two equal keys without a word, so a second ``parameters:`` or
    ``merge_method:`` would silently replace the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor" merges are meant to be overridden by the keys beside them
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_pipeline(text: str, origin: str = "<recipe>") -> list[Recipe]:
    """Parse YAML text holding one recipe or a pipeline of ``---``-separated stages.

    Loaded with a safe loader: tags such as ``!!python/object`` are refused. In a pipeline every
    stage but at most one (the final output) has a unique ``name``.
    """
    try:
        docs = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except YAML_FAILURES as e:
        raise RecipeError("", f"not valid YAML: {type(e).__name__}: {' '.join(str(e).split())[:200]}", origin) from None
    if not docs:
        raise RecipeError("", "the recipe is empty", origin)
    texts = _split_documents(text)
    if len(texts) != len(docs):
        texts = [text] * len(docs)
    recipes = []
    for i, (doc, t) in enumerate(zip(docs, texts)):
        where = origin if len(docs) == 1 else f"{origin} document {i + 1}"
        recipes.append(parse_recipe(doc, t if len(docs) > 1 else text, where))
    if len(recipes) > 1:
        seen: dict[str, str] = {}
        unnamed = [r.origin for r in recipes if r.name is None]
        if len(unnamed) > 1:
            raise RecipeError("name", f"a pipeline has at most one unnamed (final) stage; unnamed: {', '.join(unnamed)}", origin)
        for r in recipes:
            if r.name is not None:
                if r.name in seen:
                    raise RecipeError("name", f"stage name {r.name!r} is used twice ({seen[r.name]} and {r.origin})", origin)
                seen[r.name] = r.origin
    return recipes


def load_pipeline(recipe: str | os.PathLike[str] | Recipe | list[Recipe]) -> list[Recipe]:
    """Accept a path, YAML text, a Recipe or a list of them (the public API's ``recipe`` argument)."""
    if isinstance(recipe, Recipe):
        return [recipe]
    if isinstance(recipe, list):
        return recipe
    text = os.fspath(recipe)
    if "\n" not in text and (text.endswith((".yml", ".yaml")) or os.path.exists(text)):
        try:
            with open(text, encoding="utf-8") as f:
                return parse_pipeline(f.read(), text)
        except OSError as e:
            raise RecipeError("", f"cannot read recipe file: {e.strerror}", text) from None
        except UnicodeDecodeError as e:
            raise RecipeError("", f"not a UTF-8 text file (byte {e.start})", text) from None
    return parse_pipeline(text)
