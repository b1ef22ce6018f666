"""The CPU kernel set torch computes with, pinned once for a whole merge.

torch picks its vectorised CPU kernels when it is imported: ``default`` (no AVX2), ``avx2`` or
``avx512`` on x86, from the CPU or from the ``ATEN_CPU_CAPABILITY`` environment variable. Several
float32 kernels (exp, log, softmax, reductions) round differently under each, so the bytes of a
unit can depend on the kernel set. A merge therefore runs every worker under one capability: the
driver's, or one the user names. Ray actors get it in their environment before torch loads, and
every worker checks it before its first unit, refusing (with the node's name) a capability its CPU
cannot run rather than computing other bytes. The capability is recorded in the output's state and
manifest, so a resume or repair on other hardware computes under the same kernels.
"""

from __future__ import annotations

from ..errors import NyxrayError

ENV = "ATEN_CPU_CAPABILITY"
CAPABILITIES = ("default", "avx2", "avx512")  # x86 kernel sets, each a superset of the one before
# CPU features torch requires before it picks a kernel set by itself (its own rule, DispatchStub.cpp)
_NEEDS = {"default": (), "avx2": ("avx2", "fma3"), "avx512": ("avx512_vl", "avx512_bw", "avx512_dq", "fma3")}


def validate(capability: str | None) -> str | None:
    """``capability`` lower-cased, or a :class:`NyxrayError` naming the accepted values."""
    if capability is None:
        return None
    name = str(capability).lower()
    if name not in CAPABILITIES:
        raise NyxrayError(f"cpu_capability {capability!r}: expected one of {', '.join(CAPABILITIES)} (torch's CPU kernel sets)")
    return name


def current() -> str:
    """The kernel set this process's torch computes with (imports torch)."""
    import torch

    return torch.backends.cpu.get_cpu_capability().lower()


def runnable() -> list[str]:
    """The kernel sets this machine's CPU can run (imports torch)."""
    import torch

    have = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return [c for c in CAPABILITIES if all(have.get(f) for f in _NEEDS[c])]


def check(wanted: str, where: str) -> None:
    """Raise a :class:`NyxrayError` unless this process computes with ``wanted``; ``where`` names
    the process (a node) in the message. Call it before any kernel runs: torch honours a pinned
    ``avx512`` even on a CPU without it, where the first kernel would crash the process."""
    if wanted in _NEEDS and wanted not in runnable():
        raise NyxrayError(
            f"cpu_capability {wanted!r}: the CPU of {where} cannot run torch's {wanted} kernels; pin one every node has (--cpu-capability avx2 or default)"
        )
    have = current()
    if have != wanted:
        raise NyxrayError(
            f"cpu_capability {wanted!r}: torch in {where} computes with {have} kernels (it reads {ENV} when imported: set {ENV}={wanted} before torch is imported, or leave the capability to the driver)"
        )
