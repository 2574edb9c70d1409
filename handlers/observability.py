"""Structured logs, access log, Prometheus metrics and health endpoints.

Every log line is JSON with the request id (from X-Request-Id or generated). The access log is
written by the app (handlers.middleware.EdgeMiddleware) rather than by the server so it has the
operation id and the request id. Metrics
aggregate across gunicorn workers when PROMETHEUS_MULTIPROC_DIR is set (gunicorn.conf.py does).
"""

from __future__ import annotations

import logging
import os
import sys

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from pythonjsonlogger.json import JsonFormatter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from handlers.context import request_id
from handlers.problems import problem_body
from models import database

access_log = logging.getLogger("billing.access")

REQUESTS = Counter(
    "billing_http_requests_total",
    "HTTP requests, by operation and status.",
    ["operation", "method", "status"],
)
LATENCY = Histogram(
    "billing_http_request_duration_seconds",
    "HTTP request latency, by operation.",
    ["operation"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
ERRORS = Counter(
    "billing_http_errors_total", "Problem responses, by status class and status.", ["status"]
)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def configure_logging(level: str) -> None:
    """JSON lines on stdout, each with the request id; idempotent."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    )
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).disabled = True


OPERATIONAL_PATHS = ("/healthz", "/readyz", "/metrics")


def healthz(request: Request) -> Response:
    """Liveness: the process answers."""
    return JSONResponse({"status": "ok"})


def readyz(request: Request) -> Response:
    """Readiness: the database answers a trivial query; otherwise 503 problem+json."""
    try:
        with database.connection_context():
            database.execute_sql("SELECT 1")
    except Exception as exc:
        logging.getLogger("billing.health").error("database not ready: %s", type(exc).__name__)
        return JSONResponse(
            problem_body(503, "the database is not reachable", "ServiceUnavailable"),
            status_code=503,
            media_type="application/problem+json",
        )
    return JSONResponse({"status": "ready"})


def metrics(request: Request) -> Response:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
