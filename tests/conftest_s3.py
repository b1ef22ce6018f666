"""pytest fixtures for tests against a real S3-protocol server (SeaweedFS).

Load as a plugin from the main conftest.py::

    pytest_plugins = ["tests.conftest_s3"]

Fixtures
--------
s3_server (session)
    A started :class:`tests.s3server.S3Server` with the bucket ``"nyx"``.
    Credentials are enforced (``s3_server.storage_options`` carries them).
s3_bucket (function)
    Name of a fresh, empty bucket (removed, with its contents and pending
    uploads, after the test).
s3_storage_options (function)
    A fresh copy of ``s3_server.storage_options`` (mutate freely).
s3_fs (function)
    An ``s3fs.S3FileSystem`` on the server, outside fsspec's instance cache
    (so no listing cache leaks between tests).
s3_env (function)
    Sets ``s3_server.env`` (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...) in
    ``os.environ`` for the test (monkeypatch; undone afterwards).
fault_proxy (function)
    Factory: ``fault_proxy(**FaultProxy kwargs)`` starts a
    :class:`tests.faultproxy.FaultProxy` in front of ``s3_server`` and
    returns it; every proxy made is stopped after the test.  Point s3fs at
    it with ``s3_server.storage_options_for(proxy.endpoint_url, ...)``.
"""

from __future__ import annotations

import contextlib

import pytest

from tests.faultproxy import FaultProxy
from tests.s3server import S3Server

DEFAULT_BUCKET = "nyx"


@pytest.fixture(scope="session")
def s3_server():
    srv = S3Server(buckets=[DEFAULT_BUCKET])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def s3_bucket(s3_server):
    name = s3_server.new_bucket("t")
    yield name
    if s3_server.is_running():
        with contextlib.suppress(Exception):
            s3_server.delete_bucket(name, force=True)


@pytest.fixture
def s3_storage_options(s3_server):
    return s3_server.storage_options


@pytest.fixture
def s3_fs(s3_server):
    import s3fs

    return s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server.env


@pytest.fixture
def fault_proxy(s3_server):
    proxies: list[FaultProxy] = []

    def make(**kwargs) -> FaultProxy:
        p = FaultProxy(s3_server.host, s3_server.port, **kwargs)
        proxies.append(p)
        return p.start()

    try:
        yield make
    finally:
        for p in proxies:
            p.stop()
