"""`meterline <command>`: parses arguments and dispatches; each service exposes run(settings)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from meterline.config import ConfigError, Settings, load_settings
from meterline.preflight import Unreachable, check_kafka, check_postgres

POSTGRES, KAFKA = "postgres", "kafka"


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    """Load the config once, then check that what this command needs answers."""
    settings = load_settings(args.config, **overrides)
    needs = getattr(args, "needs", ())
    if POSTGRES in needs:
        check_postgres(settings.database_url)
    if KAFKA in needs:
        check_kafka(settings.kafka)
    return settings


def _processor(args: argparse.Namespace) -> int:
    from meterline.processor.app import run

    run(_settings(args), args.worker_id)
    return 0


def _relay(args: argparse.Namespace) -> int:
    from meterline.relay.outbox import run

    run(_settings(args))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from meterline.storage.db import migrate

    applied = asyncio.run(migrate(_settings(args).database_url))
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


def _topics(args: argparse.Namespace) -> int:
    from meterline.devstack.topics import ensure_topics

    s = _settings(args)
    made = ensure_topics(s)
    print(f"topics ready: {', '.join(made)}")
    return 0


def _dev(args: argparse.Namespace) -> int:
    from meterline.devstack.dev import run

    return run(args)


def _load(args: argparse.Namespace) -> int:
    from meterline.devstack.load import run

    return run(_settings(args), args)


def _stripe_emulator(args: argparse.Namespace) -> int:
    from meterline.devstack.stripe_emulator.emulator import run

    run(args.host, args.port, args.rate, args.failure_rate)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from meterline.devstack.bench import run

    return run(args)


def _stripe_sink(args: argparse.Namespace) -> int:
    from meterline.stripe.sink import run

    run(_settings(args))
    return 0


def _stripe_provision(args: argparse.Namespace) -> int:
    from meterline.stripe.provision import run

    return run(_settings(args))


def _reconcile(args: argparse.Namespace) -> int:
    from meterline.stripe.reconcile import run

    return run(_settings(args), args)


# webhook bridge handler
def _webhook_bridge(args: argparse.Namespace) -> int:
    from meterline.webhooks.bridge import run
    from meterline.webhooks.signing_secrets import resolve_signing_secrets

    resolve_signing_secrets(os.environ)  # no secret: a config error (exit 2), before any server
    run(_settings(args))
    return 0


# ledger consumer handler
def _ledger_consumer(args: argparse.Namespace) -> int:
    from meterline.billing.consumer import run

    run(_settings(args))
    return 0


# api handler
def _api(args: argparse.Namespace) -> int:
    from meterline.api import run
    from meterline.api.auth import load_tokens

    load_tokens(os.environ)  # no token: a config error (exit 2), before any server

    listen = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    run(_settings(args, **({"api": listen} if listen else {})))
    return 0


def _common_options(parser: argparse.ArgumentParser, *, on_command: bool) -> None:
    """-c and -v, accepted before or after the command. A command's parser has no
    defaults of its own (SUPPRESS), so it never resets an option given before it."""
    parser.add_argument("-c", "--config", default=argparse.SUPPRESS if on_command else None,
                        help="YAML config file (default: $METERLINE_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        default=argparse.SUPPRESS if on_command else False,
                        help="debug logging, and tracebacks on start-up failures")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meterline", description=__doc__)
    _common_options(parser, on_command=False)
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, on_command=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, needs: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        """A command; `needs` are what `_settings` checks answer before the command runs."""
        command = sub.add_parser(name, help=help, parents=[common])
        command.set_defaults(needs=needs)
        return command

    p = add("processor", needs=(POSTGRES, KAFKA), help="consume usage.events, debit credits (Faust worker)")
    p.add_argument("--worker-id", help="owner name recorded with partition claims")
    p.set_defaults(func=_processor)

    add("relay", needs=(POSTGRES, KAFKA), help="publish outbox rows to Kafka").set_defaults(func=_relay)
    add("migrate", needs=(POSTGRES,), help="apply SQL migrations").set_defaults(func=_migrate)
    add("topics", needs=(KAFKA,), help="create the Kafka topics meterline uses").set_defaults(func=_topics)

    p = add("dev", help="embedded broker + Postgres + all services + load + live view")
    p.add_argument("--duration", type=float, default=0, help="stop after S seconds (0 = until Ctrl-C)")
    p.add_argument("--headless", action="store_true", help="no live view; print a JSON summary last")
    p.add_argument("--rate", type=float, default=2000, help="load generator events/s")
    p.add_argument("--customers", type=int, default=200)
    p.add_argument("--workdir", help="keep broker/Postgres data here instead of a temp dir")
    p.add_argument("--prometheus", action="store_true",
                   help="also run Prometheus (Debian's) on every service; with --headless, check "
                        "that every dashboard and alert expression finds data")
    p.add_argument("--deploy-dir", default="deploy",
                   help="where the dashboard and alert rules are (--prometheus; default ./deploy)")
    p.set_defaults(func=_dev)

    p = add("load", help="publish a realistic usage mix to usage.events")
    p.add_argument("--rate", type=float, default=2000, help="events/s")
    p.add_argument("--duration", type=float, default=60, help="seconds")
    p.add_argument("--customers", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=0, help="events per batch envelope (0 = single)")
    p.add_argument("--duplicates", type=float, default=0.05, help="fraction re-sent")
    p.add_argument("--late", type=float, default=0.01, help="fraction with old timestamps")
    p.add_argument("--invalid", type=float, default=0.005, help="fraction of bad input")
    p.add_argument("--storm", type=int, default=0, metavar="N",
                   help="instead: one storm of N bad inputs of every class among N/5 valid events "
                        "(prints the DLQ counts by reason it must cause)")
    p.set_defaults(func=_load)

    p = add("stripe-emulator", help="local emulator of Stripe's Billing Meter API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=12111)
    p.add_argument("--rate", type=float, default=100, help="requests/s before 429 (0 = no limit)")
    p.add_argument("--failure-rate", type=float, default=0.0, help="fraction of random 500s")
    p.set_defaults(func=_stripe_emulator)

    p = add("bench", help="measure throughput and latency end to end")
    p.add_argument("--events", type=int, default=300_000, help="events in each burst phase")
    p.add_argument("--steady-seconds", type=float, default=20, help="length of each steady phase")
    p.add_argument("--single-rate", type=float, default=10_000, help="steady rate, single-event messages")
    p.add_argument("--batch-rate", type=float, default=50_000, help="steady rate, batch envelopes")
    p.add_argument("--duplicates", type=float, default=0.05, help="fraction of duplicates sent")
    p.add_argument("--customers", type=int, default=1000)
    p.add_argument("--baseline-events", type=int, default=20_000)
    p.add_argument("--json", dest="json_path", help="also write results to this file")
    p.add_argument("--history-events", type=int, default=0,
                   help="also run each shape on a database holding the dedupe state of N past events")
    p.add_argument("--skip-baseline", action="store_true", help="skip the naive Faust baseline")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--stripe", action="store_true",
                       help="Stripe sink throughput and debit->Stripe lag against the emulator")
    which.add_argument("--bridge", action="store_true",
                       help="webhook bridge requests/s and latency with signature verification")
    which.add_argument("--api", action="store_true",
                       help="balance and entitlement API latency under load")
    which.add_argument("--dedupe", action="store_true",
                       help="the dedupe reservation path alone as history grows, old design vs new")
    p.add_argument("--dedupe-marks", default="0,2000000,5000000,10000000",
                   help="--dedupe: mark counts (history) to measure at, comma-separated")
    p.add_argument("--dedupe-batches", type=int, default=30,
                   help="--dedupe: timed batches of 10,000 reservations per mark count")
    p.add_argument("--stripe-rate", type=float, default=200,
                   help="--stripe: the sink's configured v1 rate limit, requests/s")
    p.add_argument("--stripe-v2-rate", type=float, default=20,
                   help="--stripe: the configured v2 rate limit, stream requests/s (100 events each)")
    p.add_argument("--stripe-seconds", type=float, default=15, help="--stripe: length of each phase")
    p.add_argument("--stripe-transport", choices=["v1", "v2", "both"], default="both")
    # bench: bridge options
    p.add_argument("--bridge-requests", type=int, default=20_000, help="--bridge: webhooks sent")
    p.add_argument("--bridge-concurrency", type=int, default=32,
                   help="--bridge: requests in flight at once")
    p.add_argument("--bridge-in-process", action="store_true",
                   help="--bridge: run the bridge in the bench's process, not a subprocess")
    # bench: api options
    p.add_argument("--api-rate", type=float, default=1000,
                   help="--api: requests/s offered (open loop), half balance, half entitlement")
    p.add_argument("--api-seconds", type=float, default=30, help="--api: measured seconds")
    p.add_argument("--api-warmup", type=float, default=5, help="--api: unmeasured seconds first")
    p.add_argument("--api-customers", type=int, default=1000, help="--api: customers seeded")
    p.add_argument("--api-windows", type=int, default=720,
                   help="--api: window aggregates seeded per customer and meter (5 s apart)")
    p.set_defaults(func=_bench)

    add("stripe-sink", needs=(POSTGRES, KAFKA), help="report usage.aggregates to Stripe meter events").set_defaults(
        func=_stripe_sink)

    add(
        "stripe-provision",
        help="create missing Stripe meters and customers (use a test-mode key or the emulator)",
    ).set_defaults(func=_stripe_provision)

    p = add("reconcile", needs=(POSTGRES,), help="ledger vs sink reports vs Stripe meter event summaries")
    p.add_argument("--every", type=float, default=None,
                   help="repeat every S seconds (default: reconcile.every_seconds; 0 = once)")
    p.add_argument("--out", help="report directory (default: reconcile.report_dir)")
    p.add_argument("--no-resubmit", action="store_true",
                   help="only report; do not queue anything again for Stripe")
    p.add_argument("--retry-rejected", action="store_true",
                   help="also queue reports Stripe refused again (after fixing their cause)")
    p.add_argument("--period", choices=["hour", "day", "month"],
                   help="billing period to compare (default: reconcile.period)")
    p.set_defaults(func=_reconcile)
    # webhook bridge subcommand
    add(
        "webhook-bridge", needs=(KAFKA,), help="Stripe webhooks -> verified events on stripe.events (HTTP)"
    ).set_defaults(func=_webhook_bridge)
    # ledger consumer subcommand
    add(
        "ledger-consumer", needs=(POSTGRES, KAFKA), help="apply Stripe events (stripe.events) to the credits ledger"
    ).set_defaults(func=_ledger_consumer)
    # api subcommand
    p = add("api", needs=(POSTGRES,), help="HTTP API: balance, entitlements, usage, ledger, export, grants")
    p.add_argument("--host", help="listen address (default: api.host)")
    p.add_argument("--port", type=int, help="listen port (default: api.port, 8080)")
    p.set_defaults(func=_api)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"meterline: {exc}", file=sys.stderr)
        return 2
    except Unreachable as exc:
        if args.verbose:
            logging.exception("start-up check failed")
        print(f"meterline {args.command}: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
