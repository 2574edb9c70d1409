"""Baseline for scripts/bench: a bare Starlette app making the same service calls as
GET /v1/billing/{organizationId}/credits and POST /v1/service/organizations/{organizationId}/usage
(the same token check, the same membership and account reads, the same ledger call, the same
response shapes), with none of the framework around them: the ratio ours/baseline is what the
framework costs (Connexion's routing, security, validation, our middleware)."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from billing import accounts, auth, metering
from billing.config import get_settings
from billing.errors import BillingError
from handlers import shapes
from handlers.problems import STATUS_BY_CODE
from models import connect_database, connection

settings = get_settings()
connect_database(settings.database_url, settings.db_pool_size)


def _read(organization_id: str, user: auth.User) -> dict[str, Any]:
    with connection():
        org = auth.require_role(organization_id, user, auth.Role.member)
        return shapes.credit_balance(accounts.get_account(org))


async def credits(request: Request) -> JSONResponse:
    token = request.headers.get("authorization", "").removeprefix("Bearer ")
    try:
        user = auth.verify_user_token(token, settings)
        body = await run_in_threadpool(_read, request.path_params["org"], user)
    except BillingError as exc:
        return JSONResponse({"detail": exc.detail}, status_code=STATUS_BY_CODE[exc.code])
    return JSONResponse(body)


def _record(organization_id: str, body: dict[str, Any]) -> dict[str, Any]:
    with connection():
        return shapes.recorded_usage(
            metering.record_usage(
                organization_id.lower(),
                body["category"],
                body["quantity"],
                body["unitCostDecimillicents"],
                body["referenceId"],
                body.get("metadata"),
                settings.overdraft_limit_decimillicents,
            )
        )


async def usage(request: Request) -> JSONResponse:
    try:
        auth.verify_service_token(request.headers.get("x-service-token", ""), settings)
        body = await run_in_threadpool(_record, request.path_params["org"], await request.json())
    except BillingError as exc:
        return JSONResponse({"detail": exc.detail}, status_code=STATUS_BY_CODE[exc.code])
    return JSONResponse(body)


app = Starlette(
    routes=[
        Route("/v1/billing/{org}/credits", credits),
        Route("/v1/service/organizations/{org}/usage", usage, methods=["POST"]),
    ]
)
