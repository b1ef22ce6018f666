"""Make ``capabilities.json``: mergekit's bytes under the CPU kernel sets golden.json was not made with.

torch's float32 CPU kernels (exp, log, softmax, reductions) round differently under its ``default``,
``avx2`` and ``avx512`` kernel sets, so mergekit 0.1.5 writes different bytes for some methods
depending on the set torch runs with. golden.json holds one set; this file holds, per other set,
only the cases whose shards differ (their ``files``, ``shards`` and statistics), so the golden tests
can run under any of them. Made from golden files of the same cases made under the other sets::

    .venv/bin/python tests/golden/make_golden.py --cpu-capability avx512 --out /tmp/golden-avx512.json
    .venv/bin/python tests/golden/make_golden.py --cpu-capability default --out /tmp/golden-default.json
    .venv/bin/python tests/golden/capabilities.py /tmp/golden-avx512.json /tmp/golden-default.json

It prints which cases (methods) depend on the kernel set.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# what may change with the kernel set: the tensor bytes and the statistics measured on them
VARYING = ("files", "shards", "dense_sumsq", "sampled_departures")


def shard_hashes(case: dict) -> dict[str, str]:
    return {f: v["sha256"] for f, v in case["files"].items() if f.endswith(".safetensors")}


def differences(golden: dict, other: dict) -> dict[str, dict]:
    """The cases of ``other`` whose shard bytes differ from ``golden``'s; everything else must match."""
    for key in ("mergekit", "torch", "shape", "input_shard_bytes"):
        if golden[key] != other[key]:
            raise SystemExit(f"{key}: {golden[key]!r} vs {other[key]!r}: the two golden files are not of the same inputs")
    out = {}
    for name, case in golden["cases"].items():
        theirs = other["cases"][name]
        if any(case[k] != theirs[k] for k in ("index_text", "config_text", "file_order", "other_files")):
            raise SystemExit(f"{name}: more than tensor bytes differ under {other['cpu_capability']}")
        if shard_hashes(case) != shard_hashes(theirs):
            out[name] = {k: theirs[k] for k in VARYING if k in theirs}
    return out


def main(paths: list[str]) -> int:
    golden = json.load(open(os.path.join(HERE, "golden.json")))
    variants = {}
    for path in paths:
        other = json.load(open(path))
        capability = other["cpu_capability"].lower()
        variants[capability] = differences(golden, other)
        print(
            f"{capability}: {len(variants[capability])} of {len(golden['cases'])} cases differ from {golden['cpu_capability']}: {', '.join(variants[capability])}"
        )
    with open(os.path.join(HERE, "capabilities.json"), "w") as f:
        json.dump({"golden": golden["cpu_capability"].lower(), "generator": "tests/golden/capabilities.py", "cases": variants}, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
