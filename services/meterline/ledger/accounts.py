"""Accounts and transfers of one customer, decided in memory. Pure: no I/O.

A `CustomerBook` is the state of one customer's accounts as locked for one
transaction (its open grants and its receivable). Each operation returns the
`Transfer`s it decided and updates the book, so the next operation in the same
transaction (the next window of a flush, the settlement after a grant) sees
them. `storage`-side code (ledger.book) writes the transfers and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal

from meterline.core.credits import Grant, burn_order
from meterline.core.money import MONEY

ZERO = Decimal(0)

ISSUER = "issuer"
GRANT = "grant"
RECEIVABLE = "receivable"
USAGE = "usage"
EXPIRED = "expired"
# The accounts whose balances make up the customer's balance (receivable counts negative).
HELD = (GRANT, RECEIVABLE)


@dataclass(frozen=True, slots=True)
class Account:
    kind: str  # ISSUER | GRANT | RECEIVABLE | USAGE | EXPIRED
    grant: int | None = None  # the grant id of a GRANT account

    def __str__(self) -> str:
        return f"grant:{self.grant}" if self.kind == GRANT else self.kind


def grant_account(grant_id: int) -> Account:
    return Account(GRANT, grant_id)


ISSUER_ACCOUNT = Account(ISSUER)
RECEIVABLE_ACCOUNT = Account(RECEIVABLE)
USAGE_ACCOUNT = Account(USAGE)
EXPIRED_ACCOUNT = Account(EXPIRED)


@dataclass(frozen=True, slots=True)
class Transfer:
    """`amount` (> 0) credits moved from `source` to `target`."""

    source: Account
    target: Account
    amount: Decimal
    reason: str
    reverses: int | None = None  # the transfer a credit-back reverses

    def __post_init__(self) -> None:
        if not self.amount > 0:
            raise ValueError(f"a transfer moves a positive amount, not {self.amount}")
        if self.source == self.target:
            raise ValueError("a transfer needs two different accounts")

    def held_delta(self) -> Decimal:
        """What this transfer changes the customer's balance by (Σ grants − receivable)."""
        into = self.target.kind in HELD
        out = self.source.kind in HELD
        return self.amount if into and not out else -self.amount if out and not into else ZERO


@dataclass(frozen=True, slots=True)
class Paid:
    """An earlier transfer into `usage` (for one window), and how much of it is not reversed."""

    transfer_id: int
    source: Account
    unreversed: Decimal


@dataclass(slots=True)
class CustomerBook:
    """One customer's locked accounts: open grants (by id) and the receivable debt."""

    customer: str
    grants: dict[int, Grant]
    receivable: Decimal  # debt: minus the receivable account's balance
    closed: set[int] = field(default_factory=set)  # expired grants (accounts closed)
    # thresholds fired and not re-armed (core.credits.threshold_fires); None: not known yet
    fired: frozenset[int] | None = None

    def _move(self, t: Transfer) -> Transfer:
        for account, sign in ((t.source, -1), (t.target, 1)):
            if account.kind == GRANT:
                assert account.grant is not None
                g = self.grants[account.grant]
                self.grants[account.grant] = replace(
                    g, remaining=MONEY.add(g.remaining, MONEY.multiply(sign, t.amount)))
            elif account.kind == RECEIVABLE:
                self.receivable = MONEY.subtract(self.receivable, MONEY.multiply(sign, t.amount))
        return t

    @property
    def balance(self) -> Decimal:
        """Invariant 1: Σ grant balances − receivable."""
        total = ZERO
        for g in self.grants.values():
            total = MONEY.add(total, g.remaining)
        return MONEY.subtract(total, self.receivable)

    # --- the operations -------------------------------------------------------------------

    def issue(self, grant: Grant, amount: Decimal, reason: str) -> list[Transfer]:
        """issuer -> grant, then the new grant settles the receivable first (a debt is paid
        by the next credits that arrive, so expiry can never write off what paid it)."""
        self.grants[grant.id] = replace(grant, remaining=ZERO)
        out = [self._move(Transfer(ISSUER_ACCOUNT, grant_account(grant.id), amount, reason))]
        settle = min(self.receivable, amount)
        if settle > 0:
            out.append(self._move(Transfer(grant_account(grant.id), RECEIVABLE_ACCOUNT, settle,
                                           "settlement")))
        return out

    def use(self, amount: Decimal, event_at: datetime, now: datetime, target: Account,
            reason: str) -> list[Transfer]:
        """Take `amount` out of the grants into `target` (usage, or the issuer for a manual
        adjustment); what no grant covers comes from the receivable (overage).

        Late usage rule: first the grants usable at the usage's own time (`event_at`)
        that still hold credits, then those usable now, each group in burn-down order."""
        left = amount
        out: list[Transfer] = []
        for at in (event_at, now) if event_at != now else (now,):
            for g in sorted((g for g in self.grants.values()
                             if g.id not in self.closed and g.usable_at(at)), key=burn_order):
                if left <= 0:
                    break
                take = min(g.remaining, left)
                out.append(self._move(Transfer(grant_account(g.id), target, take, reason)))
                left = MONEY.subtract(left, take)
        if left > 0:
            out.append(self._move(Transfer(RECEIVABLE_ACCOUNT, target, left, reason)))
        return out

    def credit_back(self, amount: Decimal, paid: Sequence[Paid], now: datetime) -> list[Transfer]:
        """Give `amount` back by reversing the transfers that paid for it, newest first:
        to the receivable when overage paid, to the grant while it is open, else to
        `expired` (the credits expire with their grant, they never outlive it)."""
        left = amount
        out: list[Transfer] = []
        for p in sorted(paid, key=lambda p: (p.source.kind != RECEIVABLE, -p.transfer_id)):
            if left <= 0:
                break
            give = min(p.unreversed, left)
            if give <= 0:
                continue
            target = p.source
            if target.kind == GRANT and (target.grant in self.closed
                                         or target.grant not in self.grants):
                target = EXPIRED_ACCOUNT
            out.append(self._move(Transfer(USAGE_ACCOUNT, target, give, "credit_back",
                                           reverses=p.transfer_id)))
            left = MONEY.subtract(left, give)
        if left > 0:
            # usage billed before the ledger kept transfers (migrated rows): back to the customer
            out.append(self._move(Transfer(USAGE_ACCOUNT, RECEIVABLE_ACCOUNT, left, "credit_back")))
        return out

    def expire(self, grant_id: int) -> list[Transfer]:
        """grant -> expired for what the grant still holds (only that), and close it."""
        g = self.grants[grant_id]
        self.closed.add(grant_id)
        if g.remaining <= 0:
            return []
        return [self._move(Transfer(grant_account(grant_id), EXPIRED_ACCOUNT, g.remaining,
                                    "expiry"))]

    def void(self, grant_id: int, credits: Decimal, reason: str) -> list[Transfer]:
        """grant -> issuer for up to `credits` of what the grant still holds."""
        g = self.grants.get(grant_id)
        if g is None or grant_id in self.closed:
            return []
        take = min(g.remaining, credits)
        if take <= 0:
            return []
        return [self._move(Transfer(grant_account(grant_id), ISSUER_ACCOUNT, take, reason))]


def overage_of(transfers: Iterable[Transfer]) -> Decimal:
    """What the receivable paid (usage or adjustments no grant covered)."""
    total = ZERO
    for t in transfers:
        if t.source.kind == RECEIVABLE:
            total = MONEY.add(total, t.amount)
    return total


def held_delta(transfers: Iterable[Transfer]) -> Decimal:
    total = ZERO
    for t in transfers:
        total = MONEY.add(total, t.held_delta())
    return total
