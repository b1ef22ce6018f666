"""One conformance suite for the storage layer, run against every backend the tests can start:
local files, memory://, and a real S3 server (SeaweedFS on 127.0.0.1, over HTTP, through s3fs)."""

from __future__ import annotations

import uuid

import pytest

from nyxray.errors import StorageError
from nyxray.io.location import Range, location, read_ranges


@pytest.fixture(params=["local", "memory", "s3"])
def loc(request, tmp_path):
    if request.param == "local":
        return location(str(tmp_path / "store"))
    if request.param == "memory":
        return location(f"memory://nyxray-test-{uuid.uuid4().hex[:8]}")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return location(f"s3://{bucket}/prefix", server.storage_options)


def payload(n: int, seed: int = 0) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def test_write_then_ranged_reads(loc):
    data = payload(3_000_001)
    loc.makedirs()
    loc.write_atomic("a.bin", data)
    assert loc.exists("a.bin") and loc.size("a.bin") == len(data)
    assert loc.read("a.bin") == data
    for start, end in ((0, 8), (8, 1000), (2_999_000, 3_000_001), (5, 5)):
        assert loc.read_range("a.bin", start, end) == data[start:end]


def test_short_read_past_the_end_is_an_error(loc):
    loc.makedirs()
    loc.write_atomic("b.bin", b"0123456789")
    with pytest.raises(StorageError, match="b.bin"):
        loc.read_range("b.bin", 5, 50)


def test_read_ranges_coalesces_adjacent_ranges_and_returns_each(loc):
    data = payload(1_000_000, 1)
    loc.makedirs()
    loc.write_atomic("c.bin", data)
    loc.write_atomic("d.bin", data[::-1])
    spans = [(0, 100), (100, 5000), (5000, 5001), (900_000, 1_000_000), (10, 20)]
    ranges = [Range(loc, "c.bin", a, b) for a, b in spans] + [Range(loc, "d.bin", 0, 10)]
    got, fetched = read_ranges(ranges)
    assert [bytes(g) for g in got] == [data[a:b] for a, b in spans] + [data[::-1][:10]]
    # (0,100)+(100,5000)+(5000,5001) coalesce into one request; (10, 20) overlaps, is its own
    assert fetched == 5001 + 100_000 + 10 + 10


def test_read_ranges_respects_the_request_cap(loc):
    data = payload(100_000, 2)
    loc.makedirs()
    loc.write_atomic("e.bin", data)
    ranges = [Range(loc, "e.bin", i, i + 1000) for i in range(0, 100_000, 1000)]
    got, fetched = read_ranges(ranges, cap=10_000)
    assert b"".join(bytes(g) for g in got) == data and fetched == len(data)


def test_discarded_write_leaves_nothing_under_the_final_name(loc):
    loc.makedirs()
    w = loc.open_atomic("f.bin", part_size=5 * 2**20)
    w.write(payload(12 * 2**20, 3))  # more than two multipart parts on S3
    assert not loc.exists("f.bin")
    w.discard()
    assert not loc.exists("f.bin")
    assert [n for n in loc.listdir() if not n.startswith(".")] == []


def test_committed_write_appears_whole(loc):
    loc.makedirs()
    data = payload(11 * 2**20, 4)
    w = loc.open_atomic("g.bin", part_size=5 * 2**20)
    for i in range(0, len(data), 3 * 2**20):
        w.write(data[i : i + 3 * 2**20])
    assert not loc.exists("g.bin")
    w.commit()
    assert loc.read("g.bin") == data


def test_listing_and_delete(loc):
    loc.makedirs()
    for name in ("x.json", "y.json", "sub/z.json"):
        loc.write_atomic(name, b"{}")
    assert {"x.json", "y.json", "sub"} <= set(loc.listdir())
    assert loc.listdir("sub") == ["z.json"]
    loc.delete("x.json")
    loc.delete("x.json")  # deleting what is gone is fine
    assert "x.json" not in loc.listdir()
    loc.delete_tree("sub")
    assert loc.listdir("sub") == []
    assert loc.listdir("does-not-exist") == []


def test_missing_object_is_a_clear_error(loc):
    with pytest.raises(StorageError, match="nothing-here.bin"):
        loc.read("nothing-here.bin")


def test_names_cannot_escape_the_location(loc):
    for bad in ("../x", "/etc/passwd", "a/../../b"):
        with pytest.raises(StorageError, match="escapes"):
            loc.read(bad)


def test_partial_writes_of_killed_writers_are_removed(loc, request):
    loc.makedirs()
    loc.write_atomic("keep.bin", b"kept")
    if loc.protocol == "s3":
        server = request.getfixturevalue("s3_server")
        bucket, _, prefix = loc.root.partition("/")
        server.client().create_multipart_upload(Bucket=bucket, Key=f"{prefix}/model-00001-of-00002.safetensors")
        assert len(server.list_pending_uploads(bucket)) == 1
        assert loc.remove_partial_writes() == 1
        assert server.list_pending_uploads(bucket) == []
    else:
        w = loc.open_atomic("model.safetensors")
        w.write(b"partial")
        w.f.flush()  # a writer that died here, before commit or discard
        assert loc.remove_partial_writes() == 1
    assert [n for n in loc.listdir()] == ["keep.bin"]


def test_local_writeback_is_queued_as_bytes_arrive_and_the_file_is_exact(tmp_path):
    """The local writer asks the kernel to start writing each 32 MiB as it is written (the final
    fsync then waits for little); the bytes that land are exactly the bytes given."""
    import os

    from nyxray.io.backends.local import STEP

    loc = location(str(tmp_path))
    w = loc.open_atomic("x.bin")
    pieces = [os.urandom(7 * 2**20 + i) for i in range(10)]  # ~70 MiB in uneven pieces
    for p in pieces:
        w.write(p)
    if w.writeback.call is not None:  # Linux: requests were made, the last one within a step of the end
        assert w.writeback.queued > 0 and w.written - w.writeback.queued < STEP
    w.commit()
    assert (tmp_path / "x.bin").read_bytes() == b"".join(pieces)


# -- the backend primitives (nyxray/io/backends), each against every backend -----------------------


def test_the_catalogue_picks_one_backend_per_protocol(tmp_path):
    from nyxray.io.backends import Backend, backend_class
    from nyxray.io.backends.gcs import GCSBackend
    from nyxray.io.backends.local import LocalBackend
    from nyxray.io.backends.s3 import MIN_PART, S3Backend

    assert type(location(str(tmp_path)).backend) is LocalBackend
    assert type(location("file:///tmp/x").backend) is LocalBackend
    assert type(location("s3://bucket/x").backend) is S3Backend
    assert type(location("memory://x").backend) is Backend  # any other fsspec: the fallback
    assert backend_class("s3a") is S3Backend and backend_class("gs") is GCSBackend and backend_class("hf") is Backend
    assert (LocalBackend.splittable, LocalBackend.min_part, LocalBackend.readable_parts, LocalBackend.pending_uploads) == (True, 1, True, False)
    assert (S3Backend.splittable, S3Backend.min_part, S3Backend.readable_parts, S3Backend.pending_uploads) == (True, MIN_PART, False, True)
    assert not Backend.splittable and not GCSBackend.splittable


def test_no_storage_switch_outside_the_backends():
    """Storage knowledge lives in nyxray/io/backends: nothing else tests a protocol or a file system class."""
    import re
    from pathlib import Path

    import nyxray

    switch = re.compile(r'"s3a?"|"gs"|"gcs"|S3FileSystem|LocalFileSystem|\bis_local\b|protocol (in|not in) \(|call_s3')
    root = Path(nyxray.__file__).parent
    hits = [
        f"{path.relative_to(root)}:{i}"
        for path in root.rglob("*.py")
        if "backends" not in path.parts
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if switch.search(line)
    ]
    assert hits == []


def test_compare_and_swap_create_replace_delete(loc):
    loc.makedirs()
    cas = loc.backend
    v1 = cas.cas_create("lease.json", b"one")
    assert v1 and cas.cas_create("lease.json", b"two") is None
    assert cas.cas_read("lease.json") == (b"one", v1)
    assert cas.cas_replace("lease.json", b"two", "not-a-version") is None
    v2 = cas.cas_replace("lease.json", b"two", v1)
    assert v2 and v2 != v1 and cas.cas_read("lease.json") == (b"two", v2)
    assert cas.cas_replace("lease.json", b"three", v1) is None  # v1 is stale now
    assert not cas.cas_delete("lease.json", v1)
    assert cas.cas_delete("lease.json", v2)
    assert cas.cas_read("lease.json") is None and not loc.exists("lease.json")
    assert cas.cas_replace("lease.json", b"x", v2) is None and not cas.cas_delete("lease.json", v2)


def three_parts(sizes=(6 * 2**20, 6 * 2**20, 2**20)):
    from nyxray.io.backends.base import Part

    cut = [0]
    for s in sizes:
        cut.append(cut[-1] + s)
    return [Part(i, len(sizes), i, i + 1, a, b) for i, (a, b) in enumerate(zip(cut, cut[1:]))]


def put_parts(loc, asm, upload_id, parts, data, name):
    receipts = {}
    for p in reversed(parts):  # any order: each part is its own worker's
        w = asm.job(upload_id, p).open(loc, name)
        w.write(data[p.start : p.end])
        w.commit()
        assert w.written == p.size
        receipts[p.index] = w.receipt or {}
    return receipts


def test_parts_are_assembled_into_one_file_or_refused(loc):
    from nyxray.errors import NyxrayError

    loc.makedirs()
    parts, backend = three_parts(), loc.backend
    data = payload(parts[-1].end, 7)
    asm = backend.assembler("s.bin", "stage/s.bin.partial", parts)
    if not backend.splittable:
        with pytest.raises(NyxrayError, match="cannot assemble"):
            asm.begin()
        return
    assert all(p.size >= backend.min_part for p in parts[:-1])
    upload_id = asm.begin()
    receipts = put_parts(loc, asm, upload_id, parts, data, "s.bin")
    assert not loc.exists("s.bin")
    asm.complete(upload_id, [receipts[p.index] for p in parts])
    assert loc.read("s.bin") == data
    assert loc.remove_partial_writes() == 0  # nothing pending once completed


def test_an_aborted_assembly_leaves_nothing_pending(loc):
    loc.makedirs()
    parts, backend = three_parts(), loc.backend
    if not backend.splittable:
        return
    asm = backend.assembler("t.bin", "stage/t.bin.partial", parts)
    upload_id = asm.begin()
    put_parts(loc, asm, upload_id, parts[:1], payload(parts[-1].end, 8), "t.bin")
    asm.abort(upload_id)
    assert not loc.exists("t.bin")
    assert loc.remove_partial_writes() == 0  # the abort left no pending upload to remove
    assert loc.exists("stage/t.bin.partial") == backend.readable_parts  # readable parts stay for a resume


def test_an_assembly_is_adopted_only_while_it_holds_its_recorded_parts(loc):
    loc.makedirs()
    parts, backend = three_parts(), loc.backend
    if not backend.splittable:
        return
    data = payload(parts[-1].end, 9)
    first = backend.assembler("u.bin", "stage/u.bin.partial", parts)
    upload_id = first.begin()
    receipts = put_parts(loc, first, upload_id, parts[:2], data, "u.bin")
    records = {i: {"receipt": r} for i, r in receipts.items()}
    if backend.pending_uploads:  # a pending upload cannot be read: the store's list of parts is checked
        wrong = {i: {"receipt": {"etags": [[n, "0" * 32] for n, _ in r["etags"]]}} for i, r in receipts.items()}
        assert loc.remove_partial_writes(keep={upload_id}) == 0  # a kept upload survives cleanup
        assert backend.assembler("u.bin", "stage/u.bin.partial", parts).adopt(upload_id, records)
        assert not backend.assembler("u.bin", "stage/u.bin.partial", parts).adopt(upload_id, wrong)
        assert loc.remove_partial_writes() == 0  # the upload that differed was aborted
        return
    resumed = backend.assembler("u.bin", "stage/u.bin.partial", parts)  # the staged file's bytes are checked by the workers
    assert resumed.adopt(upload_id, records)
    put_parts(loc, resumed, upload_id, parts[2:], data, "u.bin")
    resumed.complete(upload_id, [])
    assert loc.read("u.bin") == data


def test_cleanup_keeps_the_pending_uploads_a_resume_adopts(loc, request):
    if not loc.backend.pending_uploads:
        return
    server = request.getfixturevalue("s3_server")
    bucket, _, prefix = loc.root.partition("/")
    ids = [server.client().create_multipart_upload(Bucket=bucket, Key=f"{prefix}/s{i}.bin")["UploadId"] for i in range(3)]
    assert loc.remove_partial_writes(keep={ids[1]}) == 2
    assert [u["UploadId"] for u in server.list_pending_uploads(bucket)] == [ids[1]]
    assert loc.remove_partial_writes() == 1 and server.list_pending_uploads(bucket) == []
