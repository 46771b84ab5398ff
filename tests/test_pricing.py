"""Cost per call: genai-prices, overridden and extended by PRICES_FILE."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from genai_prices import Usage, calc_price, data_snapshot
from genai_prices.types import ModelInfo, Provider

from dataflows import pricing
from dataflows.join import Call, SourceRef
from dataflows.pricing import PriceBook, PricesFileError, load_prices_file
from schemas.events import LLMRequest, LLMResponse

WHEN = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
SOURCE = SourceRef("llm.responses", 0, 0)


def call(
    model: str,
    prompt: int,
    cached: int,
    completion: int,
    *,
    provider: str | None = None,
    when: datetime = WHEN,
    answered: bool = True,
) -> Call:
    request = LLMRequest(
        request_id="r",
        tenant_id="t",
        route="/",
        model=model,
        timestamp=when,
        prompt_tokens=prompt,
        provider=provider,
    )
    response = (
        LLMResponse(request_id="r", timestamp=when, completion_tokens=completion, cache_read_tokens=cached)
        if answered
        else None
    )
    return Call(request=request, response=response, source=SOURCE)


def cost_of(priced: Call) -> float:
    """``priced.cost_usd``, which a call to a model with a known price has."""
    assert priced.cost_usd is not None, priced
    return priced.cost_usd


def prices_file(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def genai_cost(
    model: str,
    prompt: int,
    cached: int,
    completion: int,
    *,
    provider: str | None = None,
    when: datetime = WHEN,
) -> float:
    """genai-prices' own answer; its input tokens include the cached ones."""
    result = calc_price(
        Usage(input_tokens=prompt, cache_read_tokens=cached, output_tokens=completion),
        model,
        provider_id=provider,
        genai_request_timestamp=when,
    )
    return float(result.total_price)


def test_prices_file_cost_matches_the_hand_computed_formula(tmp_path: Path) -> None:
    book = PriceBook(
        prices_file(
            tmp_path,
            {
                "house-7b": {"input_per_mtok": 0.4, "output_per_mtok": 1.6, "cache_read_per_mtok": 0.1},
                "house-70b": {"input_per_mtok": 3, "output_per_mtok": 9},
            },
        )
    )
    # (1000 - 200) × 0.4 + 200 × 0.1 + 300 × 1.6 = 320 + 20 + 480 = 820 per million
    assert math.isclose(
        cost_of(book.price(call("house-7b", 1000, 200, 300))),
        820 / 1e6,
        rel_tol=1e-12,
    )
    # No cache-read price: cached tokens at the input price. 1000 × 3 + 10 × 9 = 3090
    assert math.isclose(
        cost_of(book.price(call("house-70b", 1000, 400, 10))),
        3090 / 1e6,
        rel_tol=1e-12,
    )


def test_prices_file_overrides_genai_prices(tmp_path: Path) -> None:
    book = PriceBook(
        prices_file(
            tmp_path,
            {
                "gpt-4o": {"input_per_mtok": 1, "output_per_mtok": 2, "cache_read_per_mtok": 0.5},
            },
        )
    )
    # 900 × 1 + 100 × 0.5 + 50 × 2 = 1050
    assert math.isclose(
        cost_of(book.price(call("gpt-4o", 1000, 100, 50, provider="openai"))),
        1050 / 1e6,
        rel_tol=1e-12,
    )


def test_gpt_4o_cost_matches_genai_prices_calc_price() -> None:
    book = PriceBook()
    for prompt, cached, completion in ((1000, 200, 300), (12345, 0, 678), (50, 50, 0)):
        for provider in ("openai", None):
            priced = book.price(call("gpt-4o", prompt, cached, completion, provider=provider))
            expected = genai_cost("gpt-4o", prompt, cached, completion, provider=provider)
            assert math.isclose(cost_of(priced), expected, rel_tol=1e-9), (prompt, cached)


def test_tiered_prices_match_genai_prices_above_and_below_the_threshold() -> None:
    book = PriceBook()
    for prompt in (199_000, 200_000, 250_000):
        priced = book.price(call("claude-sonnet-4-5", prompt, 1000, 2000, provider="anthropic"))
        expected = genai_cost("claude-sonnet-4-5", prompt, 1000, 2000, provider="anthropic")
        assert math.isclose(cost_of(priced), expected, rel_tol=1e-9), prompt


def test_time_of_day_prices_match_genai_prices_through_the_day() -> None:
    book = PriceBook()
    costs = set()
    for hour, minute in ((0, 0), (0, 29), (0, 30), (12, 0), (16, 29), (16, 30), (23, 59)):
        when = datetime(2026, 1, 15, hour, minute, 30, tzinfo=UTC)
        priced = book.price(call("deepseek-chat", 10_000, 2_000, 1_000, provider="deepseek", when=when))
        expected = genai_cost("deepseek-chat", 10_000, 2_000, 1_000, provider="deepseek", when=when)
        assert math.isclose(cost_of(priced), expected, rel_tol=1e-9), when
        costs.add(round(expected, 12))
    assert len(costs) == 2  # the price really does change with the time of day


def test_each_model_is_resolved_once(monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = data_snapshot.get_snapshot()
    lookups: list[str] = []
    original = snapshot.find_provider_model

    def counting(
        model_ref: str, provider: Provider | None, provider_id: str | None, provider_api_url: str | None
    ) -> tuple[Provider, ModelInfo]:
        lookups.append(model_ref)
        return original(model_ref, provider, provider_id, provider_api_url)

    monkeypatch.setattr(snapshot, "find_provider_model", counting)
    book = PriceBook()
    for _ in range(100):
        book.price(call("gpt-4o", 10, 0, 10, provider="openai"))
        book.price(call("no-such-model-anywhere", 10, 0, 10))
    assert lookups == ["gpt-4o", "no-such-model-anywhere"]


def test_unknown_model_is_unpriced_and_a_timeout_costs_nothing() -> None:
    book = PriceBook()
    assert book.price(call("no-such-model-anywhere", 100, 0, 10)).cost_usd is None
    assert book.price(call("gpt-4o", 100, 0, 10, answered=False)).cost_usd == 0.0
    assert book.price(call("no-such-model-anywhere", 100, 0, 10, answered=False)).cost_usd == 0.0


def test_an_unknown_provider_falls_back_to_the_model_name() -> None:
    book = PriceBook()
    priced = book.price(call("gpt-4o", 1000, 0, 100, provider="our-gateway"))
    assert math.isclose(cost_of(priced), genai_cost("gpt-4o", 1000, 0, 100), rel_tol=1e-9)


def test_cache_reads_beyond_the_prompt_are_priced_as_the_prompt() -> None:
    book = PriceBook()
    over = cost_of(book.price(call("gpt-4o", 100, 500, 10)))
    assert over == book.price(call("gpt-4o", 100, 100, 10)).cost_usd
    # 100 × 1.25 + 10 × 10 per million
    assert math.isclose(over, (100 * 1.25 + 10 * 10) / 1e6, rel_tol=1e-9)


def test_genai_prices_decimal_rates_are_what_the_book_uses() -> None:
    book = PriceBook()
    rates = book.rates("openai", "gpt-4o", WHEN)
    assert rates is not None
    model_price = calc_price(
        Usage(input_tokens=1), "gpt-4o", provider_id="openai", genai_request_timestamp=WHEN
    ).model_price
    assert rates.input == float(model_price.input_mtok) / 1e6
    assert rates.cache_read == float(model_price.cache_read_mtok) / 1e6
    assert rates.output == float(model_price.output_mtok) / 1e6
    assert isinstance(model_price.input_mtok, Decimal)


@pytest.mark.parametrize(
    ("content", "names"),
    [
        ("{not json", ["not valid JSON"]),
        ([{"input_per_mtok": 1}], ["expected a JSON object of models", "list"]),
        ({"m1": [1, 2]}, ["model 'm1'", "expected an object"]),
        ({"m1": {"input_per_mtok": -0.4, "output_per_mtok": 1}}, ["model 'm1'", "'input_per_mtok'", "-0.4"]),
        ({"m1": {"input_per_mtok": 1, "output_per_mtok": "2"}}, ["model 'm1'", "'output_per_mtok'"]),
        ({"m1": {"input_per_mtok": 1, "output_per_mtok": True}}, ["model 'm1'", "'output_per_mtok'"]),
        ({"m1": {"input_per_mtok": 1}}, ["model 'm1'", "'output_per_mtok' is missing"]),
        (
            {"m1": {"input_per_mtok": 1, "output_per_mtok": 1, "cache_read_per_mtok": -1}},
            ["model 'm1'", "'cache_read_per_mtok'"],
        ),
        (
            {"m1": {"input_per_mtok": 1, "output_per_mtok": 1, "input_per_mtoken": 1}},
            ["model 'm1'", "unknown field 'input_per_mtoken'"],
        ),
        ('{"m1": {"input_per_mtok": NaN, "output_per_mtok": 1}}', ["model 'm1'", "'input_per_mtok'"]),
        ('{"m1": {"input_per_mtok": 1, "output_per_mtok": Infinity}}', ["model 'm1'", "'output_per_mtok'"]),
        ({"m1": {"input_per_mtok": 2e6, "output_per_mtok": 1}}, ["model 'm1'", "from 0 to 1,000,000"]),
    ],
)
def test_a_bad_prices_file_names_the_file_model_and_field(
    tmp_path: Path, content: object, names: list[str]
) -> None:
    path = prices_file(tmp_path, content)
    with pytest.raises(PricesFileError) as caught:
        PriceBook(path)
    message = str(caught.value)
    assert str(path) in message
    for name in names:
        assert name in message, message


def test_a_missing_prices_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(PricesFileError, match=r"missing\.json"):
        load_prices_file(tmp_path / "missing.json")


def test_the_price_cache_stays_bounded_with_made_up_model_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pricing, "MAX_CACHED_MODELS", 50)
    book = PriceBook()
    for index in range(120):
        assert book.price(call(f"made-up-{index}", 10, 0, 10)).cost_usd is None
        assert len(vars(book)["_models"]) <= 50
    assert book.price(call("gpt-4o", 1000, 0, 100)).cost_usd == pytest.approx(
        genai_cost("gpt-4o", 1000, 0, 100)
    )
