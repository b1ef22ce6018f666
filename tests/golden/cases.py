"""Golden cases: the synthetic inputs and the recipes that ``make_golden.py`` ran through mergekit 0.1.5.

Everything a test needs to rebuild the exact same inputs and run nyxray on the same recipes lives
here as plain data, so the tests and the golden generator can never disagree:

* ``MODELS``: the synthetic input checkpoints (``ModelSpec``), built in this order by
  ``build_inputs(root)``; a spec with ``like`` is derived from an earlier one.
* ``CASES``: the recipes (``Case``), in run order. A recipe is YAML text with placeholders:
  ``<<model:NAME>>`` is the absolute directory of the synthetic model ``NAME`` and
  ``<<case:NAME>>`` the absolute output directory of an earlier case (a pipeline stage).
  ``render_recipe(case, input_root, output_root)`` substitutes them.
* ``Case.cli``: the extra mergekit-yaml options that the case was run with (besides the fixed
  ``COMMON_CLI``), and ``Case.out_shard_size`` the shard limit in bytes they amount to.

The golden data itself is ``golden.json`` next to this file (see ``make_golden.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

try:
    from nyxray.demo.synthetic import ModelShape, make_model
except ImportError:  # the package's __init__ is broken or mid-refactor: load the generator module alone
    import importlib.util as _ilu
    import sys as _sys

    _p = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "nyxray", "demo", "synthetic.py")
    _spec = _ilu.spec_from_file_location("_nyxray_synthetic_standalone", _p)
    _mod = _ilu.module_from_spec(_spec)
    _sys.modules[_spec.name] = _mod
    _spec.loader.exec_module(_mod)
    ModelShape, make_model = _mod.ModelShape, _mod.make_model

SHAPE = ModelShape(hidden=128, intermediate=256, layers=32, vocab=9000, heads=4, kv_heads=2)
INPUT_SHARD_BYTES = 3_000_000

# mergekit-yaml options used for every case. --no-write-model-card: the card contains temp paths and
# set-ordered model lists (not comparable); nyxray writes its own card. Every case also gets
# ``--num-threads <Case.threads>`` (default 1): mergekit 0.1.5's SLERP dot products are torch sums whose
# result depends on torch's intra-op thread count for chunks of more than 32768 elements, so a golden
# output is only defined for a given thread count (see the slerp_threads_* cases).
COMMON_CLI: tuple[str, ...] = ("--no-write-model-card",)
# mergekit's default --out-shard-size ("5B", decimal, bytes).
DEFAULT_OUT_SHARD_SIZE = 5_000_000_000


@dataclass(frozen=True)
class ModelSpec:
    """One synthetic input model: ``make_model(os.path.join(root, name), shape, seed, shard_bytes, ...)``."""

    name: str  # also the relative directory under the input root
    shape: ModelShape
    seed: int
    shard_bytes: int
    like: str | None = None  # name of an earlier ModelSpec
    like_noise: float = 0.0

    def build(self, root: str) -> str:
        like = os.path.join(root, self.like) if self.like else None
        return make_model(
            os.path.join(root, self.name),
            self.shape,
            seed=self.seed,
            shard_bytes=self.shard_bytes,
            like=like,
            like_noise=self.like_noise,
        )


# The four Nyxene sources are exactly what nyxray.demo.synthetic.make_nyxene_sources(root, SHAPE,
# INPUT_SHARD_BYTES) makes (seeds 1..4 in NYXENE_SOURCES order).
UNA = "fblgit/una-cybertron-7b-v2"
LOYAL = "chargoddard/loyal-piano-m7-cdpo"
STARLING = "berkeley-nest/Starling-LM-7B-alpha"
HERMES = "openaccess-ai-collective/DPOpenHermes-7B"
# A near-colinear partner of UNA: the noise level puts many matrices' |cos| right around 0.9995.
UNA_NEAR = "synthetic/una-near"
NEAR_NOISE = 0.0395
# Bigger tensors (1-2.9 M elements: several 2**20 chunks, each > 32768) for the thread-count cases.
BIG_SHAPE = ModelShape(hidden=1024, intermediate=2816, layers=2, vocab=2048, heads=8, kv_heads=8)
BIG_SHARD_BYTES = 20_000_000
BIG_A = "synthetic/big-a"
BIG_NEAR = "synthetic/big-near"

# The method cases: a base and fine-tunes derived from it (base + 3% relative noise), as real task
# vectors are small next to the weights: where float32 accumulation and bf16 rounding decide the bits.
METHOD_SHAPE = ModelShape(hidden=128, intermediate=256, layers=8, vocab=9000, heads=4, kv_heads=2)
BASE = "synthetic/base"
FT = ("synthetic/ft1", "synthetic/ft2", "synthetic/ft3")
FT_NOISE = 0.03

MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(UNA, SHAPE, 1, INPUT_SHARD_BYTES),
    ModelSpec(LOYAL, SHAPE, 2, INPUT_SHARD_BYTES),
    ModelSpec(STARLING, SHAPE, 3, INPUT_SHARD_BYTES),
    ModelSpec(HERMES, SHAPE, 4, INPUT_SHARD_BYTES),
    ModelSpec(UNA_NEAR, SHAPE, 11, INPUT_SHARD_BYTES, like=UNA, like_noise=NEAR_NOISE),
    ModelSpec(BIG_A, BIG_SHAPE, 21, BIG_SHARD_BYTES),
    ModelSpec(BIG_NEAR, BIG_SHAPE, 23, BIG_SHARD_BYTES, like=BIG_A, like_noise=0.1),
    ModelSpec(BASE, METHOD_SHAPE, 31, INPUT_SHARD_BYTES),
    *(ModelSpec(name, METHOD_SHAPE, 32 + i, INPUT_SHARD_BYTES, like=BASE, like_noise=FT_NOISE) for i, name in enumerate(FT)),
)


MODELS_BY_NAME: dict[str, ModelSpec] = {m.name: m for m in MODELS}


def build_inputs(root: str, names=None) -> dict[str, str]:
    """Build the synthetic inputs under ``root`` (all, or ``names`` plus the models they are derived
    from), in ``MODELS`` order; returns name -> absolute directory."""
    root = os.path.abspath(root)
    want = set(MODELS_BY_NAME) if names is None else set(names)
    for spec in reversed(MODELS):
        if spec.name in want and spec.like:
            want.add(spec.like)
    return {spec.name: spec.build(root) for spec in MODELS if spec.name in want}


def case_inputs(case: Case) -> set[str]:
    """Names of the synthetic models a case (and the cases it depends on) reads."""
    out: set[str] = set()
    for dep in case.depends:
        out |= case_inputs(CASES_BY_NAME[dep])
    return out | {m.split(">>")[0] for m in case.recipe.split("<<model:")[1:]}


@dataclass(frozen=True)
class Case:
    name: str
    recipe: str  # YAML with <<model:...>> / <<case:...>> placeholders
    cli: tuple[str, ...] = ()  # extra mergekit-yaml options (COMMON_CLI and --num-threads are always added)
    threads: int = 1  # mergekit-yaml --num-threads (torch intra-op threads)
    out_shard_size: int = DEFAULT_OUT_SHARD_SIZE  # what --out-shard-size in ``cli`` means, in bytes
    depends: tuple[str, ...] = ()  # cases whose outputs the recipe reads
    description: str = ""
    # The config/tokenizer donor mergekit used (a model name, or "case:NAME"). mergekit picks it from
    # a set when base_model is absent; make_golden.py chooses PYTHONHASHSEED so that it is nyxray's rule
    # (base_model, else the first source of the first slice).
    donor: str = ""
    tags: tuple[str, ...] = field(default=())
    # Random methods (DARE, DELLA): nyxray is reproducible but not bit-equal to mergekit. Such a case
    # names ``dense``, the deterministic case of the same merge without sparsification; the golden
    # data then holds, per tensor, the squared distance of mergekit's output from that dense output.
    dense: str = ""
    # A method that samples only tensors above this many elements (arcee_fusion's quartiles): the
    # smaller ones must be byte-identical, the larger ones match in layout only.
    exact_up_to: int = 0


def render_recipe(case: Case, model_dirs: dict[str, str], case_dirs: dict[str, str]) -> str:
    """Substitute placeholders: ``model_dirs`` name -> dir (from build_inputs), ``case_dirs`` case -> output dir."""
    text = case.recipe
    for name, path in model_dirs.items():
        text = text.replace(f"<<model:{name}>>", os.path.abspath(path))
    for name, path in case_dirs.items():
        text = text.replace(f"<<case:{name}>>", os.path.abspath(path))
    if "<<" in text:
        raise KeyError(f"unresolved placeholder in recipe of {case.name}: {text}")
    return text


_NYXENE_SLERP = """\
slices:
  - sources:
      - model: <<case:nyxene_stage1a>>
        layer_range: [0, 48]
      - model: <<case:nyxene_stage1b>>
        layer_range: [0, 48]
merge_method: slerp
base_model: <<case:nyxene_stage1a>>
parameters:
  t:
    - filter: lm_head
      value: [0.75]
    - filter: embed_tokens
      value: [0.75]
    - filter: self_attn
      value: [0.75, 0.25]
    - filter: mlp
      value:  [0.25, 0.75]
    - filter: layernorm
      value: [0.5, 0.5]
    - filter: modelnorm
      value: [0.75]
    - value: 0.5 # fallback for rest of tensors
dtype: bfloat16
"""

_BIG_SLERP = f"""\
models:
  - model: <<model:{BIG_A}>>
  - model: <<model:{BIG_NEAR}>>
merge_method: slerp
base_model: <<model:{BIG_A}>>
parameters:
  t: 0.3
dtype: bfloat16
"""

CASES: tuple[Case, ...] = (
    Case(
        name="nyxene_stage1a",
        description="Nyxene card recipe 1: passthrough una-cybertron [0,24) + loyal-piano [8,32), ~4 shards",
        recipe=f"""\
slices:
  - sources:
    - model: <<model:{UNA}>>
      layer_range: [0, 24]
  - sources:
    - model: <<model:{LOYAL}>>
      layer_range: [8, 32]
merge_method: passthrough
dtype: bfloat16
""",
        cli=("--out-shard-size", "5M"),
        out_shard_size=5_000_000,
        donor=UNA,
        tags=("passthrough",),
    ),
    Case(
        name="nyxene_stage1b",
        description="Nyxene card recipe 2: passthrough Starling [0,24) + DPOpenHermes [8,32), ~4 shards",
        recipe=f"""\
slices:
  - sources:
    - model: <<model:{STARLING}>>
      layer_range: [0, 24]
  - sources:
    - model: <<model:{HERMES}>>
      layer_range: [8, 32]
merge_method: passthrough
dtype: bfloat16
""",
        cli=("--out-shard-size", "5M"),
        out_shard_size=5_000_000,
        donor=STARLING,
        tags=("passthrough",),
    ),
    Case(
        name="nyxene_slerp",
        description="Nyxene card recipe 3 (slerp, card's t filters incl. the no-op 'modelnorm') over cases 1 and 2, ~4 shards",
        recipe=_NYXENE_SLERP,
        cli=("--out-shard-size", "5M"),
        out_shard_size=5_000_000,
        depends=("nyxene_stage1a", "nyxene_stage1b"),
        donor="case:nyxene_stage1a",
        tags=("slerp",),
    ),
    Case(
        name="slerp_default_shards",
        description="same slerp with the default --out-shard-size: one model.safetensors, no index",
        recipe=_NYXENE_SLERP,
        depends=("nyxene_stage1a", "nyxene_stage1b"),
        donor="case:nyxene_stage1a",
        tags=("slerp",),
    ),
    Case(
        name="models_slerp_f32",
        description="models: shorthand (base listed second), scalar t, dtype bfloat16 + out_dtype float32",
        recipe=f"""\
models:
  - model: <<model:{STARLING}>>
  - model: <<model:{LOYAL}>>
merge_method: slerp
base_model: <<model:{LOYAL}>>
parameters:
  t: 0.3
dtype: bfloat16
out_dtype: float32
""",
        cli=("--out-shard-size", "10M"),
        out_shard_size=10_000_000,
        donor=LOYAL,
        tags=("slerp", "out_dtype"),
    ),
    Case(
        name="models_slerp_f16",
        description="models: shorthand, gradient t, no dtype (bf16 inputs) + out_dtype float16",
        recipe=f"""\
models:
  - model: <<model:{UNA}>>
  - model: <<model:{HERMES}>>
merge_method: slerp
base_model: <<model:{UNA}>>
parameters:
  t: [0.1, 0.6, 0.35]
out_dtype: float16
""",
        cli=("--out-shard-size", "4M"),
        out_shard_size=4_000_000,
        donor=UNA,
        tags=("slerp", "out_dtype"),
    ),
    Case(
        name="slerp_two_slices",
        description=(
            "slerp, two slices of two sources with different layer ranges; slice-level gradient t "
            "(restarts per slice), slice 2 overrides base_model; top-level t fallback"
        ),
        recipe=f"""\
slices:
  - sources:
      - model: <<model:{UNA}>>
        layer_range: [0, 16]
      - model: <<model:{LOYAL}>>
        layer_range: [8, 24]
    parameters:
      t:
        - filter: self_attn
          value: [0.1, 0.9]
        - value: [0.3, 0.7, 0.2]
  - sources:
      - model: <<model:{UNA}>>
        layer_range: [20, 32]
      - model: <<model:{LOYAL}>>
        layer_range: [2, 14]
    base_model: <<model:{LOYAL}>>
    parameters:
      t:
        - filter: mlp
          value: [0.8, 0.2]
merge_method: slerp
base_model: <<model:{UNA}>>
parameters:
  t: 0.45
dtype: bfloat16
""",
        cli=("--out-shard-size", "4M"),
        out_shard_size=4_000_000,
        donor=UNA,
        tags=("slerp", "slices"),
    ),
    Case(
        name="slerp_near_colinear",
        description="slerp of a near-colinear pair: matrices straddle the 0.9995 lerp threshold",
        recipe=f"""\
models:
  - model: <<model:{UNA}>>
  - model: <<model:{UNA_NEAR}>>
merge_method: slerp
base_model: <<model:{UNA}>>
parameters:
  t: 0.37
dtype: bfloat16
""",
        cli=("--out-shard-size", "5M"),
        out_shard_size=5_000_000,
        donor=UNA,
        tags=("slerp", "threshold"),
    ),
    Case(
        name="slerp_t_extremes",
        description="slerp with t=0 (self_attn, non-layer tensors), t=1 (mlp), gradient [0,1] (layernorms)",
        recipe=f"""\
slices:
  - sources:
      - model: <<model:{STARLING}>>
        layer_range: [0, 32]
      - model: <<model:{UNA_NEAR}>>
        layer_range: [0, 32]
merge_method: slerp
base_model: <<model:{STARLING}>>
parameters:
  t:
    - filter: self_attn
      value: 0
    - filter: mlp
      value: 1
    - value: [0, 1]
dtype: bfloat16
""",
        cli=("--out-shard-size", "5M"),
        out_shard_size=5_000_000,
        donor=STARLING,
        tags=("slerp",),
    ),
    Case(
        name="passthrough_repeat",
        description="passthrough repeating source layers: una [0,16) then una [8,24) (layers 8..15 twice)",
        recipe=f"""\
slices:
  - sources:
    - model: <<model:{UNA}>>
      layer_range: [0, 16]
  - sources:
    - model: <<model:{UNA}>>
      layer_range: [8, 24]
merge_method: passthrough
dtype: bfloat16
""",
        cli=("--out-shard-size", "3M"),
        out_shard_size=3_000_000,
        donor=UNA,
        tags=("passthrough", "duplicates"),
    ),
    *(
        Case(
            name=f"slerp_threads_j{j}",
            description=(
                f"slerp of a correlated pair of big tensors run with --num-threads {j}: mergekit's output "
                "depends on torch's thread count (the chunk dot products are threaded torch sums)"
            ),
            recipe=_BIG_SLERP,
            threads=j,
            donor=BIG_A,
            tags=("slerp", "threads"),
        )
        for j in (1, 2, 4)
    ),
    Case(
        name="ignored_keys",
        description=(
            "keys mergekit ignores: a misspelt dtype (so the bf16 inputs stay bf16), metadata:, a source's "
            "revision:, a slice's residual_weight (read, never used) and a conditional's extra key"
        ),
        recipe=f"""\
slices:
  - residual_weight: 0.3
    sources:
      - model: <<model:{UNA}>>
        layer_range: [0, 6]
        revision: main
      - model: <<model:{LOYAL}>>
        layer_range: [2, 8]
merge_method: slerp
base_model: <<model:{UNA}>>
parameters:
  t:
    - filter: mlp
      value: [0.2, 0.8]
      note: the MLPs lean on loyal-piano
    - value: 0.5
dype: float32
metadata:
  author: someone
""",
        cli=("--out-shard-size", "2M"),
        out_shard_size=2_000_000,
        donor=UNA,
        tags=("slerp", "lenient"),
    ),
)


def _models(*entries: tuple[str, str], base: str | None = BASE, top: str = "", extra: str = "dtype: bfloat16\n") -> str:
    """A ``models:`` recipe over the method inputs: (model, parameters YAML flow mapping or '')."""
    lines = ["models:"]
    for model, params in entries:
        lines.append(f"  - model: <<model:{model}>>")
        if params:
            lines.append(f"    parameters: {params}")
    if base:
        lines.append(f"base_model: <<model:{base}>>")
    if top:
        lines.append("parameters:")
        lines += [f"  {line}" for line in top.strip().splitlines()]
    return "\n".join(lines) + "\n" + extra


def _method_case(name: str, method: str, recipe: str, **kw) -> Case:
    tags = ("method", method) + (("random",) if kw.get("dense") else ())
    return Case(name=name, recipe=f"merge_method: {method}\n{recipe}", donor=kw.pop("donor", BASE), tags=tags, **kw)


W3 = ((FT[0], "{weight: 1.0}"), (FT[1], "{weight: 0.6}"), (FT[2], "{weight: 0.4}"))
SHARDS_2M = dict(cli=("--out-shard-size", "2M"), out_shard_size=2_000_000)
_FILTERED_WEIGHT = "[{filter: self_attn, value: [0.9, 0.3]}, {filter: mlp, value: 0.5}, {value: 0.7}]"

METHOD_CASES: tuple[Case, ...] = (
    # base_model on a method that ignores it only fixes the config donor (mergekit picks from a set)
    _method_case(
        "linear", "linear", _models((FT[0], "{weight: 0.5}"), (FT[1], "{weight: 0.3}"), (FT[2], "{weight: 0.2}"), base=FT[0]), donor=FT[0], **SHARDS_2M
    ),
    _method_case(
        "linear_gradients_no_normalize",
        "linear",
        _models((FT[0], f"{{weight: {_FILTERED_WEIGHT}}}"), (FT[1], "{weight: [0.1, 0.6]}"), base=FT[0], top="normalize: false"),
        donor=FT[0],
        description="per-model weight gradients and filters, normalize: false",
    ),
    _method_case(
        "linear_fp32_out",
        "linear",
        _models((FT[0], "{weight: 2}"), (FT[1], "{weight: 1}"), base=FT[0], extra="dtype: float32\nout_dtype: float32\n"),
        donor=FT[0],
        description="float32 math and output",
    ),
    _method_case("task_arithmetic", "task_arithmetic", _models((FT[0], "{weight: 0.7}"), (FT[1], "{weight: -0.3}"), top="lambda: 0.8")),
    _method_case("ties", "ties", _models(*((m, p[:-1] + ", density: 0.5}") for m, p in W3)), **SHARDS_2M),
    _method_case(
        "ties_int8_gradients_no_normalize",
        "ties",
        _models(
            (FT[0], f"{{weight: {_FILTERED_WEIGHT}, density: [0.3, 0.9]}}"),
            (FT[1], "{weight: 0.5, density: 0.7}"),
            (FT[2], "{weight: [0.2, 1.0]}"),
            top="int8_mask: true\nnormalize: false\ndensity: 0.4",
        ),
        description="int8_mask, normalize: false, density and weight gradients, filters, top-level fallback",
    ),
    _method_case(
        "ties_fp32",
        "ties",
        _models(*((m, p[:-1] + ", density: 0.6}") for m, p in W3), extra="dtype: float32\n"),
        description="TIES computed in float32 (dtype: float32), float32 output",
    ),
    _method_case(
        "ties_lambda_out_fp16",
        "ties",
        _models(*((m, p[:-1] + ", density: 0.8}") for m, p in W3), top="lambda: 1.3", extra="dtype: bfloat16\nout_dtype: float16\n"),
    ),
    _method_case("dare_ties_dense", "dare_ties", _models(*((m, p[:-1] + ", density: 1.0}") for m, p in W3))),
    _method_case("dare_ties", "dare_ties", _models(*((m, p[:-1] + ", density: 0.5}") for m, p in W3)), dense="dare_ties_dense"),
    _method_case("dare_linear_dense", "dare_linear", _models((FT[0], "{weight: 0.6, density: 1.0}"), (FT[1], "{weight: 0.4, density: 1.0}"))),
    _method_case(
        "dare_linear", "dare_linear", _models((FT[0], "{weight: 0.6, density: 0.3}"), (FT[1], "{weight: 0.4, density: 0.3}")), dense="dare_linear_dense"
    ),
    _method_case("breadcrumbs", "breadcrumbs", _models((FT[0], "{weight: 0.8, density: 0.9, gamma: 0.02}"), (FT[1], "{weight: 0.5, density: 0.8}"))),
    _method_case("breadcrumbs_ties", "breadcrumbs_ties", _models(*((m, p[:-1] + ", density: 0.85, gamma: 0.05}") for m, p in W3))),
    _method_case("della_dense", "ties", _models(*((m, p[:-1] + ", density: 1.0}") for m, p in W3))),
    _method_case("della", "della", _models(*((m, p[:-1] + ", density: 0.6, epsilon: 0.1}") for m, p in W3)), dense="della_dense"),
    _method_case("della_linear_dense", "task_arithmetic", _models((FT[0], "{weight: 0.6}"), (FT[1], "{weight: 0.4}"))),
    _method_case(
        "della_linear",
        "della_linear",
        _models((FT[0], "{weight: 0.6, density: 0.5, epsilon: 0.2}"), (FT[1], "{weight: 0.4, density: 0.5}")),
        dense="della_linear_dense",
    ),
    _method_case("model_stock", "model_stock", _models((FT[0], ""), (FT[1], ""), (FT[2], ""))),
    _method_case("model_stock_filter_wise", "model_stock", _models((FT[0], ""), (FT[1], ""), top="filter_wise: true")),
    _method_case("nuslerp", "nuslerp", _models((FT[0], "{weight: 0.7}"), (FT[1], "{weight: 0.3}"), base=None), donor=FT[0]),
    _method_case(
        "nuslerp_base_row_wise", "nuslerp", _models((FT[0], "{weight: 0.5}"), (FT[1], "{weight: 0.8}"), top="nuslerp_flatten: false\nnuslerp_row_wise: true")
    ),
    _method_case("multislerp", "multislerp", _models((FT[0], "{weight: 0.5}"), (FT[1], "{weight: 0.3}"), (FT[2], "{weight: 0.2}"), base=None), donor=FT[0]),
    _method_case("multislerp_base", "multislerp", _models((FT[0], "{weight: 0.5}"), (FT[1], "{weight: 0.5}"), top="normalize_weights: false")),
    _method_case("karcher", "karcher", _models((FT[0], ""), (FT[1], ""), (FT[2], ""), base=FT[0], top="max_iter: 5\ntol: 1.0e-6"), donor=FT[0]),
    _method_case("sce", "sce", _models((FT[0], ""), (FT[1], ""), (FT[2], ""), top="select_topk: 0.5")),
    _method_case("nearswap", "nearswap", _models((FT[0], ""), top="t: 0.0005")),
    _method_case("arcee_fusion", "arcee_fusion", _models((FT[0], "")), exact_up_to=1_000_000),
    _method_case("ram", "ram", _models((FT[0], ""), (FT[1], ""))),
    _method_case("ramplus_tl", "ramplus_tl", _models((FT[0], ""), (FT[1], ""), top="r: 0.2\nalpha: 0.3")),
    Case(
        name="ties_slices",
        description="TIES over slices: per-slice base_model and parameters, source parameters, a layer-range remap",
        recipe=f"""\
slices:
  - sources:
      - model: <<model:{BASE}>>
        layer_range: [0, 4]
      - model: <<model:{FT[0]}>>
        layer_range: [0, 4]
        parameters: {{weight: 0.6, density: 0.5}}
      - model: <<model:{FT[1]}>>
        layer_range: [0, 4]
        parameters: {{weight: 0.4, density: [0.2, 0.8]}}
    parameters:
      normalize: false
  - sources:
      - model: <<model:{BASE}>>
        layer_range: [4, 8]
      - model: <<model:{FT[2]}>>
        layer_range: [2, 6]
        parameters: {{weight: 1.0, density: 0.3}}
merge_method: ties
base_model: <<model:{BASE}>>
dtype: bfloat16
""",
        donor=BASE,
        tags=("method", "ties", "slices"),
    ),
    Case(
        name="ties_stage_slerp",
        description="the second stage of a pipeline whose first stage is TIES (case ties): SLERP of that TIES output with the base",
        recipe=f"""\
models:
  - model: <<case:ties>>
  - model: <<model:{BASE}>>
merge_method: slerp
base_model: <<model:{BASE}>>
parameters:
  t: [0.2, 0.7]
dtype: bfloat16
""",
        depends=("ties",),
        donor=BASE,
        tags=("method", "slerp", "pipeline"),
    ),
)

CASES = CASES + METHOD_CASES

CASES_BY_NAME: dict[str, Case] = {c.name: c for c in CASES}


def mergekit_args(case: Case, recipe_path: str, out_dir: str) -> list[str]:
    """The mergekit-yaml argument list (after the program name) that make_golden.py used."""
    return [recipe_path, out_dir, *COMMON_CLI, "--num-threads", str(case.threads), *case.cli]
