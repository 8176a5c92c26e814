"""`python -m proxy` (console script `understudy-proxy`): start the proxy, or run one of its commands.

    python -m proxy [--host H] [--port P] [--upstream URL] [--db PATH_OR_URL] [--config FILE] ...
    python -m proxy migrate [--db PATH_OR_URL]
    python -m proxy demo [--port P]

Every flag is also the environment variable UNDERSTUDY_<NAME> and a key of the config file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import logging.config
import sys
from collections.abc import Sequence
from typing import Any, get_origin

from pydantic import ValidationError

from proxy.config import ConfigFileError, Settings
from proxy.logs import log_config
from proxy.storage import Database, DatabaseError
from proxy.storage.database import display_target

COMMANDS = ("serve", "migrate", "demo")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """Flags generated from `Settings`, so the CLI, env vars and config file never drift apart."""
    parser = argparse.ArgumentParser(
        prog="understudy-proxy",
        description="OpenAI-compatible proxy that records tool-use trajectories. "
        "Commands: serve (default), migrate, demo (a local fake upstream and sample traffic).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("command", nargs="?", choices=COMMANDS, default="serve")
    for name, field in Settings.model_fields.items():
        env = f"UNDERSTUDY_{name.upper()}"
        parser.add_argument(
            _flag(name), dest=name, metavar=name.upper(), help=f"{field.description} [{env}]"
        )
    return parser


def load_settings(options: dict[str, Any]) -> Settings:
    """Settings from flags (given ones only), env and config file; exits with one line on error.

    Flags of list or dict options (`--routing-rules`) take JSON, as their env vars do
    (`--redact-pii` also takes a comma-separated list).
    """
    for name, value in list(options.items()):
        if get_origin(Settings.model_fields[name].annotation) in (list, dict) and value.lstrip()[
            :1
        ] in ("[", "{"):
            try:
                options[name] = json.loads(value)
            except ValueError as exc:
                sys.exit(f"understudy-proxy: {_flag(name)} must be JSON: {exc}")
    try:
        return Settings(**options)
    except ConfigFileError as exc:
        sys.exit(f"understudy-proxy: {exc}")
    except ValidationError as exc:
        problems = "; ".join(
            f"{_flag(str(err['loc'][0])) if err['loc'] else 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        sys.exit(f"understudy-proxy: invalid settings: {problems}")


def main(argv: Sequence[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command", "serve")
    if command == "demo":
        from proxy.demo import run_demo

        run_demo(args)
        return
    settings = load_settings(args)
    logging_config = log_config(settings.log_level, settings.log_format)
    logging.config.dictConfig(logging_config)
    try:
        # Open (and migrate) the database before serving, so a bad --db fails in one line.
        asyncio.run(_open_and_migrate(settings.db, report=command == "migrate"))
    except DatabaseError as exc:
        sys.exit(f"understudy-proxy: {exc}")
    if command == "migrate":
        return

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
    await db.close()
    if report:
        applied = ", ".join(db.applied_migrations) or "none needed"
        print(f"database {display_target(target)} is at the latest schema (applied: {applied})")


if __name__ == "__main__":
    main()
