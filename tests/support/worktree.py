"""What the suite may leave in the working tree: nothing. `files_in_working_tree` lists the files
under the checkout, except the caches tools keep there; the conftest compares the list before and
after the session (a proxy started with the repository as its working directory writes its
default journal, `./understudy-journal.jsonl`, and its lock file there)."""

from __future__ import annotations

import os
from pathlib import Path

KEPT_DIRECTORIES = frozenset(
    {
        ".git",
        ".venv",
        "__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        ".hypothesis",
        "test-artifacts",  # the browser tests' screenshots, meant to be looked at
        "build",
        "dist",
    }
)
"""Directories skipped wherever they are: version control, the virtual environment, tool caches
and the browser tests' screenshots."""


def files_in_working_tree(root: Path) -> set[str]:
    """Paths (relative to `root`, POSIX) of every file under `root` outside `KEPT_DIRECTORIES`
    and `*.egg-info` directories."""
    found: set[str] = set()
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [
            name
            for name in subdirectories
            if name not in KEPT_DIRECTORIES and not name.endswith(".egg-info")
        ]
        base = Path(directory).relative_to(root)
        found.update((base / name).as_posix() for name in files)
    return found
