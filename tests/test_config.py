"""Settings from the environment: defaults, strict casts, errors that name the variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xray_ingest.config import MAX_DEFAULT_WORKERS, MIB, Settings, default_workers, load_settings
from xray_ingest.errors import ConfigError


def test_empty_environment_gives_the_defaults_and_no_database() -> None:
    workers = default_workers()
    assert load_settings({}) == Settings(
        workers=workers,
        queue_max_events=Settings().queue_max_events // workers,
        queue_max_bytes=Settings().queue_max_bytes // workers,
    )
    assert load_settings({}).database_url is None


def test_one_worker_per_core_by_default_sharing_the_queue_bounds() -> None:
    assert default_workers() == min(len(os.sched_getaffinity(0)), MAX_DEFAULT_WORKERS)
    four = load_settings({"XRAY_WORKERS": "4", "XRAY_QUEUE_MAX_EVENTS": "80000"})
    assert (four.workers, four.queue_max_events, four.queue_max_bytes) == (4, 20000, 16 * MIB)
    with pytest.raises(ConfigError, match="XRAY_QUEUE_MAX_BYTES / XRAY_WORKERS"):
        load_settings({"XRAY_WORKERS": "8"})  # 8 MiB each, less than one 10 MiB body


def test_every_variable_is_read() -> None:
    settings = load_settings(
        {
            "DATABASE_URL": "postgresql://u@h/db",
            "XRAY_HOST": "0.0.0.0",
            "XRAY_PORT": "9000",
            "XRAY_WORKERS": "2",
            "XRAY_DATA_DIR": "/srv/xray",
            "XRAY_QUEUE_MAX_EVENTS": "50000",
            "XRAY_QUEUE_MAX_BYTES": "20000000",
            "XRAY_FLUSH_MAX_EVENTS": "1000",
            "XRAY_FLUSH_INTERVAL_MS": "0",
            "XRAY_COPY_CONNECTIONS": "3",
            "XRAY_QUERY_CONNECTIONS": "2",
            "XRAY_MAX_BODY_BYTES": "1000000",
            "XRAY_MAX_BATCH_EVENTS": "500",
            "XRAY_SHUTDOWN_TIMEOUT_S": "2.5",
            "XRAY_RETRY_AFTER_S": "3",
            "XRAY_LOG_LEVEL": "debug",
            "XRAY_LOG_FORMAT": "JSON",
            "XRAY_ACCESS_LOG": "off",
            "XRAY_AUTH": "required",
            "XRAY_AUTH_REFRESH_S": "0.5",
            "XRAY_CORS_ORIGINS": "https://ui.example, http://localhost:3000",
            "PROMETHEUS_MULTIPROC_DIR": "/run/xray-metrics",
        }
    )
    assert settings == Settings(
        database_url="postgresql://u@h/db",
        host="0.0.0.0",
        port=9000,
        workers=2,
        data_dir=Path("/srv/xray"),
        queue_max_events=25_000,  # the totals, shared by the 2 workers
        queue_max_bytes=10_000_000,
        flush_max_events=1000,
        flush_interval_ms=0,
        copy_connections=3,
        query_connections=2,
        max_body_bytes=1_000_000,
        max_batch_events=500,
        shutdown_timeout_s=2.5,
        retry_after_s=3,
        log_level="DEBUG",
        log_format="json",
        access_log=False,
        auth="required",
        auth_refresh_s=0.5,
        cors_origins=("https://ui.example", "http://localhost:3000"),
        metrics_dir=Path("/run/xray-metrics"),
    )


def test_libpq_variables_alone_select_a_database() -> None:
    assert load_settings({"PGHOST": "db.internal"}).database_url == "postgresql://"


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"XRAY_PORT": "eighty"}, "XRAY_PORT"),
        ({"XRAY_WORKERS": "0"}, "XRAY_WORKERS"),
        ({"XRAY_SHUTDOWN_TIMEOUT_S": "soon"}, "XRAY_SHUTDOWN_TIMEOUT_S"),
        ({"XRAY_SHUTDOWN_TIMEOUT_S": "nan"}, "XRAY_SHUTDOWN_TIMEOUT_S"),
        ({"XRAY_LOG_LEVEL": "LOUD"}, "XRAY_LOG_LEVEL"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"XRAY_MAX_BATCH_EVENTS": "200000"}, "XRAY_QUEUE_MAX_EVENTS"),
        ({"XRAY_MAX_BODY_BYTES": "100000000"}, "XRAY_QUEUE_MAX_BYTES"),
        ({"XRAY_LOG_FORMAT": "xml"}, "XRAY_LOG_FORMAT"),
        ({"XRAY_ACCESS_LOG": "maybe"}, "XRAY_ACCESS_LOG"),
        ({"XRAY_AUTH": "off"}, "XRAY_AUTH"),
        ({"XRAY_AUTH_REFRESH_S": "0"}, "XRAY_AUTH_REFRESH_S"),
        ({"XRAY_CORS_ORIGINS": "ui.example"}, "XRAY_CORS_ORIGINS"),
    ],
)
def test_malformed_variable_is_an_error_naming_it(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(environ)
