"""The recipe's tokenizer keys -> a typed :class:`TokenizerSpec`: ``tokenizer_source``, the
``tokenizer:`` block (``source``, ``tokens``, ``pad_to_multiple_of``) and ``chat_template``.

mergekit 0.1.5's meaning: ``tokenizer_source: X`` is ``tokenizer: {source: X}``; a ``tokenizer:``
block without ``source`` builds the union; the two forms exclude each other. A token's
``source`` is a model (its own row of that token), ``{kind: zero}``, or
``{kind: model_token, model, token | token_id}`` (the row of another token of a model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import RecipeError
from ..plan.chat_templates import template_problem

SOURCES = ("union", "base")  # besides a model reference
BLOCK_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")
TOKEN_SOURCE_KINDS = {"zero": ("kind",), "model_token": ("kind", "model", "token", "token_id")}


@dataclass(frozen=True)
class TokenSource:
    """Where a token's row comes from: ``model``'s row of ``token`` / ``token_id`` (both None:
    of the token itself), or zeros when ``model`` is None."""

    model: str | None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenSpec:
    source: TokenSource | None
    force: bool


@dataclass(frozen=True)
class TokenizerSpec:
    """The output vocabulary: ``source`` is ``union``, ``base`` or a model reference."""

    source: str
    tokens: tuple[tuple[str, TokenSpec], ...] = ()
    pad_to_multiple_of: int | None = None

    def model_refs(self) -> list[str]:
        refs = [] if self.source in SOURCES else [self.source]
        return refs + [t.source.model for _, t in self.tokens if t.source is not None and t.source.model is not None]


def _token_source(node: Any, path: str, origin: str, check_keys, model_ref) -> TokenSource | None:
    if node is None:
        return None
    if isinstance(node, str):
        return TokenSource(model_ref(node, path, origin))
    kind = node.get("kind") if isinstance(node, dict) else None
    if kind not in TOKEN_SOURCE_KINDS:
        raise RecipeError(path, f"a token source is a model reference, {{kind: zero}} or {{kind: model_token, model, token}}; got {node!r}", origin)
    check_keys(node, path, origin)
    if kind == "zero":
        return TokenSource(None)
    if "model" not in node:
        raise RecipeError(f"{path}.model", "is required", origin)
    token, token_id = node.get("token"), node.get("token_id")
    if (token is None) == (token_id is None):
        raise RecipeError(path, "give exactly one of token and token_id", origin)
    if token is not None and not isinstance(token, str):
        raise RecipeError(f"{path}.token", f"must be a string, got {token!r}", origin)
    if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0):
        raise RecipeError(f"{path}.token_id", f"must be a non-negative integer, got {token_id!r}", origin)
    return TokenSource(model_ref(node["model"], f"{path}.model", origin), token, token_id)


def _tokens(node: Any, origin: str, check_keys, model_ref) -> tuple[tuple[str, TokenSpec], ...]:
    if node is None:
        return ()
    if not isinstance(node, dict):
        raise RecipeError("tokenizer.tokens", "must be a mapping of token -> {source, force}", origin)
    out = []
    for token, cfg in node.items():
        path = f"tokenizer.tokens.{token}"
        if not isinstance(token, str) or not token:
            raise RecipeError(path, f"a token must be a non-empty string, got {token!r}", origin)
        check_keys(cfg if cfg is not None else {}, path, origin)
        cfg = cfg or {}
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"{path}.force", f"must be true or false, got {force!r}", origin)
        out.append((token, TokenSpec(_token_source(cfg.get("source"), f"{path}.source", origin, check_keys, model_ref), force)))
    return tuple(out)


def _source(value: Any, path: str, origin: str, model_ref) -> str:
    return value if value in SOURCES else model_ref(value, path, origin)


def tokenizer_spec(doc: dict, origin: str, check_keys, model_ref) -> TokenizerSpec | None:
    """The recipe's vocabulary, or None when it keeps the donor's tokenizer as it is.

    ``check_keys`` and ``model_ref`` are the parser's own key and model-reference checks."""
    legacy, block = doc.get("tokenizer_source"), doc.get("tokenizer")
    if legacy is not None and block is not None:
        raise RecipeError("tokenizer", "tokenizer: and tokenizer_source: exclude each other; put the source under tokenizer.source", origin)
    if legacy is not None:
        return TokenizerSpec(_source(legacy, "tokenizer_source", origin, model_ref))
    if block is None:
        return None
    check_keys(block, "tokenizer", origin)
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise RecipeError("tokenizer.pad_to_multiple_of", f"must be a positive integer, got {pad!r}", origin)
    source = _source(block.get("source", "union"), "tokenizer.source", origin, model_ref)
    return TokenizerSpec(source, _tokens(block.get("tokens"), origin, check_keys, model_ref), pad)


def chat_template(value: Any, origin: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecipeError("chat_template", f"must be a string, got {value!r}", origin)
    problem = template_problem(value)
    if problem:
        raise RecipeError("chat_template", problem, origin)
    return value
