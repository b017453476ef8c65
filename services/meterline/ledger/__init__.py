"""The credits ledger: every change of money is a transfer between two accounts.

Accounts (per customer)::

    issuer ──grant──► grant:N ──usage──► usage ◄──usage (overage)── receivable
      ▲                 │  │                                           ▲
      └─void/refund/adj─┘  └──expiry──► expired     grant:N ─settlement┘

- `issuer`: where credits come from (grants) and return to (voids, refunds,
  manual adjustments);
- `grant:N`: one account per grant; its balance is `grants.remaining`;
- `usage`: what usage consumed; `receivable`: usage no grant covered (the
  customer's overage debt is minus its balance, `balances.receivable`);
- `expired`: what expiry wrote off.

A ledger entry (`ledger_entries`) is one business event of one customer — a
grant, a window aggregate's debit, an expiry, a void, an adjustment — and groups
its linked transfers (`transfers`), which commit together or not at all.

Invariants (checked by `ledger.audit`, the property tests and `meterline dev`):

1. every account's balance == Σ its transfers (in minus out); the customer's
   balance == Σ its grant balances − receivable debt;
2. no credit outlives its grant: an expired grant's account is closed at 0, and a
   credit-back aimed at it goes to `expired` instead;
3. a window's debited credits == round(final window value × rate), however its
   events were split between the first flush and its corrections;
4. the sum of all accounts is zero: transfers move credits, never create them.

How it is kept:

- only this package writes `transfers`, and `book.post` moves the cached
  balances (grants.remaining, balances.balance/receivable/granted) in the same
  statement, by sums of the rows it inserts; nothing computes a balance in Python
  from an earlier read and writes it back;
- lock order, in code: `book.open_books` is the only function that takes ledger
  locks: the customers' `balances` rows sorted by customer id, then their grant
  rows sorted by (customer id, grant id). A grant row is only ever locked by a
  holder of its customer's balances row, so two ledger transactions first meet on
  the lowest customer id and never deadlock (expiry used to lock grants first);
- every money sum and product runs in `core.money.MONEY` (60 digits).

Rules written down:

- burn-down: priority, then earliest expiry (never-expiring last), then earliest
  effective, then grant id (core.credits.burn_order);
- late usage burns first the grants usable at the window's own start that still
  hold credits, then the grants usable now, then the receivable (overage);
- a grant whose `effective_at` is in the future is on record but issues nothing until
  it takes effect (`issue_due_grants`, run by the processor's clock with expiry);
- a void of a grant not yet in effect moves nothing: it is recorded on the grant
  (`voided_before_issue`) and the grant issues only its unvoided part (none if all voided);
- a grant settles the receivable first (grant -> receivable), so an expiry can
  only write off what the grant still holds, never the part that paid a debt;
- a window's debit is round(final value × rate) − what the window was already
  debited; a negative difference is a credit-back that reverses the transfers
  that paid for the window, newest first (receivable first, then grants); to a
  grant that has expired it goes to `expired`;
- `granted` (the threshold base) is Σ over grants not yet expired of issued −
  voided: +amount at issue, −voided at a void, −(issued − voided) at expiry,
  whether the grant was used up or not;
- thresholds fire once per crossing per period (core.credits.threshold_fires): a fired
  one re-arms only when a change raises the balance and leaves the share consumed below
  it (a top-up or credit-back that does not take the share back under it re-arms nothing,
  so using those credits again fires nothing twice); a plan period's allocation
  (`PLAN_ALLOCATION_REASON`, config or Stripe) starts the period over: every threshold is
  re-armed and those the share still reaches after the allocation (a debt bigger than the
  allocation, a rollover base mostly used) fire once for the new period; the fired set is
  kept per customer (balances.thresholds_fired) by `book.post`;
- refunds and lost disputes void the refunded share of every grant the charge paid
  for, pro rata (billing.stripe_ledger); a void takes only what the grant still holds.
"""

from meterline.ledger.changes import (
    PLAN_ALLOCATION_REASON,
    GrantRequest,
    apply_adjustment,
    apply_grant,
    apply_grant_change,
    apply_grants,
    expire_grants,
    issue_due_grants,
    void_grant_credits,
)

__all__ = [
    "PLAN_ALLOCATION_REASON",
    "GrantRequest",
    "apply_adjustment",
    "apply_grant",
    "apply_grant_change",
    "apply_grants",
    "expire_grants",
    "issue_due_grants",
    "void_grant_credits",
]
