"""The ASGI entry point for gunicorn/uvicorn: `handlers.asgi:app`.

Configuration is validated here, at import, so a bad environment stops the server at start-up
with a one-line message instead of failing on the first request.
"""

from __future__ import annotations

import sys

from billing.config import ConfigError, get_settings
from handlers.app import create_app

try:
    get_settings()
except ConfigError as exc:
    print(f"billing-api: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

app = create_app()
