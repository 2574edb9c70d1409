"""The Connexion application factory."""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import connexion
import yaml
from connexion.exceptions import ProblemException
from connexion.jsonifier import Jsonifier
from connexion.middleware import MiddlewarePosition
from connexion.resolver import Resolution, Resolver
from starlette.exceptions import HTTPException
from starlette.responses import Response

from billing import auto_recharge
from billing.config import Settings, get_settings
from billing.stripe_gateway import get_gateway
from handlers import local_pages, observability
from handlers.middleware import EdgeMiddleware, JsonContentTypeMiddleware
from handlers.prebuilt import MIDDLEWARES, PrebuiltApi
from handlers.problems import ERROR_HANDLERS, http_exception_handler, problem_handler
from handlers.ratelimit import RateLimitMiddleware
from handlers.spec_index import SpecIndex
from handlers.validation import VALIDATORS
from models import connect_database, connection

SPEC_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"
JSONIFIER = Jsonifier()  # Connexion's own JSON encoding (dates, UUIDs), as it would answer


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class BillingResolver(Resolver):
    """operationId `getCreditBalance` in controller `handlers.credits` resolves to
    `handlers.credits.get_credit_balance`, run inside one database connection.

    A handler returning a dict answers 200 application/json (every operation also declares
    problem+json for its errors, so the content type must be named).
    """

    def resolve(self, operation: Any) -> Resolution:
        # Keep the contract's operationId as the operation's name (logs, metrics); only the
        # function lookup uses the snake_case handler name.
        target = f"{operation.router_controller}.{_snake(operation.operation_id)}"
        return Resolution(self.resolve_function_from_operation_id(target), operation.operation_id)

    def resolve_function_from_operation_id(self, operation_id: str) -> Callable[..., Any]:
        handler = super().resolve_function_from_operation_id(operation_id)
        if inspect.iscoroutinefunction(handler):
            return handler  # async handlers manage their own connection in a worker thread

        @functools.wraps(handler)
        def with_connection(*args: Any, **kwargs: Any) -> Any:
            with connection():
                result = handler(*args, **kwargs)
            if isinstance(result, dict):
                # A finished response: Connexion passes it through instead of inferring the
                # content type and serializing again (every operation answers JSON on 200).
                return Response(JSONIFIER.dumps(result), 200, media_type="application/json")
            return result

        return with_connection


def local_worker_lifespan(settings: Settings) -> Callable[[Any], Any]:
    """In local billing mode each server process drains the auto-recharge outbox itself, so
    auto-recharge works with no second command (production runs `scripts.worker`)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        stop = threading.Event()
        worker = None
        if settings.local_billing and settings.auto_recharge_in_process:
            worker = threading.Thread(
                target=auto_recharge.run_worker,
                args=(stop, get_gateway(), settings, 2.0),
                name="auto-recharge",
                daemon=True,
            )
            worker.start()
        try:
            yield
        finally:
            stop.set()
            if worker is not None:
                worker.join(timeout=10)

    return lifespan


def create_app(settings: Settings | None = None) -> connexion.AsyncApp:
    settings = settings or get_settings()
    observability.configure_logging(settings.log_level)
    connect_database(settings.database_url, settings.db_pool_size)
    app = connexion.AsyncApp(
        __name__,
        specification_dir=str(SPEC_PATH.parent),
        lifespan=local_worker_lifespan(settings),
        middlewares=list(MIDDLEWARES),  # Connexion inserts ours into the list it is given
    )
    # Connexion builds its operations through this class (no public hook for it).
    app._middleware_app.api_cls = PrebuiltApi
    app.add_api(
        SPEC_PATH.name,
        resolver=BillingResolver(),
        pythonic_params=True,
        strict_validation=True,
        validate_responses=settings.response_validation,
        validator_map=VALIDATORS,
        swagger_ui_options=None,
    )
    spec = SpecIndex(yaml.safe_load(SPEC_PATH.read_text()))
    app.add_error_handler(ProblemException, problem_handler(spec))
    for exc_class, handler in ERROR_HANDLERS:
        app.add_error_handler(exc_class, handler)
    app.add_error_handler(HTTPException, http_exception_handler(spec))
    # Connexion puts each middleware added here outside the ones added after it: the edge
    # (request id, body-size limit, access log) sees every answer, the rate limiter's 429s too.
    before_exceptions = MiddlewarePosition.BEFORE_EXCEPTION
    app.add_middleware(
        EdgeMiddleware, position=before_exceptions, spec=spec, max_bytes=settings.max_body_bytes
    )
    app.add_middleware(RateLimitMiddleware, position=before_exceptions, settings=settings)
    app.add_middleware(JsonContentTypeMiddleware, position=before_exceptions)
    app.add_url_rule("/healthz", "healthz", observability.healthz, methods=["GET"])
    app.add_url_rule("/readyz", "readyz", observability.readyz, methods=["GET"])
    app.add_url_rule("/metrics", "metrics", observability.metrics, methods=["GET"])
    for rule, name, page, methods in local_pages.ROUTES:
        app.add_url_rule(rule, name, page, methods=methods)
    return app
