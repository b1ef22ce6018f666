"""The architectures mergekit 0.1.5 declares, as records: every decoder-only causal LM, the MoE
decoders and the multimodal wrappers. Tensor orders are mergekit's (they number its task graph,
which breaks ties in the write order), so keep each list in the order written here.
"""

from __future__ import annotations

from dataclasses import replace

from .record import Architecture, Experts, Module

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
NORM = "model.norm.weight"

_ATTN = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight")
_MLP = ("mlp.up_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight")
_LLAMA = ("input_layernorm.weight", *_ATTN, "post_attention_layernorm.weight", *_MLP)
_QKV_BIAS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
# Qwen's order: sorted by name, as mergekit's qwen2.json lists them
_QWEN2 = (
    "input_layernorm.weight",
    "mlp.down_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "post_attention_layernorm.weight",
    "self_attn.k_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.q_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.v_proj.weight",
)
_QWEN3_ATTN = (
    "self_attn.k_norm.weight",
    "self_attn.k_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.q_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
)
_QWEN3 = ("input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "post_attention_layernorm.weight", *_QWEN3_ATTN)
_GEMMA2 = (
    "input_layernorm.weight",
    *_ATTN,
    "post_attention_layernorm.weight",
    "pre_feedforward_layernorm.weight",
    *_MLP,
    "post_feedforward_layernorm.weight",
)
_GEMMA3 = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_proj.weight",
    "self_attn.k_norm.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    *_GEMMA2[5:],
)
_GLM4_ATTN = (
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
)


def decoder(
    layer: tuple[str, ...],
    *,
    pre: tuple[str, ...] = (EMBED,),
    post: tuple[str, ...] = (NORM, HEAD),
    optional: tuple[str, ...] = (),
    embeds: tuple[str, ...] = (EMBED, HEAD),
    tied: tuple[tuple[str, str], ...] = ((HEAD, EMBED),),
    **fields,
) -> Module:
    """A text decoder module; by default Llama's embedding, final norm and tied LM head. A tied
    head is optional (tied checkpoints leave it out)."""
    tied_optional = tuple(name for name, _ in tied)
    return Module("decoder", pre, layer, post, optional=frozenset(optional + tied_optional), embeds=frozenset(embeds), tied=tied, **fields)


_PROCESSOR = ("preprocessor_config.json", "processor_config.json")


def _model(names: str | tuple[str, ...], model_type: str, *modules: Module) -> Architecture:
    names = (names,) if isinstance(names, str) else names
    return Architecture(names[0], modules, model_type, names=names, tagalong=_PROCESSOR if len(modules) > 1 else ())


def _prefixed(prefix: str, m: Module, name: str) -> Module:
    """``m`` under a weight prefix, as a module of a multimodal model."""

    def p(names):
        return tuple(prefix + n for n in names)

    return Module(
        name,
        p(m.pre),
        m.layer,
        p(m.post),
        layers=prefix + m.layers,
        layers_key=m.layers_key,
        fixed_layers=m.fixed_layers,
        optional=frozenset(p(n for n in m.optional if n in m.pre + m.post) + tuple(n for n in m.optional if n in m.layer)),
        embeds=frozenset(p(m.embeds)),
        tied=tuple((prefix + a, prefix + b) for a, b in m.tied),
    )


def _moe(parts_key: tuple[str, ...], gate_up: tuple[str, str], down: str) -> tuple[tuple[str, Experts], ...]:
    return (("mlp.experts.gate_up_proj", Experts(gate_up, parts_key)), ("mlp.experts.down_proj", Experts((down,), parts_key)))


_GEMMA3_TEXT = decoder(_GEMMA3)
_MISTRAL_TEXT = decoder(_LLAMA)
_GLM4_MOE_DENSE = (
    "input_layernorm.weight",
    "mlp.down_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    *_GLM4_ATTN,
)
_GLM4_MOE_SPARSE = (
    "mlp.experts.gate_up_proj",
    "mlp.experts.down_proj",
    "mlp.gate.weight",
    "mlp.gate.e_score_correction_bias",
    "mlp.shared_experts.gate_proj.weight",
    "mlp.shared_experts.up_proj.weight",
    "mlp.shared_experts.down_proj.weight",
    *(s for s in _GLM4_MOE_DENSE if not s.startswith("mlp.")),
)
_OPTIONAL_QK_NORM_BIAS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight", *_QKV_BIAS)
_GPT2_LAYER = tuple(f"{block}.{kind}" for block in ("attn.c_attn", "attn.c_proj", "ln_1", "ln_2", "mlp.c_proj", "mlp.c_fc") for kind in ("weight", "bias"))
_FALCON_LAYER = (
    "ln_attn.bias",
    "ln_attn.weight",
    "ln_mlp.bias",
    "ln_mlp.weight",
    "mlp.dense_4h_to_h.weight",
    "mlp.dense_h_to_4h.weight",
    "self_attention.dense.weight",
    "self_attention.query_key_value.weight",
)
_NEOX_LAYER = (
    *(f"{block}.{kind}" for block in ("attention.dense", "attention.query_key_value", "input_layernorm") for kind in ("weight", "bias")),
    *(f"{block}.{kind}" for block in ("mlp.dense_4h_to_h", "mlp.dense_h_to_4h", "post_attention_layernorm") for kind in ("weight", "bias")),
    "attention.bias",
    "attention.masked_bias",
    "attention.rotary_emb.inv_freq",
)
_PHI2_LAYER = (
    *(
        f"{block}.{kind}"
        for block in ("input_layernorm", "self_attn.dense", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        for kind in ("bias", "weight")
    ),
    *(f"{block}.{kind}" for block in ("mlp.fc1", "mlp.fc2") for kind in ("bias", "weight")),
)
_STABLELM2 = (
    "input_layernorm.weight",
    "input_layernorm.bias",
    "mlp.down_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "post_attention_layernorm.weight",
    "post_attention_layernorm.bias",
    *_GLM4_ATTN,
)
_STARCODER2 = tuple(
    f"{block}.{kind}"
    for block in (
        "input_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "post_attention_layernorm",
        "mlp.c_fc",
        "mlp.c_proj",
    )
    for kind in ("bias", "weight")
)
_GRANITE = (
    "input_layernorm.weight",
    *(f"self_attn.{p}_proj.{k}" for p in "qkvo" for k in ("weight", "bias")),
    "post_attention_layernorm.weight",
    *(f"mlp.{p}_proj.{k}" for p in ("gate", "up", "down") for k in ("weight", "bias")),
)
_SIGLIP_LAYER = tuple(
    f"{block}.{kind}"
    for block in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.out_proj", "self_attn.q_proj", "self_attn.v_proj")
    for kind in ("bias", "weight")
)
_PIXTRAL_LAYER = (
    "ffn_norm.weight",
    "feed_forward.down_proj.weight",
    "feed_forward.gate_proj.weight",
    "feed_forward.up_proj.weight",
    "attention_norm.weight",
    "attention.k_proj.weight",
    "attention.o_proj.weight",
    "attention.q_proj.weight",
    "attention.v_proj.weight",
)


def _vision(prefix: str, pre: tuple[str, ...], layer: tuple[str, ...], post: tuple[str, ...], layers: str) -> Module:
    return Module(
        "vision_tower",
        tuple(prefix + n for n in pre),
        layer,
        tuple(prefix + n for n in post),
        layers=prefix + layers,
        layers_key="vision_config.num_hidden_layers",
    )


def _projector(names: tuple[str, ...]) -> Module:
    return Module("multi_modal_projector", tuple("multi_modal_projector." + n for n in names), (), (), layers_key=None)


CATALOGUE: tuple[Architecture, ...] = (
    _model(("LlamaForCausalLM", "LLaMaForCausalLM"), "llama", decoder(_LLAMA)),
    _model("MistralForCausalLM", "mistral", decoder(_LLAMA)),
    _model("Qwen2ForCausalLM", "qwen2", decoder(_QWEN2)),
    _model("Qwen3ForCausalLM", "qwen3", decoder(_QWEN3)),
    _model("GemmaForCausalLM", "gemma", decoder(_LLAMA, post=(NORM,), embeds=(EMBED,), tied=())),
    _model("Gemma2ForCausalLM", "gemma2", decoder(_GEMMA2)),
    _model("Gemma3ForCausalLM", "gemma3_text", _GEMMA3_TEXT),
    _model(
        "Gemma3ForConditionalGeneration",
        "gemma3",
        _prefixed("language_model.", replace(_GEMMA3_TEXT, layers_key="text_config.num_hidden_layers"), "text_decoder"),
        _projector(("mm_input_projection_weight", "mm_soft_emb_norm.weight")),
        _vision(
            "vision_tower.vision_model.",
            ("embeddings.patch_embedding.bias", "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight"),
            _SIGLIP_LAYER,
            ("post_layernorm.bias", "post_layernorm.weight"),
            "encoder.layers",
        ),
    ),
    _model(
        "PhiForCausalLM",
        "phi",
        decoder(
            _PHI2_LAYER,
            post=("lm_head.bias", HEAD, "model.final_layernorm.bias", "model.final_layernorm.weight"),
            embeds=(EMBED, HEAD, "lm_head.bias"),
            tied=(),
        ),
    ),
    _model(
        "Phi3ForCausalLM",
        "phi3",
        decoder(
            (
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "self_attn.o_proj.weight",
                "self_attn.qkv_proj.weight",
                "mlp.gate_up_proj.weight",
                "mlp.down_proj.weight",
            ),
            post=(HEAD, NORM),
            tied=(),
        ),
    ),
    _model(
        "CohereForCausalLM",
        "cohere",
        decoder(
            (
                "input_layernorm.weight",
                "mlp.down_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "self_attn.q_norm.weight",
                "self_attn.q_proj.weight",
                "self_attn.k_norm.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
            ),
            optional=(HEAD,),
            tied=(),
        ),
    ),
    _model(
        "Cohere2ForCausalLM",
        "cohere2",
        decoder((*_ATTN, "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"), optional=(HEAD,), tied=()),
    ),
    _model(
        "StableLMEpochForCausalLM",
        "stablelm_epoch",
        decoder(("input_layernorm.weight", "input_layernorm.bias", *_ATTN, "post_attention_layernorm.weight", "post_attention_layernorm.bias", *_MLP), tied=()),
    ),
    _model("StableLmForCausalLM", "stablelm", decoder(_STABLELM2, post=(NORM, "model.norm.bias", HEAD), optional=_QKV_BIAS, tied=())),
    _model("Starcoder2ForCausalLM", "starcoder2", decoder(_STARCODER2, post=(HEAD, "model.norm.bias", NORM))),
    _model(
        "Glm4ForCausalLM",
        "glm4",
        decoder(
            (
                "input_layernorm.weight",
                "mlp.down_proj.weight",
                "mlp.gate_up_proj.weight",
                "post_attention_layernorm.weight",
                "post_mlp_layernorm.weight",
                "post_self_attn_layernorm.weight",
                *_GLM4_ATTN,
            ),
            optional=_QKV_BIAS,
        ),
    ),
    _model("Olmo2ForCausalLM", "olmo2", decoder((*_GEMMA3[1:7], "post_attention_layernorm.weight", *_MLP, "post_feedforward_layernorm.weight"))),
    _model("GraniteForCausalLM", "granite", decoder(_GRANITE, optional=tuple(s for s in _GRANITE if s.endswith(".bias")))),
    _model(
        "ExaoneForCausalLM",
        "exaone",
        decoder(
            (
                "ln_1.weight",
                *(f"attn.attention.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "out_proj")),
                "ln_2.weight",
                "mlp.c_fc_0.weight",
                "mlp.c_fc_1.weight",
                "mlp.c_proj.weight",
            ),
            pre=("transformer.wte.weight",),
            post=("transformer.ln_f.weight", HEAD),
            embeds=("transformer.wte.weight", HEAD),
            tied=(),
            layers="transformer.h",
            layers_key_alias="num_layers",
        ),
    ),
    _model(
        "InternLM2ForCausalLM",
        "internlm2",
        decoder(
            (
                "attention_norm.weight",
                "ffn_norm.weight",
                "attention.wqkv.weight",
                "attention.wo.weight",
                "feed_forward.w1.weight",
                "feed_forward.w2.weight",
                "feed_forward.w3.weight",
            ),
            pre=("model.tok_embeddings.weight",),
            post=(NORM, "output.weight"),
            embeds=("model.tok_embeddings.weight", "output.weight"),
            tied=(("output.weight", "model.tok_embeddings.weight"),),
        ),
    ),
    _model(
        "FalconForCausalLM",
        "falcon",
        decoder(
            _FALCON_LAYER,
            pre=("transformer.word_embeddings.weight",),
            post=("transformer.ln_f.weight", "transformer.ln_f.bias", HEAD),
            embeds=("transformer.word_embeddings.weight", HEAD),
            tied=(),
            layers="transformer.h",
        ),
    ),
    _model(
        "GPT2LMHeadModel",
        "gpt2",
        decoder(
            _GPT2_LAYER,
            pre=("transformer.wte.weight", "transformer.wpe.weight"),
            post=("transformer.ln_f.weight", "transformer.ln_f.bias", HEAD),
            embeds=("transformer.wte.weight", HEAD),
            tied=((HEAD, "transformer.wte.weight"), (HEAD, "wte.weight")),
            layers="transformer.h",
            layers_key="n_layer",
            aliases=(("transformer.", ""),),
        ),
    ),
    _model(
        "GPTNeoXForCausalLM",
        "gpt_neox",
        decoder(
            _NEOX_LAYER,
            pre=("gpt_neox.embed_in.weight",),
            post=("gpt_neox.final_layer_norm.bias", "gpt_neox.final_layer_norm.weight", "embed_out.weight"),
            embeds=("gpt_neox.embed_in.weight", "embed_out.weight"),
            tied=(),
            layers="gpt_neox.layers",
        ),
    ),
    _model(
        "Mistral3ForConditionalGeneration",
        "mistral3",
        _prefixed("language_model.", replace(_MISTRAL_TEXT, layers_key="text_config.num_hidden_layers"), "text_decoder"),
        _projector(("linear_1.weight", "linear_2.weight", "norm.weight", "patch_merger.merging_layer.weight")),
        _vision("vision_tower.", ("patch_conv.weight", "ln_pre.weight"), _PIXTRAL_LAYER, (), "transformer.layers"),
    ),
    _model(
        "MixtralForCausalLM",
        "mixtral",
        decoder(
            ("input_layernorm.weight", *_ATTN, "post_attention_layernorm.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"),
            renamed=(("mlp.gate.weight", "block_sparse_moe.gate.weight"),),
            experts=_moe(
                ("num_local_experts",),
                ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight"),
                "block_sparse_moe.experts.{e}.w2.weight",
            ),
        ),
    ),
    _model(
        "Qwen3MoeForCausalLM",
        "qwen3_moe",
        decoder(
            ("input_layernorm.weight", "mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight", "post_attention_layernorm.weight", *_QWEN3_ATTN),
            experts=_moe(
                ("num_experts", "num_local_experts"),  # transformers 5 writes num_local_experts
                ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
                "mlp.experts.{e}.down_proj.weight",
            ),
        ),
    ),
    _model(
        "Glm4MoeForCausalLM",
        "glm4_moe",
        decoder(
            _GLM4_MOE_DENSE,
            optional=_OPTIONAL_QK_NORM_BIAS,
            experts=_moe(("n_routed_experts",), ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), "mlp.experts.{e}.down_proj.weight"),
            moe_layer=_GLM4_MOE_SPARSE,
            moe_from_key="first_k_dense_replace",
        ),
    ),
)
