"""Bit-for-bit parity of nyxray's merge-method math with mergekit 0.1.5's, on the CPU.

A developer tool, not a pytest module. Run it with mergekit's venv, which can also import nyxray::

    /work/mk-venv/bin/python tests/golden/method_parity.py [METHOD ...]

Each case hands the same tensors and parameter values to mergekit's method (through its public
call, one group, mergekit running with one thread as ``--num-threads 1`` does) and to nyxray's
function (with ``NYXRAY_THREADS`` threads, so a result that depends on the thread count shows:
float32 sums split across threads change their bits).
Parameters a case leaves out take mergekit's defaults on one side and the registry's on the other,
so a wrong default shows too. Inputs are realistic: a base plus fine-tunes that are the base plus
small noise, where bf16 rounding decides the bits. Prints one row per case; exits 1 on any mismatch.
Suites: ``geometric_cases`` (model stock, NuSLERP, Multi-SLERP, Karcher, NearSwap, Arcee Fusion,
RAM), ``gta_cases`` (the task arithmetic family, linear, SCE; DARE and DELLA compared as
distributions, since nyxray draws from a per-tensor generator by design); other suites are added
to ``SUITES``. Each method's declaration (parameters, defaults,
scopes, input contract, optional-tensor policy) is also checked against mergekit's spec.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from mergekit.merge_methods import registry as mk_registry  # noqa: E402
from mergekit.merge_methods.base import MISSING, TensorGroup  # noqa: E402

from nyxray.methods import registry  # noqa: E402
from nyxray.methods.base import REQUIRED  # noqa: E402

BIG = (1100, 1000)  # over 2**20 elements (and over arcee_fusion's 1,000,000-element sample)
MATRIX = (96, 80)
NORM = (256,)  # a 1-D layer norm weight, around 1
NYXRAY_THREADS = 4  # nyxray's side runs with several threads, mergekit's with one


@dataclass
class Case:
    """One call: ``tensors`` in model order, ``base`` indexing the base model (or None).

    ``params`` and ``per_input`` hold only what the recipe would set; ``per_input`` lists are
    aligned as the parameter's scope says (non-base inputs in order, or every input).
    """

    method: str
    label: str
    tensors: list[torch.Tensor]
    base: int | None
    params: dict[str, Any] = field(default_factory=dict)
    per_input: dict[str, list[Any]] = field(default_factory=dict)
    seed: int | None = None  # seeds torch's global generator for mergekit, group.generator for nyxray
    # (ours, theirs) -> (acceptable, what it measured): replaces bit-equality for random methods
    check: Callable[[torch.Tensor, torch.Tensor], tuple[bool, str]] | None = None


def models(shape: tuple[int, ...], count: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0, noise: float = 0.05) -> list[torch.Tensor]:
    """A base then ``count - 1`` fine-tunes: base + noise, the noise ``noise`` times the base's scale."""
    g = torch.Generator().manual_seed(seed)
    scale = 0.02
    base = (1.0 + 0.05 * torch.randn(shape, generator=g)) if len(shape) == 1 else scale * torch.randn(shape, generator=g)
    tuned = [base + noise * scale * torch.randn(shape, generator=g) for _ in range(count - 1)]
    return [t.to(dtype) for t in [base, *tuned]]


def mergekit_result(case: Case) -> torch.Tensor:
    method = mk_registry.get(case.method)
    group = TensorGroup.from_tensors(case.tensors, base_index=case.base)
    if case.seed is not None:
        torch.manual_seed(case.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (out,) = method((group,), parameters={**case.params, **case.per_input})
    finally:
        torch.set_num_threads(threads)
    return out


def nyxray_result(case: Case) -> torch.Tensor:
    generator = torch.Generator().manual_seed(case.seed) if case.seed is not None else None
    threads = torch.get_num_threads()
    torch.set_num_threads(NYXRAY_THREADS)
    try:
        return registry.merge_tensors(case.method, case.tensors, case.base, generator, **case.params, **case.per_input)
    finally:
        torch.set_num_threads(threads)


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[bool, str]:
    """(bit-equal, what differs): dtype, shape, or the largest difference and how many elements."""
    if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
        return False, f"ours {ours.dtype} {tuple(ours.shape)} vs {theirs.dtype} {tuple(theirs.shape)}"
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[ours.element_size()]
    if torch.equal(ours.contiguous().view(ints), theirs.contiguous().view(ints)):
        return True, ""
    diff = (ours.double() - theirs.double()).abs().nan_to_num(float("inf"))
    differing = int((ours.contiguous().view(ints) != theirs.contiguous().view(ints)).sum())
    return False, f"max |diff| {diff.max().item():.3g}, {differing} of {ours.numel()} elements"


def declaration_problem(name: str) -> str | None:
    """How nyxray's declaration of a method differs from mergekit's spec (parameters with their scope,
    default and type, in any order; input contract; optional-tensor policy), or None. Ranges are nyxray's own."""
    spec, ours = mk_registry.get(name).spec, registry.get(name)
    assert ours is not None, name
    c = spec.contract
    theirs = (
        c.base.value,
        c.min_inputs,
        c.max_inputs,
        c.min_non_base,
        c.max_non_base,
        spec.optional_tensor_policy.value,
        sorted((p.name, p.scope.value, None if p.default is MISSING else p.default, p.value_type) for p in spec.parameters),
    )
    mine = (
        ours.base,
        ours.min_inputs,
        ours.max_inputs,
        ours.min_non_base,
        ours.max_non_base,
        ours.optional_policy,
        sorted((p.name, p.scope, None if p.default is REQUIRED else p.default, p.kind) for p in ours.params),
    )
    return None if theirs == mine else f"mergekit {theirs}\n  nyxray   {mine}"


def geometric_cases() -> list[Case]:
    """Model stock, NuSLERP, Multi-SLERP, Karcher, NearSwap, Arcee Fusion, RAM and RAM+."""
    cases: list[Case] = []
    shapes = {"big": BIG, "matrix": MATRIX, "norm": NORM}

    def each_shape(method: str, label: str, count: int, base: int | None, **kw: Any) -> None:
        for name, shape in shapes.items():
            cases.append(Case(method, f"{label} {name}", models(shape, count), base, **kw))
        cases.append(Case(method, f"{label} big f32", models(BIG, count, torch.float32), base, **kw))
        cases.append(Case(method, f"{label} matrix f16", models(MATRIX, count, torch.float16), base, **kw))

    for fw in (False, True):
        each_shape("model_stock", f"base+2 filter_wise={fw}", 3, 0, params={"filter_wise": fw})
        base, *tuned = models(MATRIX, 4, seed=1)
        cases.append(Case("model_stock", f"base+3 base 3rd filter_wise={fw}", [*tuned[:2], base, tuned[2]], 2, params={"filter_wise": fw}))
    cases.append(Case("model_stock", "base+3 default", models(BIG, 4, seed=2), 0))

    w = {"weight": [0.3, 0.7]}
    for flat, row in ((True, False), (False, False), (False, True)):
        opts = {"nuslerp_flatten": flat, "nuslerp_row_wise": row}
        each_shape("nuslerp", f"base+2 flatten={flat} row_wise={row}", 3, 0, params=opts, per_input=w)
        cases.append(Case("nuslerp", f"no base flatten={flat} row_wise={row}", models(MATRIX, 3)[1:], None, params=opts, per_input=w))
    cases.append(Case("nuslerp", "base 2nd, defaults, weights sum 0", models(MATRIX, 3, seed=3), 1, per_input={"weight": [1.0, -1.0]}))

    each_shape("multislerp", "base+3", 4, 0, per_input={"weight": [0.5, 0.3, 0.2]})
    cases.append(Case("multislerp", "no base, 3", models(MATRIX, 3, seed=4), None, per_input={"weight": [1.0, 2.0, 3.0]}))
    cases.append(
        Case(
            "multislerp",
            "base+3 normalize_weights=False",
            models(MATRIX, 4, seed=5),
            0,
            params={"normalize_weights": False},
            per_input={"weight": [0.5, 0.3, 0.2]},
        )
    )
    cases.append(Case("multislerp", "base+2 eps=1e-3", models(NORM, 3, seed=6), 0, params={"eps": 1e-3}, per_input={"weight": [1.0, 1.0]}))
    cases.append(Case("multislerp", "base+1 (the model itself)", models(MATRIX, 2), 0, per_input={"weight": [1.0]}))
    antipodes = models(MATRIX, 1, seed=7)[0]
    cases.append(Case("multislerp", "two antipodes: linear", [antipodes, -antipodes], None, per_input={"weight": [1.0, 1.0]}))

    each_shape("karcher", "3 models", 3, None)
    cases.append(Case("karcher", "base given (ignored)", models(MATRIX, 4, seed=8), 0))
    cases.append(Case("karcher", "max_iter=1", models(MATRIX, 3, seed=9), None, params={"max_iter": 1}))
    cases.append(Case("karcher", "max_iter=30 tol=1e-3", models(MATRIX, 3, seed=9), None, params={"max_iter": 30, "tol": 1e-3}))
    cases.append(Case("karcher", "2 models", models(NORM, 2, seed=10), None))
    cases.append(Case("karcher", "1 model", models(MATRIX, 1), None))
    cases.append(Case("karcher", "a zero input", [*models(MATRIX, 2), torch.zeros(MATRIX, dtype=torch.bfloat16)], None))

    for t in (1e-4, 1e-3, 1e-2):
        each_shape("nearswap", f"t={t:g}", 2, 0, params={"t": t})
    cases.append(Case("nearswap", "base 2nd t=0.001", models(MATRIX, 2, seed=11), 1, params={"t": 1e-3}))

    each_shape("arcee_fusion", "base+1 (big: same seed both sides)", 2, 0, seed=1234)
    cases.append(Case("arcee_fusion", "base 2nd", models(MATRIX, 2, seed=12), 1))

    for method, variants in (("ram", ({}, {"epsilon": 1e-3})), ("ramplus_tl", ({}, {"r": 0.5, "alpha": 0.6}, {"epsilon": 1e-3, "r": 0.3}))):
        for params in variants:
            each_shape(method, f"base+3 {params or 'defaults'}", 4, 0, params=params)
        cases.append(Case(method, "base 2nd, base+2", models(MATRIX, 3, seed=13), 1))
        cases.append(Case(method, "base alone", models(MATRIX, 1), 0))
    return cases


def gta_cases() -> list[Case]:
    """The task arithmetic family, linear and SCE: bit-exact cases over a grid of parameters, and
    statistical cases for the random ones (DARE, DELLA)."""
    cases: list[Case] = []
    shapes = {"big": BIG, "matrix": MATRIX, "norm": NORM}
    w3 = {"weight": [0.3, 0.5, 0.2]}
    signed = {"weight": [1.0, -0.5, 0.7]}

    def each_shape(method: str, label: str, count: int = 4, **kw: Any) -> None:
        for name, shape in shapes.items():
            cases.append(Case(method, f"{label} {name}", models(shape, count), 0, **kw))
        cases.append(Case(method, f"{label} big f32", models(BIG, count, torch.float32), 0, **kw))

    # task_arithmetic: no sparsification, no consensus
    each_shape("task_arithmetic", "base+3 w=.3,.5,.2", per_input=w3)
    each_shape("task_arithmetic", "base+3 w=1,-.5,.7 normalize lambda=.7", params={"normalize": True, "lambda": 0.7}, per_input=signed)
    cases.append(
        Case(
            "task_arithmetic", "base 2nd, weights sum 0, normalize", models(MATRIX, 3, seed=1), 1, params={"normalize": True}, per_input={"weight": [0.5, -0.5]}
        )
    )
    cases.append(Case("task_arithmetic", "base alone", models(MATRIX, 1), 0, per_input={"weight": []}))
    cases.append(Case("task_arithmetic", "base+2 f16", models(MATRIX, 3, torch.float16, seed=2), 0, per_input={"weight": [0.6, 0.4]}))

    # ties: magnitude top-k, sign consensus
    for density in (1.0, 0.5, 0.1):
        each_shape("ties", f"base+3 density={density}", per_input=w3 | {"density": density})
    each_shape("ties", "base+3 w=1,-.5,.7 densities .3,.5,.9 int8_mask", params={"int8_mask": True}, per_input=signed | {"density": [0.3, 0.5, 0.9]})
    each_shape(
        "ties", "base+3 normalize=False lambda=1.3 rescale", params={"normalize": False, "lambda": 1.3, "rescale": True}, per_input=w3 | {"density": 0.4}
    )
    cases.append(Case("ties", "base 3rd, weights sum 0 at some entries", models(MATRIX, 4, seed=3), 2, per_input={"weight": [1.0, -1.0, 0.5], "density": 0.6}))
    cases.append(Case("ties", "base+1 density=0.3", models(NORM, 2, seed=4), 0, per_input={"weight": [1.0], "density": 0.3}))
    cases.append(Case("ties", "base+2 f16 density=0.5", models(MATRIX, 3, torch.float16, seed=5), 0, per_input={"weight": [0.6, 0.4], "density": 0.5}))

    # breadcrumbs: drop the largest gamma and the smallest
    for gamma, density in ((0.01, 0.9), (0.1, 0.5), (0.5, 0.7)):  # the last: gamma + density > 1
        each_shape("breadcrumbs", f"base+3 gamma={gamma} density={density}", per_input=w3 | {"density": density, "gamma": gamma})
    each_shape(
        "breadcrumbs", "base+3 w=1,-.5,.7 default gamma rescale normalize", params={"rescale": True, "normalize": True}, per_input=signed | {"density": 0.6}
    )
    each_shape(
        "breadcrumbs_ties",
        "base+3 gammas .02,.1,0 densities .8,.5,.3 lambda=.5",
        params={"lambda": 0.5},
        per_input=signed | {"density": [0.8, 0.5, 0.3], "gamma": [0.02, 0.1, 0.0]},
    )
    each_shape("breadcrumbs_ties", "base+3 default gamma normalize int8_mask", params={"normalize": True, "int8_mask": True}, per_input=w3 | {"density": 0.5})

    # the random ones with density 1 draw nothing: bit-exact too
    for method in ("dare_ties", "dare_linear", "della", "della_linear"):
        cases.append(Case(method, "base+3 density=1", models(MATRIX, 4, seed=6), 0, per_input=signed))

    # linear: every input weighted, in model order, float32 accumulation
    linear4 = {"weight": [0.4, 0.3, 0.2, 0.1]}
    for name, shape in shapes.items():
        cases.append(Case("linear", f"4 models {name}", models(shape, 4), None, per_input=linear4))
    cases.append(Case("linear", "4 models big f32", models(BIG, 4, torch.float32), None, per_input=linear4))
    cases.append(
        Case(
            "linear",
            "4 models f16 w=2,-1,.5,.25 normalize=False",
            models(MATRIX, 4, torch.float16),
            None,
            params={"normalize": False},
            per_input={"weight": [2.0, -1.0, 0.5, 0.25]},
        )
    )
    cases.append(Case("linear", "4 models f64 w=.1,.2,.3,.4", models(MATRIX, 4, torch.float64), None, per_input={"weight": [0.1, 0.2, 0.3, 0.4]}))
    cases.append(Case("linear", "base 2nd (ignored) w=1,-.3,.5", models(BIG, 3, seed=7), 1, per_input={"weight": [1.0, -0.3, 0.5]}))
    cases.append(Case("linear", "1 model w=.7 normalize=False", models(MATRIX, 1), None, params={"normalize": False}, per_input={"weight": [0.7]}))

    # sce: variance selection, mean-square weights, sign election
    for topk in (1.0, 0.5, 0.05):
        each_shape("sce", f"base+3 select_topk={topk}", params={"select_topk": topk})
    each_shape("sce", "base+3 select_topk=.3 int8_mask", params={"select_topk": 0.3, "int8_mask": True})
    cases.append(Case("sce", "base+3 tiny deltas (equal weights)", models(BIG, 4, seed=8, noise=0.001), 0))
    cases.append(Case("sce", "base 2nd base+2", models(MATRIX, 3, seed=9), 1, params={"select_topk": 0.5}))
    cases.append(Case("sce", "base alone", models(MATRIX, 1), 0))
    return cases + _random_gta_cases()


def _random_gta_cases() -> list[Case]:
    """DARE and DELLA, compared as distributions with a mergekit run seeded differently (see
    :func:`_statistically`). One fine-tune at a time shows the kept fraction (an entry is kept where
    the output leaves the base); three show the distance from the dense merge (density 1)."""
    cases: list[Case] = []

    def add(case: Case, density: float | None = None) -> None:
        case.check = _statistically(case, density)
        cases.append(case)

    for method, extra in (("dare_linear", {}), ("dare_ties", {}), ("della_linear", {"epsilon": 0.1}), ("della", {"epsilon": 0.15})):
        for density, rescale in ((0.3, True), (0.7, False)):
            for dtype in (torch.bfloat16, torch.float32):
                label = f"base+1 density={density} rescale={rescale} {str(dtype).removeprefix('torch.')}"
                per_input = {"weight": [1.0], "density": [density]} | {k: [v] for k, v in extra.items()}
                add(Case(method, label, models(BIG, 2, dtype, seed=10, noise=1.0), 0, params={"rescale": rescale}, per_input=per_input, seed=1), density)
        per_input = {"weight": [0.5, -0.3, 0.8], "density": [0.3, 0.5, 0.6]} | {k: [v] * 3 for k, v in extra.items()}
        add(Case(method, "base+3 densities .3,.5,.6", models(BIG, 4, seed=11), 0, per_input=per_input, seed=2))
    return cases


def _statistically(case: Case, density: float | None) -> Callable[[torch.Tensor, torch.Tensor], tuple[bool, str]]:
    """A check that nyxray's output of a random ``case`` lies as far from the dense merge (density 1)
    as mergekit's output with another seed (mean |output - dense| within 3%) and, given the one
    fine-tune's ``density``, keeps the same fraction of entries (within 0.005; for DARE also within
    0.005 of ``density`` as the work dtype rounds it). Also says whether mergekit with the same seed
    gave the same bits (torch's CPU bernoulli draws as nyxray does): informative, not required."""

    def check(ours: torch.Tensor, same_seed: torch.Tensor) -> tuple[bool, str]:
        if ours.dtype != same_seed.dtype or ours.shape != same_seed.shape:
            return False, f"ours {ours.dtype} {tuple(ours.shape)} vs {same_seed.dtype} {tuple(same_seed.shape)}"
        theirs = mergekit_result(replace(case, seed=(case.seed or 0) + 1000, check=None))
        dense = mergekit_result(replace(case, per_input=case.per_input | {"density": [1.0] * len(case.per_input["density"])}, seed=None, check=None)).double()
        far = [(x.double() - dense).abs().mean().item() for x in (ours, theirs)]
        ok = abs(far[0] / far[1] - 1) < 0.03
        text = f"mean|out-dense| {far[0]:.4g} vs {far[1]:.4g}"
        if density is not None:
            base = case.tensors[case.base or 0].double()
            visible = dense != base
            kept = [(x.double() != base)[visible].double().mean().item() for x in (ours, theirs)]
            ok &= abs(kept[0] - kept[1]) < 0.005
            if case.method.startswith("dare"):
                ok &= abs(kept[0] - torch.tensor(density, dtype=ours.dtype).item()) < 0.005
            text += f", kept {kept[0]:.4f} vs {kept[1]:.4f} (density {density})"
        text += "; same seed: " + ("same bits" if compare(ours, same_seed)[0] else "other bits")
        return ok, ("statistically equal: " if ok else "") + text

    return check


SUITES: tuple[Callable[[], list[Case]], ...] = (geometric_cases, gta_cases)


def main(argv: list[str]) -> int:
    wanted = set(argv)
    cases = [case for suite in SUITES for case in suite() if not wanted or case.method in wanted]
    failures = 0
    for name in dict.fromkeys(case.method for case in cases):
        if (problem := declaration_problem(name)) is not None:
            failures += 1
            print(f"DECLARATION {name}:\n  {problem}")
    print(f"{'method':<14} {'case':<44} {'dtype':<9} {'s':>5}  result")
    for case in cases:
        start = time.perf_counter()
        theirs = mergekit_result(case)
        ours = nyxray_result(case)
        ok, why = (case.check or compare)(ours, theirs)
        failures += not ok
        dtype = str(theirs.dtype).removeprefix("torch.")
        print(
            f"{case.method:<14} {case.label:<44} {dtype:<9} {time.perf_counter() - start:5.1f}  {(why or 'bit-exact') if ok else 'MISMATCH ' + why}", flush=True
        )
    print("all bit-exact (random cases: statistically equal), declarations as mergekit's" if not failures else f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
