"""Small random Mistral-shaped checkpoints, for the demo, the tests and the benchmarks.

No model hub is reachable from CI, so every run that needs input models makes them: sharded
safetensors plus an index, a ``config.json`` that ``transformers`` accepts, and tokenizer files that
are copied (never parsed) by the merge. Values are random (never zeros) so a wrong merge shows.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a synthetic Mistral model."""

    hidden: int = 64
    intermediate: int = 160
    layers: int = 32
    vocab: int = 9000  # 9000 x 128 > 2**20 elements once hidden=128: exercises SLERP chunking
    heads: int = 4
    kv_heads: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def tensor_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the checkpoint and its shape."""
    kv = shape.kv_heads * shape.head_dim
    per_layer = {
        "input_layernorm.weight": (shape.hidden,),
        "self_attn.q_proj.weight": (shape.hidden, shape.hidden),
        "self_attn.k_proj.weight": (kv, shape.hidden),
        "self_attn.v_proj.weight": (kv, shape.hidden),
        "self_attn.o_proj.weight": (shape.hidden, shape.hidden),
        "post_attention_layernorm.weight": (shape.hidden,),
        "mlp.gate_proj.weight": (shape.intermediate, shape.hidden),
        "mlp.up_proj.weight": (shape.intermediate, shape.hidden),
        "mlp.down_proj.weight": (shape.hidden, shape.intermediate),
    }
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab, shape.hidden)}
    for i in range(shape.layers):
        for suffix, s in per_layer.items():
            out[f"model.layers.{i}.{suffix}"] = s
    out["model.norm.weight"] = (shape.hidden,)
    out["lm_head.weight"] = (shape.vocab, shape.hidden)
    return out


def config_dict(shape: ModelShape, dtype: str = "bfloat16") -> dict:
    """A Mistral ``config.json`` for these dimensions."""
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }


def _tokenizer_files(name: str) -> dict[str, str]:
    # Only copied by the merge, never parsed: minimal but well-formed.
    return {
        "tokenizer_config.json": json.dumps({"model_max_length": 4096, "tokenizer_class": "LlamaTokenizer", "source": name}, indent=2),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}, "source": name}),
        "special_tokens_map.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>"}, indent=2),
        "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2, "source": name}, indent=2),
    }


def _random_tensors(shape: ModelShape, seed: int, dtype: torch.dtype, norm_jitter: float, like: str | None, like_noise: float) -> dict[str, torch.Tensor]:
    # numpy's generator and float64 arithmetic give the same numbers on every CPU; torch.randn's
    # float32 kernels do not (they differ between AVX2 and CPUs without it), and the golden tests
    # need inputs that are identical on every machine.
    rng = np.random.default_rng(seed)
    base: dict[str, torch.Tensor] = {}
    if like is not None:
        from safetensors.torch import load_file

        for f in sorted(os.listdir(like)):
            if f.endswith(".safetensors"):
                base.update(load_file(os.path.join(like, f)))
    tensors: dict[str, torch.Tensor] = {}
    for name, s in tensor_shapes(shape).items():
        noise = rng.standard_normal(s)
        if name in base:
            ref = base[name].double().numpy()
            t = ref + like_noise * (math.fsum(np.abs(ref).ravel()) / ref.size) * noise
        elif "norm" in name:
            t = 1.0 + norm_jitter * noise
        else:
            t = 0.02 * noise
        tensors[name] = torch.from_numpy(t).to(dtype).contiguous()
    return tensors


def _write_shards(path: str, tensors: dict[str, torch.Tensor], shard_bytes: int) -> None:
    """Greedy shards of at most ``shard_bytes`` (or one tensor), named and indexed as transformers does."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map: dict[str, str] = {}
    n = len(shards)
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def make_model(
    path: str,
    shape: ModelShape = ModelShape(),
    seed: int = 0,
    shard_bytes: int = 2_000_000,
    dtype: torch.dtype = torch.bfloat16,
    norm_jitter: float = 0.01,
    like: str | None = None,
    like_noise: float = 0.0,
) -> str:
    """Write a random sharded checkpoint to the local directory ``path`` and return it.

    Norm weights are ``1 + norm_jitter * N(0, 1)`` as in trained models, so SLERP between two such
    models takes the colinear (lerp) branch for them, and the true SLERP branch for the matrices.
    With ``like`` (another synthetic model's directory) the weights are that model's plus
    ``like_noise`` relative noise: nearly colinear pairs for branch-threshold tests.
    """
    os.makedirs(path, exist_ok=True)
    _write_shards(path, _random_tensors(shape, seed, dtype, norm_jitter, like, like_noise), shard_bytes)
    dtype_name = str(dtype).removeprefix("torch.")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_dict(shape, dtype_name), f, indent=2)
    for fname, text in _tokenizer_files(os.path.basename(path.rstrip("/"))).items():
        with open(os.path.join(path, fname), "w") as f:
            f.write(text)
    return path


NYXENE_SOURCES = (
    "fblgit/una-cybertron-7b-v2",
    "chargoddard/loyal-piano-m7-cdpo",
    "berkeley-nest/Starling-LM-7B-alpha",
    "openaccess-ai-collective/DPOpenHermes-7B",
)


def make_nyxene_sources(root: str, shape: ModelShape = ModelShape(), shard_bytes: int = 2_000_000) -> dict[str, str]:
    """The four 7B source models of the Nyxene card as small random stand-ins under ``root``.

    Laid out as ``root/org/name`` (a ``--models-root`` mirror). Returns name -> directory.
    """
    out = {}
    for seed, name in enumerate(NYXENE_SOURCES, start=1):
        out[name] = make_model(os.path.join(root, name), shape, seed=seed, shard_bytes=shard_bytes)
    return out
