"""The credit ledger: the only code that moves an organization's credits.

Its operations take the account a use case locked (`billing.accounts.locked_account`) and never
open a transaction or take a lock themselves: `grant`, `debit`, `take_back` and `adjust`, and
the payment rules `credit_payment` and `reverse_payment`. The reservation use cases (`reserve`,
`finalize_reservation`, `release_reservation`) are entry points: each opens one unit of work.
`reason`, `reference_id`, `idempotency_ref` and `overdraft` are keyword-only.

Rules kept here, within the caller's one transaction:
- entries are appended, never changed; each stores `balance_after`, and the account's
  `credits_balance` always equals the sum of the organization's entries;
- `reserved_credits` equals the sum of open reservations, and available = balance - reserved
  never goes below minus the configured overdraft (0 by default) through a debit or reservation;
- every operation that takes an `idempotency_ref` applies once: a repeat returns the first result;
- spending is refused (402) while the organization is suspended, while a payment grace period
  runs, or when it would take this period's spend past the usage cap;
- the account keeps the current UTC month's spend (`spend_month`, `month_spend`: the sum of the
  month's `charge` entries) in every charge's own transaction, so the cap check reads the locked
  row and no debit aggregates over the ledger (its cost does not grow with history).

Concurrency: the unit of work (`write_transaction` + the account lock, taken once) serializes
writers per organization (row lock on PostgreSQL, the writer lock on SQLite), so no update is
lost and no check is raced.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from enum import StrEnum

from peewee import Field

from billing import recharge_policy
from billing.accounts import locked_account, suspended_since
from billing.errors import Conflict, InvalidRequest, NotFound, PaymentRequired
from billing.metrics import LEDGER_ENTRIES, LEDGER_REFUSALS
from billing.units import INT64_MAX
from models import (
    BillingAccount,
    CreditEntry,
    CreditEntryType,
    PaymentKind,
    Reservation,
    ReservationStatus,
    StripePayment,
    after_rollback,
    database,
    is_postgres,
    utcnow,
)
from models.prepared import loaded

CREDIT_TYPES = frozenset(
    {
        CreditEntryType.adjustment,
        CreditEntryType.recharge,
        CreditEntryType.initial_grant,
        CreditEntryType.top_up,
        CreditEntryType.welcome_grant,
    }
)
DEBIT_TYPES = frozenset(
    {
        CreditEntryType.charge,
        CreditEntryType.refund,
        CreditEntryType.dispute,
        CreditEntryType.adjustment,
    }
)
# Entries that count as spending against the usage cap.
SPEND_TYPES = (CreditEntryType.charge,)


@dataclass(frozen=True)
class LedgerResult:
    entry: CreditEntry | None
    balance: int
    reserved: int
    replayed: bool = False

    @property
    def available(self) -> int:
        return self.balance - self.reserved


def _check_amount(amount: int, *, allow_zero: bool = False) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidRequest("amount must be an integer number of decimillicents")
    low = 0 if allow_zero else 1
    if not low <= amount <= INT64_MAX:
        raise InvalidRequest(f"amount must be from {low} to {INT64_MAX}")


def _append(
    account: BillingAccount,
    entry_type: CreditEntryType,
    amount: int,
    *,
    reason: str | None,
    reference_id: str | None,
    idempotency_ref: str | None,
) -> CreditEntry:
    """Append one entry to a locked account and move its balance (and, for spending, the
    month's running spend) with it: one INSERT and one UPDATE, whatever the history."""
    now = account_now(account)
    balance_after = apply_to_account(account, entry_type, amount, now)
    # The entry as it will be stored (the id comes from the INSERT). Built in one step: Peewee's
    # keyword constructor costs an attribute write per field, on every debit.
    entry = loaded(
        CreditEntry,
        {
            "organization": account.organization_id,
            "entry_type": entry_type,
            "amount": amount,
            "reason": reason,
            "reference_id": reference_id,
            "idempotency_ref": idempotency_ref,
            "balance_after": balance_after,
            "created_at": now,
            "public_id": CreditEntry.public_id.default(),
        },
    )
    if is_postgres():
        # One round trip under the lock instead of two (the SQL is written once, below).
        (entry.__data__["id"],) = database.execute_sql(
            _APPEND_SQL,
            (
                account.organization_id,
                entry_type,
                amount,
                reason,
                reference_id,
                idempotency_ref,
                balance_after,
                now,
                entry.public_id,  # the entry returned names it too
                account.credits_balance,
                account.spend_month,
                account.month_spend,
                now,
                account.organization_id,
            ),
        ).fetchone()
    else:
        entry.save(force_insert=True)
        account.save(only=ACCOUNT_TOTALS)
    LEDGER_ENTRIES.labels(entry_type).inc()
    return entry


# `_append` on PostgreSQL: the entry INSERT and the account UPDATE as one statement.
_APPEND_SQL = """
WITH entry AS (
    INSERT INTO credit_entries (organization_id, entry_type, amount, reason, reference_id,
                                idempotency_ref, balance_after, created_at, public_id)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
    RETURNING id
)
UPDATE billing_accounts
SET credits_balance = %s, spend_month = %s, month_spend = %s, updated_at = %s
WHERE organization_id = %s
RETURNING (SELECT id FROM entry)
"""


# The account columns an entry moves (`_append` and batch ingestion write exactly these).
ACCOUNT_TOTALS: list[Field] = [
    BillingAccount.credits_balance,
    BillingAccount.spend_month,
    BillingAccount.month_spend,
    BillingAccount.updated_at,
]


def month_key(now: dt.datetime) -> str:
    """The UTC month `now` falls in, as `spend_month` stores it ('YYYY-MM')."""
    return f"{now.year:04d}-{now.month:02d}"


def account_now(account: BillingAccount) -> dt.datetime:
    """Now, for a write on this locked account: never before the start of its running spend's
    month. A worker whose clock is a little behind at midnight of a month's end would otherwise
    stamp a charge into the month before, resetting the new month's running spend (and its cap)."""
    now = utcnow()
    if account.spend_month is not None and account.spend_month > month_key(now):
        year, month = (int(part) for part in account.spend_month.split("-"))
        return dt.datetime(year, month, 1)
    return now


def month_spend(account: BillingAccount, now: dt.datetime) -> int:
    """Credits spent in the month of `now`, from the account row alone (no aggregate): the
    running total counts only while its month is the current one."""
    return account.month_spend if account.spend_month == month_key(now) else 0


def apply_to_account(
    account: BillingAccount, entry_type: CreditEntryType, amount: int, now: dt.datetime
) -> int:
    """Move a locked account's in-memory totals by one entry made at `now`; return the new
    balance. The caller writes the row (the `ACCOUNT_TOTALS` columns) in the same transaction.
    The first charge of a new month starts the month's spend from zero."""
    balance_after = account.credits_balance + amount
    if not -INT64_MAX <= balance_after <= INT64_MAX:
        raise InvalidRequest("the balance would overflow")
    if entry_type in SPEND_TYPES:
        spent = month_spend(account, now) - amount
        if spent > INT64_MAX:
            raise InvalidRequest("the month's spend would overflow")
        account.spend_month = month_key(now)
        account.month_spend = spent
    account.credits_balance = balance_after
    account.updated_at = now
    return balance_after


def _replay(idempotency_ref: str | None, organization_id: str) -> CreditEntry | None:
    """The entry already made under this reference (if any): callers return it instead of
    applying twice. Read under the account lock."""
    if idempotency_ref is None:
        return None
    entry = CreditEntry.get_or_none(CreditEntry.idempotency_ref == idempotency_ref)
    if entry is not None and entry.organization_id != organization_id:
        raise Conflict("this reference belongs to another organization")
    return entry


def _result(account: BillingAccount, entry: CreditEntry | None, replayed: bool) -> LedgerResult:
    return LedgerResult(entry, account.credits_balance, account.reserved_credits, replayed)


def check_can_spend(account: BillingAccount, amount: int, overdraft: int) -> None:
    """Raise PaymentRequired if `amount` more may not be spent now. Needs the account lock.

    A refusal for lack of credit still asks for an auto-recharge, once the refused
    transaction has rolled back (in a short transaction of its own)."""
    reason = spend_refusal(account, amount, overdraft)
    if reason is not None:
        if reason[0] == "insufficient_credits":
            organization_id = account.organization_id
            after_rollback(lambda: recharge_policy.after_refusal(organization_id))
        raise PaymentRequired(reason[1])


def spend_refusal(
    account: BillingAccount, amount: int, overdraft: int, *, now: dt.datetime | None = None
) -> tuple[str, str] | None:
    """Why `amount` more may not be spent now (reason code, message), counted; None if it may.
    Needs the account lock; batch ingestion asks this per event instead of raising, passing
    the `now` its charges are written at, so the cap is checked against the month they count in
    (a batch running across midnight of a month's end must not see the new month's zero)."""
    reason = _refusal(account, amount, overdraft, now or account_now(account))
    if reason is not None:
        LEDGER_REFUSALS.labels(reason[0]).inc()
    return reason


def _refusal(
    account: BillingAccount, amount: int, overdraft: int, now: dt.datetime
) -> tuple[str, str] | None:
    if suspended_since(account) is not None:
        return "suspended", "the organization is suspended"
    if account.payment_grace_period_ends_at is not None:
        return "payment_failed", "a payment failed; update the payment method to continue"
    if account.usage_cap is not None:
        spent = month_spend(account, now) + account.reserved_credits
        if spent + amount > account.usage_cap:
            return "usage_cap", "this would exceed the usage cap for the current period"
    available = account.credits_balance - account.reserved_credits
    if available - amount < -overdraft:
        return "insufficient_credits", "not enough available credits"
    return None


def after_spending(account: BillingAccount) -> None:
    """What follows spending on a locked account (batch ingestion calls it once per account)."""
    recharge_policy.request_if_due(account)


def grant(
    account: BillingAccount,
    amount: int,
    entry_type: CreditEntryType,
    *,
    reason: str | None = None,
    reference_id: str | None = None,
    idempotency_ref: str | None = None,
) -> LedgerResult:
    """Add credits to the locked account (top-up, welcome grant, recharge, positive
    adjustment)."""
    if entry_type not in CREDIT_TYPES:
        raise InvalidRequest(f"{entry_type} is not a credit entry type")
    _check_amount(amount)
    existing = _replay(idempotency_ref, account.organization_id)
    if existing is not None:
        return _result(account, existing, True)
    entry = _append(
        account,
        entry_type,
        amount,
        reason=reason,
        reference_id=reference_id,
        idempotency_ref=idempotency_ref,
    )
    return _result(account, entry, False)


def debit(
    account: BillingAccount,
    amount: int,
    entry_type: CreditEntryType = CreditEntryType.charge,
    *,
    reason: str | None = None,
    reference_id: str | None = None,
    idempotency_ref: str | None = None,
    overdraft: int = 0,
) -> LedgerResult:
    """Take credits from the locked account for spending; refused with 402 when the guards
    say no."""
    if entry_type not in DEBIT_TYPES:
        raise InvalidRequest(f"{entry_type} is not a debit entry type")
    _check_amount(amount, allow_zero=True)
    existing = _replay(idempotency_ref, account.organization_id)
    if existing is not None:
        return _result(account, existing, True)
    check_can_spend(account, amount, overdraft)
    entry = _append(
        account,
        entry_type,
        -amount,
        reason=reason,
        reference_id=reference_id,
        idempotency_ref=idempotency_ref,
    )
    recharge_policy.request_if_due(account)
    return _result(account, entry, False)


def take_back(
    account: BillingAccount,
    amount: int,
    entry_type: CreditEntryType,
    *,
    reason: str | None = None,
    reference_id: str | None = None,
    idempotency_ref: str,
) -> LedgerResult:
    """Reverse credits for a refund or lost dispute: at most what remains available.

    Credits already spent cannot be clawed back from the ledger; the shortfall is the
    payment provider's matter, so the balance never goes negative through a reversal.
    """
    _check_amount(amount)
    existing = _replay(idempotency_ref, account.organization_id)
    if existing is not None:
        return _result(account, existing, True)
    remaining = max(0, account.credits_balance - account.reserved_credits)
    taken = min(amount, remaining)
    entry = _append(
        account,
        entry_type,
        -taken,
        reason=reason,
        reference_id=reference_id,
        idempotency_ref=idempotency_ref,
    )
    return _result(account, entry, False)


def adjust(
    account: BillingAccount,
    amount: int,
    *,
    reason: str,
    idempotency_ref: str | None = None,
    overdraft: int = 0,
) -> LedgerResult:
    """A signed correction by an operator on the locked account; a negative one may not
    overdraw."""
    if amount == 0 or isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidRequest("an adjustment must be a non-zero integer")
    if amount > 0:
        return grant(
            account,
            amount,
            CreditEntryType.adjustment,
            reason=reason,
            idempotency_ref=idempotency_ref,
        )
    existing = _replay(idempotency_ref, account.organization_id)
    if existing is not None:
        return _result(account, existing, True)
    available = account.credits_balance - account.reserved_credits
    if available + amount < -overdraft:
        raise PaymentRequired("not enough available credits")
    entry = _append(
        account,
        CreditEntryType.adjustment,
        amount,
        reason=reason,
        reference_id=None,
        idempotency_ref=idempotency_ref,
    )
    return _result(account, entry, False)


# --- reservations ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReservationResult:
    reservation: Reservation
    balance: int
    reserved: int
    replayed: bool = False


def _reservation_result(
    account: BillingAccount, reservation: Reservation, replayed: bool
) -> ReservationResult:
    return ReservationResult(
        reservation, account.credits_balance, account.reserved_credits, replayed
    )


def reserve(
    organization_id: str, amount: int, *, reference_id: str, overdraft: int = 0
) -> ReservationResult:
    """Hold credits for work in progress; the same reference holds once. One unit of work."""
    _check_amount(amount)
    with locked_account(organization_id) as account:
        existing = Reservation.get_or_none(
            (Reservation.organization == organization_id)
            & (Reservation.reference_id == reference_id)
        )
        if existing is not None:
            if existing.amount != amount:
                raise Conflict("this reservation reference was used with another amount")
            return _reservation_result(account, existing, True)
        check_can_spend(account, amount, overdraft)
        reservation = Reservation.create(
            id=str(uuid.uuid4()),
            organization=organization_id,
            amount=amount,
            reference_id=reference_id,
        )
        _move_reserved(account, amount)
        recharge_policy.request_if_due(account)
        return _reservation_result(account, reservation, False)


def _move_reserved(account: BillingAccount, delta: int) -> None:
    account.reserved_credits += delta
    account.updated_at = utcnow()
    account.save(only=[BillingAccount.reserved_credits, BillingAccount.updated_at])


def _reservation_of(account: BillingAccount, reservation_id: str) -> Reservation:
    """The organization's reservation, read under its account lock."""
    reservation = Reservation.get_or_none(
        (Reservation.id == reservation_id) & (Reservation.organization == account.organization_id)
    )
    if reservation is None:
        raise NotFound("reservation not found")
    return reservation


def finalize_reservation(
    organization_id: str, reservation_id: str, actual_amount: int, *, overdraft: int = 0
) -> ReservationResult:
    """Charge the actual amount and release the rest of the hold.

    Finalizing again with the same amount replays; another amount, or finalizing a released
    reservation, is a 409. An actual amount above the hold is charged only if the extra is
    available (the usual guards apply to the extra).
    """
    _check_amount(actual_amount, allow_zero=True)
    with locked_account(organization_id) as account:
        reservation = _reservation_of(account, reservation_id)
        if reservation.status == ReservationStatus.finalized:
            if reservation.final_amount != actual_amount:
                raise Conflict("the reservation was finalized with another amount")
            return _reservation_result(account, reservation, True)
        if reservation.status != ReservationStatus.open:
            raise Conflict(f"the reservation is {reservation.status}")
        _move_reserved(account, -reservation.amount)
        if actual_amount > reservation.amount:
            # The hold is back in `available`, so checking the whole actual amount is exact.
            check_can_spend(account, actual_amount, overdraft)
        entry = _append(
            account,
            CreditEntryType.charge,
            -actual_amount,
            reason="reservation finalized",
            reference_id=reservation.reference_id,
            idempotency_ref=f"reservation:{reservation.id}",
        )
        reservation.status = ReservationStatus.finalized
        reservation.final_amount = actual_amount
        reservation.credit_entry = entry
        reservation.closed_at = utcnow()
        reservation.save()
        recharge_policy.request_if_due(account)
        return _reservation_result(account, reservation, False)


def release_reservation(organization_id: str, reservation_id: str) -> ReservationResult:
    """Give the whole hold back; releasing twice replays, releasing a finalized one is a 409."""
    with locked_account(organization_id) as account:
        reservation = _reservation_of(account, reservation_id)
        if reservation.status == ReservationStatus.released:
            return _reservation_result(account, reservation, True)
        if reservation.status != ReservationStatus.open:
            raise Conflict(f"the reservation is {reservation.status}")
        _move_reserved(account, -reservation.amount)
        reservation.status = ReservationStatus.released
        reservation.closed_at = utcnow()
        reservation.save()
        return _reservation_result(account, reservation, False)


# --- payments: what a Stripe payment granted, and what refunds and disputes take back ------
#
# One `StripePayment` row per PaymentIntent, read and written only under the account lock,
# holds the grant and the reversals' shares (billionths of the payment: the cumulative refunded
# share, and the sum of lost disputes' shares). Each event recomputes the target
# `min(granted, granted * (refunded + disputed) / 10**9)` and appends at most what the event
# added to it, so any interleaving of refunds, disputes and the grant itself takes back at most
# what the payment granted. The cost is constant per event, whatever the history. A reversal
# takes only what is available then; a shortfall is never taken later from other credits.

SHARE_WHOLE = 10**9


class ReversalKind(StrEnum):
    """What reverses a payment; each is also the type of the entry it appends."""

    refund = CreditEntryType.refund.value
    dispute = CreditEntryType.dispute.value


# Grants made before payments were tracked (or by auto-recharge) are found by their reference.
_GRANT_REFS = {PaymentKind.top_up: "topup:{}", PaymentKind.auto_recharge: "recharge:{}"}


@dataclass(frozen=True)
class PaymentOutcome:
    payment: StripePayment | None
    granted_now: int = 0
    reversed_now: int = 0


def share_of(part: int, whole: int) -> int:
    """`part / whole` in billionths, clamped to [0, 1]; integers only."""
    if whole <= 0 or part <= 0:
        return 0
    return min(SHARE_WHOLE, part * SHARE_WHOLE // whole)


def _payment_row(organization_id: str, payment_id: str) -> StripePayment | None:
    """The payment row (under the caller's account lock), made from a legacy grant if needed."""
    payment = StripePayment.get_or_none(StripePayment.id == payment_id)
    if payment is not None and payment.organization_id != organization_id:
        raise Conflict("this payment belongs to another organization")
    if payment is not None and payment.granted_amount:
        return payment
    for kind, ref in _GRANT_REFS.items():
        entry = _replay(ref.format(payment_id), organization_id)
        if entry is None:
            continue
        if payment is None:
            return StripePayment.create(
                id=payment_id,
                organization=organization_id,
                kind=kind,
                ordered_amount=entry.amount,
                granted_amount=entry.amount,
            )
        payment.kind, payment.granted_amount = kind, entry.amount
    return payment


def _reversal_target(payment: StripePayment | None) -> int:
    """What the payment's grant and shares call for taking back in total."""
    if payment is None:
        return 0
    share = min(SHARE_WHOLE, payment.refunded_share + payment.disputed_share)
    return min(payment.granted_amount, payment.granted_amount * share // SHARE_WHOLE)


def _settled_target(payment_id: str) -> int:
    """The target as of the last settlement: the stored row, before this event changes it."""
    return _reversal_target(StripePayment.get_or_none(StripePayment.id == payment_id))


def payment_on_record(account: BillingAccount, payment_id: str) -> StripePayment | None:
    """The payment row, also for a grant made before payments were tracked (auto-recharge,
    older top-ups), read under the account's lock."""
    return _payment_row(account.organization_id, payment_id)


def _settle_reversals(
    account: BillingAccount, payment: StripePayment, reference: str, settled: int
) -> int:
    """Take back what this event adds to the target (`settled` is the target before it), at
    most what is available. Returns the amount taken now.

    A shortfall (the payment's credits were already spent) is not carried over: a later event
    about the same payment must not take credits another payment bought (DESIGN: a reversal
    takes "at most what remains")."""
    target = _reversal_target(payment)
    due = min(target - settled, target - payment.reversed_amount)
    available = max(0, account.credits_balance - account.reserved_credits)
    taken = min(due, available)
    if taken > 0:
        kind = ReversalKind.dispute if payment.disputed_share else ReversalKind.refund
        _append(
            account,
            CreditEntryType(kind.value),
            -taken,
            reason=f"{kind} of {payment.id}",
            reference_id=reference,
            idempotency_ref=None,
        )
        payment.reversed_amount += taken
    payment.updated_at = utcnow()
    payment.save()
    return max(taken, 0)


def credit_payment(
    account: BillingAccount,
    payment_id: str,
    *,
    kind: PaymentKind,
    ordered: int | None,
    charged_currency: str | None = None,
    charged_amount: int | None = None,
    charge_id: str | None = None,
    grant_amount: int | None = None,
    flagged_reason: str | None = None,
) -> PaymentOutcome:
    """Record a Stripe payment; grant `grant_amount` once unless it is (or was) flagged.

    A flagged payment (its settlement did not match the order) is recorded and never credited
    here: an operator decides. Reversals reported before the grant apply right after it.
    Takes the locked account of the payment's organization.
    """
    organization_id = account.organization_id
    settled = _settled_target(payment_id)
    payment = _payment_row(organization_id, payment_id)
    if payment is None:
        payment = StripePayment.create(
            id=payment_id, organization=organization_id, kind=kind, ordered_amount=ordered
        )
    if not payment.granted_amount:
        # The payment's own report names its kind; a reversal reported before it only guessed.
        payment.kind = kind
    payment.ordered_amount = payment.ordered_amount or ordered
    payment.charge_id = payment.charge_id or charge_id
    if charged_currency and charged_amount and payment.charged_amount is None:
        payment.charged_currency, payment.charged_amount = charged_currency, charged_amount
    if flagged_reason:
        payment.flagged_reason = flagged_reason[:500]
    granted_now = 0
    if grant_amount is not None and not payment.flagged_reason and payment.granted_amount == 0:
        _check_amount(grant_amount)
        ref = _GRANT_REFS[PaymentKind(payment.kind)].format(payment_id)
        top_up = payment.kind == PaymentKind.top_up
        existing = _replay(ref, organization_id)
        if existing is None:
            _append(
                account,
                CreditEntryType.top_up if top_up else CreditEntryType.recharge,
                grant_amount,
                reason="credit top-up" if top_up else "auto-recharge",
                reference_id=payment_id,
                idempotency_ref=ref,
            )
            granted_now = grant_amount
        payment.granted_amount = existing.amount if existing else grant_amount
    reversed_now = _settle_reversals(account, payment, payment.charge_id or payment_id, settled)
    return PaymentOutcome(payment, granted_now, reversed_now)


def reverse_payment(
    account: BillingAccount,
    payment_id: str,
    *,
    kind: ReversalKind,
    share: int,
    reference_id: str,
    charge_id: str | None = None,
) -> PaymentOutcome:
    """A refund (`share` = the cumulative refunded share of the payment) or a lost dispute
    (`share` = this dispute's share, added once per dispute by the caller's own state), on the
    payment's locked account: never more than the payment granted in total."""
    organization_id = account.organization_id
    settled = _settled_target(payment_id)
    payment = _payment_row(organization_id, payment_id)
    if payment is None:
        # Reported before the payment itself: remembered, applied when it is credited.
        payment = StripePayment.create(
            id=payment_id, organization=organization_id, kind=PaymentKind.top_up
        )
    payment.charge_id = payment.charge_id or charge_id
    if kind == ReversalKind.refund:
        payment.refunded_share = max(payment.refunded_share, min(share, SHARE_WHOLE))
    else:
        payment.disputed_share = min(SHARE_WHOLE, payment.disputed_share + max(share, 0))
    reversed_now = _settle_reversals(account, payment, reference_id, settled)
    return PaymentOutcome(payment, 0, reversed_now)
