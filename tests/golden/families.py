"""Golden cases for every architecture family: tiny models of each, and the recipes mergekit 0.1.5 ran on them.

A family's checkpoint layout (tensor names, dtypes, shapes) and ``config.json`` are what
``transformers`` writes for a tiny model of it (``make_families.py`` builds it with ``from_config``
and records the layout in ``families.json``); where transformers has no class for a family (only
remote code defines it), a stand-in class's layout is renamed to the Hub checkpoints' names and the
config gets a minimal configuration class of its own. The weights are drawn here from numpy
(``build_inputs``), so every machine rebuilds the same bytes from the recorded layout without
instantiating a model. Each family has two models, ``<family>/a`` and ``<family>/b``.

Recipes per family: ``stack`` (passthrough of layers [0, 2) of a, then [1, 3) of b: pre-weights from
the first slice, post-weights from the last, a repeated layer for the write order's ties, the
layer count in the config) and ``slerp`` (every layer of a and b, a gradient of t).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from nyxray.demo.synthetic import _tokenizer_files, _write_shards
from tests.golden.cases import Case

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES_PATH = os.path.join(HERE, "families.json")

TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=256,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
SHARD_BYTES = 30_000  # several input shards per model
OUT_SHARD = ("--out-shard-size", "40K")
OUT_SHARD_BYTES = 40_000


@dataclass(frozen=True)
class Family:
    """One architecture family's tiny model, as transformers builds it (``model_type``, config
    ``TEXT`` + ``config``), renamed to the Hub layout where transformers 5 writes another."""

    name: str
    model_type: str
    config: dict = field(default_factory=dict)
    recipes: tuple[str, ...] = ("stack", "slerp")
    vision: dict | None = None  # a multimodal wrapper: its vision_config (its text_config is TEXT + config)
    rename: tuple[tuple[str, str], ...] = ()  # (substring, replacement) on tensor names, in order
    drop: tuple[str, ...] = ()  # tensors whose name contains one of these are left out
    buffers: bool = False  # GPT-NeoX: the attention buffers old checkpoints hold (mergekit requires them)
    remote: tuple[str, str] | None = None  # (architecture, model_type) only remote code defines
    architecture: str | None = None  # the Hub checkpoints' name, where transformers 5 writes another


FAMILIES: tuple[Family, ...] = (
    Family("llama", "llama"),
    Family("mistral", "mistral"),
    Family("qwen2", "qwen2"),
    Family("qwen3", "qwen3"),
    Family("gemma", "gemma"),
    Family("gemma2", "gemma2"),
    Family("gemma3", "gemma3_text"),
    Family(
        "gemma3_vl",
        "gemma3",
        dict(model_type="gemma3_text"),
        recipes=("slerp",),
        vision=dict(VISION, model_type="siglip_vision_model"),
        rename=(("vision_tower.", "vision_tower.vision_model."),),
        drop=("vision_tower.head.",),
    ),
    Family("phi2", "phi", dict(tie_word_embeddings=False)),
    Family("phi3", "phi3", dict(tie_word_embeddings=False)),
    Family("cohere", "cohere", dict(use_qk_norm=True)),  # mergekit declares the q/k norms
    Family("cohere2", "cohere2"),
    Family("stablelm", "stablelm", dict(tie_word_embeddings=False)),
    Family("stablelm_epoch", "stablelm", dict(tie_word_embeddings=False), remote=("StableLMEpochForCausalLM", "stablelm_epoch")),
    Family("starcoder2", "starcoder2"),
    Family("glm4", "glm4", dict(attention_bias=True)),
    Family("olmo2", "olmo2"),
    Family("granite", "granite", dict(attention_bias=True, mlp_bias=True)),
    Family("exaone", "exaone", dict(tie_word_embeddings=False), architecture="ExaoneForCausalLM"),  # transformers 5 writes LlamaForCausalLM
    Family(
        "internlm2",
        "llama",
        dict(tie_word_embeddings=False),
        rename=(
            ("model.embed_tokens.", "model.tok_embeddings."),
            ("self_attn.q_proj.", "attention.wqkv."),
            ("self_attn.o_proj.", "attention.wo."),
            ("mlp.gate_proj.", "feed_forward.w1."),
            ("mlp.down_proj.", "feed_forward.w2."),
            ("mlp.up_proj.", "feed_forward.w3."),
            ("input_layernorm.", "attention_norm."),
            ("post_attention_layernorm.", "ffn_norm."),
            ("lm_head.", "output."),
        ),
        drop=("self_attn.k_proj.", "self_attn.v_proj."),
        remote=("InternLM2ForCausalLM", "internlm2"),
    ),
    Family("falcon", "falcon", dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=2, tie_word_embeddings=False, head_dim=None)),
    Family("gpt2", "gpt2", dict(n_embd=32, n_layer=3, n_head=4, n_positions=64)),
    Family("gpt_neox", "gpt_neox", dict(tie_word_embeddings=False), recipes=("stack",), buffers=True),
    Family(
        "mistral3",
        "mistral3",
        dict(model_type="mistral"),
        recipes=("slerp",),
        vision=dict(VISION, model_type="pixtral", head_dim=8),
    ),
    Family("mixtral", "mixtral", dict(num_local_experts=3, num_experts_per_tok=2)),
    Family("qwen3_moe", "qwen3_moe", dict(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16)),
    Family(
        "glm4_moe",
        "glm4_moe",
        dict(n_routed_experts=3, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, n_shared_experts=1, use_qk_norm=True),
    ),
    # no mergekit definition: merged through inference (a tied LM head, detected)
    Family("smollm3", "smollm3", dict(tie_word_embeddings=True), recipes=("slerp",)),
)
FAMILIES_BY_NAME = {f.name: f for f in FAMILIES}

_STACK = """\
slices:
  - sources:
      - model: <<model:{f}/a>>
        layer_range: [0, 2]
  - sources:
      - model: <<model:{f}/b>>
        layer_range: [1, 3]
merge_method: passthrough
dtype: bfloat16
"""
_SLERP = """\
models:
  - model: <<model:{a}>>
  - model: <<model:{b}>>
merge_method: slerp
base_model: <<model:{a}>>
parameters:
  t: [0.1, 0.6, 0.9]
dtype: bfloat16
"""


def _case(f: Family, recipe: str) -> Case:
    text = _STACK.format(f=f.name) if recipe == "stack" else _SLERP.format(a=f"{f.name}/a", b=f"{f.name}/b")
    cli = OUT_SHARD + (("--trust-remote-code",) if f.remote else ())
    return Case(f"{f.name}_{recipe}", text, cli, out_shard_size=OUT_SHARD_BYTES, donor=f"{f.name}/a", description=f"{f.model_type}: {recipe}")


CASES: tuple[Case, ...] = (
    *(_case(f, r) for f in FAMILIES for r in f.recipes),
    # mixing architectures: mergekit refuses it without --allow-crimes, and merges with the base's
    Case(
        "crimes_mistral_llama",
        _SLERP.format(a="mistral/a", b="llama/b"),
        (*OUT_SHARD, "--allow-crimes"),
        out_shard_size=OUT_SHARD_BYTES,
        donor="mistral/a",
        description="MistralForCausalLM + LlamaForCausalLM, --allow-crimes",
    ),
)
CASES_BY_NAME = {c.name: c for c in CASES}


# -- the inputs -------------------------------------------------------------------------------------

_REMOTE_CONFIG = '''from transformers import PretrainedConfig


class RemoteConfig(PretrainedConfig):
    """The configuration of a family only remote code defines: its fields as given."""

    model_type = "{model_type}"
'''


def _values(name: str, dtype: str, shape: list[int], rng: np.random.Generator) -> torch.Tensor:
    if dtype == "BOOL":
        return torch.ones(shape, dtype=torch.bool).tril()
    noise = rng.standard_normal(shape)
    values = 1.0 + 0.01 * noise if "norm" in name or name.endswith("ln_1.weight") or name.endswith("ln_2.weight") else 0.02 * noise
    return torch.from_numpy(np.asarray(values)).to({"BF16": torch.bfloat16, "F32": torch.float32}[dtype]).contiguous()


def write_model(path: str, layout: dict, seed: int) -> str:
    """One model of a family: ``layout`` (from families.json: config text, tensors, extra files),
    weights from numpy's generator seeded ``seed`` (the same numbers on every CPU)."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {name: _values(name, dtype, shape, rng) for name, dtype, shape in layout["tensors"]}
    _write_shards(path, tensors, SHARD_BYTES)
    files = {"config.json": layout["config_text"], **layout.get("files", {}), **_tokenizer_files(layout["family"])}
    for fname, text in files.items():
        with open(os.path.join(path, fname), "w") as fh:
            fh.write(text)
    return path


def build_inputs(root: str, layouts: dict[str, dict], names: set[str] | None = None) -> dict[str, str]:
    """Both models of every family (or of ``names``) under ``root``; ``<family>/a|b`` -> directory."""
    out = {}
    for i, f in enumerate(FAMILIES):
        if names is not None and f.name not in names:
            continue
        for j, which in enumerate("ab"):
            out[f"{f.name}/{which}"] = write_model(os.path.join(os.path.abspath(root), f.name, which), layouts[f.name], 1000 + 10 * i + j)
    return out


def case_families(case: Case) -> set[str]:
    return {m.split("/")[0] for m in case.recipe.split("<<model:")[1:]}


def load_golden() -> dict:
    with open(FAMILIES_PATH) as fh:
        return json.load(fh)
