"""Which tensors a model has, in mergekit's terms: the record type (:mod:`.record`), the catalogue
of every architecture mergekit 0.1.5 declares (:mod:`.catalogue`), mergekit's inference for the
rest (:mod:`.inference`), and the checkpoint layouts read under the declared names (:mod:`.layout`).
Nothing outside this package names a family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ...errors import ModelError
from .catalogue import CATALOGUE
from .inference import infer
from .layout import adapt
from .record import Architecture, Experts, Module, config_int, config_value, set_config_value

BY_NAME: dict[str, tuple[Architecture, ...]] = {}
for _arch in CATALOGUE:
    for _name in _arch.names:
        BY_NAME[_name] = BY_NAME.get(_name, ()) + (_arch,)


def declared(config: dict, where: str) -> Architecture | None:
    """The catalogue's record for a ``config.json`` (by its architecture name, and its
    ``model_type`` where one name has several records), or None when there is none."""
    names = config.get("architectures")
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        raise ModelError(f"{where}: config.json has no 'architectures' list")
    candidates = BY_NAME.get(names[0], ())
    if len(candidates) == 1:
        return candidates[0]
    return next((a for a in candidates if a.model_type == config.get("model_type")), None)


def architecture_of(config: dict, tensors: Mapping[str, object], where: str) -> Architecture:
    """The declared record for a model, else the one inferred from its own tensors."""
    arch = declared(config, where)
    if arch is not None:
        return arch
    try:
        return infer(config["architectures"][0], config, [tensors])
    except ModelError as e:
        raise ModelError(f"{where}: {e}; declared: {', '.join(BY_NAME)}") from None


def stage_architecture(models: Sequence[tuple[Architecture, dict, Mapping[str, object]]], donor: int, allow_crimes: bool, where: str) -> Architecture:
    """The architecture a merge of ``models`` (architecture, config, tensors each) plans with, as
    mergekit chooses it: the declared one when every model has one (all the same, unless
    ``allow_crimes``: then the donor's); inferred from every model's tensors otherwise."""
    archs = [a for a, _, _ in models]
    if any(a.inferred for a in archs):
        _, config, _ = models[donor]
        return infer(archs[donor].name, config, [t for _, _, t in models])
    if len(set(archs)) > 1 and not allow_crimes:
        raise ModelError(
            f"{where}: the models have different architectures ({', '.join(sorted({a.name for a in archs}))}); pass --allow-crimes to merge them anyway"
        )
    return archs[donor]


__all__ = [
    "Architecture",
    "Experts",
    "Module",
    "CATALOGUE",
    "adapt",
    "architecture_of",
    "config_int",
    "config_value",
    "declared",
    "set_config_value",
    "stage_architecture",
]
