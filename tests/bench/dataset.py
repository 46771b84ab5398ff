"""A reproducible data set of calls, as the ingestion API writes them to Kafka.

Shared by the plain-loop baseline and the dataflow benchmark, so both measure the
same input.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

from schemas.events import LLMRequest, LLMResponse, encoder

# Real genai-prices models (so pricing does its usual work) and one it does not know.
MODELS = (
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-3-5-haiku-latest"),
    ("google", "gemini-2.0-flash"),
    (None, "in-house-llm-7b"),
)
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z
CALLS_PER_SECOND = 1_000.0  # of event time
TIMEOUT_SHARE = 0.01  # requests that never get a response
ERROR_SHARE = 0.02
EXPERIMENTS, COUNTRIES, USERS = 10, 100, 10_000
# The dimensions of those values, as DIMENSIONS names them.
DIMENSIONS = "metadata.experiment,metadata.country,user"
SKEW = 200  # records move at most this many places from event-time order


def _key(index: int) -> tuple[str, str, str | None, str]:
    provider, model = MODELS[index % len(MODELS)]
    return f"tenant-{index % 17}", f"/api/route-{index}", provider, model


def _skewed(records: list[tuple[float, bytes]], rng: random.Random) -> list[bytes]:
    """In event-time order, then shuffled within consecutive blocks of SKEW records."""
    records.sort(key=lambda record: record[0])
    payloads = [payload for _, payload in records]
    for block in range(0, len(payloads), SKEW):
        chunk = payloads[block : block + SKEW]
        rng.shuffle(chunk)
        payloads[block : block + SKEW] = chunk
    return payloads


def generate(
    calls: int, keys: int, seed: int, calls_per_second: float = CALLS_PER_SECOND
) -> tuple[list[bytes], list[bytes]]:
    """``calls`` request payloads and the response payloads of all but about 1 % of
    them, over ``keys`` (tenant, route, model) keys, at a steady ``calls_per_second``
    of event time (so spanning ``calls / calls_per_second`` seconds), each topic
    shuffled within a bounded skew."""
    rng = random.Random(seed)
    requests: list[tuple[float, bytes]] = []
    responses: list[tuple[float, bytes]] = []
    for number in range(calls):
        tenant_id, route, provider, model = _key(rng.randrange(keys))
        started = START + number / calls_per_second
        request_id = f"{seed:x}-{number:09d}-{rng.getrandbits(32):08x}"
        prompt = int(rng.lognormvariate(6.0, 1.0))
        requests.append(
            (
                started,
                encoder.encode(
                    LLMRequest(
                        request_id=request_id,
                        tenant_id=tenant_id,
                        route=route,
                        model=model,
                        timestamp=datetime.fromtimestamp(started, UTC),
                        prompt_tokens=prompt,
                        provider=provider,
                        # Dimensions a tenant may slice by (bench_dataflow): 10, 100 and
                        # 10,000 distinct values.
                        user_id_hash=f"u{rng.randrange(USERS):05d}",
                        metadata={
                            "experiment": f"prompt_v{rng.randrange(EXPERIMENTS)}",
                            "country": f"C{rng.randrange(COUNTRIES):03d}",
                        },
                    )
                ),
            )
        )
        if rng.random() < TIMEOUT_SHARE:
            continue
        latency_ms = rng.lognormvariate(6.2, 0.8)
        completion = int(rng.lognormvariate(5.0, 1.0))
        streamed = rng.random() < 0.5
        ended = started + latency_ms / 1000.0
        responses.append(
            (
                ended,
                encoder.encode(
                    LLMResponse(
                        request_id=request_id,
                        timestamp=datetime.fromtimestamp(ended, UTC),
                        tenant_id=tenant_id,
                        latency_ms=round(latency_ms, 3),
                        completion_tokens=completion,
                        cache_read_tokens=rng.randrange(prompt + 1) if rng.random() < 0.3 else 0,
                        reasoning_tokens=completion // 4 if rng.random() < 0.2 else 0,
                        time_to_first_token_ms=round(latency_ms * 0.2, 3) if streamed else None,
                        finish_reason="stop",
                        error="rate_limited" if rng.random() < ERROR_SHARE else None,
                    )
                ),
            )
        )
    return _skewed(requests, rng), _skewed(responses, rng)
