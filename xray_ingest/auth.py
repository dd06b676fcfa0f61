"""API keys: how they are made and hashed, the in-memory KeyRing the server checks them against
(refreshed from the database every few seconds, never per request), and the ASGI middleware that
answers 401/403."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable, Sequence
from typing import Final

import asyncpg
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from xray_ingest import db
from xray_ingest.models import ENCODER, ErrorBody

logger = logging.getLogger(__name__)

SCOPES: Final = ("ingest", "read", "admin")
KEY_PREFIX: Final = "xr_"
SHOWN_PREFIX_LENGTH: Final = 8
# Reachable without a key: load balancers and orchestrators probe these; the document is public.
PUBLIC_PATHS: Final = frozenset({"/health", "/ready", "/openapi.json"})
REFRESH_TIMEOUT_S: Final = 5.0
# One answer for a missing and a wrong key, so a caller learns nothing about which it was.
UNAUTHORIZED: Final = "a valid API key is required (Authorization: Bearer <key>, or X-API-Key)"
FORBIDDEN: Final = "this API key's scope does not allow this request"
NOT_LOADED: Final = "API keys could not be loaded from the database yet; retry shortly"
# Said at start-up (a WARNING) and in /health while no key exists.
_NO_KEYS: Final = (
    "no API key exists, so anyone who can reach this server can read and write events; "
    "create one with `xray-ingest keys create --name NAME --scope admin`"
)
OPEN_WARNING: Final = f"auth is off: {_NO_KEYS}"


def new_key() -> str:
    """A new random key: 256 bits from the OS's CSPRNG, URL-safe, with a recognisable prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> bytes:
    """SHA-256 of the key. Keys are 256 random bits, so a fast hash is enough: there is nothing
    to guess, unlike a password."""
    return hashlib.sha256(key.encode()).digest()


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key in `Authorization: Bearer <key>` or `X-API-Key: <key>`, if any."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
        elif name == b"x-api-key" and value.strip():
            return value.decode("latin-1").strip()
    return None


def needed_scope(method: str) -> str:
    """POST writes events (ingest); everything else reads (read). admin may do both."""
    return "ingest" if method == "POST" else "read"


class KeyRing:
    """The active keys' hashes and scopes, as last read from the database.

    Auth is required once any key was ever created (revoking every key locks the server rather
    than opening it), or always with XRAY_AUTH=required. Until the first successful read the
    state is unknown and requests are refused with 503: failing open is not an option.
    """

    def __init__(self, always_required: bool) -> None:
        self.always_required = always_required
        self.loaded = False
        self.open = False
        self._active: list[tuple[bytes, str]] = []

    @property
    def state(self) -> str:
        if not self.loaded:
            return "unknown"
        return "open" if self.open else "required"

    def replace(self, records: Sequence[asyncpg.Record]) -> None:
        """Takes the rows of fetch_api_key_hashes as the new truth."""
        before = self.state
        self._active = [(r["key_hash"], r["scope"]) for r in records if not r["revoked"]]
        self.open = not self.always_required and not records
        self.loaded = True
        if self.state == before:
            return
        if self.open:
            logger.warning("AUTH IS OFF: %s", _NO_KEYS, extra={"action": "auth"})
        else:
            logger.info(
                "API keys required (%d active)", len(self._active), extra={"action": "auth"}
            )

    def scope_of(self, key: str) -> str | None:
        """The key's scope, or None for an unknown or revoked key. Compares against every
        active hash in constant time, without stopping at a match."""
        digest = key_hash(key)
        found = None
        for active_hash, scope in self._active:
            if hmac.compare_digest(active_hash, digest):
                found = scope
        return found

    def refusal(self, method: str, headers: Iterable[tuple[bytes, bytes]]) -> Response | None:
        """The response refusing this request, or None when it may go ahead."""
        if self.open:
            return None
        if not self.loaded:
            return _error(503, NOT_LOADED, {"Retry-After": "1"})
        key = presented_key(headers)
        scope = None if key is None else self.scope_of(key)
        if scope is None:
            return _error(401, UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
        if scope != "admin" and scope != needed_scope(method):
            return _error(403, FORBIDDEN)
        return None

    async def refresh(self, pool: db.Pool) -> None:
        self.replace(await db.fetch_api_key_hashes(pool, REFRESH_TIMEOUT_S))

    async def refresh_forever(self, pool: db.Pool, interval_s: float) -> None:
        """Re-reads the keys every interval_s; while the database is away, the last keys read
        stay in force."""
        failing = False
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh(pool)
                failing = False
            except db.UNANSWERED as exc:
                if not failing:
                    logger.warning(
                        "could not read API keys (%s); keeping the last ones read",
                        type(exc).__name__,
                        extra={"action": "auth"},
                    )
                failing = True


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        ENCODER.encode(ErrorBody(message)),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


class AuthMiddleware:
    """Lets a request through only with a key whose scope allows it (or while auth is off)."""

    def __init__(self, app: ASGIApp, keyring: KeyRing) -> None:
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            refusal = self.keyring.refusal(scope["method"], scope["headers"])
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)
