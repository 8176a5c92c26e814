"""Kept for the exporter tests that import it: the helpers live in `tests.support.exporter`."""

from tests.support.exporter import (
    ROOT,
    TOOLS,
    completion,
    expected_openai_sample,
    read_jsonl,
    record,
    run_agent,
    run_cli,
    simple_trajectory,
    write_records,
    write_records_sync,
)

__all__ = [
    "ROOT",
    "TOOLS",
    "completion",
    "expected_openai_sample",
    "read_jsonl",
    "record",
    "run_agent",
    "run_cli",
    "simple_trajectory",
    "write_records",
    "write_records_sync",
]
