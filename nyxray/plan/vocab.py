"""The output vocabulary, planned on the driver from tokenizer files (kilobytes to a few MB).

A recipe that changes the tokenizer (``tokenizer_source``, ``tokenizer:``, ``chat_template``)
gets here, once per stage: the output tokenizer's files, and for every input model a map from
each output token id to that model's row of the token (-1: the model lacks it). Per
vocabulary-indexed tensor, :func:`row_table` turns those maps into the rows each input takes,
copies and fills (mergekit 0.1.5's rules), so a worker only moves rows and never opens a tokenizer.

The vocabulary is what ``transformers`` loads from the files (added and special tokens, their
flags), exactly as mergekit sees it, so ``transformers`` builds and saves the output tokenizer
here; it is imported only for such recipes (the ``nyxray[tokenizers]`` extra). Where mergekit's
order comes from a Python set or a hash map (the inputs' order, regular tokens a union adds),
nyxray takes recipe order, then token id: the same output for every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelError, NyxrayError, RecipeError
from ..recipe.parse import Recipe
from ..recipe.tokenizer import TokenizerSpec, TokenSource, TokenSpec
from .chat_templates import AUTO, template_text
from .expr import RowTable
from .sources import Model

TOKENIZER_KEYS = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


@dataclass
class Vocabulary:
    """A stage's output tokenizer: its files, and (when the vocabulary is rebuilt) each model's rows."""

    files: dict[str, bytes]
    spec: TokenizerSpec | None = None  # None: only the chat template changed, the rows stay
    tokens: dict[str, int] = field(default_factory=dict)
    rows: int = 0  # rows of every vocabulary-indexed tensor (padding included)
    perms: dict[str, list[int]] = field(default_factory=dict)  # model -> output id -> its row, or -1
    lookups: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, token) -> its id, for model_token sources
    tables: dict[tuple, RowTable] = field(default_factory=dict)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise NyxrayError("this recipe builds a tokenizer, which needs transformers: pip install 'nyxray[tokenizers]'") from None
    transformers.logging.set_verbosity_error()  # its notes on loading local files are not the user's concern
    return transformers


def _load(tf: Any, model: Model, tmp: str) -> Any:
    """``model``'s tokenizer as transformers loads it, or None when it has none."""
    d = tempfile.mkdtemp(dir=tmp)
    files = model.tokenizer_files
    if files is None:
        if model.files_loc is None or not set(TOKENIZER_KEYS) & set(model.extra_files):
            return None
        files = {f: model.files_loc.read(f) for f in model.extra_files}
    for name, data in {**files, "config.json": json.dumps(model.config).encode()}.items():
        with open(os.path.join(d, name), "wb") as fh:
            fh.write(data)
    try:
        return tf.AutoTokenizer.from_pretrained(d)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"model {model.ref!r}: its tokenizer does not load in transformers ({type(e).__name__}: {str(e)[:200]})") from None


def _vocab_size(model: Model, tok: Any) -> int:
    n = model.config.get("vocab_size")
    return n if isinstance(n, int) and not isinstance(n, bool) else len(tok.get_vocab())


def _union(tf: Any, toks: dict[str, Any], models: dict[str, Model], tmp: str) -> Any:
    """The base tokenizer (first in ``toks``) plus every other model's tokens it lacks: regular
    tokens first, then added tokens with the first model's settings."""
    base_ref = next(iter(toks))
    added: dict[str, Any] = {}
    regular: dict[str, None] = {}
    for ref, tok in toks.items():
        n = _vocab_size(models[ref], tok)
        decoder = {i: t for i, t in tok.added_tokens_decoder.items() if i < n}
        for t in decoder.values():
            added.setdefault(t.content, t)
        regular.update((t, None) for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if i < n)
    d = tempfile.mkdtemp(dir=tmp)
    toks[base_ref].save_pretrained(d)  # a copy: the base's own vocabulary stays as it was
    out = tf.AutoTokenizer.from_pretrained(d)
    base_vocab = toks[base_ref].get_vocab()
    for t in regular:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def _check_base_fits(ref: str, model: Model, tok: Any) -> None:
    n = _vocab_size(model, tok)
    beyond = sorted(i for i in tok.get_vocab().values() if i >= n)
    if beyond:
        raise ModelError(f"model {ref!r}: its tokenizer has {len(beyond)} token(s) at ids >= vocab_size {n} (first {beyond[0]}); nyxray cannot strip them")


def _output_tokenizer(tf: Any, spec: TokenizerSpec, toks: dict[str, Any], models: dict[str, Model], tmp: str) -> Any:
    if spec.source == "union":
        out = _union(tf, toks, models, tmp)
    elif spec.source == "base":
        out = next(iter(toks.values()))  # the base's own object: tokens added below join its vocabulary too, as in mergekit
    else:
        out = _load(tf, models[spec.source], tmp)
        if out is None:
            raise RecipeError("tokenizer_source", f"model {spec.source!r} has no tokenizer files")
    have = set(out.get_vocab())
    for token, _ in spec.tokens:
        if token not in have:
            out.add_tokens(token)
            have.add(token)
    return out


def _permutation(ref: str, out_vocab: dict[str, int], vocab: dict[str, int], n: int) -> list[int]:
    perm = [-1] * len(out_vocab)
    for token, i in out_vocab.items():
        j = vocab.get(token, -1)
        if j >= n:
            raise ModelError(f"model {ref!r}: token {token!r} has id {j}, beyond its vocab_size {n}")
        perm[i] = j
    return perm


def _chat_template(tf: Any, value: str, recipe: Recipe, models: dict[str, Model], tmp: str) -> str | None:
    if value != AUTO:
        return template_text(value)
    found = []
    for ref in recipe.model_refs():
        tok = _load(tf, models[ref], tmp)
        template = getattr(tok, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    return Counter(found).most_common(1)[0][0] if found else None


def _files(tok: Any, template: str | None, tmp: str) -> dict[str, bytes]:
    if template is not None:
        tok.chat_template = template
    d = tempfile.mkdtemp(dir=tmp)
    tok.save_pretrained(d)
    out = {}
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), "rb") as fh:
            out[name] = fh.read()
    return out


def plan_vocabulary(recipe: Recipe, models: dict[str, Model], donor: str) -> Vocabulary | None:
    """The stage's output tokenizer, or None when the donor's files are copied as they are."""
    spec = recipe.tokenizer
    if spec is None and recipe.chat_template is None:
        return None
    tf = _transformers()
    with tempfile.TemporaryDirectory(prefix="nyxray-tok-") as tmp:
        template = _chat_template(tf, recipe.chat_template, recipe, models, tmp) if recipe.chat_template else None
        if spec is None:  # the donor's tokenizer written again with the template
            tok = _load(tf, models[donor], tmp)
            if tok is None:
                raise ModelError(f"{recipe.origin}: chat_template needs a tokenizer, and the donor {donor!r} has none")
            return Vocabulary(_files(tok, template, tmp))
        return _rebuilt(tf, spec, recipe, models, donor, template, tmp)


def _rebuilt(tf: Any, spec: TokenizerSpec, recipe: Recipe, models: dict[str, Model], donor: str, template: str | None, tmp: str) -> Vocabulary:
    base_ref = recipe.base_model or donor
    toks = {base_ref: _load(tf, models[base_ref], tmp)}
    if toks[base_ref] is None:
        raise ModelError(f"{recipe.origin}: the tokenizer is built on {base_ref!r}, which has no tokenizer files")
    _check_base_fits(base_ref, models[base_ref], toks[base_ref])
    for ref in recipe.model_refs():
        if ref not in toks:
            tok = _load(tf, models[ref], tmp)
            if tok is not None:  # a model without one is taken to share the base's, as mergekit does
                toks[ref] = tok
    out = _output_tokenizer(tf, spec, toks, models, tmp)
    tokens = out.get_vocab()
    rows = len(tokens)
    if spec.pad_to_multiple_of and rows % spec.pad_to_multiple_of:
        rows += spec.pad_to_multiple_of - rows % spec.pad_to_multiple_of
    perms, lookups = {}, {}
    for ref in recipe.model_refs():
        vocab = (toks.get(ref) or toks[base_ref]).get_vocab()
        perms[ref] = _permutation(ref, tokens, vocab, models[ref].config.get("vocab_size") or len(vocab))
        lookups.update(((ref, t), vocab[t]) for t in _looked_up(spec, ref) if t in vocab)
    return Vocabulary(_files(out, template, tmp), spec, tokens, rows, perms, lookups)


def _looked_up(spec: TokenizerSpec, ref: str) -> list[str]:
    return [c.source.token for _, c in spec.tokens if c.source is not None and c.source.model == ref and c.source.token is not None]


def _runs(pairs: list[tuple[int, int]]) -> tuple[tuple[int, int, int], ...]:
    """(output row, source row) pairs, in output order, as runs (output row, source row, count)."""
    runs: list[list[int]] = []
    for out, src in pairs:
        if runs and runs[-1][0] + runs[-1][2] == out and runs[-1][1] + runs[-1][2] == src:
            runs[-1][2] += 1
        else:
            runs.append([out, src, 1])
    return tuple(tuple(r) for r in runs)  # type: ignore[misc]


def _default_sources(v: Vocabulary, refs: list[str], token: str, i: int, cfg: TokenSpec, input_rows: list[int], where: str) -> tuple[tuple[int, int], ...]:
    """The one row a token set in ``tokens:`` (or owned by a single input) takes, as (input, row)."""
    src = cfg.source
    if src is None:
        raise RecipeError(f"tokenizer.tokens.{token}", f"{where}: some input lacks token {token!r} (or it is forced): give it a source")
    if src.model is None:
        return ()
    if src.model not in refs:
        raise RecipeError(f"tokenizer.tokens.{token}", f"{where}: the row of {token!r} comes from {src.model!r}, which is not an input of this tensor")
    k = refs.index(src.model)
    if src.token is None and src.token_id is None:
        row = v.perms[src.model][i]
        if row < 0:
            raise RecipeError(f"tokenizer.tokens.{token}", f"{where}: model {src.model!r} has no token {token!r}")
    else:
        row = src.token_id if src.token_id is not None else v.lookups.get((src.model, src.token or ""), -1)
        if not 0 <= row < input_rows[k]:
            raise RecipeError(
                f"tokenizer.tokens.{token}.source", f"{where}: model {src.model!r} has no token {src.token or src.token_id!r} (it has {input_rows[k]} rows)"
            )
    return ((k, row),)


def row_table(v: Vocabulary, refs: list[str], base: str | None, input_rows: list[int], where: str) -> RowTable:
    """The rows of one vocabulary-indexed tensor whose inputs are ``refs`` (in merge order), its
    base model ``base``: a token every input has keeps each input's own row (unless forced); one
    some lack takes its ``tokens:`` source, else the row of the only input that has it, else the
    base's, else the average of those that have it, else zeros."""
    key = (tuple(refs), base, tuple(input_rows))
    if key in v.tables:
        return v.tables[key]
    perms = [v.perms[r] for r in refs]
    user = dict(v.spec.tokens) if v.spec else {}
    fills, own = [], [[] for _ in refs]
    for token, i in sorted(v.tokens.items(), key=lambda kv: kv[1]):
        cfg = user.get(token)
        forced = cfg is not None and cfg.force
        has = [k for k, p in enumerate(perms) if p[i] >= 0]
        for k in has if not forced else ():
            own[k].append((i, perms[k][i]))
        if len(has) == len(refs) and not forced:
            continue
        if cfg is None and len(has) > 1 and not (base in refs and perms[refs.index(base)][i] >= 0):
            fills.append((i, tuple((k, perms[k][i]) for k in has), True))
            continue
        if cfg is None:  # one input has it, the base has it, or none does (zeros)
            k = refs.index(base) if len(has) > 1 else (has[0] if has else None)
            cfg = TokenSpec(TokenSource(None if k is None else refs[k]), False)
        fills.append((i, _default_sources(v, refs, token, i, cfg, input_rows, where), False))
    body = (v.rows, len(v.tokens), tuple(_runs(o) for o in own), tuple(fills))
    table = RowTable(*body, hashlib.sha256(repr(body).encode()).hexdigest())
    v.tables[key] = table
    return table
