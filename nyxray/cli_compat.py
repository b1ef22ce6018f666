"""mergekit-yaml's command-line flags, accepted by ``nyxray merge`` so that a mergekit command
works unchanged. Each flag either does what it means here or is accepted with a one-line note
saying why nyxray does not need it; the table below is the one place that says which.
"""

from __future__ import annotations

import argparse

from .errors import NyxrayError

# flag -> (argparse kind, note printed when the flag is given; "" when the flag takes effect)
_NOTES: dict[str, tuple[str, str]] = {
    "--lazy-unpickle": ("bool", "nyxray reads safetensors by byte range and never unpickles anything"),
    "--low-cpu-memory": ("bool", "memory is bounded per work unit already (README: memory)"),
    "--read-to-gpu": ("bool", "inputs go straight to the math device as they are read"),
    "--multi-gpu": ("bool", "nyxray runs one worker per GPU whenever there are several"),
    "--trust-remote-code": ("bool", "nyxray never runs model code: configs are read as JSON"),
    "--clone-tensors": ("bool", "a repeated tensor is always written as its own copy"),
    "--async-write": ("bool", "writing always overlaps reading and computing"),
    "--write-threads": ("int", "each shard is streamed by its own writer thread"),
    "--num-threads": ("int", "each tensor's math runs on one thread (mergekit --num-threads 1 bits); workers give the parallelism"),
    "--transformers-cache": ("str", "models are read from their storage URL or the Hugging Face cache in place"),
    "--lora-merge-cache": ("str", "LoRA adapters are applied to each weight as it is read: no merged copy of the model is made or cached"),
    "--verbose": ("count", "nyxray's progress line and report say what happened"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mergekit-yaml compatibility (accepted; see the notes they print)")
    g.add_argument("--random-seed", type=int, default=None, metavar="N", help="seed of random methods (DARE, DELLA); default: the recipe's random_seed, else 0")
    g.add_argument(
        "--copy-tokenizer", dest="copy_tokenizer", action=argparse.BooleanOptionalAction, default=True, help="copy the donor's tokenizer files (default on)"
    )
    g.add_argument(
        "--write-model-card",
        dest="write_model_card",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write README.md and mergekit_config.yml (default on)",
    )
    g.add_argument("--safe-serialization", action=argparse.BooleanOptionalAction, default=True, help="write safetensors (the only format nyxray writes)")
    g.add_argument("--gpu-rich", action="store_true", help="same as --cuda (mergekit's shorthand for every GPU option)")
    for flag, (kind, _) in _NOTES.items():
        short = {"--num-threads": ["-j"], "--verbose": ["-v"]}.get(flag, [])
        dest = "compat_" + flag[2:].replace("-", "_")
        if kind == "bool":
            g.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS)
        elif kind == "count":
            g.add_argument(*short, flag, dest=dest, action="count", default=None, help=argparse.SUPPRESS)
        else:
            g.add_argument(*short, flag, dest=dest, type=int if kind == "int" else str, default=None, help=argparse.SUPPRESS)


def apply(args: argparse.Namespace) -> list[str]:
    """Act on the compatibility flags; returns the notes for the ones nyxray does not need."""
    if not args.safe_serialization:
        raise NyxrayError("--no-safe-serialization: nyxray writes safetensors only (pytorch_model.bin is not supported)")
    if args.gpu_rich:
        args.device = "cuda"
    return [f"{flag}: accepted, not needed: {note}" for flag, (_, note) in _NOTES.items() if getattr(args, "compat_" + flag[2:].replace("-", "_")) is not None]
