"""``nyxray`` command line: a thin layer over :mod:`nyxray.api`, shaped like ``mergekit-yaml``."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

from . import __version__, api, cli_compat
from .errors import NyxrayError
from .execute import runtime
from .execute.choice import EXECUTORS
from .execute.cpu_capability import CAPABILITIES
from .execute.cpu_capability import ENV as CAPABILITY_ENV
from .io.location import parse_storage_options
from .plan.describe import methods_table, plan_text, report_text


def _mapping(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, url = pair.partition("=")
        if not sep or not name or not url:
            raise NyxrayError(f"--model {pair!r}: expected NAME=URL")
        out[name] = url
    return out


def _source_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models and storage")
    g.add_argument("--model", action="append", default=[], metavar="NAME=URL", help="read the recipe's model NAME from URL (repeatable)")
    g.add_argument("--models-root", metavar="URL", help="a mirror laid out as URL/org/name for the recipe's model names")
    g.add_argument(
        "--storage-option", action="append", default=[], metavar="KEY=VALUE", help="fsspec storage option, e.g. endpoint_url=http://... (repeatable)"
    )
    g.add_argument("--out-shard-size", default="5B", metavar="SIZE", help="output shard size in bytes, K/M/B suffixes (decimal); default 5B")
    g.add_argument("--allow-crimes", action="store_true", help="allow merging models of different architectures")
    g.add_argument("--unsafe-truncate-embeddings", action="store_true", help="cut embeddings of different vocabulary sizes to the common rows")
    g.add_argument("--strict", action="store_true", help="refuse recipe keys mergekit ignores (by default each is ignored with a warning)")
    g.add_argument(
        "--lora-merge-dtype", metavar="DTYPE", help="dtype a model+adapter's model is loaded in to apply the adapter, as mergekit (default: the model's own)"
    )


def _run_options(p: argparse.ArgumentParser) -> None:
    _source_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--overwrite", action="store_true", help="replace whatever the output location holds")
    g.add_argument("--report", metavar="FILE", help="write the run report as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress line")
    r = p.add_argument_group("execution")
    r.add_argument("--device", default="auto", help="auto (GPU when the actor has one), cpu, cuda or cuda:N")
    r.add_argument("--cuda", action="store_const", const="cuda", dest="device", help="same as --device cuda")
    r.add_argument(
        "--executor",
        default="auto",
        choices=EXECUTORS,
        help="auto (default): ray when a cluster is named (--address, RAY_ADDRESS, a Ray job), else local; ray: always Ray (a local one if no cluster); local: this process, one worker per core or GPU",
    )
    r.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    r.add_argument(
        "--actors", type=int, help="number of Ray actors or local worker threads (default: one per GPU, else one per --actor-cpus CPUs, or per core locally)"
    )
    r.add_argument(
        "--actor-cpus",
        type=float,
        default=1.0,
        help="CPUs each Ray actor reserves (its math runs on one torch thread; reads, writes and hashing use the rest); default 1",
    )
    r.add_argument("--actor-gpus", type=float, help="GPUs per actor (default 1 when the cluster has GPUs)")
    r.add_argument(
        "--cpu-capability",
        choices=CAPABILITIES,
        help="torch's CPU kernel set every worker computes with (their float32 rounding differs); default: the driver's, or the one an unfinished output was begun with",
    )
    r.add_argument(
        "--unit-size",
        metavar="SIZE",
        help="most output bytes one work unit writes, K/M/B suffixes (decimal); a larger shard is split into parts computed by several workers; default 256 MiB",
    )
    cli_compat.add_arguments(p)


def _common(args: argparse.Namespace) -> dict:
    return dict(
        models=_mapping(args.model),
        models_root=args.models_root,
        storage_options=parse_storage_options(args.storage_option),
        out_shard_size=args.out_shard_size,
        allow_crimes=args.allow_crimes,
        unsafe_truncate_embeddings=args.unsafe_truncate_embeddings,
        strict=args.strict,
        lora_merge_dtype=args.lora_merge_dtype,
    )


def _execution(args: argparse.Namespace) -> dict:
    return dict(
        device=args.device,
        copy_tokenizer=args.copy_tokenizer,
        write_model_card=args.write_model_card,
        overwrite=args.overwrite,
        executor=args.executor,
        address=args.address,
        actors=args.actors,
        actor_cpus=args.actor_cpus,
        actor_gpus=args.actor_gpus,
        unit_size=args.unit_size,
        progress=not args.quiet,
        report=args.report,
        random_seed=args.random_seed,
        cpu_capability=args.cpu_capability,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nyxray", description="Merge LLMs on Ray, object storage to object storage (mergekit recipes).")
    parser.add_argument("--version", action="version", version=f"nyxray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="run a recipe or pipeline")
    p.add_argument("recipe", help="mergekit YAML recipe (one document, or ---separated pipeline stages)")
    p.add_argument("out", help="output location: a path or URL (s3://bucket/prefix, ...)")
    p.add_argument("--intermediates", metavar="URL", help="also write each named pipeline stage to URL/<name>")
    _run_options(p)

    p = sub.add_parser("plan", help="show what a merge would read, compute and write (reads headers only)")
    p.add_argument("recipe")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    _source_options(p)

    p = sub.add_parser("sweep", help="run many recipes over the same inputs in one job, sharing reads")
    p.add_argument("sweep", help="sweep YAML (members: and/or base: + grid:)")
    p.add_argument("out", help="output location; member M goes to OUT/M")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first member whose recipe is bad")
    _run_options(p)

    sub.add_parser("methods", help="list the merge methods, their parameters and their exactness (Markdown)")

    p = sub.add_parser("verify", help="check a written model against its manifest")
    p.add_argument("out")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("demo", help="synthesise small Nyxene stand-in models and merge the Nyxene-v2-11B pipeline on a local Ray")
    p.add_argument("dir", nargs="?", default="demo-out", help="working directory (default ./demo-out)")
    p.add_argument("--executor", default="ray", choices=EXECUTORS)
    return parser


def main(argv: list[str] | None = None) -> int:
    runtime.settle_command()  # before any thread exists: this process merges
    args = build_parser().parse_args(argv)
    if getattr(args, "cpu_capability", None):  # torch, not imported yet, reads it when it loads
        os.environ[CAPABILITY_ENV] = args.cpu_capability
    try:
        if args.command in ("merge", "sweep"):
            for note in cli_compat.apply(args):
                print(f"nyxray: {note}", file=sys.stderr)
        if args.command == "plan":
            p = api.plan(args.recipe, **_common(args))
            if args.json:
                print(
                    json.dumps(
                        {
                            "stages": [s.name or "<final>" for s in p.stages],
                            "tensors": len(p.final.tensors),
                            "shards": [{"name": s.name, "tensors": len(s.tensors), "bytes": s.size} for s in p.final.shards],
                            "bytes_read_min": p.bytes_read_min(),
                            "bytes_written": p.final.bytes_written,
                            "read_by_source": p.read_bytes_by_source(),
                            "warnings": p.warnings,
                        },
                        indent=2,
                    )
                )
            else:
                print(plan_text(p))
        elif args.command == "merge":
            report = api.merge(args.recipe, args.out, intermediates=args.intermediates, **_common(args), **_execution(args))
            print(report_text(report))
        elif args.command == "sweep":
            report = api.sweep(args.sweep, args.out, fail_fast=args.fail_fast, **_common(args), **_execution(args))
            print(json.dumps({k: v for k, v in report.items() if k != "members"}, indent=2))
            return 1 if report.get("failed") else 0
        elif args.command == "methods":
            print(methods_table())
        elif args.command == "verify":
            problems = api.verify(args.out, parse_storage_options(args.storage_option))
            for line in problems:
                print(f"nyxray verify: {line}", file=sys.stderr)
            if problems:
                return 1
            print(f"{args.out}: intact")
        elif args.command == "demo":
            from .demo import run_demo

            print(report_text(run_demo(args.dir, executor=args.executor)))
        return 0
    except NyxrayError as e:
        print(f"nyxray: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nyxray: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if argv is None:  # the nyxray command, about to exit: the interpreter's last garbage
            gc.freeze()  # collections would walk torch's ~10^5 objects for nothing (~0.5-2 s)


if __name__ == "__main__":
    sys.exit(main())
