"""Recipe + model headers -> the whole merge plan, before any tensor byte moves.

For each stage of a pipeline (a single recipe is a one-stage pipeline) the planner decides every
output tensor (one at a time in :mod:`nyxray.plan.tensor`: its inputs, its method's parameters
resolved, its expression) and where it goes in the output shards. Stages that use an earlier
stage's output see that stage's expressions, so the final model is computed straight from the
sources (fusion). Every recipe and model error is raised here, naming the recipe key path.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import NyxrayError, RecipeError, did_you_mean
from ..io.safetensors import ShardEntry, build_header
from ..methods.registry import METHODS
from ..recipe.lenient import refuse
from ..recipe.parameters import filter_matches
from ..recipe.parse import RECIPE_DTYPES, Recipe, Slice, split_reference
from .architectures import stage_architecture
from .expr import Leaf, leaves, nbytes_of, shape_of, signature
from .lora import load_reference, lora_merge_dtype
from .modules import module_slices, set_layer_counts, wanted
from .sources import Model, Resolver
from .tensor import PlannedTensor, StageContext, check_slices, plan_tensor, present_inputs
from .vocab import plan_vocabulary
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
    tokenizer_files: dict[str, bytes] | None = None  # a tokenizer built for this stage (else tokenizer_from's files are copied)

    @property
    def name(self) -> str | None:
        return self.recipe.name

    @property
    def bytes_written(self) -> int:
        return sum(s.size for s in self.shards)

    def content(self) -> Iterator[bytes]:
        """What this stage writes, as bytes to fingerprint: shard names and headers, every tensor's expression."""
        for shard in self.shards:
            yield shard.name.encode() + shard.header
            for t in shard.tensors:
                yield f"{t.name}={signature(t.expr)}\n".encode()

    def as_model(self) -> Model:
        """This stage's output as an input model of a later stage (expressions, no files)."""
        return Model(
            ref=self.recipe.name or "<final>",
            config=self.config,
            arch=self.donor.arch,
            tensors={t.name: t.expr for t in self.tensors},
            extra_files=self.tokenizer_from.extra_files,
            files_loc=self.tokenizer_from.files_loc,
            tokenizer_files=self.tokenizer_files,
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


def _stage_dtype(name: str | None) -> str | None:
    return RECIPE_DTYPES[name] if name else None


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
    method = METHODS[recipe.merge_method]
    donor_ref = recipe.base_model or (recipe.slices[0].sources[0].model if recipe.slices else recipe.models[0].model)  # type: ignore[index]
    refs = list(dict.fromkeys([donor_ref, *recipe.model_refs()]))
    arch = stage_architecture([(models[r].arch, models[r].config, models[r].tensors) for r in refs], 0, allow_crimes, recipe.origin)
    plans = module_slices(recipe, arch, models)
    check_slices(recipe, method, plans[0].slices, models)
    seed = random_seed if random_seed is not None else (recipe.random_seed or 0)
    ignored = [f"{recipe.origin}: {i.message()}" for i in recipe.ignored]
    vocab = plan_vocabulary(recipe, models, donor_ref)
    st = StageContext(recipe, method, models, _stage_dtype(recipe.dtype), _stage_dtype(recipe.out_dtype), unsafe_truncate_embeddings, seed, ignored, vocab)
    donor = models[donor_ref]
    config = copy.deepcopy(donor.config)
    tensors: list[PlannedTensor] = []
    order_inputs: list[list[tuple[str, str, str]]] = []  # per output, (model, input name, label): fixes write order
    staged_read = 0
    for w in wanted(plans, config, models):
        found = present_inputs(st, w)
        if found is None:
            continue
        have, copied = found
        tensors.append(plan_tensor(st, w, have, copied))
        order_inputs.append([(src.model, name, models[src.model].label(name)) for src, name, _ in have])
        staged_read += sum(nbytes_of(e.dtype, shape_of(e)) for _, _, e in have)
    _warn_unmatched_filters(recipe, tuple(sl for p in plans for sl in p.slices), [t.name for t in tensors], st.warnings)
    tensors = [tensors[i] for i in write_order(order_inputs)]
    set_layer_counts(config, plans)
    if vocab is not None and vocab.spec is not None:
        config["vocab_size"] = vocab.rows
    if recipe.out_dtype or recipe.dtype:
        key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
        config[key] = recipe.out_dtype or recipe.dtype
    files = vocab.files if vocab is not None else None
    return StagePlan(recipe, tensors, layout_shards(tensors, out_shard_size), config, donor, donor, staged_read, seed, st.warnings, files)


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
    strict: bool = False,
    lora_dtype: str | None = None,
) -> Plan:
    """Plan a recipe or pipeline: read every source model's headers, then plan each stage.

    ``model_cache`` (reference -> Model) lets several plans (a sweep's members) share header reads.
    ``strict`` refuses keys mergekit ignores (else each is a warning), before anything is read.
    ``lora_dtype`` is ``--lora-merge-dtype`` (:mod:`nyxray.plan.lora`).
    """
    for recipe in recipes if strict else ():
        refuse(recipe.ignored, recipe.origin)
    lora_dtype = lora_merge_dtype(lora_dtype)
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
            model_ref, adapter = split_reference(ref)
            if adapter is not None and model_ref in stage_names:
                raise RecipeError(path, f"{ref!r}: a LoRA adapter on a pipeline stage's output is not supported", recipe.origin)
            if ref in stage_names:
                raise RecipeError(path, f"stage {ref!r} is used before it is defined", recipe.origin)
            if ref not in sources:
                try:
                    if ref not in cache:
                        cache[ref] = load_reference(ref, resolver, cache, lora_dtype)
                    sources.update({r: cache[r] for r in (model_ref, ref)})  # a model+adapter reads its model too
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
    for ref in recipe.tokenizer.model_refs() if recipe.tokenizer else ():
        out.setdefault(ref, "tokenizer_source" if recipe.tokenizer_source else "tokenizer")
    return list(out.items())
