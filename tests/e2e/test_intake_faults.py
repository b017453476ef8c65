"""Issue 9, reproduction 3, through the real broker: an agent crash mid-run loses nothing.

A processor subprocess (tests/e2e/faulty_processor.py) whose agent crashes once mid-run
and which then loses one run between consumer and agent, while load flows. Before the
gap-proof intake, the next run moved the checkpoint past the records the crashed run
never handled; now the partition is sought back and every event is debited once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from integration.harness import (
    db_pool,
    fleet,
    metric_value,
    scrape,
    send_until_exact,
    wait_for_owners,
)
from meterline.config import Settings
from meterline.devstack.embedded import _free_port
from meterline.devstack.load import LoadGenerator, customer_ids

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

FAULTY_PROCESSOR = Path(__file__).with_name("faulty_processor.py")


async def test_agent_crash_mid_run_and_a_lost_run_neither_lose_nor_double_debits(
    pipeline_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    port = _free_port()
    settings = pipeline_settings(customers=20, processor={"metrics_port": port})
    with fleet(settings, tmp_path) as workers:
        workers.spawn("w0", str(FAULTY_PROCESSOR), "-c", str(workers.config), "processor",
                      "--worker-id", "w0")
        async with db_pool(settings.database_url) as pool:
            await wait_for_owners(pool, settings, {"w0"}, workers=workers)
            gen = LoadGenerator(settings, customer_ids(20), duplicates=0, late=0, invalid=0, seed=9)
            await send_until_exact(pool, gen, rate=800, seconds=4, workers=workers, timeout=45)
            samples = scrape(port)
        log = (tmp_path / "w0.log").read_text()
    assert "injected: the agent crashes mid-run" in log
    assert "injected: dropped a run" in log
    assert metric_value(samples, "meterline_agent_crashes_total") == 1
    # One seek back after the crash (the agent's rewind), one when the run after the lost
    # one arrived past the partition's next unhandled record.
    assert metric_value(samples, "meterline_intake_gaps_total") >= 2
    # Nothing was applied twice and then dropped by dedupe: intake itself was exact.
    assert metric_value(samples, "meterline_events_duplicate_total") == 0
    assert metric_value(samples, "meterline_events_debited_total") == gen.stats.events_sent
