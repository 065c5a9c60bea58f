"""The `intergiro-receiver` command: one subcommand per job of the product."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from receiver.errors import ConfigError
from receiver.logs import configure_logging
from receiver.settings import Settings


def load_settings(**overrides: str) -> Settings:
    """Settings from the environment; bad ones stop the process with one line per problem."""
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"intergiro-receiver: configuration error: {problem}", file=sys.stderr)
        raise SystemExit(1) from None
    return settings.with_changes(**overrides) if overrides else settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="intergiro-receiver", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="run the HTTP receiver")
    worker = commands.add_parser("worker", help="run RQ workers that deliver updates")
    worker.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    worker.add_argument("--processes", type=int, default=1, metavar="N", help="worker processes (default 1)")
    dlq = commands.add_parser("dlq", help="inspect and act on the dead-letter queue")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = dlq_commands.add_parser("list", help="list dead-lettered updates")
    dlq_list.add_argument("--json", action="store_true", help="one JSON document")
    dlq_show = dlq_commands.add_parser("show", help="show one dead-lettered update")
    dlq_show.add_argument("id")
    for action in ("requeue", "purge"):
        sub = dlq_commands.add_parser(action, help=f"{action} one update, or all with --all")
        target = sub.add_mutually_exclusive_group(required=True)
        target.add_argument("id", nargs="?")
        target.add_argument("--all", action="store_true")
    commands.add_parser("check", help="validate configuration and reach Redis (and the API when used)")
    commands.add_parser("dev", help="everything on one machine for trying it out")
    send = commands.add_parser("send", help="sign an order as Intergiro does and POST it")
    send.add_argument(
        "order", metavar="ORDER.json", help="an order file, or a shipped sample by name (e.g. card-ordered)"
    )
    send.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8080/callbacks/intergiro")
    send.add_argument("--key", metavar="PRIVATE.pem", help="signing key (default: .dev/signing-key.pem)")
    send.add_argument("--event", action="append", default=[], metavar="TYPE", help="append an event of TYPE")
    send.add_argument(
        "--audience",
        default=None,
        help="aud claim (default: development with the dev key, else INTERGIRO_ENVIRONMENT)",
    )
    send.add_argument("--new-id", action="store_true", help="give the order a fresh random id")
    send.add_argument("--iat-seconds", action="store_true", help="iat in seconds (default: milliseconds)")
    reconcile = commands.add_parser("reconcile", help="queue order events whose callbacks never arrived")
    window = reconcile.add_mutually_exclusive_group()
    window.add_argument(
        "--since", metavar="DURATION", help="e.g. 2h, 3d (default: RECONCILE_LOOKBACK_SECONDS)"
    )
    window.add_argument("--start", metavar="DATE")
    reconcile.add_argument("--end", metavar="DATE")
    reconcile.add_argument("--dry-run", action="store_true")
    reconcile.add_argument("--json", action="store_true")
    reconcile.add_argument(
        "--every", action="store_true", help="keep running every RECONCILE_INTERVAL_SECONDS"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "dev":
        from receiver.dev import run_dev

        raise SystemExit(run_dev(args))
    if args.command == "send":
        from receiver.send import run_send

        raise SystemExit(run_send(args))
    if args.command == "check":  # its configuration errors are problems like any other it finds
        from receiver.check import report, run_check

        try:
            checked = Settings.from_env()
        except ConfigError as exc:
            raise SystemExit(report(exc.problems)) from None
        configure_logging(checked.log_format, checked.log_level)
        raise SystemExit(run_check(checked))
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    if args.command == "serve":
        from receiver.app import serve

        serve(settings)
    elif args.command == "worker":
        from workers.runner import run_workers

        raise SystemExit(run_workers(settings, burst=args.burst, processes=args.processes))
    elif args.command == "dlq":
        from workers.deadletter import run_dlq_command

        raise SystemExit(run_dlq_command(settings, args))
    elif args.command == "reconcile":
        from receiver.reconcile import run_reconcile

        raise SystemExit(run_reconcile(settings, args))


if __name__ == "__main__":
    main()
