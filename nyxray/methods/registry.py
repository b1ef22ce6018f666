"""Every merge method nyxray runs, by name: the table of contents of :mod:`nyxray.methods`.

Each entry is a declaration (:class:`~nyxray.methods.base.Method`); its math lives in the module
named by ``merge`` and is imported on first use, so planning never loads torch. The recipe parser
validates parameters against these declarations, the planner resolves them per tensor, and
``nyxray plan``, the model card and the README's support table are generated from them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import did_you_mean
from .base import Method, Param

if TYPE_CHECKING:  # planning never loads torch: only the math and this helper's callers do
    import torch

_DENSITY = dict(low=0.0, high=1.0, low_open=True)


def _della_window(values: dict) -> str | None:
    """DELLA keeps entries with probabilities density +/- epsilon: both ends must be in (0, 1)."""
    density, epsilon = values["density"], values["epsilon"]
    if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        return f"density={density:g} with epsilon={epsilon:g}: density +/- epsilon must lie inside (0, 1)"
    return None


def _gta(name: str, pretty: str, consensus: str | None, sparsify: str | None, normalize: bool, rescale: bool, ref: str) -> Method:
    """One of the generalized task arithmetic family: one function, two switches."""
    params = [
        Param("weight", float, scope="non_base", doc="scale of this model's task vector"),
        Param("density", float, 1.0, "non_base", **_DENSITY, doc="fraction of the task vector kept"),
        Param("normalize", bool, normalize, doc="divide by the sum of the weights"),
        Param("rescale", bool, rescale, doc="rescale the kept entries to the task vector's L1 norm"),
        Param("lambda", float, 1.0, doc="scale of the merged task vector"),
        Param("int8_mask", bool, False, doc="store the sign-consensus mask as int8 (memory)"),
    ]
    if sparsify == "magnitude_outliers":
        params.append(Param("gamma", float, 0.01, "non_base", low=0.0, doc="fraction of the largest entries dropped"))
    if sparsify == "della_magprune":
        params.append(Param("epsilon", float, 0.15, "non_base", low=0.0, doc="spread of keep probabilities around density"))
    return Method(
        name,
        pretty,
        tuple(params),
        "task_arithmetic:merge",
        base="required",
        random=sparsify in ("random", "della_magprune"),
        options=(("consensus", consensus), ("sparsify", sparsify)),
        reference=ref,
        input_rule=_della_window if sparsify == "della_magprune" else None,
        # with a sign consensus the divisor is the per-element sum of the weights that agree
        divides_by_weight_sum="normalize" if consensus is None else None,
        elementwise=sparsify is None,  # every sparsification ranks or samples over the whole tensor
    )


_ALL = (
    Method(
        "passthrough",
        "Passthrough",
        (Param("scale", float, None, "input", doc="multiply the tensor by this"),),
        "passthrough:merge",
        base="ignored",
        max_inputs=1,
        copies_unless="scale",
        elementwise=True,
    ),
    Method(
        "slerp",
        "SLERP",
        (Param("t", float, doc="0 gives the base model, 1 the other"),),
        "slerp:merge",
        base="required",
        min_inputs=2,
        max_inputs=2,
        optional_policy="passthrough_singleton",
        card_names_base=False,
        chunked="slerp:merge_chunks",
    ),
    Method(
        "linear",
        "Linear",
        (Param("weight", float, scope="input"), Param("normalize", bool, True)),
        "linear:merge",
        base="ignored",
        divides_by_weight_sum="normalize",
        elementwise=True,
        reference="https://arxiv.org/abs/2203.05482",
    ),
    _gta("task_arithmetic", "Task Arithmetic", None, None, False, False, "https://arxiv.org/abs/2212.04089"),
    _gta("ties", "TIES", "sum", "magnitude", True, False, "https://arxiv.org/abs/2306.01708"),
    _gta("dare_ties", "DARE TIES", "sum", "random", False, True, "https://arxiv.org/abs/2311.03099"),
    _gta("dare_linear", "Linear DARE", None, "random", False, True, "https://arxiv.org/abs/2311.03099"),
    _gta("breadcrumbs", "Model Breadcrumbs", None, "magnitude_outliers", False, False, "https://arxiv.org/abs/2312.06795"),
    _gta("breadcrumbs_ties", "Model Breadcrumbs with TIES", "sum", "magnitude_outliers", False, False, "https://arxiv.org/abs/2312.06795"),
    _gta("della", "DELLA", "sum", "della_magprune", True, True, "https://arxiv.org/abs/2406.11617"),
    _gta("della_linear", "Linear DELLA", None, "della_magprune", False, True, "https://arxiv.org/abs/2406.11617"),
    Method(
        "model_stock",
        "Model Stock",
        (Param("filter_wise", bool, False, doc="one ratio per row instead of per tensor"),),
        "model_stock:merge",
        base="required",
        min_inputs=3,
        optional_policy="base_or_skip",
        reference="https://arxiv.org/abs/2403.19522",
    ),
    Method(
        "nuslerp",
        "NuSLERP",
        (Param("weight", float, scope="non_base"), Param("nuslerp_row_wise", bool, False), Param("nuslerp_flatten", bool, True)),
        "nuslerp:merge",
        min_non_base=2,
        max_non_base=2,
        optional_policy="passthrough_singleton",
    ),
    Method(
        "multislerp",
        "Multi-SLERP",
        (Param("weight", float, scope="non_base"), Param("normalize_weights", bool, True), Param("eps", float, 1e-8, low=0.0)),
        "multislerp:merge",
        min_non_base=1,
        divides_by_weight_sum="normalize_weights",
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    ),
    Method(
        "karcher",
        "Karcher Mean",
        (Param("max_iter", int, 10, low=1), Param("tol", float, 1e-5, low=0.0)),
        "karcher:merge",
        base="ignored",
        reference="https://arxiv.org/abs/2603.04972",
    ),
    Method(
        "sce",
        "SCE",
        (Param("int8_mask", bool, False), Param("select_topk", float, 1.0, **_DENSITY)),
        "sce:merge",
        base="required",
        reference="https://arxiv.org/abs/2408.07990",
    ),
    Method(
        "nearswap",
        "NearSwap",
        (Param("t", float, low=0.0),),
        "nearswap:merge",
        base="required",
        min_inputs=2,
        max_inputs=2,
        optional_policy="passthrough_base_singleton",
        elementwise=True,
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    ),
    Method(
        "arcee_fusion",
        "Arcee Fusion",
        (),
        "arcee_fusion:merge",
        base="required",
        min_inputs=2,
        max_inputs=2,
        optional_policy="passthrough_singleton",
        random=True,
        float32_result=True,
        reference="https://arcee.ai",
        note="byte-identical up to 1,000,000 elements; above, its quartiles come from a seeded sample: reproducible",
    ),  # samples past 1M elements
    Method(
        "ram",
        "Reinforced Agent Merging",
        (Param("epsilon", float, 1e-5, low=0.0),),
        "ram:merge_ram",
        base="required",
        reference="https://arxiv.org/abs/2601.13572",
    ),
    Method(
        "ramplus_tl",
        "Reinforced Agent Merging Plus (Tensor-Local)",
        (Param("r", float, 0.1, low=0.0), Param("alpha", float, 0.2, low=0.0), Param("epsilon", float, 1e-5, low=0.0)),
        "ram:merge_ramplus_tl",
        base="required",
        float32_result=True,
        reference="https://arxiv.org/abs/2601.13572",
    ),
)

METHODS: dict[str, Method] = {m.name: m for m in _ALL}
if len(METHODS) != len(_ALL):  # a second entry of one name would silently replace the first
    raise ValueError(f"two methods share a name: {sorted(m.name for m in _ALL if [n.name for n in _ALL].count(m.name) > 1)}")


def get(name: str) -> Method | None:
    return METHODS.get(name)


def unknown_method_hint(name: str) -> str:
    return f"{did_you_mean(name, tuple(METHODS))}; nyxray supports {', '.join(METHODS)}"


def merge_tensors(name: str, tensors: Sequence[torch.Tensor], base: int | None = None, generator: torch.Generator | None = None, **values: Any) -> torch.Tensor:
    """Run method ``name`` on tensors in memory (tests, notebooks, the parity script): ``values``
    set parameters, a per-input one as a list or as one value for every input of its scope; the
    others take their declared defaults. ``generator`` feeds a random method's draws."""
    from .base import REQUIRED, Group

    method = METHODS[name]
    count = {"input": len(tensors), "non_base": len(tensors) - (base is not None)}
    params: dict[str, Any] = {}
    per_input: dict[str, list[Any]] = {}
    for p in method.params:
        value = values.get(p.name, p.default)
        if value is REQUIRED:
            raise TypeError(f"{name} needs a value for {p.name}")
        if p.scope == "shared":
            params[p.name] = value
        else:
            per_input[p.name] = list(value) if isinstance(value, (list, tuple)) else [value] * count[p.scope]
    return function(method)(Group(list(tensors), base, params, per_input, generator))


def function(method: Method, kind: str = "merge") -> Callable:
    """The method's math (``kind``: "merge", or "chunked" for its chunked form), imported on first
    use (``module:function`` under nyxray.methods)."""
    module, _, attr = getattr(method, kind).partition(":")
    fn = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
    return partial(fn, **dict(method.options)) if method.options else fn
