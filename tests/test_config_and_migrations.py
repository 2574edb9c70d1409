"""Configuration is validated with readable messages; migrations apply once, on both DBs."""

from __future__ import annotations

import pytest
import stripe._http_client

from billing.config import STRIPE_MAX_RETRY_DELAY, ConfigError, load_settings
from models import ALL_MODELS, database
from models.migrate import applied_migrations, available_migrations, migrate


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"JWT_SECRET": "short"}, "JWT_SECRET"),
        ({"DB_POOL_SIZE": "zero"}, "DB_POOL_SIZE"),
        ({"STRIPE_SECRET_KEY": "sk_test_x"}, "STRIPE_WEBHOOK_SECRET"),
        ({"JWT_ALGORITHM": "none"}, "JWT_ALGORITHM"),
    ],
)
def test_bad_configuration_names_the_variable(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert message in str(info.value)


@pytest.mark.parametrize("lease", ["AUTO_RECHARGE_LEASE_SECONDS", "IDEMPOTENCY_LEASE_SECONDS"])
def test_a_lease_must_outlast_the_longest_stripe_call(monkeypatch, lease):
    """A claim held across a Stripe call must not lapse mid-call (another worker would take it
    over while the first still waits on Stripe): 20s x (2 + 1) tries + 5s x 2 sleeps = 70s."""
    monkeypatch.setenv("STRIPE_TIMEOUT_SECONDS", "20")
    monkeypatch.setenv("STRIPE_MAX_RETRIES", "2")
    monkeypatch.setenv(lease, "70")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert lease in str(info.value) and "70s" in str(info.value)
    monkeypatch.setenv(lease, "71")
    assert getattr(load_settings(), lease.lower()) == 71
    assert STRIPE_MAX_RETRY_DELAY == stripe._http_client.HTTPClient.MAX_DELAY


def test_secrets_do_not_print(monkeypatch):
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_test_supersecret")
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "whsec_supersecret")
    settings = load_settings()
    assert "supersecret" not in repr(settings) and "supersecret" not in str(settings)


def test_migrations_are_recorded_and_rerun_is_a_no_op(db):
    assert migrate(db) == []
    with database.connection_context():
        assert applied_migrations(db) == {v for v, _ in available_migrations()}


def test_models_match_the_migrated_schema(db):
    with database.connection_context():
        for model in ALL_MODELS:
            table = model._meta.table_name
            columns = {c.name for c in db.get_columns(table)}
            fields = {f.column_name for f in model._meta.sorted_fields}
            assert fields == columns, table
