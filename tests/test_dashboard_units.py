"""Pure units of the dashboard: view shaping, charts, access rules, parameters, cursors, prices."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from starlette.requests import Request

from proxy.config import Settings
from proxy.dashboard import charts
from proxy.dashboard.api import clean_tags
from proxy.dashboard.params import ParamError, parse_list_query, parse_time
from proxy.dashboard.pricing import cost_usd, price_of
from proxy.dashboard.render import environment, fmt_cost, fmt_ms
from proxy.dashboard.security import CSRF_COOKIE, Guard, is_loopback
from proxy.dashboard.turns import chat_turns, content_parts
from proxy.dashboard.view import branches, trajectory_payload
from proxy.storage.browse import CursorError, decode_cursor, encode_cursor, first_user_text

# -- helpers -----------------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "be brief"}
USER = {"role": "user", "content": "weather and hotel in Oslo, in parallel"}
CALLS = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
        },
        {
            "id": "c2",
            "type": "function",
            "function": {"name": "find_hotels", "arguments": "{not json"},
        },
    ],
}
RESULT_1 = {"role": "tool", "tool_call_id": "c1", "content": '{"forecast": "rain"}'}
RESULT_2 = {"role": "tool", "tool_call_id": "c2", "content": "<script>alert(1)</script>"}
FINAL = {"role": "assistant", "content": "Rain; Hotel Nord."}


def exchange(
    id_: str,
    parent: str | None,
    step: int,
    messages: list[dict[str, Any]],
    answer: dict[str, Any] | None,
    started: str,
    **extra: Any,
) -> dict[str, Any]:
    """An exchange row as `exchanges_of` returns it (JSON columns as text)."""
    response = (
        {"object": "chat.completion", "choices": [{"index": 0, "message": answer}]}
        if answer is not None
        else None
    )
    return {
        "id": id_,
        "trajectory_id": "t1",
        "parent_id": parent,
        "step": step,
        "started_utc": started,
        "duration_ms": 100.0,
        "ttft_ms": None,
        "stream": False,
        "status_code": 200 if answer is not None else 429,
        "outcome": "ok" if answer is not None else "error",
        "route": "student",
        "model_requested": "gpt-4.1-mini",
        "model_answered": "gpt-4.1-mini",
        "request_json": json.dumps({"model": "gpt-4.1-mini", "messages": messages}),
        "response_json": json.dumps(response) if response else None,
        "error_json": None if answer is not None else '{"error": {"message": "slow down"}}',
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "tool_call_count": len((answer or {}).get("tool_calls") or []),
        "injected_logit_bias_json": None,
        **extra,
    }


TRAJECTORY_ROW = {
    "id": "t1",
    "created_utc": "2026-11-21T10:00:00.000+00:00",
    "updated_utc": "2026-11-21T10:00:02.000+00:00",
    "id_source": "hash",
    "route": "student",
    "exchange_count": 3,
    "error_count": 0,
    "tool_call_count": 2,
    "prompt_tokens": 30,
    "completion_tokens": 15,
    "label": None,
    "tags_json": '["good"]',
    "note": None,
    "labeled_utc": None,
}


def forked_exchanges() -> list[dict[str, Any]]:
    """e1 calls two tools; e2 answers with both results; e3 is a retry of step 1 (a fork)."""
    e1 = exchange(
        "e1",
        None,
        0,
        [SYSTEM, USER],
        CALLS,
        "2026-11-21T10:00:00.000+00:00",
        injected_logit_bias_json='{"316": 5}',
    )
    e2 = exchange(
        "e2",
        "e1",
        1,
        [SYSTEM, USER, CALLS, RESULT_1, RESULT_2],
        FINAL,
        "2026-11-21T10:00:01.000+00:00",
    )
    retry = {**RESULT_1, "content": "timeout"}
    e3 = exchange(
        "e3", "e1", 1, [SYSTEM, USER, CALLS, retry, RESULT_2], None, "2026-11-21T10:00:02.000+00:00"
    )
    return [e1, e2, e3]


# -- view ------------------------------------------------------------------------------------


def test_branches_latest_first_with_fork_point() -> None:
    payload = trajectory_payload(TRAJECTORY_ROW, forked_exchanges())
    found = payload["branches"]
    assert [b["leaf_id"] for b in found] == ["e3", "e2"]
    assert found[0]["fork_step"] is None and found[0]["chain"] == ["e1", "e3"]
    assert found[1]["fork_step"] == 1 and found[1]["fork_exchange_id"] == "e1"


def test_branches_of_unlinked_roots_are_separate_starts() -> None:
    rows = [
        exchange("a", None, 0, [USER], FINAL, "2026-11-21T10:00:00.000+00:00"),
        exchange("b", None, 0, [USER], FINAL, "2026-11-21T10:00:01.000+00:00"),
    ]
    found = branches(trajectory_payload(TRAJECTORY_ROW, rows)["exchanges"])
    assert [b["fork_step"] for b in found] == [None, 0]


def test_chat_turns_put_each_tool_result_beside_its_call() -> None:
    payload = trajectory_payload(TRAJECTORY_ROW, forked_exchanges())
    view = chat_turns(payload, "e2")
    roles = [t["role"] for t in view["turns"]]
    assert roles == ["system", "user", "assistant", "assistant"]  # tool messages folded in
    calls = view["turns"][2]["tool_calls"]
    assert [c["name"] for c in calls] == ["get_weather", "find_hotels"]
    assert calls[0]["arguments"] == '{\n  "city": "Oslo"\n}'
    assert calls[0]["result"]["parts"] == [{"kind": "json", "text": '{\n  "forecast": "rain"\n}'}]
    assert calls[1]["arguments_valid"] is False and calls[1]["arguments"] == "{not json"
    assert calls[1]["result"]["parts"][0]["text"] == "<script>alert(1)</script>"
    step0 = view["turns"][2]["step"]
    assert step0["step"] == 0 and step0["injected_logit_bias"] == {"316": 5}
    assert view["turns"][3]["step"]["exchange_id"] == "e2"
    assert view["turns"][3]["diverged"] is True  # after the fork point of this branch
    assert calls[0]["result"]["diverged"] is True and view["turns"][2]["diverged"] is False


def test_chat_turns_of_a_failed_leaf_end_with_an_error_turn() -> None:
    payload = trajectory_payload(TRAJECTORY_ROW, forked_exchanges())
    view = chat_turns(payload)  # latest branch: the retry that failed
    assert view["branch"]["leaf_id"] == "e3"
    last = view["turns"][-1]
    assert last["role"] == "error" and last["step"]["status_code"] == 429
    assert "slow down" in last["step"]["error"]
    assert view["turns"][2]["tool_calls"][0]["result"]["parts"][0]["text"] == "timeout"


def test_chat_turns_unknown_leaf_raises() -> None:
    payload = trajectory_payload(TRAJECTORY_ROW, forked_exchanges())
    with pytest.raises(KeyError):
        chat_turns(payload, "nope")


def test_unanswered_tool_message_stays_a_turn_and_history_is_marked() -> None:
    orphan = {"role": "tool", "tool_call_id": "zz", "content": "late"}
    prior = {"role": "assistant", "content": "earlier answer"}
    rows = [
        exchange("a", None, 0, [USER, prior, orphan, USER], FINAL, "2026-11-21T10:00:00.000+00:00")
    ]
    view = chat_turns(trajectory_payload(TRAJECTORY_ROW, rows))
    assert [t["role"] for t in view["turns"]] == ["user", "assistant", "tool", "user", "assistant"]
    assert view["turns"][1]["recorded"] is False and view["turns"][4]["recorded"] is True


def test_content_parts_shapes() -> None:
    parts = content_parts(
        [
            {"type": "text", "text": "hi"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "refusal", "refusal": "no"},
            {"type": "weird", "x": 1},
        ],
        json_pretty=False,
    )
    assert [p["kind"] for p in parts] == ["text", "media", "refusal", "json"]
    assert content_parts('["a"]', json_pretty=True)[0]["kind"] == "json"
    assert content_parts('["a"]', json_pretty=False)[0]["kind"] == "text"
    assert content_parts(None, json_pretty=True) == []


def test_first_user_text_joins_parts_and_cuts() -> None:
    body = {
        "messages": [SYSTEM, {"role": "user", "content": [{"type": "text", "text": "a  b\nc"}]}]
    }
    assert first_user_text(json.dumps(body)) == "a b c"
    long = {"messages": [{"role": "user", "content": "x" * 500}]}
    assert len(first_user_text(json.dumps(long)) or "") == 200
    assert first_user_text("not json") is None


def test_templates_escape_captured_values() -> None:
    payload = trajectory_payload(TRAJECTORY_ROW, forked_exchanges())
    html = (
        environment().get_template("_turn.html").render(turn=chat_turns(payload, "e2")["turns"][2])
    )
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>" not in html


# -- charts ----------------------------------------------------------------------------------


def test_percentile_and_nice_numbers() -> None:
    assert charts.percentile([], 50) is None
    assert charts.percentile([1, 2, 3, 4], 50) == 2.5
    assert charts.percentile([5], 99) == 5
    assert charts.nice_max(0) == 1 and charts.nice_max(21) == 50 and charts.nice_max(0.3) == 0.5
    assert charts.axis_top(21) == 40
    assert charts.fmt_number(1500) == "1.5k" and charts.fmt_number(2_000_000) == "2M"
    assert charts.fmt_ms_tick(1500) == "1.5 s" and charts.fmt_ms_tick(250) == "250 ms"


def test_svg_escapes_labels_and_handles_no_data() -> None:
    svg = charts.hbars_svg([("<script>x</script>", [3])], label="tools")
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert "no data" in charts.stacked_bars_svg(["2026-11-21T10"], {"student": [0]}, label="x")
    line = charts.lines_svg(["a", "b", "c"], {"p50": [1.0, None, 3.0]}, label="lat", unit=" ms")
    assert line.count("<circle") == 2 and "<polyline" not in line  # a gap splits the line


def test_chart_series_buckets_routes_and_tools() -> None:
    from proxy.storage.browse import ChartRows

    call = {
        "choices": [
            {"message": {"tool_calls": [{"function": {"name": "a"}}, {"function": {"name": "b"}}]}}
        ]
    }
    rows = ChartRows(
        by_bucket_route=[("2026-11-21T10", "student", 3), ("2026-11-21T10", "teacher", 1)],
        tokens_by_model=[("m", 10, 5, 2)],
        latencies=[("2026-11-21T10", 100.0, None), ("2026-11-21T10", 300.0, 50.0)],
        tool_responses=[json.dumps(call), json.dumps(call), "garbage"],
        totals={"exchanges": 4, "trajectories": 2},
    )
    series = charts.chart_series(rows, ["2026-11-21T09", "2026-11-21T10"])
    assert series["exchanges_by_route"] == {"student": [0.0, 3.0], "teacher": [0.0, 1.0]}
    assert series["teacher_share"] == [None, 25.0] and series["teacher_share_total"] == 25.0
    assert series["latency_ms"]["p50"] == [None, 200.0]
    assert series["tool_calls"] == [("a", 2), ("b", 2)]


def test_window_start_and_buckets_are_contiguous() -> None:
    now = dt.datetime(2026, 11, 21, 10, 30, tzinfo=dt.UTC)
    since, chars = charts.window_start("24h", now)
    assert since == "2026-11-20T11:00:00.000+00:00" and chars == 13
    keys = charts.bucket_labels(since, chars, now)
    assert len(keys) == 24 and keys[-1] == "2026-11-21T10"
    with pytest.raises(KeyError):
        charts.window_start("1y")


# -- access rules ----------------------------------------------------------------------------


def _request(headers: dict[str, str], cookies: dict[str, str] | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if cookies:
        raw.append((b"cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()).encode()))
    return Request(
        {"type": "http", "method": "POST", "path": "/", "headers": raw, "query_string": b""}
    )


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_guard_off_on_public_address_without_token() -> None:
    guard = Guard.from_settings(Settings(host="0.0.0.0"))
    assert not guard.enabled and "UNDERSTUDY_ADMIN_TOKEN" in (guard.disabled_reason or "")
    assert Guard.from_settings(Settings(host="0.0.0.0", admin_token="s3cret")).enabled
    assert Guard.from_settings(Settings(host="127.0.0.1")).enabled


def test_guard_sessions_bearer_and_host() -> None:
    guard = Guard.from_settings(Settings(admin_token="s3cret"))
    session = guard.new_session(now=1000)
    assert "s3cret" not in session
    assert guard.valid_session(session, now=1001)
    assert not guard.valid_session(session, now=1000 + 8 * 24 * 3600)  # expired
    assert not guard.valid_session(session.replace(".", ".0"), now=1001)
    assert not Guard.from_settings(Settings(admin_token="other")).valid_session(session, now=1001)
    assert guard.valid_bearer("Bearer s3cret") and not guard.valid_bearer("Bearer nope")
    assert not guard.authenticated(_request({"host": "127.0.0.1"}))
    assert guard.authenticated(_request({"authorization": "Bearer s3cret"}))
    open_guard = Guard.from_settings(Settings())
    assert open_guard.authenticated(_request({}))
    assert open_guard.host_allowed(_request({"host": "localhost:8787"}))
    assert not open_guard.host_allowed(_request({"host": "rebound.example:8787"}))


def test_csrf_needs_cookie_token_and_same_origin() -> None:
    guard = Guard.from_settings(Settings())
    nonce = guard.new_nonce()
    token = guard.csrf_token(nonce)
    here = {"host": "127.0.0.1:8787", "origin": "http://127.0.0.1:8787"}
    assert guard.valid_csrf(_request(here, {CSRF_COOKIE: nonce}), token)
    assert not guard.valid_csrf(_request(here, {CSRF_COOKIE: nonce}), "x" + token[1:])
    assert not guard.valid_csrf(_request(here), token)
    evil = {**here, "origin": "http://evil.example"}
    assert not guard.valid_csrf(_request(evil, {CSRF_COOKIE: nonce}), token)


# -- parameters, cursors, prices, formats ----------------------------------------------------


def test_parse_list_query() -> None:
    query = parse_list_query(
        {
            "route": "teacher",
            "label": "unlabeled",
            "tools": "yes",
            "errors": "no",
            "from": "2026-11-20",
            "to": "2026-11-21",
            "q": " refund ",
            "limit": "10",
        }
    )
    f = query.filter
    assert (f.route, f.labels, f.has_tool_calls, f.errors, f.text) == (
        "teacher",
        ("unlabeled",),
        True,
        False,
        "refund",
    )
    assert parse_list_query({"label": "labeled"}).filter.labels == ("approved", "rejected")
    assert parse_list_query({"model": "o3", "tag": "gold"}).filter.models == ("o3",)
    assert parse_list_query({"model": "o3", "tag": "gold"}).filter.tags == ("gold",)
    assert parse_list_query({}).filter.is_empty()
    assert (f.since_utc, f.until_utc) == ("2026-11-20", "2026-11-22")
    assert query.limit == 10
    assert "after=abc" in query.link(after="abc") and "route=teacher" in query.link()
    for bad in (
        {"label": "good"},
        {"tools": "maybe"},
        {"limit": "0"},
        {"from": "yesterday"},
        {"after": "a", "before": "b"},
    ):
        with pytest.raises(ParamError):
            parse_list_query(bad)


def test_parse_time_normalizes_to_utc() -> None:
    assert parse_time("2026-11-21T12:00:00+02:00", "from") == "2026-11-21T10:00:00.000+00:00"
    assert parse_time("2026-11-21T12:00", "from") == "2026-11-21T12:00:00.000+00:00"


def test_cursor_round_trip_and_tampering() -> None:
    cursor = encode_cursor("2026-11-21T10:00:00.000+00:00", "abc")
    assert decode_cursor(cursor) == ("2026-11-21T10:00:00.000+00:00", "abc")
    for bad in ("!!!", "e30", encode_cursor("a", "b")[:-3] + "zzz"):
        with pytest.raises(CursorError):
            decode_cursor(bad)


def test_clean_tags() -> None:
    assert clean_tags(" a, b ,a,, c d ") == ["a", "b", "c d"]
    assert clean_tags(["x", "x"]) == ["x"]
    with pytest.raises(ParamError):
        clean_tags([1])
    with pytest.raises(ParamError):
        clean_tags(["t"] * 0 + [f"t{i}" for i in range(21)])


def test_prices_from_litellm_table() -> None:
    price = price_of("gpt-4.1-mini")
    assert price is not None and price[0] > 0
    assert price_of("openai/gpt-4.1-mini") == price
    assert price_of("no-such-model") is None
    usage = [
        {
            "model_requested": "gpt-4.1-mini",
            "model_answered": None,
            "prompt_tokens": 1000,
            "completion_tokens": 0,
        }
    ]
    assert cost_usd(usage) == pytest.approx(1000 * price[0])
    assert cost_usd([{"model_requested": "mystery", "prompt_tokens": 5}]) is None


def test_formats() -> None:
    assert fmt_ms(None) == "\u2013" and fmt_ms(812) == "812 ms" and fmt_ms(2300) == "2.3 s"
    assert fmt_ms(125_000) == "2 min 5 s"
    assert (
        fmt_cost(None) == "\u2013"
        and fmt_cost(0.0001234) == "$0.00012"
        and fmt_cost(12.5) == "$12.50"
    )
