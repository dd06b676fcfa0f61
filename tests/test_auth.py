"""API keys: every protected route with no key, a wrong key, a revoked key and each scope; the
open mode; revocation while running; failing closed when the keys cannot be read."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest
from starlette.testclient import TestClient

from tests import samples
from tests.samples import dumps
from tests.test_routes import UNREACHABLE, settings_for
from xray_ingest import db
from xray_ingest.app import create_app
from xray_ingest.auth import SHOWN_PREFIX_LENGTH, key_hash, new_key, presented_key
from xray_ingest.openapi import OPERATIONS

SOME_ID = str(uuid.uuid4())
# One concrete request per protected operation in the OpenAPI document.
REQUESTS = {
    ("get", "/metrics"): "/metrics",
    ("get", "/v1/events"): f"/v1/events?trace_id={SOME_ID}",
    ("get", "/v1/events/{span_id}"): f"/v1/events/{SOME_ID}",
    ("get", "/v1/traces"): "/v1/traces",
    ("get", "/v1/traces/{trace_id}"): f"/v1/traces/{SOME_ID}",
    ("get", "/v1/analytics/high-drop-traces"): "/v1/analytics/high-drop-traces",
    ("get", "/v1/analytics/drop-reasons"): "/v1/analytics/drop-reasons",
    ("get", "/v1/analytics/funnel-stats"): f"/v1/analytics/funnel-stats?trace_id={SOME_ID}",
    ("get", "/v1/analytics/metadata-values"): "/v1/analytics/metadata-values?field=domain",
    ("post", "/v1/events"): "/v1/events",
    ("post", "/v1/events/batch"): "/v1/events/batch",
}
PROTECTED = [(m, p) for (m, p) in REQUESTS]
PUBLIC = ["/health", "/ready", "/openapi.json"]


def send(client: TestClient, method: str, path: str, headers: dict[str, str]) -> int:
    if method == "post":
        body = dumps(samples.custom())
        if path.endswith("batch"):
            body = dumps([samples.custom()])
        return client.post(REQUESTS[(method, path)], content=body, headers=headers).status_code
    return client.get(REQUESTS[(method, path)], headers=headers).status_code


async def create_key(dsn: str, scope: str, name: str = "test") -> tuple[int, str]:
    key = new_key()
    connection = await asyncpg.connect(dsn)
    try:
        record = await db.insert_api_key(
            connection, name, scope, key[:SHOWN_PREFIX_LENGTH], key_hash(key)
        )
    finally:
        await connection.close()
    return record["id"], key


async def revoke(dsn: str, key_id: int) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        assert await db.revoke_api_key(connection, key_id)
    finally:
        await connection.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def keys(database_dsn: str) -> dict[str, str]:
    """One active key per scope, plus a revoked one."""
    made = {scope: (await create_key(database_dsn, scope))[1] for scope in SCOPES_TESTED}
    revoked_id, made["revoked"] = await create_key(database_dsn, "admin")
    await revoke(database_dsn, revoked_id)
    return made


SCOPES_TESTED = ("ingest", "read", "admin")


@pytest.fixture
def client(database_dsn: str, keys: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(database_dsn))) as test_client:
        yield test_client


def test_every_protected_operation_of_the_document_is_covered_here() -> None:
    protected = {(op.method, op.path) for op in OPERATIONS if not op.public}
    assert protected == set(PROTECTED)
    assert {op.path for op in OPERATIONS if op.public} == set(PUBLIC)


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_missing_wrong_and_revoked_keys_get_the_same_401(
    client: TestClient, keys: dict[str, str], method: str, path: str
) -> None:
    attempts = {
        "no key": {},
        "wrong bearer key": bearer(new_key()),
        "wrong X-API-Key": {"X-API-Key": new_key()},
        "revoked key": bearer(keys["revoked"]),
        "empty bearer": {"Authorization": "Bearer "},
        "basic auth": {"Authorization": "Basic dXNlcjpwYXNz"},
    }
    bodies = set()
    for headers in attempts.values():
        response = client.request(
            method.upper(), REQUESTS[(method, path)], headers=headers, content=b"{}"
        )
        assert response.status_code == 401, headers
        assert response.headers["WWW-Authenticate"] == "Bearer"
        bodies.add(response.content)
    assert len(bodies) == 1  # the answer does not say which part was wrong


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize("scope", SCOPES_TESTED)
def test_each_scope_may_do_what_it_names_and_nothing_else(
    client: TestClient, keys: dict[str, str], method: str, path: str, scope: str
) -> None:
    allowed = scope == "admin" or (scope == "ingest") == (method == "post")
    for headers in (bearer(keys[scope]), {"X-API-Key": keys[scope]}):
        status = send(client, method, path, headers)
        if allowed:
            assert status not in (401, 403), (scope, method, path, status)
        else:
            assert status == 403, (scope, method, path, status)


@pytest.mark.parametrize("path", PUBLIC)
def test_health_ready_and_the_document_need_no_key(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 200


def test_ingest_with_a_key_stores_the_event(client: TestClient, keys: dict[str, str]) -> None:
    event = samples.custom()
    assert client.post(
        "/v1/events", content=dumps(event), headers=bearer(keys["ingest"])
    ).is_success
    found = client.get(f"/v1/events/{event['span_id']}", headers=bearer(keys["read"]))
    deadline = time.monotonic() + 5
    while found.status_code == 404 and time.monotonic() < deadline:
        time.sleep(0.02)
        found = client.get(f"/v1/events/{event['span_id']}", headers=bearer(keys["read"]))
    assert found.json()["span_id"] == event["span_id"]


def test_with_no_keys_the_server_is_open_and_says_so(
    database_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING),
        TestClient(create_app(settings_for(database_dsn))) as client,
    ):
        assert client.post("/v1/events", content=dumps(samples.custom())).status_code == 202
        assert client.get("/v1/traces").status_code == 200
        health = client.get("/health").json()
    assert health["auth"] == "open"
    assert "auth is off" in health["warnings"][0]
    assert any("AUTH IS OFF" in record.getMessage() for record in caplog.records)


def test_auth_required_setting_refuses_everyone_when_no_key_exists(database_dsn: str) -> None:
    with TestClient(create_app(settings_for(database_dsn, auth="required"))) as client:
        assert client.post("/v1/events", content=dumps(samples.custom())).status_code == 401
        assert client.get("/v1/traces").status_code == 401
        assert client.get("/health").json()["auth"] == "required"


async def test_revoking_every_key_locks_the_server_instead_of_opening_it(
    database_dsn: str,
) -> None:
    key_id, key = await create_key(database_dsn, "admin")
    await revoke(database_dsn, key_id)
    with TestClient(create_app(settings_for(database_dsn))) as client:
        assert client.get("/v1/traces").status_code == 401
        assert client.get("/v1/traces", headers=bearer(key)).status_code == 401


async def test_revocation_and_new_keys_take_effect_while_running(database_dsn: str) -> None:
    settings = settings_for(database_dsn, auth_refresh_s=0.1)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/traces").status_code == 200  # open: no key yet
        key_id, key = await create_key(database_dsn, "read")
        assert wait_for_status(client, {}, 401)  # now required
        assert client.get("/v1/traces", headers=bearer(key)).status_code == 200
        await revoke(database_dsn, key_id)
        assert wait_for_status(client, bearer(key), 401)


def wait_for_status(client: TestClient, headers: dict[str, str], status: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if client.get("/v1/traces", headers=headers).status_code == status:
            return True
        time.sleep(0.05)
    return False


def test_keys_that_cannot_be_read_at_start_fail_closed_with_503() -> None:
    with TestClient(create_app(settings_for(UNREACHABLE, shutdown_timeout_s=0.1))) as client:
        refused = client.post("/v1/events", content=dumps(samples.custom()))
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert client.get("/v1/traces").status_code == 503
        assert client.get("/health").json()["auth"] == "unknown"


def test_presented_key_reads_bearer_and_x_api_key_headers() -> None:
    assert presented_key([(b"authorization", b"Bearer abc")]) == "abc"
    assert presented_key([(b"authorization", b"bearer  abc ")]) == "abc"
    assert presented_key([(b"x-api-key", b"abc")]) == "abc"
    assert presented_key([(b"authorization", b"Basic abc")]) is None
    assert presented_key([]) is None


def test_keys_are_random_and_only_their_hash_is_stored() -> None:
    first, second = new_key(), new_key()
    assert first != second and first.startswith("xr_") and len(first) > 40
    assert key_hash(first) != key_hash(second) and len(key_hash(first)) == 32


async def test_keys_are_checked_without_the_database(server_dsn: str, database_dsn: str) -> None:
    """Once read, keys are checked in memory: with the database refusing every connection,
    a key still gets events queued, and a wrong one is still refused."""
    _, key = await create_key(database_dsn, "ingest")
    name = urlsplit(database_dsn).path.lstrip("/")
    admin = await asyncpg.connect(server_dsn)
    settings = settings_for(database_dsn, auth_refresh_s=0.05, shutdown_timeout_s=0.1)
    try:
        with TestClient(create_app(settings)) as client:
            await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
            time.sleep(0.3)  # a few failed refreshes
            assert client.get("/health").json()["database"] == "unreachable"
            event = dumps(samples.custom())
            assert client.post("/v1/events", content=event, headers=bearer(key)).status_code == 202
            wrong = client.post("/v1/events", content=event, headers=bearer(new_key()))
            assert wrong.status_code == 401
            await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    finally:
        await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        await admin.close()
