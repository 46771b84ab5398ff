"""The windows' dimensions from tenants' settings in Postgres (``schemas/tenant_settings.py``).

:class:`PostgresPlan` is the :class:`~dataflows.dimensions.DimensionPlan` the dataflow
runs with. Before a tenant's window later than any decided so far opens, it raises
the tenant's horizon and reads its changes in one transaction
(:func:`schemas.tenant_settings.decide`): at most one round trip per tenant and
window start, per worker. Postgres away is waited out, as the sinks wait: the
windows cannot open without knowing their dimensions. The connection has the
processor's timeouts (:mod:`dataflows.connections`): a server that does not
answer is away too.

``DIMENSIONS`` is recorded before the first window opens
(:func:`schemas.tenant_settings.record_default`), and tenants without a setting
of their own take it from that history: a restart with another value changes
only the windows after its recorded boundary.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping

import psycopg

from dataflows import connections
from dataflows.dimensions import names_at
from dataflows.sinks import OutageBackoff
from schemas.tenant_settings import History, decide, record_default


class PostgresPlan:
    """One worker's view of the tenants' settings; not shared between threads (a connection
    is not): :func:`plan_for` gives each thread its own."""

    def __init__(self, dsn: str, default: tuple[str, ...], window_seconds: int) -> None:
        self.dsn = dsn
        self.default = default  # DIMENSIONS, recorded at the first prepare()
        self.window_seconds = window_seconds
        self._decided: dict[str, float] = {}  # tenant -> latest window start decided
        self._histories: dict[str, History] = {}
        self._default: History | None = None  # DIMENSIONS as recorded; None until recorded
        self._conn: psycopg.Connection | None = None
        self._outage = OutageBackoff("postgres (tenant settings)")
        self._patience = connections.Patience()

    def prepare(self, through: Mapping[str, float]) -> None:
        known = self._decided
        needed = {tenant: start for tenant, start in through.items() if known.get(tenant, -math.inf) < start}
        if not needed:
            return
        while True:
            started = time.monotonic()
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = connections.connect(self.dsn, self._patience.factor)
                if self._default is None:
                    record_default(self._conn, self.default, self.window_seconds)
                decided = decide(self._conn, needed)
                break
            except (psycopg.OperationalError, psycopg.InterfaceError) as error:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                self._patience.failed(error)
                self._outage.failed(error, started)
        self._outage.succeeded()
        if self._patience.succeeded() and self._conn is not None:
            self._conn.close()
            self._conn = None
        self._default = decided.default
        for tenant, start in needed.items():
            self._decided[tenant] = start
            self._histories[tenant] = decided.histories[tenant]
        if len(self._decided) > 100_000:
            # Tenant ids come from clients: never let this grow without bound. Forgetting
            # costs a round trip the next time, never a different answer.
            self._decided.clear()
            self._histories.clear()

    def names(self, tenant_id: str, window_start: float) -> tuple[str, ...]:
        default = names_at(self._default, (), window_start)
        return names_at(self._histories.get(tenant_id), default, window_start)


_local = threading.local()


def plan_for(dsn: str, default: tuple[str, ...], window_seconds: int) -> PostgresPlan:
    """The calling thread's plan (Bytewax runs each worker in a thread of its own)."""
    plans: dict[tuple[str, tuple[str, ...], int], PostgresPlan] | None = getattr(_local, "plans", None)
    if plans is None:
        plans = _local.plans = {}
    plan = plans.get((dsn, default, window_seconds))
    if plan is None:
        plan = plans[dsn, default, window_seconds] = PostgresPlan(dsn, default, window_seconds)
    return plan
