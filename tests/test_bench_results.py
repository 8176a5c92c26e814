"""`bench/proxy_bench.py` rewrites only the head of its results file: the runs compared by hand,
the storage and the export figures below its `KEPT_BELOW` line survive a rerun of the README's
benchmark command (they were lost before: the whole file was written anew)."""

from __future__ import annotations

from pathlib import Path

from bench.proxy_bench import KEPT_BELOW, write_keeping

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "RESULTS.md"


def test_a_run_rewrites_the_head_and_keeps_what_follows_the_line(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    below = f"{KEPT_BELOW}\n\n## Side by side\n\nmeasured by hand\n\n# Export\n\nfigures\n"
    path.write_text(f"# Proxy benchmark results\n\nold tables\n\n{below}", encoding="utf-8")
    write_keeping(path, "# Proxy benchmark results\n\nnew tables\n")
    assert path.read_text(encoding="utf-8") == f"# Proxy benchmark results\n\nnew tables\n\n{below}"
    write_keeping(path, "# Proxy benchmark results\n\nnewer tables\n")  # and again
    assert path.read_text(encoding="utf-8").count(KEPT_BELOW) == 1
    assert path.read_text(encoding="utf-8").endswith(below)


def test_a_file_without_the_line_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "out.md"
    path.write_text("# an older run\n", encoding="utf-8")
    write_keeping(path, "# Proxy benchmark results\n")
    assert path.read_text(encoding="utf-8") == "# Proxy benchmark results\n"
    fresh = tmp_path / "new.md"
    write_keeping(fresh, "# Proxy benchmark results\n")
    assert fresh.read_text(encoding="utf-8") == "# Proxy benchmark results\n"


def test_the_repositorys_results_keep_their_hand_written_sections() -> None:
    """The README's rerun writes bench/RESULTS.md: the line is there, above the first section
    that no run writes, and everything measured by hand is below it."""
    text = RESULTS.read_text(encoding="utf-8")
    head, _, kept = text.partition(KEPT_BELOW)
    assert kept, "bench/RESULTS.md lost its KEPT_BELOW line"
    assert head.startswith("# Proxy benchmark results") and "## Recording" in head
    for section in (
        "## Side by side",
        "# Storage",
        "# Export (bench/bench_export.py)",
        "## Streams",
    ):
        assert section in kept and section not in head
