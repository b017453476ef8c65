"""The one Decimal context every money sum and product runs in.

Python's default context keeps 28 significant digits: a window total of
quantities up to 10^15 with 12 decimal places, or a balance of such debits,
silently loses its last digits there. MONEY keeps 60 — room for any sum of
capped quantities times any credit rate — and every credit amount, window
total and transfer is computed with it explicitly (`MONEY.add`, `MONEY.multiply`,
or `localcontext(MONEY)` around a block), never with the thread's default.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation, Overflow

MONEY = Context(prec=60, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, Overflow])


def add(a: Decimal | int, b: Decimal | int) -> Decimal | int:
    """a + b: exact for ints (kept int, the hot path), in MONEY otherwise."""
    if type(a) is int and type(b) is int:
        return a + b
    return MONEY.add(a, b)


def subtract(a: Decimal | int, b: Decimal | int) -> Decimal | int:
    """a - b: exact for ints (kept int), in MONEY otherwise."""
    if type(a) is int and type(b) is int:
        return a - b
    return MONEY.subtract(a, b)


def money_sum(amounts: Iterable[Decimal | int]) -> Decimal:
    """Σ amounts in the MONEY context (exact for any amounts of up to 60 digits)."""
    total = Decimal(0)
    for a in amounts:
        total = MONEY.add(total, a)
    return total

