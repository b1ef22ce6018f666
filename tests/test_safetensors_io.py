"""Output headers are built exactly as the safetensors library writes them."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import save

from nyxray.execute.evaluate import TORCH_DTYPES
from nyxray.io.safetensors import build_header, header_length, parse_header


@pytest.mark.parametrize("seed", range(5))
def test_build_header_matches_safetensors_library(seed):
    rng = random.Random(seed)
    dtypes = ["BF16", "F16", "F32", "I64", "U8", "F64", "I32"]
    tensors = {}
    for i in range(rng.randint(1, 12)):
        name = f"model.layers.{rng.randint(0, 20)}.t{i}.weight"
        shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(0, 3)))
        tensors[name] = torch.zeros(shape, dtype=TORCH_DTYPES[rng.choice(dtypes)])
    expected = save(tensors, metadata={"format": "pt"})
    header, entries = build_header(
        [(n, next(k for k, v in TORCH_DTYPES.items() if v == t.dtype), tuple(t.shape)) for n, t in tensors.items()], {"format": "pt"}
    )
    assert expected[: len(header)] == header
    assert entries[-1].end == len(expected)
    n = header_length(expected[:8], "x", len(expected))
    parsed, meta = parse_header(expected[8 : 8 + n], "x", len(expected))
    assert meta == {"format": "pt"}
    assert {e.name: (e.start, e.end) for e in entries} == {k: (v.start, v.end) for k, v in parsed.items()}
