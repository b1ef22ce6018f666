"""LoRA golden cases: ``model+adapter`` references that ``make_lora_golden.py`` ran through mergekit 0.1.5.

The models are ``cases.py``'s method models (``synthetic/base`` and its fine-tunes, Mistral-shaped,
loadable by ``transformers``). The adapters are written here without peft, in peft's format
(``adapter_config.json`` + ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A/B.weight``),
random A and B from a fixed seed. A recipe is ``cases.py``'s YAML template with one more
placeholder, ``<<adapter:NAME>>``, the absolute directory of adapter ``NAME``.
``lora.json`` next to this file holds what mergekit wrote for each case.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import save_file

from nyxray.demo.synthetic import tensor_shapes
from tests.golden import cases as C

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN_PATH = os.path.join(HERE, "lora.json")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter for ``cases.METHOD_SHAPE`` models: factors for every module named in ``targets``."""

    name: str
    seed: int
    r: int
    alpha: float
    targets: tuple[str, ...]
    dtype: torch.dtype = torch.float32
    config: dict = field(default_factory=dict)  # more adapter_config.json fields (rsLoRA, patterns, refusals)
    ranks: dict = field(default_factory=dict)  # module name suffix -> rank, for rank_pattern

    def rank(self, module: str) -> int:
        return next((r for suffix, r in self.ranks.items() if module.endswith(suffix)), self.r)

    def build(self, root: str) -> str:
        path = os.path.join(root, self.name)
        os.makedirs(path, exist_ok=True)
        rng = np.random.default_rng(self.seed)
        tensors = {}
        for name, shape in tensor_shapes(C.METHOD_SHAPE).items():
            module = name.removesuffix(".weight")
            if module.rsplit(".", 1)[-1] in self.targets:
                r = self.rank(module)
                out_f, in_f = shape
                tensors[f"base_model.model.{module}.lora_A.weight"] = torch.from_numpy(0.05 * rng.standard_normal((r, in_f))).to(self.dtype)
                tensors[f"base_model.model.{module}.lora_B.weight"] = torch.from_numpy(0.02 * rng.standard_normal((out_f, r))).to(self.dtype)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": C.BASE,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.05,
            "target_modules": list(self.targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
            **self.config,
        }
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        return path


# An attention-and-MLP adapter in float32 (what peft saves after training), r=8, alpha=16.
ATTN_MLP = AdapterSpec("adapters/attn-mlp", 101, 8, 16, ("q_proj", "v_proj", "down_proj"))
# rsLoRA in bfloat16 with a rank_pattern (o_proj at rank 2) and an alpha_pattern on one layer.
RSLORA = AdapterSpec(
    "adapters/rslora-bf16",
    102,
    4,
    8,
    ("q_proj", "o_proj", "up_proj"),
    dtype=torch.bfloat16,
    config={"use_rslora": True, "rank_pattern": {"o_proj": 2}, "alpha_pattern": {"layers.3.mlp.up_proj": 3}},
    ranks={"o_proj": 2},
)
ADAPTERS: tuple[AdapterSpec, ...] = (ATTN_MLP, RSLORA)
ADAPTERS_BY_NAME = {a.name: a for a in ADAPTERS}


def build_adapters(root: str) -> dict[str, str]:
    return {a.name: a.build(root) for a in ADAPTERS}


def render(case: C.Case, model_dirs: dict[str, str], adapter_dirs: dict[str, str]) -> str:
    """The recipe with absolute paths for its models and adapters (an adapter may also be a URL or a hub repo id)."""
    text = case.recipe
    for name, path in adapter_dirs.items():
        text = text.replace(f"<<adapter:{name}>>", os.path.abspath(path) if os.path.exists(path) else path)  # else a URL or repo id
    return C.render_recipe(dataclasses.replace(case, recipe=text), model_dirs, {})


FT1, FT2, FT3 = C.FT
_LINEAR = f"""\
models:
  - model: <<model:{FT1}>>+<<adapter:{ATTN_MLP.name}>>
    parameters:
      weight: 0.6
  - model: <<model:{FT2}>>
    parameters:
      weight: 0.4
merge_method: linear
dtype: bfloat16
"""
CASES: tuple[C.Case, ...] = (
    C.Case(
        "lora_linear_ft",
        _LINEAR,
        cli=("--out-shard-size", "1M"),
        out_shard_size=1_000_000,
        description="linear merge of a fine-tune with an adapter and another fine-tune, in 1 MB shards",
    ),
    C.Case(
        "lora_slerp_slices",
        f"""\
slices:
  - sources:
      - model: <<model:{FT1}>>
        layer_range: [0, 8]
      - model: <<model:{FT2}>>+<<adapter:{RSLORA.name}>>
        layer_range: [0, 8]
merge_method: slerp
base_model: <<model:{FT1}>>
parameters:
  t:
    - filter: self_attn
      value: [0.2, 0.8]
    - value: 0.4
dtype: bfloat16
""",
        description="slerp over slices, one source an rsLoRA bf16 adapter with rank and alpha patterns",
    ),
    C.Case(
        "lora_ties_base",
        f"""\
models:
  - model: <<model:{FT1}>>
    parameters:
      weight: 0.5
      density: 0.7
  - model: <<model:{FT2}>>+<<adapter:{ATTN_MLP.name}>>
    parameters:
      weight: 0.5
      density: 0.7
merge_method: ties
base_model: <<model:{C.BASE}>>+<<adapter:{RSLORA.name}>>
parameters:
  normalize: true
dtype: bfloat16
""",
        cli=("--out-shard-size", "2M"),
        out_shard_size=2_000_000,
        description="TIES with the adapter on the base model (and another on a fine-tune), in 2 MB shards",
    ),
    C.Case(
        "lora_merge_dtype_f32",
        _LINEAR.replace("dtype: bfloat16\n", ""),
        cli=("--lora-merge-dtype", "float32"),
        description="--lora-merge-dtype float32 and no recipe dtype: the adapted model is float32, so the merge is",
    ),
    C.Case(
        "lora_task_arithmetic_default_dtype",
        f"""\
models:
  - model: <<model:{FT1}>>+<<adapter:{ATTN_MLP.name}>>
    parameters:
      weight: 0.7
  - model: <<model:{FT3}>>
    parameters:
      weight: 0.5
merge_method: task_arithmetic
base_model: <<model:{C.BASE}>>
""",
        description="task arithmetic without a recipe dtype; the adapted fine-tune loads in its config's bfloat16",
    ),
)
CASES_BY_NAME = {c.name: c for c in CASES}
