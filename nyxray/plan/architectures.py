"""Which tensors a decoder-only architecture has, in mergekit's terms.

A model is pre-weights (the embedding), ``num_hidden_layers`` layers of the same tensors, and
post-weights (final norm, LM head). Tensors a checkpoint holds beyond these (old rotary buffers,
say) are not copied to the output, as in mergekit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError, did_you_mean


@dataclass(frozen=True)
class Architecture:
    name: str
    pre: tuple[str, ...]
    layer: tuple[str, ...]  # suffixes after "model.layers.N."
    post: tuple[str, ...]
    optional: frozenset[str]  # may be absent (lm_head of tied-embedding models, biases)
    embeds: frozenset[str]  # vocabulary-sized tensors (truncation applies to them)
    layers_key: str = "num_hidden_layers"

    def layer_name(self, index: int, suffix: str) -> str:
        return f"model.layers.{index}.{suffix}"


_LLAMA_LAYER = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.up_proj.weight",  # mergekit's architecture order (up before gate): it shapes the write order
    "mlp.gate_proj.weight",
    "mlp.down_proj.weight",
)


def _llama_like(name: str, extra_layer: tuple[str, ...] = ()) -> Architecture:
    return Architecture(
        name=name,
        pre=("model.embed_tokens.weight",),
        layer=_LLAMA_LAYER + extra_layer,
        post=("model.norm.weight", "lm_head.weight"),
        optional=frozenset({"lm_head.weight", *extra_layer}),
        embeds=frozenset({"model.embed_tokens.weight", "lm_head.weight"}),
    )


ARCHITECTURES = {
    a.name: a
    for a in (
        _llama_like("MistralForCausalLM"),
        _llama_like("LlamaForCausalLM"),
        _llama_like("Qwen2ForCausalLM", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
    )
}


def architecture_of(config: dict, where: str) -> Architecture:
    """The Architecture named by a ``config.json``; a clear error for anything else."""
    names = config.get("architectures")
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        raise ModelError(f"{where}: config.json has no 'architectures' list")
    arch = ARCHITECTURES.get(names[0])
    if arch is None:
        raise ModelError(
            f"{where}: architecture {names[0]!r} is not supported{did_you_mean(names[0], tuple(ARCHITECTURES))}; supported: {', '.join(ARCHITECTURES)}"
        )
    n = config.get(arch.layers_key)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ModelError(f"{where}: config.json {arch.layers_key} is {n!r}, not a positive integer")
    return arch
