"""The record an architecture is declared as, in mergekit's terms.

A model is one or more modules (a text decoder; a multimodal model adds a projector and a vision
tower). A module is pre-weights (the embedding), a number of layers of the same tensors, and
post-weights (final norm, LM head), each module under its own name prefix and with its own layer
count. Tensors a checkpoint holds beyond these (old rotary buffers, say) are not copied to the
output, as in mergekit. The records are data: the catalogue declares them, inference builds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import ModelError


@dataclass(frozen=True)
class Experts:
    """A layer tensor that checkpoints store as one tensor per expert (mergekit 0.1.5, through
    transformers 5, reads it fused): for each expert ``e`` the ``parts`` (suffixes with ``{e}``)
    are joined along their first dimension, and the experts stacked."""

    parts: tuple[str, ...]
    count_keys: tuple[str, ...]  # config keys of the number of experts, the first present counts

    def count(self, config: dict) -> int:
        key = next((k for k in self.count_keys if config_value(config, k) is not None), self.count_keys[0])
        return config_int(config, key)


@dataclass(frozen=True)
class Module:
    """One module: full tensor names for pre/post, suffixes after ``<layers>.N.`` for layers."""

    name: str
    pre: tuple[str, ...]
    layer: tuple[str, ...]
    post: tuple[str, ...]
    layers: str = "model.layers"  # the layer tensors' prefix
    layers_key: str | None = "num_hidden_layers"  # dotted for nested configs; None: ``fixed_layers``
    layers_key_alias: str | None = None  # read (and written) instead where a config names it so (EXAONE's num_layers)
    fixed_layers: int = 0
    optional: frozenset[str] = frozenset()  # full names (pre/post) or layer suffixes that may be absent
    embeds: frozenset[str] = frozenset()  # vocabulary-indexed tensors (full names)
    # Checkpoint layouts other than the canonical names (mergekit reads them, writes canonical ones):
    aliases: tuple[tuple[str, str], ...] = ()  # (canonical prefix, checkpoint prefix): GPT-2's bare names
    tied: tuple[tuple[str, str], ...] = ()  # (tensor, the tensor it falls back to when tied)
    renamed: tuple[tuple[str, str], ...] = ()  # (layer suffix, checkpoint layer suffix)
    experts: tuple[tuple[str, Experts], ...] = ()  # (layer suffix, its per-expert parts)
    # A layer from index config[moe_from_key] on has ``moe_layer``'s tensors instead (GLM-4-MoE).
    moe_layer: tuple[str, ...] = ()
    moe_from_key: str | None = None

    def layer_name(self, index: int, suffix: str) -> str:
        return f"{self.layers}.{index}.{suffix}"

    def config_key(self, config: dict) -> str | None:
        """The key of this module's layer count in ``config`` (None: the module has no key)."""
        if self.layers_key is not None and self.layers_key_alias is not None and config_value(config, self.layers_key) is None:
            return self.layers_key_alias
        return self.layers_key

    def num_layers(self, config: dict) -> int:
        key = self.config_key(config)
        return self.fixed_layers if key is None else config_int(config, key)

    def layer_suffixes(self, index: int, config: dict) -> tuple[str, ...]:
        if self.moe_from_key is not None and index >= config_int(config, self.moe_from_key, low=0):
            return self.moe_layer
        return self.layer

    def is_optional(self, name: str) -> bool:
        return name in self.optional or any(name.endswith("." + s) for s in self.optional)


@dataclass(frozen=True)
class Architecture:
    """A model architecture: the ``architectures`` name in ``config.json`` and its modules, in
    mergekit's order (which is the planning order, hence the write order)."""

    name: str
    modules: tuple[Module, ...]
    model_type: str | None = None  # tells apart two records of one name (PhiForCausalLM)
    inferred: bool = False  # built by inference from tensor names, not declared
    names: tuple[str, ...] = field(default=())  # every name it answers to (``name`` first)
    tagalong: tuple[str, ...] = ()  # files besides the tokenizer's that the output carries (a processor's config)

    @property
    def text(self) -> Module:
        """The first module: the text decoder, whose layer count the plan reports."""
        return self.modules[0]

    @property
    def layers_key(self) -> str | None:
        return self.text.layers_key

    @property
    def embeds(self) -> frozenset[str]:
        return frozenset().union(*(m.embeds for m in self.modules))

    @property
    def optional(self) -> frozenset[str]:
        return frozenset().union(*(m.optional for m in self.modules))

    def num_layers(self, config: dict) -> int:
        return self.text.num_layers(config)


def config_value(config: dict, key: str) -> object:
    """``config[key]``, where a dotted key walks nested objects (``text_config.num_hidden_layers``)."""
    node: object = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def config_int(config: dict, key: str, low: int = 1) -> int:
    n = config_value(config, key)
    if not isinstance(n, int) or isinstance(n, bool) or n < low:
        raise ModelError(f"config.json {key} is {n!r}, not an integer >= {low}")
    return n


def set_config_value(config: dict, key: str, value: object) -> None:
    """Set ``config[key]`` in place, a dotted key in the nested object it names."""
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
