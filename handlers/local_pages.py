"""Local billing mode's stand-ins for Stripe's hosted pages: checkout, top-up and portal.

Plain HTML from the templates next to this module (string.Template, every value escaped; no
build step). The `url` that checkout, top-up and portal return in local mode opens these
pages; Pay completes the session as Stripe's webhooks would and redirects to successUrl,
Cancel redirects to cancelUrl. Outside local billing mode every page is a 404.
"""

from __future__ import annotations

import html
from pathlib import Path
from string import Template

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from billing import local_billing
from billing.accounts import get_account
from billing.config import get_settings
from billing.errors import BillingError, NotFound
from billing.plans import PLANS
from billing.units import CENT, DOLLAR
from handlers.shapes import iso
from models import connection

TEMPLATES = Path(__file__).resolve().parent / "templates"
CHECKOUT = Template((TEMPLATES / "local_checkout.html").read_text())
PORTAL = Template((TEMPLATES / "local_portal.html").read_text())
KINDS = {"checkout": "subscription", "top-up": "top_up"}


def dollars(amount: int) -> str:
    sign = "-" if amount < 0 else ""
    amount = abs(amount)
    return f"{sign}${amount // DOLLAR:,}.{amount % DOLLAR // CENT:02d}"


def _row(label: str, value: str, element_id: str) -> str:
    return f'    <dt>{html.escape(label)}</dt><dd id="{element_id}">{html.escape(value)}</dd>'


def _error(exc: BillingError) -> HTMLResponse:
    status = 404 if isinstance(exc, NotFound) else 400
    return HTMLResponse(
        f"<!doctype html><title>{status}</title><p>{html.escape(exc.detail)}</p>", status
    )


def _local_only() -> None:
    if not get_settings().local_billing:
        raise NotFound("local billing pages exist only in local billing mode")


def session_page(request: Request) -> Response:
    kind, session_id = request.path_params["kind"], request.path_params["session_id"]
    try:
        _local_only()
        with connection():
            session, account = local_billing.open_session(session_id)
        if KINDS.get(kind) != session.kind:
            raise NotFound("no such local checkout session")
    except BillingError as exc:
        return _error(exc)
    if session.kind == "subscription":
        plan = PLANS[str(session.plan)]
        welcome = (
            "already used by this organization"
            if account.welcome_credit_granted_at is not None
            else f"{dollars(plan.welcome_credit)} of credit, once"
        )
        title = f"Subscribe to the {plan.slug} plan"
        rows = [
            _row("Plan", plan.slug, "plan"),
            _row("Price", f"{dollars(plan.monthly_price)} / month", "price"),
            _row("Welcome credit", welcome, "welcome-credit"),
        ]
        pay_label = f"Pay {dollars(plan.monthly_price)}"
    else:
        amount = int(session.amount or 0)
        title = "Buy credits"
        rows = [_row("Amount", dollars(amount), "amount")]
        pay_label = f"Pay {dollars(amount)}"
    status = {
        "open": "",
        "completed": "This checkout is paid.",
        "canceled": "This checkout was canceled.",
    }.get(session.status, session.status)
    base = f"/local/{kind}/{session_id}"
    page = CHECKOUT.substitute(
        title=html.escape(title),
        rows="\n".join(rows),
        status=html.escape(status),
        pay_action=html.escape(f"{base}/pay"),
        cancel_action=html.escape(f"{base}/cancel"),
        pay_label=html.escape(pay_label),
        pay_disabled="" if session.status == "open" else "disabled",
    )
    return HTMLResponse(page)


def _back_to(url: str | None, fallback: str) -> Response:
    return RedirectResponse(url or fallback, status_code=303)


def pay_session(request: Request) -> Response:
    kind, session_id = request.path_params["kind"], request.path_params["session_id"]
    try:
        _local_only()
        with connection():
            session = local_billing.pay(session_id)
    except BillingError as exc:
        return _error(exc)
    return _back_to(session.success_url, f"/local/{kind}/{session_id}")


def cancel_session(request: Request) -> Response:
    kind, session_id = request.path_params["kind"], request.path_params["session_id"]
    try:
        _local_only()
        with connection():
            session = local_billing.cancel(session_id)
    except BillingError as exc:
        return _error(exc)
    return _back_to(session.cancel_url, f"/local/{kind}/{session_id}")


def portal_page(request: Request) -> Response:
    token = request.path_params["token"]
    try:
        _local_only()
        link = local_billing.read_portal_link(token)
        with connection():
            account = get_account(link.organization_id)
    except BillingError as exc:
        return _error(exc)
    subscribed = account.stripe_subscription_id and account.subscription_status != "canceled"
    cancel_form = (
        f'<form method="post" action="/local/portal/{html.escape(token)}/cancel-subscription">'
        '<button id="cancel-subscription" type="submit">Cancel subscription</button></form>'
        if subscribed
        else ""
    )
    page = PORTAL.substitute(
        plan=html.escape(account.subscription_plan or "none"),
        status=html.escape(account.subscription_status),
        period_end=html.escape(iso(account.subscription_current_period_end) or "-"),
        card=html.escape(
            "Test card (local mode)" if account.stripe_payment_method_id else "none on file"
        ),
        balance=html.escape(dollars(account.credits_balance)),
        cancel_form=cancel_form,
        return_url=html.escape(link.return_url),
    )
    return HTMLResponse(page)


def portal_cancel_subscription(request: Request) -> Response:
    token = request.path_params["token"]
    try:
        _local_only()
        link = local_billing.read_portal_link(token)
        with connection():
            local_billing.cancel_subscription(link.organization_id)
    except BillingError as exc:
        return _error(exc)
    return RedirectResponse(f"/local/portal/{token}", status_code=303)


ROUTES = [
    ("/local/portal/{token}", "local_portal", portal_page, ["GET"]),
    (
        "/local/portal/{token}/cancel-subscription",
        "local_portal_cancel",
        portal_cancel_subscription,
        ["POST"],
    ),
    ("/local/{kind}/{session_id}", "local_session", session_page, ["GET"]),
    ("/local/{kind}/{session_id}/pay", "local_pay", pay_session, ["POST"]),
    ("/local/{kind}/{session_id}/cancel", "local_cancel", cancel_session, ["POST"]),
]
