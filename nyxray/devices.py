"""Where the math runs. torch is imported only when a device must be probed or math is done, so
copy-only work (passthrough in the stored dtype) never pays torch's import time."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this process sees a GPU, else ``cpu``; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def set_math_threads(threads: int) -> int:
    """Set torch's intra-op threads (importing torch); returns the previous count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    return previous
