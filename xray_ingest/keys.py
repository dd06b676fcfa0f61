"""The `xray-ingest keys create|list|revoke` commands."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

import asyncpg

from xray_ingest import db
from xray_ingest.auth import SCOPES, SHOWN_PREFIX_LENGTH, key_hash, new_key
from xray_ingest.errors import ConfigError


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="create, list or revoke API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="create a key and print it (shown only once)")
    create.add_argument("--name", required=True, help="what the key is for, e.g. the service")
    create.add_argument("--scope", required=True, choices=SCOPES)
    actions.add_parser("list", help="list keys (never the keys themselves)")
    revoke = actions.add_parser("revoke", help="revoke a key; servers refuse it within seconds")
    revoke.add_argument("id", type=int)


async def run(dsn: str, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Runs one keys command; returns the exit status."""
    connection = await asyncpg.connect(dsn)
    try:
        if args.keys_command == "create":
            return await _create(connection, args.name, args.scope, out)
        if args.keys_command == "list":
            return await _list(connection, out)
        return await _revoke(connection, args.id, out)
    except asyncpg.UndefinedTableError:
        raise ConfigError("the database has no api_keys table; run `xray-ingest migrate`") from None
    finally:
        await connection.close()


async def _create(connection: db.Connection, name: str, scope: str, out: TextIO) -> int:
    if not name.strip() or len(name) > 200:
        print("xray-ingest: --name must be 1 to 200 characters", file=sys.stderr)
        return 2
    key = new_key()
    record = await db.insert_api_key(
        connection, name, scope, key[:SHOWN_PREFIX_LENGTH], key_hash(key)
    )
    print(
        f"created key {record['id']} ({name!r}, scope {scope}); store it now, it is not "
        "shown again:",
        file=sys.stderr,
    )
    print(key, file=out)
    return 0


async def _list(connection: db.Connection, out: TextIO) -> int:
    records = await db.list_api_keys(connection)
    print(
        f"{'id':>4}  {'scope':<6}  {'prefix':<8}  {'created':<20}  {'revoked':<20}  name", file=out
    )
    for r in records:
        revoked = r["revoked_at"].strftime("%Y-%m-%d %H:%M:%S") if r["revoked_at"] else "-"
        created = r["created_at"].strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{r['id']:>4}  {r['scope']:<6}  {r['prefix']:<8}  {created:<20}  {revoked:<20}  "
            f"{r['name']}",
            file=out,
        )
    return 0


async def _revoke(connection: db.Connection, key_id: int, out: TextIO) -> int:
    if not await db.revoke_api_key(connection, key_id):
        print(f"xray-ingest: no active key with id {key_id}", file=sys.stderr)
        return 1
    print(f"revoked key {key_id}", file=out)
    return 0
