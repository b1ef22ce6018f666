"""The method catalogue is closed: method knowledge lives in its declarations, and the declarations
check themselves when the registry is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import nyxray
from nyxray.methods.base import Method, Param
from nyxray.methods.registry import METHODS

PACKAGE = Path(nyxray.__file__).parent


def _method_names_in(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every string literal in ``path`` that is a registered method's name.

    Docstrings and comments may speak of methods; only a literal the code compares or looks up
    counts, so a docstring exactly equal to a name is the one false alarm this can raise."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in METHODS]


def test_no_module_outside_methods_names_a_method() -> None:
    # A name check outside the catalogue is a switch that the next method has to find and extend;
    # what differs between methods belongs in their declared fields.
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {name!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).parts[0] != "methods"
        for line, name in _method_names_in(path)
    ]
    assert not found, "method names outside nyxray/methods/ (declare a field on the Method instead):\n" + "\n".join(found)


def test_the_scan_sees_a_name_check(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text('"""slerp"""\n# if method.name == "slerp"\nok = method.name != "passthrough"\n', encoding="utf-8")
    assert _method_names_in(probe) == [(1, "slerp"), (3, "passthrough")]


def _method(**changes: object) -> Method:
    fields: dict = dict(name="probe", pretty="Probe", params=(Param("weight", float, scope="input"), Param("normalize", bool, True)), merge="linear:merge")
    fields.update(changes)
    return Method(**fields)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(base="requried"), "base='requried' is not one of"),
        (dict(optional_policy="passthrough"), "optional_policy='passthrough' is not one of"),
        (dict(name="Bad Name"), "lowercase identifier"),
        (dict(merge="linear.merge"), "is not 'module:function'"),
        (dict(params=(Param("t", float), Param("t", float))), "distinct names"),
        (dict(min_inputs=0), "min_inputs=0"),
        (dict(min_inputs=3, max_inputs=2), "max_inputs=2 < min_inputs=3"),
        (dict(min_non_base=2, max_non_base=1), "max_non_base=1 < min_non_base=2"),
        (dict(optional_policy="base_or_skip"), "base_or_skip"),
        (dict(divides_by_weight_sum="weight"), "must name a shared bool parameter"),
        (dict(divides_by_weight_sum="normalize", weight_param="wieght"), "weight_param='wieght'"),
        (dict(copies_unless="weight"), "copies_unless"),
        (dict(input_rule=lambda values: None), "no non_base parameter"),
        (dict(base="ignored", params=(Param("weight", float, scope="non_base"),)), "declare scope 'input'"),
        (dict(base="forbidden", optional_policy="passthrough_base_singleton"), "no base to copy"),
    ],
)
def test_a_method_declaration_checks_itself(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _method(**changes)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (("t", float), dict(scope="non-base"), "scope='non-base' is not one of"),
        (("t", str), {}, "kind=<class 'str'> is not one of"),
        (("my param", float), {}, "an identifier"),
        (("flag", bool), dict(low=0.0), "a bool has no range"),
        (("t", float), dict(low_open=True), "an open end needs a bound"),
        (("t", float), dict(low=1.0, high=0.0), "empty range"),
        (("density", float, 0.0), dict(low=0.0, high=1.0, low_open=True), "its default does not pass its own check"),
        (("n", int, 1.5), {}, "its default does not pass its own check"),
    ],
)
def test_a_parameter_declaration_checks_itself(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Param(*args, **kwargs)


def test_the_base_rule_is_stated_once() -> None:
    assert _method().name == "probe"  # the probe is valid: each failure above is its one change
    required = next(m for m in METHODS.values() if m.base == "required")
    assert required.base_problem(None).startswith(f"{required.name} needs a base_model")
    assert required.base_problem("org/base") is None
    assert _method(base="forbidden").base_problem("org/base") == "probe takes no base_model"
    assert _method(base="ignored").slice_base("org/slice", "org/top") is None
    assert _method().slice_base("org/slice", "org/top") == "org/slice"
