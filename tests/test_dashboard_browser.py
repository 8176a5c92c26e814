"""The dashboard in real headless Chromium (Debian's package, driven by Playwright; no browser
download): traffic through the proxy (served in the test process), then list, filter, read,
label, chart and export.

A screenshot of each page goes to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import playwright.sync_api as playwright_api
import pytest

from proxy.demo import CONVERSATIONS
from tests.support.browser import shot
from tests.support.dashboard import TOKEN, by_name, record_traffic
from tests.support.inprocess import run_exporter

pytestmark = pytest.mark.e2e


def rows(tab: Any) -> Any:
    return tab.locator("table.trajectories tbody tr")


def test_browse_filter_read_label_chart_export(
    serve_proxy: Callable[..., Any], demo_upstream: str, page: Any, tmp_path: Path
) -> None:
    proxy = serve_proxy(upstream=demo_upstream)  # the demo's conversations, as in the demo
    record_traffic(proxy, CONVERSATIONS)
    # More finished conversations, so the approved export reaches OpenAI's 10-sample minimum.
    record_traffic(
        proxy, by_name("trip-planner", "support-refund", "docs-helper"), rounds=2, run="more"
    )
    root = proxy.root_url
    expect = playwright_api.expect

    # The list.
    page.goto(f"{root}/dashboard")
    expect(rows(page)).to_have_count(13)
    expect(page.locator("tbody")).to_contain_text("Plan a weekend in Lisbon")
    expect(page.locator(".badge.error").first).to_contain_text("1 error")
    shot(page, "list")

    # Filter: free text, then tool calls + errors from the selects.
    page.fill("#f-q", "kitchenware")
    page.click("form.filters button[type=submit]")
    expect(rows(page)).to_have_count(3)
    expect(rows(page).first).to_contain_text("My order A1234 arrived broken")
    shot(page, "list-filtered")
    page.click("form.filters a.button")
    page.select_option("#f-errors", "yes")
    page.click("form.filters button[type=submit]")
    expect(rows(page)).to_have_count(1)
    expect(rows(page).first).to_contain_text("Summarise yesterday's orders.")
    page.select_option("#f-errors", "")
    page.select_option("#f-tools", "no")
    page.click("form.filters button[type=submit]")
    expect(rows(page)).to_have_count(2)

    # Read a trajectory: tool calls with pretty arguments, results beside them, escaped.
    page.goto(f"{root}/dashboard?q=rotate+an+API+key&tools=yes")
    expect(rows(page)).to_have_count(3)
    rows(page).first.locator(".convo a").click()
    expect(page.locator("h1")).to_contain_text("Trajectory")
    expect(page.locator(".call .tool-name")).to_have_count(4)
    expect(page.locator(".call pre.args").first).to_contain_text('"query": "rotate API key"')
    result = page.locator(".call-row", has=page.locator(".tool-name", has_text="fetch_page")).first
    expect(result.locator(".result")).to_contain_text(
        "<script>alert('tool results are shown as text')</script>"
    )
    assert page.locator("script").count() == 0
    expect(page.locator(".step").first).to_contain_text("step 0")
    shot(page, "trajectory")

    # Label it: approve with tags and a note.
    page.fill("#tags", "good-plan, docs")
    page.fill("#note", "clear two-step lookup")
    page.click("button.approve")
    expect(page.locator(".flash")).to_contain_text("Saved: approved")
    expect(page.locator(".curation .badge.label-approved")).to_be_visible()
    expect(page.locator("#tags")).to_have_value("good-plan, docs")
    shot(page, "trajectory-labeled")

    # A fork: the retried step shows as a second branch.
    page.goto(f"{root}/dashboard?q=sauna")
    rows(page).first.locator(".convo a").click()
    expect(page.locator(".branches li")).to_have_count(2)
    page.click("text=branch 2")
    expect(page.locator(".badge.fork").first).to_be_visible()
    shot(page, "trajectory-fork")

    # Bulk curation from the list, then the approved filter.
    page.goto(f"{root}/dashboard?errors=no")
    boxes = page.locator("tbody input[type=checkbox]")
    for i in range(boxes.count()):
        boxes.nth(i).check()
    page.click(".bulk-actions button.approve")
    expect(page.locator(".flash")).to_contain_text("Labeled 12 trajectories")
    page.goto(f"{root}/dashboard?label=approved")
    expect(rows(page)).to_have_count(12)

    # Charts.
    page.goto(f"{root}/dashboard/charts")
    expect(page.locator("svg.chart")).to_have_count(5)
    expect(page.locator(".chart-card", has_text="Tool-call frequency")).to_contain_text(
        "search_docs"
    )
    shot(page, "charts")

    # Export the approved ones and validate the download with the exporter's own checker.
    page.goto(f"{root}/dashboard?label=approved")
    with page.expect_download() as download_info:
        page.click("text=Export JSONL")
    target = tmp_path / "approved.jsonl"
    download_info.value.save_as(target)
    lines = target.read_text().splitlines()
    assert len(lines) >= 10
    checked = run_exporter("validate", str(target), "--strict-min-samples")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_login_with_admin_token(serve_proxy: Callable[..., Any], page: Any) -> None:
    proxy = serve_proxy(admin_token=TOKEN)
    expect = playwright_api.expect
    page.goto(f"{proxy.root_url}/dashboard/charts")
    expect(page.locator("h1")).to_have_text("Log in")
    shot(page, "login")
    page.fill("#token", "wrong")
    page.click("button[type=submit]")
    expect(page.locator(".alert")).to_contain_text("not the admin token")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Charts")
    page.goto(f"{proxy.root_url}/dashboard")
    expect(page.locator("h1")).to_have_text("Trajectories")
    expect(page.locator(".empty")).to_contain_text("No trajectories yet")
    page.click("text=Log out")
    expect(page.locator("h1")).to_have_text("Log in")


LONG_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": f"tool_{i}_" + "x" * 40,
            "description": "D" * 300,  # one long word: client-controlled, must wrap
            "parameters": {"type": "object", "properties": {"a" * 80: {"type": "string"}}},
        },
    }
    for i in range(25)
]


def test_tools_offered_expand_in_place(serve_proxy: Callable[..., Any], page: Any) -> None:
    proxy = serve_proxy()
    answer = httpx.post(
        f"{proxy.base_url}/chat/completions",
        json={
            "model": "gpt-4.1-mini",
            "messages": [{"role": "user", "content": "which tool?"}],
            "tools": LONG_TOOLS,
        },
    )
    tid = answer.headers["x-understudy-trajectory-id"]
    wait_listed(proxy.root_url, tid)
    for width in (1400, 1100):
        page.set_viewport_size({"width": width, "height": 900})
        page.goto(f"{proxy.root_url}/dashboard/trajectories/{tid}")
        side = page.locator("aside.side")
        before = side.bounding_box()
        page.click("details.tools summary")
        page.locator(".tool-def").first.wait_for()
        assert side.bounding_box() == before  # the right column stays where it was
        conversation = page.locator(".conversation").bounding_box()
        description = page.locator(".tool-def p").first.bounding_box()
        assert description["x"] + description["width"] <= conversation["x"] + conversation["width"]
        assert description["x"] + description["width"] <= before["x"]
    shot(page, "tools-offered")


def wait_listed(root_url: str, trajectory_id: str, timeout: float = 30.0) -> None:
    """Wait until the recorder has written `trajectory_id` (it writes off the request path)."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{root_url}/api/trajectories/{trajectory_id}").status_code != 200:
        assert time.monotonic() < deadline, f"{trajectory_id} not recorded in {timeout}s"
        time.sleep(0.05)


def test_export_that_matches_nothing_shows_the_message(
    serve_proxy: Callable[..., Any], page: Any
) -> None:
    proxy = serve_proxy()
    answer = httpx.post(
        f"{proxy.base_url}/chat/completions",
        json={"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hello"}]},
    )
    wait_listed(proxy.root_url, answer.headers["x-understudy-trajectory-id"])
    page.goto(f"{proxy.root_url}/dashboard?label=rejected")
    page.click("text=Export JSONL")
    page.wait_for_load_state()
    assert "/dashboard/export" in page.url
    body = page.locator("body").inner_text()
    assert "nothing to export" in body and "label=rejected" not in body.split("nothing")[0]
    shot(page, "export-nothing")
