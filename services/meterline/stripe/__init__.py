"""What runs against Stripe: the usage-report sink, its transport, the reconciler and
provisioning. The local emulator lives in `meterline.devstack.stripe_emulator`."""
