"""Tests of the S3 test infrastructure itself (tests/s3server.py,
tests/faultproxy.py, tests/conftest_s3.py) and of the s3fs behaviour the
main code relies on, against a real SeaweedFS server."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import http.client
import http.server
import json
import os
import signal
import socket
import sys
import threading
import time

import pytest

if "tests.conftest_s3" not in sys.modules:  # main conftest does not load the plugin (yet)
    from tests.conftest_s3 import (  # noqa: F401
        fault_proxy,
        s3_bucket,
        s3_env,
        s3_fs,
        s3_server,
        s3_storage_options,
    )

import s3fs
from botocore.exceptions import BotoCoreError, EndpointConnectionError

from tests.faultproxy import FaultProxy
from tests.s3server import S3Server, S3ServerError, free_port

MiB = 2**20
TEST_TIME_LIMIT_S = 90


@pytest.fixture(autouse=True)
def _time_limit():
    """Per-test wall-clock limit without a plugin (SIGALRM, main thread)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"test exceeded {TEST_TIME_LIMIT_S}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIME_LIMIT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _fs(opts) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**opts, skip_instance_cache=True)


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


# --------------------------------------------------------------------------
# server
# --------------------------------------------------------------------------


def test_server_basics(s3_server):
    assert s3_server.is_running()
    assert s3_server.endpoint_url == f"http://127.0.0.1:{s3_server.port}"
    ports = list(s3_server.ports.values())
    assert len(set(ports)) == len(ports) == 5
    assert "nyx" in s3_server.list_buckets()
    env = s3_server.env
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        assert env[k]
    so = s3_server.storage_options
    assert so["client_kwargs"]["endpoint_url"] == s3_server.endpoint_url
    so["key"] = "mutated"
    assert s3_server.storage_options["key"] != "mutated"  # fresh dict each time
    assert s3_server.start_seconds is not None and s3_server.start_seconds < 30


def test_put_get_ls(s3_fs, s3_bucket):
    fs = s3_fs
    fs.pipe(f"{s3_bucket}/a/b.txt", b"hello world")
    fs.pipe(f"{s3_bucket}/a/c.bin", bytes(range(256)) * 10)
    assert fs.cat_file(f"{s3_bucket}/a/b.txt") == b"hello world"
    assert sorted(fs.ls(f"{s3_bucket}/a", detail=False)) == [
        f"{s3_bucket}/a/b.txt",
        f"{s3_bucket}/a/c.bin",
    ]
    assert fs.info(f"{s3_bucket}/a/c.bin")["size"] == 2560
    with fs.open(f"{s3_bucket}/a/b.txt", "rb") as f:
        assert f.read() == b"hello world"
    fs.rm(f"{s3_bucket}/a/b.txt")
    fs.invalidate_cache()
    assert not fs.exists(f"{s3_bucket}/a/b.txt")


def test_ranged_reads(s3_fs, s3_bucket):
    fs = s3_fs
    data = os.urandom(3 * MiB + 123)
    path = f"{s3_bucket}/ranged.bin"
    fs.pipe(path, data)
    assert fs.cat_file(path, start=0, end=8) == data[:8]
    assert fs.cat_file(path, start=MiB - 3, end=MiB + 5) == data[MiB - 3 : MiB + 5]
    assert fs.cat_file(path, start=len(data) - 10) == data[-10:]
    assert fs.cat_file(path, start=-10) == data[-10:]
    starts = [0, 100, 2 * MiB, len(data) - 1]
    ends = [10, 5000, 2 * MiB + 4096, len(data)]
    got = fs.cat_ranges([path] * len(starts), starts, ends)
    assert got == [data[s:e] for s, e in zip(starts, ends)]
    with fs.open(path, "rb", cache_type="none") as f:
        f.seek(2 * MiB + 7)
        assert f.read(100) == data[2 * MiB + 7 : 2 * MiB + 107]


def test_multipart_write_roundtrip(s3_server, s3_fs, s3_bucket):
    fs = s3_fs
    piece = os.urandom(MiB)
    path = f"{s3_bucket}/mpu.bin"
    f = fs.open(path, "wb", block_size=5 * MiB)
    for i in range(12):
        f.write(piece[i:] + piece[:i])
    assert s3_server.list_pending_uploads(s3_bucket)  # parts being uploaded
    f.close()
    expected = b"".join(piece[i:] + piece[:i] for i in range(12))
    info = fs.info(path)
    assert info["size"] == 12 * MiB
    assert info["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB parts
    assert hashlib.sha256(fs.cat_file(path)).digest() == hashlib.sha256(expected).digest()
    assert s3_server.list_pending_uploads(s3_bucket) == []


def test_discard_leaves_no_object(s3_server, s3_fs, s3_bucket):
    fs = s3_fs
    piece = os.urandom(MiB)
    # multipart: parts already uploaded, discard aborts the upload
    f = fs.open(f"{s3_bucket}/big", "wb", block_size=5 * MiB)
    for _ in range(12):
        f.write(piece)
    assert len(s3_server.list_pending_uploads(s3_bucket)) == 1
    f.discard()
    f.closed = True  # else close()/__del__ raise AttributeError (buffer is None)
    fs.invalidate_cache()
    assert not fs.exists(f"{s3_bucket}/big")
    assert s3_server.list_pending_uploads(s3_bucket) == []
    # small (single PUT at close): nothing was ever sent
    f = fs.open(f"{s3_bucket}/small", "wb")
    f.write(b"abc")
    f.discard()
    f.closed = True
    del f
    gc.collect()
    fs.invalidate_cache()
    assert not fs.exists(f"{s3_bucket}/small")
    assert fs.ls(s3_bucket) == []


def test_exception_inside_with_commits_partial_object(s3_fs, s3_bucket):
    """The ENVIRONMENT.md warning: ``with fs.open(..., "wb")`` + exception
    completes the upload, so a partial object becomes visible."""
    fs = s3_fs
    with pytest.raises(RuntimeError):
        with fs.open(f"{s3_bucket}/partial", "wb", block_size=5 * MiB) as f:
            f.write(os.urandom(7 * MiB))
            raise RuntimeError("writer failed")
    fs.invalidate_cache()
    assert fs.size(f"{s3_bucket}/partial") == 7 * MiB


def test_pending_upload_helpers(s3_server, s3_bucket):
    c = s3_server.client()
    up = c.create_multipart_upload(Bucket=s3_bucket, Key="x/pending")
    c.upload_part(Bucket=s3_bucket, Key="x/pending", UploadId=up["UploadId"], PartNumber=1, Body=b"1" * 100)
    c.create_multipart_upload(Bucket=s3_bucket, Key="y/pending")
    pending = s3_server.list_pending_uploads(s3_bucket)
    assert sorted(p["Key"] for p in pending) == ["x/pending", "y/pending"]
    assert [p["Key"] for p in s3_server.list_pending_uploads(s3_bucket, prefix="x/")] == ["x/pending"]
    assert s3_server.abort_pending_uploads(s3_bucket) == 2
    assert s3_server.list_pending_uploads(s3_bucket) == []


def test_env_configures_s3fs(s3_env, s3_server):
    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # everything from the environment
    fs.pipe("nyx/env-check", b"via env")
    assert fs.cat_file("nyx/env-check") == b"via env"


def test_error_types(s3_server, s3_fs, s3_bucket):
    """Which exceptions s3fs raises, for the main code to map to clear errors."""
    fs = s3_fs
    fs.pipe(f"{s3_bucket}/k", b"x")
    # missing key / bucket: FileNotFoundError, reads and writes alike
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{s3_bucket}/missing")
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{s3_bucket}/missing", start=0, end=4)
    with pytest.raises(FileNotFoundError):
        fs.info(f"{s3_bucket}/missing")
    with pytest.raises(FileNotFoundError):
        fs.open(f"{s3_bucket}/missing", "rb")
    with pytest.raises(FileNotFoundError):
        fs.cat_file("no-such-bucket-x/k")
    with pytest.raises(FileNotFoundError):
        fs.ls("no-such-bucket-x")
    with pytest.raises(FileNotFoundError):  # no silent bucket creation
        fs.pipe("no-such-bucket-x/k", b"1")
    f = fs.open("no-such-bucket-x/k", "wb", block_size=5 * MiB)
    with pytest.raises(FileNotFoundError):  # at CreateMultipartUpload
        f.write(os.urandom(6 * MiB))
    f.discard()
    f.closed = True
    assert fs.exists("no-such-bucket-x/k") is False  # exists() does not raise
    assert "no-such-bucket-x" not in s3_server.list_buckets()

    # bad credentials: PermissionError (403), reads, listings and writes
    for bad in (
        {**s3_server.storage_options, "secret": "wrong-secret"},
        {**s3_server.storage_options, "key": "unknown-key"},
    ):
        bfs = _fs(bad)
        with pytest.raises(PermissionError):
            bfs.cat_file(f"{s3_bucket}/k")
        with pytest.raises(PermissionError):
            bfs.ls(s3_bucket)
        with pytest.raises(PermissionError):
            bfs.pipe(f"{s3_bucket}/k2", b"1")
        with pytest.raises(PermissionError):
            bfs.exists(f"{s3_bucket}/k")

    # unreachable endpoint: botocore's EndpointConnectionError, NOT an OSError
    dead = _fs(s3_server.storage_options_for(f"http://127.0.0.1:{free_port()}", max_attempts=2))
    t0 = time.monotonic()
    with pytest.raises(EndpointConnectionError) as ei:
        dead.cat_file(f"{s3_bucket}/k")
    assert not isinstance(ei.value, OSError)
    assert isinstance(ei.value, BotoCoreError)
    assert time.monotonic() - t0 < 20


def test_two_servers_do_not_clash(s3_server):
    with S3Server(buckets=["other"]) as srv2:
        assert set(srv2.ports.values()).isdisjoint(s3_server.ports.values())
        fs1 = _fs(s3_server.storage_options)
        fs2 = _fs(srv2.storage_options)
        fs2.pipe("other/k", b"2")
        fs1.pipe("nyx/two-servers", b"1")
        assert fs2.cat_file("other/k") == b"2"
        assert "other" not in s3_server.list_buckets()
        d, port, pid = srv2.dir, srv2.port, srv2.pid
        assert srv2.start_seconds < 30
    # stopped: process gone, port closed, temp dir removed; stop() idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not _port_open(port)
    assert d is not None and not os.path.exists(d)
    srv2.stop()
    assert fs1.cat_file("nyx/two-servers") == b"1"


def test_start_failure_is_reported_with_log():
    srv = S3Server(extra_args=["-no.such.flag=1"], start_attempts=1, start_timeout=20)
    with pytest.raises(S3ServerError) as ei:
        srv.start()
    assert "flag provided but not defined: -no.such.flag" in str(ei.value)  # weed's log
    assert not srv.is_running() and srv.dir is None


# --------------------------------------------------------------------------
# fault proxy in front of the S3 server
# --------------------------------------------------------------------------


def test_proxy_passthrough_and_toggle(s3_server, fault_proxy):
    proxy = fault_proxy(error503_share=1.0)
    fs = _fs(s3_server.storage_options_for(proxy.endpoint_url, max_attempts=1))
    fs.retries = 1  # s3fs's own retry loop (5 by default) on top of botocore's
    proxy.enabled = False
    fs.pipe("nyx/pt", b"through the proxy")
    assert fs.cat_file("nyx/pt") == b"through the proxy"
    c = proxy.counters
    assert c["requests"] >= 2 and c["forwarded"] == c["requests"] and proxy.faults == 0
    proxy.enabled = True
    with pytest.raises(OSError):  # s3fs: OSError(EBUSY, 'Please reduce your request rate.')
        fs.cat_file("nyx/pt", start=0, end=4)
    assert proxy.counters["error503"] >= 1
    proxy.set_faults(error503_share=0.0)
    assert fs.cat_file("nyx/pt", start=0, end=7) == b"through"


def test_retried_reads_survive_503_and_resets(s3_server, fault_proxy):
    data = os.urandom(2 * MiB + 17)
    _fs(s3_server.storage_options).pipe("nyx/flaky.bin", data)
    proxy = fault_proxy(reset_share=0.10, error503_share=0.30, seed=1234)
    fs = _fs(s3_server.storage_options_for(proxy.endpoint_url, max_attempts=10))
    t0 = time.monotonic()
    for i in range(12):
        s, e = i * 150_000, i * 150_000 + 4096
        assert fs.cat_file("nyx/flaky.bin", start=s, end=e) == data[s:e]
    assert fs.cat_file("nyx/flaky.bin") == data
    assert fs.cat_ranges(["nyx/flaky.bin"] * 3, [0, 10, MiB], [5, 20, MiB + 9]) == [
        data[0:5],
        data[10:20],
        data[MiB : MiB + 9],
    ]
    elapsed = time.monotonic() - t0
    c = proxy.counters
    assert c["error503"] > 0 and c["reset"] > 0, c
    assert proxy.faults == c["error503"] + c["reset"]
    assert c["requests"] == c["forwarded"] + proxy.faults
    assert elapsed < 60, elapsed
    kinds = {action for _, _, action in proxy.events}
    assert {"reset", "error503", "forwarded"} <= kinds


def test_truncated_and_delayed_responses_are_retried(s3_server, fault_proxy):
    data = os.urandom(300_000)
    _fs(s3_server.storage_options).pipe("nyx/trunc.bin", data)
    proxy = fault_proxy(truncate_share=0.3, delay_share=0.2, delay_s=0.05, seed=7)
    fs = _fs(s3_server.storage_options_for(proxy.endpoint_url, max_attempts=10))
    for i in range(10):
        assert fs.cat_file("nyx/trunc.bin", start=i * 1000, end=i * 1000 + 200_000) == data[i * 1000 : i * 1000 + 200_000]
    c = proxy.counters
    assert c["truncate"] > 0 and c["delay"] > 0, c


def test_reset_after_server_executed_put(s3_server, fault_proxy):
    """reset_phase='response': the server stored the object but the client
    saw a reset, and retried (PUT is idempotent)."""
    proxy = fault_proxy(reset_share=1.0, reset_phase="response", match=lambda r: r.method == "PUT")
    fs = _fs(s3_server.storage_options_for(proxy.endpoint_url, max_attempts=3))
    with pytest.raises(BotoCoreError):
        fs.pipe("nyx/phantom", b"stored anyway")
    assert proxy.counters["reset"] >= 1
    assert _fs(s3_server.storage_options).cat_file("nyx/phantom") == b"stored anyway"


def test_kill_after_bytes_interrupts_one_upload_then_retry_succeeds(s3_server, fault_proxy, s3_bucket):
    is_part = lambda r: r.method == "PUT" and "partNumber=" in r.query  # noqa: E731
    proxy = fault_proxy(kill_after_bytes=MiB, kill_count=1, match=is_part)
    fs = _fs(s3_server.storage_options_for(proxy.endpoint_url, max_attempts=3))
    piece = os.urandom(MiB)
    f = fs.open(f"{s3_bucket}/killed-once", "wb", block_size=5 * MiB)
    for _ in range(12):
        f.write(piece)
    f.close()
    assert proxy.counters["kill"] == 1
    assert fs.size(f"{s3_bucket}/killed-once") == 12 * MiB
    assert s3_server.list_pending_uploads(s3_bucket) == []


def test_killed_writer_leaves_pending_upload(s3_server, fault_proxy, s3_bucket):
    is_part = lambda r: r.method == "PUT" and "partNumber=" in r.query  # noqa: E731
    proxy = fault_proxy(kill_after_bytes=MiB, kill_count=None, match=is_part)
    fs = _fs(s3_server.storage_options_for(proxy.endpoint_url, max_attempts=2))
    piece = os.urandom(MiB)
    f = fs.open(f"{s3_bucket}/killed", "wb", block_size=5 * MiB)
    with pytest.raises(BotoCoreError):  # EndpointConnectionError
        for _ in range(12):
            f.write(piece)
    assert proxy.counters["kill"] >= 2
    pending = s3_server.list_pending_uploads(s3_bucket)
    assert [p["Key"] for p in pending] == ["killed"]
    direct = _fs(s3_server.storage_options)
    assert not direct.exists(f"{s3_bucket}/killed")  # invisible
    # the writer must be neutralised: left to GC, close() would retry the upload
    f.buffer = None
    f.closed = True
    assert s3_server.abort_pending_uploads(s3_bucket) == 1
    assert s3_server.list_pending_uploads(s3_bucket) == []


# --------------------------------------------------------------------------
# fault proxy HTTP handling, against a tiny local HTTP/1.1 server
# --------------------------------------------------------------------------


class _Backend(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.read(2)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_PUT(self):
        body = self._body()
        msg = json.dumps(
            {
                "len": len(body),
                "sha": hashlib.sha256(body).hexdigest(),
                "expect": self.headers.get("Expect"),
                "host": self.headers.get("Host"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(msg)))
        self.end_headers()
        self.wfile.write(msg)

    def do_GET(self):
        n = int(self.path.rsplit("/", 1)[1])
        body = bytes(i % 251 for i in range(n))
        if self.path.startswith("/chunked/"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, n, 1000):
                c = body[i : i + 1000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path.startswith("/eof/"):
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            self.wfile.write(body)

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "12345")
        self.end_headers()


@pytest.fixture
def backend():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _pattern(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def test_proxy_http_framing_keepalive(backend):
    with FaultProxy("127.0.0.1", backend) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        body = os.urandom(300_000)
        # Content-Length body, then chunked body, on one keep-alive connection
        conn.request("PUT", "/a", body=body)
        r = json.loads(conn.getresponse().read())
        assert r["len"] == len(body) and r["sha"] == hashlib.sha256(body).hexdigest()
        assert r["host"] == f"127.0.0.1:{proxy.port}"  # Host forwarded unchanged
        conn.request("PUT", "/b", body=iter([body[:1000], body[1000:]]), encode_chunked=True)
        r = json.loads(conn.getresponse().read())
        assert r["len"] == len(body)
        for path, n in (("/len/70000", 70000), ("/chunked/5500", 5500)):
            conn.request("GET", path)
            resp = conn.getresponse()
            assert resp.read() == _pattern(n)
        conn.request("HEAD", "/len/1")
        resp = conn.getresponse()
        assert resp.getheader("Content-Length") == "12345" and resp.read() == b""
        conn.request("GET", "/eof/3000")  # close-delimited response
        assert conn.getresponse().read() == _pattern(3000)
        conn.close()
        c = proxy.counters
        assert c["requests"] == c["forwarded"] == 6


def test_proxy_expect_100_continue(backend):
    with FaultProxy("127.0.0.1", backend) as proxy:
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        try:
            s.sendall(b"PUT /e HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
            assert s.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            s.sendall(b"0123456789")
            buf = b""
            while b"}" not in buf:
                buf += s.recv(4096)
            assert b" 200 " in buf.split(b"\r\n", 1)[0]
            r = json.loads(buf.split(b"\r\n\r\n", 1)[1])
            assert r["len"] == 10 and r["expect"] is None  # not forwarded
        finally:
            s.close()


def test_proxy_503_is_s3_xml_and_keeps_connection(backend):
    with FaultProxy("127.0.0.1", backend, error503_share=1.0) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("PUT", "/bucket/key?x=1", body=b"z" * 5000)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 503 and resp.reason == "Slow Down"
        assert resp.getheader("Content-Type") == "application/xml"
        assert b"<Code>SlowDown</Code>" in body and b"<Resource>/bucket/key</Resource>" in body
        proxy.enabled = False
        conn.request("GET", "/len/10")  # same connection still usable
        assert conn.getresponse().read() == _pattern(10)
        conn.close()
        assert proxy.counters["error503"] == 1 and proxy.counters["forwarded"] == 1


def test_proxy_reset_and_kill_are_seen_by_client(backend):
    with FaultProxy("127.0.0.1", backend, reset_share=1.0) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("GET", "/len/10")
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            conn.getresponse().read()
        conn.close()
        assert proxy.counters["reset"] == 1
    with FaultProxy("127.0.0.1", backend, kill_after_bytes=1000, kill_count=1) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            conn.request("PUT", "/k", body=os.urandom(2_000_000))
            conn.getresponse().read()
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("PUT", "/k", body=b"1" * 5000)  # kill_count used up
        assert json.loads(conn.getresponse().read())["len"] == 5000
        conn.close()
        assert proxy.counters["kill"] == 1


def test_proxy_seed_is_deterministic(backend):
    def run(seed):
        with FaultProxy("127.0.0.1", backend, error503_share=0.5, seed=seed) as proxy:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            out = []
            for _ in range(20):
                conn.request("GET", "/len/3")
                resp = conn.getresponse()
                resp.read()
                out.append(resp.status)
            conn.close()
            return out

    a, b = run(5), run(5)
    assert a == b and 503 in a and 200 in a
    assert run(6) != a


def test_proxy_upstream_down_gives_502():
    with FaultProxy("127.0.0.1", free_port()) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("GET", "/x")
        assert conn.getresponse().status == 502
        conn.close()
        assert proxy.counters["upstream_error"] == 1
