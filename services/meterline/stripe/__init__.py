"""Local Stripe tooling for meterline: a Billing Meter emulator and webhook signing."""

from meterline.stripe.emulator import StripeEmulator, run, serve
from meterline.stripe.webhooks import sign_payload

__all__ = ["StripeEmulator", "run", "serve", "sign_payload"]
