"""Regenerate ``tokenizers.json``: what mergekit 0.1.5 writes for ``tokenizer_cases.CASES``.

Run with nyxray's venv python (mergekit runs from its own venv, as a subprocess)::

    .venv/bin/python tests/golden/make_tokenizer_golden.py [--mergekit-bin /work/mk-venv/bin] [--keep DIR]

As ``make_golden.py`` (whose helpers this reuses): build the inputs, render each recipe, run
``mergekit-yaml`` (HF_HUB_OFFLINE=1, CPU, avx2 kernels, ``--num-threads 1``) and record every shard
byte, the layout and the config; plus, per case, the written tokenizer as transformers loads it
(``tokenizer_cases.tokenizer_facts``: vocabulary, added and special tokens, chat template, the ids
of fixed texts). Every case names its base model, so mergekit's set order never picks a donor, and
the inputs differ by added tokens only, whose union order does not depend on it either.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.golden import tokenizer_cases as T  # noqa: E402
from tests.golden.cases import COMMON_CLI, render_recipe  # noqa: E402
from tests.golden.make_golden import collect, dump_json  # noqa: E402

GOLDEN_PATH = os.path.join(HERE, "tokenizers.json")


def run_case(case, models: dict[str, str], work: str, mk_yaml: str, env: dict) -> dict:
    rp = os.path.join(work, case.name + ".yml")
    with open(rp, "w") as fh:
        fh.write(render_recipe(case, models, {}))
    out_dir = os.path.join(work, "out", case.name)
    proc = subprocess.run([mk_yaml, rp, out_dir, *COMMON_CLI, "--num-threads", "1"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"mergekit failed on {case.name}")
    data = collect(case, out_dir, {})
    return {"description": case.description, "recipe": case.recipe, **data, "tokenizer": T.tokenizer_facts(out_dir)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit-bin", default="/work/mk-venv/bin", help="directory holding mergekit-yaml")
    ap.add_argument("--out", default=GOLDEN_PATH)
    ap.add_argument("--keep", default=None, help="build in this directory and keep it")
    args = ap.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", ATEN_CPU_CAPABILITY="avx2")
    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="nyxray-tok-golden-")
    models = T.build_inputs(os.path.join(work, "in"))
    cases = {c.name: run_case(c, models, work, os.path.join(args.mergekit_bin, "mergekit-yaml"), env) for c in T.CASES}
    with open(args.out, "w") as fh:
        fh.write(dump_json({"generator": "tests/golden/make_tokenizer_golden.py", "mergekit": "0.1.5", "cpu_capability": "avx2", "cases": cases}) + "\n")
    print(f"wrote {args.out}: {len(cases)} cases")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
