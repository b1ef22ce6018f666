"""nyxray's S3 multipart writer (nyxray/io/backends/s3.py) against a real S3 server, through the fault
proxy: parts travel concurrently but never more than the bound, the object is byte-exact and
appears only on commit, and a completion whose answer is lost is not taken for a failure."""

from __future__ import annotations

import random
import threading
import uuid

import s3fs

from nyxray.io.backends.s3 import CONCURRENCY, MIN_PART, PROCESS_INFLIGHT
from nyxray.io.location import location


def _is_part(req) -> bool:
    return req.method == "PUT" and "partNumber=" in req.query


def _payload(n: int) -> bytes:
    return random.Random(n).randbytes(n)


def _write(loc, name: str, data: bytes, piece: int) -> None:
    w = loc.open_atomic(name, part_size=MIN_PART)
    for i in range(0, len(data), piece):
        w.write(memoryview(data)[i : i + piece])
    w.commit()


def test_parts_are_uploaded_concurrently_within_the_bound(s3_server, s3_bucket, fault_proxy):
    # every part upload is held 0.3 s by the proxy: a sequential writer would never have two open
    proxy = fault_proxy(delay_share=1.0, delay_s=0.3, match=_is_part)
    loc = location(f"s3://{s3_bucket}/mp-{uuid.uuid4().hex[:6]}", s3_server.storage_options_for(proxy.endpoint_url))
    data = _payload(9 * MIN_PART + 12345)  # 9 full parts and a short last one
    _write(loc, "big.bin", data, piece=3 * 2**20 + 7)  # writes that straddle part boundaries
    assert 2 <= proxy.max_inflight <= CONCURRENCY, proxy.max_inflight
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    assert fs.cat_file(f"{loc.root}/big.bin") == data


def test_uploads_of_one_process_share_the_in_flight_bound(s3_server, s3_bucket, fault_proxy):
    # three shards written at once (as a sweep does): together they never exceed the process bound
    proxy = fault_proxy(delay_share=1.0, delay_s=0.3, match=_is_part)
    loc = location(f"s3://{s3_bucket}/mp-{uuid.uuid4().hex[:6]}", s3_server.storage_options_for(proxy.endpoint_url))
    data = [_payload(6 * MIN_PART + k) for k in range(3)]
    threads = [threading.Thread(target=_write, args=(loc, f"s{k}.bin", d, 4 * 2**20)) for k, d in enumerate(data)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert CONCURRENCY < proxy.max_inflight <= PROCESS_INFLIGHT, proxy.max_inflight
    for k, d in enumerate(data):
        assert loc.read(f"s{k}.bin") == d


def test_small_object_is_one_put_and_appears_only_on_commit(s3_server, s3_bucket):
    loc = location(f"s3://{s3_bucket}/mp-{uuid.uuid4().hex[:6]}", s3_server.storage_options)
    w = loc.open_atomic("small.json")
    w.write(b'{"a": 1}')
    assert not loc.exists("small.json")
    w.commit()
    assert loc.read("small.json") == b'{"a": 1}'


def test_discard_after_parts_were_sent_leaves_nothing(s3_server, s3_bucket):
    loc = location(f"s3://{s3_bucket}/mp-{uuid.uuid4().hex[:6]}", s3_server.storage_options)
    w = loc.open_atomic("gone.bin", part_size=MIN_PART)
    w.write(_payload(3 * MIN_PART))
    w.discard()
    assert not loc.exists("gone.bin")
    assert loc.remove_partial_writes() == 0  # the upload was aborted, not left pending


def test_completion_with_a_lost_answer_still_commits(s3_server, s3_bucket, fault_proxy):
    """The server completes the upload but the answer is lost; the retry is told NoSuchUpload (as
    AWS may answer once an upload is complete): the writer checks that the object is there, whole,
    instead of failing a shard that did land."""
    completions: list = []

    def on_completion(req) -> bool:
        if not (req.method == "POST" and "uploadId=" in req.query):
            return False
        if not any(r is req for r in completions):  # match() is asked more than once per request
            completions.append(req)
            if len(completions) == 2:  # the retry: answered NoSuchUpload by the proxy itself
                proxy.reset_share, proxy.error503_share = 0.0, 1.0
        return True

    proxy = fault_proxy(
        reset_share=1.0, reset_phase="response", match=on_completion, error_reply=(404, "Not Found", "NoSuchUpload", "The specified upload does not exist.")
    )
    loc = location(f"s3://{s3_bucket}/mp-{uuid.uuid4().hex[:6]}", s3_server.storage_options_for(proxy.endpoint_url, max_attempts=1))
    data = _payload(2 * MIN_PART + 99)
    w = loc.open_atomic("done.bin", part_size=MIN_PART)
    w.write(data)
    w.commit()
    assert (proxy.counters["reset"], proxy.counters["error503"]) == (1, 1), proxy.counters
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    assert fs.cat_file(f"{loc.root}/done.bin") == data
