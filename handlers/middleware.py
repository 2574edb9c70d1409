"""ASGI middleware that wraps every request, errors included (merged into one layer: each
layer costs a frame and a send wrapper on every request)."""

from __future__ import annotations

import codecs
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing.metering import MAX_BATCH_EVENTS, MAX_METADATA_BYTES
from handlers.context import request_id
from handlers.observability import ERRORS, LATENCY, OPERATIONAL_PATHS, REQUESTS, access_log
from handlers.problems import send_problem
from handlers.spec_index import SpecIndex

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class EdgeMiddleware:
    """Everything our service does around each request, in one ASGI layer (one send wrapper,
    one frame), outermost: the request id (a sane X-Request-Id or a new one, exposed to logs and
    errors, echoed back), the body-size limit (bodies over the configured size are refused
    before anything reads them, with a 413 problem), and the access log line and HTTP metrics,
    labelled by the contract's operationId. Every answer passes through it, 429s and 413s too.
    """

    def __init__(self, app: ASGIApp, spec: SpecIndex, max_bytes: int) -> None:
        self.app = app
        self.spec = spec
        self.max_bytes = max_bytes
        # A usage batch the contract allows (1,000 events, each up to 4 KiB of metadata) is
        # larger than the general limit: that one operation gets room for its largest body.
        self.batch_max_bytes = max(max_bytes, MAX_BATCH_EVENTS * (MAX_METADATA_BYTES + 1024))

    def _limit(self, scope: Scope) -> int:
        if self._operation(scope) == "recordUsageBatch":
            return self.batch_max_bytes
        return self.max_bytes

    def _operation(self, scope: Scope) -> str:
        if scope["path"] in OPERATIONAL_PATHS:
            return str(scope["path"])
        return self.spec.operation_id(scope["method"], scope["path"]) or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _VALID_REQUEST_ID.match(incoming) else str(uuid.uuid4())
        token = request_id.set(rid)
        status = 500
        received = 0
        max_bytes = self._limit(scope)

        async def edge_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *(h for h in message.get("headers", []) if h[0] != b"x-request-id"),
                    (b"x-request-id", rid.encode()),
                ]
            await send(message)

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise BodyTooLarge()
            return message

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > max_bytes):
                await self._refuse(edge_send, max_bytes)
            else:
                try:
                    await self.app(scope, limited_receive, edge_send)
                except BodyTooLarge:
                    await self._refuse(edge_send, max_bytes)
        finally:
            self._log(scope, status, time.perf_counter() - started)
            request_id.reset(token)

    async def _refuse(self, send: Send, max_bytes: int) -> None:
        await send_problem(send, 413, f"request body is larger than {max_bytes} bytes")

    def _log(self, scope: Scope, status: int, elapsed: float) -> None:
        operation = self._operation(scope)
        REQUESTS.labels(operation, scope["method"], str(status)).inc()
        LATENCY.labels(operation).observe(elapsed)
        if status >= 400:
            ERRORS.labels(str(status)).inc()
        access_log.info(
            "request",
            extra={
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "operation": operation,
                "duration_ms": round(elapsed * 1000, 2),
            },
        )


class BodyTooLarge(Exception):
    pass


BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class JsonContentTypeMiddleware:
    """A request that carries a body must say it is JSON (`application/json` or `*+json`), and
    any charset it names must read as UTF-8 (an unknown one made Connexion fail with a 500).

    Without a Content-Type, Connexion hands the raw bytes to the handler, which then fails
    with a 500; every body this API takes is JSON, so the request is refused up front (415,
    answered as the contract's 400 problem).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in BODY_METHODS:
            content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
            media_type, separator, parameters = content_type.partition(";")
            media_type = media_type.strip().lower()
            if _has_body(scope) and not (
                media_type == "application/json" or media_type.endswith("+json")
            ):
                await send_problem(send, 415, "a request body needs Content-Type: application/json")
                return
            if not _utf8_charset(parameters):
                await send_problem(send, 415, "a JSON body is UTF-8 (RFC 8259): charset=utf-8")
                return
            if content_type:
                # Media types are case-insensitive, Connexion's lookup is not: an
                # `Application/JSON` body reached the handler as raw bytes (a 500).
                scope = _with_content_type(scope, f"{media_type}{separator}{parameters}")
        await self.app(scope, receive, send)


# Charsets whose bytes are read the same as UTF-8: JSON exchanged between systems is UTF-8
# (RFC 8259), and the handlers parse the body as UTF-8 whatever the header says; a body in
# another charset would be validated as one text and handled as another.
_UTF8_COMPATIBLE = frozenset({"utf-8", "ascii"})


def _utf8_charset(parameters: str) -> bool:
    """Whether the Content-Type parameters name no charset, or one read the same as UTF-8."""
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            try:
                codec = codecs.lookup(value.strip().strip('"'))
            except LookupError:
                return False
            if codec.name not in _UTF8_COMPATIBLE:
                return False
    return True


def _with_content_type(scope: Scope, content_type: str) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", content_type.encode("latin-1"))]}


def _has_body(scope: Scope) -> bool:
    headers = dict(scope["headers"])
    length = headers.get(b"content-length")
    if length is not None:
        return length.strip() not in (b"", b"0")
    return b"transfer-encoding" in headers
