"""A local emulator of the Stripe APIs meterline calls, for dev runs and tests only.

Billing Meter events, customers and meters (`emulator`, `routes`), Stripe-shaped webhook
objects and their delivery (`objects`, `triggers`, `signing`), and the wire format
(`wire`). Nothing in production imports it: `meterline.stripe` is the code that runs
against Stripe itself (tests/unit/test_architecture.py keeps the two apart).
"""

from meterline.devstack.stripe_emulator.emulator import StripeEmulator, run, serve
from meterline.devstack.stripe_emulator.signing import sign_payload

__all__ = ["StripeEmulator", "run", "serve", "sign_payload"]
