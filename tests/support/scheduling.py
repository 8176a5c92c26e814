"""In which order pytest-xdist hands the suite's modules to its workers (`pyproject.toml`:
`--dist loadscope --no-loadscope-reorder`).

A work unit is a test module: one worker runs it, in order, so its module-scoped fixtures (a
shared proxy) are set up once and modules whose later tests read what earlier ones recorded keep
their order. Workers take the next unit when they are free, in the order of the collection;
`order_heaviest_first` reorders the collection so that the heaviest modules start first and the
many short ones fill the gaps at the end (longest-processing-time-first scheduling): a slow
module that started last would keep one worker busy long after the others are done.

A module's weight is what it took in the previous run (seconds, kept in pytest's cache under
`MODULE_SECONDS_KEY` by the conftest), else an estimate: `E2E_SECONDS` per end-to-end test
function (a process, a browser), `UNIT_SECONDS` per other test.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

MODULE_SECONDS_KEY = "understudy/module_seconds"
E2E_SECONDS = 3.0
UNIT_SECONDS = 0.1


def module_of(nodeid: str) -> str:
    """The module path of a test's node id (`tests/test_faults.py`): xdist's loadscope unit."""
    return nodeid.split("::", 1)[0]


def estimated_seconds(items: list[pytest.Item]) -> float:
    """A module's cost without a measurement: each end-to-end test function (its parameters
    counted once: they share set-ups) `E2E_SECONDS`, every other test `UNIT_SECONDS`."""
    e2e_functions = {
        item.nodeid.split("[", 1)[0] for item in items if item.get_closest_marker("e2e")
    }
    return E2E_SECONDS * len(e2e_functions) + UNIT_SECONDS * len(items)


def order_heaviest_first(items: list[pytest.Item], measured: Mapping[str, float]) -> None:
    """Reorder `items` in place: modules by weight (`measured` seconds by module path, else
    `estimated_seconds`), heaviest first, ties in collection order; the tests of a module stay
    together and in their order."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(module_of(item.nodeid), []).append(item)

    def seconds(module: str) -> float:
        value = measured.get(module)
        if isinstance(value, int | float):
            return float(value)
        return estimated_seconds(modules[module])

    ordered = sorted(modules, key=lambda module: -seconds(module))
    items[:] = [item for module in ordered for item in modules[module]]


class ModuleTimes:
    """A plugin for the controller (the process that reports): adds up each module's test
    durations (setup, call, teardown; xdist's workers' reports arrive here too) and, at the end,
    keeps them in pytest's cache for the next run's order (a module a run left out keeps its
    earlier figure). Registered by the conftest."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        module = module_of(report.nodeid)
        self.seconds[module] = self.seconds.get(module, 0.0) + report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        cache = getattr(self.config, "cache", None)
        selected = self.config.option.keyword or self.config.option.markexpr
        if cache is None or not self.seconds or selected:  # -k / -m: part of a module
            return
        known = cache.get(MODULE_SECONDS_KEY, {})
        merged = dict(known) if isinstance(known, dict) else {}
        merged.update({module: round(total, 2) for module, total in self.seconds.items()})
        cache.set(MODULE_SECONDS_KEY, merged)
