"""What every benchmark module shares: the repository paths, the environment, logging and byte units.

The bench scripts (``bench.py``, ``series.py``) run as ``python bench/NAME.py``: their directory is
first on ``sys.path``, so the modules here import each other by their plain names.
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(1, REPO)  # tests.s3server; nyxray itself when it is not installed

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MB = 1e6
CHUNK = 64 * 2**20  # plain read/write buffer of the floor and the cache warm-up


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_bytes(text: str) -> int:
    """``1G``, ``500M``, ``1.5GB``, ``123`` -> bytes (decimal units)."""
    t = str(text).strip().upper()
    if len(t) > 1 and t.endswith("B") and t[-2] in "KMGT":
        t = t[:-1]
    mult = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(float(t))


def human(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1000 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}G"


def command_line(script: str, argv: list[str] | None) -> str:
    """The command as typed, for the report: the interpreter and script relative to the repository."""
    import shlex

    return " ".join(
        shlex.quote(x)
        for x in [
            os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO) else sys.executable,
            os.path.relpath(os.path.abspath(script), REPO),
            *(argv if argv is not None else sys.argv[1:]),
        ]
    )
