"""``--profile``: one ``executor="local"`` SLERP and pipeline merge in a fresh process under py-spy
(``record --threads --native`` at 100 Hz; Python frames only if native unwinding fails; cProfile
without py-spy), digested into samples by thread role and the top self / inclusive frames."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

from common import REPO, log
from inputs import BenchInputs


def find_py_spy(given: str | None, work: str) -> str | None:
    """``given``, else py-spy on PATH, in this venv, or in ``WORK/tools/bin``."""
    cands = (
        (given,) if given else (shutil.which("py-spy"), os.path.join(os.path.dirname(sys.executable), "py-spy"), os.path.join(work, "tools", "bin", "py-spy"))
    )
    return next((p for p in cands if p and os.access(p, os.X_OK)), None)


def run_profile(inp: BenchInputs, runs_dir: str, spy: str | None) -> dict[str, Any]:
    """Profile nyxray's SLERP and pipeline; returns recipe -> digest (or cProfile text)."""
    profile: dict[str, Any] = {}
    for recipe in ("slerp", "pipeline"):
        path, kw = inp.recipe_args(recipe)
        out = os.path.join(runs_dir, f"profile-{recipe}")
        shutil.rmtree(out, ignore_errors=True)
        code = (
            "import nyxray, sys, json\n"
            f"rep = nyxray.merge({path!r}, {out!r}, executor='local', out_shard_size={inp.out_shard!r}, progress=False,"
            f" write_model_card=False, **{kw!r})\n"
            "print('BENCH-JSON', json.dumps({'wall_s': rep['wall_s']}))\n"
        )
        res: dict[str, Any] = {"recipe": recipe}
        if spy:
            raw = os.path.join(runs_dir, f"profile-{recipe}.txt")
            base = [spy, "record", "-r", "100", "-f", "raw", "-o", raw, "--threads"]
            tail = ["--", sys.executable, "-c", code]
            r = subprocess.run(base + ["--native"] + tail, cwd=REPO, capture_output=True, text=True)
            native = r.returncode == 0
            if not native:  # --native needs unwinding support; Python frames alone still tell a lot
                shutil.rmtree(out, ignore_errors=True)
                r = subprocess.run(base + tail, cwd=REPO, capture_output=True, text=True)
            if r.returncode == 0:
                res.update(tool=f"py-spy record --threads{' --native' if native else ''} at 100 Hz", **digest_pyspy(raw))
                res["merge_wall_s"] = next(json.loads(line.split(" ", 1)[1]) for line in r.stdout.splitlines() if line.startswith("BENCH-JSON"))["wall_s"]
            else:
                res["error"] = r.stderr[-1500:]
        if not spy or "error" in res:
            import cProfile
            import io
            import pstats

            pr = cProfile.Profile()
            ns: dict = {}
            pr.enable()
            exec(code, ns)
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(15)
            res.update(tool="cProfile (main thread only)", text=s.getvalue())
        shutil.rmtree(out, ignore_errors=True)
        profile[recipe] = res
        log(f"profiled {recipe}")
    return profile


WAIT_LEAVES = (
    "Condition.wait",
    "Event.wait",
    "_worker",
    "Thread.join",
    "Future.result",
    "Queue.get",
    "SimpleQueue.get",
    "wait",
    "select",
    "_wait_for_tstate_lock",
    "get",
)


def _frame(fr: str, line: bool) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py:12)`` (or without the line); native ``0x.. (lib.so)`` -> ``<lib.so>``."""
    if fr.startswith("0x") and " (" in fr:
        return "<" + fr.split(" (", 1)[1].rstrip(")") + ">"
    if " (" not in fr:
        return fr
    func, _, where = fr.partition(" (")
    where = where.rstrip(")")
    fname, _, ln = where.rpartition(":") if where.rpartition(":")[2].isdigit() else (where, "", "")
    fname = "/".join(fname.split("/")[-2:]) if "nyxray" in fname else fname.rsplit("/", 1)[-1]
    return f"{func} ({fname}:{ln})" if line and ln else f"{func} ({fname})"


def _role(stack: str, frames: list[str]) -> str:
    leaf = frames[-1].split(" (")[0] if frames else ""
    if not frames:
        return "native thread, no Python frames (torch OpenMP workers)"
    if (
        leaf in WAIT_LEAVES
        or leaf.endswith(".wait")
        or leaf.endswith("acquire")
        or any(w in stack for w in ("acquire_lock", "SimpleQueue_get", "pthread_cond", "Condition.wait", "sem_wait"))
    ):
        return "waiting"
    if "_find_and_load" in stack:
        return "import"
    if "execute/unit.py" in stack and "_loop (" in stack:
        return "writer thread (write + sha256)"
    if "fetch (" in stack or "read_ranges" in stack:
        return "reader threads"
    if "run_unit (" in stack:
        return "compute (unit main thread)"
    if "nyxray/plan/" in stack:
        return "plan (headers)"
    return "other (commit, driver, start-up)"


def digest_pyspy(raw: str) -> dict:
    """py-spy collapsed stacks -> samples by role, and the top self / inclusive frames of active samples."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    roles: dict[str, int] = {}
    total = active = 0
    with open(raw) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(n)
            total += n
            frames = [x for x in stack.split(";") if not x.startswith("thread (") and not x.startswith("process ")]
            role = _role(stack, frames)
            roles[role] = roles.get(role, 0) + n
            if role in ("waiting", "import") or not frames:
                continue
            active += n
            key = _frame(frames[-1], line=True)
            if ".py" not in key:  # native code: say which Python frame called it
                py = [x for x in frames if ".py:" in x]
                key = f"{key[:60]} <- {_frame(py[-1], line=True) if py else '?'}"
            self_t[key] = self_t.get(key, 0) + n
            for fn in {_frame(x, line=False) for x in frames}:
                incl[fn] = incl.get(fn, 0) + n
    skip = ("<module>", "_bootstrap", "_bootstrap_inner", "run", "_worker", "merge", "run_targets", "execute", "main", "<listcomp>")
    top_self = sorted(self_t.items(), key=lambda kv: -kv[1])[:15]
    top_incl = sorted(((k, v) for k, v in incl.items() if ".py" in k and k.split(" (")[0] not in skip and not k.startswith("Thread.")), key=lambda kv: -kv[1])[
        :15
    ]
    return {"samples": total, "active": active, "self": top_self, "inclusive": top_incl, "roles": roles}
