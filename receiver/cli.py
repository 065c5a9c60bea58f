"""The `intergiro-receiver` command: one subcommand per job of the product."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence

from receiver.destinations import PROCESSES_PER_DESTINATION
from receiver.errors import CommandError, ConfigError, report
from receiver.logs import configure_logging
from receiver.settings import Settings, read_environment


def load_settings(**overrides: str) -> Settings:
    """Settings from the environment; bad ones raise ConfigError (one line per problem, printed by
    `main`)."""
    settings = Settings.from_env()
    return settings.with_changes(**overrides) if overrides else settings


def refuse_split_rq_keys(command: str) -> None:
    """RQ reads RQ_KEY_PREFIX from the process environment only: one set in `.env` alone would have the
    receiver and the workers disagree with RQ's tools, so `serve` and `worker` stop with one line."""
    from receiver.rqstore import rq_key_prefix_problem

    problem = rq_key_prefix_problem(read_environment())
    if problem:
        raise CommandError(problem)


EPILOG = """\
Settings come from the environment and from a .env file in the working directory (the environment
wins); every variable, with its default, is in .env.example. A bad value stops the command with one
line naming the variable.

exit codes:
  0  done (check: no problem found)
  1  a problem: bad settings, Redis or an API not reachable, check found a problem, send not
     answered 200, an id not found, a worker that could not start
  2  bad command line (or send/reconcile arguments that cannot be used)
"""


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("intergiro-receiver")
    except PackageNotFoundError:  # pragma: no cover - run from a tree that was never installed
        return "unknown"


def _processes(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (one per core) or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="intergiro-receiver", description=__doc__, epilog=EPILOG, formatter_class=formatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help_text, description=help_text, epilog=EPILOG, formatter_class=formatter
        )

    serve = command("serve", "run the HTTP receiver on RECEIVER_HOST:RECEIVER_PORT")
    serve.add_argument(
        "--processes",
        type=_processes,
        default=1,
        metavar="N",
        help="receiver processes sharing the port (SO_REUSEPORT), each with its own event loop; "
        "0 = one per core (default 1)",
    )
    worker = command("worker", "run RQ workers that deliver updates to the merchant")
    worker.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    worker.add_argument(
        "--processes",
        type=int,
        default=PROCESSES_PER_DESTINATION,
        metavar="N",
        help=f"worker processes per destination (default {PROCESSES_PER_DESTINATION})",
    )
    worker.add_argument(
        "--destination", action="append", metavar="NAME", help="serve only this destination (repeatable)"
    )
    dlq = command("dlq", "inspect and act on the dead-letter queue")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = dlq_commands.add_parser("list", help="list dead-lettered updates", epilog=EPILOG)
    dlq_list.add_argument("--json", action="store_true", help="one JSON document")
    dlq_list.add_argument(
        "--destination", metavar="NAME", help="only this destination's (merchant: MERCHANT_*)"
    )
    dlq_show = dlq_commands.add_parser("show", help="show one dead-lettered update", epilog=EPILOG)
    dlq_show.add_argument("id", help="the update's id (as `dlq list` prints it)")
    for action in ("requeue", "purge"):
        sub = dlq_commands.add_parser(action, help=f"{action} one update, or all with --all", epilog=EPILOG)
        target = sub.add_mutually_exclusive_group(required=True)
        target.add_argument("id", nargs="?", help="the update's id (as `dlq list` prints it)")
        target.add_argument(
            "--all", action="store_true", help=f"{action} every dead-lettered update the options below match"
        )
        sub.add_argument("--destination", metavar="NAME", help="with --all: only this destination's")
        sub.add_argument("--text", default="", help="with --all: in the id, order id, order number or error")
        sub.add_argument("--status", default="", help="with --all: the last answer's HTTP status, 400 or 4xx")
        sub.add_argument(
            "--older-than", metavar="AGE", help="with --all: dead-lettered longer ago (30m, 2h, 3d)"
        )
        sub.add_argument("--newer-than", metavar="AGE", help="with --all: dead-lettered more recently")
    destination = command("destination", "each destination's state and backlog; pause and resume one")
    destination_commands = destination.add_subparsers(
        dest="destination_command", required=True, metavar="ACTION"
    )
    listing = destination_commands.add_parser(
        "list",
        help="state (up, down, paused), in flight, queued, waiting, retrying, oldest undelivered",
        epilog=EPILOG,
    )
    listing.add_argument("--json", action="store_true", help="one JSON document")
    pause = destination_commands.add_parser(
        "pause",
        help="hold its deliveries (new updates still queue, in order; no attempt is spent)",
        epilog=EPILOG,
    )
    pause.add_argument("name", metavar="NAME", help="the destination (merchant: MERCHANT_*)")
    pause.add_argument("--reason", metavar="TEXT", help="why, shown by `destination list` and the console")
    resume = destination_commands.add_parser("resume", help="deliver its held updates again", epilog=EPILOG)
    resume.add_argument("name", metavar="NAME", help="the destination (merchant: MERCHANT_*)")
    retry_now = command(
        "retry-now", "make every update waiting for a retry due now (each order still in sequence)"
    )
    retry_now.add_argument(
        "--destination", metavar="NAME", help="only this destination's (merchant: MERCHANT_*)"
    )
    command(
        "check",
        "validate the configuration and try Redis, the verify endpoint (when used), the merchant URL "
        "and handler: one line per problem, exit 1 if any",
    )
    command(
        "dev",
        "everything on one machine for trying it out: an embedded Redis (when REDIS_URL is unset), "
        "receiver, worker, a local signing key, and a command that sends a test callback",
    )
    send = command("send", "sign an order as Intergiro does and POST it")
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
    trace = command("trace", "what happened to an order: its callbacks, updates and every delivery attempt")
    trace.add_argument("key", metavar="KEY", help="an order id, an update id or a merchant order number")
    trace.add_argument(
        "--json", action="store_true", help="one JSON document (a list when KEY names several orders)"
    )
    command("ops", "the ops console (web) and its JSON API on OPS_HOST:OPS_PORT")
    reconcile = command("reconcile", "queue order events whose callbacks never arrived")
    window = reconcile.add_mutually_exclusive_group()
    window.add_argument(
        "--since", metavar="DURATION", help="e.g. 2h, 3d (default: RECONCILE_LOOKBACK_SECONDS)"
    )
    window.add_argument("--start", metavar="DATE", help="start of the window (YYYY-MM-DD), with --end")
    reconcile.add_argument("--end", metavar="DATE", help="end of the window (YYYY-MM-DD), with --start")
    reconcile.add_argument("--dry-run", action="store_true", help="print what would be queued; queue nothing")
    reconcile.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    reconcile.add_argument(
        "--every", action="store_true", help="keep running every RECONCILE_INTERVAL_SECONDS"
    )
    replay = command("replay", "send a window of updates again to one destination (or backfill a new one)")
    replay.add_argument(
        "--destination", required=True, metavar="NAME", help="the destination (merchant, ...)"
    )
    span = replay.add_mutually_exclusive_group()
    span.add_argument("--since", metavar="DURATION", help="e.g. 6h, 7d (at most REPLAY_MAX_WINDOW_SECONDS)")
    span.add_argument("--start", metavar="DATE", help="start of the window (YYYY-MM-DD), with --end")
    replay.add_argument("--end", metavar="DATE", help="end of the window (YYYY-MM-DD), with --start")
    replay.add_argument("--order", metavar="ID", help="only this order")
    replay.add_argument("--dry-run", action="store_true", help="print what would be queued; queue nothing")
    replay.add_argument("--json", action="store_true", help="print the summary as one JSON document")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command; its errors (CommandError, ConfigError) are printed here, in the one format of
    receiver.errors.report, and end the process with their exit code."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except CommandError as exc:
        report(args.command, *exc.lines)
        raise SystemExit(exc.exit_code) from None
    except ConfigError as exc:
        report(args.command, *(f"configuration error: {problem}" for problem in exc.problems))
        raise SystemExit(1) from None


def run(args: argparse.Namespace) -> None:
    """The command `args` names; ends with SystemExit and the command's exit code."""
    if args.command == "dev":
        from receiver.tools.dev import run_dev

        raise SystemExit(run_dev(args))
    if args.command == "send":
        from receiver.tools.send import run_send

        raise SystemExit(run_send(args))
    if args.command == "check":  # its configuration errors are problems like any other it finds
        from receiver.check import report as check_report
        from receiver.check import run_check

        try:
            checked = Settings.from_env()
        except ConfigError as exc:
            raise SystemExit(check_report(exc.problems)) from None
        configure_logging(checked.log_format, checked.log_level)
        raise SystemExit(run_check(checked))
    forked = args.command == "serve" and (args.processes or os.cpu_count() or 1) > 1
    if forked and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Before prometheus_client is imported: the processes count into shared files (receiver.metrics).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="intergiro-metrics-")
    settings = load_settings()
    if args.command in ("serve", "worker"):
        refuse_split_rq_keys(args.command)
    configure_logging(settings.log_format, settings.log_level)
    if args.command == "serve":
        from receiver.app import serve

        serve(settings, processes=args.processes)
    elif args.command == "worker":
        from workers.metrics_server import start_metrics_server
        from workers.runner import run_workers

        def serve_metrics(worker_processes: int) -> None:
            if not args.burst:  # a burst run is a job, not a service to watch
                start_metrics_server(settings, worker_processes)

        raise SystemExit(
            run_workers(
                settings,
                burst=args.burst,
                processes=args.processes,
                destinations=args.destination,
                started=serve_metrics,
            )
        )
    elif args.command == "dlq":
        from receiver.deadletters import run_dlq_command

        raise SystemExit(run_dlq_command(settings, args))
    elif args.command == "destination":
        from receiver.destination_state import run_destination_command

        raise SystemExit(run_destination_command(settings, args))
    elif args.command == "retry-now":
        from receiver.destination_state import run_retry_now

        raise SystemExit(run_retry_now(settings, args))
    elif args.command == "trace":
        from receiver.trace import run_trace

        raise SystemExit(run_trace(settings, args.key, as_json=args.json))
    elif args.command == "ops":
        from receiver.ops.app import run_ops

        raise SystemExit(run_ops(settings))
    elif args.command == "replay":
        from receiver.replay import run_replay

        raise SystemExit(run_replay(settings, args))
    elif args.command == "reconcile":
        from receiver.reconcile import run_reconcile

        raise SystemExit(run_reconcile(settings, args))


if __name__ == "__main__":
    main()
