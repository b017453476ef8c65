"""The naive Faust pipeline the bench compares against: one table update per event.

This is how a Faust tutorial would meter usage: `group_by(customer)` to
co-partition, then `table[customer] += value` for every event. It runs as its
own process (`python -m meterline.devstack.baseline ...`) and prints one JSON
line with the events it processed and how long that took.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

import faust
import orjson

from meterline.kafka.security import faust_credentials, kafka_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--events", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args(argv)

    app = faust.App(
        f"baseline-{int(time.time())}", broker=f"kafka://{args.bootstrap}",
        broker_credentials=faust_credentials(kafka_config(args.bootstrap)),
        value_serializer="raw", web_enabled=False, store="memory://",
        broker_session_timeout=6, broker_heartbeat_interval=1,
        consumer_auto_offset_reset="earliest", topic_partitions=4,
    )
    topic = app.topic(args.topic, value_serializer="raw")
    totals = app.Table("usage_totals", default=float, partitions=4)
    state = {"n": 0, "first": 0.0, "last": 0.0}
    done = asyncio.Event()

    @app.agent(topic)
    async def meter(stream: faust.StreamT) -> None:
        async for value in stream:
            ev = orjson.loads(value)
            if state["n"] == 0:
                state["first"] = time.monotonic()
            totals[ev["subject"]] += float(ev["data"].get("tokens") or ev["data"].get("seconds") or 1)
            state["n"] += 1
            if state["n"] >= args.events:
                state["last"] = time.monotonic()
                done.set()

    @app.task
    async def watchdog() -> None:
        try:
            await asyncio.wait_for(done.wait(), args.timeout)
        except TimeoutError:
            state["last"] = time.monotonic()
        elapsed = max(state["last"] - state["first"], 1e-9)
        print(orjson.dumps({"events": state["n"], "seconds": round(elapsed, 3),
                            "events_per_second": round(state["n"] / elapsed, 1)}).decode(),
              flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # let the worker shut down cleanly

    from faust.worker import Worker

    Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False).execute_from_commandline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
