"""API keys in Postgres: the format, hash-only storage, and the key CLI end to end."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from api.auth import generate_key, key_prefix
from api.keys import KeyCommandError, create_key, list_keys, normalise_prefix, revoke_key

ROOT = Path(__file__).resolve().parent.parent
KEY_PATTERN = re.compile(r"sl_([a-z0-9]{8})_([A-Za-z0-9_-]{43})")


def cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POSTGRES_DSN": dsn}
    return subprocess.run(
        [sys.executable, "-m", "api.keys", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def insert_key(conn: psycopg.Connection, prefix: str, tenant: str, scope: str = "ingest") -> None:
    """A key row with a chosen prefix, to set up prefix collisions."""
    conn.execute(
        "INSERT INTO api_keys (key_hash, key_prefix, tenant_id, scope) VALUES (%s, %s, %s, %s)",
        (secrets.token_bytes(32), prefix, tenant, scope),
    )


def test_generated_keys_have_the_documented_form_and_enough_entropy() -> None:
    keys = [generate_key() for _ in range(200)]
    for new in keys:
        match = KEY_PATTERN.fullmatch(new.key)
        assert match is not None, new.key
        assert new.prefix == f"sl_{match.group(1)}"
        assert key_prefix(new.key) == new.prefix
        assert new.key_hash == hashlib.sha256(new.key.encode()).digest()
        # 43 URL-safe base64 characters carry 258 bits; token_urlsafe(32) uses 256 of them.
        assert len(match.group(2)) * 6 >= 256
    assert len({new.key for new in keys}) == len(keys)
    assert len({new.prefix for new in keys}) == len(keys)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sl_",
        "sl_abcd1234",
        "sl_ABCD1234_" + "a" * 43,
        "sl_abcd1234_" + "a" * 42,
        "sl_abcd1234_" + "a" * 44,
        "sl_abcd1234-" + "a" * 43,
        "xx_abcd1234_" + "a" * 43,
        "sl_abcd1234_" + "a" * 42 + " ",
        "sl_abcd1234_" + "a" * 42 + "\n",
    ],
)
def test_malformed_keys_have_no_prefix(text: str) -> None:
    assert key_prefix(text) is None


def test_keys_are_stored_only_as_hashes(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        created = [
            create_key(conn, tenant, scope) for tenant in ("acme", "globex") for scope in ("ingest", "read")
        ]
        # Every column of every row, as Postgres renders it, and the raw bytes of the hashes.
        rendered = [row[0] for row in conn.execute("SELECT t::text FROM api_keys t")]
        stored = conn.execute("SELECT key_hash, key_prefix, tenant_id, scope FROM api_keys").fetchall()
    assert len(rendered) == len(created) == 4
    for new in created:
        secret = new.key.split("_", 2)[2]
        for text in rendered:
            assert new.key not in text and secret not in text
        for key_hash, *_ in stored:
            assert new.key.encode() not in bytes(key_hash)
    expected = {(hashlib.sha256(new.key.encode()).digest(), new.prefix) for new in created}
    assert {(bytes(row[0]), row[1]) for row in stored} == expected
    assert sorted((row[2], row[3]) for row in stored) == [
        ("acme", "ingest"),
        ("acme", "read"),
        ("globex", "ingest"),
        ("globex", "read"),
    ]


def test_the_table_refuses_what_is_not_a_hash_a_prefix_or_a_scope(postgres_dsn: str) -> None:
    bad_rows = [
        (b"short", "sl_abcd1234", "acme", "ingest"),
        (secrets.token_bytes(32), "abcd1234", "acme", "ingest"),
        (secrets.token_bytes(32), "sl_abcd1234", "acme", "admin"),
    ]
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        for row in bad_rows:
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute(
                    "INSERT INTO api_keys (key_hash, key_prefix, tenant_id, scope) VALUES (%s, %s, %s, %s)",
                    row,
                )


def test_create_key_refuses_a_bad_tenant(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        for tenant in ("", "a\x00b", "x" * 129):
            with pytest.raises(KeyCommandError, match="invalid tenant"):
                create_key(conn, tenant, "ingest")
        assert conn.execute("SELECT count(*) FROM api_keys").fetchone() == (0,)


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("sl_abcd", "sl_abcd"),
        ("abcd", "sl_abcd"),
        (" sl_ab12cd34 ", "sl_ab12cd34"),
        ("sl_ab12cd34_" + "x" * 43, "sl_ab12cd34"),
    ],
)
def test_normalise_prefix(typed: str, expected: str) -> None:
    assert normalise_prefix(typed) == expected


@pytest.mark.parametrize("typed", ["", "sl_", "abc", "sl_abc", "ABCD", "ab_cd", "abcd12345", "%"])
def test_normalise_prefix_refuses_short_or_foreign_prefixes(typed: str) -> None:
    with pytest.raises(KeyCommandError, match="invalid prefix"):
        normalise_prefix(typed)


def test_revoke_refuses_an_ambiguous_prefix_and_takes_a_longer_one(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        insert_key(conn, "sl_abcd0001", "acme")
        insert_key(conn, "sl_abcd0002", "globex")
        with pytest.raises(KeyCommandError, match=r"ambiguous.*sl_abcd0001.*sl_abcd0002"):
            revoke_key(conn, "abcd")
        assert [key.prefix for key in list_keys(conn)] == ["sl_abcd0001", "sl_abcd0002"]
        revoked = revoke_key(conn, "abcd0001")
        assert revoked.prefix == "sl_abcd0001" and revoked.revoked_at is not None
        # Only one active key is left under the short prefix now: it is no longer ambiguous.
        assert revoke_key(conn, "abcd").prefix == "sl_abcd0002"
        assert list_keys(conn) == []
        with pytest.raises(KeyCommandError, match="no active key"):
            revoke_key(conn, "abcd")
        with pytest.raises(KeyCommandError, match="no active key"):
            revoke_key(conn, "zzzz")
        # The one key of a longer prefix, already revoked: a harmless repeat.
        assert revoke_key(conn, "abcd0001").revoked_at == revoked.revoked_at


def test_an_underscore_in_a_prefix_is_not_a_wildcard(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        insert_key(conn, "sl_abcd0001", "acme")
        with pytest.raises(KeyCommandError):
            revoke_key(conn, "sl_a_cd")
        assert len(list_keys(conn)) == 1


def test_cli_create_list_revoke_end_to_end(postgres_dsn: str) -> None:
    created = cli(postgres_dsn, "create", "acme")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert KEY_PATTERN.fullmatch(key), created.stdout
    prefix = key[:11]
    assert f"created {prefix} for tenant 'acme', scope ingest" in created.stderr
    assert key not in created.stderr

    reader = cli(postgres_dsn, "create", "acme", "--scope", "read")
    assert reader.returncode == 0, reader.stderr
    read_key = reader.stdout.strip()

    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT key_hash, tenant_id, scope, revoked_at FROM api_keys ORDER BY scope"
        ).fetchall()
    assert [(bytes(h), t, s, r) for h, t, s, r in rows] == [
        (hashlib.sha256(key.encode()).digest(), "acme", "ingest", None),
        (hashlib.sha256(read_key.encode()).digest(), "acme", "read", None),
    ]

    listed = cli(postgres_dsn, "list")
    assert listed.returncode == 0, listed.stderr
    assert prefix in listed.stdout and read_key[:11] in listed.stdout
    assert key not in listed.stdout and read_key not in listed.stdout

    revoked = cli(postgres_dsn, "revoke", prefix)
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked {prefix} (tenant 'acme', scope ingest)" in revoked.stdout
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        revoked_at = conn.execute(
            "SELECT key_prefix, revoked_at IS NOT NULL FROM api_keys ORDER BY key_prefix"
        ).fetchall()
    assert sorted(revoked_at) == sorted([(prefix, True), (read_key[:11], False)])

    assert cli(postgres_dsn, "list").stdout.count("sl_") == 1
    assert cli(postgres_dsn, "list", "--all").stdout.count("sl_") == 2


def test_cli_errors_are_one_clear_line(postgres_dsn: str) -> None:
    bad_scope = cli(postgres_dsn, "create", "acme", "--scope", "admin")
    assert bad_scope.returncode == 2 and "invalid choice: 'admin'" in bad_scope.stderr

    unknown = cli(postgres_dsn, "revoke", "sl_zzzz")
    assert unknown.returncode == 1
    assert unknown.stderr == "streamlens: no active key starts with 'sl_zzzz'\n"

    unreachable = cli("postgresql://postgres@127.0.0.1:1/streamlens", "create", "acme")
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("streamlens: cannot reach Postgres (POSTGRES_DSN)")
    assert "Traceback" not in unreachable.stderr
