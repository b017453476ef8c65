"""A report's value sent to Stripe has at most 15 significant digits and the rounding
remainder is carried to the next report (issue 10.11): `reports.stripe_value`, one case
per line."""

from __future__ import annotations

from decimal import Decimal

import pytest

from meterline.stripe.reports import STRIPE_SIGNIFICANT_DIGITS, stripe_value

D = Decimal


@pytest.mark.parametrize(("quantity", "carry", "sent", "left"), [
    # 15 digits or fewer and nothing carried: sent as it is
    (D("3"), D(0), D("3"), D(0)),
    (D("0.1"), D(0), D("0.1"), D(0)),
    (D("123456789012345"), D(0), D("123456789012345"), D(0)),
    # trailing zeros of a numeric column are not significant
    (D("2.500000000000000000"), D(0), D("2.5"), D(0)),
    # 17 significant digits (a JSON double's shortest decimal): rounded half-even, rest carried
    (D("12345678.901234567"), D(0), D("12345678.9012346"), D("-0.000000033")),
    # the carry is paid into the next report
    (D("1"), D("-0.000000033"), D("0.999999967"), D(0)),
    # a sum of two 15-digit values needing 16
    (D("999999999999999") + D("0.5"), D(0), D("1.00000000000000E+15"), D("-0.5")),
    # a correction going down (a negative report) follows the same rule
    (D("-12345678.901234567"), D(0), D("-12345678.9012346"), D("0.000000033")),
])
def test_stripe_value(quantity: Decimal, carry: Decimal, sent: Decimal, left: Decimal) -> None:
    got_sent, got_left = stripe_value(quantity, carry)

    assert (got_sent, got_left) == (sent, left)
    assert len(got_sent.as_tuple().digits) <= STRIPE_SIGNIFICANT_DIGITS
    assert got_sent + got_left == quantity + carry  # nothing lost, nothing made
