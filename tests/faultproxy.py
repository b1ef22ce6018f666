"""An HTTP-aware fault-injecting TCP proxy for S3 tests.

``FaultProxy`` listens on 127.0.0.1 (a free port), forwards each HTTP/1.1
request it receives to ``target_host:target_port`` and, per request, decides
with a seeded RNG whether to

* forward it normally,
* ``reset``: reset the client connection (TCP RST via SO_LINGER 0) instead
  of answering - before the request reaches the server
  (``reset_phase="request"``, default) or after the server has executed it
  and answered (``reset_phase="response"``: the response is thrown away, so
  the client cannot know the operation happened),
* ``error503``: answer ``503 Slow Down`` with an S3 XML ``SlowDown`` error
  body itself (the request never reaches the server),
* ``delay``: sleep ``delay_s`` then forward,
* ``truncate``: forward, then send the response head and only half of the
  response body before resetting (a short read mid-body).

and, independently of the RNG, ``kill_after_bytes=N`` cuts (RST both sides)
the first ``kill_count`` requests whose body is longer than N bytes after N
body bytes were forwarded to the server (an interrupted upload).

Only requests for which ``match(request)`` is true are subject to faults
(default: all).  ``proxy.enabled = False`` turns all injection off at
runtime; shares can be changed at runtime (``proxy.set_faults(...)`` or plain
attribute assignment).

HTTP handling: keep-alive client connections (many requests per
connection); request bodies framed by ``Content-Length`` or
``Transfer-Encoding: chunked`` (relayed verbatim, trailers included);
``Expect: 100-continue`` is answered by the proxy itself (``100 Continue``)
and the ``Expect`` header is not forwarded (botocore does not sign it).
Every request uses a fresh upstream connection, closed after the response,
so a stale upstream keep-alive connection can never be hit.  Responses are
framed by Content-Length, chunked encoding or connection close; HEAD /
1xx / 204 / 304 have no body.  Headers are forwarded byte-for-byte (SigV4
signatures stay valid; the client signs the proxy's Host, which is
forwarded unchanged).  Not supported: HTTP/2, TLS, CONNECT, pipelined
requests sent before the previous response (they are served in order, as
they arrive, which is fine for HTTP/1.1 clients such as aiohttp/urllib3).

Counters: ``proxy.counters`` (a snapshot dict) with ``requests`` (all
requests seen), ``forwarded`` (answered by the server and relayed to the
client, delayed ones included; counted when relaying starts, so a client
that has read a response always sees it counted), ``reset``, ``error503``,
``delay``, ``truncate``, ``kill`` (all counted before the client can see
the fault), ``upstream_error`` (server unreachable: the proxy answered 502),
``client_abort`` (the client went away mid-request); ``proxy.faults`` is the
number of injected faults; ``proxy.events`` a bounded log of
``(method, target, action)``; ``proxy.max_inflight`` the most matching requests it was serving
at the same moment.
"""

from __future__ import annotations

import collections
import contextlib
import email.utils
import random
import socket
import struct
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FaultProxy", "ProxyRequest", "FAULT_KINDS"]

FAULT_KINDS = ("reset", "error503", "delay", "truncate", "kill")
_COUNTER_NAMES = ("requests", "forwarded", *FAULT_KINDS, "upstream_error", "client_abort")

_MAX_HEAD = 64 * 1024
_CHUNK = 256 * 1024


class _ProtocolError(Exception):
    pass


class _Closed(Exception):
    """Peer closed the connection."""


@dataclass
class ProxyRequest:
    """What ``match`` callbacks receive."""

    method: str
    target: str  # path?query as sent
    version: str
    headers: dict = field(default_factory=dict)  # lower-case name -> value (last wins)
    content_length: int | None = None
    chunked: bool = False

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class _Reader:
    """Buffered reads from a socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        data = self.sock.recv(_CHUNK)
        if not data:
            raise _Closed()
        self.buf += data

    def wait_data(self) -> bool:
        """True when data is available, False on a clean EOF."""
        if self.buf:
            return True
        try:
            self._fill()
        except _Closed:
            return False
        return True

    def read_until(self, delim: bytes, limit: int = _MAX_HEAD) -> bytes:
        start = 0
        while True:
            i = self.buf.find(delim, start)
            if i >= 0:
                end = i + len(delim)
                out = bytes(self.buf[:end])
                del self.buf[:end]
                return out
            if len(self.buf) > limit:
                raise _ProtocolError("header section too long")
            start = max(0, len(self.buf) - len(delim) + 1)
            self._fill()

    def read_some(self, n: int) -> bytes:
        if self.buf:
            out = bytes(self.buf[:n])
            del self.buf[:n]
            return out
        data = self.sock.recv(min(n, _CHUNK))
        if not data:
            raise _Closed()
        return data

    def read_exact(self, n: int) -> bytes:
        parts = []
        while n > 0:
            d = self.read_some(n)
            parts.append(d)
            n -= len(d)
        return b"".join(parts)


def _parse_head(raw: bytes):
    lines = raw[:-4].split(b"\r\n")
    first = lines[0].decode("latin-1")
    headers = []
    for ln in lines[1:]:
        if not ln:
            continue
        name, sep, value = ln.partition(b":")
        if not sep:
            raise _ProtocolError(f"bad header line {ln!r}")
        headers.append((name.decode("latin-1").strip(), value.decode("latin-1").strip()))
    return first, headers


def _hdict(headers) -> dict:
    return {k.lower(): v for k, v in headers}


def _rst(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _close(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """See the module docstring.

    Parameters
    ----------
    target_host, target_port: the server behind the proxy.
    reset_share, error503_share, delay_share, truncate_share: probability of
        each fault per (matching) request; their sum must be <= 1.
    delay_s: the delay of a ``delay`` fault.
    seed: RNG seed (decisions are drawn in the order requests arrive).
    reset_phase: "request" (RST before forwarding) or "response" (forward,
        let the server answer, then RST instead of relaying the answer).
    kill_after_bytes: cut requests whose body is longer than this after
        that many body bytes were forwarded (None: off).
    kill_count: how many requests to cut that way (None: all of them).
    match: ``callable(ProxyRequest) -> bool``; only matching requests get
        faults (and count towards kills).  Default: every request.
    error_reply: (status, reason, S3 error code, message) of the ``error503``
        fault; default ``503 Slow Down`` / ``SlowDown``.
    listen_host, listen_port: where to listen (default 127.0.0.1, free port).
    io_timeout: socket timeout for client/upstream I/O (idle keep-alive
        client connections are closed after it).
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        reset_share: float = 0.0,
        error503_share: float = 0.0,
        delay_share: float = 0.0,
        delay_s: float = 0.5,
        seed: int = 0,
        *,
        truncate_share: float = 0.0,
        reset_phase: str = "request",
        kill_after_bytes: int | None = None,
        kill_count: int | None = 1,
        match: Callable[[ProxyRequest], bool] | None = None,
        error_reply: tuple = (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        io_timeout: float = 60.0,
    ):
        self.target_host = target_host
        self.target_port = int(target_port)
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.io_timeout = io_timeout
        self.enabled = True
        self.seed = seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counters = collections.Counter({k: 0 for k in _COUNTER_NAMES})
        self.events: collections.deque = collections.deque(maxlen=20000)
        self.reset_share = reset_share
        self.error503_share = error503_share
        self.delay_share = delay_share
        self.truncate_share = truncate_share
        self.delay_s = delay_s
        self.reset_phase = reset_phase
        self.kill_after_bytes = kill_after_bytes
        self.kill_count = kill_count
        self.match = match
        self.error_reply = error_reply
        self._check_config()
        self._lsock: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._conns: set = set()
        self._threads: set = set()
        self._inflight = 0
        self.max_inflight = 0  # most matching requests being served at once (high-water mark)

    # ------------------------------------------------------------ config
    def _check_config(self) -> None:
        shares = (self.reset_share, self.error503_share, self.delay_share, self.truncate_share)
        if any(s < 0 for s in shares) or sum(shares) > 1.0 + 1e-9:
            raise ValueError(f"fault shares must be >= 0 and sum to <= 1, got {shares}")
        if self.reset_phase not in ("request", "response"):
            raise ValueError("reset_phase must be 'request' or 'response'")

    def set_faults(self, **kw) -> None:
        """Change fault settings atomically, e.g. ``set_faults(error503_share=0)``.
        ``seed=`` reseeds the RNG."""
        with self._lock:
            for k, v in kw.items():
                if k == "seed":
                    self.seed = v
                    self._rng = random.Random(v)
                    continue
                if not hasattr(self, k) or k.startswith("_"):
                    raise AttributeError(k)
                setattr(self, k, v)
            self._check_config()

    # ----------------------------------------------------------- counters
    @property
    def inflight(self) -> int:
        """Matching requests being served right now (a delayed one counts while it is held)."""
        with self._lock:
            return self._inflight

    @property
    def counters(self) -> dict:
        with self._lock:
            return dict(self._counters)

    @property
    def faults(self) -> int:
        c = self.counters
        return sum(c[k] for k in FAULT_KINDS)

    def reset_counters(self) -> None:
        with self._lock:
            self._counters = collections.Counter({k: 0 for k in _COUNTER_NAMES})
            self.events.clear()

    def _count(self, name: str, req: ProxyRequest | None = None) -> None:
        with self._lock:
            self._counters[name] += 1
            if req is not None:
                self.events.append((req.method, req.target, name))

    # ------------------------------------------------------------- address
    @property
    def host(self) -> str:
        return self.listen_host

    @property
    def port(self) -> int:
        if self._lsock is None:
            raise RuntimeError("FaultProxy not started")
        return self._lsock.getsockname()[1]

    @property
    def address(self) -> tuple:
        return (self.host, self.port)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ----------------------------------------------------------- lifecycle
    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> FaultProxy:
        if self._lsock is not None:
            return self
        self._stop.clear()
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((self.listen_host, self.listen_port))
        ls.listen(128)
        ls.settimeout(0.2)
        self._lsock = ls
        t = threading.Thread(target=self._accept_loop, name=f"faultproxy-{self.port}", daemon=True)
        self._accept_thread = t
        t.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
            self._accept_thread = None
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            _close(s)
        for t in threads:
            t.join(timeout)
        _close(self._lsock)
        self._lsock = None

    def _accept_loop(self) -> None:
        ls = self._lsock
        while not self._stop.is_set():
            try:
                csock, _ = ls.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            csock.settimeout(self.io_timeout)
            csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(csock,), daemon=True)
            with self._lock:
                self._conns.add(csock)
                self._threads.add(t)
            t.start()

    # ---------------------------------------------------------- per request
    def _decide(self, req: ProxyRequest) -> str:
        with self._lock:
            if not self.enabled:
                return "forward"
            if self.match is not None and not self.match(req):
                return "forward"
            if (
                self.kill_after_bytes is not None
                and (self.kill_count is None or self.kill_count > 0)
                and (req.chunked or (req.content_length or 0) > self.kill_after_bytes)
            ):
                if self.kill_count is not None:
                    self.kill_count -= 1
                return "kill"
            r = self._rng.random()
            for name, share in (
                ("reset", self.reset_share),
                ("error503", self.error503_share),
                ("delay", self.delay_share),
                ("truncate", self.truncate_share),
            ):
                if r < share:
                    return name
                r -= share
            return "forward"

    def _serve(self, csock: socket.socket) -> None:
        reader = _Reader(csock)
        try:
            while not self._stop.is_set():
                if not reader.wait_data():
                    return
                raw = reader.read_until(b"\r\n\r\n")
                first, headers = _parse_head(raw)
                parts = first.split(" ")
                if len(parts) != 3:
                    raise _ProtocolError(f"bad request line {first!r}")
                h = _hdict(headers)
                chunked = "chunked" in h.get("transfer-encoding", "").lower()
                cl = h.get("content-length")
                req = ProxyRequest(
                    method=parts[0].upper(),
                    target=parts[1],
                    version=parts[2],
                    headers=h,
                    content_length=None if chunked or cl is None else int(cl),
                    chunked=chunked,
                )
                self._count("requests")
                keep = self._handle(csock, reader, req, headers)
                if not keep:
                    return
        except (TimeoutError, _Closed, ConnectionError, _ProtocolError, OSError):
            pass
        finally:
            _close(csock)
            with self._lock:
                self._conns.discard(csock)
                self._threads.discard(threading.current_thread())

    def _handle(self, csock, reader: _Reader, req: ProxyRequest, headers) -> bool:
        """Serve one request; return whether the client connection stays open."""
        matched = self.match is None or self.match(req)
        with self._lock:
            self._inflight += matched
            self.max_inflight = max(self.max_inflight, self._inflight)
        try:
            return self._handle_one(csock, reader, req, headers)
        finally:
            with self._lock:
                self._inflight -= matched

    def _handle_one(self, csock, reader: _Reader, req: ProxyRequest, headers) -> bool:
        action = self._decide(req)
        expect = req.headers.get("expect", "").lower() == "100-continue"
        client_keep = req.version == "HTTP/1.1" and "close" not in req.headers.get("connection", "").lower()

        if action == "reset" and self.reset_phase == "request":
            self._count("reset", req)
            _rst(csock)
            return False

        if action == "error503":
            self._count("error503", req)
            if expect:
                # The client waits for 100 before sending the body: answer
                # without reading it, and close the connection.
                self._send_503(csock, req, close=True)
                with contextlib.suppress(OSError):
                    csock.shutdown(socket.SHUT_WR)
                    csock.settimeout(2)
                    while csock.recv(_CHUNK):
                        pass
                return False
            self._drain_body(reader, req)
            self._send_503(csock, req, close=not client_keep)
            return client_keep

        if action == "delay":
            self._count("delay", req)
            if self._stop.wait(self.delay_s):
                return False

        # forward (possibly killed / reset after / truncated)
        try:
            usock = socket.create_connection((self.target_host, self.target_port), timeout=self.io_timeout)
        except OSError:
            self._count("upstream_error", req)
            self._drain_body(reader, req)
            self._send_simple(csock, 502, "Bad Gateway", b"proxy: upstream unreachable", close=True)
            return False
        try:
            usock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            out_head = [f"{req.method} {req.target} {req.version}\r\n".encode("latin-1")]
            for k, v in headers:
                if expect and k.lower() == "expect":
                    continue
                out_head.append(f"{k}: {v}\r\n".encode("latin-1"))
            out_head.append(b"\r\n")
            if expect:
                csock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            usock.sendall(b"".join(out_head))

            limit = self.kill_after_bytes if action == "kill" else None
            try:
                completed = self._relay_body(reader, usock, req, limit)
            except (TimeoutError, _Closed):
                self._count("client_abort", req)
                _rst(usock)
                usock = None
                return False
            if not completed:  # kill
                self._count("kill", req)
                _rst(usock)
                usock = None
                _rst(csock)
                return False

            ureader = _Reader(usock)
            while True:
                status, rheaders, rraw = self._read_response_head(ureader)
                if status >= 200 or status == 101:
                    break
                if not (action == "reset" and self.reset_phase == "response"):
                    csock.sendall(rraw)  # relay other 1xx
            rh = _hdict(rheaders)

            if action == "reset":  # reset_phase == "response"
                self._count("reset", req)
                _rst(csock)
                return False

            if req.method == "HEAD" or status in (204, 304):
                framing, length = "none", 0
            elif "chunked" in rh.get("transfer-encoding", "").lower():
                framing, length = "chunked", None
            elif "content-length" in rh:
                framing, length = "length", int(rh["content-length"])
            else:
                framing, length = "eof", None

            if action == "truncate":
                self._count("truncate", req)
                if framing == "length" and length > 0:
                    csock.sendall(rraw)
                    self._copy_exact(ureader, csock, length // 2)
                _rst(csock)
                return False

            # counted before relaying, so that a client which has read the
            # whole response also sees the counter
            self._count("forwarded", req)
            csock.sendall(rraw)
            if framing == "length":
                self._copy_exact(ureader, csock, length)
            elif framing == "chunked":
                self._copy_chunked(ureader, csock)
            elif framing == "eof":
                try:
                    while True:
                        csock.sendall(ureader.read_some(_CHUNK))
                except _Closed:
                    pass
            server_keep = "close" not in rh.get("connection", "").lower()
            return client_keep and server_keep and framing != "eof"
        except (TimeoutError, _Closed, OSError, _ProtocolError):
            # upstream died mid-response (or client vanished): drop the client
            _rst(csock)
            return False
        finally:
            _close(usock)

    # ---------------------------------------------------------- helpers
    @staticmethod
    def _read_response_head(ureader: _Reader):
        raw = ureader.read_until(b"\r\n\r\n")
        first, headers = _parse_head(raw)
        try:
            status = int(first.split(" ", 2)[1])
        except (IndexError, ValueError):
            raise _ProtocolError(f"bad status line {first!r}") from None
        return status, headers, raw

    def _relay_body(self, reader: _Reader, usock, req: ProxyRequest, limit) -> bool:
        """Copy the request body upstream.  With ``limit``, stop after that
        many body bytes and return False (the caller kills the connection)."""
        if req.chunked:
            return self._copy_chunked(reader, usock, limit)
        n = req.content_length or 0
        if limit is not None and n > limit:
            self._copy_exact(reader, usock, limit)
            return False
        self._copy_exact(reader, usock, n)
        return True

    @staticmethod
    def _copy_exact(reader: _Reader, dst, n: int) -> None:
        while n > 0:
            d = reader.read_some(min(n, _CHUNK))
            if dst is not None:
                dst.sendall(d)
            n -= len(d)

    def _copy_chunked(self, reader: _Reader, dst, limit=None) -> bool:
        """Relay a chunked body verbatim (dst None: discard).  Returns False
        if ``limit`` payload bytes were reached before the end."""
        sent = 0
        while True:
            line = reader.read_until(b"\r\n", 4096)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if dst is not None:
                dst.sendall(line)
            if size == 0:
                # trailers, up to the empty line
                while True:
                    t = reader.read_until(b"\r\n", _MAX_HEAD)
                    if dst is not None:
                        dst.sendall(t)
                    if t == b"\r\n":
                        return True
            if limit is not None and sent + size > limit:
                self._copy_exact(reader, dst, limit - sent)
                return False
            self._copy_exact(reader, dst, size)
            sent += size
            crlf = reader.read_exact(2)
            if dst is not None:
                dst.sendall(crlf)

    def _drain_body(self, reader: _Reader, req: ProxyRequest) -> None:
        with contextlib.suppress(_Closed, socket.timeout, OSError, _ProtocolError, ValueError):
            if req.chunked:
                self._copy_chunked(reader, None)
            else:
                self._copy_exact(reader, None, req.content_length or 0)

    def _send_503(self, csock, req: ProxyRequest, close: bool) -> None:
        rid = uuid.uuid4().hex[:16].upper()
        status, reason, code, message = self.error_reply
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code>"
            f"<Message>{_xml_escape(message)}</Message>"
            f"<Resource>{_xml_escape(req.path)}</Resource>"
            f"<RequestId>{rid}</RequestId></Error>"
        ).encode()
        if req.method == "HEAD":
            body = b""
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"x-amz-request-id: {rid}\r\n"
            f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
            "Server: nyxray-faultproxy\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
        ).encode()
        csock.sendall(head + body)

    @staticmethod
    def _send_simple(csock, code: int, reason: str, body: bytes, close: bool) -> None:
        head = (
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: {'close' if close else 'keep-alive'}\r\n\r\n"
        ).encode()
        with contextlib.suppress(OSError):
            csock.sendall(head + body)


def _xml_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
