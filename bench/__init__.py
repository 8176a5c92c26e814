"""Benchmarks (run from the repository root as `python -m bench.NAME`); they import the package
normally and are type-checked with it."""
