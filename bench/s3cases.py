"""The S3 cases: a local SeaweedFS server (``tests/s3server.py``) holding the inputs, the plain-s3fs
I/O floor, ranged-read throughput, and where the S3 runs write (removed after each run)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cases import floor_spans
from common import MB, human, log
from inputs import SOURCES, BenchInputs


class S3Bench:
    BUCKET = "bench"
    models = f"s3://{BUCKET}/models"
    stage1 = f"s3://{BUCKET}/stage1"

    def __init__(self, inp: BenchInputs, work: str):
        self.inp, self.work = inp, work
        self.server: Any = None
        self.opts: dict | None = None
        self.upload: dict[str, Any] = {}

    def start(self, need_sources: bool, need_stage1: bool) -> None:
        """Start the server and upload the inputs (a few files at once, each a multipart upload)."""
        from tests.s3server import S3Server

        t0 = time.monotonic()
        self.server = S3Server(buckets=[self.BUCKET], base_dir=self.work)
        self.server.start()
        self.opts = self.server.storage_options
        log(f"S3 server (SeaweedFS) up on {self.server.endpoint_url} in {time.monotonic() - t0:.1f}s")
        fs = self.fs()
        todo = []
        if need_sources:
            todo += [(os.path.join(self.inp.models, n), f"{self.BUCKET}/models/{n}") for n in SOURCES]
        if need_stage1:
            todo += [(p, f"{self.BUCKET}/stage1/{n}") for n, p in self.inp.stage1_map.items()]
        files = [(os.path.join(src, f), f"{dst}/{f}") for src, dst in todo for f in sorted(os.listdir(src)) if not f.startswith(".")]
        nbytes = sum(os.path.getsize(s) for s, _ in files)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda sd: fs.put_file(sd[0], sd[1]), files))
        wall = time.perf_counter() - t0
        self.upload = {"files": len(files), "bytes": nbytes, "wall_s": round(wall, 3), "mb_s": round(nbytes / wall / MB, 1)}
        log(f"uploaded {len(files)} files, {human(nbytes)} in {wall:.1f}s ({nbytes / wall / MB:.0f} MB/s)")

    def stop(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stop()
            self.server = None

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.opts, skip_instance_cache=True)

    def key_for(self, local_path: str) -> str:
        for root, prefix in ((self.inp.models, f"{self.BUCKET}/models"), (self.inp.stage1, f"{self.BUCKET}/stage1")):
            if local_path.startswith(root + "/"):
                return prefix + local_path[len(root) :]
        # a leaf of an S3 plan is already bucket/key
        return local_path

    def out(self, name: str) -> str:
        return f"s3://{self.BUCKET}/out/{name.replace('/', '_')}"

    def rm(self, url: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs().rm(url, recursive=True)
        with contextlib.suppress(Exception):
            self.server.abort_pending_uploads(self.BUCKET, "out/")

    def floor(self, plan: Any) -> Callable[[str], dict]:
        """Plain s3fs: the needed ranges with ``cat_ranges`` (16 MiB pieces, 8 at a time), then each
        shard's bytes as a multipart upload of 16 MiB parts."""
        spans = floor_spans(plan)
        pieces = []
        for path, rs in spans.items():
            key = self.key_for(path)
            for a, b in rs:
                for s in range(a, b, 16 * 2**20):
                    pieces.append((key, s, min(b, s + 16 * 2**20)))
        payload = os.urandom(16 * 2**20)

        def run(out: str) -> dict:
            fs = self.fs()
            t0 = time.perf_counter()
            nread = 0
            for i in range(0, len(pieces), 8):
                group = pieces[i : i + 8]
                blobs = fs.cat_ranges([g[0] for g in group], [g[1] for g in group], [g[2] for g in group], batch_size=8)
                for blob in blobs:
                    if isinstance(blob, Exception):
                        raise blob
                    nread += len(blob)
            t1 = time.perf_counter()
            nwritten = 0
            for shard in plan.final.shards:
                f = fs.open(f"{out}/{shard.name}", "wb", block_size=16 * 2**20)
                left = shard.size
                while left:
                    n = min(left, len(payload))
                    f.write(payload[:n])
                    left -= n
                    nwritten += n
                f.close()
            t2 = time.perf_counter()
            return {"read_s": round(t1 - t0, 4), "write_s": round(t2 - t1, 4), "bytes_read": nread, "bytes_written": nwritten}

        return run

    def read(self, mode: str, n: int, max_bytes: int) -> Callable[[str], dict]:
        """8 MiB ranged GETs of the largest input object: one at a time (``seq``), ``cat_ranges``
        with ``n`` in flight, or ``n`` threads."""
        fs = self.fs()
        objs = sorted((fs.size(p), p) for p in fs.find(f"{self.BUCKET}/") if p.endswith(".safetensors") and "/out/" not in p)
        size, key = objs[-1]
        total = min(size, max_bytes)
        rng = 8 * 2**20
        starts = list(range(0, total - rng + 1, rng))

        def run(out: str) -> dict:
            t0 = time.perf_counter()
            got = 0
            if mode == "seq":
                for s in starts:
                    got += len(fs.cat_file(key, start=s, end=s + rng))
            elif mode == "cat_ranges":
                blobs = fs.cat_ranges([key] * len(starts), starts, [s + rng for s in starts], batch_size=n)
                got = sum(len(b) for b in blobs)
            else:
                with ThreadPoolExecutor(max_workers=n) as pool:
                    got = sum(pool.map(lambda s: len(fs.cat_file(key, start=s, end=s + rng)), starts))
            wall = time.perf_counter() - t0
            return {"wall_s": wall, "bytes_read": got, "bytes_written": 0, "range_bytes": rng, "object_bytes": size}

        return run
