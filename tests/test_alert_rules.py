"""Alert rules through the query API (docs/alerts.md): a ``manage`` key of the rule's tenant, every
field checked, secrets never answered, webhooks to non-public addresses refused; a real
Postgres and the API under uvicorn."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from api.keys import create_key
from api.query import create_app
from schemas.config import Settings
from schemas.webhooks import parse_allow
from tests.support.servers import serving

PATH = "/v1/alerts/rules"
PUBLIC_HOOK = "https://93.184.215.14/hooks/streamlens"  # an address: no resolver needed
SECRET = "s3cret-that-signs-every-delivery"


class Keys:
    def __init__(self, conn: psycopg.Connection) -> None:
        self.acme_manage = create_key(conn, "acme", "manage").key
        self.acme_read = create_key(conn, "acme", "read").key
        self.globex_manage = create_key(conn, "globex", "manage").key


@pytest.fixture
def keys(postgres_dsn: str) -> Keys:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        return Keys(conn)


def _client(dsn: str, **settings: Any) -> Any:
    return serving(create_app(Settings(postgres_dsn=dsn, window_seconds=60, **settings)), "the query API")


@pytest.fixture
def client(postgres_dsn: str) -> Iterator[httpx.Client]:
    with _client(postgres_dsn) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def rule(**fields: Any) -> dict[str, Any]:
    """An error-rate rule of acme's over 5 minutes, with ``fields`` changed."""
    base: dict[str, Any] = {
        "tenant_id": "acme",
        "name": "errors on /chat",
        "metric": "error_rate",
        "route": "/chat",
        "span_seconds": 300,
        "op": ">",
        "threshold": 0.05,
        "for_windows": 2,
        "min_calls": 20,
        "webhook_url": PUBLIC_HOOK,
        "webhook_secret": SECRET,
    }
    base.update(fields)
    return {name: value for name, value in base.items() if value is not ...}


def test_a_manage_key_creates_reads_changes_and_deletes_its_rules(client: httpx.Client, keys: Keys) -> None:
    created = client.post(PATH, json=rule(), headers=bearer(keys.acme_manage))
    assert created.status_code == 201, created.text
    body = created.json()
    assert SECRET not in created.text and "webhook_secret" not in body
    assert body["webhook_secret_set"] is True
    assert {
        name: body[name] for name in ("metric", "route", "span_seconds", "op", "threshold", "for_windows")
    } == {
        "metric": "error_rate",
        "route": "/chat",
        "span_seconds": 300,
        "op": ">",
        "threshold": 0.05,
        "for_windows": 2,
    }
    assert body["model"] is None and body["period"] is None and body["repeat_seconds"] is None
    budget = client.post(
        PATH,
        json=rule(
            name="monthly spend",
            metric="estimated_cost_usd",
            route=...,
            span_seconds=...,
            period="month",
            op=">=",
            threshold=500,
            for_windows=...,
            webhook_secret=...,
        ),
        headers=bearer(keys.acme_manage),
    )
    assert budget.status_code == 201, budget.text
    assert budget.json()["webhook_secret_set"] is False

    listed = client.get(PATH, headers=bearer(keys.acme_manage))
    assert listed.status_code == 200
    assert [r["id"] for r in listed.json()["rules"]] == [body["id"], budget.json()["id"]]
    assert SECRET not in listed.text
    one = client.get(f"{PATH}/{body['id']}", headers=bearer(keys.acme_manage))
    assert one.json() == body

    changed = client.patch(
        f"{PATH}/{body['id']}", json={"threshold": 0.1, "model": "gpt-4o"}, headers=bearer(keys.acme_manage)
    )
    assert changed.status_code == 200, changed.text
    after = changed.json()
    assert (after["threshold"], after["model"], after["route"], after["webhook_secret_set"]) == (
        0.1,
        "gpt-4o",
        "/chat",
        True,
    )
    assert after["updated_at"] >= body["updated_at"] and after["created_at"] == body["created_at"]
    cleared = client.patch(
        f"{PATH}/{body['id']}", json={"webhook_secret": None}, headers=bearer(keys.acme_manage)
    )
    assert cleared.json()["webhook_secret_set"] is False

    assert client.delete(f"{PATH}/{body['id']}", headers=bearer(keys.acme_manage)).status_code == 204
    assert client.get(f"{PATH}/{body['id']}", headers=bearer(keys.acme_manage)).status_code == 404
    assert client.delete(f"{PATH}/{body['id']}", headers=bearer(keys.acme_manage)).status_code == 404
    assert [r["id"] for r in client.get(PATH, headers=bearer(keys.acme_manage)).json()["rules"]] == [
        budget.json()["id"]
    ]


def test_tenants_never_see_or_touch_each_others_rules(client: httpx.Client, keys: Keys) -> None:
    theirs = client.post(PATH, json=rule(tenant_id="globex"), headers=bearer(keys.acme_manage))
    assert theirs.status_code == 403 and theirs.json()["error"] == "forbidden"
    ours = client.post(PATH, json=rule(), headers=bearer(keys.acme_manage)).json()
    for answer in (
        client.get(f"{PATH}/{ours['id']}", headers=bearer(keys.globex_manage)),
        client.patch(f"{PATH}/{ours['id']}", json={"threshold": 1}, headers=bearer(keys.globex_manage)),
        client.delete(f"{PATH}/{ours['id']}", headers=bearer(keys.globex_manage)),
    ):
        assert answer.status_code == 404, answer.text  # not told apart from a rule that does not exist
    assert (
        client.get(PATH, params={"tenant_id": "acme"}, headers=bearer(keys.globex_manage)).status_code == 403
    )
    assert client.get(PATH, headers=bearer(keys.globex_manage)).json() == {"rules": [], "count": 0}
    # Rules are managed: a read key may not even list them.
    assert client.get(PATH, headers=bearer(keys.acme_read)).status_code == 403
    assert client.post(PATH, json=rule(), headers=bearer(keys.acme_read)).status_code == 403
    assert client.get(PATH, headers=bearer(keys.acme_manage)).json()["count"] == 1


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"metric": "latency"}, "$.metric"),
        ({"metric": "score_avg:"}, "$.metric"),
        ({"op": "=="}, "$.op"),
        ({"threshold": "high"}, "$.threshold"),
        ({"span_seconds": 90}, "$.span_seconds"),  # not a multiple of the 60 s window
        ({"span_seconds": 30}, "$.span_seconds"),
        ({"span_seconds": 172_800}, "$.span_seconds"),
        ({"period": "week", "span_seconds": ...}, "$.period"),
        ({"period": "day"}, "$.span_seconds"),  # both
        ({"span_seconds": ...}, "$.span_seconds"),  # neither
        ({"period": "month", "span_seconds": ...}, "$.metric"),  # a budget of a rate
        ({"metric": "calls", "period": "day", "span_seconds": ..., "op": "<"}, "$.op"),
        ({"for_windows": 0}, "$.for_windows"),
        ({"min_calls": -1}, "$.min_calls"),
        ({"repeat_seconds": 5}, "$.repeat_seconds"),
        ({"dimension": "colour", "value": "red"}, "$.dimension"),
        ({"dimension": "metadata.country"}, "$.value"),
        ({"value": "SE"}, "$.value"),
        ({"name": ""}, "$.name"),
        ({"webhook_url": "ftp://example.com/x"}, "$.webhook_url"),
        ({"webhook_url": "https://user:pw@93.184.215.14/x"}, "$.webhook_url"),
        ({"webhook_secret": "short"}, "$.webhook_secret"),
        ({"colour": "red"}, "colour"),
        ({"tenant_id": ...}, "tenant_id"),
    ],
)
def test_bad_rules_are_refused_naming_the_field(
    client: httpx.Client, keys: Keys, fields: dict[str, Any], named: str
) -> None:
    answer = client.post(PATH, json=rule(**fields), headers=bearer(keys.acme_manage))
    assert answer.status_code == 400, answer.text
    assert named in answer.json()["detail"], answer.json()


def test_a_change_is_checked_with_the_rest_of_the_rule(client: httpx.Client, keys: Keys) -> None:
    made = client.post(PATH, json=rule(), headers=bearer(keys.acme_manage)).json()
    for change, named in (
        ({"period": "day"}, "$.span_seconds"),
        ({"tenant_id": "globex"}, "$.tenant_id"),
        ({"webhook_url": "http://169.254.169.254/latest/meta-data"}, "$.webhook_url"),
    ):
        answer = client.patch(f"{PATH}/{made['id']}", json=change, headers=bearer(keys.acme_manage))
        assert answer.status_code == 400 and named in answer.json()["detail"], answer.text
    unchanged = client.get(f"{PATH}/{made['id']}", headers=bearer(keys.acme_manage)).json()
    assert unchanged == made


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000/hook",
        "http://localhost/hook",
        "http://169.254.169.254/latest/meta-data/",  # a cloud's metadata service
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://100.100.100.200/",  # another metadata service, in the shared range
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",  # loopback, written as IPv6
        "http://[fd00:ec2::254]/",  # AWS's IPv6 metadata address
        "http://0.0.0.0/",
    ],
)
def test_webhooks_to_non_public_addresses_are_refused(client: httpx.Client, keys: Keys, url: str) -> None:
    answer = client.post(PATH, json=rule(webhook_url=url), headers=bearer(keys.acme_manage))
    assert answer.status_code == 400, answer.text
    detail = answer.json()["detail"]
    assert "$.webhook_url" in detail and "public addresses only" in detail, detail


def test_alert_webhook_allow_lets_listed_networks_through(postgres_dsn: str, keys: Keys) -> None:
    allow = parse_allow("127.0.0.0/8, ::1")
    with (
        _client(postgres_dsn, alert_webhook_allow=allow) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        for hook in ("http://127.0.0.1:9000/hook", "http://localhost:9000/hook"):
            answer = client.post(PATH, json=rule(webhook_url=hook), headers=bearer(keys.acme_manage))
            assert answer.status_code == 201, answer.text
        refused = client.post(
            PATH, json=rule(webhook_url="http://10.0.0.1/"), headers=bearer(keys.acme_manage)
        )
        assert refused.status_code == 400


def test_the_openapi_document_describes_the_rules(client: httpx.Client, keys: Keys) -> None:
    document = client.get("/openapi.json", headers=bearer(keys.acme_read)).json()
    assert set(document["paths"]["/v1/alerts/rules"]) == {"get", "post"}
    assert set(document["paths"]["/v1/alerts/rules/{rule_id}"]) == {"get", "patch", "delete"}
    body = document["components"]["schemas"]["RuleBody"]["properties"]
    assert body["span_seconds"]["anyOf"][0] == {"type": "integer", "minimum": 60, "maximum": 86400}
    assert "webhook_secret" not in document["components"]["schemas"]["AlertRule"]["properties"]
