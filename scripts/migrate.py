"""Apply pending migrations to DATABASE_URL: `python -m scripts.migrate`."""

from __future__ import annotations

import sys

from billing.config import ConfigError, get_settings
from models.db import make_database
from models.migrate import migrate


def main() -> int:
    try:
        settings = get_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    applied = migrate(make_database(settings.database_url))
    print(f"migrations applied: {', '.join(applied) if applied else 'none pending'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
