"""The usage batch may carry a body five times the general limit (1,000 events with their
metadata), so its larger limit must not let a caller without credentials make the server read
megabytes: the credential is checked before any of the body is received."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import SERVICE_HEADERS

CHUNK = b"x" * 65_536


def _call(app: Any, headers: dict[str, str], chunks: int) -> tuple[int, int]:
    """POST the batch as `chunks` body messages; return (status, messages the app received)."""
    consumed = 0
    sent: list[dict[str, Any]] = []
    body = [b'{"events": [], "pad": "', *([CHUNK] * chunks), b'"}']

    async def receive() -> dict[str, Any]:
        nonlocal consumed
        if consumed < len(body):
            consumed += 1
            return {
                "type": "http.request",
                "body": body[consumed - 1],
                "more_body": consumed < len(body),
            }
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    length = sum(len(part) for part in body)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/service/usage/batch",
        "raw_path": b"/v1/service/usage/batch",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", str(length).encode()),
            *raw,
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "root_path": "",
    }
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], consumed


def test_a_large_batch_without_credentials_is_refused_before_its_body_is_read(app):
    status, consumed = _call(app, {}, chunks=60)  # about 3.9 MB, under the batch's own limit
    assert status == 401
    assert consumed == 0


def test_a_wrong_credential_is_refused_before_the_body_is_read(app):
    status, consumed = _call(app, {"X-Service-Token": "not-the-token-0123456789"}, chunks=60)
    assert status == 401
    assert consumed == 0


def test_with_the_credential_the_same_body_is_read_and_judged(app):
    """The control: the body is read once the caller is known (and this one is refused as a
    body, not for its size)."""
    status, consumed = _call(app, SERVICE_HEADERS, chunks=60)
    assert status == 400
    assert consumed == 62
