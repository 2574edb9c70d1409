"""One error mapping for the whole app: every error is RFC 9457 problem+json with a stable code.

Domain errors carry their code; framework errors are mapped by status. Anything unexpected is a
500 whose body says nothing about internals; the details go to the log with the request id.
Statuses outside the contract's nine for a documented operation (413, 415) are answered as 400.
Every body also carries `message` (= detail) and `_tag` (= code): the platform's existing clients
read those two names. A 401 names the credential the operation wants and carries WWW-Authenticate.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus

import peewee
from connexion.exceptions import ProblemException
from connexion.lifecycle import ConnexionRequest, ConnexionResponse
from starlette.exceptions import HTTPException
from starlette.types import Send

from billing.errors import BillingError
from handlers.context import request_id
from handlers.spec_index import SpecIndex

log = logging.getLogger("billing.http")

STATUS_BY_CODE = {
    "BadRequest": 400,
    "Unauthorized": 401,
    "PaymentRequired": 402,
    "Forbidden": 403,
    "NotFound": 404,
    "MethodNotAllowed": 405,
    "Conflict": 409,
    "TooManyRequests": 429,
    "InternalError": 500,
    "ServiceUnavailable": 503,
}
CODE_BY_STATUS = {status: code for code, status in STATUS_BY_CODE.items()}
# Statuses folded into a documented one so that every operation keeps to the contract.
FOLDED_STATUS = {413: 400, 415: 400, 422: 400}
GENERIC_500 = "An unexpected error occurred. Quote the request id when reporting it."


# How each security scheme of the contract is challenged when its credential is missing or bad.
CHALLENGES = {
    "bearerAuth": ("a bearer token (Authorization: Bearer ...)", 'Bearer realm="billing"'),
    "serviceAuth": ("the X-Service-Token header", 'X-Service-Token realm="billing"'),
    "stripeSignature": ("the Stripe-Signature header", 'Stripe-Signature realm="billing"'),
}


def problem_body(status: int, detail: str, code: str) -> dict[str, object]:
    """The RFC 9457 body, with the platform clients' `message` and `_tag` alongside."""
    return {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        "requestId": request_id.get(),
        "message": detail,
        "_tag": code,
    }


def problem(
    status: int, detail: str, code: str | None = None, headers: Mapping[str, str] | None = None
) -> ConnexionResponse:
    status = FOLDED_STATUS.get(status, status)
    if code is None:
        code = CODE_BY_STATUS.get(status, "BadRequest" if status < 500 else "InternalError")
    body = problem_body(status, detail, code)
    return ConnexionResponse(
        status_code=status,
        mimetype="application/problem+json",
        content_type="application/problem+json",
        body=json.dumps(body),
        headers=dict(headers or {}),
    )


async def send_problem(
    send: Send, status: int, detail: str, headers: Mapping[str, str] | None = None
) -> None:
    """Answer with a problem straight from ASGI middleware (outside Connexion's handlers)."""
    response = problem(status, detail, headers=headers)
    body = response.body if isinstance(response.body, bytes) else str(response.body).encode()
    raw_headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in (response.headers or {}).items()
    ]
    await send(
        {"type": "http.response.start", "status": response.status_code, "headers": raw_headers}
    )
    await send({"type": "http.response.body", "body": body})


def _framework_problem(status: int, detail: str | None, headers: Mapping[str, str] | None):
    if status >= 500:
        log.error("framework error %s: %s", status, detail)
        return problem(500, GENERIC_500)
    # jsonschema appends the schema and instance after a blank line: keep the first paragraph.
    text = (detail or HTTPStatus(status).phrase).split("\n\n")[0][:500]
    return problem(status, text, headers=headers)


def on_billing_error(_request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    assert isinstance(exc, BillingError)
    status = STATUS_BY_CODE.get(exc.code, 500)
    if status >= 500:
        log.error("service error: %s", exc.detail)
    return problem(status, exc.detail, exc.code)


def unauthorized(schemes: list[str], detail: str | None) -> ConnexionResponse:
    """A 401 that names the credential the operation wants (missing, or the one that failed)."""
    known = [s for s in schemes if s in CHALLENGES] or ["bearerAuth"]
    wanted = " or ".join(CHALLENGES[s][0] for s in known)
    if detail is None or detail.startswith("No authorization token provided"):
        detail = f"missing credential: this operation needs {wanted}"
    headers = {"WWW-Authenticate": ", ".join(CHALLENGES[s][1] for s in known)}
    return problem(401, detail, headers=headers)


def problem_handler(spec: SpecIndex) -> Callable[..., ConnexionResponse]:
    def on_problem(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
        assert isinstance(exc, ProblemException)
        if exc.status == 401:
            return unauthorized(spec.security(request.method, request.url.path), exc.detail)
        return _framework_problem(exc.status, exc.detail, exc.headers)

    return on_problem


def http_exception_handler(spec: SpecIndex) -> Callable[..., ConnexionResponse]:
    def on_http_exception(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
        assert isinstance(exc, HTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = spec.allowed(request.url.path)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
        return _framework_problem(exc.status_code, exc.detail, headers)

    return on_http_exception


def on_database_error(_request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    log.error("database error: %s", type(exc).__name__)
    return problem(500, "The database is unavailable. Nothing was changed; retry later.")


def on_unexpected(_request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    log.error("unhandled %s", type(exc).__name__, exc_info=exc)
    return problem(500, GENERIC_500)


ERROR_HANDLERS = [
    (BillingError, on_billing_error),
    (peewee.OperationalError, on_database_error),
    (peewee.InterfaceError, on_database_error),
    (Exception, on_unexpected),
]
