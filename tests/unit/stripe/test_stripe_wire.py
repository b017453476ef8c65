"""Pure helpers of the Stripe emulator: form decoding, exact JSON, ingestion rules."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from meterline.devstack.stripe_emulator.emulator import StripeEmulator
from meterline.devstack.stripe_emulator.wire import StripeHTTPError, dumps, parse_form


def test_parse_form_nests_bracket_keys() -> None:
    form = parse_form([("event_name", "api"), ("payload[stripe_customer_id]", "cus_1"),
                       ("payload[value]", "2.5"), ("expand[0]", "x")])

    assert form == {"event_name": "api", "payload": {"stripe_customer_id": "cus_1", "value": "2.5"},
                    "expand": {"0": "x"}}


def test_dumps_emits_decimals_exactly() -> None:
    text = dumps({"v": Decimal("0.1") + Decimal("0.2"), "n": [1, None, "a"]})

    assert json.loads(text, parse_float=Decimal) == {"v": Decimal("0.3"), "n": [1, None, "a"]}


def _emulator(now: list[float]) -> StripeEmulator:
    emu = StripeEmulator(clock=lambda: now[0], seed=1)
    emu.customers["cus_1"] = {"id": "cus_1"}
    emu.meters["mtr_1"] = {
        "id": "mtr_1", "event_name": "api", "status": "active",
        "default_aggregation": {"formula": "sum"},
        "customer_mapping": {"event_payload_key": "stripe_customer_id"},
        "value_settings": {"event_payload_key": "value"},
    }
    return emu


def test_identifier_dedupe_expires_after_24_hours() -> None:
    now = [1_000_000.0]
    emu = _emulator(now)
    payload = {"stripe_customer_id": "cus_1", "value": "3"}

    first = emu.ingest("api", payload, "id-1", None, "v1")
    with pytest.raises(StripeHTTPError) as err:  # v1: refused, as Stripe refuses it
        emu.ingest("api", payload, "id-1", None, "v1")
    assert err.value.status == 400 and "already exists" in str(err.value)
    assert emu.ingest("api", payload, "id-1", None, "v2") is first  # v2: dropped silently
    now[0] += 86_400
    emu.ingest("api", payload, "id-1", None, "v1")

    assert emu.summarize("mtr_1", "cus_1", 0, 2_000_000) == Decimal(6)


@pytest.mark.parametrize(("payload", "code"), [
    ({"value": "1"}, "meter_event_no_customer_defined"),
    ({"stripe_customer_id": "cus_1"}, "meter_event_value_not_found"),
    ({"stripe_customer_id": "cus_1", "value": "NaN"}, "meter_event_invalid_value"),
])
def test_invalid_payloads_are_rejected(payload: dict[str, str], code: str) -> None:
    with pytest.raises(StripeHTTPError) as err:
        _emulator([1_000_000.0]).ingest("api", payload, None, None, "v1")

    assert err.value.status == 400 and err.value.body["code"] == code
