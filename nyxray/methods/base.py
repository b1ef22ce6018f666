"""A merge method as data: its parameters, its input contract, and its math as a pure function.

The recipe parser, the planner, ``nyxray plan``, the model card and the README's support table all
read these declarations (through :mod:`nyxray.methods.registry`), so they cannot drift apart.
A method's math knows no I/O, no Ray and no recipe: resolved values and tensors in, one tensor out,
on whatever device the tensors are on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:  # torch is imported by the math only: planning a merge never loads it
    import torch

REQUIRED = object()  # a Param default meaning "the recipe must give a value"

# How a parameter is bound (mergekit's scopes): one value per output tensor, filters matched on the
# output tensor's name ("shared"); one per input including the base ("input"); one per input other
# than the base ("non_base"). Per-input values are matched on each input's own tensor name.
Scope = Literal["shared", "input", "non_base"]
SCOPES: tuple[str, ...] = get_args(Scope)

# What happens to an optional tensor (an untied lm_head, a bias) that only some inputs have:
# "error"; "passthrough_singleton": one input has it -> copied; "passthrough_base_singleton": only
# when that one input is the base; "base_or_skip": fewer than min_inputs -> the base's copy, or skipped.
OptionalPolicy = Literal["error", "passthrough_singleton", "passthrough_base_singleton", "base_or_skip"]
OPTIONAL_POLICIES: tuple[str, ...] = get_args(OptionalPolicy)

# Whether a method takes a base model (mergekit's BasePolicy): it must have one ("required"), may
# ("optional"), must not ("forbidden"), or merges it as one more input, unaware of it ("ignored").
BasePolicy = Literal["required", "optional", "forbidden", "ignored"]
BASE_POLICIES: tuple[str, ...] = get_args(BasePolicy)

KINDS = (float, int, bool)


def _one_of(owner: str, field_name: str, value: Any, allowed: tuple) -> None:
    """A typo in a declaration (``base="requried"``) fails when the registry is imported, rather
    than reading as some other policy at plan time."""
    if value not in allowed:
        raise ValueError(f"{owner}: {field_name}={value!r} is not one of {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class Param:
    """One parameter of a method, as a recipe sets it."""

    name: str
    kind: type  # float, int or bool
    default: Any = REQUIRED  # REQUIRED, None (unset: the method says what that means), or a value
    scope: Scope = "shared"
    low: float | None = None  # inclusive bounds, unless the *_open flag says otherwise
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        owner = f"parameter {self.name!r}"
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            raise ValueError(f"{owner}: a parameter's name is a recipe key, an identifier")
        _one_of(owner, "kind", self.kind, KINDS)
        _one_of(owner, "scope", self.scope, SCOPES)
        if self.kind is bool and (self.low is not None or self.high is not None):
            raise ValueError(f"{owner}: a bool has no range")
        if (self.low_open and self.low is None) or (self.high_open and self.high is None):
            raise ValueError(f"{owner}: an open end needs a bound")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"{owner}: empty range {self.range_text()}")
        if self.default is not REQUIRED and self.default is not None and self.problem(self.default):
            raise ValueError(f"{owner}: its default does not pass its own check: {self.problem(self.default)}")

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
class ChunkSource:
    """One input of a chunked merge (:attr:`Method.chunked`): each call of ``chunks`` starts a new
    pass over the tensor as flat [1, m] pieces in ``dtype`` on ``device``, every m a multiple of
    2**20 elements but the last's (the unit reads them, or slices them from memory)."""

    dtype: torch.dtype
    device: torch.device | str
    chunks: Callable[[], Iterable[torch.Tensor]]


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
    base: BasePolicy = "optional"
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    optional_policy: OptionalPolicy = "error"
    random: bool = False  # draws random numbers: reproducible in nyxray, not bit-equal to mergekit
    float32_result: bool = False  # returns float32 for 16-bit inputs (a float32 factor), as mergekit does
    note: str = ""  # said in the support table's exactness column
    # A rule across one non-base input's per-input values (name -> value) that single ranges cannot
    # say; returns the problem, or None. Checked at plan time for every tensor and input.
    input_rule: Callable[[dict[str, Any]], str | None] | None = None
    # The shared boolean parameter under which the method divides by the sum of the per-input
    # parameter ``weight_param`` (``normalize``): weights that sum to 0 there are refused at plan time.
    divides_by_weight_sum: str | None = None
    weight_param: str = "weight"
    # A per-input parameter that, left unset (None), makes the method a copy of its one input
    # (passthrough's scale): the planner then writes the source bytes as they are, or a cast, and
    # a run of such recipes in their stored dtype needs no math workers.
    copies_unless: str | None = None
    # Each output element depends only on the inputs' elements at the same position (and on the
    # parameters): a big tensor is then computed span by span, bit for bit as whole (nyxray.execute.stream).
    elementwise: bool = False
    # "module:function" of the math over inputs given as ChunkSource passes, yielding the output in
    # chunks: for a method whose whole-tensor reductions replay exactly chunk by chunk (SLERP's norms,
    # then its dot product), so a big tensor never needs its inputs whole in memory.
    chunked: str = ""
    # The model card says "using <base> as a base" (mergekit's card leaves the base out for SLERP,
    # and the card must read as mergekit's does).
    card_names_base: bool = True
    options: tuple[tuple[str, object], ...] = ()  # keyword switches of a family's shared function
    reference: str = ""

    def __post_init__(self) -> None:
        owner = f"method {self.name!r}"
        if not (isinstance(self.name, str) and self.name.isidentifier() and self.name == self.name.lower()):
            raise ValueError(f"{owner}: a method's name is what recipes write in merge_method:, a lowercase identifier")
        for key, value in [("merge", self.merge)] + ([("chunked", self.chunked)] if self.chunked else []):
            module, colon, function = value.partition(":")
            if not (colon and module.isidentifier() and function.isidentifier()):
                raise ValueError(f"{owner}: {key}={value!r} is not 'module:function'")
        _one_of(owner, "base", self.base, BASE_POLICIES)
        _one_of(owner, "optional_policy", self.optional_policy, OPTIONAL_POLICIES)
        if self.random and (self.elementwise or self.chunked):
            raise ValueError(f"{owner}: its draws are made per tensor, in one order: it cannot be computed span by span")
        self._check_params(owner)
        self._check_counts(owner)
        self._check_base_uses(owner)

    def _check_params(self, owner: str) -> None:
        names = [p.name for p in self.params]
        if not all(isinstance(p, Param) for p in self.params) or len(set(names)) != len(names):
            raise ValueError(f"{owner}: params must be Param records with distinct names, got {names}")
        if self.divides_by_weight_sum is not None:
            flag, weights = self.param(self.divides_by_weight_sum), self.param(self.weight_param)
            if flag is None or flag.kind is not bool or flag.scope != "shared":
                raise ValueError(f"{owner}: divides_by_weight_sum={self.divides_by_weight_sum!r} must name a shared bool parameter")
            if weights is None or weights.kind is not float or weights.scope == "shared":
                raise ValueError(f"{owner}: weight_param={self.weight_param!r} must name a per-input float parameter")
        if self.copies_unless is not None:
            p = self.param(self.copies_unless)
            if p is None or p.scope == "shared" or p.default is not None or self.max_inputs != 1:
                raise ValueError(f"{owner}: copies_unless must name a per-input parameter that defaults to None, on a one-input method")
        if self.input_rule is not None and not any(p.scope == "non_base" for p in self.params):
            raise ValueError(f"{owner}: an input_rule reads one non-base input's values, and it has no non_base parameter")

    def _check_counts(self, owner: str) -> None:
        if not self.min_inputs >= 1:
            raise ValueError(f"{owner}: min_inputs={self.min_inputs} (a merge has at least one input)")
        if self.max_inputs is not None and self.max_inputs < self.min_inputs:
            raise ValueError(f"{owner}: max_inputs={self.max_inputs} < min_inputs={self.min_inputs}")
        if self.min_non_base is not None and self.min_non_base < 0:
            raise ValueError(f"{owner}: min_non_base={self.min_non_base} is negative")
        if self.max_non_base is not None and self.max_non_base < (self.min_non_base or 0):
            raise ValueError(f"{owner}: max_non_base={self.max_non_base} < min_non_base={self.min_non_base}")
        if self.optional_policy == "base_or_skip" and self.min_inputs < 2:
            raise ValueError(f"{owner}: base_or_skip skips below min_inputs, which must then be 2 or more")

    def _check_base_uses(self, owner: str) -> None:
        """Declarations that speak of a base cannot belong to a method that never sees one."""
        if self.base not in ("ignored", "forbidden"):
            return
        if any(p.scope == "non_base" for p in self.params):
            raise ValueError(f"{owner}: base={self.base!r}, so every input is a non-base one: declare scope 'input'")
        if self.optional_policy == "passthrough_base_singleton":
            raise ValueError(f"{owner}: base={self.base!r} leaves no base to copy for passthrough_base_singleton")

    def slice_base(self, slice_base: str | None, top_base: str | None) -> str | None:
        """The base model of a slice as the method sees it (a slice's own base_model wins)."""
        return None if self.base == "ignored" else (slice_base or top_base)

    def base_problem(self, base: str | None, where: str = "") -> str | None:
        """Why a slice whose base model (as the method sees it) is ``base`` cannot be merged, or
        None: the one statement of the base rule. ``where`` names the other key that could set it."""
        if self.base == "required" and base is None:
            return f"{self.name} needs a base_model{where}: its task vectors or interpolation start from it"
        if self.base == "forbidden" and base is not None:
            return f"{self.name} takes no base_model"
        return None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)
