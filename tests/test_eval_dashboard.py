"""The dashboard's Evaluations pages and `/api/evaluations`: in-process through the app
(starlette's TestClient runs the lifespan) after a real run against the scripted candidate, and
one look in real Chromium."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from exporter.evaluation import EvalConfig, run_evaluation
from proxy.app import create_app
from proxy.config import Settings
from proxy.storage import Database, new_id, utc_now
from proxy.storage.evaluations import create_run
from proxy.testing.fake_candidate import create_candidate_app
from proxy.testing.servers import serve_in_thread
from tests.support.browser import shot
from tests.support.evaluation import CANDIDATE_MODEL, assistant, candidate_script, record_scenario
from tests.support.processes import ProxyServer

HOSTILE = "<script>alert('eval')</script>"


async def _evaluate(db_path: Path, base_url: str) -> str:
    db = await Database.open(str(db_path))
    try:
        config = EvalConfig(base_url=base_url, model=CANDIDATE_MODEL, api_key="sk-x", split="all")
        return (await run_evaluation(db, config)).run_id
    finally:
        await db.close()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A database with the scenario and one finished run (the candidate's Oslo answer hostile)."""
    db_path = tmp_path_factory.mktemp("evaldash") / "eval.db"
    record_scenario(db_path)
    script = candidate_script()
    script.answers["s3 weather Oslo"] = assistant(HOSTILE)
    with serve_in_thread(create_candidate_app(script)) as root:
        run_id = asyncio.run(_evaluate(db_path, f"{root}/v1"))
    return db_path, run_id


@pytest.fixture
def client(evaluated: tuple[Path, str]) -> Iterator[TestClient]:
    """The proxy app on the evaluated database, lifespan run, addressed as a loopback host."""
    app = create_app(Settings(db=str(evaluated[0]), upstream="http://127.0.0.1:9/v1"))
    with TestClient(app, base_url="http://127.0.0.1:8080") as test_client:
        yield test_client


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_the_list_has_one_row_per_run(client: TestClient, evaluated: tuple[Path, str]) -> None:
    _, run_id = evaluated
    response = client.get("/dashboard/evaluations")
    assert response.status_code == 200
    assert 'aria-current="page">Evaluations' in response.text
    assert f'href="/dashboard/evaluations/{run_id}"' in response.text
    rows = re.findall(r"<tr>.*?</tr>", response.text, re.S)
    assert len(rows) == 2  # the header and one run
    row = text_of(rows[1])
    assert CANDIDATE_MODEL in row and "finished" in row and "teacher" in row
    assert "81.8%" in row and "71.4%" in row and "42.9%" in row  # decision, names, arguments


def test_a_run_shows_per_tool_rates_and_disagreements_beside_the_reference(
    client: TestClient, evaluated: tuple[Path, str]
) -> None:
    _, run_id = evaluated
    response = client.get(f"/dashboard/evaluations/{run_id}")
    assert response.status_code == 200
    html = response.text
    per_tool = text_of(html.split('class="trajectories per-tool"')[1].split("</table>")[0])
    assert re.search(r"get_weather 5 5 80\.0% \(\S+\) 60\.0% \(\S+\) 80\.0%", per_tool), per_tool
    assert re.search(r"search 3 2 66\.7% \(\S+\) 33\.3% \(\S+\) 33\.3%", per_tool), per_tool
    assert "launch_rockets 0 1" in per_tool
    disagreements = html.split('class="trajectories disagreements"')[1].split("</table>")[0]
    assert len(re.findall(r"<tr>", disagreements)) == 6  # header + 5 steps
    shown = text_of(disagreements)
    assert "decision: final instead of tool_call" in shown  # Oslo: an answer, not a call
    assert "decision: tool_call instead of final" in shown and "1 unknown tool" in shown
    assert "argument types only" in shown and "1 invalid JSON" in shown
    assert "tool names" in shown
    # The reference beside the candidate: Bergen's search call against the get_weather call.
    bergen = next(r for r in re.findall(r"<tr>.*?</tr>", disagreements, re.S) if "bergen" in r)
    reference, candidate = re.findall(r'<td class="eval-message \w+">(.*?)</td>', bergen, re.S)
    assert "<code>search</code>" in reference and "<code>get_weather</code>" in candidate
    # Candidate text is escaped, never markup.
    assert HOSTILE not in html and "&lt;script&gt;" in html
    assert "script-src" not in response.headers["content-security-policy"]


def test_api_and_missing_run(client: TestClient, evaluated: tuple[Path, str]) -> None:
    _, run_id = evaluated
    listing = client.get("/api/evaluations").json()
    assert [r["id"] for r in listing["data"]] == [run_id]
    assert listing["data"][0]["report"]["tool_name_agreement"] == round(5 / 7, 4)
    assert "fingerprint" not in listing["data"][0]
    one = client.get(f"/api/evaluations/{run_id}").json()
    assert one["disagreement_count"] == 5 and len(one["disagreements"]) == 5
    assert one["report"]["per_tool"]["search"]["reference_calls"] == 3
    missing = client.get("/api/evaluations/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "run_not_found"
    assert client.get("/dashboard/evaluations/nope").status_code == 404
    bad = client.get(f"/api/evaluations/{run_id}?page=zero")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "page"


def test_an_unfinished_run_says_how_to_resume(tmp_path: Path) -> None:
    db_path = tmp_path / "running.db"
    record_scenario(db_path)
    run_id = new_id()

    async def add() -> None:
        db = await Database.open(str(db_path))
        try:
            now = utc_now()
            await create_run(
                db,
                {
                    "id": run_id,
                    "created_utc": now,
                    "updated_utc": now,
                    "status": "running",
                    "fingerprint": "f",
                    "base_url": "http://127.0.0.1:8000/v1",
                    "model": "qwen-student",
                    "split": "valid",
                    "reference": "teacher",
                    "options_json": "{}",
                    "trajectory_count": 3,
                    "step_count": 9,
                },
            )
        finally:
            await db.close()

    asyncio.run(add())
    app = create_app(Settings(db=str(db_path), upstream="http://127.0.0.1:9/v1"))
    with TestClient(app, base_url="http://127.0.0.1:8080") as client:
        listing = client.get("/dashboard/evaluations")
        assert "qwen-student" in listing.text and "running" in listing.text
        response = client.get(f"/dashboard/evaluations/{run_id}")
        assert response.status_code == 200
        assert "run the same command again to resume" in response.text
        assert "0 of 9 steps answered" in text_of(response.text)


@pytest.mark.e2e
def test_evaluations_in_chromium(
    start_proxy: Callable[..., ProxyServer],
    evaluated: tuple[Path, str],
    page: Any,  # noqa: F811 - the browser page fixture
) -> None:
    from playwright.sync_api import expect

    db_path, run_id = evaluated
    proxy = start_proxy(db=db_path)
    page.goto(f"{proxy.root_url}/dashboard")
    page.get_by_role("link", name="Evaluations").click()
    expect(page.get_by_role("heading", name="Evaluations")).to_be_visible()
    shot(page, "evaluations")
    page.get_by_role("link", name=CANDIDATE_MODEL).click()
    expect(page.locator("table.per-tool tbody tr")).to_have_count(3)
    expect(page.locator("table.disagreements tbody tr")).to_have_count(5)
    expect(page.locator("td.eval-message.candidate").filter(has_text=HOSTILE)).to_have_count(1)
    assert page.url.endswith(f"/dashboard/evaluations/{run_id}")
    shot(page, "evaluation-run")
