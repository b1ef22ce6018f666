"""What a running merge has recorded in its output so far, as tests watching it from outside see it."""

from __future__ import annotations

import os


def finished_shards(out: str) -> set[str]:
    """Names of the shards whose resume record is in place (``.nyxray/shards/<shard>.json``).

    A record is written to a hidden temporary file beside it and renamed: those temporaries are
    records in the making, not finished shards, and are left out."""
    records = os.path.join(out, ".nyxray", "shards")
    if not os.path.isdir(records):
        return set()
    return {n[: -len(".json")] for n in os.listdir(records) if n.endswith(".json") and not n.startswith(".")}
