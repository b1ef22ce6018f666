"""Human-readable views of a plan and a report (what ``nyxray plan`` and ``nyxray merge`` print)."""

from __future__ import annotations

import re
from typing import Any

from ..execute.progress import human
from ..methods.base import Method, Param
from ..methods.registry import METHODS
from .expr import leaves
from .stages import Plan, StagePlan


def _group(name: str) -> str:
    """Tensor group for the t table: layer numbers folded (``model.layers.*.mlp.up_proj.weight``,
    ``transformer.h.*.ln_1.weight``)."""
    return re.sub(r"\.\d+\.", ".*.", name, count=1)


def plan_text(p: Plan) -> str:
    lines = []
    if len(p.stages) > 1:
        lines.append("stages (fused into one pass; a stage is written only with --intermediates):")
        for st in p.stages:
            lines.append(f"  {st.name or '<final>'}: {st.recipe.merge_method}, {len(st.tensors)} tensors, {human(st.bytes_written)}")
        staged_read = sum(st.staged_read_bytes for st in p.stages)
        staged_write = sum(st.bytes_written for st in p.stages)
        lines.append(f"  fused:  read {human(p.bytes_read_min())}, write {human(p.final.bytes_written)}")
        lines.append(f"  staged: read {human(staged_read)}, write {human(staged_write)} (each stage run on its own)")
    final = p.final
    ops: dict[str, int] = {}
    for t in final.tensors:
        ops[t.op] = ops.get(t.op, 0) + 1
    lines.append(
        f"output: {len(final.tensors)} tensors ({', '.join(f'{v} {k}' for k, v in sorted(ops.items()))}), "
        f"{len(final.shards)} shard(s), {human(final.bytes_written)} to write, "
        f"{final.donor.arch.num_layers(final.config)} layers, config and tokenizer from {final.donor.ref!r}"
    )
    lines.append("shards:")
    for sh in final.shards:
        lines.append(f"  {sh.name}: {len(sh.tensors)} tensors, {human(sh.size)}  ({sh.tensors[0].name} .. {sh.tensors[-1].name})")
    lines.append("bytes to read per source:")
    for model, n in p.read_bytes_by_source().items():
        lines.append(f"  {model}: {human(n)}")
    lines.append(f"  total: {human(p.bytes_read_min())} (+ {human(p.header_bytes)} of headers, already read)")
    lines += _adapter_lines(p)
    lines += _parameter_lines(final)
    for w in p.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _adapter_lines(p: Plan) -> list[str]:
    """Each LoRA reference: the weights its adapter changes, and the output tensors that read it
    (layer numbers folded)."""
    adapted = [m for m in p.sources.values() if m.adapter is not None]
    if not adapted:
        return []
    lines = ["LoRA adapters (merged into each weight as it is read; no merged copy is written):"]
    for m in adapted:
        a = m.adapter
        outs = sorted({_group(t.name) for t in p.final.tensors if any(a.reads(leaf) for leaf in leaves(t.expr))})
        modules = ", ".join(sorted({w.split(".")[-2] for w in a.weights}))
        lines.append(f"  {m.ref}: changes {len(a.weights)} weights ({modules}) of the model loaded in {a.dtype}; read by:")
        lines += [f"    {g}" for g in outs] or ["    no output tensor"]
    return lines


def _parameter_lines(stage: StagePlan) -> list[str]:
    """Per tensor group (layer numbers folded): the range of every parameter and where each value
    came from in the recipe; a parameter with one value and one source for every tensor is shown
    once, under "every tensor"."""
    groups: dict[tuple[str, str, str], list[Any]] = {}
    for t in stage.tensors:
        for label, value, source in t.params:
            groups.setdefault((_group(t.name), label, source), []).append(value)
    if not groups:
        return []
    names = {g for g, _, _ in groups}
    rows = {(g, label, f"{label} = {_span(values)}  [{source}]") for (g, label, source), values in groups.items()}
    by_label: dict[str, set[tuple[str, str]]] = {}
    for g, label, text in rows:
        by_label.setdefault(label, set()).add((g, text))
    common = {label for label, seen in by_label.items() if len({text for _, text in seen}) == 1 and {g for g, _ in seen} == names}
    seed = f" (random_seed {stage.random_seed})" if _random(stage) else ""
    lines = [f"parameters of {stage.recipe.merge_method}{seed}:"]
    lines += [f"  every tensor: {next(iter(by_label[label]))[1]}" for label in sorted(common)]
    lines += [f"  {g}: {text}" for g, label, text in sorted(rows) if label not in common]
    return lines


def _random(stage: StagePlan) -> bool:
    method = METHODS.get(stage.recipe.merge_method)
    return bool(method and method.random)


def _span(values: list[Any]) -> str:
    if any(isinstance(v, bool) or v is None for v in values):
        return ", ".join(str(v) for v in dict.fromkeys(values))
    lo, hi = min(values), max(values)
    return f"{lo:.6g}" if lo == hi else f"{lo:.6g} .. {hi:.6g} (varies by layer)"


def methods_table() -> str:
    """The README's support table (Markdown), generated from the method registry."""
    rows = ["| method | parameters (scope: default, range) | base model | inputs | output on the CPU |", "|---|---|---|---|---|"]
    for m in METHODS.values():
        params = "; ".join(_param_text(p) for p in m.params) or "none"
        inputs = _inputs_text(m)
        bits = m.note or ("reproducible, statistically equal (seeded per tensor)" if m.random else "byte-identical")
        bits += "; float32 for 16-bit inputs" if m.float32_result else ""
        rows.append(f"| `{m.name}` | {params} | {m.base} | {inputs} | {bits} |")
    return "\n".join(rows)


def _param_text(p: Param) -> str:
    default = "required" if p.required else f"{p.default}"
    rng = f", {p.range_text()}" if p.kind is not bool and (p.low is not None or p.high is not None) else ""
    return f"`{p.name}` ({p.scope}: {default}{rng})"


def _inputs_text(m: Method) -> str:
    parts = []
    if m.min_inputs > 1 or m.max_inputs is not None:
        parts.append(f"{m.min_inputs}" + ("+" if m.max_inputs is None else ("" if m.max_inputs == m.min_inputs else f"-{m.max_inputs}")))
    if m.min_non_base is not None or m.max_non_base is not None:
        lo, hi = m.min_non_base or 0, m.max_non_base
        parts.append(f"{lo}" + ("+" if hi is None else ("" if hi == lo else f"-{hi}")) + " besides the base")
    return ", ".join(parts) or "any"


def report_text(r: dict[str, Any]) -> str:
    lines = [
        f"merged into {r['output']} in {r['wall_s']:.1f}s: {r['shards']} shard(s), {r['tensors']} tensors"
        + (f", {r['shards_reused']} shard(s) reused" if r.get("shards_reused") else "")
        + (f", {r['parts_reused']} part(s) of split shards reused" if r.get("parts_reused") else ""),
        f"read {human(r['bytes_read'])} (plan minimum {human(r['bytes_read_min'])} + headers), wrote {human(r['bytes_written'])}, {r['throughput_mb_s']} MB/s",
    ]
    kernels = f"; CPU kernels {r['cpu_capability']}" if r.get("cpu_capability") else ""
    lines.append(f"executor: {r['executor']['name']} ({r['executor']['why']}){kernels}")
    t = r["timings_s"]
    lines.append(
        f"time: plan {t['plan']:.1f}s, start-up {t['start']:.1f}s, run {t['run']:.1f}s ({r['steady_throughput_mb_s']} MB/s), commit {t['commit']:.1f}s"
    )
    for a in r.get("actors", []):
        if a["units"]:
            lines.append(
                f"  actor {a['actor']} on {str(a['node_id'])[:12]} ({a['device']}): {a['units']} unit(s), "
                f"read {human(a['bytes_read'])}, wrote {human(a['bytes_written'])}, busy {a['busy_s']:.1f}s (hashing {a['hash_s']:.1f}s)"
            )
    for w in r.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)
