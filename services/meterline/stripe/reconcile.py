"""`meterline reconcile`: the ledger, what the sink reported, and what Stripe says, side by side.

For every (customer, billed meter, billing period) in the lookback it compares

    ledger     usage in window aggregates (what customers were debited for)
    in flight  usage in reports not finished yet (open, pending, sending)
    rejected   usage in reports Stripe refused (on usage.aggregates.dlq)
    reported   usage in reports Stripe accepted
    stripe     Stripe's meter event summary for the customer and period

and the variance |(ledger - in flight) - stripe| / (ledger - in flight). Only buckets that
ended before a cutoff (coalescing interval + seal grace + `settle_seconds` ago, aligned to
whole buckets and minutes) are compared, so usage still on its way is not a variance.

Rows above `threshold_percent` are flagged. When Stripe has less than settled usage, the
reconciler repairs what it safely can (`resubmit`):

* aggregates no report carries (the sink never staged them) are staged now;
* accepted reports of the row, accepted within `resubmit_horizon_hours`, are queued again
  with their identifiers. Stripe answers the ones it has with "already exists" (counted as
  accepted) and takes the ones it lost. Beyond its 24 h identifier dedupe a resend could
  double-bill, so older rows are only flagged for a human.

Stripe having *more* than the ledger is never "repaired" (it would need meter event
adjustments): it is flagged. Rejected reports are listed; `--retry-rejected` queues them
again once their cause (e.g. a customer mapping) is fixed.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from meterline import metrics
from meterline.config import Settings
from meterline.core.credits import decimal_text
from meterline.storage.db import create_pool
from meterline.storage.grants import period_bounds
from meterline.stripe import reports
from meterline.stripe.reports import Staged
from meterline.stripe.sink import stripe_api_key
from meterline.stripe.transport import Stripe

log = logging.getLogger(__name__)

ZERO = Decimal(0)


@dataclass
class Row:
    customer: str
    meter: str
    period_start: datetime
    period_end: datetime
    stripe_customer_id: str | None = None
    ledger: Decimal = ZERO
    in_flight: Decimal = ZERO
    rejected: Decimal = ZERO
    reported: Decimal = ZERO
    stripe: Decimal | None = None
    variance: Decimal = ZERO
    flagged: bool = False
    unreported_aggregates: int = 0
    resubmitted_reports: int = 0
    note: str = ""

    @property
    def settled(self) -> Decimal:
        return self.ledger - self.in_flight

    def judge(self, threshold_percent: Decimal) -> None:
        stripe = self.stripe if self.stripe is not None else ZERO
        if self.settled:
            self.variance = abs(self.settled - stripe) / abs(self.settled)
        else:
            self.variance = Decimal(1) if stripe else ZERO
        self.flagged = self.variance * 100 > threshold_percent or self.stripe is None


@dataclass
class Report:
    started_at: datetime
    cutoff: datetime
    threshold_percent: Decimal
    rows: list[Row] = field(default_factory=list)

    @property
    def max_variance(self) -> Decimal:
        return max((r.variance for r in self.rows), default=ZERO)

    @property
    def flagged(self) -> list[Row]:
        return [r for r in self.rows if r.flagged]

    def summary(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at.isoformat(), "cutoff": self.cutoff.isoformat(),
            "rows": len(self.rows), "flagged": len(self.flagged),
            "max_variance": decimal_text(self.max_variance),
            "threshold_percent": decimal_text(self.threshold_percent),
            "unreported_aggregates_resubmitted": sum(r.unreported_aggregates for r in self.rows),
            "reports_resubmitted": sum(r.resubmitted_reports for r in self.rows),
            "ledger_total": decimal_text(sum((r.ledger for r in self.rows), ZERO)),
            "stripe_total": decimal_text(sum((r.stripe or ZERO for r in self.rows), ZERO)),
        }

    def write(self, directory: Path) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        stem = directory / f"reconcile-{self.started_at.strftime('%Y%m%dT%H%M%SZ')}"
        rows = [_plain(asdict(r)) for r in self.rows]
        json_path = stem.with_suffix(".json")
        json_path.write_text(json.dumps({"summary": self.summary(), "rows": rows}, indent=2))
        csv_path = stem.with_suffix(".csv")
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["customer"])
            writer.writeheader()
            writer.writerows(rows)
        return json_path, csv_path


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: decimal_text(v) if isinstance(v, Decimal) else
            v.isoformat() if isinstance(v, datetime) else "" if v is None else v
            for k, v in d.items()}


def periods(now: datetime, period: str, lookback: int) -> list[tuple[datetime, datetime]]:
    out = [period_bounds(period, now)]
    for _ in range(lookback):
        out.append(period_bounds(period, out[-1][0] - timedelta(seconds=1)))
    return sorted(out)


def cutoff_for(now: datetime, settings: Settings, settle_seconds: float) -> datetime:
    """Buckets starting before this are expected to be in Stripe already (aligned so a
    bucket is never cut in two and Stripe's minute-aligned summaries can end there)."""
    interval = settings.stripe.coalesce_interval_seconds
    align = math.lcm(60, interval or 1)
    margin = interval + settings.stripe.seal_grace_seconds + settle_seconds
    t = int(now.timestamp() - margin)
    return datetime.fromtimestamp(t - t % align, UTC)


class Reconciler:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, stripe: Stripe) -> None:
        self.settings = settings
        self.cfg = settings.reconcile
        self.pool = pool
        self.stripe = stripe
        self.billed = {m.key: m.stripe_event_name for m in settings.meters if m.stripe_event_name}
        self._meter_ids: dict[str, str] = {}

    async def meter_ids(self) -> dict[str, str]:
        if not self._meter_ids:
            listed = await self.stripe.client.v1.billing.meters.list_async({"limit": 100})
            self._meter_ids = {m.event_name: m.id for m in listed.data}
        return self._meter_ids

    async def stripe_usage(self, meter_id: str, customer: str, start: datetime,
                           end: datetime) -> Decimal:
        """Stripe's summary, read from the raw JSON: the SDK turns `aggregated_value` into a
        float, which is not good enough to compare money-grade quantities exactly."""
        resp = await self.stripe.client.raw_request_async(
            "get", f"/v1/billing/meters/{meter_id}/event_summaries",
            customer=customer, start_time=int(start.timestamp()), end_time=int(end.timestamp()))
        data = json.loads(resp.body, parse_float=Decimal)["data"]
        return sum((Decimal(str(s["aggregated_value"])) for s in data), ZERO)

    async def run_once(self, *, resubmit: bool, retry_rejected: bool = False,
                       period: str | None = None, now: datetime | None = None,
                       cutoff: datetime | None = None) -> Report:
        """Reconcile the lookback periods up to `cutoff` (default: what should have settled
        by `now`); a given cutoff must be minute-aligned and end a coalescing bucket."""
        now = now or datetime.now(UTC)
        cutoff = cutoff or cutoff_for(now, self.settings, self.cfg.settle_seconds)
        report = Report(now, cutoff, self.cfg.threshold_percent)
        for start, end in periods(now, period or self.cfg.period, self.cfg.lookback_periods):
            stop = min(end, cutoff)
            if stop <= start:
                continue
            rows = await self._rows(start, end, stop)
            await self._ask_stripe(rows, start, stop)
            for row in rows:
                row.judge(self.cfg.threshold_percent)
            if resubmit or retry_rejected:
                await self._repair(rows, start, stop, now, resubmit, retry_rejected)
            report.rows += rows
        self._export(report)
        return report

    async def _rows(self, start: datetime, end: datetime, stop: datetime) -> list[Row]:
        meters = list(self.billed)
        rows: dict[tuple[str, str], Row] = {}

        def row(customer: str, meter: str) -> Row:
            return rows.setdefault((customer, meter), Row(customer, meter, start, end))

        async with self.pool.acquire() as conn:
            for r in await conn.fetch(
                    """SELECT customer_id, meter, sum(quantity) AS q FROM window_aggregates
                       WHERE window_start >= $1 AND window_start < $2 AND meter = ANY($3::text[])
                       GROUP BY 1, 2""", start, stop, meters):
                row(r["customer_id"], r["meter"]).ledger = r["q"]
            for r in await conn.fetch(
                    """SELECT customer_id, meter,
                         coalesce(sum(quantity) FILTER (WHERE status = 'accepted'), 0) AS ok,
                         coalesce(sum(quantity) FILTER (WHERE status = 'rejected'), 0) AS bad,
                         coalesce(sum(quantity) FILTER (WHERE status IN ('open', 'pending', 'sending')), 0) AS fly
                       FROM stripe_reports WHERE bucket_start >= $1 AND bucket_start < $2
                       GROUP BY 1, 2""", start, stop):
                rw = row(r["customer_id"], r["meter"])
                rw.reported, rw.rejected, rw.in_flight = r["ok"], r["bad"], r["fly"]
            mapping = dict(await conn.fetch(
                "SELECT id, stripe_customer_id FROM customers WHERE id = ANY($1::text[])",
                list({c for c, _ in rows})))
        for (customer, _), rw in rows.items():
            rw.stripe_customer_id = mapping.get(customer)
        return sorted(rows.values(), key=lambda r: (r.customer, r.meter))

    async def _ask_stripe(self, rows: list[Row], start: datetime, stop: datetime) -> None:
        ids = await self.meter_ids()
        sem = asyncio.Semaphore(8)

        async def one(row: Row) -> None:
            meter_id = ids.get(self.billed[row.meter])
            if not row.stripe_customer_id or meter_id is None:
                row.note = "no Stripe customer mapping" if meter_id else "no Stripe meter"
                row.stripe = ZERO if not row.stripe_customer_id else None
                return
            async with sem:
                row.stripe = await self.stripe_usage(meter_id, row.stripe_customer_id, start, stop)

        await asyncio.gather(*(one(r) for r in rows))

    async def _repair(self, rows: list[Row], start: datetime, stop: datetime, now: datetime,
                      resubmit: bool, retry_rejected: bool) -> None:
        horizon = now - timedelta(hours=self.cfg.resubmit_horizon_hours)
        short = [r for r in rows if r.flagged and r.stripe is not None and r.stripe < r.settled]
        statuses = ["accepted"] * resubmit + ["rejected"] * retry_rejected
        async with self.pool.acquire() as conn:
            if resubmit:
                await self._stage_unreported(conn, rows, start, stop, now)
            for r in short:
                n = await conn.fetchval(
                    """WITH again AS (
                         UPDATE stripe_reports SET status = 'pending', next_attempt_at = now(),
                                lease_until = NULL, accepted_at = NULL
                         WHERE customer_id = $1 AND meter = $2 AND bucket_start >= $3
                           AND bucket_start < $4 AND status = ANY($5::text[])
                           AND (status = 'rejected' OR accepted_at >= $6)
                         RETURNING 1)
                       SELECT count(*) FROM again""",
                    r.customer, r.meter, start, stop, statuses, horizon)
                r.resubmitted_reports = n
                if n:
                    metrics.RECONCILE_RESUBMITTED.labels("report").inc(n)
                elif r.unreported_aggregates == 0:
                    r.note = r.note or "Stripe short beyond the resubmit horizon: investigate"

    async def _stage_unreported(self, conn: asyncpg.Connection, rows: list[Row],
                                start: datetime, stop: datetime, now: datetime) -> None:
        """Aggregates older than the settle time that no report carries: stage them."""
        missing = await conn.fetch(
            """SELECT a.id, a.customer_id, a.meter, a.window_start, a.quantity
               FROM window_aggregates a
               LEFT JOIN stripe_report_items i ON i.aggregate_id = a.id
               WHERE i.aggregate_id IS NULL AND a.window_start >= $1 AND a.window_start < $2
                 AND a.meter = ANY($3::text[]) AND a.created_at < $4""",
            start, stop, list(self.billed), now - timedelta(seconds=self.cfg.settle_seconds))
        if not missing:
            return
        staged = [Staged(m["id"], m["customer_id"], m["meter"], self.billed[m["meter"]],
                         m["window_start"], m["quantity"]) for m in missing]
        s = self.settings.stripe
        new = await reports.stage(conn, staged, s.coalesce_interval_seconds, s.seal_grace_seconds)
        by_row: dict[tuple[str, str], int] = defaultdict(int)
        for m in missing:
            by_row[(m["customer_id"], m["meter"])] += 1
        for r in rows:
            r.unreported_aggregates = by_row.get((r.customer, r.meter), 0)
        metrics.RECONCILE_RESUBMITTED.labels("unreported_aggregate").inc(new)

    def _export(self, report: Report) -> None:
        worst: dict[str, Decimal] = {m: ZERO for m in self.billed}
        for r in report.rows:
            worst[r.meter] = max(worst[r.meter], r.variance)
        for meter, v in worst.items():
            metrics.RECONCILE_VARIANCE.labels(meter).set(float(v))
        metrics.RECONCILE_FLAGGED.set(len(report.flagged))
        metrics.RECONCILE_LAST_RUN.set(time.time())


def print_summary(report: Report, paths: tuple[Path, Path] | None) -> None:
    s = report.summary()
    print(f"reconciled {s['rows']} (customer, meter, period) rows up to {s['cutoff']}: "
          f"{s['flagged']} flagged over {s['threshold_percent']} %, max variance "
          f"{Decimal(s['max_variance']) * 100:.4f} %; resubmitted "
          f"{s['unreported_aggregates_resubmitted']} unreported aggregates and "
          f"{s['reports_resubmitted']} reports", flush=True)
    for r in report.flagged[:20]:
        print(f"  FLAG {r.customer} {r.meter} {r.period_start:%Y-%m-%d %H:%M}: ledger "
              f"{decimal_text(r.ledger)} (in flight {decimal_text(r.in_flight)}, rejected "
              f"{decimal_text(r.rejected)}) vs Stripe "
              f"{decimal_text(r.stripe) if r.stripe is not None else '?'} {r.note}", flush=True)
    if paths:
        print(f"report: {paths[0]} {paths[1]}", flush=True)


def run(settings: Settings, args: argparse.Namespace) -> int:
    """`meterline reconcile`: exit 1 when the (last) run flagged anything."""
    every = args.every if args.every is not None else settings.reconcile.every_seconds
    out = Path(args.out or settings.reconcile.report_dir)
    resubmit = settings.reconcile.resubmit and not args.no_resubmit
    if every:
        metrics.serve(settings.reconcile.metrics_port)

    async def main() -> int:
        pool = await create_pool(settings.database_url)
        api = Stripe(stripe_api_key(settings), settings.stripe.api_base,
                     settings.stripe.request_timeout_seconds)
        try:
            rec = Reconciler(settings, pool, api)
            while True:
                report = await rec.run_once(resubmit=resubmit, period=args.period,
                                            retry_rejected=args.retry_rejected)
                print_summary(report, report.write(out))
                if not every:
                    return 1 if report.flagged else 0
                await asyncio.sleep(every)
        finally:
            await api.close()
            await pool.close()

    return asyncio.run(main())
