"""Rate limits, request ids in logs, metrics, health and readiness."""

from __future__ import annotations

import io
import json
import logging
import os

import peewee
import pytest

from billing.accounts import locked_account
from billing.config import get_settings
from models import database


@pytest.fixture
def limited_client(db):
    """An app with tiny limits (its own in-memory limiter)."""
    from handlers.app import create_app

    settings = get_settings().model_copy(
        update={
            "rate_limit_ip": "5/minute",
            "rate_limit_principal": "3/minute",
            "rate_limit_webhook": "8/minute",
        }
    )
    with create_app(settings).test_client() as client:
        yield client


def test_429_problem_with_retry_after_and_ratelimit_headers(limited_client, org):
    url = f"/v1/billing/{org.id}/credits"
    statuses = [limited_client.get(url, headers=org.owner).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    r = limited_client.get(url, headers=org.owner)
    assert r.status_code == 429
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "TooManyRequests"
    assert 0 < int(r.headers["retry-after"]) <= 60
    assert r.headers["ratelimit-limit"] == "3" and r.headers["ratelimit-remaining"] == "0"
    assert r.json()["requestId"] == r.headers["x-request-id"]


def test_limits_are_per_principal_and_per_ip(limited_client, org):
    url = f"/v1/billing/{org.id}/credits"
    for _ in range(3):
        assert limited_client.get(url, headers=org.owner).status_code == 200
    # Another principal from the same address still has its own budget...
    assert limited_client.get(url, headers=org.admin).status_code == 200
    ok = limited_client.get(url, headers=org.member)
    assert ok.status_code == 200 and ok.headers["ratelimit-remaining"] == "0"
    # ...until the per-IP limit (5) is spent.
    assert limited_client.get(url, headers=org.member).status_code == 429


def test_webhook_has_its_own_higher_limit(limited_client):
    statuses = [
        limited_client.post(
            "/v1/webhooks/stripe",
            content=b"{}",
            headers={"Stripe-Signature": "t=1,v1=x", "Content-Type": "application/json"},
        ).status_code
        for _ in range(9)
    ]
    assert statuses[:8] == [400] * 8 and statuses[8] == 429


def test_logs_are_json_with_request_id_and_no_secrets(client, org):
    configured = logging.getLogger().handlers[0]  # the app's JSON handler
    buffer = io.StringIO()
    copy = logging.StreamHandler(buffer)
    copy.setFormatter(configured.formatter)
    for log_filter in configured.filters:
        copy.addFilter(log_filter)
    logging.getLogger().addHandler(copy)
    try:
        client.get(
            f"/v1/billing/{org.id}/credits", headers={**org.owner, "X-Request-Id": "trace-me-123"}
        )
    finally:
        logging.getLogger().removeHandler(copy)
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    access = [line for line in lines if line.get("logger") == "billing.access"]
    assert access and access[-1]["request_id"] == "trace-me-123"
    assert access[-1]["operation"] == "getCreditBalance" and access[-1]["status"] == 200
    token = org.owner["Authorization"].split()[1]
    assert all(token not in json.dumps(line) for line in lines)


def _samples(client) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_expose_requests_errors_and_ledger(client, org):
    """Counters are process-wide, so this test reads what ITS requests added, not totals
    that earlier tests may have left behind."""
    from billing import ledger

    credits_ok = (
        "billing_http_requests_total",
        frozenset({"method": "GET", "operation": "getCreditBalance", "status": "200"}.items()),
    )
    not_found = ("billing_http_errors_total", frozenset({"status": "404"}.items()))
    adjustments = ("billing_ledger_entries_total", frozenset({"entry_type": "adjustment"}.items()))
    latency = (
        "billing_http_request_duration_seconds_count",
        frozenset({"operation": "getCreditBalance"}.items()),
    )
    before = _samples(client)
    with database.connection_context(), locked_account(org.id) as account:
        ledger.grant(account, 5, "adjustment")
    client.get(f"/v1/billing/{org.id}/credits", headers=org.owner)
    client.get(f"/v1/billing/{org.id}/credits", headers=org.owner)
    client.get(f"/v1/billing/{org.id}/credits", headers=org.outsider)
    after = _samples(client)

    def added(key):
        return after.get(key, 0) - before.get(key, 0)

    assert added(credits_ok) == 2
    assert added(not_found) == 1
    assert added(adjustments) == 1
    assert added(latency) == 3


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_readiness_during_a_database_outage(client, caplog):
    real = database.obj
    database.initialize(
        peewee.PostgresqlDatabase(
            "nowhere", host="127.0.0.1", port=1, user="nobody", connect_timeout=2
        )
    )
    try:
        with caplog.at_level(logging.ERROR):
            r = client.get("/readyz")
        assert r.status_code == 503
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "ServiceUnavailable"
        assert client.get("/healthz").status_code == 200  # alive, just not ready
        # Other operations fail clearly, without internals.
        from tests.conftest import bearer

        r = client.get(
            "/v1/billing/00000000-0000-4000-8000-000000000000/credits", headers=bearer("someone")
        )
        assert r.status_code == 500 and "database" in r.json()["detail"]
        assert "127.0.0.1" not in r.text
    finally:
        database.initialize(real)
    assert client.get("/readyz").status_code == 200


def test_limits_are_shared_through_redis(db, org):
    """Two app instances (as two gunicorn workers or hosts would be) share one budget."""
    import redis

    from handlers.app import create_app

    url = "redis://127.0.0.1:6379/15"
    try:
        redis.Redis.from_url(url).flushdb()
    except redis.ConnectionError:
        if os.environ.get("REQUIRE_REDIS") == "1":
            pytest.fail("Redis is required (REQUIRE_REDIS=1) but not reachable")
        pytest.skip("no Redis on 127.0.0.1:6379")
    settings = get_settings().model_copy(
        update={"redis_url": url, "rate_limit_principal": "4/minute", "rate_limit_ip": "100/minute"}
    )
    first, second = create_app(settings), create_app(settings)
    url_path = f"/v1/billing/{org.id}/credits"
    with first.test_client() as a, second.test_client() as b:
        statuses = [c.get(url_path, headers=org.owner).status_code for c in (a, b, a, b, a)]
    assert statuses == [200, 200, 200, 200, 429]
    redis.Redis.from_url(url).flushdb()
