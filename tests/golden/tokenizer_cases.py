"""Golden cases for tokenizers: tiny Llama-shaped models with real tokenizers, and recipes that
change the tokenizer (``tokenizer_source``, ``tokenizer:``, ``chat_template:``).

The inputs differ by added tokens and chat templates, as fine-tunes of one base do:

* ``base``: a word-level vocabulary, ``<unk> <s> </s>`` as special tokens and one plain added
  token ``<extra>``; no chat template;
* ``ft1``: the base's tokens plus the special tokens ``<|im_start|> <|im_end|>``; template A;
* ``ft2``: the words without ``<extra>``, so its ``<|im_start|>`` takes ``<extra>``'s id; template A;
* ``twin``: ``ft1``'s tokenizer, other weights, template B (a merge that keeps the vocabulary).

Each model's embedding has one row per token (``vocab_size`` = the tokenizer's length).
``make_tokenizer_golden.py`` runs mergekit 0.1.5 on ``CASES`` and writes ``tokenizers.json``;
``tests/test_tokenizers.py`` runs nyxray on the same recipes. Recipes use the placeholders of
``cases.py`` (``<<model:NAME>>``) and are rendered with its ``render_recipe``.
"""

from __future__ import annotations

import json
import os
import shutil

from tests.golden.cases import Case, ModelShape, make_model

WORDS = tuple(f"w{i}" for i in range(200))
SPECIALS = ("<unk>", "<s>", "</s>")
TEMPLATE_A = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEMPLATE_B = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
# Texts whose ids the written tokenizer must give as mergekit's does.
PROBES = ("w1 w2 w199", "<|im_start|>user\nw5 <extra> w7<|im_end|>", "<s> w3 <new> w4 </s> unknown", "")


def _shape(vocab: int) -> ModelShape:
    return ModelShape(hidden=64, intermediate=128, layers=2, vocab=vocab, heads=4, kv_heads=2)


# name -> (seed, words kept, plain added tokens, special added tokens, chat template)
MODELS = {
    "base": (41, WORDS, ("<extra>",), (), None),
    "ft1": (42, WORDS, ("<extra>",), ("<|im_start|>", "<|im_end|>"), TEMPLATE_A),
    "ft2": (43, WORDS, (), ("<|im_start|>",), TEMPLATE_A),
    "twin": (44, WORDS, ("<extra>",), ("<|im_start|>", "<|im_end|>"), TEMPLATE_B),
}


def write_tokenizer(path: str, words: tuple[str, ...], plain: tuple[str, ...], special: tuple[str, ...], template: str | None) -> int:
    """A word-level tokenizer saved as transformers saves one; returns its length."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_tokens(list(plain))
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    if template:
        tok.chat_template = template
    tok.save_pretrained(path)
    return len(tok)


def build_inputs(root: str) -> dict[str, str]:
    """Build the four models under ``root``; name -> absolute directory."""
    out = {}
    for name, (seed, words, plain, special, template) in MODELS.items():
        path = os.path.abspath(os.path.join(root, name))
        staging = path + ".tok"
        n = write_tokenizer(staging, words, plain, special, template)
        make_model(path, _shape(n), seed=seed, shard_bytes=40_000)
        for f in ("tokenizer.json", "tokenizer_config.json"):  # the synthetic placeholders
            os.remove(os.path.join(path, f))
        for f in os.listdir(staging):
            shutil.move(os.path.join(staging, f), os.path.join(path, f))
        os.rmdir(staging)
        out[name] = path
    return out


def _models(*entries: str) -> str:
    return "models:\n" + "".join(f"  - model: <<model:{e.split(':')[0]}>>\n    parameters: {{weight: {e.split(':')[1]}}}\n" for e in entries)


CASES: tuple[Case, ...] = (
    Case(
        "union_linear",
        _models("base:0.5", "ft1:0.3", "ft2:0.2") + "merge_method: linear\nbase_model: <<model:base>>\ntokenizer_source: union\ndtype: bfloat16\n",
        description="union of three vocabularies: rows from the base, averaged, or from the one model that has the token",
    ),
    Case(
        "union_slerp",
        "models:\n  - model: <<model:base>>\n  - model: <<model:ft1>>\nmerge_method: slerp\nbase_model: <<model:base>>\n"
        "parameters:\n  t: 0.4\ntokenizer_source: union\ndtype: bfloat16\n",
        description="union under SLERP: the base lacks ft1's chat tokens",
    ),
    Case(
        "tokenizer_block",
        _models("base:0.5", "ft1:0.3", "ft2:0.2") + "merge_method: linear\nbase_model: <<model:base>>\ntokenizer:\n  source: union\n  tokens:\n"
        '    "<|im_start|>":\n      source: <<model:ft2>>\n      force: true\n'
        '    "<new>":\n      source:\n        kind: zero\n'
        '    "<|im_end|>":\n      source:\n        kind: model_token\n        model: <<model:base>>\n        token: "</s>"\n'
        "  pad_to_multiple_of: 64\nchat_template: llama3\ndtype: bfloat16\n",
        description="tokens: forced, zero and model_token sources, a new token, padding to 64 rows, a built-in template",
    ),
    Case(
        "tokenizer_source_model",
        "models:\n  - model: <<model:ft1>>\n    parameters: {weight: 0.5}\n  - model: <<model:ft2>>\n    parameters: {weight: 0.5}\n"
        "merge_method: task_arithmetic\nbase_model: <<model:base>>\ntokenizer_source: <<model:ft2>>\ndtype: bfloat16\n",
        description="a fine-tune's vocabulary under task arithmetic: ft1's and the base's rows permuted to ft2's",
    ),
    Case(
        "chat_auto",
        _models("base:0.4", "ft1:0.3", "ft2:0.3") + "merge_method: linear\nbase_model: <<model:base>>\ntokenizer_source: union\nchat_template: auto\n",
        description="auto: the template most inputs have (A), float32 merge",
    ),
    Case(
        "chat_literal",
        "models:\n  - model: <<model:base>>\n  - model: <<model:ft2>>\nmerge_method: slerp\nbase_model: <<model:base>>\n"
        "parameters:\n  t: 0.5\ntokenizer_source: base\nchat_template: \"{% for m in messages %}{{ m['content'] }}\\n{% endfor %}\"\ndtype: bfloat16\n",
        description="the base's vocabulary (ft2's rows permuted to it) and a literal template",
    ),
    Case(
        "chat_named",
        "models:\n  - model: <<model:ft1>>\n  - model: <<model:twin>>\nmerge_method: slerp\nbase_model: <<model:ft1>>\n"
        "parameters:\n  t: 0.5\nchat_template: chatml\ndtype: bfloat16\n",
        description="one vocabulary, a built-in template: the donor's tokenizer written again with it",
    ),
)

CASES_BY_NAME = {c.name: c for c in CASES}


def tokenizer_facts(path: str) -> dict:
    """What must match in a written tokenizer, as transformers loads it."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    added = [[i, t.content, t.special, t.normalized, t.lstrip, t.rstrip, t.single_word] for i, t in sorted(tok.added_tokens_decoder.items())]
    return {
        "vocab": vocab,
        "added": added,
        "special": json.loads(json.dumps(tok.special_tokens_map)),
        "chat_template": tok.chat_template,
        "ids": [tok(text).input_ids for text in PROBES],
    }
