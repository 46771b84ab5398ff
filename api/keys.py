"""Create, revoke and list API keys: ``python -m api.keys create|revoke|list``.

``create TENANT [--scope ingest|read|manage]`` prints the new key on stdout and
nothing else, so ``KEY=$(just create-key acme)`` works; the key is shown this
once and only its hash is stored. The scope defaults to ``ingest``, what an
application sending events needs; dashboards and analysts get ``--scope read``,
and whoever changes the tenant's settings (its dimensions) ``--scope manage``,
which reads too.

``revoke PREFIX`` revokes the one active key whose ``sl_<key id>`` starts with
PREFIX (the ``sl_`` may be left out; at least 4 characters of the key id; a
whole key works too). A prefix matching several active keys is refused. Running
services stop accepting a revoked key within 5 seconds.

``list [--tenant T] [--all]`` shows prefixes, never keys.

Postgres comes from ``POSTGRES_DSN``; the schema is created when missing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime

import msgspec
import psycopg
from msgspec import Struct

from api.auth import KEY_ID_ALPHABET, KEY_ID_LENGTH, SCOPES, NewKey, Scope, generate_key, key_prefix
from schemas.config import load_or_exit
from schemas.database import ensure_schema
from schemas.events import IDENTIFIER_RULE, Identifier

MIN_PREFIX_ID_CHARS = 4
_KEY_ID_CHARS = frozenset(KEY_ID_ALPHABET)


class KeyCommandError(Exception):
    """A command that cannot be carried out; the message is shown as is."""


class KeyInfo(Struct, frozen=True):
    prefix: str
    tenant_id: str
    scope: Scope
    created_at: datetime
    revoked_at: datetime | None


def create_key(conn: psycopg.Connection, tenant_id: str, scope: Scope) -> NewKey:
    """Store a new key for ``tenant_id`` and return it; the only time it exists in clear."""
    try:
        msgspec.convert(tenant_id, Identifier)
    except msgspec.ValidationError:
        raise KeyCommandError(f"invalid tenant {tenant_id!r}: expected {IDENTIFIER_RULE}") from None
    if scope not in SCOPES:
        raise KeyCommandError(f"invalid scope {scope!r}: expected one of {', '.join(SCOPES)}")
    while True:
        new = generate_key()
        try:
            with conn.transaction():
                conn.execute(
                    "INSERT INTO api_keys (key_hash, key_prefix, tenant_id, scope) VALUES (%s, %s, %s, %s)",
                    (new.key_hash, new.prefix, tenant_id, scope),
                )
        except psycopg.errors.UniqueViolation:
            # Two keys drew the same 8-character id (one chance in 36^8 per pair).
            continue
        return new


def normalise_prefix(text: str) -> str:
    """``sl_<start of a key id>`` from what an operator types: a prefix, with or without
    ``sl_``, or a whole key."""
    text = text.strip()
    whole = key_prefix(text)
    if whole is not None:
        return whole
    key_id = text.removeprefix("sl_")
    if not (MIN_PREFIX_ID_CHARS <= len(key_id) <= KEY_ID_LENGTH) or not set(key_id) <= _KEY_ID_CHARS:
        raise KeyCommandError(
            f"invalid prefix {text!r}: expected sl_ and {MIN_PREFIX_ID_CHARS} to {KEY_ID_LENGTH}"
            " lowercase letters or digits of the key id, e.g. sl_ab12cd34"
        )
    return "sl_" + key_id


def revoke_key(conn: psycopg.Connection, prefix: str) -> KeyInfo:
    """Revoke the one active key starting with ``prefix``; return it as revoked.

    A key already revoked is returned unchanged, so revoking twice is harmless.
    """
    prefix = normalise_prefix(prefix)
    with conn.transaction():
        rows = conn.execute(
            "SELECT key_prefix, tenant_id, scope, created_at, revoked_at FROM api_keys"
            " WHERE starts_with(key_prefix, %s) ORDER BY key_prefix FOR UPDATE",
            (prefix,),
        ).fetchall()
        keys = [KeyInfo(*row) for row in rows]
        active = [key for key in keys if key.revoked_at is None]
        if len(active) > 1:
            names = ", ".join(f"{key.prefix} ({key.tenant_id})" for key in active)
            raise KeyCommandError(
                f"prefix {prefix!r} is ambiguous, it matches {len(active)} active keys: {names};"
                " give more characters"
            )
        if not active:
            if len(keys) == 1:
                return keys[0]
            raise KeyCommandError(f"no active key starts with {prefix!r}")
        row = conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_prefix = %s"
            " RETURNING key_prefix, tenant_id, scope, created_at, revoked_at",
            (active[0].prefix,),
        ).fetchone()
    assert row is not None
    return KeyInfo(*row)


def list_keys(
    conn: psycopg.Connection, tenant_id: str | None = None, *, include_revoked: bool = False
) -> list[KeyInfo]:
    rows = conn.execute(
        "SELECT key_prefix, tenant_id, scope, created_at, revoked_at FROM api_keys"
        " WHERE (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s)"
        " AND (%(all)s OR revoked_at IS NULL)"
        " ORDER BY tenant_id, created_at, key_prefix",
        {"tenant": tenant_id, "all": include_revoked},
    ).fetchall()
    return [KeyInfo(*row) for row in rows]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m api.keys", description="Manage StreamLens API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key for a tenant and print it once")
    create.add_argument("tenant", metavar="TENANT")
    create.add_argument(
        "--scope",
        choices=SCOPES,
        default="ingest",
        help="ingest: send events (default); read: query metrics; manage: query and change settings",
    )
    revoke = commands.add_parser("revoke", help="revoke the key starting with PREFIX")
    revoke.add_argument("prefix", metavar="PREFIX")
    listing = commands.add_parser("list", help="list keys (prefixes only)")
    listing.add_argument("--tenant", metavar="TENANT")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    return parser


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = load_or_exit()
    try:
        ensure_schema(settings.postgres_dsn)
        with psycopg.connect(settings.postgres_dsn, autocommit=True) as conn:
            conn.execute("SET TIME ZONE 'UTC'")
            if args.command == "create":
                new = create_key(conn, args.tenant, args.scope)
                print(new.key)
                print(
                    f"created {new.prefix} for tenant {args.tenant!r}, scope {args.scope};"
                    " the key is shown only this once",
                    file=sys.stderr,
                )
            elif args.command == "revoke":
                key = revoke_key(conn, args.prefix)
                print(
                    f"revoked {key.prefix} (tenant {key.tenant_id!r}, scope {key.scope})"
                    f" at {_when(key.revoked_at)}"
                )
            else:
                for key in list_keys(conn, args.tenant, include_revoked=args.all):
                    print(
                        f"{key.prefix}  {key.scope:<6}  created {_when(key.created_at)}"
                        f"  revoked {_when(key.revoked_at)}  {key.tenant_id}"
                    )
    except KeyCommandError as error:
        print(f"streamlens: {error}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as error:
        print(f"streamlens: cannot reach Postgres (POSTGRES_DSN): {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
