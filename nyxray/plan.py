"""Recipe + model headers -> the whole merge plan, before any tensor byte moves.

For each stage of a pipeline (a single recipe is a one-stage pipeline) the planner decides every
output tensor: its name, shape, dtype, the expression that computes it (with ``t`` resolved) and
where it goes in the output shards. Stages that use an earlier stage's output see that stage's
expressions, so the final model is computed straight from the sources (fusion). Every recipe and
model error is raised here, naming the recipe key path.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelError, NyxrayError, RecipeError, did_you_mean
from .graph import Expr, Leaf, Merge, cast, leaves, nbytes_of, promote, shape_of
from .methods.base import Method, Param
from .methods.registry import METHODS
from .models import Model, Resolver, load_model
from .parameters import filter_matches, resolve
from .recipe import RECIPE_DTYPES, Recipe, Slice, Source
from .safetensors_io import ShardEntry, build_header
from .write_order import write_order

SHARD_METADATA = {"format": "pt"}


def parse_size(value: str | int) -> int:
    """mergekit's ``--out-shard-size``: an integer with an optional decimal K/M/B suffix."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(-?\d+)\s*([kKmMbB]?)\s*", str(value))
    if not m:
        raise NyxrayError(f"--out-shard-size {value!r}: expected an integer with an optional K, M or B suffix (e.g. 5B)")
    return int(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[m.group(2).lower()]


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor."""

    name: str
    expr: Expr
    op: str  # "copy" (bytes as they are), "cast", or the merge method's name
    params: tuple[tuple[str, Any, str], ...] = ()  # (parameter, value, recipe key path that gave it)

    @property
    def dtype(self) -> str:
        return self.expr.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return shape_of(self.expr)

    def param(self, label: str) -> tuple[Any, str] | None:
        """(value, key path) of parameter ``label`` (``t``, ``weight[org/model]``), if it has one."""
        return next(((v, src) for name, v, src in self.params if name == label), None)

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


@dataclass
class ShardPlan:
    """One output shard: the unit of work."""

    name: str
    tensors: list[PlannedTensor]  # in write order (the index's weight_map order)
    header: bytes
    entries: list[ShardEntry]  # data layout in the file (safetensors order)

    @property
    def size(self) -> int:
        return self.entries[-1].end if self.entries else len(self.header)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def leaves(self) -> set[Leaf]:
        """The distinct source byte ranges this shard reads."""
        return {leaf for t in self.tensors for leaf in leaves(t.expr)}

    def in_file_order(self) -> list[PlannedTensor]:
        by_name = {t.name: t for t in self.tensors}
        return [by_name[e.name] for e in self.entries]


@dataclass
class StagePlan:
    """The plan of one recipe (one stage of a pipeline)."""

    recipe: Recipe
    tensors: list[PlannedTensor]
    shards: list[ShardPlan]
    config: dict
    donor: Model
    tokenizer_from: Model
    staged_read_bytes: int  # what this stage would read if run on its own inputs
    random_seed: int = 0  # seeds the draws of random methods (reported in the run report and card)
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str | None:
        return self.recipe.name

    @property
    def bytes_written(self) -> int:
        return sum(s.size for s in self.shards)

    def as_model(self) -> Model:
        """This stage's output as an input model of a later stage (expressions, no files)."""
        return Model(
            ref=self.recipe.name or "<final>",
            config=self.config,
            arch=self.donor.arch,
            tensors={t.name: t.expr for t in self.tensors},
            extra_files=self.tokenizer_from.extra_files,
            files_loc=self.tokenizer_from.files_loc,
        )


@dataclass
class Plan:
    """A whole run: every stage, the final one last, and the source models read."""

    stages: list[StagePlan]
    sources: dict[str, Model]
    out_shard_size: int
    warnings: list[str] = field(default_factory=list)

    @property
    def final(self) -> StagePlan:
        return self.stages[-1]

    def shards_to_write(self, intermediates: bool) -> list[tuple[StagePlan, ShardPlan]]:
        stages = self.stages if intermediates else [self.final]
        return [(st, sh) for st in stages for sh in st.shards]

    def bytes_read_min(self, intermediates: bool = False) -> int:
        """Source bytes the plan needs: each distinct byte of every needed source range, once."""
        spans: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for _, shard in self.shards_to_write(intermediates):
            for leaf in shard.leaves:
                spans.setdefault((leaf.loc.display, leaf.file), []).append((leaf.start, leaf.end))
        total = 0
        for ranges in spans.values():
            end = -1
            for a, b in sorted(ranges):
                if b > end:
                    total += b - max(a, end)
                    end = b
        return total

    def read_bytes_by_source(self) -> dict[str, int]:
        out: dict[str, int] = {}
        seen = set()
        for shard in self.final.shards:
            for leaf in shard.leaves:
                if leaf.key not in seen:
                    seen.add(leaf.key)
                    out[leaf.model] = out.get(leaf.model, 0) + leaf.end - leaf.start
        return out

    @property
    def header_bytes(self) -> int:
        return sum(m.header_bytes for m in self.sources.values())


# -- planning one stage ---------------------------------------------------------------------------


def _normalise_slices(recipe: Recipe, models: dict[str, Model]) -> tuple[Slice, ...]:
    if recipe.slices is not None:
        return recipe.slices
    assert recipe.models is not None
    sources = [Source(m.model, (0, models[m.model].num_layers), m.parameters, m.path) for m in recipe.models]
    if recipe.base_model and recipe.base_model not in [s.model for s in sources]:
        sources.append(Source(recipe.base_model, (0, models[recipe.base_model].num_layers), {}, "base_model"))
    return (Slice(tuple(sources), None, {}, "models"),)


def _slice_base(recipe: Recipe, method: Method, sl: Slice) -> str | None:
    """The base model of a slice as the method sees it (a slice's own base_model wins)."""
    return None if method.base == "ignored" else (sl.base_model or recipe.base_model)


def _count_problem(method: Method, n: int, has_base: bool) -> str | None:
    """Why ``n`` inputs (with or without the base among them) do not fit the method, or None."""
    checks = [("sources", n, method.min_inputs, method.max_inputs)]
    if method.min_non_base is not None or method.max_non_base is not None:
        checks.append(("sources besides the base", n - has_base, method.min_non_base or 0, method.max_non_base))
    for what, count, low, high in checks:
        if count < low or (high is not None and count > high):
            want = f"exactly {_count(low, what)}" if low == high else (f"at least {_count(low, what)}" if high is None else f"{low} to {high} {what}")
            return f"{method.name} takes {want} per slice, got {count}"
    return None


def _count(n: int, what: str) -> str:
    """``two sources``, ``one source``: counts in error messages as people write them."""
    word = {1: "one", 2: "two", 3: "three"}.get(n, str(n))
    return f"{word} {what.replace('sources', 'source', 1) if n == 1 else what}"


def _check_slices(recipe: Recipe, method: Method, slices: tuple[Slice, ...], models: dict[str, Model]) -> None:
    """Every structural rule of the recipe against the models and the method, naming key paths."""
    o = recipe.origin
    for sl in slices:
        lengths = set()
        for src in sl.sources:
            start, end = src.layer_range  # type: ignore[misc]
            n = models[src.model].num_layers
            if end > n:
                raise RecipeError(
                    f"{src.path}.layer_range", f"[{start}, {end}] is beyond model {src.model!r}, which has {n} layers (0..{n - 1}; the range is half-open)", o
                )
            lengths.add(end - start)
        if len(lengths) > 1:
            raise RecipeError(f"{sl.path}.sources", f"all sources of a slice must have the same number of layers, got {sorted(lengths)}", o)
        names = [s.model for s in sl.sources]
        twice = sorted({m for m in names if names.count(m) > 1})
        if twice and method.name != "passthrough":
            raise RecipeError(f"{sl.path}.sources", f"model {twice[0]!r} appears twice among the inputs of one {method.name} merge", o)
        base = _slice_base(recipe, method, sl)
        if method.base == "required" and base is None:
            raise RecipeError("base_model", f"{method.name} needs a base_model (top level or {sl.path}.base_model)", o)
        if base is not None and base not in names:
            raise RecipeError(f"{sl.path}.sources", f"the base model {base!r} must be one of the slice's sources", o)
        if method.base == "forbidden" and base is not None:
            raise RecipeError("base_model", f"{method.name} takes no base_model", o)
        problem = _count_problem(method, len(names), base is not None)
        if problem:
            raise RecipeError(f"{sl.path}.sources", problem, o)


@dataclass(frozen=True)
class _Want:
    """An output tensor to build: its name, its position in its slice (0..1, what layer gradients
    are evaluated at), and each source's input tensor name."""

    out: str
    pos: float
    inputs: tuple[tuple[Source, str], ...]
    slice: Slice


def _wanted(recipe: Recipe, slices: tuple[Slice, ...], models: dict[str, Model]) -> list[_Want]:
    arch = models[slices[0].sources[0].model].arch
    wants = [_Want(n, 0.0, tuple((s, n) for s in slices[0].sources), slices[0]) for n in arch.pre]
    out_layer = 0
    for sl in slices:
        start0, end0 = sl.sources[0].layer_range  # type: ignore[misc]
        length = end0 - start0
        for i in range(length):
            pos = i / (length - 1) if length > 1 else 1.0
            for suffix in arch.layer:
                ins = tuple((s, arch.layer_name(s.layer_range[0] + i, suffix)) for s in sl.sources)  # type: ignore[index]
                wants.append(_Want(arch.layer_name(out_layer + i, suffix), pos, ins, sl))
        out_layer += length
    wants += [_Want(n, 0.0, tuple((s, n) for s in slices[-1].sources), slices[-1]) for n in arch.post]
    return wants


def _stage_dtype(name: str | None) -> str | None:
    return RECIPE_DTYPES[name] if name else None


def _truncate_rows(e: Expr, rows: int) -> Expr:
    """The first ``rows`` rows of a 2-D tensor: a prefix of its bytes, so reads shrink too."""
    if isinstance(e, Leaf):
        row_bytes = (e.end - e.start) // e.shape[0]
        return Leaf(e.loc, e.file, e.start, e.start + rows * row_bytes, e.dtype, (rows,) + e.shape[1:], e.model, e.name)
    if not isinstance(e, Merge):
        return cast(_truncate_rows(e.child, rows), e.dtype)
    raise ModelError("vocabulary truncation of a tensor computed by an earlier merge stage is not supported")


def tensor_seed(random_seed: int, name: str) -> int:
    """The seed of one output tensor's generator: the same whoever computes it, in whatever order."""
    digest = hashlib.sha256(f"nyxray-seed/1\0{random_seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class _Stage:
    """What planning one tensor of a stage needs to know."""

    recipe: Recipe
    method: Method
    models: dict[str, Model]
    dtype: str | None
    out_dtype: str | None
    unsafe_truncate_embeddings: bool
    random_seed: int
    warnings: list[str]


_Input = tuple[Source, str, Expr]  # a source, its tensor's name there, the tensor


def _same_shape(st: _Stage, w: _Want, have: list[_Input]) -> list[Expr]:
    """The inputs, all of one shape: embeddings may be cut to their common rows if the user says so."""
    exprs = [e for _, _, e in have]
    shapes = [shape_of(e) for e in exprs]
    if len(set(shapes)) == 1:
        return exprs
    listed = ", ".join(f"{list(sh)} in {src.model!r}" for (src, _, _), sh in zip(have, shapes))
    embeds = w.out in st.models[have[0][0].model].arch.embeds
    if embeds and st.unsafe_truncate_embeddings and len({sh[1:] for sh in shapes}) == 1:
        rows = min(sh[0] for sh in shapes)
        st.warnings.append(f"UNSAFE vocabulary truncation of {w.out} to {rows} rows ({listed})")
        return [_truncate_rows(e, rows) for e in exprs]
    hint = " (vocabulary sizes differ: --unsafe-truncate-embeddings keeps the common rows)" if embeds else ""
    if embeds and st.recipe.tokenizer_source:
        hint += f"; tokenizer_source: {st.recipe.tokenizer_source} needs models that share one vocabulary (nyxray builds no merged vocabulary)"
    raise ModelError(f"{st.recipe.origin}: tensor size mismatch for {w.out}: {listed}{hint}")


def _present(st: _Stage, w: _Want) -> tuple[list[_Input], bool] | None:
    """The inputs of ``w`` that exist, and whether the one left is copied as it is (the method's
    policy for an optional tensor only one model has); None when the tensor is skipped (optional
    and absent everywhere, or too few inputs for a method whose policy is to skip); raises when
    one is missing for good."""
    present = [(src, name, st.models[src.model].tensors.get(name)) for src, name in w.inputs]
    have = [(src, name, e) for src, name, e in present if e is not None]
    if len(have) == len(present):
        return have, False
    arch = st.models[w.inputs[0][0].model].arch
    optional = w.out in arch.optional or any(w.out.endswith("." + s) for s in arch.optional)
    src, name, _ = next(p for p in present if p[2] is None)
    missing = f"tensor {name!r} required but not present in model {src.model!r}"
    if not optional:
        raise ModelError(f"{st.recipe.origin}: {missing}{did_you_mean(name, tuple(st.models[src.model].tensors))}")
    if not have:
        return None
    m = st.method
    base = _slice_base(st.recipe, m, w.slice)
    only_base = len(have) == 1 and have[0][0].model == base
    if m.optional_policy == "base_or_skip" and len(have) < m.min_inputs and not only_base:
        st.warnings.append(f"{st.recipe.origin}: optional tensor {w.out} skipped: {m.name} needs {m.min_inputs} inputs, {len(have)} have it")
        return None
    copied = len(have) == 1 and (m.optional_policy == "passthrough_singleton" or (only_base and m.optional_policy != "error"))
    if not copied and _count_problem(m, len(have), any(h[0].model == base for h in have)):
        raise ModelError(f"{st.recipe.origin}: {missing}, and {m.name} cannot merge {w.out} without it")
    return have, copied


def _resolve_all(st: _Stage, w: _Want, have: list[_Input], base: int | None) -> tuple[dict, dict, list]:
    """Every parameter of the method for this tensor: shared values, per-input values, and the
    (label, value, key path) rows that ``nyxray plan`` shows."""
    recipe = st.recipe
    top = ("parameters", recipe.parameters)
    shared_levels = [(f"{w.slice.path}.parameters", w.slice.parameters), top] if recipe.slices is not None else [top]
    shared: dict[str, Any] = {}
    per_input: dict[str, list[Any]] = {}
    shown: list[tuple[str, Any, str]] = []
    for p in st.method.params:
        if p.scope == "shared":
            value, where = _one(st, p, shared_levels, w.out, w.pos, "parameters", w.out)
            shared[p.name] = value
            shown.append((p.name, value, where))
            continue
        values = []
        for i, (src, name, _) in enumerate(have):
            if p.scope == "non_base" and i == base:
                continue
            levels = [(f"{src.path}.parameters", src.parameters), *shared_levels]
            value, where = _one(st, p, levels, name, w.pos, f"{src.path}.parameters", f"{name} of {src.model!r}")
            values.append(value)
            shown.append((f"{p.name}[{src.model}]", value, where))
        per_input[p.name] = values
    _check_weight_sum(st, shared, per_input, shown, w.out)
    _check_input_rule(st, per_input, have, base, w.out)
    return shared, per_input, shown


def _check_input_rule(st: _Stage, per_input: dict[str, list[Any]], have: list[_Input], base: int | None, out: str) -> None:
    """The method's rule across one input's values (DELLA's density +/- epsilon window)."""
    rule = st.method.input_rule
    if rule is None:
        return
    others = [src for i, (src, _, _) in enumerate(have) if i != base]
    for j, src in enumerate(others):
        problem = rule({k: v[j] for k, v in per_input.items()})
        if problem:
            raise RecipeError(f"{src.path}.parameters", f"{problem} (for {out} of {src.model!r})", st.recipe.origin)


def _one(st: _Stage, p: Param, levels: list, tensor_name: str, pos: float, where: str, what: str) -> tuple[Any, str]:
    """One parameter value (resolved, else the default) checked against its declaration, and the
    key path it came from."""
    r = resolve(p.name, levels, tensor_name, pos, p.kind)
    if r is None:
        if p.required:
            hint = (
                "; the base_model is merged as one more input here: list it under models: with its own parameters" if where == "base_model.parameters" else ""
            )
            raise RecipeError(
                f"{where}.{p.name}",
                f"missing required parameter {p.name} for {what} ({st.method.name}: no setting, and no filter matches it){hint}",
                st.recipe.origin,
            )
        return p.default, "default"
    problem = p.problem(r.value)
    if problem:
        raise RecipeError(r.source, f"{problem} (for {what})", st.recipe.origin)
    return r.value, r.source


def _check_weight_sum(st: _Stage, shared: dict, per_input: dict, shown: list, out: str) -> None:
    """A normalised merge divides by the sum of the weights: a sum of 0 has no meaning. (With a
    sign consensus, TIES-like methods divide by a per-element sum instead: no such rule there.)"""
    normalize = shared.get("normalize", shared.get("normalize_weights", False))
    if not normalize or "weight" not in per_input or dict(st.method.options).get("consensus"):
        return
    if abs(sum(per_input["weight"])) < 1e-8:
        paths = sorted({where for label, _, where in shown if label.startswith("weight[")})
        raise RecipeError(
            paths[0] if paths else "parameters.weight",
            f"the weights of {out} sum to 0 and {st.method.name} normalizes by their sum ({', '.join(paths)}); change a weight or set normalize: false",
            st.recipe.origin,
        )


def _plan_tensor(st: _Stage, w: _Want, have: list[_Input], copied: bool) -> PlannedTensor:
    m = st.method
    base_ref = _slice_base(st.recipe, m, w.slice)
    models_in = [src.model for src, _, _ in have]
    base = models_in.index(base_ref) if base_ref in models_in else None
    # An input copied alone (an optional tensor only one model has) takes no parameters.
    shared, per_input, shown = ({}, {}, []) if copied else _resolve_all(st, w, have, base)
    exprs = [cast(e, st.dtype) for e in _same_shape(st, w, have)]
    if copied or (m.name == "passthrough" and per_input["scale"][0] is None):
        expr = cast(exprs[0], st.out_dtype)  # the source bytes as they are, or a cast
        return PlannedTensor(w.out, expr, "copy" if expr is have[0][2] else "cast")
    try:
        dtype = promote([e.dtype for e in exprs])
    except ValueError as err:
        raise ModelError(f"{st.recipe.origin}: {w.out}: {err}; set dtype: in the recipe") from None
    seed = tensor_seed(st.random_seed, w.out) if m.random else None
    result = promote([dtype, "F32"]) if m.float32_result else dtype
    node = Merge(m.name, tuple(cast(e, dtype) for e in exprs), base, tuple(shared.items()), tuple((k, tuple(v)) for k, v in per_input.items()), seed, result)
    return PlannedTensor(w.out, cast(node, st.out_dtype), m.name, tuple(shown))


def plan_stage(
    recipe: Recipe,
    models: dict[str, Model],
    out_shard_size: int,
    allow_crimes: bool = False,
    unsafe_truncate_embeddings: bool = False,
    random_seed: int | None = None,
) -> StagePlan:
    """Plan one recipe whose model references are all keys of ``models``.

    ``random_seed`` (else the recipe's ``random_seed``, else 0) seeds random methods' draws.
    """
    o = recipe.origin
    archs = {models[r].arch.name for r in recipe.model_refs()}
    if len(archs) > 1 and not allow_crimes:
        raise ModelError(f"{o}: the models have different architectures ({', '.join(sorted(archs))}); pass --allow-crimes to merge them anyway")
    method = METHODS[recipe.merge_method]
    slices = _normalise_slices(recipe, models)
    _check_slices(recipe, method, slices, models)
    seed = random_seed if random_seed is not None else (recipe.random_seed or 0)
    st = _Stage(recipe, method, models, _stage_dtype(recipe.dtype), _stage_dtype(recipe.out_dtype), unsafe_truncate_embeddings, seed, [])
    tensors: list[PlannedTensor] = []
    order_inputs: list[list[tuple[str, str]]] = []  # per output, (model, input name): fixes write order
    staged_read = 0
    for w in _wanted(recipe, slices, models):
        found = _present(st, w)
        if found is None:
            continue
        have, copied = found
        tensors.append(_plan_tensor(st, w, have, copied))
        order_inputs.append([(src.model, name) for src, name, _ in have])
        staged_read += sum(nbytes_of(e.dtype, shape_of(e)) for _, _, e in have)
    _warn_unmatched_filters(recipe, slices, [t.name for t in tensors], st.warnings)
    tensors = [tensors[i] for i in write_order(order_inputs)]
    donor_ref = recipe.base_model or slices[0].sources[0].model
    donor = models[donor_ref]
    tok_ref = recipe.base_model if recipe.tokenizer_source == "base" else (recipe.tokenizer_source or donor_ref)
    config = copy.deepcopy(donor.config)
    config[donor.arch.layers_key] = sum(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0] for sl in slices)  # type: ignore[index]
    if recipe.out_dtype or recipe.dtype:
        key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
        config[key] = recipe.out_dtype or recipe.dtype
    return StagePlan(recipe, tensors, layout_shards(tensors, out_shard_size), config, donor, models[tok_ref], staged_read, seed, st.warnings)


def _warn_unmatched_filters(recipe: Recipe, slices: tuple[Slice, ...], names: list[str], warnings: list[str]) -> None:
    levels = [("parameters", recipe.parameters)] + [(f"{s.path}.parameters", s.parameters) for s in slices]
    for path, params in levels:
        for pname, setting in params.items():
            if isinstance(setting, list) and setting and isinstance(setting[0], dict):
                for i, cond in enumerate(setting):
                    flt = cond["filter"]
                    if flt is not None and not any(filter_matches(flt, n) for n in names):
                        warnings.append(
                            f"{recipe.origin}: {path}.{pname}[{i}]: filter {flt!r} matches no tensor (a plain substring of tensor names); those tensors get a later rule"
                        )


def layout_shards(tensors: list[PlannedTensor], out_shard_size: int) -> list[ShardPlan]:
    """Greedy fill in write order; one shard -> ``model.safetensors``, else ``model-0000k-of-0000n``."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and out_shard_size > 0 and size + t.nbytes > out_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    shards = []
    for k, group in enumerate(groups, start=1):
        name = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        header, entries = build_header([(t.name, t.dtype, t.shape) for t in group], SHARD_METADATA)
        shards.append(ShardPlan(name, group, header, entries))
    return shards


# -- planning a pipeline --------------------------------------------------------------------------


def _stage_order(recipes: list[Recipe]) -> list[Recipe]:
    names = {r.name: r for r in recipes if r.name}
    deps = {id(r): [names[m] for m in r.model_refs() if m in names and names[m] is not r] for r in recipes}
    order: list[Recipe] = []
    state: dict[int, int] = {}

    def visit(r: Recipe, trail: list[str]) -> None:
        if state.get(id(r)) == 2:
            return
        if state.get(id(r)) == 1:
            raise RecipeError("", f"the pipeline has a cycle: {' -> '.join(trail + [r.name or '<final>'])}", r.origin)
        state[id(r)] = 1
        for d in deps[id(r)]:
            visit(d, trail + [r.name or "<final>"])
        state[id(r)] = 2
        order.append(r)

    final = [r for r in recipes if r.name is None] or [recipes[-1]]
    for r in final + recipes:
        visit(r, [])
    # the output is the unnamed stage, else the last document
    order.remove(final[0])
    return order + [final[0]]


def plan(
    recipes: list[Recipe],
    resolver: Resolver | None = None,
    out_shard_size: int | str = "5B",
    allow_crimes: bool = False,
    unsafe_truncate_embeddings: bool = False,
    model_cache: dict[str, Model] | None = None,
    random_seed: int | None = None,
) -> Plan:
    """Plan a recipe or pipeline: read every source model's headers, then plan each stage.

    ``model_cache`` (reference -> Model) lets several plans (a sweep's members) share header reads.
    """
    resolver = resolver or Resolver()
    cache = model_cache if model_cache is not None else {}
    size = parse_size(out_shard_size)
    stage_names = [r.name for r in recipes if r.name]
    ordered = _stage_order(recipes)
    sources: dict[str, Model] = {}
    stage_models: dict[str, Model] = {}
    stages: list[StagePlan] = []
    for recipe in ordered:
        models: dict[str, Model] = {}
        for ref, path in _ref_paths(recipe):
            if ref in stage_models:
                models[ref] = stage_models[ref]
                continue
            if ref in stage_names:
                raise RecipeError(path, f"stage {ref!r} is used before it is defined", recipe.origin)
            if ref not in sources:
                try:
                    if ref not in cache:
                        cache[ref] = load_model(ref, resolver.locate(ref))
                    sources[ref] = cache[ref]
                except NyxrayError as e:
                    hint = did_you_mean(ref, stage_names) if stage_names else ""
                    if hint:
                        raise RecipeError(
                            path,
                            f"model {ref!r} is neither a stage of this pipeline nor a model that can be found{hint}; stages: {', '.join(stage_names)}",
                            recipe.origin,
                        ) from None
                    raise RecipeError(path, str(e), recipe.origin) from None
            models[ref] = sources[ref]
        st = plan_stage(recipe, models, size, allow_crimes, unsafe_truncate_embeddings, random_seed)
        stages.append(st)
        if recipe.name:
            stage_models[recipe.name] = st.as_model()
    warnings = [w for st in stages for w in st.warnings]
    return Plan(stages, sources, size, warnings)


def _ref_paths(recipe: Recipe) -> list[tuple[str, str]]:
    """(model reference, recipe key path) for every reference, first occurrence each."""
    out: dict[str, str] = {}
    for i, sl in enumerate(recipe.slices or ()):
        for src in sl.sources:
            out.setdefault(src.model, f"{src.path}.model")
        if sl.base_model:
            out.setdefault(sl.base_model, f"slices[{i}].base_model")
    for m in recipe.models or ():
        out.setdefault(m.model, f"{m.path}.model")
    if recipe.base_model:
        out.setdefault(recipe.base_model, "base_model")
    if recipe.tokenizer_source and recipe.tokenizer_source != "base":
        out.setdefault(recipe.tokenizer_source, "tokenizer_source")
    return list(out.items())
