"""Kafka plumbing shared by every meterline producer: one way to create, use and replace one."""
