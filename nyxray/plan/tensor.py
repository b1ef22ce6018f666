"""One output tensor of a merge method, planned from headers: which inputs exist, every parameter
resolved for it (scopes, filters, gradients, defaults, ranges, the method's own rules), the
expression that computes it. :mod:`nyxray.plan.stages` walks a recipe's tensors and calls this for each;
every recipe error found here names its key path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ..errors import ModelError, RecipeError, did_you_mean
from ..methods.base import Method, Param
from ..recipe.parameters import resolve
from ..recipe.parse import Recipe, Slice, Source
from .expr import Cast, Expr, Leaf, Merge, Rows, cast, nbytes_of, promote, shape_of
from .sources import Model
from .vocab import Vocabulary, row_table


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


def check_slices(recipe: Recipe, method: Method, slices: tuple[Slice, ...], models: dict[str, Model]) -> None:
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
        # A one-input method's count error below says more than "appears twice" would.
        if twice and method.max_inputs != 1:
            raise RecipeError(f"{sl.path}.sources", f"model {twice[0]!r} appears twice among the inputs of one {method.name} merge", o)
        # The method's base policy was checked when the recipe was parsed (Method.base_problem).
        base = method.slice_base(sl.base_model, recipe.base_model)
        if base is not None and base not in names:
            raise RecipeError(f"{sl.path}.sources", f"the base model {base!r} must be one of the slice's sources", o)
        problem = _count_problem(method, len(names), base is not None)
        if problem:
            raise RecipeError(f"{sl.path}.sources", problem, o)


@dataclass(frozen=True)
class Want:
    """An output tensor to build: its name, its position in its slice (0..1, what layer gradients
    are evaluated at), and each source's input tensor name."""

    out: str
    pos: float
    inputs: tuple[tuple[Source, str], ...]
    slice: Slice
    optional: bool = False  # the architecture lets a model lack it (a tied head, a bias)


def _truncate_rows(e: Expr, rows: int) -> Expr:
    """The first ``rows`` rows of a 2-D tensor: a prefix of its bytes, so reads shrink too."""
    if isinstance(e, Leaf):
        row_bytes = (e.end - e.start) // e.shape[0]
        return Leaf(e.loc, e.file, e.start, e.start + rows * row_bytes, e.dtype, (rows,) + e.shape[1:], e.model, e.name)
    if isinstance(e, Cast):
        return cast(_truncate_rows(e.child, rows), e.dtype)
    raise ModelError("vocabulary truncation of a computed tensor (an earlier merge stage's, or one a LoRA adapter changes) is not supported")


def tensor_seed(random_seed: int, name: str) -> int:
    """The seed of one output tensor's generator: the same whoever computes it, in whatever order."""
    digest = hashlib.sha256(f"nyxray-seed/1\0{random_seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class StageContext:
    """What planning one tensor of a stage needs to know."""

    recipe: Recipe
    method: Method
    models: dict[str, Model]
    dtype: str | None
    out_dtype: str | None
    unsafe_truncate_embeddings: bool
    random_seed: int
    warnings: list[str]
    vocab: Vocabulary | None = None  # the output vocabulary, when the recipe rebuilds it


_Input = tuple[Source, str, Expr]  # a source, its tensor's name there, the tensor


def _same_shape(st: StageContext, w: Want, have: list[_Input]) -> list[Expr]:
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
    if embeds and not (st.vocab and st.vocab.spec):
        hint += "; tokenizer_source: union (or a tokenizer: block) aligns the vocabularies"
    raise ModelError(f"{st.recipe.origin}: tensor size mismatch for {w.out}: {listed}{hint}")


def _twin(model: Model, name: str) -> Expr | None:
    found = model.twin(name)
    return found[1] if found else None


def present_inputs(st: StageContext, w: Want) -> tuple[list[_Input], bool] | None:
    """The inputs of ``w`` that exist, and whether the one left is copied as it is (the method's
    policy for an optional tensor only one model has); None when the tensor is skipped (optional
    and absent everywhere, or too few inputs for a method whose policy is to skip); raises when
    one is missing for good."""
    present = [(src, name, st.models[src.model].tensors.get(name)) for src, name in w.inputs]
    if any(e is not None for _, _, e in present):  # as mergekit, a model that ties this tensor gives its twin
        present = [(src, name, e if e is not None else _twin(st.models[src.model], name)) for src, name, e in present]
    have = [(src, name, e) for src, name, e in present if e is not None]
    if len(have) == len(present):
        return have, False
    src, name, _ = next(p for p in present if p[2] is None)
    missing = f"tensor {name!r} required but not present in model {src.model!r}"
    if not w.optional:
        raise ModelError(f"{st.recipe.origin}: {missing}{did_you_mean(name, tuple(st.models[src.model].tensors))}")
    if not have:
        return None
    m = st.method
    base = m.slice_base(w.slice.base_model, st.recipe.base_model)
    only_base = len(have) == 1 and have[0][0].model == base
    if m.optional_policy == "base_or_skip" and len(have) < m.min_inputs and not only_base:
        st.warnings.append(f"{st.recipe.origin}: optional tensor {w.out} skipped: {m.name} needs {m.min_inputs} inputs, {len(have)} have it")
        return None
    copied = len(have) == 1 and (m.optional_policy == "passthrough_singleton" or (only_base and m.optional_policy != "error"))
    if not copied and _count_problem(m, len(have), any(h[0].model == base for h in have)):
        raise ModelError(f"{st.recipe.origin}: {missing}, and {m.name} cannot merge {w.out} without it")
    return have, copied


def _resolve_all(st: StageContext, w: Want, have: list[_Input], base: int | None) -> tuple[dict, dict, list]:
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


def _check_input_rule(st: StageContext, per_input: dict[str, list[Any]], have: list[_Input], base: int | None, out: str) -> None:
    """The method's rule across one input's values (DELLA's density +/- epsilon window)."""
    rule = st.method.input_rule
    if rule is None:
        return
    others = [src for i, (src, _, _) in enumerate(have) if i != base]
    for j, src in enumerate(others):
        problem = rule({k: v[j] for k, v in per_input.items()})
        if problem:
            raise RecipeError(f"{src.path}.parameters", f"{problem} (for {out} of {src.model!r})", st.recipe.origin)


def _one(st: StageContext, p: Param, levels: list, tensor_name: str, pos: float, where: str, what: str) -> tuple[Any, str]:
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


def _check_weight_sum(st: StageContext, shared: dict, per_input: dict, shown: list, out: str) -> None:
    """A normalised merge divides by the sum of the weights: a sum of 0 has no meaning."""
    flag, weight = st.method.divides_by_weight_sum, st.method.weight_param
    if flag is None or not shared.get(flag):
        return
    if abs(sum(per_input[weight])) < 1e-8:
        paths = sorted({where for label, _, where in shown if label.startswith(f"{weight}[")})
        raise RecipeError(
            paths[0] if paths else f"parameters.{weight}",
            f"the weights of {out} sum to 0 and {st.method.name} normalizes by their sum ({', '.join(paths)}); change a weight or set {flag}: false",
            st.recipe.origin,
        )


def _rebuilt_rows(st: StageContext, w: Want, have: list[_Input]) -> bool:
    """Whether ``w`` is indexed by a vocabulary the recipe rebuilds."""
    return st.vocab is not None and st.vocab.spec is not None and w.out in st.models[have[0][0].model].arch.embeds


def _vocab_rows(st: StageContext, w: Want, have: list[_Input]) -> list[Expr]:
    """Each input in the output vocabulary (mergekit permutes them in their common dtype)."""
    assert st.vocab is not None
    exprs = [cast(e, st.dtype) for _, _, e in have]
    shapes = {shape_of(e)[1:] for e in exprs}
    if len(shapes) > 1:
        raise ModelError(f"{st.recipe.origin}: {w.out}: the inputs differ beyond the vocabulary axis: {sorted(shapes)}")
    try:
        dtype = promote([e.dtype for e in exprs])
    except ValueError as err:
        raise ModelError(f"{st.recipe.origin}: {w.out}: {err}; set dtype: in the recipe") from None
    group = tuple(cast(e, dtype) for e in exprs)
    refs = [src.model for src, _, _ in have]
    table = row_table(st.vocab, refs, w.slice.base_model or st.recipe.base_model, [shape_of(e)[0] for e in group], f"{st.recipe.origin}: {w.out}")
    return [Rows(group, k, table) for k in range(len(group))]


def plan_tensor(st: StageContext, w: Want, have: list[_Input], copied: bool) -> PlannedTensor:
    m = st.method
    base_ref = m.slice_base(w.slice.base_model, st.recipe.base_model)
    models_in = [src.model for src, _, _ in have]
    base = models_in.index(base_ref) if base_ref in models_in else None
    # An input copied alone (an optional tensor only one model has) takes no parameters.
    shared, per_input, shown = ({}, {}, []) if copied else _resolve_all(st, w, have, base)
    exprs = _vocab_rows(st, w, have) if _rebuilt_rows(st, w, have) else [cast(e, st.dtype) for e in _same_shape(st, w, have)]
    if copied or (m.copies_unless is not None and per_input[m.copies_unless] == [None]):
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
