"""The dashboard and admin API through the proxy served in this process (uvicorn in a thread,
lifespan run; `serve_proxy`): traffic from the openai SDK, then `/api/*` and `/dashboard` with
httpx (access rules, CSRF, escaping, curation, charts, export)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.dashboard import TOKEN, by_name, csrf_of, find, record_traffic
from tests.support.inprocess import ThreadedProxy, run_exporter
from tests.support.records import recorded_exchanges, recorded_trajectories

StartProxy = Callable[..., ThreadedProxy]


@pytest.fixture
def serve_proxy(serve_proxy: StartProxy, demo_upstream: str) -> StartProxy:
    """`serve_proxy` in front of the demo's upstream: demo conversations play as in the demo."""

    def start(**settings: Any) -> ThreadedProxy:
        settings.setdefault("upstream", demo_upstream)
        return serve_proxy(**settings)

    return start


# -- API -----------------------------------------------------------------------------------------


def test_api_lists_and_gets_trajectories(serve_proxy: StartProxy) -> None:
    proxy = serve_proxy()
    record_traffic(proxy)
    api = f"{proxy.root_url}/api/trajectories"
    listed = httpx.get(api).json()
    assert listed["object"] == "list" and listed["has_more"] is False
    data = listed["data"]
    assert len(data) == 7
    trip = find(data, "Plan a weekend in Lisbon")
    assert (trip["exchange_count"], trip["tool_call_count"], trip["status"]) == (3, 3, "ok")
    assert trip["models"] == ["gpt-4.1-mini"] and trip["cost_usd"] > 0
    assert trip["total_tokens"] == trip["prompt_tokens"] + trip["completion_tokens"] > 0
    errored = find(data, "Summarise yesterday")
    assert errored["status"] == "error" and errored["error_count"] == 1

    # Filters and keyset pages.
    def ids(**params: str) -> list[str]:
        return [t["id"] for t in httpx.get(api, params=params).json()["data"]]

    assert ids(errors="yes") == [errored["id"]]
    assert len(ids(tools="yes")) == 5 and len(ids(tools="no")) == 2
    assert ids(q="kitchenware") == [find(data, "My order A1234")["id"]]
    assert ids(model="gpt-4.1") == [find(data, "How do I rotate")["id"]]
    assert ids(route="teacher") == []  # no teacher configured: every trajectory is a student's
    seen, cursor = [], None
    while True:
        page = httpx.get(api, params={"limit": "3", **({"after": cursor} if cursor else {})}).json()
        seen += [t["id"] for t in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [t["id"] for t in data]

    # One trajectory: parallel calls in one assistant message, results after it.
    got = httpx.get(f"{api}/{trip['id']}").json()
    conversation = got["conversation"]
    assert [m["role"] for m in conversation] == [
        "system",
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]
    assert [c["function"]["name"] for c in conversation[2]["tool_calls"]] == [
        "search_flights",
        "get_weather",
    ]
    assert len(got["exchanges"]) == 3 and got["exchanges"][0]["request"]["tools"]
    fork = httpx.get(f"{api}/{find(data, 'What')['id']}").json()
    assert [b["fork_step"] for b in fork["branches"]] == [None, 1]

    # Errors are OpenAI-shaped.
    missing = httpx.get(f"{api}/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "trajectory_not_found"
    bad = httpx.get(api, params={"label": "great"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "label"
    assert httpx.get(api, params={"after": "xx"}).status_code == 400


def test_api_label_is_stored(serve_proxy: StartProxy) -> None:
    proxy = serve_proxy()
    record_traffic(proxy, by_name("haiku", "trip-planner"))
    api = f"{proxy.root_url}/api"
    tid = find(httpx.get(f"{api}/trajectories").json()["data"], "Write a haiku")["id"]
    answer = httpx.post(
        f"{api}/trajectories/{tid}/label",
        json={"label": "approved", "tags": ["short", "poem", "short"], "note": "<b>nice</b>"},
    )
    assert answer.status_code == 200, answer.text
    assert (answer.json()["label"], answer.json()["tags"]) == ("approved", ["short", "poem"])
    assert (
        httpx.post(f"{api}/trajectories/{tid}/label", json={"note": None}).json()["label"]
        == "approved"
    )
    assert [t["id"] for t in httpx.get(f"{api}/trajectories?label=approved").json()["data"]] == [
        tid
    ]
    assert [t["id"] for t in httpx.get(f"{api}/trajectories?tag=poem").json()["data"]] == [tid]

    wrong = httpx.post(f"{api}/trajectories/{tid}/label", json={"label": "great"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "label"
    unknown = httpx.post(f"{api}/trajectories/{tid}/label", json={"colour": "red"})
    assert unknown.status_code == 400
    form = httpx.post(f"{api}/trajectories/{tid}/label", data={"label": "rejected"})
    assert form.status_code == 400  # JSON only: a cross-site form cannot label
    assert httpx.post(f"{api}/trajectories/nope/label", json={"label": None}).status_code == 404
    others = [t["id"] for t in httpx.get(f"{api}/trajectories?label=unlabeled").json()["data"]]
    bulk = httpx.post(f"{api}/labels", json={"ids": others, "label": "rejected"})
    assert bulk.json() == {"object": "label_result", "updated": len(others)}

    proxy.stop()
    [row] = recorded_trajectories(proxy.db, tid)
    assert (row["label"], row["tags_json"], row["note"]) == ("approved", '["short", "poem"]', None)
    assert row["labeled_utc"]


# -- pages ---------------------------------------------------------------------------------------


def test_pages_render_tool_calls_and_escape_captured_values(serve_proxy: StartProxy) -> None:
    proxy = serve_proxy()
    record_traffic(proxy, by_name("docs-helper", "trip-planner", "weather"))
    with httpx.Client(base_url=proxy.root_url) as client:
        listing = client.get("/dashboard")
        assert listing.status_code == 200
        assert "default-src 'none'" in listing.headers["content-security-policy"]
        assert "How do I rotate an API key?" in listing.text
        docs = find(client.get("/api/trajectories").json()["data"], "How do I rotate")
        page = client.get(f"/dashboard/trajectories/{docs['id']}")
        assert page.status_code == 200
        html = page.text
        assert html.count('class="tool-name"') == 4
        assert "search_docs" in html and "fetch_page" in html
        assert "&#34;query&#34;: &#34;rotate API key&#34;" in html  # pretty args
        assert "&lt;script&gt;alert(" in html
        assert "<script>" not in html
        assert "step 5" in html and "And for a service account?" in html

        fork = find(client.get("/api/trajectories").json()["data"], "What")
        forked = client.get(f"/dashboard/trajectories/{fork['id']}").text
        assert "Branches" in forked and "forks at step 1" in forked
        leaf = client.get(f"/api/trajectories/{fork['id']}").json()["branches"][1]["leaf_id"]
        branch = client.get(f"/dashboard/trajectories/{fork['id']}", params={"leaf": leaf})
        assert branch.status_code == 200 and "this branch" in branch.text
        assert client.get(f"/dashboard/trajectories/{fork['id']}?leaf=zz").status_code == 404
        assert client.get("/dashboard/trajectories/nope").status_code == 404

        charts = client.get("/dashboard/charts")
        assert charts.status_code == 200 and charts.text.count('<svg class="chart"') == 5
        assert "search_docs" in charts.text
        data = client.get("/api/charts?window=7d").json()
        assert dict(data["tool_calls"])["search_docs"] == 2
        assert client.get("/api/charts?window=1y").status_code == 400
        assert client.get("/dashboard/static/dashboard.css").status_code == 200


def test_label_form_needs_its_csrf_token(serve_proxy: StartProxy) -> None:
    proxy = serve_proxy()
    record_traffic(proxy, by_name("haiku"))
    with httpx.Client(base_url=proxy.root_url) as client:
        tid = client.get("/api/trajectories").json()["data"][0]["id"]
        page = client.get(f"/dashboard/trajectories/{tid}")
        token = csrf_of(page.text)
        assert "understudy_csrf" in client.cookies
        form = {"csrf_token": token, "action": "approved", "tags": "a, b", "note": "ok"}
        origin = {"origin": proxy.root_url}

        done = client.post(f"/dashboard/trajectories/{tid}/label", data=form, headers=origin)
        assert done.status_code == 303 and "saved=approved" in done.headers["location"]
        got = client.get(f"/api/trajectories/{tid}").json()
        assert (got["label"], got["tags"], got["note"]) == ("approved", ["a", "b"], "ok")

        rejected = {**form, "action": "rejected"}
        no_token = client.post(
            f"/dashboard/trajectories/{tid}/label",
            data={**rejected, "csrf_token": ""},
            headers=origin,
        )
        assert no_token.status_code == 403
        cross = client.post(
            f"/dashboard/trajectories/{tid}/label",
            data=rejected,
            headers={"origin": "http://evil.example"},
        )
        assert cross.status_code == 403
        stranger = httpx.post(  # another browser: no CSRF cookie
            f"{proxy.root_url}/dashboard/trajectories/{tid}/label", data=rejected, headers=origin
        )
        assert stranger.status_code == 403
        assert client.get(f"/api/trajectories/{tid}").json()["label"] == "approved"

        bulk = client.post(
            "/dashboard/label",
            data={
                "csrf_token": token,
                "action": "clear",
                "id": [tid],
                "back": "/dashboard?label=approved",
            },
            headers=origin,
        )
        assert (
            bulk.status_code == 303
            and bulk.headers["location"] == "/dashboard?label=approved&labeled=1"
        )
        assert client.get(f"/api/trajectories/{tid}").json()["label"] is None


def test_dns_rebinding_host_is_refused_without_token(serve_proxy: StartProxy) -> None:
    proxy = serve_proxy()
    for path in ("/dashboard", "/api/trajectories"):
        answer = httpx.get(f"{proxy.root_url}{path}", headers={"host": "attacker.example"})
        assert answer.status_code == 403
    assert (
        httpx.get(f"{proxy.root_url}/api/trajectories", headers={"host": "localhost"}).status_code
        == 200
    )


# -- admin token ---------------------------------------------------------------------------------


def test_admin_token_protects_pages_and_api(serve_proxy: StartProxy) -> None:
    proxy = serve_proxy(admin_token=TOKEN)
    bearer = {"authorization": f"Bearer {TOKEN}"}
    record_traffic(proxy, by_name("haiku"), headers=bearer)
    api = f"{proxy.root_url}/api/trajectories"

    refused = httpx.get(api)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert refused.json()["error"]["code"] == "invalid_admin_token"
    assert httpx.get(api, headers={"authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(api, headers=bearer).status_code == 200

    with httpx.Client(base_url=proxy.root_url) as browser:
        page = browser.get("/dashboard/charts")
        assert page.status_code == 303
        assert page.headers["location"] == "/dashboard/login?next=%2Fdashboard%2Fcharts"
        login = browser.get(page.headers["location"])
        assert login.status_code == 200 and 'type="password"' in login.text
        form = {"csrf_token": csrf_of(login.text), "next": "/dashboard/charts"}
        wrong = browser.post("/dashboard/login", data={**form, "token": "nope"})
        assert wrong.status_code == 401 and "not the admin token" in wrong.text
        ok = browser.post("/dashboard/login", data={**form, "token": TOKEN})
        assert ok.status_code == 303 and ok.headers["location"] == "/dashboard/charts"
        cookie = ok.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert TOKEN not in cookie
        assert browser.get("/dashboard").status_code == 200
        assert browser.get("/api/trajectories").status_code == 200  # the session works for the API
        evil = browser.post(
            "/dashboard/login", data={**form, "token": TOKEN, "next": "//evil.example"}
        )
        assert evil.headers["location"] == "/dashboard"  # no open redirect
        out = browser.post("/dashboard/logout", data={"csrf_token": form["csrf_token"]})
        assert out.status_code == 303
        assert browser.get("/dashboard").status_code == 303


def test_dashboard_is_off_on_a_public_address_without_token(
    serve_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="understudy.dashboard")
    proxy = serve_proxy(host="0.0.0.0")
    page = httpx.get(f"{proxy.root_url}/dashboard")
    assert page.status_code == 403 and "UNDERSTUDY_ADMIN_TOKEN" in page.text
    api = httpx.get(f"{proxy.root_url}/api/trajectories")
    assert api.status_code == 403 and api.json()["error"]["code"] == "dashboard_disabled"
    # The proxy itself still works.
    client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-test-key", max_retries=0)
    client.chat.completions.create(
        model="gpt-4.1-mini", messages=[{"role": "user", "content": "hi"}]
    )
    output = caplog.text
    assert "the dashboard and /api/ are off" in output and "0.0.0.0" in output


def test_public_address_with_token_serves_the_api(serve_proxy: StartProxy) -> None:
    proxy = serve_proxy(host="0.0.0.0", admin_token=TOKEN)
    api = f"{proxy.root_url}/api/trajectories"
    assert httpx.get(api).status_code == 401
    assert httpx.get(api, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_export_downloads_the_filtered_set(serve_proxy: StartProxy, tmp_path: Path) -> None:
    proxy = serve_proxy()
    # Four complete conversations a round; OpenAI (and `validate`) want at least 10 samples.
    record_traffic(
        proxy, by_name("trip-planner", "support-refund", "haiku", "docs-helper"), rounds=3
    )
    api = f"{proxy.root_url}/api"
    data = httpx.get(f"{api}/trajectories").json()["data"]
    chosen = [t["id"] for t in data]
    assert len(chosen) == 12
    assert httpx.post(f"{api}/labels", json={"ids": chosen, "label": "approved"}).status_code == 200

    download = httpx.get(f"{proxy.root_url}/dashboard/export", params={"label": "approved"})
    assert download.status_code == 200, download.text
    assert download.headers["content-type"].startswith("application/jsonl")
    assert "attachment" in download.headers["content-disposition"]
    lines = download.text.splitlines()
    assert len(lines) == 12 and download.headers["x-understudy-export-written"] == "12"
    out = tmp_path / "approved.jsonl"
    out.write_bytes(download.content)
    checked = run_exporter("validate", str(out), "--strict-min-samples")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # Free text selects trajectories the exporter has no option for.
    searched = httpx.get(f"{api}/export", params={"q": "kitchenware", "label": "approved"})
    assert searched.status_code == 200 and len(searched.text.splitlines()) == 3
    assert '"refund_order"' in searched.text
    tools = httpx.get(f"{api}/export", params={"tools": "yes", "label": "approved"})
    assert tools.status_code == 200 and len(tools.text.splitlines()) == 9
    nothing = httpx.get(f"{api}/export", params={"label": "rejected"})
    assert nothing.status_code == 404 and nothing.json()["error"]["code"] == "nothing_to_export"
    bad = httpx.get(f"{api}/export", params={"format": "csv"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_export_options"


def test_streams_without_usage_show_estimated_tokens(serve_proxy: StartProxy) -> None:
    proxy = serve_proxy()
    body = {
        "model": "gpt-4.1-mini",
        "messages": [{"role": "user", "content": "Write a haiku about a proxy."}],
        "stream": True,
    }
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions", json=body) as answer:
        chunks = b"".join(answer.iter_raw())
        tid = answer.headers["x-understudy-trajectory-id"]
    assert b'"usage"' not in chunks  # the client gets what the upstream sent, no usage added
    asked = {**body, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions", json=asked) as answer:
        answer.read()
        counted = answer.headers["x-understudy-trajectory-id"]
    proxy.stop()
    rows = {row["trajectory_id"]: row for row in recorded_exchanges(proxy.db)}
    assert rows[tid]["usage"]["estimated"] is True and rows[tid]["total_tokens"] > 0
    assert "estimated" not in rows[counted]["usage"]
    again = serve_proxy(db=str(proxy.db))
    page = httpx.get(f"{again.root_url}/dashboard/trajectories/{tid}").text
    assert "(estimated for 1 step)" in page
    listed = httpx.get(f"{again.root_url}/api/trajectories/{tid}").json()
    assert listed["prompt_tokens"] > 0 and listed["exchanges"][0]["usage"]["estimated"] is True
    other = httpx.get(f"{again.root_url}/dashboard/trajectories/{counted}").text
    assert "estimated for" not in other
