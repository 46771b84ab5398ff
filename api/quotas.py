"""Ingestion quotas and usage (docs/quotas.md): the gate each ingestion process keeps, and
``python -m api.quotas`` (``just quota TENANT RATE BURST``).

Each tenant's limits (:mod:`schemas.quotas`) are read from ``tenant_quotas`` every
``LIMITS_REFRESH_SECONDS`` (``INGEST_RATE`` / ``INGEST_BURST`` for tenants without a
row), so a change holds within that without a restart. Events are taken from the
tenant's bucket in Postgres, which every ingestion process of a deployment shares, in
leases: the process keeps what a lease gave beyond the request's need for the next
requests, and asks again when it runs out (one lease at a time per tenant). When
Postgres cannot be reached, the process goes on with a bucket of its own per tenant
at the last known limits — it never refuses events because the store is away — and
tries the shared bucket again ``STORE_RETRY_SECONDS`` later.

Usage — events accepted and refused per tenant and UTC day — is counted in memory
and added to ``ingestion_usage`` every ``USAGE_FLUSH_SECONDS`` (and at shut-down).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool

from schemas.config import Settings, load_or_exit
from schemas.database import ensure_schema
from schemas.events import Identifier
from schemas.quotas import Limits, LocalBucket, lease_size, retry_after

logger = logging.getLogger("streamlens.quotas")

LIMITS_REFRESH_SECONDS = 5.0
USAGE_FLUSH_SECONDS = 5.0
STORE_TIMEOUT_SECONDS = 0.5
STORE_RETRY_SECONDS = 5.0


class OverQuota(Exception):
    """A request's events are more than its tenant's bucket holds now."""

    def __init__(self, tenant: str, limits: Limits, count: int, after: int) -> None:
        self.tenant, self.limits, self.count, self.retry_after = tenant, limits, count, after
        if count > limits.capacity:
            detail = (
                f"{count} events at once are more than tenant {tenant!r}'s burst of {limits.burst} allows: "
                f"send at most {int(limits.capacity)} a request"
            )
        else:
            detail = (
                f"tenant {tenant!r} is over its quota of {limits.events_per_second:g} events a second "
                f"(burst {limits.burst}); send again in {after} s"
            )
        super().__init__(detail)


class QuotaGate:
    """One ingestion process's view of the quotas: limits, leases and usage counts."""

    def __init__(self, settings: Settings) -> None:
        self.default = Limits(settings.ingest_rate, settings.ingest_burst)
        self._dsn = settings.postgres_dsn
        self._limits: dict[str, Limits] = {}
        self._held: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._local: dict[str, LocalBucket] = {}
        self._store_down_until = 0.0
        self._usage: Counter[tuple[str, date, str]] = Counter()
        self._pool: AsyncConnectionPool | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        """Open the pool and the refresh and flush loops for the app's lifetime."""
        self._pool = AsyncConnectionPool(
            self._dsn,
            min_size=1,
            max_size=4,
            open=False,
            kwargs={"autocommit": True},
            timeout=STORE_TIMEOUT_SECONDS,
            name="streamlens-quotas",
        )
        await self._pool.open(wait=False)
        self._tasks = [
            asyncio.create_task(self._every(LIMITS_REFRESH_SECONDS, self.refresh_limits)),
            asyncio.create_task(self._every(USAGE_FLUSH_SECONDS, self.flush_usage)),
        ]
        try:
            yield self
        finally:
            for task in self._tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.flush_usage(), 2.0)
            await self._pool.close()

    async def _every(self, seconds: float, work: Any) -> None:
        while True:
            with contextlib.suppress(Exception):
                await work()
            await asyncio.sleep(seconds)

    def limits_of(self, tenant: str) -> Limits:
        return self._limits.get(tenant, self.default)

    async def refresh_limits(self) -> None:
        assert self._pool is not None
        async with self._pool.connection(timeout=STORE_TIMEOUT_SECONDS) as conn:
            cursor = await conn.execute("SELECT tenant_id, events_per_second, burst FROM tenant_quotas")
            found = {
                tenant: Limits(float(rate), int(burst)) for tenant, rate, burst in await cursor.fetchall()
            }
        changed = {
            tenant
            for tenant in found.keys() | self._limits.keys()
            if found.get(tenant) != self._limits.get(tenant)
        }
        self._limits = found
        for tenant in changed:
            # A new limit: what this process held was leased under the old one.
            self._held.pop(tenant, None)
            self._local.pop(tenant, None)

    async def admit(self, counts: Counter[str]) -> None:
        """Take each tenant's events from its quota; :class:`OverQuota` (and nothing taken)
        when one tenant's bucket does not hold them."""
        taken: list[tuple[str, int]] = []
        try:
            for tenant, count in counts.items():
                limits = self.limits_of(tenant)
                if not limits.limited or count <= 0:
                    continue
                await self._take(tenant, count, limits)
                taken.append((tenant, count))
        except OverQuota as refusal:
            # Those taken for the request's other tenants go back to this process's holding.
            for tenant, count in taken:
                self._held[tenant] = self._held.get(tenant, 0.0) + count
            self.count(refusal.tenant, refused=sum(counts.values()))
            raise

    async def _take(self, tenant: str, count: int, limits: Limits) -> None:
        held = self._held.get(tenant, 0.0)
        if held >= count:
            self._held[tenant] = held - count
            return
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            held = self._held.get(tenant, 0.0)  # another request may have leased meanwhile
            if held >= count:
                self._held[tenant] = held - count
                return
            need = count - held
            now = time.monotonic()
            if count > limits.capacity:
                raise OverQuota(tenant, limits, count, retry_after(count, limits))
            if now >= self._store_down_until:
                try:
                    granted, short = await self._lease(tenant, limits, need)
                except Exception as error:
                    self._store_lost(error)
                else:
                    if granted >= need:
                        self._held[tenant] = held + granted - count
                        return
                    raise OverQuota(tenant, limits, count, retry_after(short, limits))
            bucket = self._local.get(tenant)
            if bucket is None or bucket.limits != limits:
                bucket = self._local[tenant] = LocalBucket(limits, now)
            short = bucket.take(count, now)
            if short:
                raise OverQuota(tenant, limits, count, retry_after(short, limits))

    async def _lease(self, tenant: str, limits: Limits, need: float) -> tuple[float, float]:
        assert self._pool is not None
        async with self._pool.connection(timeout=STORE_TIMEOUT_SECONDS) as conn:
            cursor = await asyncio.wait_for(
                conn.execute(
                    "SELECT granted, short FROM quota_lease(%s, %s, %s, %s, %s)",
                    (tenant, limits.events_per_second, limits.capacity, need, lease_size(limits, need)),
                ),
                STORE_TIMEOUT_SECONDS,
            )
            record = await cursor.fetchone()
        assert record is not None
        if self._store_down_until:
            self._store_down_until = 0.0
            self._local.clear()
            logger.warning("quota store back: tenants' quotas are shared by every ingestion process again")
        return float(record[0]), float(record[1])

    def _store_lost(self, error: BaseException) -> None:
        if not self._store_down_until:
            logger.warning(
                "quota store unreachable (%s): going on with each tenant's last known limits in this "
                "process alone, trying again every %.0f s",
                error or type(error).__name__,
                STORE_RETRY_SECONDS,
            )
        self._store_down_until = time.monotonic() + STORE_RETRY_SECONDS

    def count(self, tenant: str | None, *, accepted: int = 0, refused: int = 0) -> None:
        """Usage of today (UTC), to be added to ``ingestion_usage``."""
        if tenant is None:
            return
        today = datetime.now(UTC).date()
        if accepted:
            self._usage[(tenant, today, "accepted")] += accepted
        if refused:
            self._usage[(tenant, today, "refused")] += refused

    async def flush_usage(self) -> None:
        if not self._usage or self._pool is None:
            return
        counted, self._usage = self._usage, Counter()
        rows: dict[tuple[str, date], list[int]] = {}
        for (tenant, day, kind), number in counted.items():
            rows.setdefault((tenant, day), [0, 0])[kind == "refused"] += number
        try:
            async with self._pool.connection(timeout=STORE_TIMEOUT_SECONDS) as conn, conn.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO ingestion_usage (tenant_id, day, accepted, refused) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (tenant_id, day) DO UPDATE SET accepted = ingestion_usage.accepted + "
                    "EXCLUDED.accepted, refused = ingestion_usage.refused + EXCLUDED.refused",
                    [(tenant, day, accepted, refused) for (tenant, day), (accepted, refused) in rows.items()],
                )
        except Exception:
            self._usage.update(counted)  # kept for the next flush
            raise


# -- just quota TENANT RATE BURST ---------------------------------------------------------


def set_quota(conn: psycopg.Connection[Any], tenant: str, limits: Limits | None) -> None:
    """Give ``tenant`` its own limits, or (None) back to the defaults."""
    if limits is None:
        conn.execute("DELETE FROM tenant_quotas WHERE tenant_id = %s", (tenant,))
        return
    conn.execute(
        "INSERT INTO tenant_quotas (tenant_id, events_per_second, burst) VALUES (%s, %s, %s) "
        "ON CONFLICT (tenant_id) DO UPDATE SET events_per_second = EXCLUDED.events_per_second, "
        "burst = EXCLUDED.burst, updated_at = now()",
        (tenant, limits.events_per_second, limits.burst),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="just quota",
        description="Set a tenant's ingestion quota (docs/quotas.md); without RATE, show it.",
    )
    parser.add_argument("tenant", metavar="TENANT")
    parser.add_argument("rate", metavar="RATE", nargs="?", type=float, help="events a second; 0: no limit")
    parser.add_argument("burst", metavar="BURST", nargs="?", type=int, help="events at once (default: RATE)")
    parser.add_argument("--default", action="store_true", help="back to INGEST_RATE / INGEST_BURST")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        msgspec.convert(args.tenant, Identifier)
    except msgspec.ValidationError:
        parser.error(f"TENANT {args.tenant!r}: expected 1-128 letters, digits, '.', '_', ':' or '-'")
    if args.rate is not None and not 0 <= args.rate < float("inf"):
        parser.error(f"RATE {args.rate:g}: expected a number of events a second ≥ 0")
    if args.burst is not None and args.burst < 0:
        parser.error(f"BURST {args.burst}: expected a whole number ≥ 0")
    settings = load_or_exit()
    ensure_schema(settings.postgres_dsn)
    with psycopg.connect(settings.postgres_dsn, autocommit=True) as conn:
        if args.default:
            set_quota(conn, args.tenant, None)
        elif args.rate is not None:
            burst = args.burst if args.burst is not None else int(args.rate)
            set_quota(conn, args.tenant, Limits(args.rate, burst))
        found = conn.execute(
            "SELECT events_per_second, burst FROM tenant_quotas WHERE tenant_id = %s", (args.tenant,)
        ).fetchone()
    limits = Limits(settings.ingest_rate, settings.ingest_burst) if found is None else Limits(*found)
    where = "the default (INGEST_RATE / INGEST_BURST)" if found is None else "its own"
    shown = (
        "no limit" if not limits.limited else f"{limits.events_per_second:g} events/s, burst {limits.burst}"
    )
    print(
        f"{args.tenant}: {shown} - {where}; "
        f"ingestion processes apply it within {LIMITS_REFRESH_SECONDS:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
