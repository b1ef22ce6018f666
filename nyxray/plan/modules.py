"""The output tensors a stage wants, module by module, in mergekit's planning order.

A recipe's ``slices:`` describe the one module of a single-module architecture; ``models:`` (or
``slices:`` normalised from it) apply to every module, each over its own layers: a multimodal
model merges its text decoder, projector and vision tower with the same sources, as mergekit's
module definitions do. Within a module: its pre-weights from the first slice, each slice's layers,
its post-weights from the last slice.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError
from ..recipe.parse import Recipe, Slice, Source
from .architectures import Architecture, Module, set_config_value
from .sources import Model
from .tensor import Want


@dataclass(frozen=True)
class ModulePlan:
    """One module of the output and the slices it is built from."""

    module: Module
    slices: tuple[Slice, ...]

    @property
    def layers(self) -> int:
        return sum(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0] for sl in self.slices)  # type: ignore[index]


def module_slices(recipe: Recipe, arch: Architecture, models: dict[str, Model]) -> list[ModulePlan]:
    """Each module with its slices; ``models:`` become one slice over each module's layers."""
    if recipe.slices is not None:
        if len(arch.modules) > 1:
            names = ", ".join(m.name for m in arch.modules)
            raise ModelError(f"{recipe.origin}: {arch.name} has several modules ({names}); a slices: recipe cannot say which it means, merge it with models:")
        return [ModulePlan(arch.text, recipe.slices)]
    assert recipe.models is not None
    refs = [(m.model, m.parameters, m.path) for m in recipe.models]
    if recipe.base_model and recipe.base_model not in [r for r, _, _ in refs]:
        refs.append((recipe.base_model, {}, "base_model"))
    plans = []
    for module in arch.modules:
        counts = {ref: module.num_layers(models[ref].config) for ref, _, _ in refs}
        if len(set(counts.values())) > 1:
            raise ModelError(
                f"{recipe.origin}: the models' {module.name} modules have different numbers of layers ({counts}); they cannot be merged layer by layer"
            )
        sources = tuple(Source(ref, (0, counts[ref]), params, path) for ref, params, path in refs)
        plans.append(ModulePlan(module, (Slice(sources, None, {}, "models"),)))
    return plans


def _layer_wants(module: Module, sl: Slice, out_start: int, config: dict, models: dict[str, Model]) -> list[Want]:
    start0, end0 = sl.sources[0].layer_range  # type: ignore[misc]
    length = end0 - start0
    wants = []
    for i in range(length):
        pos = i / (length - 1) if length > 1 else 1.0
        suffixes = module.layer_suffixes(out_start + i, config)
        for s in sl.sources:
            index = s.layer_range[0] + i  # type: ignore[index]
            if module.layer_suffixes(index, models[s.model].config) != suffixes:
                raise ModelError(
                    f"{sl.path}: layer {index} of {s.model!r} is not the same kind of layer (dense or mixture of experts) as output layer {out_start + i}"
                )
        for suffix in suffixes:
            ins = tuple((s, module.layer_name(s.layer_range[0] + i, suffix)) for s in sl.sources)  # type: ignore[index]
            wants.append(Want(module.layer_name(out_start + i, suffix), pos, ins, sl, module.is_optional(suffix)))
    return wants


def wanted(plans: list[ModulePlan], config: dict, models: dict[str, Model]) -> list[Want]:
    """Every output tensor to plan, in mergekit's order. ``config`` is the output's (it decides
    which output layers are mixtures of experts)."""
    wants: list[Want] = []
    for plan in plans:
        m, first, last = plan.module, plan.slices[0], plan.slices[-1]
        wants += [Want(n, 0.0, tuple((s, n) for s in first.sources), first, m.is_optional(n)) for n in m.pre]
        out_layer = 0
        for sl in plan.slices:
            wants += _layer_wants(m, sl, out_layer, config, models)
            out_layer += sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]  # type: ignore[index]
        wants += [Want(n, 0.0, tuple((s, n) for s in last.sources), last, m.is_optional(n)) for n in m.post]
    return wants


def set_layer_counts(config: dict, plans: list[ModulePlan]) -> None:
    """The output config's layer count of every module that keeps one there."""
    for plan in plans:
        key = plan.module.config_key(config)
        if key is not None:
            set_config_value(config, key, plan.layers)
