"""A year of one key's 1-minute windows, as the dataflow's sink writes them: for the
retention tests and the retention benchmark."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fastdigest import TDigest

from dataflows.windows import WindowRow
from schemas.rows import MetricsRow

DAY = timedelta(days=1)
MINUTE = timedelta(minutes=1)
DAYS = 365


@dataclass(frozen=True)
class Minute:
    """What the test wrote for one window: its raw latencies and totals."""

    start: datetime
    latencies: tuple[float, ...]
    errors: int
    prompt_tokens: int
    cost: float


def today() -> datetime:
    now = datetime.now(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def made_year(seed: int) -> list[Minute]:
    """One window a minute for the 365 days before today, 1 to 3 calls each."""
    rng = random.Random(seed)
    first = today() - DAYS * DAY
    made = []
    for minute in range(DAYS * 1440):
        latencies = tuple(round(rng.lognormvariate(6, 0.6), 3) for _ in range(rng.randint(1, 3)))
        made.append(
            Minute(
                first + minute * MINUTE,
                latencies,
                rng.randint(0, len(latencies)),
                rng.randint(5, 500) * len(latencies),
                rng.randint(1, 10**6) / 10**7,
            )
        )
    return made


def window_row(minute: Minute) -> WindowRow:
    calls = len(minute.latencies)
    return WindowRow(
        row=MetricsRow(
            tenant_id="acme",
            route="/chat",
            model="gpt-4o",
            window_start=minute.start,
            window_end=minute.start + MINUTE,
            requests=calls,
            errors=minute.errors,
            timeouts=0,
            avg_latency_ms=sum(minute.latencies) / calls,
            p50_latency_ms=None,
            p95_latency_ms=None,
            p99_latency_ms=None,
            avg_time_to_first_token_ms=None,
            prompt_tokens=minute.prompt_tokens,
            completion_tokens=calls,
            cache_read_tokens=0,
            reasoning_tokens=0,
            avg_prompt_tokens=minute.prompt_tokens / calls,
            avg_completion_tokens=1.0,
            estimated_cost_usd=minute.cost,
            unpriced_requests=0,
            revision=1,
        ),
        digest=TDigest.from_values(list(minute.latencies)).to_bytes(),
        ttft_count=0,
    )
