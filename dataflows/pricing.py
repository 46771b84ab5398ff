"""What a call cost: genai-prices' table, overridden and extended by ``PRICES_FILE``.

Per answered call (docs/counting.md §5)::

    (prompt_tokens - cache_read_tokens) * input + cache_read_tokens * cache_read
        + completion_tokens * output

with each price per token at the request's timestamp. A timed-out call costs
0.0; a model with no known price gives ``None`` (the window counts it as
unpriced and adds nothing).

Looking a model up in genai-prices costs hundreds of microseconds, so each
``(provider, model)`` is resolved once. Most models have one price for all time
and keep it as three floats; a model whose price changes on a date is cached per
UTC day, and one with time-of-day prices per UTC minute (the finest step
genai-prices uses). Tiered prices (a higher rate for every token once the prompt
passes a threshold, as genai-prices applies them) are kept as
:class:`TieredRate`.

When the request names a provider genai-prices does not know, or one that does
not list the model, the model is matched on its name alone, as genai-prices does
when no provider is given.

``PRICES_FILE`` entries are matched on the request's ``model`` exactly, whatever
the provider, and take precedence over genai-prices.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple, final

from genai_prices import data_snapshot
from genai_prices.types import ConditionalPrice, ModelInfo, ModelPrice, TieredPrices, TimeOfDateConstraint

from dataflows.batches import CallBatch
from dataflows.join import Call
from schemas.events import LLMRequest, LLMResponse

PER_MILLION = 1_000_000
MAX_CACHED_MODELS = 10_000
# A dollar a token: anything above is a typo, and could overflow a window's cost.
MAX_PRICE_PER_MTOK = 1_000_000


# Final: ``cost`` tells it from a float with ``type(rate) is TieredRate``.
@final
class TieredRate(NamedTuple):
    """USD per token, by prompt size: ``tiers`` are ``(threshold, rate)``, highest first;
    a prompt of more than ``threshold`` tokens pays that rate for every token."""

    base: float
    tiers: tuple[tuple[int, float], ...]

    def at(self, prompt_tokens: int) -> float:
        for threshold, rate in self.tiers:
            if prompt_tokens > threshold:
                return rate
        return self.base


Rate = float | TieredRate


class Rates(NamedTuple):
    """USD per token for one model at one time."""

    input: Rate
    cache_read: Rate
    output: Rate


class PricesFileError(ValueError):
    """A ``PRICES_FILE`` that cannot be used; the message names the file, model and field."""


# Final: ``PriceBook.rates`` tells it from Rates and None with ``type(resolved) is _TimedModel``.
@final
class _TimedModel:
    """A genai-prices model whose price depends on when the call was made: its
    ``prices`` are the ``conditionals``, not one :class:`ModelPrice`."""

    __slots__ = ("by_slot", "model", "slot_seconds")

    def __init__(self, model: ModelInfo, conditionals: list[ConditionalPrice]) -> None:
        self.model = model
        time_of_day = any(
            isinstance(conditional.constraint, TimeOfDateConstraint) for conditional in conditionals
        )
        self.slot_seconds = 60 if time_of_day else 86_400
        self.by_slot: dict[int, Rates] = {}

    def at(self, timestamp: datetime) -> Rates:
        slot = math.floor(timestamp.timestamp() / self.slot_seconds)
        rates = self.by_slot.get(slot)
        if rates is None:
            if len(self.by_slot) > 10_000:
                self.by_slot.clear()
            moment = datetime.fromtimestamp(slot * self.slot_seconds, UTC)
            rates = self.by_slot[slot] = _rates_of(self.model.get_prices(moment))
        return rates


def _rate(value: Decimal | TieredPrices | None) -> Rate | None:
    if value is None:
        return None
    if isinstance(value, TieredPrices):
        tiers = sorted(value.tiers, key=lambda tier: tier.start, reverse=True)
        return TieredRate(
            float(value.base) / PER_MILLION,
            tuple((tier.start, float(tier.price) / PER_MILLION) for tier in tiers),
        )
    return float(value) / PER_MILLION


def _rates_of(price: ModelPrice) -> Rates:
    input_rate = _rate(price.input_mtok) or 0.0
    cache_read = _rate(price.cache_read_mtok)
    output = _rate(price.output_mtok) or 0.0
    # No cache-read price: cached tokens are billed as input, as genai-prices does.
    return Rates(input_rate, input_rate if cache_read is None else cache_read, output)


_UNKNOWN = object()  # not resolved yet


class PriceBook:
    """Resolves each (provider, model) price once and reuses it."""

    def __init__(self, prices_file: Path | None = None) -> None:
        self._overrides: dict[str, Rates] = {} if prices_file is None else load_prices_file(prices_file)
        # (provider, model) -> constant Rates, a _TimedModel, or None (no known price).
        self._models: dict[tuple[str | None, str], Rates | _TimedModel | None] = {}

    def price(self, call: Call) -> Call:
        """Set ``call.cost_usd``: the per-call formula of docs/counting.md §5; None when the
        model has no known price; 0.0 for a timed-out call."""
        call.cost_usd = self._cost(call.request, call.response)
        return call

    def price_calls(self, calls: CallBatch) -> None:
        """Set ``calls.costs``: :meth:`price` for each call of the batch."""
        cost_of = self._cost
        calls.costs = [
            cost_of(request, response)
            for request, response in zip(calls.requests, calls.responses, strict=True)
        ]

    def _cost(self, request: LLMRequest, response: LLMResponse | None) -> float | None:
        """What a call cost: 0.0 timed out, None when its model has no known price."""
        if response is None:
            return 0.0
        resolved = self._models.get((request.provider, request.model), _UNKNOWN)
        # A price with no time-dependent parts (the usual case) needs no further lookup.
        if type(resolved) is Rates:
            rates: Rates | None = resolved
        else:
            rates = self.rates(request.provider, request.model, request.timestamp)
        if rates is None:
            return None
        return cost(rates, request.prompt_tokens, response.cache_read_tokens, response.completion_tokens)

    def rates(self, provider: str | None, model: str, timestamp: datetime) -> Rates | None:
        """The per-token rates a call to ``model`` made at ``timestamp`` pays; None when
        the model has no known price."""
        try:
            resolved = self._models[(provider, model)]
        except KeyError:
            if len(self._models) >= MAX_CACHED_MODELS:
                # Model names come from clients: never let them grow this without bound.
                self._models.clear()
            resolved = self._models[(provider, model)] = self._resolve(provider, model)
        if type(resolved) is _TimedModel:
            return resolved.at(timestamp)
        return resolved

    def _resolve(self, provider: str | None, model: str) -> Rates | _TimedModel | None:
        override = self._overrides.get(model)
        if override is not None:
            return override
        snapshot = data_snapshot.get_snapshot()
        for provider_id in (provider, None) if provider is not None else (None,):
            try:
                _, info = snapshot.find_provider_model(model, None, provider_id, None)
            except LookupError:
                continue
            if isinstance(info.prices, ModelPrice):
                return _rates_of(info.prices)
            return _TimedModel(info, info.prices)
        return None


def cost(rates: Rates, prompt_tokens: int, cache_read_tokens: int, completion_tokens: int) -> float:
    """USD for one call. Cache reads beyond the prompt are clamped to it (the join
    already does so; this keeps the formula safe on its own)."""
    cached = min(cache_read_tokens, prompt_tokens)
    input_rate, cache_rate, output_rate = rates
    if type(input_rate) is TieredRate:
        input_rate = input_rate.at(prompt_tokens)
    if type(cache_rate) is TieredRate:
        cache_rate = cache_rate.at(prompt_tokens)
    if type(output_rate) is TieredRate:
        output_rate = output_rate.at(prompt_tokens)
    return (prompt_tokens - cached) * input_rate + cached * cache_rate + completion_tokens * output_rate


_FILE_FIELDS = ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok")


def load_prices_file(path: Path) -> dict[str, Rates]:
    """Read ``PRICES_FILE``: ``{"model": {"input_per_mtok": …, "output_per_mtok": …,
    "cache_read_per_mtok": …}}``, USD per million tokens; ``cache_read_per_mtok`` is
    optional and defaults to the input price. Raises :class:`PricesFileError`."""
    try:
        document: Any = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise PricesFileError(f"PRICES_FILE {path}: cannot read it: {error.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PricesFileError(f"PRICES_FILE {path}: not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise PricesFileError(
            f"PRICES_FILE {path}: expected a JSON object of models, got {type(document).__name__}"
        )
    prices: dict[str, Rates] = {}
    for model, entry in document.items():
        where = f"PRICES_FILE {path}: model {model!r}"
        if not model:
            raise PricesFileError(f"{where}: the model name is empty")
        if not isinstance(entry, dict):
            raise PricesFileError(
                f"{where}: expected an object with {', '.join(_FILE_FIELDS)}, got {type(entry).__name__}"
            )
        unknown = sorted(set(entry) - set(_FILE_FIELDS))
        if unknown:
            raise PricesFileError(
                f"{where}: unknown field {unknown[0]!r} (expected {', '.join(_FILE_FIELDS)})"
            )
        values: dict[str, float] = {}
        for field in _FILE_FIELDS:
            if field not in entry:
                if field == "cache_read_per_mtok":
                    continue
                raise PricesFileError(f"{where}: field {field!r} is missing")
            value = entry[field]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 <= value <= MAX_PRICE_PER_MTOK  # also rejects NaN and infinity
            ):
                raise PricesFileError(
                    f"{where}: field {field!r} must be a number from 0 to {MAX_PRICE_PER_MTOK:,} "
                    f"(USD per million tokens), got {value!r}"
                )
            values[field] = float(value) / PER_MILLION
        input_rate = values["input_per_mtok"]
        prices[model] = Rates(
            input_rate, values.get("cache_read_per_mtok", input_rate), values["output_per_mtok"]
        )
    return prices
