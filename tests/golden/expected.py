"""What mergekit 0.1.5 wrote for each golden case under the CPU kernel set this process runs.

``golden.json`` holds the bytes under one kernel set; ``capabilities.json`` the cases that differ
under the others (``capabilities.py``). Every test that compares with mergekit's bytes reads them
from here, so it compares with the bytes of the set torch computes with in this process.
"""

from __future__ import annotations

import json
import os

from nyxray.execute import cpu_capability

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN_FILE = json.load(open(os.path.join(HERE, "golden.json")))
VARIANTS = json.load(open(os.path.join(HERE, "capabilities.json")))
RUNNING = cpu_capability.current()
GOLDEN = {name: {**case, **VARIANTS["cases"].get(RUNNING, {}).get(name, {})} for name, case in GOLDEN_FILE["cases"].items()}
# None when mergekit's bytes are known for this kernel set, else why they are not
UNKNOWN = (
    None
    if RUNNING == GOLDEN_FILE["cpu_capability"].lower() or RUNNING in VARIANTS["cases"]
    else f"torch computes with {RUNNING} kernels here; mergekit's bytes were recorded under {GOLDEN_FILE['cpu_capability']} and {', '.join(VARIANTS['cases'])}"
)


def recorded_under(golden: dict, name: str):
    """A skip mark for byte parity with a golden file recorded under one kernel set only
    (families.json, tokenizers.json, lora.json): elsewhere mergekit's bytes are not known."""
    import pytest

    made = golden["cpu_capability"].lower()
    return pytest.mark.skipif(RUNNING != made, reason=f"torch computes with {RUNNING} kernels here; {name} was recorded under {made}")
