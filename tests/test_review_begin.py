"""Review of three hot-path changes on PostgreSQL: the deferred BEGIN (models/db.py,
_PostgresqlDatabase), models.prepared.loaded, and handlers/prebuilt.py. Each test states what
must hold; each failed 20 of 20 runs when the review found it (its docstring says why) and
passes since 0a40bb6."""

from __future__ import annotations

import os
from contextlib import suppress

import peewee
import pytest

from billing.organizations import create_organization
from models import Organization, database, write_transaction

on_postgres = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL", "").startswith("postgres"),
    reason="the deferred BEGIN is PostgreSQL's",
)


def _name(org_id: str) -> str:
    return Organization.get_by_id(org_id).name


@on_postgres
@pytest.mark.usefixtures("conn")
def test_a_first_statement_the_driver_refuses_does_not_take_the_transaction_with_it():
    """psycopg2 refuses a string with a NUL before sending anything (ValueError). As the
    transaction's first statement it consumes the pending BEGIN, which is then never sent: a
    caller that catches the error and goes on writes in autocommit, and the rollback that
    follows undoes nothing. With BEGIN sent on its own (d74142f^) the write is rolled back."""
    org = create_organization("before")
    with pytest.raises(RuntimeError), write_transaction():
        with suppress(ValueError):
            Organization.get_or_none(Organization.name == "nul\x00here")
        Organization.update(name="half-written").where(Organization.id == org.id).execute()
        raise RuntimeError("the unit of work fails: nothing it wrote may stay")
    assert _name(org.id) == "before"


@on_postgres
@pytest.mark.usefixtures("conn")
def test_a_first_statement_with_a_syntax_error_does_not_take_the_transaction_with_it():
    """PostgreSQL parses a simple-query message whole before running any of it: a syntax error
    in the first statement rejects `BEGIN;<statement>` entirely, BEGIN included. The next
    statement runs in autocommit and survives the rollback. With BEGIN on its own, the syntax
    error aborts the transaction and the next write cannot happen (or is rolled back)."""
    org = create_organization("before")
    with pytest.raises(RuntimeError), write_transaction():
        with suppress(peewee.ProgrammingError):
            database.execute_sql("SELEC 1")
        with suppress(peewee.DatabaseError):
            Organization.update(name="half-written").where(Organization.id == org.id).execute()
        raise RuntimeError("the unit of work fails: nothing it wrote may stay")
    assert _name(org.id) == "before"


@on_postgres
@pytest.mark.usefixtures("conn")
def test_a_composed_statement_runs_first_in_a_transaction_as_it_does_outside_one():
    """psycopg2 takes `psycopg2.sql.Composable` statements (its safe way to build identifiers),
    and Peewee passes them through. As a transaction's first statement, `"BEGIN;" + sql` raises
    TypeError (str + Composed) before anything is sent. Fine outside a transaction, and inside
    one before d74142f."""
    from psycopg2 import sql

    query = sql.SQL("SELECT {}").format(sql.Literal(7))
    assert database.execute_sql(query).fetchone() == (7,)
    with write_transaction():
        assert database.execute_sql(query).fetchone() == (7,)


@on_postgres
@pytest.mark.usefixtures("conn")
def test_a_raw_cursor_statement_in_a_transaction_is_part_of_it():
    """`Database.cursor()` is Peewee's public way to run a statement by hand. It does not go
    through `_execute_cursor`, so the pending BEGIN is not sent in front of it: as the first
    statement of a transaction it runs in autocommit and survives the rollback. With BEGIN on
    its own (d74142f^) it is rolled back with its transaction."""
    org = create_organization("before")
    with pytest.raises(RuntimeError), write_transaction():
        database.cursor().execute(
            "UPDATE organizations SET name = 'half-written' WHERE id = %s", (org.id,)
        )
        raise RuntimeError("the unit of work fails: nothing it wrote may stay")
    assert _name(org.id) == "before"


@on_postgres
@pytest.mark.usefixtures("conn")
def test_the_query_log_shows_each_statement_as_issued():
    """Peewee logs (and passes to its query hooks) the SQL `_execute_cursor` is given; the
    deferred BEGIN rewrites it first, so a transaction's first statement is logged as
    "BEGIN;SELECT ...". Anything that reads statements by their text (the project's own
    tests/test_unit_of_work.py counts account locks with `startswith("SELECT")`: 10 of its 13
    tests fail on PostgreSQL at d74142f, all pass at d74142f^) stops recognising them."""
    import logging

    from billing.accounts import locked_account

    org = create_organization("logged")
    statements: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if isinstance(record.msg, tuple):
                statements.append(record.msg[0])

    logger = logging.getLogger("peewee")
    handler, level = Collect(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with locked_account(org.id):
            pass
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert statements and statements[0].startswith("SELECT"), statements[:1]


@on_postgres
def test_an_abandoned_manual_begin_does_not_follow_the_thread_to_its_next_connection(db):
    """The pending BEGIN is thread state (`_state.begin_pending`), and neither `close()` nor
    `connect()` clears it. A manual transaction (Peewee's `manual_commit()` + `begin()`)
    abandoned before its first statement leaves it set: the thread's next connection puts
    BEGIN in front of its first plain (autocommit) statement, which then never commits; the
    pool rolls it back on check-in and the write is lost. Before d74142f, BEGIN was sent, the
    pool rolled the abandoned transaction back on check-in, and the next connection was clean."""
    import psycopg2

    with database.connection_context():
        org = create_organization("before")
    with pytest.raises(RuntimeError), database.connection_context(), database.manual_commit():
        database.begin()
        raise RuntimeError("abandoned before any statement, without a rollback")
    with database.connection_context():
        Organization.update(name="written").where(Organization.id == org.id).execute()
    other = psycopg2.connect(dbname=database.obj.database, **database.obj.connect_params)
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT name FROM organizations WHERE id = %s", (org.id,))
            assert cursor.fetchone() == ("written",)
    finally:
        other.close()


# ---- handlers/prebuilt.py (8bfc616) ---------------------------------------------------------


def test_the_spec_is_served_when_the_app_runs_under_a_root_path(app):
    """Behind a proxy that mounts the app under a prefix (ASGI root_path, uvicorn --root-path),
    Connexion's spec middleware routes on the path without the root path; SpecPathsMiddleware
    compares the raw scope path with '/openapi.json', finds no match and skips the middleware:
    the spec is a 404. Before 8bfc616 (parent 4ba3569) it was served (200)."""
    with app.test_client(root_path="/api") as client:
        spec = client.get("/api/openapi.json")
        assert client.get("/api/healthz").status_code == 200  # the app itself is reachable
    assert spec.status_code == 200
    assert spec.json()["openapi"].startswith("3.")


def test_a_body_less_post_with_a_charset_without_a_codec_is_a_400_not_a_500(client, org):
    """8bfc616 says a charset with no codec is a 400. Not on a request without a body to an
    operation whose body has a default (dev/complete-local): Connexion encodes the default body
    with the client's charset (`_insert_body`), outside the `_parse` that now catches
    LookupError, and the answer is a 500. Not a regression: before 8bfc616 it was a 500 too."""
    response = client.post(
        f"/v1/billing/{org.id}/dev/complete-local",
        headers={**org.owner, "Content-Type": "application/json;charset=bogus"},
    )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"


def test_a_token_whose_subject_holds_a_nul_is_refused_not_a_500(client, org):
    """Outside the three changes (also at e79d433): a validly signed token whose `sub` contains
    U+0000 reaches the membership read, psycopg2 refuses the NUL (ValueError) and the answer is
    a 500. A subject no membership can have should be a 404 (or 401)."""
    import time

    import jwt

    from billing.config import get_settings

    settings = get_settings()
    token = jwt.encode(
        {"sub": "owner\x00", "exp": int(time.time()) + 600},
        settings.jwt_secret.get_secret_value(),
        "HS256",
    )
    response = client.get(
        f"/v1/billing/{org.id}/credits", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code in (401, 404), response.text


def test_a_body_in_its_declared_charset_with_a_non_ascii_letter_is_not_a_500(client, org):
    """Outside the three changes (also at 4ba3569), in the charset handling 8bfc616 hardened:
    request validation decodes the body with the declared charset (latin-1: valid, accepted),
    but the handler's body is parsed from the raw bytes as UTF-8, fails, and reaches the
    handler empty: `body["name"]` is a KeyError, a 500. Same for credit adjustments and usage
    (cp1252, cp500 too). Either honour the charset or refuse it with a 400."""
    from tests.conftest import SERVICE_HEADERS

    body = '{"name": "Caf\u00e9 org"}'.encode("latin-1")
    response = client.put(
        f"/v1/service/organizations/{org.id}",
        content=body,
        headers={**SERVICE_HEADERS, "Content-Type": "application/json;charset=latin-1"},
    )
    assert response.status_code in (200, 400), response.text
    if response.status_code == 200:
        assert response.json()["name"] == "Caf\u00e9 org"
