"""The chunked sha256 that .done records carry: the same value however the bytes arrive."""

from __future__ import annotations

import hashlib
import io

from hypothesis import given, settings
from hypothesis import strategies as st

from spotrun.store.manifest import FileRecord
from spotrun.store.storage import CHUNK_BYTES, ChunkHasher, HashingWriter, chunked_sha256


def by_definition(data: bytes, chunk: int) -> str:
    """The documented definition, in plain Python."""
    pieces = [data[at : at + chunk] for at in range(0, len(data), chunk)]
    return hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in pieces)).hexdigest()


def feed(data: bytes, cuts: list[int], chunk: int) -> str:
    hasher = ChunkHasher(chunk)
    at = 0
    for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
        for future in hasher.start(data[at:cut]):
            future.result()
        at = cut
    assert hasher.size == len(data)
    return hasher.hexdigest()


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    chunk=st.integers(min_value=1, max_value=40),
)
def test_any_split_of_the_stream_gives_the_defined_digest(
    data: bytes, cuts: list[int], chunk: int
) -> None:
    expected = by_definition(data, chunk)
    assert feed(data, cuts, chunk) == expected
    assert chunked_sha256(data, chunk) == expected


def test_large_writes_hash_their_pieces_in_parallel_to_the_same_digest() -> None:
    data = bytes(range(256)) * (14 << 10)  # 3.5 MiB: over the parallel threshold
    chunk = 256 << 10
    expected = by_definition(data, chunk)
    assert feed(data, [1, 300_000, 2 << 20], chunk) == expected
    assert chunked_sha256(memoryview(data), chunk) == expected


def test_chunk_zero_is_the_plain_sha256_of_the_whole() -> None:
    assert chunked_sha256(b"spotrun", 0) == hashlib.sha256(b"spotrun").hexdigest()


def test_a_flipped_bit_changes_the_digest() -> None:
    data = bytearray(b"\0" * 1000)
    before = chunked_sha256(data, 64)
    data[700] ^= 1
    assert chunked_sha256(data, 64) != before


def test_hashing_writer_passes_every_byte_through_and_records_the_chunk_size() -> None:
    out = io.BytesIO()
    writer = HashingWriter(out)
    payload = [b"head", bytes(3 << 20), b"tail"]
    for part in payload:
        writer.write(part)
    whole = b"".join(payload)
    assert out.getvalue() == whole
    assert writer.size == len(whole)
    assert writer.chunk_bytes == CHUNK_BYTES
    assert writer.sha256 == by_definition(whole, CHUNK_BYTES)


def test_file_records_keep_their_chunk_size_and_old_records_mean_the_whole_file() -> None:
    chunked = FileRecord(0, "rank-00000.pt", 5, "b" * 64, chunk_bytes=CHUNK_BYTES)
    assert chunked.to_json()["chunkBytes"] == CHUNK_BYTES
    assert FileRecord.from_json(chunked.to_json()) == chunked
    old = {"rank": 0, "path": "rank-00000.pt", "size": 5, "sha256": "b" * 64}
    assert FileRecord.from_json(old).chunk_bytes == 0
    assert "chunkBytes" not in FileRecord.from_json(old).to_json()
