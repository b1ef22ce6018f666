"""``bench.py``'s output: the table (one row per case), the verdicts against the targets, and the
whole printed text with the machine, the command line and the profile; the JSON kept by ``--json``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common import MB, human
from measure import Case

from nyxray.output.parts import DEFAULT_UNIT_SIZE

if TYPE_CHECKING:
    from bench import Bench

ORDER = (
    "floor",
    "floor-s3",
    "mergekit",
    "kernel",
    "nyxray-local",
    "nyxray-cli",
    "nyxray-ray1",
    "nyxray-ray2",
    "nyxray-ray2-kept",
    "nyxray-ray-cold",
    "nyxray-s3-local",
    "nyxray-s3-ray2",
)


def table(b: Bench) -> tuple[str, list[dict]]:
    cases = list(b.cases.values())

    def key(c: Case):
        rorder = ("passthrough", "slerp", "pipeline", "sweep", "s3read")
        suffix = c.id.split("/", 1)[1]
        return (rorder.index(c.recipe) if c.recipe in rorder else 9, ORDER.index(suffix) if suffix in ORDER else 50, c.id)

    cases.sort(key=key)
    floors = {c.recipe: c.wall() for c in cases if c.id.endswith("/floor") and c.runs}
    floors_s3 = {c.recipe: c.wall() for c in cases if c.id.endswith("/floor-s3") and c.runs}
    mk = {c.recipe: c.wall() for c in cases if c.id.endswith("/mergekit") and c.runs}
    if "slerp" in mk:
        mk["sweep"] = mk["slerp"] * b.a.sweep_k
    head = [
        "case",
        "wall s",
        "start s",
        "run s",
        "hash s",
        "CPU s",
        "runs",
        "RSS work",
        "RSS proc",
        "read",
        "written",
        "MB/s",
        "floor/case",
        "floor/run",
        "vs mergekit",
        "note",
    ]
    rows, raw = [], []
    for c in cases:
        w = c.wall()
        if w is None:
            rows.append([c.id, "-", "", "", "", "", "0", "", "", "", "", "", "", "", "", c.skipped or "not run"])
            raw.append(c.summary())
            continue
        rd, wr = c.first("bytes_read") or 0, c.first("bytes_written") or 0
        fl = floors_s3.get(c.recipe) if "s3" in c.id and "floor" not in c.id else floors.get(c.recipe)
        ratio_floor = fl / w if fl and w and not c.id.endswith("/floor") and c.kind != "kernel" else None
        ratio_mk = w / mk[c.recipe] if c.recipe in mk and c.kind not in ("floor", "kernel") and not c.id.endswith("/mergekit") else None
        spread = f"{len(c.runs)}" + (f" ({min(r['wall_s'] for r in c.runs):.2f}-{max(r['wall_s'] for r in c.runs):.2f})" if len(c.runs) > 1 else "")
        rd_s = human(rd) if rd else ("n/a" if c.kind == "mergekit" else "0")
        cpu = c.cpu()
        start, run = c.startup(), c.phase("run")
        ratio_run = fl / run if fl and run else None
        rows.append(
            [
                c.id,
                f"{w:.2f}",
                f"{start:.2f}" if start is not None else "",
                f"{run:.2f}" if run is not None else "",
                f"{hs:.2f}" if (hs := c.hash_s()) is not None else "",
                f"{cpu:.1f}" if cpu is not None else "",
                spread,
                human(c.work_rss()),
                human(c.proc_rss()),
                rd_s,
                human(wr),
                f"{(rd + wr) / w / MB:.0f}" if w else "",
                f"{ratio_floor:.2f}" if ratio_floor else "",
                f"{ratio_run:.2f}" if ratio_run else "",
                f"{ratio_mk:.2f}x" if ratio_mk else "",
                c.note,
            ]
        )
        s = c.summary()
        s.update(
            ratio_floor=ratio_floor, ratio_floor_run=ratio_run, startup_s=start, run_s=run, ratio_mergekit=ratio_mk, mb_s=(rd + wr) / w / MB if w else None
        )
        raw.append(s)
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(widths[i]) if i in (0, 6, 15) else str(v).rjust(widths[i]) for i, v in enumerate(r)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * x for x in widths))
    return "\n".join(lines), raw


def verdicts(b: Bench) -> list[str]:
    c = b.cases
    out = []
    limit = 1.5e9 + DEFAULT_UNIT_SIZE  # issue 13: every process <= 1.5 GB + the unit size

    def med(cid: str) -> float | None:
        return c[cid].wall() if cid in c else None

    def ratio_line(recipe: str, target: float, label: str) -> None:
        mkw = med(f"{recipe}/mergekit")
        if not mkw:
            out.append(f"{label} <= {target}x mergekit: not measured (no mergekit run)")
            return
        parts = []
        for k in ("nyxray-local", "nyxray-ray1", "nyxray-ray2", "nyxray-ray2-kept", "nyxray-cli", "nyxray-ray-cold"):
            w = med(f"{recipe}/{k}")
            if w:
                parts.append(f"{k.removeprefix('nyxray-')} {w / mkw:.2f}x {'MET' if w / mkw <= target else 'MISSED'}")
        out.append(f"{label} <= {target}x mergekit ({mkw:.1f}s): " + ", ".join(parts))

    ratio_line("slerp", 0.2, "SLERP (issue 13: the default CLI)")
    ratio_line("pipeline", 0.1, "fused pipeline (vs mergekit's 3 runs; issue 13: the default CLI)")
    ratio_line("passthrough", 0.8, "passthrough")
    parts = []
    for cid, case in c.items():
        run = case.phase("run") if case.kind.startswith("nyxray") and case.runs else None
        fl = med(f"{case.recipe}/floor-s3" if "s3" in cid else f"{case.recipe}/floor")
        if run and fl:
            r = fl / run
            parts.append(f"{cid} {r:.2f} {'MET' if r >= 0.5 else 'MISSED'} (start-up {case.startup():.2f}s)")
    out.append(
        "steady-state throughput >= 50% of the I/O floor (floor time / nyxray's run phase; start-up = plan + start phases): "
        + (", ".join(parts) or "not measured")
    )
    parts = []
    for cid, case in c.items():
        if case.kind.startswith("nyxray") and case.runs:
            p, w = case.proc_rss(), case.work_rss()
            grow = ""
            if case.kind == "nyxray-local":  # the bench's own driver keeps heap between cases: say how much this run added
                g = max(r["rss"]["driver"] - r["rss"].get("driver_at_start", 0) for r in case.runs)
                grow = f", +{human(g)} over the driver's RSS at start"
            parts.append(f"{cid} proc {human(p)} {'MET' if p < limit else 'MISSED'} (driver+actors {human(w)} {'MET' if w < limit else 'MISSED'}{grow})")
    out.append(f"peak RSS < 1.5 GB + unit size ({human(limit)}): " + ("; ".join(parts) or "not measured"))
    parts = []
    for cid, case in c.items():
        if case.kind.startswith("nyxray") and case.runs and case.first("bytes_read_min"):
            if case.recipe == "sweep":
                continue
            rd, mn = case.first("bytes_read"), case.first("bytes_read_min")
            parts.append(f"{cid} +{(rd - mn) / mn * 100:.2f}% {'MET' if rd <= mn * 1.01 else 'MISSED'}")
    if "sweep/one-job" in c and c["sweep/one-job"].runs:
        case = c["sweep/one-job"]
        rd, mn = case.first("bytes_read"), case.first("bytes_read_min")
        parts.append(f"sweep/one-job ({b.a.sweep_k} members) +{(rd - mn) / mn * 100:.2f}% {'MET' if rd <= mn * 1.01 else 'MISSED'}")
    out.append("bytes read within 1% of the plan minimum (headers included): " + (", ".join(parts) or "not measured"))
    return out


def render(b: Bench, cmdline: str) -> tuple[str, dict]:
    i = b.info
    lines = [
        f"nyxray benchmark, {i.get('date')}",
        f"machine: {i.get('cpus')} CPUs ({i.get('cpu_model', '?')}), {i.get('ram_gib')} GiB RAM; {i.get('uname')}",
        f"python {i.get('python')}, torch {i.get('torch')} ({i.get('torch_threads')} threads), ray {i.get('ray')}, s3fs {i.get('s3fs')},"
        f" nyxray {i.get('nyxray')} @ {i.get('git')}"
        + (f" (at the end: {i.get('git_end')})" if i.get("git_end") != i.get("git") else "")
        + f"; mergekit: {b.mk_bin or 'not used'}",
        f"command: {cmdline}",
        f"inputs: 4 x {human(b.inp.model_size)} bf16 Mistral-shaped ({', '.join(f'{k}={v}' for k, v in b.inp.dims.items())}), "
        f"input shards {human(b.inp.in_shard)}, out-shard-size {b.inp.out_shard}; cached in {b.inp.base}",
        f"ray.init: {b.ray_init_s:.1f}s (not in the steady-state rows)" if b.ray_init_s else "ray.init: not run",
    ]
    if b.s3.upload:
        lines.append(
            f"S3 upload of the inputs (s3fs put_file, 4 files at once): {human(b.s3.upload['bytes'])} in {b.s3.upload['wall_s']:.1f}s = {b.s3.upload['mb_s']:.0f} MB/s"
        )
    loads = [r["load1"] for c in b.cases.values() for r in c.runs if "load1" in r]
    if loads:
        lines.append(f"1-min load average at the start of the runs: {min(loads):.1f}-{max(loads):.1f} (other jobs share this machine)")
    if b.error:
        lines.append(f"ERROR, the run stopped early:\n{b.error}")
    tab, raw = table(b)
    lines += [
        "",
        tab,
        "",
        "wall s: median of the runs (min-max in 'runs'); CPU s: median CPU seconds of the driver + actors (subprocess rows: the subprocesses); RSS work: peak of driver + Ray actors summed (for subprocess rows: the"
        " subprocess tree); RSS proc: peak of the largest single working process (driver for local, actor for Ray);"
        " Ray/S3 daemons are not counted (see --json). hash s: of the workers' busy time, seconds in SHA-256 of the output (summed over workers, on their writer threads). start s / run s: nyxray's own phases (timings_s in its report): start-up ="
        " plan + claim + worker start (Ray actors that compute load torch here), run = first unit handed out to the last one done."
        " MB/s = (read + written) / wall. floor/case = I/O-floor time / case time; floor/run = I/O-floor time / run phase (steady state)"
        " (the S3 floor for S3 rows). vs mergekit = case time / mergekit time of the same recipe (the pipeline: mergekit's 3 runs;"
        " the sweep: K x mergekit slerp).",
        "",
    ]
    lines += ["targets:"] + [f"  - {v}" for v in verdicts(b)]
    if b.profile:
        lines += ["", "profile (nyxray executor=local, one process; py-spy):"]
        for recipe, p in b.profile.items():
            if "self" in p:
                lines.append(
                    f"  {recipe}: merge {p.get('merge_wall_s')}s; {p['tool']}; {p['samples']} samples by role: "
                    + ", ".join(f"{k} {v}" for k, v in sorted(p["roles"].items(), key=lambda kv: -kv[1]))
                )
                act = max(1, p["active"])
                lines.append(f"    self time, % of {p['active']} active samples (no waits, no imports):")
                lines += [f"      {v / act * 100:5.1f}%  {k}" for k, v in p["self"][:12]]
                lines.append("    inclusive: " + "; ".join(f"{k} {v / act * 100:.0f}%" for k, v in p["inclusive"][:12]))
            else:
                lines.append(f"  {recipe}: {p.get('tool')}\n{p.get('text', p.get('error', ''))}")
    result = {
        "info": i,
        "command": cmdline,
        "dims": b.inp.dims,
        "model_bytes": b.inp.model_size,
        "out_shard_size": b.inp.out_shard,
        "in_shard_bytes": b.inp.in_shard,
        "ray_init_s": b.ray_init_s,
        "s3_upload": b.s3.upload,
        "cases": raw,
        "profile": b.profile,
        "verdicts": verdicts(b),
        "plans": {
            k: {"bytes_read_min": p.bytes_read_min(), "bytes_written": p.final.bytes_written, "shards": len(p.final.shards)} for k, p in b.inp.plans.items()
        },
    }
    return "\n".join(lines), result
