"""Projected depletion of a prepaid balance from its recent burn rate. Pure, Decimal only.

The burn rate is the credits debited over a recent span divided by its length;
the balance runs out `balance / rate` from now if usage goes on at that rate.
Grants that expire before then are not modelled: the projection answers "when
does usage alone use the credits up", which is what a top-up reminder needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from meterline.core.credits import round_credits

# Beyond this a projection is noise (and datetime stops at year 9999).
HORIZON = timedelta(days=3650)

DEPLETED = "depleted"
PROJECTED = "projected"
NO_RECENT_USAGE = "no_recent_usage"
BEYOND_HORIZON = "beyond_horizon"


@dataclass(frozen=True, slots=True)
class Projection:
    status: str
    # credits per hour over the span, rounded half-even to the ledger's places
    burn_rate_per_hour: Decimal
    depletes_at: datetime | None


def project(
    balance: Decimal, burned: Decimal, since: datetime, now: datetime, places: int = 6
) -> Projection:
    """Project when `balance` reaches zero, given `burned` credits debited in [since, now)."""
    seconds = Decimal((now - since).total_seconds())
    rate_per_second = burned / seconds if burned > 0 and seconds > 0 else Decimal(0)
    rate_per_hour = round_credits(rate_per_second * 3600, places)
    if balance <= 0:
        return Projection(DEPLETED, rate_per_hour, None)
    if rate_per_second <= 0:
        return Projection(NO_RECENT_USAGE, rate_per_hour, None)
    left_seconds = balance / rate_per_second
    if left_seconds > Decimal(HORIZON.total_seconds()):  # checked first: timedelta overflows
        return Projection(BEYOND_HORIZON, rate_per_hour, None)
    return Projection(PROJECTED, rate_per_hour, now + timedelta(seconds=float(left_seconds)))
