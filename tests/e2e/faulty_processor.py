"""`meterline processor` with two faults injected, for test_intake_faults.py (run as a script).

`python faulty_processor.py -c CONFIG processor --worker-id ID` (the `meterline` CLI):

- the first slice of at least two records the agent applies raises (the agent crashes
  mid-run: `Pipeline.consume` raises, like a bug outside the per-record containment);
- after that, the consumer drops one current run on its way to the agent (a run lost
  between the consumer and the agent: only the next run of its partition can tell).

Everything else is the real processor: Faust, the real consumer thread, broker, Postgres.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

from meterline.cli import main
from meterline.core.events import UsageEvent
from meterline.processor import app as processor_app
from meterline.processor.pipeline import Pipeline

faults = {"crashed": False, "dropped": False}


def inject() -> None:
    apply = Pipeline._apply

    def crashing_apply(self: Pipeline, partition: int, accepted: list[UsageEvent],
                       rejected: list[str], records: int, next_offset: int, now_ms: int) -> None:
        if not faults["crashed"] and records >= 2:
            faults["crashed"] = True
            raise RuntimeError("injected: the agent crashes mid-run")
        apply(self, partition, accepted, rejected, records, next_offset, now_ms)

    getmany = processor_app.CheckpointedConsumer.getmany

    async def dropping_getmany(self: processor_app.CheckpointedConsumer,
                               timeout: float) -> AsyncIterator[tuple[Any, Any]]:
        async for tp, message in getmany(self, timeout):
            run = message.value
            if (faults["crashed"] and not faults["dropped"] and self.pipeline is not None
                    and run.generation == self.pipeline.generation(tp.partition)):
                faults["dropped"] = True
                print(f"injected: dropped a run of partition {tp.partition}", flush=True)
                continue
            yield tp, message

    Pipeline._apply = crashing_apply  # type: ignore[method-assign]
    processor_app.CheckpointedConsumer.getmany = dropping_getmany  # type: ignore[method-assign]


if __name__ == "__main__":
    inject()
    sys.exit(main(sys.argv[1:]))
