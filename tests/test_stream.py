"""Big tensors in bounded chunks (nyxray/execute/stream.py): a tensor whose inputs exceed the
streaming threshold is read, computed and written span by span, and the bytes are those of a
whole-tensor run. The bound is shown by counting: with a small threshold and span, no read
request and no piece queued for the writer is larger than one span of one input."""

from __future__ import annotations

import glob
import hashlib
import os

import pytest

import nyxray
from nyxray.demo.synthetic import ModelShape, make_model
from nyxray.execute import stream, unit
from nyxray.io import location
from nyxray.plan.expr import Merge

# embed_tokens and lm_head: 20483 x 256 = 5 x 2**20 + 768 elements (10.5 MB bf16): 6 spans of 2**20,
# the last a short one; every other tensor is at most 512 x 256.
SHAPE = ModelShape(hidden=256, intermediate=512, layers=2, vocab=20483, heads=4, kv_heads=2)
SPAN = 1 << 20  # elements: SLERP's reduction chunk, the smallest span its chunked form takes
SPAN_BYTES = 2 * SPAN  # one span of one bf16 input


def recipe(method: str, extra: str = "") -> str:
    models = "\n".join(f"      - model: {m}\n        layer_range: [0, 2]" for m in ("ab" if method != "passthrough" else "a"))
    return f"slices:\n  - sources:\n{models}\nmerge_method: {method}\n{extra}dtype: bfloat16\n"


RECIPES = {
    "copy": recipe("passthrough"),
    "linear": recipe("linear", "parameters:\n  weight: [0.3, 0.7]\n"),
    "task_arithmetic": recipe("task_arithmetic", "base_model: a\nparameters:\n  weight: 0.6\n"),
    "slerp": recipe("slerp", "base_model: a\nparameters:\n  t: [0.2, 0.7]\n"),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stream-src")
    return {m: make_model(str(root / m), SHAPE, seed=i, shard_bytes=30_000_000) for i, m in enumerate("ab")}


def merge(text: str, out: str, sources: dict[str, str]) -> dict:
    return nyxray.merge(text, out, models=sources, executor="local", out_shard_size="12M", progress=False)


def hashes(path: str) -> dict[str, str]:
    return {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in sorted(glob.glob(os.path.join(path, "*.safetensors")))}


@pytest.fixture(scope="module")
def whole(sources, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Each recipe's shards computed with every tensor whole (the default threshold, 64 MiB, is
    far above these tensors)."""
    root = tmp_path_factory.mktemp("stream-whole")
    return {name: (merge(text, str(root / name), sources), hashes(str(root / name)))[1] for name, text in RECIPES.items()}


@pytest.fixture
def counted(monkeypatch):
    """Stream every tensor over 4 MiB of inputs in spans of 2**20 elements, and record the size of
    every range read (by the batch reader and by the streams) and of every piece queued for writing."""
    monkeypatch.setattr(stream, "STREAM_BYTES", 4 * 2**20)
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", SPAN)
    seen: dict[str, list[int]] = {"batch": [], "stream": [], "pieces": []}

    def counting(kind: str):
        def read(ranges, *a, **kw):
            seen[kind] += [r.end - r.start for r in ranges]
            return location.read_ranges(ranges, *a, **kw)

        return read

    monkeypatch.setattr(unit, "read_ranges", counting("batch"))
    monkeypatch.setattr(stream, "read_ranges", counting("stream"))
    put = unit._ShardStream.put

    def counting_put(self, name, data):
        seen["pieces"].append(len(data))
        put(self, name, data)

    monkeypatch.setattr(unit._ShardStream, "put", counting_put)
    return seen


# KEEP_BYTES 0: SLERP reads its inputs again on each pass (the strict bound); 1 GiB: it keeps them
CASES = [(name, 0) for name in RECIPES] + [("slerp", 2**30)]


@pytest.mark.parametrize(("name", "keep"), CASES, ids=[f"{n}-{'kept' if k else 'reread'}" for n, k in CASES])
def test_a_tensor_larger_than_the_span_streams_within_one_span_and_writes_the_same_bytes(name, keep, sources, whole, counted, monkeypatch, tmp_path):
    monkeypatch.setattr(stream, "KEEP_BYTES", keep)
    report = merge(RECIPES[name], str(tmp_path / "out"), sources)
    assert hashes(str(tmp_path / "out")) == whole[name]
    # embed_tokens and lm_head went through the streams: 6 spans each, per input
    inputs = 1 if name == "copy" else 2
    assert counted["stream"].count(SPAN_BYTES) >= 2 * 5 * inputs
    # the bound: no read request and no queued piece is larger than one span of one input
    assert max(counted["stream"] + counted["batch"]) <= SPAN_BYTES
    assert max(counted["pieces"]) <= SPAN_BYTES
    # SLERP reads its streamed inputs once per pass (norms, dot, output) unless it keeps them
    big = 2 * inputs * 2 * (SHAPE.vocab * SHAPE.hidden)  # embed_tokens + lm_head, bytes of every input
    passes = 3 if name == "slerp" and not keep else 1
    assert report["bytes_read_tensors"] == report["bytes_read_min"] + (passes - 1) * big


def test_whole_tensor_methods_and_random_draws_are_not_streamed(sources, monkeypatch):
    """TIES ranks magnitudes over the whole tensor and DARE draws per tensor: read whole, however
    big; the element-wise task arithmetic of the same inputs streams."""
    monkeypatch.setattr(stream, "STREAM_BYTES", 0)
    extra = "base_model: a\nparameters:\n  weight: 0.5\n  density: 0.5\n"
    for method, streamed in (("ties", False), ("dare_linear", False), ("task_arithmetic", True)):
        p = nyxray.plan(recipe(method, extra.replace("  density: 0.5\n", "") if streamed else extra), models=sources)
        merges = [t.expr for s in p.final.shards for t in s.tensors if isinstance(t.expr, Merge)]
        assert merges and all(stream.in_spans([e]) == streamed for e in merges), method
