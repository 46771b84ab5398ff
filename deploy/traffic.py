"""Generated LLM traffic for the ingestion API (``python -m deploy.traffic --help``).

Calls start at the wall clock's now, at a steady rate, across several tenants,
routes and models (two OpenAI models, an Anthropic model and one model no
price table knows). Latencies are log-normal per model, a share of calls fail,
some stream (with a time to first token), some read cached prompt tokens.
A request event is sent when its call starts and the response when it ends, so
responses trail their requests; a few responses are sent before their request,
as happens when two services report one call. Events travel in batches through
``POST /v1/llm/events``.

With API keys on, an ``ingest`` key serves one tenant: ``--api-key KEY`` sends
everything with one key (one tenant only), ``--api-key TENANT=KEY`` (repeated)
gives each tenant its own. Each tick's events are then posted per key, a
response with the key of its call's tenant, over one keep-alive connection per key.
"""

from __future__ import annotations

import argparse
import heapq
import http.client
import math
import random
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import msgspec

from api.auth import key_prefix
from schemas.events import BATCH_MAX_EVENTS

BATCH_PATH = "/v1/llm/events"
TICK_SECONDS = 0.2
# Responses sent ahead of their request (the request follows one tick later).
EARLY_RESPONSE_SHARE = 0.03
STREAMING_SHARE = 0.4
CACHE_READ_SHARE = 0.3
REASONING_SHARE = 0.2
MAX_LATENCY_MS = 20_000.0
SEND_ATTEMPTS = 5

TENANT_NAMES = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka")
ROUTES = ("/chat", "/summarize", "/search", "/classify")
ERRORS = ("rate_limit_exceeded", "upstream timeout", "context_length_exceeded", "internal server error")


@dataclass(frozen=True)
class Model:
    name: str
    provider: str | None
    weight: float
    median_latency_ms: float


MODELS: tuple[Model, ...] = (
    Model("gpt-4.1-mini", "openai", 0.45, 600.0),
    Model("gpt-4o", "openai", 0.25, 1200.0),
    Model("claude-sonnet-4-5", "anthropic", 0.2, 1500.0),
    # No price table knows it: its calls count as unpriced.
    Model("acme-internal-llm", None, 0.1, 900.0),
)


# Evaluations (docs/evaluations.md) of answered calls: an LLM judge's score soon after the call, and
# a user's pass/fail later, some of them a minute after (at most the run's
# ``evaluation_delay``). Each model has a quality of its own around which the judge scores.
JUDGED_SHARE = 0.5
JUDGE_DELAY = (1.0, 4.0)
FEEDBACK_SHARE = 0.2
FEEDBACK_DELAY = (2.0, 10.0)
LATE_FEEDBACK_SHARE = 0.3
MODEL_QUALITY = {"gpt-4.1-mini": 0.72, "gpt-4o": 0.81, "claude-sonnet-4-5": 0.86, "acme-internal-llm": 0.58}

EXPERIMENTS = ("prompt_v3", "prompt_v4")
COUNTRIES = ("US", "DE", "SE", "FR", "JP", "BR")
COUNTRY_WEIGHTS = (8, 4, 3, 2, 2, 1)


def tenant_names(count: int) -> list[str]:
    return [TENANT_NAMES[i] if i < len(TENANT_NAMES) else f"tenant-{i + 1}" for i in range(count)]


def rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Call:
    """One generated call: its two events and when its response is due (monotonic)."""

    request: dict[str, Any]
    response: dict[str, Any]
    tenant_id: str
    failed: bool
    response_due: float
    # Evaluations of the call and when each is due (seconds after the response).
    evaluations: list[tuple[float, dict[str, Any]]] = field(default_factory=list)


class Spike(NamedTuple):
    """One tenant's calls failing more often for the first ``seconds`` of the traffic: what
    an alert rule should notice."""

    tenant: str
    seconds: float
    error_share: float


class CallGenerator:
    """Realistic calls from a seeded random source: the same seed, the same calls."""

    def __init__(
        self,
        tenants: int | list[str],
        error_share: float,
        seed: int | None,
        evaluation_delay: float = 60.0,
        spike: Spike | None = None,
    ) -> None:
        self.random = random.Random(seed)
        # Evaluations draw from a source of their own: the calls of a seed stay the same.
        self.judging = random.Random(None if seed is None else f"{seed}/evaluations")
        self.evaluation_delay = evaluation_delay
        self.error_share = error_share
        self.spike = spike
        self.tenants = tenant_names(tenants) if isinstance(tenants, int) else list(tenants)
        # Each tenant calls two of the routes, so the results stay readable.
        self.routes = {tenant: self.random.sample(ROUTES, 2) for tenant in self.tenants}
        self.weights = [model.weight for model in MODELS]

    def call(self, started: datetime, now: float, offset: float = 0.0) -> Call:
        """A call started at ``started``, ``offset`` seconds into the traffic; ``now`` is
        ``time.monotonic()``, when its response becomes due from."""
        rnd = self.random
        tenant = rnd.choice(self.tenants)
        model = rnd.choices(MODELS, self.weights)[0]
        request_id = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        latency = min(model.median_latency_ms * math.exp(rnd.gauss(0.0, 0.6)), MAX_LATENCY_MS)
        prompt_tokens = int(800 * math.exp(rnd.gauss(0.0, 0.8)))
        request: dict[str, Any] = {
            "type": "request",
            "request_id": request_id,
            "tenant_id": tenant,
            "route": rnd.choice(self.routes[tenant]),
            "model": model.name,
            "timestamp": rfc3339(started),
            "prompt_tokens": prompt_tokens,
            "user_id_hash": f"{rnd.getrandbits(64):016x}",
            "metadata": {
                "app_version": "2.3.1",
                "region": rnd.choice(("eu", "us")),
                # What a tenant slices by (dimensions): an A/B test and where users are.
                "experiment": rnd.choice(EXPERIMENTS),
                "country": rnd.choices(COUNTRIES, COUNTRY_WEIGHTS)[0],
            },
        }
        if model.provider is not None:
            request["provider"] = model.provider
        spike = self.spike
        share = self.error_share
        if spike is not None and spike.tenant == tenant and offset < spike.seconds:
            share = spike.error_share
        failed = rnd.random() < share
        response: dict[str, Any] = {
            "type": "response",
            "request_id": request_id,
            "timestamp": rfc3339(started + timedelta(milliseconds=latency)),
            "latency_ms": round(latency, 3),
        }
        if failed:
            response["error"] = rnd.choice(ERRORS)
        else:
            completion = int(200 * math.exp(rnd.gauss(0.0, 0.7)))
            response["completion_tokens"] = completion
            response["finish_reason"] = "stop" if rnd.random() < 0.9 else "length"
            if rnd.random() < CACHE_READ_SHARE:
                response["cache_read_tokens"] = int(prompt_tokens * rnd.uniform(0.2, 0.9))
            if rnd.random() < REASONING_SHARE:
                response["reasoning_tokens"] = int(completion * rnd.uniform(0.1, 0.6))
            if rnd.random() < STREAMING_SHARE:
                response["time_to_first_token_ms"] = round(latency * rnd.uniform(0.1, 0.4), 3)
        call = Call(request, response, tenant, failed, now + latency / 1000.0)
        if not failed:
            self._evaluate(call, started + timedelta(milliseconds=latency))
        return call

    def _evaluate(self, call: Call, answered: datetime) -> None:
        """A judge's score for some answered calls, a user's pass/fail for others."""
        rnd = self.judging
        base = {"type": "evaluation", "request_id": call.request["request_id"], "tenant_id": call.tenant_id}
        quality = MODEL_QUALITY.get(call.request["model"], 0.7)
        if rnd.random() < JUDGED_SHARE:
            delay = rnd.uniform(*JUDGE_DELAY)
            score = min(1.0, max(0.0, rnd.gauss(quality, 0.12)))
            call.evaluations.append(
                (
                    delay,
                    base
                    | {
                        "name": "judge",
                        "evaluator": "llm-judge",
                        "score": round(score, 3),
                        "timestamp": rfc3339(answered + timedelta(seconds=delay)),
                    },
                )
            )
        if rnd.random() < FEEDBACK_SHARE:
            late = rnd.random() < LATE_FEEDBACK_SHARE
            delay = self.evaluation_delay if late else rnd.uniform(*FEEDBACK_DELAY)
            delay = min(delay, self.evaluation_delay)
            call.evaluations.append(
                (
                    delay,
                    base
                    | {
                        "name": "user_feedback",
                        "label": "pass" if rnd.random() < quality else "fail",
                        "timestamp": rfc3339(answered + timedelta(seconds=delay)),
                    },
                )
            )


class SendError(RuntimeError):
    """The ingestion API could not be reached or kept refusing a batch."""


class ApiKeysError(ValueError):
    """The API keys given do not name exactly one key for each tenant sending."""


# One key for every tenant (a single tenant only), one per tenant, or none (AUTH=off).
ApiKeys = dict[str, str] | str | None


def parse_api_keys(values: list[str]) -> ApiKeys:
    """``--api-key`` values: one ``KEY``, or ``TENANT=KEY`` pairs with distinct tenants."""
    if not values:
        return None
    pairs: dict[str, str] = {}
    bare: list[str] = []
    for value in values:
        # A key never holds "=" (its secret is unpadded URL-safe base64); a tenant may.
        tenant, sep, key = value.rpartition("=")
        if not sep:
            bare.append(value)
            continue
        if not tenant:
            raise ApiKeysError("expected TENANT=KEY, but a value starts with '=': the tenant is empty")
        if tenant in pairs:
            raise ApiKeysError(f"tenant {tenant!r} is given two keys")
        pairs[tenant] = _checked_key(key, f"the key of tenant {tenant!r}")
    if bare and pairs:
        raise ApiKeysError("give either one KEY (for a single tenant) or TENANT=KEY pairs, not both")
    if len(bare) > 1:
        raise ApiKeysError(
            f"{len(bare)} bare keys given: one KEY serves a single tenant; give one TENANT=KEY per tenant"
        )
    if bare:
        return _checked_key(bare[0], "the key")
    return pairs


def keys_by_tenant(api_keys: ApiKeys, tenants: list[str]) -> dict[str, str | None]:
    """The key each tenant's events are sent with; refuses a tenant left without one."""
    if api_keys is None:
        return dict.fromkeys(tenants)
    if isinstance(api_keys, str):
        if len(tenants) != 1:
            raise ApiKeysError(
                f"one key serves one tenant, but the traffic has {len(tenants)} "
                f"({', '.join(tenants)}): give --tenants ONE_TENANT, or one TENANT=KEY per tenant"
            )
        return {tenants[0]: _checked_key(api_keys, "the key")}
    missing = [tenant for tenant in tenants if tenant not in api_keys]
    if missing:
        raise ApiKeysError(
            f"no key for tenant{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
            "give one TENANT=KEY per tenant sending"
        )
    return {tenant: _checked_key(api_keys[tenant], f"the key of tenant {tenant!r}") for tenant in tenants}


def _checked_key(key: str, what: str) -> str:
    if key_prefix(key) is None:
        raise ApiKeysError(f"{what} is not an API key: expected sl_<8-character id>_<43-character secret>")
    return key


@dataclass
class Totals:
    calls: int = 0
    failed_calls: int = 0
    events_sent: int = 0
    accepted: int = 0
    rejected: int = 0
    batches: int = 0
    calls_by_tenant: Counter[str] = field(default_factory=Counter)
    evaluations: int = 0
    evaluations_by_tenant: Counter[str] = field(default_factory=Counter)
    first_rejection: str | None = None


class Sender:
    """Posts batches over one keep-alive connection; retries 503s and lost connections."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SendError(f"--url: {url!r} is not an http(s) URL")
        connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.connection = connection(parts.hostname, parts.port, timeout=timeout)
        self.path = parts.path.rstrip("/") + BATCH_PATH
        self.headers = {"Content-Type": "application/json"}
        # How errors name the key: its prefix, never the secret.
        self.key_name = "no API key"
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
            self.key_name = f"the key {key_prefix(api_key) or 'given'}"
        self.url = url

    def post(self, events: list[dict[str, Any]], totals: Totals) -> None:
        body = msgspec.json.encode({"events": events})
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                self.connection.request("POST", self.path, body, self.headers)
                response = self.connection.getresponse()
                status, payload = response.status, response.read()
                retry_after = response.getheader("Retry-After")
            except OSError as error:
                self.connection.close()
                if attempt == SEND_ATTEMPTS:
                    raise SendError(f"cannot reach {self.url}: {error}") from None
                time.sleep(0.2 * attempt)
                continue
            if status == 503 and attempt < SEND_ATTEMPTS:
                time.sleep(min(float(retry_after or 1), 5.0))
                continue
            break
        totals.batches += 1
        totals.events_sent += len(events)
        if status == 202:
            totals.accepted += len(events)
        elif status == 207:
            answer = msgspec.json.decode(payload)
            totals.accepted += answer["accepted"]
            totals.rejected += len(answer["rejected"])
            if totals.first_rejection is None and answer["rejected"]:
                totals.first_rejection = str(answer["rejected"][0])
        else:
            raise SendError(
                f"POST {self.path} with {self.key_name} answered {status}: "
                f"{payload[:300].decode(errors='replace')}"
            )

    def close(self) -> None:
        self.connection.close()


# (seconds since the start, totals so far, calls still waiting for their response)
Progress = Callable[[float, Totals, int], None]


def bar_progress(duration: float) -> Progress:
    """One line redrawn in place on a terminal; a line every 5 s otherwise."""
    interactive = sys.stderr.isatty()
    last = [-math.inf]

    def show(elapsed: float, totals: Totals, open_calls: int) -> None:
        finished = elapsed >= duration and not open_calls
        if not interactive and elapsed - last[0] < 5.0 and not finished:
            return
        last[0] = elapsed
        done = min(elapsed / duration, 1.0) if duration else 1.0
        bar = "#" * int(done * 30)
        line = (
            f"[{bar:<30}] {min(elapsed, duration):5.1f}/{duration:.0f}s  "
            f"calls {totals.calls}  events {totals.events_sent}  "
            f"accepted {totals.accepted}  rejected {totals.rejected}"
        )
        if elapsed >= duration and open_calls:
            line += f"  (waiting for {open_calls} calls to end)"
        print(
            f"\r{line}\x1b[K" if interactive else line,
            end="" if interactive else "\n",
            file=sys.stderr,
            flush=True,
        )

    return show


def run(
    url: str,
    rate: float,
    duration: float,
    tenants: int | list[str] = 3,
    error_share: float = 0.05,
    seed: int | None = None,
    api_keys: ApiKeys = None,
    progress: Progress | None = None,
    evaluation_delay: float = 60.0,
    spike: Spike | None = None,
) -> Totals:
    """Send ``rate`` calls per second for ``duration`` seconds; wait for every response and
    evaluation (the latest ``evaluation_delay`` seconds after its call). A ``spike`` makes
    one tenant's calls fail more often at first.

    ``api_keys``: one key for a single tenant's traffic, a key per tenant, or
    ``None`` when the API runs with ``AUTH=off``. Raises :class:`ApiKeysError`
    before sending anything when a tenant has no key.
    """
    generator = CallGenerator(tenants, error_share, seed, evaluation_delay, spike)
    keys = keys_by_tenant(api_keys, generator.tenants)
    senders_by_key = {key: Sender(url, key) for key in dict.fromkeys(keys.values())}
    sender_of = {tenant: senders_by_key[key] for tenant, key in keys.items()}
    totals = Totals()
    # (due, order, tenant, event): responses and evaluations
    pending: list[tuple[float, int, str, dict[str, Any]]] = []
    order = 0
    held: list[dict[str, Any]] = []  # requests whose response went first
    started = time.monotonic()
    wall_start = datetime.now(UTC)
    try:
        while True:
            now = time.monotonic()
            elapsed = now - started
            # Calls are due by elapsed time, so a slow POST makes the next batch
            # bigger instead of lowering the rate.
            due_calls = min(int(elapsed * rate), int(duration * rate)) - totals.calls
            # Per sender, so that each event goes with its tenant's key; a
            # sender's events keep their order (an early response before its request).
            batches: dict[Sender, list[dict[str, Any]]] = defaultdict(list)
            for request in held:
                batches[sender_of[request["tenant_id"]]].append(request)
            held = []
            for _ in range(due_calls):
                offset = (totals.calls / rate) if rate else 0.0
                call = generator.call(wall_start + timedelta(seconds=offset), now, offset)
                totals.calls += 1
                totals.failed_calls += call.failed
                totals.calls_by_tenant[call.tenant_id] += 1
                if generator.random.random() < EARLY_RESPONSE_SHARE:
                    batches[sender_of[call.tenant_id]].append(call.response)
                    held.append(call.request)
                else:
                    batches[sender_of[call.tenant_id]].append(call.request)
                    order += 1
                    heapq.heappush(pending, (call.response_due, order, call.tenant_id, call.response))
                for delay, evaluation in call.evaluations:
                    order += 1
                    heapq.heappush(pending, (call.response_due + delay, order, call.tenant_id, evaluation))
                    totals.evaluations += 1
                    totals.evaluations_by_tenant[call.tenant_id] += 1
            while pending and pending[0][0] <= now:
                _, _, tenant, response = heapq.heappop(pending)
                batches[sender_of[tenant]].append(response)
            for sender, batch in batches.items():
                for chunk in range(0, len(batch), BATCH_MAX_EVENTS):
                    sender.post(batch[chunk : chunk + BATCH_MAX_EVENTS], totals)
            if progress is not None:
                progress(elapsed, totals, len(pending) + len(held))
            if elapsed >= duration and not pending and not held:
                break
            time.sleep(max(0.0, TICK_SECONDS - (time.monotonic() - now)))
    finally:
        for sender in senders_by_key.values():
            sender.close()
    return totals


def summary(totals: Totals, duration: float, seconds: float) -> str:
    """``duration``: the seconds calls were started in; ``seconds``: until the last response."""
    lines = [
        f"sent {totals.calls} calls ({totals.events_sent} events in {totals.batches} batches): "
        f"{totals.calls / duration:.0f} calls/s for {duration:.0f}s, "
        f"the last response after {seconds:.1f}s",
        f"accepted {totals.accepted} events, rejected {totals.rejected}; "
        f"failed calls {totals.failed_calls} "
        f"({100 * totals.failed_calls / max(totals.calls, 1):.1f} %)",
        "calls per tenant: "
        + ", ".join(f"{tenant} {count}" for tenant, count in sorted(totals.calls_by_tenant.items())),
        f"evaluations {totals.evaluations} (a judge's scores, users' pass/fail)",
    ]
    if totals.first_rejection:
        lines.append(f"first rejection: {totals.first_rejection}")
    return "\n".join(lines)


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1")
    return value


def _tenants(text: str) -> int | list[str]:
    if text.isdigit():
        if not 1 <= int(text) <= 100:
            raise argparse.ArgumentTypeError(f"{text!r} is not from 1 to 100")
        return int(text)
    names = text.split(",")
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of distinct names")
    return names


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not positive")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.traffic",
        description="Generated LLM traffic for the ingestion API, posted in batches.",
    )
    parser.add_argument(
        "--url", default="http://127.0.0.1:8080", help="the ingestion API (default %(default)s)"
    )
    parser.add_argument("--rate", type=_positive, default=50.0, help="calls per second (default %(default)s)")
    parser.add_argument(
        "--duration", type=_positive, default=30.0, help="seconds of traffic (default %(default)s)"
    )
    parser.add_argument(
        "--tenants",
        type=_tenants,
        default=None,
        metavar="N|NAME,...",
        help="how many tenants (1-100; named acme, globex, ...) or their "
        "names, comma-separated (default: the tenants of the TENANT=KEY pairs, else 3)",
    )
    parser.add_argument(
        "--error-share", type=_share, default=0.05, help="share of calls that fail, 0-1 (default %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="random seed, for repeatable traffic (default: random)"
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY|TENANT=KEY",
        help="ingest keys, sent as 'Authorization: Bearer KEY': one KEY for a single "
        "tenant's traffic (--tenants THAT_TENANT), or TENANT=KEY once per tenant "
        "(default: none, for AUTH=off)",
    )
    parser.add_argument(
        "--evaluation-delay",
        type=_positive,
        default=60.0,
        help="seconds after its call that the latest evaluation comes (default %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        api_keys = parse_api_keys(args.api_key)
        tenants = args.tenants
        if tenants is None:
            tenants = list(api_keys) if isinstance(api_keys, dict) else 3
        keys_by_tenant(api_keys, tenant_names(tenants) if isinstance(tenants, int) else tenants)
    except ApiKeysError as error:
        parser.error(f"--api-key: {error}")
    started = time.monotonic()
    try:
        totals = run(
            args.url,
            args.rate,
            args.duration,
            tenants,
            args.error_share,
            args.seed,
            api_keys,
            bar_progress(args.duration),
            args.evaluation_delay,
        )
    except SendError as error:
        print(f"\ntraffic: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ntraffic: interrupted", file=sys.stderr)
        return 130
    if sys.stderr.isatty():
        print(file=sys.stderr)  # ends the progress line
    print(summary(totals, args.duration, time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
