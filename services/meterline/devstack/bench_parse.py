"""Micro-benchmark of the processor's hot path, `EventValidator.parse_record`.

    python -m meterline.devstack.bench_parse                  # this tree
    git show REF:services/meterline/core/events.py > /tmp/events_ref.py
    python -m meterline.devstack.bench_parse --baseline /tmp/events_ref.py   # A/B, interleaved

Shapes: single-event messages and 200-event batches as `meterline load` writes them,
and a 200-event batch whose last member is rejected (the DLQ path). Best of N rounds,
microseconds per message; rounds of both versions alternate so machine noise hits both.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from meterline.config import load_settings
from meterline.core import events
from meterline.devstack.load import LoadGenerator, customer_ids

DEV_CONFIG = Path(__file__).with_name("dev-config.yaml")


def _module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("events_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _validator(module: Any, settings: Any) -> Any:
    p = settings.processor
    limits = module.Limits(p.max_message_bytes, p.max_batch_events, int(p.max_lateness_days * 86_400_000),
                           p.max_future_skew_ms)
    return module.EventValidator(settings.meter_for_type(), limits)


def _reject_last(batch: bytes) -> bytes:
    at = batch.rindex(b'"type":"') + len(b'"type":"')
    return batch[:at] + b"no.such.meter." + batch[at:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="an events.py to compare against (e.g. from git show)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    settings = load_settings(DEV_CONFIG)
    versions = {"this tree": _validator(events, settings)}
    if args.baseline:
        versions = {"baseline": _validator(_module(args.baseline), settings), **versions}
    gen = LoadGenerator(settings, customer_ids(1000), seed=1, bootstrap_servers="127.0.0.1:9")
    now_ms = int(time.time() * 1000)
    batches = [b"[" + b",".join(gen.make_event(now_ms)[1] for _ in range(200)) + b"]" for _ in range(100)]
    shapes = {
        "single": [gen.make_event(now_ms)[1] for _ in range(20_000)],
        "batch200": batches,
        # the last member rejected: the most a batch's rejected-member bytes can cost
        "batch200, last rejected": [_reject_last(b) for b in batches],
    }
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for name, validator in versions.items():
            for shape, messages in shapes.items():
                parse = validator.parse_record
                started = time.perf_counter()
                for offset, message in enumerate(messages):
                    parse(message, offset, now_ms)
                per_message = (time.perf_counter() - started) / len(messages)
                best[(name, shape)] = min(best.get((name, shape), float("inf")), per_message)
    for shape in shapes:
        line = ", ".join(f"{name} {best[(name, shape)] * 1e6:.2f} us/msg" for name in versions)
        if args.baseline:
            change = best[("this tree", shape)] / best[("baseline", shape)] - 1
            line += f" ({change * 100:+.1f} %)"
        print(f"{shape}: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
