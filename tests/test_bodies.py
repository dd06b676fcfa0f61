"""Body reading: size limits before and after decompression, gzip and zstd, corrupt bodies."""

from __future__ import annotations

import gzip

import pytest
import zstandard
from starlette.types import Message, Receive

from xray_ingest.bodies import read_body
from xray_ingest.errors import BadRequestError, BodyTooLargeError, UnsupportedEncodingError

LIMIT = 100_000


def parts_of(data: bytes, size: int = 8192) -> Receive:
    """An ASGI receive() handing out data in parts of size bytes."""
    starts = iter(range(0, max(len(data), 1), size))

    async def receive() -> Message:
        start = next(starts)
        more_body = start + size < len(data)
        return {"type": "http.request", "body": data[start : start + size], "more_body": more_body}

    return receive


async def read(data: bytes, encoding: str = "", declared: str | None = None) -> bytes:
    return await read_body(parts_of(data), encoding, declared, LIMIT)


PAYLOAD = b'{"events": [' + b",".join([b'{"k": "value"}'] * 8000) + b"]}"


async def test_plain_body_is_returned_whole() -> None:
    assert await read(PAYLOAD[:50_000]) == PAYLOAD[:50_000]


async def test_plain_body_over_the_limit_is_refused_with_or_without_a_length() -> None:
    big = b"x" * (LIMIT + 1)
    with pytest.raises(BodyTooLargeError):
        await read(big)
    with pytest.raises(BodyTooLargeError):
        await read(b"", declared=str(LIMIT + 1))


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "GZIP", "zstd"])
async def test_compressed_body_is_decompressed(encoding: str) -> None:
    data = PAYLOAD[:90_000]
    if "zstd" in encoding:
        compressed = zstandard.ZstdCompressor().compress(data)
    else:
        compressed = gzip.compress(data)
    assert await read(compressed, encoding) == data


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
async def test_decompression_bomb_is_refused_at_the_limit(encoding: str) -> None:
    # 1 GiB of zeros in about a megabyte (gzip) or a few kilobytes (zstd).
    zeros = b"\0" * (64 * 1024 * 1024)
    if encoding == "gzip":
        compressor = gzip.compress(zeros, compresslevel=9)
        bomb = compressor * 16
    else:
        bomb = zstandard.ZstdCompressor().compress(zeros) * 16
    assert len(bomb) < LIMIT * 20
    with pytest.raises(BodyTooLargeError):
        await read_body(parts_of(bomb), encoding, None, LIMIT * 20)


async def test_compressed_body_that_inflates_past_the_limit_is_refused() -> None:
    data = PAYLOAD * 2
    assert len(data) > LIMIT
    with pytest.raises(BodyTooLargeError):
        await read(gzip.compress(data), "gzip")
    with pytest.raises(BodyTooLargeError):
        await read(zstandard.ZstdCompressor().compress(data), "zstd")


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        (gzip.compress(PAYLOAD[:50_000])[:-20], "gzip"),
        (b"not gzip at all", "gzip"),
        (gzip.compress(b"a") + gzip.compress(b"b"), "gzip"),
        (b"not zstd at all", "zstd"),
    ],
)
async def test_corrupt_or_truncated_compressed_body_is_a_bad_request(
    body: bytes, encoding: str
) -> None:
    with pytest.raises(BadRequestError):
        await read(body, encoding)


async def test_unknown_encoding_is_unsupported() -> None:
    with pytest.raises(UnsupportedEncodingError, match="br"):
        await read(b"{}", "br")
