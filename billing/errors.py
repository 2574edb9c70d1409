"""Domain errors. Each carries the stable problem `code`; the HTTP layer maps code to status."""

from __future__ import annotations


class BillingError(Exception):
    code = "InternalError"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidRequest(BillingError):
    code = "BadRequest"


class Unauthenticated(BillingError):
    code = "Unauthorized"


class PaymentRequired(BillingError):
    code = "PaymentRequired"


class Forbidden(BillingError):
    code = "Forbidden"


class NotFound(BillingError):
    code = "NotFound"


class Conflict(BillingError):
    code = "Conflict"


class UpstreamUnavailable(BillingError):
    """Stripe (or another dependency) failed or timed out; nothing was written.

    Reported as a 500 with a clear detail: the contract allows no other 5xx status.
    """

    code = "InternalError"
