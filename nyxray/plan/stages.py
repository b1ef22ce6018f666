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
from dataclasses import dataclass, field

from ..errors import ModelError, NyxrayError, RecipeError, did_you_mean
from ..io.safetensors import ShardEntry, build_header
from ..methods.registry import METHODS
from ..recipe.parameters import filter_matches
from ..recipe.parse import RECIPE_DTYPES, Recipe, Slice, Source, split_reference
from .expr import Leaf, leaves, nbytes_of, shape_of
from .lora import load_reference, lora_merge_dtype
from .sources import Model, Resolver
from .tensor import PlannedTensor, StageContext, Want, check_slices, plan_tensor, present_inputs
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


def _wanted(recipe: Recipe, slices: tuple[Slice, ...], models: dict[str, Model]) -> list[Want]:
    arch = models[slices[0].sources[0].model].arch
    wants = [Want(n, 0.0, tuple((s, n) for s in slices[0].sources), slices[0]) for n in arch.pre]
    out_layer = 0
    for sl in slices:
        start0, end0 = sl.sources[0].layer_range  # type: ignore[misc]
        length = end0 - start0
        for i in range(length):
            pos = i / (length - 1) if length > 1 else 1.0
            for suffix in arch.layer:
                ins = tuple((s, arch.layer_name(s.layer_range[0] + i, suffix)) for s in sl.sources)  # type: ignore[index]
                wants.append(Want(arch.layer_name(out_layer + i, suffix), pos, ins, sl))
        out_layer += length
    wants += [Want(n, 0.0, tuple((s, n) for s in slices[-1].sources), slices[-1]) for n in arch.post]
    return wants


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
    o = recipe.origin
    archs = {models[r].arch.name for r in recipe.model_refs()}
    if len(archs) > 1 and not allow_crimes:
        raise ModelError(f"{o}: the models have different architectures ({', '.join(sorted(archs))}); pass --allow-crimes to merge them anyway")
    method = METHODS[recipe.merge_method]
    slices = _normalise_slices(recipe, models)
    check_slices(recipe, method, slices, models)
    seed = random_seed if random_seed is not None else (recipe.random_seed or 0)
    st = StageContext(recipe, method, models, _stage_dtype(recipe.dtype), _stage_dtype(recipe.out_dtype), unsafe_truncate_embeddings, seed, [])
    tensors: list[PlannedTensor] = []
    order_inputs: list[list[tuple[str, str]]] = []  # per output, (model, input name): fixes write order
    staged_read = 0
    for w in _wanted(recipe, slices, models):
        found = present_inputs(st, w)
        if found is None:
            continue
        have, copied = found
        tensors.append(plan_tensor(st, w, have, copied))
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
    lora_dtype: str | None = None,
) -> Plan:
    """Plan a recipe or pipeline: read every source model's headers, then plan each stage.

    ``model_cache`` (reference -> Model) lets several plans (a sweep's members) share header reads.
    ``lora_dtype`` is ``--lora-merge-dtype`` (:mod:`nyxray.plan.lora`).
    """
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
    if recipe.tokenizer_source and recipe.tokenizer_source != "base":
        out.setdefault(recipe.tokenizer_source, "tokenizer_source")
    return list(out.items())
