"""Where the math runs. torch is imported only when a device must be probed or math is done, so
copy-only work (passthrough in the stored dtype) never pays torch's import time. This module
imports nothing from the rest of :mod:`nyxray.execute`: the pools use it, not the reverse.

A CUDA device is checked before the output is touched (:func:`nyxray.execute.pools.check_device`):
a merge asked to run on a GPU that is not there must fail with one clear line, not a torch
traceback after it has claimed the output, and a run must never report a device nobody checked.
"""

from __future__ import annotations

from ..errors import NyxrayError


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this process sees a GPU, else ``cpu``; anything else as given
    (a CUDA device was checked before the output was claimed)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_local_cuda(device: str) -> None:
    """Raise a :class:`NyxrayError` unless this process can use the CUDA ``device`` (``cuda`` or
    ``cuda:N``)."""
    import torch

    if not torch.cuda.is_available():
        built = "" if torch.backends.cuda.is_built() else " (this torch build has no CUDA support)"
        raise NyxrayError(f"device {device!r}: no CUDA device is visible to this process{built}; use --device cpu or auto, or run on a machine with a GPU")
    _, _, index = device.partition(":")
    count = torch.cuda.device_count()
    if index and (not index.isdigit() or int(index) >= count):
        raise NyxrayError(f"device {device!r}: this process sees {count} CUDA device{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})")


def check_cluster_cuda(device: str, cluster_gpus: float, actor_gpus: float | None) -> None:
    """Raise a :class:`NyxrayError` when a Ray merge asks for ``device`` (CUDA) on a cluster with no
    GPU, unless each actor explicitly asks for GPUs (``actor_gpus``: an autoscaler may add them)."""
    if cluster_gpus <= 0 and not actor_gpus:
        raise NyxrayError(
            f"device {device!r}: no CUDA device in the Ray cluster (it has no GPU); use --device cpu or auto, or --actor-gpus N on a cluster that can add GPU nodes"
        )
