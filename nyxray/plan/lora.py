"""LoRA references (``model+adapter``): an adapter planned from its config and header, applied
to the model's weights as the units read them.

mergekit 0.1.5 merges an adapter into a full copy of its model first: transformers loads the
model with every floating tensor in one dtype (``--lora-merge-dtype``, else the config's
``dtype``/``torch_dtype``, else the checkpoint's first floating dtype), peft adds
``scale * (B @ A)`` to each weight the adapter holds factors for (``merge_and_unload``), and
the merge reads that copy. nyxray plans the same values as expressions: a weight the adapter
changes becomes a :class:`~nyxray.plan.expr.Lora` node over the weight's and the adapter's
bytes, every other floating tensor a cast to the load dtype. Nothing is written first; the
adapter's bytes are read by the units that need them (and counted in the plan's reads); the
arithmetic is :func:`nyxray.execute.evaluate._lora`. Whatever an adapter holds besides plain
LoRA is refused here, naming the adapter and the field, before any tensor byte is read.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ModelError, NyxrayError, did_you_mean
from ..io.location import Location
from ..io.safetensors import RECIPE_DTYPES, TensorInfo
from ..recipe.parse import split_reference
from .expr import Expr, Leaf, Lora, cast
from .sources import Model, Resolver, load_model, read_header, read_json

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's prefix of every saved adapter tensor
FACTORS = {".lora_A.weight": "a", ".lora_B.weight": "b"}
FLOATS = ("F16", "BF16", "F32", "F64")
LORA_DTYPES = {name: st for name, st in RECIPE_DTYPES.items() if st in FLOATS}
# init_lora_weights values that only pick A's and B's starting values, which the trained ones
# replace on load; the others (PiSSA, OLoRA, CorDA, LoftQ...) rewrite the model's own weights.
INITS = (True, False, "gaussian")

# adapter_config.json fields that make an adapter more than plain LoRA (W + scale * B @ A on the
# linear layers it names): refused when set, with what they do.
NOT_PLAIN: dict[str, str] = {
    "use_dora": "DoRA rescales each weight by a learned magnitude",
    "lora_bias": "it trains a bias with lora_B",
    "modules_to_save": "it replaces whole modules with trained copies",
    "trainable_token_indices": "it replaces rows of the embeddings",
    "layers_to_transform": "it restricts the layers the adapter applies to",
    "layers_pattern": "it restricts the layers the adapter applies to",
    "exclude_modules": "it removes modules from target_modules",
    "layer_replication": "it duplicates layers of the model",
    "target_parameters": "it adapts raw parameters (MoE experts), not linear layers",
    "use_qalora": "QA-LoRA pools the input features",
    "alora_invocation_tokens": "activated LoRA applies only after given tokens",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "velora_config": "VeLoRA changes the factors",
    "monteclora_config": "MonteCLoRA samples the factors",
    "arrow_config": "Arrow routes between several adapters",
    "kasa_config": "KaSA changes the factors",
}
# Other tensor kinds an adapter file may hold, by name suffix, and why they are refused.
OTHER_TENSORS = {
    ".lora_embedding_A": "LoRA on an embedding layer is not implemented",
    ".lora_embedding_B": "LoRA on an embedding layer is not implemented",
    ".lora_magnitude_vector": "DoRA magnitudes are not implemented",
    ".lora_B.bias": "a lora_B bias is not implemented",
}


def lora_merge_dtype(value: Any) -> str | None:
    """``--lora-merge-dtype`` / ``lora_merge_dtype=`` checked (mergekit's names, an optional
    ``torch.`` prefix): the dtype name, or None (each model's own dtype, as mergekit)."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in LORA_DTYPES:
        raise NyxrayError(f"lora_merge_dtype {value!r}: expected one of {', '.join(LORA_DTYPES)}{did_you_mean(name, tuple(LORA_DTYPES))}")
    return name


@dataclass(frozen=True)
class AdapterPlan:
    """What the plan shows of one ``model+adapter`` reference."""

    ref: str  # the adapter's reference
    loc: Location
    dtype: str  # the dtype the model's floating tensors are loaded in (safetensors name)
    weights: tuple[str, ...]  # the model's weights it changes
    header_bytes: int

    def reads(self, leaf: Leaf) -> bool:
        """Whether ``leaf`` is one of this adapter's tensors."""
        return leaf.file == WEIGHTS and leaf.loc.display == self.loc.display


@dataclass(frozen=True)
class _Settings:
    """The fields of adapter_config.json that decide the arithmetic."""

    r: int
    alpha: float
    rslora: bool
    targets: list[str] | str
    rank_pattern: dict
    alpha_pattern: dict

    def scale(self, module: str, r: int) -> float:
        """peft's scaling of ``module``: alpha / r, or alpha / sqrt(r) with rsLoRA (alpha_pattern
        may override alpha). The same Python float arithmetic as peft's, so the same bits."""
        alpha = _pattern(self.alpha_pattern, module, self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def targets_module(self, module: str) -> bool:
        """peft's match of target_modules: a regex over the whole name, or a list of names or
        name suffixes; ``all-linear`` is every linear layer but the output head."""
        if isinstance(self.targets, str):
            return self.targets == "all-linear" or re.fullmatch(self.targets, module) is not None
        return any(module == t or module.endswith("." + t) for t in self.targets)


def _pattern(pattern: dict, module: str, default: Any) -> Any:
    """rank_pattern / alpha_pattern: the value of the first key that matches the end of the
    module's name at a dot boundary (peft's rule), else the default."""
    key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", module)), None)
    return default if key is None else pattern[key]


def _is_set(value: Any) -> bool:
    return not (value is None or value is False or value == [] or value == {} or value == "")


def _settings(cfg: Any, label: str) -> _Settings:
    """The adapter's config, refused unless it is plain LoRA and well formed."""
    if not isinstance(cfg, dict):
        raise ModelError(f"{label}: {CONFIG} is not a JSON object")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise ModelError(f"{label}: peft_type {kind!r} is not supported: only plain LoRA adapters (peft_type LORA) are applied")
    for key, why in NOT_PLAIN.items():
        if _is_set(cfg.get(key)):
            raise ModelError(f"{label}: {key}={cfg[key]!r} is not supported: {why}; only plain LoRA is applied")
    if cfg.get("bias", "none") != "none":
        raise ModelError(f"{label}: bias={cfg['bias']!r} is not supported: trained biases are not applied; only bias 'none' is")
    if cfg.get("init_lora_weights", True) not in INITS:
        raise ModelError(f"{label}: init_lora_weights={cfg['init_lora_weights']!r} is not supported: peft rewrites the model's weights with it on load")
    r, alpha, targets = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("target_modules")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ModelError(f"{label}: r={r!r}: expected a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ModelError(f"{label}: lora_alpha={alpha!r}: expected a finite number")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise ModelError(f"{label}: target_modules={targets!r}: expected a list of module names or a regular expression")
    patterns = [cfg.get(k) or {} for k in ("rank_pattern", "alpha_pattern")]
    if not all(isinstance(p, dict) for p in patterns):
        raise ModelError(f"{label}: rank_pattern and alpha_pattern must be mappings of module name to value")
    return _Settings(r, alpha, bool(cfg.get("use_rslora")), targets, *patterns)


def _factors(tensors: dict[str, TensorInfo], label: str) -> dict[str, dict[str, TensorInfo]]:
    """The adapter's A and B per module (``model.layers.0.self_attn.q_proj``), from peft's names
    ``base_model.model.<module>.lora_A.weight``; any other tensor is refused by name."""
    out: dict[str, dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        suffix = next((s for s in FACTORS if name.endswith(s)), None)
        if not name.startswith(PREFIX) or suffix is None:
            why = next((w for s, w in OTHER_TENSORS.items() if s in name), "it is not a LoRA factor (base_model.model.<module>.lora_A/lora_B.weight)")
            raise ModelError(f"{label}: tensor {name!r} is not supported: {why}; only plain LoRA is applied")
        if info.dtype not in FLOATS or len(info.shape) != 2:
            raise ModelError(f"{label}: {name} is {info.dtype} {list(info.shape)}: a LoRA factor is a 2-D float tensor")
        out.setdefault(name[len(PREFIX) : -len(suffix)], {})[FACTORS[suffix]] = info
    for module, pair in out.items():
        if len(pair) != 2:
            raise ModelError(f"{label}: {module} has lora_{'B' if 'a' in pair else 'A'}.weight missing")
    if not out:
        raise ModelError(f"{label}: {WEIGHTS} holds no LoRA factors")
    return out


def _check_fit(model: Model, s: _Settings, factors: dict[str, dict[str, TensorInfo]], label: str) -> dict[str, float]:
    """Each module's scale, once every factor fits the model: the module exists, its weight has
    the shape B @ A has, the rank is the config's; target_modules names exactly those modules."""
    scales = {}
    for module, f in sorted(factors.items()):
        weight = model.tensors.get(f"{module}.weight")
        if weight is None:
            hint = did_you_mean(f"{module}.weight", tuple(model.tensors))
            raise ModelError(f"{label}: it has factors for {module!r}, which model {model.ref!r} does not have{hint} (an adapter for another model?)")
        if not s.targets_module(module):
            raise ModelError(f"{label}: it has factors for {module!r}, which its target_modules {s.targets!r} do not name (peft would ignore them)")
        (r, n_in), (n_out, r_b) = f["a"].shape, f["b"].shape
        want = _pattern(s.rank_pattern, module, s.r)
        if r != r_b or r != want:
            raise ModelError(f"{label}: {module}: lora_A is {list(f['a'].shape)} and lora_B {list(f['b'].shape)}; the config's rank for it is {want}")
        if weight.shape != (n_out, n_in):
            layout = " (the transpose: a Conv1D layer, as in GPT-2, is not supported)" if weight.shape == (n_in, n_out) else ""
            raise ModelError(f"{label}: {module}: B @ A is {[n_out, n_in]} but {module}.weight of {model.ref!r} is {list(weight.shape)}{layout}")
        if weight.dtype not in FLOATS:
            raise ModelError(f"{label}: {module}.weight of {model.ref!r} is {weight.dtype}, not a float tensor")
        scales[module] = s.scale(module, r)
    missing = [n[: -len(".weight")] for n, e in model.tensors.items() if n.endswith(".weight") and len(e.shape) == 2 and n[: -len(".weight")] not in factors]
    unfed = [m for m in missing if s.targets != "all-linear" and s.targets_module(m)]
    if unfed:
        raise ModelError(f"{label}: target_modules {s.targets!r} names {unfed[0]!r} ({len(unfed)} module(s) in all), but the adapter has no factors for it")
    return scales


def _load_dtype(model: Model, lora_dtype: str | None) -> str:
    """The dtype transformers loads the model's floating tensors in for peft (mergekit passes
    ``--lora-merge-dtype`` as torch_dtype; without it transformers 5 takes the config's dtype,
    else the first floating tensor's of the first checkpoint file)."""
    if lora_dtype is not None:
        return LORA_DTYPES[lora_dtype]
    named = model.config.get("dtype") or model.config.get("torch_dtype")
    if isinstance(named, str) and named != "auto":
        if named.removeprefix("torch.") not in LORA_DTYPES:
            raise ModelError(f"model {model.ref!r}: config.json's dtype {named!r} is not one to load a model in; pass --lora-merge-dtype")
        return LORA_DTYPES[named.removeprefix("torch.")]
    leaves = sorted((e.file, name, e.dtype) for name, e in model.tensors.items() if isinstance(e, Leaf) and e.dtype in FLOATS)
    if not leaves:
        raise ModelError(f"model {model.ref!r}: no floating tensor to take a LoRA merge dtype from; pass --lora-merge-dtype")
    return leaves[0][2]


def apply_adapter(ref: str, model: Model, adapter: str, loc: Location, lora_dtype: str | None) -> Model:
    """``model`` with the adapter at ``loc`` merged into its tensors' expressions (``ref`` is
    the whole ``model+adapter`` reference): reads the adapter's config and header only. The
    result's ``header_bytes`` are the adapter's: the model's are counted on ``model`` itself."""
    label = f"LoRA adapter {adapter!r} (in {ref!r})"
    files = loc.listdir()
    if CONFIG not in files or WEIGHTS not in files:
        pickle = " (adapter_model.bin is a pickle, which nyxray refuses: it can run code)" if "adapter_model.bin" in files else ""
        raise ModelError(f"{label}: {loc.display} needs {CONFIG} and {WEIGHTS}{pickle}")
    settings = _settings(read_json(loc, CONFIG, adapter, "LoRA adapter"), label)
    infos, header_bytes = read_header(loc, WEIGHTS)
    factors = _factors(infos, label)
    scales = _check_fit(model, settings, factors, label)
    dtype = _load_dtype(model, lora_dtype)

    def leaf(info: TensorInfo) -> Leaf:
        return Leaf(loc, WEIGHTS, info.start, info.end, info.dtype, info.shape, adapter, info.name)

    tensors: dict[str, Expr] = {}
    for name, e in model.tensors.items():
        loaded = cast(e, dtype) if e.dtype in FLOATS else e
        f = factors.get(name[: -len(".weight")]) if name.endswith(".weight") else None
        tensors[name] = Lora(loaded, leaf(f["a"]), leaf(f["b"]), scales[name[: -len(".weight")]]) if f else loaded
    weights = tuple(f"{m}.weight" for m in sorted(factors))
    plan = AdapterPlan(adapter, loc, dtype, weights, header_bytes)
    return dataclasses.replace(model, ref=ref, tensors=tensors, header_bytes=header_bytes, adapter=plan)


def load_reference(ref: str, resolver: Resolver, cache: dict[str, Model], lora_dtype: str | None) -> Model:
    """The model a recipe reference names: a model, or a ``model+adapter`` (the model's headers
    are read once, in ``cache``, for every adapter put on it)."""
    model_ref, adapter = split_reference(ref)
    if adapter is None:
        return load_model(ref, resolver.locate(ref))
    if model_ref not in cache:
        cache[model_ref] = load_model(model_ref, resolver.locate(model_ref))
    try:
        loc = resolver.locate(adapter)
    except ModelError as e:
        raise ModelError(f"LoRA adapter of {ref!r}: {e}") from None
    return apply_adapter(ref, cache[model_ref], adapter, loc, lora_dtype)
