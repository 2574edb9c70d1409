"""What the contract defines per concrete path: its methods and operationIds.

Used for the Allow header of a 405 and to label logs and metrics by operationId, from the spec
itself rather than from framework internals.
"""

from __future__ import annotations

import re
from typing import Any

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


class SpecIndex:
    def __init__(self, spec: dict[str, Any]) -> None:
        self._paths: list[tuple[re.Pattern[str], dict[str, str]]] = []
        self._security: dict[str, list[str]] = {}
        default = [name for req in spec.get("security", []) for name in req]
        for template, item in spec.get("paths", {}).items():
            for method, op in item.items():
                if method in HTTP_METHODS:
                    names = [n for req in op.get("security", []) for n in req]
                    self._security[str(op.get("operationId"))] = names or default
            pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
            operations = {
                method.upper(): str(op.get("operationId", f"{method} {template}"))
                for method, op in item.items()
                if method in HTTP_METHODS
            }
            self._paths.append((re.compile(f"^{pattern}$"), operations))

    def _operations(self, path: str) -> dict[str, str] | None:
        for pattern, operations in self._paths:
            if pattern.match(path):
                return operations
        return None

    def allowed(self, path: str) -> list[str] | None:
        operations = self._operations(path)
        return sorted(operations) if operations else None

    def operation_id(self, method: str, path: str) -> str | None:
        operations = self._operations(path)
        return operations.get(method.upper()) if operations else None

    def security(self, method: str, path: str) -> list[str]:
        """The security schemes the operation accepts (empty for an unknown operation)."""
        operation = self.operation_id(method, path)
        return self._security.get(operation, []) if operation else []
