"""Stripe webhooks: the bridge that verifies them and stores them in Kafka, and their handlers."""
