"""Configuration is validated with readable messages; migrations apply once, on both DBs."""

from __future__ import annotations

import pytest

from billing.config import ConfigError, load_settings
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
