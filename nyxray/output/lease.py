"""One writer per output: a lease object in the output location, created atomically, renewed while
the run lasts, and expiring so that a crashed owner blocks the next run for one TTL at most.

Without it, two merges into the same output would both claim it, and the second one's clean-up
(temporary files, pending multipart uploads) would destroy the first one's work in flight. The
lease is ``OUT/.nyxray-lease.json``: who holds it (host, pid, a random id) and until when. It is
taken with a conditional create (the output backend's compare-and-swap, :mod:`nyxray.io.backends`); a live lease of another run stops
this one at once, naming the output and the holder; an expired one is taken over with a
conditional replace, so two newcomers cannot both take it. The holder renews it every quarter of
the TTL (conditionally on its own last version); if a renewal finds it taken over or the TTL runs
out unrenewed, the lease is lost and the run stops before it commits. Expiry uses the writers'
clocks: they must agree to well within the TTL (``NYXRAY_LEASE_TTL``, seconds, default 120).
A holder on this very machine (same host name and PID namespace) whose process is gone is
stale at once, so re-running a killed command here resumes without waiting for the TTL.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from .. import __version__
from ..errors import NyxrayError, OutputError
from ..io.location import Location

LEASE = ".nyxray-lease.json"
DEFAULT_TTL = 120.0


def ttl_seconds() -> float:
    """The lease TTL: ``NYXRAY_LEASE_TTL`` seconds, else 120."""
    raw = os.environ.get("NYXRAY_LEASE_TTL", "")
    try:
        ttl = float(raw) if raw else DEFAULT_TTL
    except ValueError:
        raise NyxrayError(f"NYXRAY_LEASE_TTL={raw!r}: expected seconds") from None
    if not ttl > 0:
        raise NyxrayError(f"NYXRAY_LEASE_TTL={raw!r}: expected seconds > 0")
    return ttl


def _process() -> dict:
    """Who this process is, as a lease records it (the PID namespace tells containers apart)."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return {"host": socket.gethostname(), "pidns": pidns, "pid": os.getpid()}


def _gone_here(info: dict) -> bool:
    """Whether a lease's holder ran on this machine and its process no longer exists."""
    me = _process()
    if info.get("host") != me["host"] or info.get("pidns") != me["pidns"] or not isinstance(info.get("pid"), int):
        return False
    try:
        with open(f"/proc/{info['pid']}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"  # a zombie is dead, just not reaped
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        return False


@dataclass
class Lease:
    """This run's hold on one output location."""

    loc: Location
    ttl: float
    holder: str = field(default_factory=lambda: f"{socket.gethostname()} pid {os.getpid()} run {uuid.uuid4().hex[:12]}")
    process: dict = field(default_factory=_process)
    version: str | None = None
    expires: float = 0.0
    lost: str | None = None
    took_over: str | None = None  # the expired holder this lease replaced, if any
    pending_expiry: float = 0.0  # the expiry of the body being written
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # renewals: the thread's and check()'s

    def _body(self) -> bytes:
        now = time.time()
        self.pending_expiry = now + self.ttl
        return json.dumps(
            {"holder": self.holder, **self.process, "renewed": now, "expires": self.pending_expiry, "ttl": self.ttl, "nyxray_version": __version__}
        ).encode()

    def acquire(self) -> None:
        """Take the lease, or raise :class:`OutputError` naming the live holder."""
        for _ in range(5):
            body = self._body()
            self.version = self.loc.backend.cas_create(LEASE, body)
            if self.version:
                self.expires = self.pending_expiry
                return
            current = self.loc.backend.cas_read(LEASE)
            if current is None:
                continue  # released meanwhile: create again
            data, version = current
            info = _parse(data)
            now = time.time()
            if info["expires"] > now and not _gone_here(info):
                raise OutputError(
                    f"{self.loc.display} is being written by another nyxray run ({info['holder']}; lease {self.loc.url(LEASE)} "
                    f"renewed {max(0.0, now - info['renewed']):.0f} s ago, expires in {info['expires'] - now:.0f} s). "
                    "Wait for it to finish; if that run is dead, run again once its lease has expired"
                )
            body = self._body()
            self.version = self.loc.backend.cas_replace(LEASE, body, version)
            if self.version:
                self.expires = self.pending_expiry
                self.took_over = info["holder"]
                return
        raise OutputError(f"{self.loc.display}: could not take the output's lease {self.loc.url(LEASE)}: other runs keep changing it")

    def renew(self) -> None:
        """Extend the lease if it is still ours; else (or once it has run out) mark it lost."""
        with self._lock:
            self._renew()

    def _renew(self) -> None:
        if self.lost or self.version is None:
            return
        if time.time() > self.expires:
            self.lost = f"its lease expired unrenewed at {time.ctime(self.expires)}"
            return
        try:
            version = self.loc.backend.cas_replace(LEASE, self._body(), self.version)
        except (NyxrayError, OSError):
            return  # storage trouble: try again at the next renewal, while the lease lasts
        if version is None:
            current = self.loc.backend.cas_read(LEASE)
            other = _parse(current[0])["holder"] if current else "nobody"
            self.lost = f"its lease was taken over (now held by {other})"
            return
        self.version, self.expires = version, self.pending_expiry

    def check(self) -> None:
        """Renew now; raise :class:`OutputError` if the lease was lost: this run must not commit."""
        self.renew()
        if self.lost:
            raise OutputError(f"{self.loc.display}: this run no longer owns the output: {self.lost}; run the same command again to finish")

    def release(self) -> None:
        """Give the lease up (only our own version is removed)."""
        if self.version and not self.lost:
            with contextlib.suppress(NyxrayError):
                self.loc.backend.cas_delete(LEASE, self.version)
        self.version = None


def _parse(data: bytes) -> dict:
    """A lease's fields; an unreadable lease counts as expired (it cannot block forever)."""
    try:
        info = json.loads(data)
        return {**info, "holder": str(info["holder"]), "renewed": float(info["renewed"]), "expires": float(info["expires"])}
    except (ValueError, TypeError, KeyError, RecursionError):
        return {"holder": "an unreadable lease", "renewed": 0.0, "expires": 0.0}


class Leases:
    """The leases of one run's outputs, renewed by one background thread."""

    def __init__(self, locations: list[Location], ttl: float):
        self.leases = [Lease(loc, ttl) for loc in locations]
        self.ttl = ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="nyxray-lease", daemon=True)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            for lease in self.leases:
                lease.renew()

    def check(self) -> None:
        """Raise if any output's lease was lost (call before committing)."""
        for lease in self.leases:
            lease.check()

    def __enter__(self) -> Leases:
        try:
            for lease in self.leases:
                lease.acquire()
        except BaseException:
            self._release()
            raise
        self._thread.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            if isinstance(exc, Exception):
                self.check()  # a run that failed because another took its output over says so
        finally:
            self._release()

    def _release(self) -> None:
        for lease in self.leases:
            lease.release()


def hold(locations: list[Location], ttl: float | None = None) -> Leases:
    """``with hold(locations) as leases:`` every location's lease, for the whole block."""
    return Leases(locations, ttl if ttl is not None else ttl_seconds())
