"""Error types. Every error nyxray raises on bad input names its culprit in one line."""

from __future__ import annotations

import difflib


class NyxrayError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback."""


class RecipeError(NyxrayError):
    """The recipe is invalid. ``path`` is the key path, e.g. ``slices[1].sources[0].layer_range``."""

    def __init__(self, path: str, message: str, source: str | None = None):
        self.path, self.detail = path, message
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {message}" if path else f"{where}{message}")


class ModelError(NyxrayError):
    """An input model is missing, malformed or incompatible with the recipe."""


class StorageError(NyxrayError):
    """A storage location could not be read or written. Messages never carry credentials."""


class OutputError(NyxrayError):
    """The output location holds something nyxray must not touch, or fails verification."""


def did_you_mean(word: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """A ``" (did you mean 'x'?)"`` suffix when ``word`` is close to one of ``choices``."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
