"""schemas/stripe-events-dlq.md names every reason code and header the ledger consumer writes."""

from __future__ import annotations

from pathlib import Path

from meterline.billing.consumer import dead_letter_headers
from meterline.billing.ledger_actions import Reason

DOC = Path(__file__).resolve().parents[2] / "schemas" / "stripe-events-dlq.md"


def test_stripe_dlq_doc_names_every_reason_and_header() -> None:
    doc = DOC.read_text()
    for reason in Reason:
        assert f"`{reason.value}`" in doc, reason
    headers = dead_letter_headers("unknown_plan", "x", "stripe.events", 1, 2, "evt_1", "invoice.paid")
    for name, _ in headers:
        short = name.removeprefix("meterline.original.")
        assert f"`{name}`" in doc or f"`.{short}`" in doc, name
