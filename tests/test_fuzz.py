"""Property-based fuzzing (hypothesis) of everything nyxray parses from users and files: the
safetensors header parser, the recipe/pipeline loader and sweep files. Inputs are structured and
hostile (offsets that overlap or run past the end, dtype/shape mismatches, huge and non-integer
counts, deep YAML, aliases, tags, unicode names), not only random bytes. Property: only
``NyxrayError`` subclasses escape, and nothing is written (the working directory stays empty).
Thousands of cases, bounded to well under a minute; seeds of the failures found are kept as
regular tests at the end."""

from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nyxray.errors import NyxrayError
from nyxray.io.safetensors import DTYPES, header_length, parse_header
from nyxray.recipe.parse import parse_pipeline
from nyxray.recipe.sweep import expand

FUZZ = settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# -- safetensors headers ----------------------------------------------------------------------------

ints = st.one_of(st.integers(-3, 70), st.integers(-(2**70), 2**70), st.sampled_from([2**63, 2**64 - 1, -1, 0]))
junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=5), st.lists(st.integers(), max_size=3))
dtype = st.one_of(st.sampled_from(sorted(DTYPES)), st.sampled_from(["bf16", "F128", "", "U8 "]), junk)
shape = st.one_of(st.lists(ints, max_size=4), st.lists(st.one_of(ints, junk), max_size=3), junk)
offsets = st.one_of(st.tuples(ints, ints).map(list), st.lists(ints, max_size=3), junk)
names = st.text(min_size=0, max_size=12)  # unicode, empty, "__metadata__"...
entry = st.one_of(
    st.fixed_dictionaries({"dtype": dtype, "shape": shape, "data_offsets": offsets}),
    st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]), st.one_of(dtype, shape, offsets), max_size=4),
    junk,
)
metadata = st.one_of(st.dictionaries(st.text(max_size=4), st.one_of(st.text(max_size=4), junk), max_size=3), junk)


@st.composite
def consistent_header(draw) -> dict:
    """A header whose tensors are laid out correctly, then perturbed in one structured way."""
    n = draw(st.integers(0, 5))
    doc, pos = {}, 0
    for i in range(n):
        dt = draw(st.sampled_from(sorted(DTYPES)))
        shp = draw(st.lists(st.integers(0, 6), max_size=3))
        size = DTYPES[dt][0]
        for d in shp:
            size *= d
        doc[draw(names) + str(i)] = {"dtype": dt, "shape": shp, "data_offsets": [pos, pos + size]}
        pos += size
    if doc and draw(st.booleans()):
        victim = doc[draw(st.sampled_from(sorted(doc)))]
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        victim[key] = draw({"dtype": dtype, "shape": shape, "data_offsets": offsets}[key])
    if draw(st.booleans()):
        doc["__metadata__"] = draw(metadata)
    return doc


def file_bytes(header: bytes, data_len: int, length_delta: int = 0) -> bytes:
    return struct.pack("<Q", max(0, len(header) + length_delta)) + header + b"\0" * data_len


def parse_file(blob: bytes) -> None:
    n = header_length(blob[:8], "fuzz.safetensors", len(blob))
    parse_header(blob[8 : 8 + n], "fuzz.safetensors", len(blob))


@FUZZ
@given(
    doc=st.one_of(consistent_header(), st.dictionaries(names, entry, max_size=4)),
    data_len=st.integers(0, 400),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, 7]),
)
def test_header_parser_only_raises_nyxray_errors(doc, data_len, length_delta):
    try:
        header = json.dumps(doc, allow_nan=True).encode()
    except (ValueError, OverflowError):
        return
    try:
        parse_file(file_bytes(header, data_len, length_delta))
    except NyxrayError:
        pass


@settings(FUZZ, max_examples=1500)
@given(blob=st.binary(max_size=300))
def test_header_parser_on_raw_bytes(blob):
    try:
        parse_file(blob)
    except NyxrayError:
        pass


# -- recipes, pipelines and sweeps -------------------------------------------------------------------

KEYS = [
    "slices",
    "sources",
    "models",
    "model",
    "layer_range",
    "merge_method",
    "base_model",
    "parameters",
    "t",
    "filter",
    "value",
    "weight",
    "density",
    "dtype",
    "name",
    "tokenizer_source",
    "random_seed",
    "normalize",
    "int8_mask",
    "out_dtype",
    "base",
    "grid",
    "members",
    "recipe",
    "grid_prefix",
    "parameters.t",
    "parameters.t[0].value",
    "slices[0].sources[1].layer_range",
]
SCALARS = [
    "slerp",
    "passthrough",
    "linear",
    "ties",
    "dare_ties",
    "bfloat16",
    "float32",
    "a",
    "b",
    "org/name",
    "org/name@rev",
    "0.5",
    "[0, 4]",
    "-1",
    "1e400",
    "nan",
    ".inf",
    "~",
    "yes",
    "ünïcødé",
    "\u202e",
    "!!python/object:os.system",
    "*x",
    "&x 1",
    "!!binary aGk=",
    "!!set {a}",
    "!!omap [a: 1]",
    "<<: *x",
    "{",
    "[",
    ":",
    "- -",
    "'",
    '"',
]
scalar = st.one_of(st.sampled_from(SCALARS), st.integers(-(2**65), 2**65), st.floats(), st.booleans(), st.none(), st.text(max_size=6))
tree = st.recursive(scalar, lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.sampled_from(KEYS), kids, max_size=4)), max_leaves=25)
yaml_bits = st.lists(
    st.one_of(
        st.sampled_from(KEYS).map(lambda k: f"{k}:"),
        st.sampled_from(SCALARS),
        st.sampled_from(["\n", "\n  ", "\n- ", "---\n", " ", "&a ", "*a", "!!str ", "!!int ", "!tag ", "[", "]", "{", "}", ","]),
    ),
    max_size=30,
).map("".join)


def yaml_text(doc) -> str:
    import yaml

    return yaml.safe_dump(doc, allow_unicode=True)


deep = st.integers(1, 100).map(lambda n: "[" * n + "]" * n)  # deeper: the seeds at the end (each costs seconds)
aliases = st.integers(1, 12).map(lambda n: "a0: &a0 [x, x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, n)))
texts = st.one_of(tree.map(yaml_text), yaml_bits, deep, aliases, st.text(max_size=80))


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@FUZZ
@given(text=texts)
def test_recipe_loader_only_raises_nyxray_errors_and_writes_nothing(empty_cwd, text):
    try:
        parse_pipeline(text, "fuzz.yml")
    except NyxrayError:
        pass
    assert os.listdir(empty_cwd) == []


@settings(FUZZ, max_examples=300)
@given(text=texts, pipeline=st.lists(tree.map(yaml_text), min_size=2, max_size=3).map("---\n".join))
def test_pipelines_and_sweeps_only_raise_nyxray_errors(empty_cwd, text, pipeline):
    for t in (text, pipeline):
        for load in (lambda t=t: parse_pipeline(t, "fuzz.yml"), lambda t=t: expand(t, "fuzz-sweep.yml")):
            try:
                load()
            except NyxrayError:
                pass
    assert os.listdir(empty_cwd) == []


# -- seeds of the failures fuzzing found (kept as plain tests) ----------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "[" * 1100 + "]" * 1100,  # RecursionError escaped PyYAML's composer
        "{a: " * 1100 + "1" + "}" * 1100,
        "!!int",  # IndexError in PyYAML's int constructor (empty scalar)
        "merge_method: !!int\n",
        "t: !!float",
    ],
)
def test_fuzz_seeds_are_recipe_errors(empty_cwd, text):
    for load in (lambda: parse_pipeline(text, "seed.yml"), lambda: expand(text, "seed-sweep.yml")):
        with pytest.raises(NyxrayError, match="not valid YAML"):
            load()
    assert os.listdir(empty_cwd) == []
