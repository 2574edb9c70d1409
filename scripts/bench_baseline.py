"""Baseline for scripts/bench: a bare Starlette app doing the same token check and the same
ledger call as GET /v1/billing/{organizationId}/credits and POST
/v1/service/organizations/{organizationId}/usage, with none of the framework around it."""

from __future__ import annotations

import hmac

import jwt
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from billing import metering
from billing.config import get_settings
from billing.errors import BillingError
from models import BillingAccount, Membership, connect_database, connection

settings = get_settings()
connect_database(settings.database_url, settings.db_pool_size)


def _read(organization_id: str, user_id: str) -> dict[str, object] | None:
    with connection():
        if (
            not Membership.select()
            .where((Membership.organization == organization_id) & (Membership.user_id == user_id))
            .exists()
        ):
            return None
        account = BillingAccount.get_by_id(organization_id)
        return {
            "creditsBalanceDecimillicents": account.credits_balance,
            "reservedCreditsDecimillicents": account.reserved_credits,
            "availableDecimillicents": account.credits_balance - account.reserved_credits,
        }


async def credits(request: Request) -> JSONResponse:
    token = request.headers.get("authorization", "").removeprefix("Bearer ")
    try:
        claims = jwt.decode(token, settings.jwt_secret.get_secret_value(), algorithms=["HS256"])
    except jwt.PyJWTError:
        return JSONResponse({"detail": "unauthorized"}, status_code=401)
    body = await run_in_threadpool(_read, request.path_params["org"], claims["sub"])
    if body is None:
        return JSONResponse({"detail": "not found"}, status_code=404)
    return JSONResponse(body)


def _record(organization_id: str, body: dict[str, object]) -> dict[str, object]:
    with connection():
        result = metering.record_usage(
            organization_id,
            body["category"],  # type: ignore[arg-type]
            body["quantity"],  # type: ignore[arg-type]
            body["unitCostDecimillicents"],  # type: ignore[arg-type]
            body["referenceId"],  # type: ignore[arg-type]
        )
    return {
        "id": str(result.record.id),
        "costDecimillicents": result.record.cost,
        "availableDecimillicents": result.balance - result.reserved,
        "replayed": result.replayed,
    }


async def usage(request: Request) -> JSONResponse:
    token = request.headers.get("x-service-token", "")
    if not hmac.compare_digest(token.encode(), service_token.encode()):
        return JSONResponse({"detail": "unauthorized"}, status_code=401)
    try:
        body = await run_in_threadpool(_record, request.path_params["org"], await request.json())
    except BillingError as exc:
        return JSONResponse({"detail": exc.detail}, status_code=400)
    return JSONResponse(body)


service_token = settings.service_token.get_secret_value() if settings.service_token else ""
app = Starlette(
    routes=[
        Route("/v1/billing/{org}/credits", credits),
        Route("/v1/service/organizations/{org}/usage", usage, methods=["POST"]),
    ]
)
