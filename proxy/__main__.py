"""`python -m proxy` (console script `understudy-proxy`): the proxy's commands, each with its own flags.

    python -m proxy [serve] [--host H] [--port P] [--upstream URL] [--db PATH_OR_URL] ...
    python -m proxy migrate [--db PATH_OR_URL] [--config FILE]
    python -m proxy demo [--port P] [--upstream-port P] [--db PATH] ...

`serve` is the default. Every `serve` flag is also the environment variable UNDERSTUDY_<NAME> and a
key of the config file; `python -m proxy COMMAND --help` lists a command's flags.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.config
import sys
from collections.abc import Sequence
from typing import Any

from proxy.config import Settings, SettingsError, flag_name, load_settings
from proxy.logs import log_config
from proxy.storage import Database, DatabaseError
from proxy.storage.database import display_target

PROG = "understudy-proxy"
COMMANDS = ("serve", "migrate", "demo")
MIGRATE_FLAGS = ("db", "config", "log_level")
"""The settings `migrate` takes (the rest would be ignored, so they are refused)."""
DEMO_FLAGS = ("host", "port", "db", "admin_token", "promote_tool_calls", "log_level")
"""The settings `demo` takes; its upstream is its own fake (`--upstream-port`)."""


def _add_settings(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Flags for the `Settings` fields `names`, help from their descriptions."""
    for name in names:
        field = Settings.model_fields[name]
        env = f"UNDERSTUDY_{name.upper()}"
        parser.add_argument(
            flag_name(name), dest=name, metavar=name.upper(), help=f"{field.description} [{env}]"
        )


def build_parser() -> argparse.ArgumentParser:
    """The parser: a subcommand each for serve, migrate and demo, flags generated from `Settings`
    (so the CLI, env vars and config file never drift apart)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="OpenAI-compatible proxy that records tool-use trajectories. "
        f"Without a command it serves (`{PROG} serve --help` lists the options).",
        argument_default=argparse.SUPPRESS,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve the proxy, the dashboard and the admin API (the default)",
        description="Serve the proxy, the dashboard and the admin API. Every flag is also an "
        "environment variable (in brackets) and a key of the --config file.",
        argument_default=argparse.SUPPRESS,
    )
    _add_settings(serve, list(Settings.model_fields))
    migrate = commands.add_parser(
        "migrate",
        help="bring the database to the latest schema, then exit",
        description="Apply the schema migrations the database lacks, then exit.",
        argument_default=argparse.SUPPRESS,
    )
    _add_settings(migrate, MIGRATE_FLAGS)
    demo = commands.add_parser(
        "demo",
        help="a local fake upstream, the proxy and sample traffic, then the dashboard",
        description="Start a fake OpenAI upstream and the proxy in this process, play sample "
        "tool-use conversations through it, print the dashboard URL and serve until Ctrl-C. "
        "No API key, no network. Data goes to its own database file (demo data only).",
        argument_default=argparse.SUPPRESS,
    )
    _add_settings(demo, DEMO_FLAGS)
    demo.add_argument(
        "--upstream-port",
        dest="upstream_port",
        type=int,
        metavar="PORT",
        help="port of the demo's fake upstream (default: a free one)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, dict[str, Any]]:
    """(command, given flags by field name) for `argv`; `serve` when no command is named."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0] not in COMMANDS and args[0] not in ("-h", "--help")):
        args.insert(0, "serve")
    options = vars(build_parser().parse_args(args))
    command = options.pop("command", None) or "serve"
    return command, options


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m proxy` and `understudy-proxy`."""
    command, options = parse_args(argv)
    if command == "demo":
        from proxy.demo import run_demo

        run_demo(options)
        return
    try:
        settings = load_settings(options)
    except SettingsError as exc:
        sys.exit(f"{PROG}: {exc}")
    logging_config = log_config(settings.log_level, settings.log_format)
    logging.config.dictConfig(logging_config)
    try:
        # Open (and migrate) the database before serving, so a bad --db fails in one line.
        asyncio.run(_open_and_migrate(settings.db, report=command == "migrate"))
    except DatabaseError as exc:
        sys.exit(f"{PROG}: {exc}")
    if command == "migrate":
        return
    serve(settings, logging_config)


def serve(settings: Settings, logging_config: dict[str, Any]) -> None:
    """Serve the app with uvicorn until SIGTERM / Ctrl-C (the one place uvicorn is run)."""
    import gc

    import uvicorn

    # A proxied call allocates ~1,000 short-lived objects. With the default threshold (700) the
    # youngest generation is collected about once per call, and the objects of the calls in
    # flight survive into older generations that are then scanned again and again. Collect
    # less often (measured in bench/: -15 to -25% CPU per call, far fewer long pauses).
    gc.set_threshold(50_000, 20, 100)
    from proxy.app import FastPath, create_app
    from proxy.http.limits import BodyBudget, limited_protocol

    uvicorn.run(
        BodyBudget(FastPath(create_app(settings)), settings.max_inflight_body_bytes),
        http=limited_protocol(settings),
        proxy_headers=False,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=logging_config,
        server_header=False,
        date_header=False,
        access_log=False,
        timeout_graceful_shutdown=30,
    )


async def _open_and_migrate(target: str, *, report: bool) -> None:
    db = await Database.open(target)
    try:
        converted = await db.convert_requests(batch=1000) if report else 0
        packed = await db.pack_old_rows(batch=1000) if report else 0
    finally:
        await db.close()
    if report:
        applied = ", ".join(db.applied_migrations) or "none needed"
        print(f"database {display_target(target)} is at the latest schema (applied: {applied})")
        if converted:
            print(f"converted {converted} exchanges to content-addressed request storage")
        if packed:
            print(
                f"packed the JSON texts of {packed} rows (exchanges, request parts) written before 008"
            )


if __name__ == "__main__":
    main()
