"""The output protocol: claim a location, record finished shards, commit last, resume, verify.

An output location holds, while a run is under way, ``.nyxray/state.json`` (which plan owns it)
and one ``.nyxray/shards/<shard>.json`` per finished shard (size and sha256). Shards are written
atomically under their final names. ``config.json``, tokenizer files, the model card and the index
follow, and ``nyxray-manifest.json`` is written last: it is the commit marker. An output without it
is incomplete. Re-running the same plan reuses every shard whose bytes still match its record.
A location holding anything else is refused unless ``overwrite`` is given.

Re-running into a complete output checks it first (as :func:`verify` does). Intact, it is left
untouched. Damaged, it is repaired: the intact shards are recorded as state, then the manifest,
index and ``config.json`` are removed, so from that moment until the new manifest is written the
output reads as incomplete to ``verify`` and to any loader; only the damaged shards are rewritten.
Every step runs under the output's lease (:mod:`nyxray.output.lease`), so no other run writes there.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import yaml

from .. import __version__
from ..errors import NyxrayError, OutputError, StorageError
from ..io.location import Location
from ..methods.registry import METHODS
from ..plan.stages import StagePlan
from .assemble import recorded_uploads
from .lease import LEASE
from .parts import digest_mismatch

MANIFEST = "nyxray-manifest.json"
STATE_DIR = ".nyxray"
STATE = f"{STATE_DIR}/state.json"
INDEX = "model.safetensors.index.json"


def plan_id(stage: StagePlan) -> str:
    """A fingerprint of exactly what a stage writes: shard headers and every tensor's expression."""
    h = hashlib.sha256(f"nyxray-plan-v2\n{stage.recipe.sha256}\n".encode())
    for chunk in stage.content():
        h.update(chunk)
    return h.hexdigest()


@dataclass
class Claim:
    """What an output location holds for a plan, decided before anything is written."""

    complete: bool  # a committed manifest of this very plan is there (and, after claim, intact)
    records: dict[str, dict]  # shard name -> {"size", "sha256", "tensors"} of shards already written
    files: list[str]  # what the location held
    plan_id: str
    verified: dict[str, dict] = field(default_factory=dict)  # records whose bytes claim checked: nothing to redo
    cpu_capability: str | None = None  # the CPU kernel set the output's shards were (or will be) computed with


def _json(loc: Location, name: str) -> Any:
    try:
        return json.loads(loc.read(name))
    except (ValueError, UnicodeDecodeError):
        return None


def _state(out: Location) -> dict | None:
    """The unfinished merge's state.json; None when a run was stopped before writing it (its
    ``.nyxray`` folder then holds nothing to trust or to protect)."""
    return (_json(out, STATE) or {}) if out.exists(STATE) else None


def inspect(out: Location, stage: StagePlan, overwrite: bool) -> Claim:
    """Decide whether ``out`` may receive this plan's model, reading only.

    Refuses a location holding a different model or files nyxray did not write, unless
    ``overwrite``. All outputs of a run are inspected before any is written to.
    """
    pid = plan_id(stage)
    files = [f for f in out.listdir() if f != LEASE]
    if MANIFEST in files:
        manifest = _json(out, MANIFEST) or {}
        if manifest.get("plan_id") == pid:
            return Claim(True, {s["name"]: s for s in manifest.get("shards", [])}, files, pid, cpu_capability=manifest.get("cpu_capability"))
        if not overwrite:
            raise OutputError(
                f"{out.display} already holds a complete model from a different recipe or plan; pass --overwrite to replace it, or choose another output"
            )
    elif STATE_DIR in files:
        state = _state(out)
        if state is not None and state.get("plan_id") != pid and not overwrite:
            raise OutputError(
                f"{out.display} holds an unfinished merge of a different recipe or plan; pass --overwrite to replace it, or choose another output"
            )
    elif files and not overwrite:
        shown = ", ".join(files[:5]) + (", ..." if len(files) > 5 else "")
        raise OutputError(f"{out.display} is not empty ({shown}) and was not written by nyxray; pass --overwrite to write into it anyway")
    records = {}
    state = _state(out) if STATE_DIR in files else None
    begun_with = None
    if state and state.get("plan_id") == pid:
        begun_with = state.get("cpu_capability")
        for name in out.listdir(f"{STATE_DIR}/shards"):
            rec = _json(out, f"{STATE_DIR}/shards/{name}")
            if rec:
                records[rec["name"]] = rec
    return Claim(False, records, files, pid, cpu_capability=begun_with)


def claim(out: Location, stage: StagePlan, c: Claim, overwrite: bool) -> None:
    """Take ``out`` for the plan ``inspect`` accepted: with ``overwrite`` remove the stale nyxray
    files of an older plan; drop temp files and pending uploads of killed writers (but, without
    ``overwrite``, the uploads recorded for split shards: the run adopts or aborts them);
    record the plan in state.json.
    A complete output is checked, and invalidated for repair when damaged (:func:`_invalidate`)."""
    if c.complete:
        damaged = _damaged_shards(out, c.records)
        c.verified = {n: r for n, r in c.records.items() if n not in damaged}
        missing = [f for f in (_json(out, MANIFEST) or {}).get("files", []) if not out.exists(f)]
        if damaged or missing:
            _invalidate(out, stage, c, damaged)
        return
    if overwrite:
        planned = {s.name for s in stage.shards}
        for f in c.files:
            if f == MANIFEST or (f.endswith(".safetensors") and f.startswith("model") and f not in planned):
                out.delete(f)
        if not c.records and STATE_DIR in c.files:
            # Another plan's resume records: kept, a crash of this run would let the next run
            # take that plan's shards (same names, bytes matching their old records) for its own.
            out.delete_tree(STATE_DIR)
    # A killed run of this plan may have left split shards' uploads that this run adopts or aborts
    # (nyxray.output.assemble); every other pending upload is a killed writer's leftover.
    out.remove_partial_writes(keep=() if overwrite else recorded_uploads(out))
    out.makedirs()
    _write_state(out, stage, c)


def _write_state(out: Location, stage: StagePlan, c: Claim) -> None:
    """Record which plan owns the unfinished output (a re-run of another plan is refused)."""
    state = {"plan_id": c.plan_id, "nyxray_version": __version__, "recipe_sha256": stage.recipe.sha256, "cpu_capability": c.cpu_capability}
    out.write_atomic(STATE, json.dumps(state).encode())


def _damaged_shards(out: Location, records: dict[str, dict]) -> set[str]:
    """Names of the recorded shards whose file is missing or differs from its record (checked
    concurrently: sizes, then sha256 of every byte)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        problems = pool.map(lambda rec: _shard_problem(out, rec), records.values())
        return {name for name, problem in zip(records, problems) if problem}


def _shard_problem(out: Location, rec: dict) -> str | None:
    """What is wrong with a written shard against its record (None: byte for byte as recorded)."""
    name = rec["name"]
    if not out.exists(name):
        return f"{name}: missing"
    size = out.size(name)
    if size != rec["size"]:
        return f"{name}: size {size} != {rec['size']} in the manifest"
    if digest_mismatch(out, name, rec):  # one sha256 for the file, or one per part (nyxray.output.parts)
        return f"{name}: sha256 does not match the manifest (corrupted)"
    return None


def _invalidate(out: Location, stage: StagePlan, c: Claim, damaged: set[str]) -> None:
    """Turn a damaged complete output back into a resumable one before anything is rewritten:
    record the plan and the intact shards as state first (a crash from here on resumes), then
    remove the manifest, index and config (the output is no longer a model), then the damaged
    shards."""
    _write_state(out, stage, c)
    for name, rec in c.verified.items():
        record_shard(out, name, rec)
    for f in (MANIFEST, INDEX, "config.json", *sorted(damaged)):
        out.delete(f)
    c.complete = False
    c.records = dict(c.verified)


def record_shard(out: Location, name: str, record: dict) -> None:
    """Remember a finished shard (size, sha256, tensors) so a resumed run can reuse it after
    checking its bytes."""
    out.write_atomic(f"{STATE_DIR}/shards/{name}.json", json.dumps(dict(record, name=name)).encode())


def model_card(stage: StagePlan, out_name: str, pipeline_text: str) -> str:
    refs = stage.recipe.model_refs()
    hub = [r.split("@")[0] for r in refs if "://" not in r and not r.startswith(("/", "~", ".")) and r.count("/") == 1]
    front = yaml.safe_dump({"base_model": hub, "library_name": "transformers", "tags": ["mergekit", "merge", "nyxray"]}, sort_keys=True)
    method = METHODS[stage.recipe.merge_method]
    link = f"[{method.pretty}]({method.reference})" if method.reference else method.pretty
    # as mergekit's card: the base is named for every method but SLERP
    base = f" using {stage.recipe.base_model} as a base" if stage.recipe.base_model and method.card_names_base else ""
    seed = f"\n\nIts random draws were seeded with random_seed {stage.random_seed} (reproducible with nyxray)." if method.random else ""
    lines = [
        f"---\n{front}---\n# {out_name}\n",
        "This is a merge of pre-trained language models created with [nyxray](https://pypi.org/project/nyxray/), "
        "which reads and writes [mergekit](https://github.com/arcee-ai/mergekit) recipes.\n",
        "## Merge Details\n### Merge Method\n",
        f"This model was merged using the {link} merge method{base}.{seed}\n",
        "### Models Merged\n\nThe following models were included in the merge:\n",
        *[f"* {r}" for r in refs],
        "\n### Configuration\n\nThe following YAML configuration was used to produce this model:\n",
        f"```yaml\n{pipeline_text.rstrip()}\n```\n",
    ]
    return "\n".join(lines)


def finalize(
    out: Location,
    stage: StagePlan,
    shards: dict[str, dict],
    pipeline_text: str,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    cpu_capability: str | None = None,
) -> dict:
    """Write config, tokenizer, card and index, then the manifest (the commit marker), which
    records the CPU kernel set the shards were computed with (None: copies only)."""
    out.write_atomic("config.json", (json.dumps(stage.config, indent=2) + "\n").encode())
    copied = []
    src = stage.tokenizer_from
    if stage.tokenizer_files is not None and (copy_tokenizer or stage.recipe.tokenizer is not None):  # a rebuilt vocabulary is part of the model
        for f, data in stage.tokenizer_files.items():
            out.write_atomic(f, data)
            copied.append(f)
    elif copy_tokenizer and src.files_loc is not None:
        has_tok = "tokenizer_config.json" in src.extra_files and ({"tokenizer.json", "tokenizer.model"} & set(src.extra_files))
        for f in src.extra_files if has_tok else [f for f in src.extra_files if f == "generation_config.json"]:
            out.write_atomic(f, src.files_loc.read(f))
            copied.append(f)
    if write_model_card:
        name = out.display.rstrip("/").rsplit("/", 1)[-1]
        out.write_atomic("README.md", model_card(stage, name, pipeline_text).encode())
        out.write_atomic("mergekit_config.yml", pipeline_text.encode())
    if len(stage.shards) > 1:
        weight_map = {t.name: s.name for s in stage.shards for t in s.tensors}
        index = {"metadata": {"total_size": sum(s.data_bytes for s in stage.shards), "nyxray_version": __version__}, "weight_map": weight_map}
        out.write_atomic(INDEX, json.dumps(index, indent=2).encode())
    manifest = {
        "format": "nyxray-manifest/1",
        "nyxray_version": __version__,
        "plan_id": plan_id(stage),
        "recipe_sha256": stage.recipe.sha256,
        "cpu_capability": cpu_capability,
        "shards": [dict(shards[s.name], name=s.name) for s in stage.shards],
        "files": sorted(
            ["config.json", *copied] + (["README.md", "mergekit_config.yml"] if write_model_card else []) + ([INDEX] if len(stage.shards) > 1 else [])
        ),
    }
    out.remove_partial_writes()  # writers lost with their node left these; every unit is done now
    out.write_atomic(MANIFEST, json.dumps(manifest, indent=2).encode())
    out.delete_tree(STATE_DIR)
    return manifest


def verify(out: Location) -> list[str]:
    """Check a committed output against its manifest; returns the problems found (empty = good)."""
    from ..io.safetensors import header_length, parse_header

    try:
        manifest = json.loads(out.read(MANIFEST))
    except StorageError:
        return [f"{out.display}: no {MANIFEST}: the output is incomplete or was not written by nyxray"]
    except ValueError:
        return [f"{out.url(MANIFEST)}: not valid JSON"]
    problems = []
    names = set()
    for rec in manifest.get("shards", []):
        name = rec["name"]
        names.add(name)
        url = out.url(name)
        try:
            problem = _shard_problem(out, rec)
            if problem:
                problems.append(problem)
                continue
            size = rec["size"]
            n = header_length(out.read_range(name, 0, min(8, size)), url, size)
            tensors, _ = parse_header(out.read_range(name, 8, 8 + n), url, size)
        except NyxrayError as e:
            problems.append(f"{name}: {e}")
            continue
        if set(tensors) != set(rec.get("tensors", [])):
            problems.append(f"{name}: header tensors differ from the manifest")
    if INDEX in manifest.get("files", []):
        index = _json(out, INDEX) or {}
        if set(index.get("weight_map", {}).values()) != names:
            problems.append(f"{INDEX}: weight_map names shards {sorted(set(index.get('weight_map', {}).values()))}, manifest has {sorted(names)}")
    for f in manifest.get("files", []):
        if not out.exists(f):
            problems.append(f"{f}: listed in the manifest but missing")
    return problems
