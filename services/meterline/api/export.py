"""The dispute path: every window aggregate of a customer in a range, as CSV, streamed.

One row per window aggregate (regular windows and late corrections), with the
credits its debit took, the ledger entry that took them and its transfers (which
grant accounts, or the receivable for overage, paid it; credit-backs to whom), where it came from
in Kafka, and how it was reported to Stripe (the sink's report carrying it:
`stripe_reports` via `stripe_report_items`; `unreported` when no report carries
it yet). The rows come from a server-side cursor inside one read-only
repeatable-read transaction, so the file is one consistent snapshot however
long it takes, and memory stays flat: at most `api.export_fetch_rows` rows are
held at a time. If the export fails half-way the connection is dropped
without the final chunk, so a client never mistakes a truncated file for a
complete one.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from aiohttp import web

from meterline.api.context import context
from meterline.api.usage import ensure_known
from meterline.api.wire import ApiError, StreamAborted, customer_id, only_query, time_range
from meterline.core.credits import decimal_text
from meterline.ledger.accounts import Account
from meterline.metrics import API_EXPORT_ROWS

log = logging.getLogger(__name__)

COLUMNS = (
    "aggregate_id", "customer_id", "meter", "window_start", "window_end", "seq", "correction",
    "quantity", "window_value", "event_count", "credits", "ledger_entry_id", "debited_credits",
    "overage_credits", "kafka_partition", "first_offset", "last_offset", "aggregated_at",
    "stripe_report_id", "stripe_identifier", "stripe_status", "stripe_attempts",
    "stripe_last_error", "stripe_response_id", "transfers",
)
UNREPORTED = "unreported"

# $1 customer, $2/$3 the range [from, to) of window starts.
EXPORT = """
SELECT a.id, a.customer_id, a.meter, a.window_start, a.window_end, a.seq, a.quantity,
       a.window_value, a.event_count, a.credits, l.id AS ledger_entry_id,
       -l.amount AS debited, l.overage, a.kafka_partition, a.first_offset, a.last_offset,
       a.created_at, r.id AS report_id, r.identifier, r.status, r.attempts, r.last_error,
       r.stripe_response_id,
       ARRAY(SELECT ROW(t.id, t.from_account, t.from_grant, t.to_account, t.to_grant, t.amount,
                        t.reason)
             FROM transfers t WHERE t.aggregate_id = a.id ORDER BY t.id) AS transfers
FROM window_aggregates a
LEFT JOIN ledger_entries l ON l.aggregate_id = a.id AND l.kind = 'debit'
LEFT JOIN stripe_report_items i ON i.aggregate_id = a.id
LEFT JOIN stripe_reports r ON r.id = i.report_id
WHERE a.customer_id = $1 AND a.window_start >= $2 AND a.window_start < $3
ORDER BY a.window_start, a.meter, a.seq
"""

# A cell a spreadsheet would run as a formula; such text is prefixed with "'".
_FORMULA = re.compile(r"^[=+\-@\t\r]")
_FILENAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _time(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(value: str | None) -> str:
    if value is None:
        return ""
    return "'" + value if _FORMULA.match(value) else value


def _num(value: Decimal | int | None) -> str:
    if value is None:
        return ""
    return decimal_text(value) if isinstance(value, Decimal) else str(value)


def csv_row(r: Sequence[Any]) -> list[str]:
    """One export row, every cell as text; order as COLUMNS."""
    (agg_id, customer, meter, start, end, seq, quantity, window_value, events, credits,
     entry_id, debited, overage, partition, first, last, created, report_id, identifier,
     status, attempts, last_error, response_id, transfers) = r
    return [
        _text(agg_id), _text(customer), _text(meter), _time(start), _time(end), str(seq),
        "true" if seq > 0 else "false", _num(quantity), _num(window_value), str(events),
        _num(credits), _num(entry_id), _num(debited), _num(overage), str(partition),
        str(first), str(last), _time(created), _num(report_id), _text(identifier),
        _text(status) if report_id is not None else UNREPORTED, _num(attempts),
        _text(last_error), _text(response_id), _transfers(transfers),
    ]


def _transfers(transfers: Sequence[Any]) -> str:
    """The aggregate's ledger transfers, `<id> <from> -> <to> <amount> <reason>`, `; `-joined:
    which grants (or the receivable, for overage) paid it, and any credit-back."""
    return "; ".join(
        f"{tid} {Account(fk, fg)} -> {Account(tk, tg)} {decimal_text(amount)} {reason}"
        for tid, fk, fg, tk, tg, amount, reason in transfers)


def _encode(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows(rows)
    return buf.getvalue().encode()


async def export_csv(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    customer = customer_id(request)
    only_query(request, "from", "to")
    frm, to = time_range(request, ctx.clock())
    batch = ctx.settings.api.export_fetch_rows
    name = _FILENAME_UNSAFE.sub("_", customer)[:100]
    stamp = f"{frm:%Y%m%dT%H%M%SZ}-{to:%Y%m%dT%H%M%SZ}"
    if ctx.exports.locked():
        raise ApiError(429, "too_many_exports", "other exports are streaming; retry shortly")
    async with ctx.exports, ctx.pool.acquire() as conn:
        await ensure_known(conn, customer)  # before the 200 is sent: a 404 is still possible
        response = web.StreamResponse(headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="meterline-{name}-{stamp}.csv"',
            "Cache-Control": "no-store",
        })
        await response.prepare(request)
        try:
            await response.write(_encode([list(COLUMNS)]))
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                cursor = await conn.cursor(EXPORT, customer, frm, to)
                while rows := await cursor.fetch(batch):
                    await response.write(_encode([csv_row(r) for r in rows]))
                    API_EXPORT_ROWS.inc(len(rows))
            await response.write_eof()
        except Exception as exc:
            log.warning("CSV export aborted mid-stream: %s", type(exc).__name__)
            raise StreamAborted() from exc
    return response
