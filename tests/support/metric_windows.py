"""Windows of ``llm_metrics`` built from raw calls: a call (:class:`RawCall`), a window of calls
and the row it stores (:class:`Window`, computed from the calls the way the contract defines
it), random calls, writing windows into Postgres, and reading them back through the query API
(:func:`get`)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from statistics import fmean
from typing import Any

import psycopg
from fastdigest import TDigest
from starlette.testclient import TestClient

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


@dataclass
class RawCall:
    """One call as the dataflow would see it; ``latency_ms`` None is a timeout."""

    latency_ms: float | None
    error: bool = False
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float | None = 0.0


@dataclass
class Window:
    tenant_id: str
    route: str
    model: str
    start: datetime
    calls: list[RawCall]
    revision: int = 1
    seconds: int = 60
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def answered(self) -> list[RawCall]:
        return [call for call in self.calls if call.latency_ms is not None]

    def column_values(self) -> dict[str, Any]:
        """The stored row, computed from the raw calls the way the contract defines it."""
        answered = self.answered
        latencies = [call.latency_ms for call in answered]
        ttfts = [call.ttft_ms for call in answered if call.ttft_ms is not None]
        digest = TDigest.from_values(latencies) if latencies else None
        priced = [call.cost_usd for call in answered if call.cost_usd is not None]
        values = {
            "tenant_id": self.tenant_id,
            "route": self.route,
            "model": self.model,
            "window_start": self.start,
            "window_end": self.start + timedelta(seconds=self.seconds),
            "requests": len(self.calls),
            "errors": sum(call.error or call.latency_ms is None for call in self.calls),
            "timeouts": len(self.calls) - len(answered),
            "avg_latency_ms": fmean(latencies) if latencies else None,
            "p50_latency_ms": digest.quantile(0.5) if digest else None,
            "p95_latency_ms": digest.quantile(0.95) if digest else None,
            "p99_latency_ms": digest.quantile(0.99) if digest else None,
            "avg_time_to_first_token_ms": fmean(ttfts) if ttfts else None,
            "ttft_count": len(ttfts),
            "prompt_tokens": sum(call.prompt_tokens for call in answered),
            "completion_tokens": sum(call.completion_tokens for call in answered),
            "cache_read_tokens": sum(call.cache_read_tokens for call in answered),
            "reasoning_tokens": sum(call.reasoning_tokens for call in answered),
            "avg_prompt_tokens": (fmean(call.prompt_tokens for call in answered) if answered else None),
            "avg_completion_tokens": (
                fmean(call.completion_tokens for call in answered) if answered else None
            ),
            "estimated_cost_usd": sum(priced),
            "unpriced_requests": len(answered) - len(priced),
            "latency_digest": digest.to_bytes() if digest else None,
            "revision": self.revision,
        }
        values.update(self.extra)
        return values


def random_calls(
    rnd: random.Random, count: int, median_ms: float = 500.0, timeout_share: float = 0.05
) -> list[RawCall]:
    calls = []
    for _ in range(count):
        if rnd.random() < timeout_share:
            calls.append(RawCall(latency_ms=None, error=True))
            continue
        prompt = rnd.randint(10, 2000)
        completion = rnd.randint(0, 800)
        calls.append(
            RawCall(
                latency_ms=rnd.lognormvariate(0, 0.7) * median_ms,
                error=rnd.random() < 0.05,
                ttft_ms=rnd.uniform(20, 200) if rnd.random() < 0.4 else None,
                prompt_tokens=prompt,
                completion_tokens=completion,
                cache_read_tokens=rnd.randint(0, prompt),
                reasoning_tokens=rnd.randint(0, completion),
                cost_usd=None if rnd.random() < 0.1 else rnd.uniform(0.0001, 0.01),
            )
        )
    return calls


def insert_windows(dsn: str, windows: Sequence[Window]) -> None:
    rows = [window.column_values() for window in windows]
    columns = list(rows[0])
    statement = f"INSERT INTO llm_metrics ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})"
    with psycopg.connect(dsn) as conn, conn.cursor() as cursor:
        cursor.executemany(statement, [[row[name] for name in columns] for row in rows])


def rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def get(client: TestClient, **params: Any) -> dict[str, Any]:
    response = client.get("/v1/metrics", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == len(body["metrics"])
    return body
