"""API keys on both APIs (docs/api.md): which tenant is calling, and for what.

A key is ``sl_<key id>_<secret>``: the key id (8 lowercase letters and digits) is
not secret and names the key in listings and revocation; the secret is 256
random bits. Postgres keeps only the key's SHA-256 (``schemas/api_keys.sql``).

How an app uses this module, as Starlette's authentication does:

- in its lifespan, ``async with open_key_store(settings) as keys:`` and
  ``app.state.key_store = keys`` (``AUTH=off`` gives a store that lets every call
  through, with no Postgres);
- :data:`AUTHENTICATION` in its middleware: once per request, :class:`KeyBackend` reads
  the ``Authorization`` header and sets ``request.user`` (a :class:`KeyHolder`, a
  :class:`Refused` caller that remembers why, or an :class:`Unchecked` one whose key the
  store has not answered for lately) and ``request.auth.scopes``;
- each endpoint declares the scope it needs with ``@requires("ingest")`` (or ``"read"``,
  ``"manage"``), which raises the 401, 403 or 503 as an :class:`~api.errors.ApiError`
  before the endpoint runs; inside it, :func:`principal_of` is the caller;
- per event, :func:`check_event` (403 for a single event, that index rejected in
  a batch); per query, :func:`forbidden_tenant` on the ``tenant_id`` parameter.

Responses carry no tenant of their own: :func:`check_event` stamps the key's
tenant on them, so the dataflow only ever pairs a response with a request of the
same tenant. A response sent under tenant A's key for tenant B's request_id never
joins B's request: it is dead-lettered as an orphan, and B's request times out.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import string
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial, wraps
from typing import Any, Literal, TypeVar, cast

import psycopg
from msgspec import Struct
from psycopg_pool import AsyncConnectionPool
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import Response

from api.errors import ApiError
from schemas.config import Settings
from schemas.database import ensure_schema
from schemas.events import IngestEvent, LLMEvaluation, LLMRequest

logger = logging.getLogger("streamlens.auth")

Scope = Literal["ingest", "read", "manage"]
SCOPES: tuple[Scope, ...] = ("ingest", "read", "manage")
# The scopes a key of each scope satisfies. A manage key reads too (docs/api.md);
# sending events stays with ingest keys, the ones applications carry around.
GRANTS: dict[Scope, frozenset[Scope]] = {
    "ingest": frozenset({"ingest"}),
    "read": frozenset({"read"}),
    "manage": frozenset({"read", "manage"}),
}

KEY_ID_ALPHABET = string.ascii_lowercase + string.digits
KEY_ID_LENGTH = 8
# token_urlsafe(32): 32 random bytes, 43 URL-safe base64 characters.
KEY_SECRET_BYTES = 32
_KEY_FORMAT = re.compile(r"sl_[a-z0-9]{8}_[A-Za-z0-9_-]{43}")
KEY_PREFIX_LENGTH = len("sl_") + KEY_ID_LENGTH

# A revoked key must stop working within 5 s: a cached answer lives 4 s, which
# leaves a second for the lookup that replaces it.
CACHE_SECONDS = 4.0
# Every unknown key presented is remembered for CACHE_SECONDS too; past this many
# entries the cache is emptied rather than grown without bound.
CACHE_MAX_ENTRIES = 100_000
LOOKUP_TIMEOUT_SECONDS = 2.0
SCHEMA_TIMEOUT_SECONDS = 5.0

TENANT_NOT_ALLOWED = "tenant_id: not allowed for this key"
_REALM = 'Bearer realm="streamlens"'


class Principal(Struct, frozen=True):
    """Who a request speaks for. ``None`` fields mean unrestricted (``AUTH=off`` only)."""

    tenant_id: str | None
    scope: Scope | None


UNRESTRICTED = Principal(tenant_id=None, scope=None)


class NewKey(Struct, frozen=True):
    """A freshly generated key: ``key`` is shown once, only ``key_hash`` is stored."""

    key: str
    prefix: str
    key_hash: bytes


class _NotCached:
    """The store has no fresh answer for a key."""


NOT_CACHED = _NotCached()


class KeyStoreUnavailable(Exception):
    """The key table could not be read, so the key can be neither accepted nor refused."""


def hash_key(key: str) -> bytes:
    """SHA-256 of the whole key.

    A fast hash is enough: the secret is 256 random bits, so nothing short of
    guessing them finds a key from its hash, and a slow KDF would only add its
    cost to every uncached request.
    """
    return hashlib.sha256(key.encode()).digest()


def generate_key() -> NewKey:
    key_id = "".join(secrets.choice(KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
    key = f"sl_{key_id}_{secrets.token_urlsafe(KEY_SECRET_BYTES)}"
    return NewKey(key=key, prefix=key[:KEY_PREFIX_LENGTH], key_hash=hash_key(key))


def key_prefix(key: str) -> str | None:
    """The non-secret ``sl_<key id>`` of a well-formed key; ``None`` for anything else."""
    if _KEY_FORMAT.fullmatch(key) is None:
        return None
    return key[:KEY_PREFIX_LENGTH]


class KeyStore:
    """Looks keys up in ``api_keys``, remembering each answer for ``cache_seconds``.

    The cache is keyed by the key's hash and holds refusals as well as
    principals, so a request with a known key, valid or not, costs one SHA-256
    and one dict lookup. Concurrent lookups of the same uncached key share one
    query.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool | None,
        *,
        cache_seconds: float = CACHE_SECONDS,
        max_entries: int = CACHE_MAX_ENTRIES,
    ) -> None:
        # No pool: AUTH=off, every call is let through.
        self.pool = pool
        self.cache_seconds = cache_seconds
        self.max_entries = max_entries
        self._cache: dict[bytes, tuple[float, Principal | None]] = {}
        self._pending: dict[bytes, asyncio.Future[Principal | None]] = {}

    @property
    def enabled(self) -> bool:
        return self.pool is not None

    def cached(self, key: str) -> Principal | _NotCached | None:
        """What the store answered for ``key`` within ``cache_seconds``: its principal, ``None``
        for a refusal, or :data:`NOT_CACHED`."""
        return self._fresh(hash_key(key))

    def _fresh(self, digest: bytes) -> Principal | _NotCached | None:
        entry = self._cache.get(digest)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        return NOT_CACHED

    async def lookup(self, key: str) -> Principal | None:
        """The principal of a valid, unrevoked key; ``None`` for any other string.

        Raises :class:`KeyStoreUnavailable` when Postgres cannot answer in time.
        """
        digest = hash_key(key)
        cached = self._fresh(digest)
        if not isinstance(cached, _NotCached):
            return cached
        prefix = key_prefix(key)
        if prefix is None:
            return None
        pending = self._pending.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(prefix, digest))
            self._pending[digest] = pending
            pending.add_done_callback(partial(self._settled, digest))
        try:
            # Shielded: one caller giving up (client gone) must not cancel the
            # query the others wait for.
            return await asyncio.wait_for(asyncio.shield(pending), LOOKUP_TIMEOUT_SECONDS)
        except TimeoutError:
            raise KeyStoreUnavailable("the key database did not answer in time") from None

    def _settled(self, digest: bytes, future: asyncio.Future[Principal | None]) -> None:
        self._pending.pop(digest, None)
        # Every waiter may have given up; reading the outcome keeps asyncio from
        # reporting a failure nobody retrieved.
        if not future.cancelled():
            future.exception()

    async def _fetch(self, prefix: str, digest: bytes) -> Principal | None:
        assert self.pool is not None
        # Expiry counts from before the query: the answer is no older than that.
        expires = time.monotonic() + self.cache_seconds
        try:
            async with self.pool.connection() as conn:
                cursor = await conn.execute(
                    "SELECT key_hash, tenant_id, scope FROM api_keys"
                    " WHERE key_prefix = %s AND revoked_at IS NULL",
                    (prefix,),
                )
                row = await cursor.fetchone()
        except Exception as error:
            # Any failure (Postgres down, pool exhausted, table missing) is the
            # store's, not the caller's: answer 503, cache nothing.
            logger.warning("API key lookup failed: %s", error)
            raise KeyStoreUnavailable("the key database is unreachable") from error
        principal: Principal | None = None
        # Looked up by the non-secret prefix, compared in constant time: the
        # secret part never steers an index search or an early-exit comparison.
        if row is not None and hmac.compare_digest(bytes(row[0]), digest):
            principal = Principal(tenant_id=row[1], scope=row[2])
        if len(self._cache) >= self.max_entries:
            self._evict()
        self._cache[digest] = (expires, principal)
        return principal

    def _evict(self) -> None:
        now = time.monotonic()
        self._cache = {d: e for d, e in self._cache.items() if e[0] > now}
        if len(self._cache) >= self.max_entries:
            self._cache.clear()


@asynccontextmanager
async def open_key_store(
    settings: Settings,
    pool: AsyncConnectionPool | None = None,
    *,
    cache_seconds: float = CACHE_SECONDS,
) -> AsyncIterator[KeyStore]:
    """The key store an app keeps for its lifetime.

    ``AUTH=off``: a store that lets everything through and touches no database.
    Otherwise it uses ``pool`` when the app already has one (and has created the
    schema), or opens a small pool of its own on ``POSTGRES_DSN`` after creating the
    schema if it can. It does not wait for Postgres to be up: until it is,
    authenticated endpoints answer 503.
    """
    if not settings.auth:
        yield KeyStore(None)
        return
    if pool is not None:
        yield KeyStore(pool, cache_seconds=cache_seconds)
        return
    try:
        await asyncio.wait_for(
            asyncio.to_thread(ensure_schema, settings.postgres_dsn), SCHEMA_TIMEOUT_SECONDS
        )
    except (psycopg.Error, TimeoutError) as error:
        logger.warning("could not prepare the api_keys table (%s); starting anyway", error)
    own = AsyncConnectionPool(
        settings.postgres_dsn,
        min_size=1,
        max_size=4,
        open=False,
        kwargs={"autocommit": True},
        check=AsyncConnectionPool.check_connection,
        timeout=LOOKUP_TIMEOUT_SECONDS,
        name="streamlens-keys",
    )
    await own.open(wait=False)
    try:
        yield KeyStore(own, cache_seconds=cache_seconds)
    finally:
        await own.close()


def _unauthorized(detail: str, *, key_given: bool) -> ApiError:
    challenge = f'{_REALM}, error="invalid_token"' if key_given else _REALM
    return ApiError(401, "unauthorized", detail, headers={"WWW-Authenticate": challenge})


def _key(header: str | None) -> str:
    """The key in an ``Authorization`` header, or the 401 :class:`ApiError` saying why there
    is none."""
    if header is None:
        raise _unauthorized(
            "missing Authorization header: expected `Authorization: Bearer <key>`",
            key_given=False,
        )
    auth_scheme, _, credentials = header.partition(" ")
    if auth_scheme.lower() != "bearer":
        raise _unauthorized(
            "Authorization header: expected the Bearer scheme, `Authorization: Bearer <key>`",
            key_given=False,
        )
    # RFC 7235 allows one or more spaces after the scheme.
    key = credentials.lstrip(" ")
    if not key:
        raise _unauthorized("Authorization header: Bearer without a key", key_given=False)
    return key


def _found(principal: Principal | None) -> Principal:
    if principal is None:
        raise _unauthorized("API key is malformed, unknown or revoked", key_given=True)
    return principal


class KeyHolder(BaseUser):
    """A caller whose key was found: ``principal`` is the tenant and scope it speaks for."""

    def __init__(self, principal: Principal) -> None:
        self.principal = principal

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.principal.tenant_id or ""


class Refused(BaseUser):
    """A caller without a usable key; ``reason`` is the answer an endpoint that needs one gives."""

    def __init__(self, reason: ApiError) -> None:
        self.reason = reason


class Unchecked(BaseUser):
    """A caller whose key the store has not answered for lately: looked up only when an
    endpoint needs a key (:func:`authorize`), so that ``/health`` and the like never wait for
    the key database."""

    def __init__(self, key: str) -> None:
        self.key = key


_ALL_SCOPES = AuthCredentials(list(SCOPES))
_NO_SCOPES = AuthCredentials([])
# The credentials of each scope a key can have: the scopes it grants.
_CREDENTIALS = {scope: AuthCredentials(sorted(granted)) for scope, granted in GRANTS.items()}


def _credentials(principal: Principal) -> AuthCredentials:
    granted = _CREDENTIALS.get(principal.scope) if principal.scope is not None else None
    return granted or _NO_SCOPES


class KeyBackend(AuthenticationBackend):
    """Starlette's authentication backend for API keys, using ``app.state.key_store``.

    It never fails a request itself, and never waits: a key the store answered for within
    ``CACHE_SECONDS`` becomes a :class:`KeyHolder` or a :class:`Refused` caller at once, any
    other an :class:`Unchecked` one, looked up by the first endpoint that needs a key. An
    endpoint that needs none (``/health``, ``/ready``, ``/metrics``) answers whatever the header
    holds; one that needs one refuses in :func:`requires` with the reason kept.
    """

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser]:
        store: KeyStore = conn.app.state.key_store
        if not store.enabled:
            return _ALL_SCOPES, KeyHolder(UNRESTRICTED)
        try:
            key = _key(conn.headers.get("authorization"))
            cached = store.cached(key)
            if isinstance(cached, _NotCached):
                return _NO_SCOPES, Unchecked(key)
            principal = _found(cached)
        except ApiError as reason:
            return _NO_SCOPES, Refused(reason)
        return _credentials(principal), KeyHolder(principal)


# What both apps put in their middleware to know the caller of every request.
AUTHENTICATION = Middleware(AuthenticationMiddleware, backend=KeyBackend())

Endpoint = TypeVar("Endpoint", bound=Callable[..., Awaitable[Response]])


async def authorize(request: HTTPConnection, scope: Scope) -> Principal:
    """The caller's principal when its key grants ``scope`` (:data:`GRANTS`), looking the key
    up first if :class:`KeyBackend` left it :class:`Unchecked`; otherwise the 401 or 503 of
    the lookup, or a 403 naming both scopes."""
    user = request.user
    if isinstance(user, Unchecked):
        store: KeyStore = request.app.state.key_store
        try:
            principal = _found(await store.lookup(user.key))
        except KeyStoreUnavailable as error:
            raise ApiError(
                503, "unavailable", f"cannot check the API key: {error}", headers={"Retry-After": "1"}
            ) from None
        request.scope["auth"], request.scope["user"] = _credentials(principal), KeyHolder(principal)
    return check_scope(request, scope)


def check_scope(request: HTTPConnection, scope: Scope) -> Principal:
    """The caller's principal when its (checked) key grants ``scope``; otherwise the 401 or 503
    kept by :class:`KeyBackend`, or a 403 naming both scopes."""
    user = request.user
    if isinstance(user, Refused):
        raise user.reason
    assert isinstance(user, KeyHolder), "the app lacks the AUTHENTICATION middleware"
    if scope not in request.auth.scopes:
        raise ApiError(
            403,
            "forbidden",
            f"this key has scope {user.principal.scope!r}; this endpoint needs {scope!r}",
            headers={"WWW-Authenticate": f'{_REALM}, error="insufficient_scope", scope="{scope}"'},
        )
    return user.principal


def requires(scope: Scope) -> Callable[[Endpoint], Endpoint]:
    """Declares that an endpoint (a function or a method taking the request last) needs a
    key granting ``scope``; without one it answers as :func:`authorize` says."""

    def declare(endpoint: Endpoint) -> Endpoint:
        @wraps(endpoint)
        async def checked(*args: Any) -> Response:
            await authorize(args[-1], scope)
            return await endpoint(*args)

        return cast(Endpoint, checked)

    return declare


def principal_of(request: HTTPConnection) -> Principal:
    """Who the request speaks for, in an endpoint declared with :func:`requires`."""
    user = request.user
    assert isinstance(user, KeyHolder), "the endpoint is not declared with requires()"
    return user.principal


def forbidden_tenant(principal: Principal, tenant_id: str) -> str | None:
    """Why ``principal`` may not touch ``tenant_id``'s data, or ``None`` when it may."""
    if principal.tenant_id is None or principal.tenant_id == tenant_id:
        return None
    return TENANT_NOT_ALLOWED


def check_event(principal: Principal, event: IngestEvent) -> str | None:
    """Why ``principal`` may not send ``event``, or ``None``; stamps responses.

    A response takes the key's tenant. One that names another tenant is refused
    rather than silently re-attributed. With ``AUTH=off`` the event is left as is.
    """
    if isinstance(event, LLMRequest | LLMEvaluation):
        return forbidden_tenant(principal, event.tenant_id)
    if principal.tenant_id is None:
        return None
    if event.tenant_id is not None and event.tenant_id != principal.tenant_id:
        return TENANT_NOT_ALLOWED
    event.tenant_id = principal.tenant_id
    return None
