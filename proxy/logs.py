"""Logging for the proxy process: text or JSON lines (python-json-logger), uvicorn's loggers included."""

from __future__ import annotations

from typing import Any

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"


def log_config(level: str, fmt: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` dict (also passed to uvicorn as `log_config`).

    fmt: "text" or "json" (one JSON object per line with `asctime`, `levelname`, `name`,
    `message` and any `extra` fields).
    """
    formatter: dict[str, Any] = (
        {"()": "pythonjsonlogger.json.JsonFormatter", "fmt": _JSON_FIELDS}
        if fmt == "json"
        else {"format": _TEXT_FORMAT}
    )
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": True},
        },
    }
