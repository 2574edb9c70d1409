"""Shared fixtures: one migrated database per run (SQLite file, or PostgreSQL when
TEST_DATABASE_URL says so), emptied between tests, and the HTTP app with response validation on.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

_tmp = tempfile.mkdtemp(prefix="billing-tests-")
os.environ["DATABASE_URL"] = os.environ.get(
    "TEST_DATABASE_URL", f"sqlite:///{_tmp}/billing.sqlite3"
)
os.environ["RESPONSE_VALIDATION"] = "true"
os.environ["AUTO_RECHARGE_IN_PROCESS"] = "false"  # tests drain the outbox themselves
os.environ["DB_POOL_SIZE"] = "40"  # the concurrency tests run 16 threads with a connection each
os.environ["JWT_SECRET"] = "test-secret-that-is-long-enough-for-hs256-0001"
os.environ["SERVICE_TOKEN"] = "test-service-token-0123456789abcdef"
for name in ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "STRIPE_API_BASE"):
    os.environ.pop(name, None)

from billing.auth import mint_user_token  # noqa: E402
from billing.config import get_settings  # noqa: E402
from billing.organizations import add_member, create_organization  # noqa: E402
from models import ALL_MODELS, connect_database, database, is_postgres  # noqa: E402
from models.migrate import migrate  # noqa: E402

SERVICE_HEADERS = {"X-Service-Token": os.environ["SERVICE_TOKEN"]}


@pytest.fixture(scope="session")
def db():
    get_settings.cache_clear()
    settings = get_settings()
    database_obj = connect_database(settings.database_url, settings.db_pool_size)
    if is_postgres():
        with database_obj.connection_context():
            database_obj.execute_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    migrate(database_obj)
    return database_obj


def _truncate() -> None:
    with database.connection_context():
        tables = [m._meta.table_name for m in reversed(ALL_MODELS)]
        if is_postgres():
            database.execute_sql(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
        else:
            for table in tables:
                database.execute_sql(f"DELETE FROM {table}")


@pytest.fixture(autouse=True)
def clean_db(db) -> Iterator[None]:
    _truncate()
    yield


@pytest.fixture
def conn(db) -> Iterator[None]:
    """A connection held by the test thread, for service-level tests."""
    with database.connection_context():
        yield


@pytest.fixture(scope="session")
def app(db):
    from handlers.app import create_app

    return create_app(get_settings())


@pytest.fixture
def client(app):
    with app.test_client() as test_client:
        yield test_client


def token_for(user_id: str, email: str | None = None, ttl: int = 3600) -> str:
    return mint_user_token(user_id, get_settings(), email, ttl)


def bearer(user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(user_id)}"}


@dataclass
class Org:
    id: str
    owner: dict[str, str]
    admin: dict[str, str]
    member: dict[str, str]
    outsider: dict[str, str]


@pytest.fixture
def org(db) -> Org:
    """An organization with an owner, an admin and a member, and an outsider who is in none."""
    suffix = uuid.uuid4().hex[:8]
    with database.connection_context():
        organization = create_organization(f"Org {suffix}")
        for role in ("owner", "admin", "member"):
            add_member(organization.id, f"{role}-{suffix}", role, f"{role}@example.com")
    return Org(
        id=organization.id,
        owner=bearer(f"owner-{suffix}"),
        admin=bearer(f"admin-{suffix}"),
        member=bearer(f"member-{suffix}"),
        outsider=bearer(f"outsider-{suffix}"),
    )


class FakeClock:
    """A clock the test moves by hand; every "now" in the app reads it while installed."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def set(self, moment: dt.datetime) -> None:
        self.now = moment

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


# Mid-month, so a test that reads "this month" cannot straddle a month boundary by accident.
MID_MONTH = dt.datetime(2026, 11, 15, 12, 0, 0)


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    from models.clock import use_clock

    fake = FakeClock(MID_MONTH)
    with use_clock(fake):
        yield fake


@pytest.fixture(scope="session")
def localstripe_url():
    from tests.stripe_fakes import start_localstripe

    # A running localstripe to reuse: mutation testing starts a pytest session per mutant,
    # and starting one per session dominated the run.
    if os.environ.get("TEST_LOCALSTRIPE_URL"):
        yield os.environ["TEST_LOCALSTRIPE_URL"]
        return
    proc, url = start_localstripe()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def stripe_front(localstripe_url):
    from tests.stripe_fakes import FixtureFront

    front = FixtureFront(localstripe_url)
    yield front
    front.close()


@contextmanager
def _stripe_settings(monkeypatch, api_base: str, **extra: str) -> Iterator[None]:
    """Stripe mode's settings (the fixtures' keys, `api_base`, no retries), undone afterwards."""
    from billing.stripe_gateway import get_gateway
    from tests.stripe_fakes import API_KEY, WEBHOOK_SECRET

    monkeypatch.setenv("STRIPE_SECRET_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("STRIPE_API_BASE", api_base)
    monkeypatch.setenv("STRIPE_MAX_RETRIES", "0")
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    get_gateway.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()
    get_gateway.cache_clear()


@pytest.fixture
def stripe_mode(stripe_front, monkeypatch):
    """Run the app in Stripe mode against the fixture front and localstripe."""
    with _stripe_settings(monkeypatch, stripe_front.url, STRIPE_TIMEOUT_SECONDS="5"):
        yield stripe_front


@pytest.fixture
def stripe_webhooks_only(monkeypatch):
    """Stripe mode for webhooks only: the signing secret, and an API base nothing listens on
    (for tests where receiving an event, or a scripted gateway, never calls Stripe)."""
    with _stripe_settings(monkeypatch, "http://127.0.0.1:9"):
        yield
