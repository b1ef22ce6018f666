"""Which executor ``auto`` picks, and the reason the report gives, without importing Ray."""

from __future__ import annotations

import sys
import types

import pytest

from nyxray.execute.choice import JOB_ENV, choose


@pytest.fixture
def no_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(JOB_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    return monkeypatch


def test_auto_runs_here_when_no_cluster_is_named(no_cluster):
    c = choose("auto")
    assert c.name == "local" and "no Ray cluster named" in c.why
    assert c.report() == {"name": "local", "why": c.why}


@pytest.mark.parametrize(
    "setup, kwargs, why, warm",
    [
        (lambda m: None, {"address": "ray://head:10001"}, "address=ray://head:10001", True),
        (lambda m: m.setenv("RAY_ADDRESS", "10.0.0.1:6379"), {}, "RAY_ADDRESS", True),
        (lambda m: m.setenv(JOB_ENV, "{}"), {}, "Ray job", True),
        (lambda m: m.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: True)), {}, "already initialised", True),
        (lambda m: None, {"keep_actors": 30}, "keep_actors=30", False),  # a local Ray to start: the plan's errors come first
    ],
)
def test_auto_uses_ray_when_a_cluster_is_named(no_cluster, setup, kwargs, why, warm):
    setup(no_cluster)
    c = choose("auto", **kwargs)
    assert c.name == "ray" and why in c.why
    assert c.warm is warm  # actors start during planning only on a named cluster


def test_explicit_ray_warms_up_only_on_a_named_cluster(no_cluster):
    assert not choose("ray").warm  # starts a local Ray: after the plan, so a bad recipe fails fast
    assert choose("ray", address="ray://head:10001").warm
    assert not choose("local", address="ray://head:10001").warm


def test_an_explicit_executor_is_kept_whatever_the_environment(no_cluster):
    no_cluster.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert choose("local").name == "local"
    no_cluster.delenv("RAY_ADDRESS")
    assert choose("ray") == choose("ray", keep_actors=0)
    assert choose("ray").name == "ray" and "asked for" in choose("ray").why
