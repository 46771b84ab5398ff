"""The query API's OpenAPI document against the checks it describes: every limit it shows
accepts and refuses what the API's own parsing does, on texts chosen here, each with its
expected verdict computed here from the rule in words (such as "1-128 characters, no
control character"), not from the limits of :mod:`schemas`.

No server, no database: the document is made at start-up from types alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import openapi_spec_validator
import pytest

from api import usage
from api.evaluations import EVALUATION_PARAMETERS, parse_evaluation_query
from api.params import PARAMETERS, InvalidParameter, parse_query
from api.query import openapi_document
from api.tenants import valid_tenant

DOCUMENT = openapi_document()
PATHS = DOCUMENT["paths"]


def parameter(path: str, name: str, method: str = "get") -> dict[str, Any]:
    (found,) = [p for p in PATHS[path][method]["parameters"] if p["name"] == name]
    return found


def documented(schema: dict[str, Any], text: str) -> bool:
    """Whether JSON Schema's string keywords in ``schema`` allow ``text`` (lengths in code points,
    ``pattern`` searched anywhere in the text)."""
    return (
        schema.get("minLength", 0) <= len(text) <= schema.get("maxLength", math.inf)
        and re.search(schema.get("pattern", ""), text) is not None
    )


def parsed(parse: Callable[[dict[str, list[str]]], object], params: dict[str, list[str]]) -> bool:
    try:
        parse(params)
    except InvalidParameter:
        return False
    return True


def has_control(text: str) -> bool:
    return any(ord(char) < 0x20 or ord(char) == 0x7F for char in text)


# Texts around every rule: lengths at and past the limits, control characters anywhere
# (a newline last among them: Python's ``$`` would let that one through), NUL, and text
# that is neither ASCII nor control.
TEXTS = [
    "",
    "a",
    "acme",
    " ",
    "café-東京",
    "a b/c",
    "a\nb",
    "acme\n",
    "\nacme",
    "a\tb",
    "a\x00",
    "\x00",
    "a\x1f",
    "a\x7f",
    "a\x85",
    "acmeZ",
    *("x" * n for n in (63, 64, 65, 127, 128, 129, 254, 255, 256)),
]


def cases(allowed: Callable[[str], bool]) -> list[tuple[str, bool]]:
    return [(text, allowed(text)) for text in TEXTS]


@pytest.mark.parametrize(("text", "expected"), cases(lambda t: 1 <= len(t) <= 128 and not has_control(t)))
def test_tenant_id_limits_are_those_of_the_queries(text: str, expected: bool) -> None:
    for path in ("/v1/metrics", "/v1/evaluations"):
        assert documented(parameter(path, "tenant_id")["schema"], text) is expected, path
    assert parsed(parse_query, {"tenant_id": [text]}) is expected
    # The endpoints whose tenant is the key's unless given, and the tenant in a path.
    assert valid_tenant(text) is expected
    for path in ("/v1/usage", "/v1/alerts", "/v1/alerts/rules"):
        assert documented(parameter(path, "tenant_id")["schema"], text) is expected, path
    tenant_path = parameter("/v1/tenants/{tenant_id}/dimensions", "tenant_id")
    assert tenant_path["in"] == "path"
    assert documented(tenant_path["schema"], text) is expected


@pytest.mark.parametrize(("text", "expected"), cases(lambda t: 1 <= len(t) <= 255 and "\x00" not in t))
@pytest.mark.parametrize("name", ["route", "model"])
def test_route_and_model_limits_are_those_of_the_queries(name: str, text: str, expected: bool) -> None:
    assert documented(parameter("/v1/metrics", name)["schema"], text) is expected
    assert parsed(parse_query, {"tenant_id": ["acme"], name: [text]}) is expected


@pytest.mark.parametrize(("text", "expected"), cases(lambda t: len(t) <= 128 and not has_control(t)))
def test_value_limits_are_those_of_the_queries(text: str, expected: bool) -> None:
    # Empty is allowed: the calls without a value.
    assert documented(parameter("/v1/metrics", "value")["schema"], text) is expected
    params = {"tenant_id": ["acme"], "dimension": ["provider"], "value": [text]}
    assert parsed(parse_query, params) is expected


@pytest.mark.parametrize(("text", "expected"), cases(lambda t: 1 <= len(t) <= 64 and not has_control(t)))
def test_evaluation_name_limits_are_those_of_the_queries(text: str, expected: bool) -> None:
    assert documented(parameter("/v1/evaluations", "name")["schema"], text) is expected
    assert parsed(parse_evaluation_query, {"tenant_id": ["acme"], "name": [text]}) is expected


def test_dimension_length_is_that_of_a_metadata_key() -> None:
    schema = parameter("/v1/metrics", "dimension")["schema"]
    for key_length, expected in ((1, True), (128, True), (129, False)):
        name = "metadata." + "k" * key_length
        assert documented(schema, name) is expected
        assert parsed(parse_query, {"tenant_id": ["acme"], "dimension": [name]}) is expected
    for name in ("provider", "finish_reason", "user"):
        assert documented(schema, name)


def test_limit_bounds_and_buckets_are_those_of_the_queries() -> None:
    limit = parameter("/v1/metrics", "limit")["schema"]
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, 1000, 60)
    for number in (0, 1, 60, 1000, 1001):
        expected = limit["minimum"] <= number <= limit["maximum"]
        assert parsed(parse_query, {"tenant_id": ["acme"], "limit": [str(number)]}) is expected
    buckets = parameter("/v1/metrics", "bucket")["schema"]["enum"]
    assert buckets == ["1m", "5m", "15m", "1h", "1d"]
    for bucket in [*buckets, "2m", "1M", ""]:
        assert parsed(parse_query, {"tenant_id": ["acme"], "bucket": [bucket]}) is (bucket in buckets)


def test_the_parameters_are_those_the_endpoints_take() -> None:
    names = {path: [p["name"] for p in PATHS[path]["get"].get("parameters", [])] for path in PATHS}
    assert names["/v1/metrics"] == list(PARAMETERS)
    assert names["/v1/evaluations"] == list(EVALUATION_PARAMETERS) == [*PARAMETERS, "name"]
    assert names["/v1/usage"] == list(usage.PARAMETERS) == ["tenant_id", "from", "to"]
    assert names["/v1/alerts"] == ["tenant_id", "recent"]
    required = {p["name"] for p in PATHS["/v1/metrics"]["get"]["parameters"] if p["required"]}
    assert required == {"tenant_id"}
    assert all(p["description"] for p in PATHS["/v1/metrics"]["get"]["parameters"])


def patterns(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("pattern"), str):
            yield node["pattern"]
        for value in node.values():
            yield from patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from patterns(value)


def test_patterns_mean_the_same_to_json_schema_clients() -> None:
    # JSON Schema's patterns are ECMAScript's: no \Z or \A there, and Python's $ also
    # matches before a final newline, so neither may end a pattern.
    found = set(patterns(DOCUMENT))
    assert found
    for pattern in found:
        assert not re.search(r"\\[AZz]|\$", pattern), pattern


def refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def test_every_reference_has_its_component() -> None:
    schemas = DOCUMENT["components"]["schemas"]
    for ref in set(refs(DOCUMENT)):
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    error = schemas["Error"]
    assert set(error["required"]) == set(error["properties"]) == {"error", "detail"}


def test_the_document_is_valid_openapi_3_1() -> None:
    openapi_spec_validator.validate(DOCUMENT)
