"""ASGI middleware that wraps every request, errors included."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from handlers.context import request_id
from handlers.problems import send_problem

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    """Accept a sane X-Request-Id or make one; expose it to logs and errors; echo it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _VALID_REQUEST_ID.match(incoming) else str(uuid.uuid4())
        token = request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


class BodySizeLimitMiddleware:
    """Refuse bodies over the configured size before anything reads them (answered as 400)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await send_problem(send, 413, f"request body is larger than {self.max_bytes} bytes")


class BodyTooLarge(Exception):
    pass


BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class JsonContentTypeMiddleware:
    """A request that carries a body must say it is JSON (`application/json` or `*+json`).

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
            if content_type:
                # Media types are case-insensitive, Connexion's lookup is not: an
                # `Application/JSON` body reached the handler as raw bytes (a 500).
                scope = _with_content_type(scope, f"{media_type}{separator}{parameters}")
        await self.app(scope, receive, send)


def _with_content_type(scope: Scope, content_type: str) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", content_type.encode("latin-1"))]}


def _has_body(scope: Scope) -> bool:
    headers = dict(scope["headers"])
    length = headers.get(b"content-length")
    if length is not None:
        return length.strip() not in (b"", b"0")
    return b"transfer-encoding" in headers
