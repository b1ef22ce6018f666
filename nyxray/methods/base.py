"""A merge method as data: its parameters, its input contract, and its math as a pure function.

The recipe parser, the planner, ``nyxray plan``, the model card and the README's support table all
read these declarations (through :mod:`nyxray.methods.registry`), so they cannot drift apart.
A method's math knows no I/O, no Ray and no recipe: resolved values and tensors in, one tensor out,
on whatever device the tensors are on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported by the math only: planning a merge never loads it
    import torch

REQUIRED = object()  # a Param default meaning "the recipe must give a value"

# How a parameter is bound (mergekit's scopes): one value per output tensor, filters matched on the
# output tensor's name ("shared"); one per input including the base ("input"); one per input other
# than the base ("non_base"). Per-input values are matched on each input's own tensor name.
SCOPES = ("shared", "input", "non_base")

# What happens to an optional tensor (an untied lm_head, a bias) that only some inputs have:
# "error"; "passthrough_singleton": one input has it -> copied; "passthrough_base_singleton": only
# when that one input is the base; "base_or_skip": fewer than min_inputs -> the base's copy, or skipped.
OPTIONAL_POLICIES = ("error", "passthrough_singleton", "passthrough_base_singleton", "base_or_skip")


@dataclass(frozen=True)
class Param:
    """One parameter of a method, as a recipe sets it."""

    name: str
    kind: type  # float, int or bool
    default: Any = REQUIRED
    scope: str = "shared"
    low: float | None = None  # inclusive bounds, unless the *_open flag says otherwise
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def problem(self, value: Any) -> str | None:
        """Why ``value`` (one resolved value) is not acceptable, or None."""
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            return f"{self.name} must be {self.kind.__name__}, got {value!r}"
        if self.kind is bool:
            return None
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"{self.name}={value!r} is out of range {self.range_text()}"
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return f"{self.name}={value!r} is out of range {self.range_text()}"
        return None

    def range_text(self) -> str:
        lo = "(-inf" if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
        hi = "inf)" if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
        return f"{lo}, {hi}"


@dataclass
class Group:
    """The inputs of one output tensor, as a method's math receives them.

    ``tensors`` are in the slice's source order (mergekit's model order), already cast to the
    recipe's ``dtype`` and promoted to one common dtype, on the math device. ``base`` indexes the
    base model's tensor (None when there is none). ``params`` holds the shared values;
    ``per_input[name]`` the per-input values: aligned with ``tensors`` for scope "input", with the
    non-base tensors (in order) for scope "non_base". ``generator`` is a CPU generator seeded for
    this output tensor alone (random methods only): draw on the CPU with it, then move to the
    device, so the bits do not depend on the device or on which worker runs the tensor.
    """

    tensors: list[torch.Tensor]
    base: int | None
    params: dict[str, Any] = field(default_factory=dict)
    per_input: dict[str, list[Any]] = field(default_factory=dict)
    generator: torch.Generator | None = None

    @property
    def base_tensor(self) -> torch.Tensor:
        assert self.base is not None
        return self.tensors[self.base]

    @property
    def others(self) -> list[torch.Tensor]:
        """The non-base tensors, in order (the ones "non_base" values align with)."""
        return [t for i, t in enumerate(self.tensors) if i != self.base]


@dataclass(frozen=True)
class Method:
    """A merge method: what a recipe may say to it, and the function that computes a tensor.

    ``merge(group, **options)`` returns the merged tensor in the inputs' (common) dtype, or in
    float32 for 16-bit inputs when ``float32_result``, as mergekit's methods do: the planner knows
    every output's dtype from headers alone.
    """

    name: str
    pretty: str
    params: tuple[Param, ...]
    merge: str  # "module:function" under nyxray.methods; called as function(group, **options)
    base: str = "optional"  # "required", "optional", "forbidden", "ignored" (as mergekit's BasePolicy)
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    optional_policy: str = "error"
    random: bool = False  # draws random numbers: reproducible in nyxray, not bit-equal to mergekit
    float32_result: bool = False  # returns float32 for 16-bit inputs (a float32 factor), as mergekit does
    note: str = ""  # said in the support table's exactness column
    # A rule across one non-base input's per-input values (name -> value) that single ranges cannot
    # say; returns the problem, or None. Checked at plan time for every tensor and input.
    input_rule: Callable[[dict[str, Any]], str | None] | None = None
    # The shared boolean parameter under which the method divides by the sum of the weights
    # (``normalize``): a recipe whose weights sum to 0 there is refused at plan time.
    divides_by_weight_sum: str | None = None
    options: tuple[tuple[str, object], ...] = ()  # keyword switches of a family's shared function
    reference: str = ""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)
