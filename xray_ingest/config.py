"""The server's settings: one frozen Settings built once from DATABASE_URL and XRAY_* variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from xray_ingest.errors import ConfigError

# libpq's connection variables; asyncpg reads them itself when the DSN leaves a part out.
_LIBPQ_VARIABLES = ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSERVICE")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_LOG_FORMATS = ("text", "json")
_AUTH_MODES = ("auto", "required")
_SWITCHES = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
MIB = 1024 * 1024
# Unset XRAY_WORKERS: one worker per core, up to this many (each holds its own connections).
MAX_DEFAULT_WORKERS = 4


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting, with the defaults a user gets when the variable is unset."""

    # None: no database configured; `serve` then starts the embedded PostgreSQL.
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    # load_settings() defaults this to default_workers(); the queue bounds below are per worker
    # (XRAY_QUEUE_MAX_* give the server's totals, shared out among the workers).
    workers: int = 1
    data_dir: Path = Path(".xray")
    queue_max_events: int = 100_000
    queue_max_bytes: int = 64 * MIB
    flush_max_events: int = 5_000
    # Under single-event load a longer linger makes fewer, larger COPYs (each has a fixed cost):
    # 50 ms against 10 gave 5,842 against 5,262 committed events/s (medians of 3 rounds).
    flush_interval_ms: int = 50
    copy_connections: int = 2
    query_connections: int = 4
    max_body_bytes: int = 10 * MIB
    max_batch_events: int = 10_000
    max_depth: int = 64
    durable_timeout_s: float = 10.0
    shutdown_timeout_s: float = 30.0
    retry_after_s: int = 1
    log_level: str = "INFO"
    log_format: str = "text"
    access_log: bool = True
    # auto: keys are required as soon as one active key exists; required: always.
    auth: str = "auto"
    auth_refresh_s: float = 5.0
    # Origins allowed to call the API from a browser; empty: CORS off.
    cors_origins: tuple[str, ...] = ()
    # Set (PROMETHEUS_MULTIPROC_DIR) when several workers run: metrics are summed over them.
    metrics_dir: Path | None = None
    # Set (XRAY_CONNECTIONS_DIR) by `serve` when several workers run: where each worker counts
    # its connections, so that they share them evenly (balance.py).
    connections_dir: Path | None = None


_N = TypeVar("_N", int, float)


def _number(environ: Mapping[str, str], name: str, default: _N, minimum: _N) -> _N:
    """Reads variable `name` with the type of its default; unset or empty gives the default."""
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    kind = type(default)
    try:
        value = kind(raw)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name} must be {noun}, got {raw!r}") from None
    if not value >= minimum:  # also refuses NaN
        raise ConfigError(f"{name} must be >= {minimum}, got {raw}")
    return value


def _choice(environ: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (environ.get(name) or default).lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _switch(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() not in _SWITCHES:
        raise ConfigError(f"{name} must be on or off, got {raw!r}")
    return _SWITCHES[raw.lower()]


def _origins(environ: Mapping[str, str]) -> tuple[str, ...]:
    origins = tuple(o.strip() for o in environ.get("XRAY_CORS_ORIGINS", "").split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError(f"XRAY_CORS_ORIGINS: {origin!r} is not an http(s) origin")
    return origins


def _database_url(environ: Mapping[str, str]) -> str | None:
    url = environ.get("DATABASE_URL")
    if url:
        if not url.startswith(("postgres://", "postgresql://")):
            raise ConfigError("DATABASE_URL must start with postgresql:// or postgres://")
        return url
    if any(environ.get(name) for name in _LIBPQ_VARIABLES):
        return "postgresql://"
    return None


def default_workers() -> int:
    """One worker per core this process may run on, at most MAX_DEFAULT_WORKERS."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_DEFAULT_WORKERS))


def load_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """Builds Settings from the environment; raises ConfigError naming a malformed variable."""
    defaults = Settings()
    workers = _number(environ, "XRAY_WORKERS", default_workers(), 1)
    log_level = environ.get("XRAY_LOG_LEVEL", defaults.log_level).upper()
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"XRAY_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}")
    settings = Settings(
        database_url=_database_url(environ),
        host=environ.get("XRAY_HOST") or defaults.host,
        port=_number(environ, "XRAY_PORT", defaults.port, 0),
        workers=workers,
        data_dir=Path(environ.get("XRAY_DATA_DIR") or defaults.data_dir),
        queue_max_events=_number(environ, "XRAY_QUEUE_MAX_EVENTS", defaults.queue_max_events, 1)
        // workers,
        queue_max_bytes=_number(environ, "XRAY_QUEUE_MAX_BYTES", defaults.queue_max_bytes, 1)
        // workers,
        flush_max_events=_number(environ, "XRAY_FLUSH_MAX_EVENTS", defaults.flush_max_events, 1),
        flush_interval_ms=_number(environ, "XRAY_FLUSH_INTERVAL_MS", defaults.flush_interval_ms, 0),
        copy_connections=_number(environ, "XRAY_COPY_CONNECTIONS", defaults.copy_connections, 1),
        query_connections=_number(environ, "XRAY_QUERY_CONNECTIONS", defaults.query_connections, 1),
        max_body_bytes=_number(environ, "XRAY_MAX_BODY_BYTES", defaults.max_body_bytes, 1),
        max_batch_events=_number(environ, "XRAY_MAX_BATCH_EVENTS", defaults.max_batch_events, 1),
        max_depth=_number(environ, "XRAY_MAX_DEPTH", defaults.max_depth, 1),
        durable_timeout_s=_number(
            environ, "XRAY_DURABLE_TIMEOUT_S", defaults.durable_timeout_s, 0.0
        ),
        shutdown_timeout_s=_number(
            environ, "XRAY_SHUTDOWN_TIMEOUT_S", defaults.shutdown_timeout_s, 0.0
        ),
        retry_after_s=_number(environ, "XRAY_RETRY_AFTER_S", defaults.retry_after_s, 0),
        log_level=log_level,
        log_format=_choice(environ, "XRAY_LOG_FORMAT", defaults.log_format, _LOG_FORMATS),
        access_log=_switch(environ, "XRAY_ACCESS_LOG", defaults.access_log),
        auth=_choice(environ, "XRAY_AUTH", defaults.auth, _AUTH_MODES),
        auth_refresh_s=_number(environ, "XRAY_AUTH_REFRESH_S", defaults.auth_refresh_s, 0.05),
        cors_origins=_origins(environ),
        metrics_dir=Path(environ["PROMETHEUS_MULTIPROC_DIR"])
        if environ.get("PROMETHEUS_MULTIPROC_DIR")
        else None,
        connections_dir=Path(environ["XRAY_CONNECTIONS_DIR"])
        if environ.get("XRAY_CONNECTIONS_DIR")
        else None,
    )
    if settings.queue_max_events < settings.max_batch_events:
        raise ConfigError("XRAY_QUEUE_MAX_EVENTS / XRAY_WORKERS must be >= XRAY_MAX_BATCH_EVENTS")
    if settings.queue_max_bytes < settings.max_body_bytes:
        raise ConfigError("XRAY_QUEUE_MAX_BYTES / XRAY_WORKERS must be >= XRAY_MAX_BODY_BYTES")
    return settings
