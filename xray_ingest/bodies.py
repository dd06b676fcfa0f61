"""Reads request bodies: the size limit, checked while reading and again after decompression
(gzip and zstd), so neither a huge body nor a decompression bomb can exhaust memory."""

from __future__ import annotations

import io
import zlib
from typing import Final, Protocol

import zstandard
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from xray_ingest.errors import BadRequestError, BodyTooLargeError, UnsupportedEncodingError

SUPPORTED_ENCODINGS: Final = ("identity", "gzip", "x-gzip", "zstd")
# gzip framing (RFC 1952) for zlib: window bits 16 + 15.
_GZIP_WBITS: Final = 31


class _Decompressor(Protocol):
    def feed(self, data: bytes, room: int) -> bytes:
        """Takes the next compressed part; returns at most room + 1 bytes of output."""

    def finish(self, room: int) -> bytes:
        """Returns the rest of the output (at most room + 1 bytes); raises if truncated."""


class _Gzip:
    def __init__(self) -> None:
        self._inflater = zlib.decompressobj(wbits=_GZIP_WBITS)

    def feed(self, data: bytes, room: int) -> bytes:
        # max_length caps this call's output, so a bomb stops at room + 1 bytes; any input
        # left unconsumed then means the body is too large anyway.
        return self._inflater.decompress(data, room + 1)

    def finish(self, room: int) -> bytes:
        if not self._inflater.eof:
            raise BadRequestError("the gzip body is truncated")
        if self._inflater.unused_data:
            raise BadRequestError("the gzip body has data after its end (several members?)")
        return b""


class _Zstd:
    """zstd's streaming decompressor has no output cap per call (a few bytes can expand to
    megabytes), so the compressed body, already bounded by the limit, is kept whole and read
    through a reader that stops at room + 1 bytes. A truncated frame yields a short output,
    which then fails JSON decoding."""

    def __init__(self) -> None:
        self._compressed: list[bytes] = []

    def feed(self, data: bytes, room: int) -> bytes:
        self._compressed.append(data)
        return b""

    def finish(self, room: int) -> bytes:
        source = io.BytesIO(b"".join(self._compressed))
        reader = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
        with reader:
            return reader.read(room + 1)


def is_uncompressed(encoding: str) -> bool:
    """Whether a Content-Encoding header value leaves the body as it is."""
    return encoding.strip().lower() in ("", "identity")


def _decompressor(encoding: str) -> _Decompressor | None:
    if is_uncompressed(encoding):
        return None
    if encoding in ("gzip", "x-gzip"):
        return _Gzip()
    if encoding == "zstd":
        return _Zstd()
    raise UnsupportedEncodingError(
        f"Content-Encoding {encoding!r} is not supported; use one of "
        + ", ".join(SUPPORTED_ENCODINGS)
    )


def _too_large(limit: int) -> BodyTooLargeError:
    return BodyTooLargeError(f"request body is larger than {limit} bytes")


async def read_body(
    receive: Receive, encoding: str, declared_length: str | None, limit: int
) -> bytes:
    """Reads the body from the request's ASGI messages and decodes it, at most limit bytes
    before and after decompression. (It loops over receive() itself: through an async generator,
    reading a 1 KB body took 15.4k instructions instead of 8.3k.)

    Raises ClientDisconnect when the client leaves before the end, BodyTooLargeError past the
    limit, UnsupportedEncodingError for an unknown Content-Encoding and BadRequestError for a
    corrupt compressed body.
    """
    if declared_length is not None and declared_length.isdigit() and int(declared_length) > limit:
        raise _too_large(limit)
    decompressor = _decompressor(encoding.strip().lower())
    chunks: list[bytes] = []
    received = produced = 0
    more_body = True
    try:
        while more_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect
            part: bytes = message.get("body", b"")
            more_body = message.get("more_body", False)
            received += len(part)
            if received > limit:
                raise _too_large(limit)
            if decompressor is not None:
                part = decompressor.feed(part, limit - produced)
            produced += len(part)
            if produced > limit:
                raise _too_large(limit)
            chunks.append(part)
        if decompressor is not None:
            rest = decompressor.finish(limit - produced)
            produced += len(rest)
            if produced > limit:
                raise _too_large(limit)
            chunks.append(rest)
    except (zlib.error, zstandard.ZstdError) as exc:
        raise BadRequestError(f"the {encoding} body is corrupt: {exc}") from None
    return b"".join(chunks)
