"""Azure OpenAI through the proxy (issue 16): `AzureOpenAI(azure_endpoint=<proxy>)` (also
`<proxy>/v1`) and Azure's v1 API (`/openai/v1/...`) are forwarded to an Azure upstream as sent and
recorded; the deployment is the model asked; `api-key` is forwarded, never stored; an OpenAI
upstream answers Azure paths with a clear 404 and forwards nothing; paths never leave `/openai`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.config import Settings, is_azure_upstream
from proxy.http.paths import PathRefused, recorded_spelling, upstream_path
from tests.support.inprocess import ROOT_URL, InProcessProxy, in_process_proxy
from tests.support.processes import FakeUpstream
from tests.support.records import database_bytes
from tests.support.spellings import db_url, exchanges_in

__all__ = ["db_url"]  # the fixture, used by parameter name

AZURE_KEY = "azure-key-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
API_VERSION = "2024-10-21"
DEPLOYMENT = "my-gpt4o-deployment"
TOOLS = [
    {
        "type": "function",
        "function": {"name": "search", "parameters": {"type": "object", "properties": {}}},
    }
]


def azure_root(fake_upstream: FakeUpstream) -> str:
    """The fake upstream as an Azure resource URL (its root, like https://R.openai.azure.com)."""
    return fake_upstream.base_url.removesuffix("/v1")


def azure_sdk(proxy: InProcessProxy, endpoint: str = ROOT_URL) -> openai.AsyncAzureOpenAI:
    return openai.AsyncAzureOpenAI(
        azure_endpoint=endpoint,
        api_key=AZURE_KEY,
        api_version=API_VERSION,
        http_client=proxy.client,
        max_retries=0,
    )


async def agent_turns(sdk: Any, model: str) -> list[str]:
    """A two-step tool-using conversation (the fake calls `search`, then answers); the answers."""
    messages: list[Any] = [{"role": "user", "content": "find the azure doc"}]
    first = await sdk.chat.completions.create(model=model, messages=messages, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "doc found"},
    ]
    stream = await sdk.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, stream=True
    )
    async for _ in stream:
        pass
    return [first.id]


def fake_calls(fake_upstream: FakeUpstream) -> list[dict[str, Any]]:
    return [r for r in fake_upstream.requests() if r.get("path", "").startswith("/openai/")]


async def test_azure_openai_sdk_is_forwarded_and_recorded(
    tmp_path: Path, fake_upstream: FakeUpstream, db_url: str
) -> None:
    fake_upstream.clear()
    async with in_process_proxy(
        tmp_path, upstream=azure_root(fake_upstream), upstream_kind="azure", db=db_url
    ) as proxy:
        sdk = azure_sdk(proxy)
        await agent_turns(sdk, DEPLOYMENT)
        answer = await sdk.responses.create(model=DEPLOYMENT, input="hello from azure responses")
        assert answer.output_text.startswith("Answer to")
    received = fake_calls(fake_upstream)
    assert [r["path"] for r in received] == [
        f"/openai/deployments/{DEPLOYMENT}/chat/completions",
        f"/openai/deployments/{DEPLOYMENT}/chat/completions",
        "/openai/responses",
    ]
    assert all(r["query"] == f"api-version={API_VERSION}" for r in received)
    assert all(r["headers"]["api-key"] == AZURE_KEY for r in received)

    rows = await exchanges_in(db_url)
    chat = [row for row in rows if row["kind"] == "chat"]
    assert [row["step"] for row in chat] == [0, 1]
    assert len({row["trajectory_id"] for row in chat}) == 1  # stitched across Azure calls
    assert chat[1]["parent_id"] == chat[0]["id"]
    assert chat[1]["stream"] and chat[1]["outcome"] == "ok"
    assert {row["model_requested"] for row in rows} == {DEPLOYMENT}
    assert {row["path"] for row in chat} == {f"/openai/deployments/{DEPLOYMENT}/chat/completions"}
    assert chat[0]["tool_call_count"] == 1
    for row in rows:
        assert AZURE_KEY not in json.dumps(row, default=str)
    if not db_url.startswith("postgresql"):
        assert AZURE_KEY.encode() not in database_bytes(Path(db_url))


@pytest.mark.parametrize(
    ("endpoint", "path"),
    [
        (ROOT_URL + "/v1", f"/openai/deployments/{DEPLOYMENT}/chat/completions"),
        (ROOT_URL + "/", f"/openai/deployments/{DEPLOYMENT}/chat/completions"),
    ],
    ids=["endpoint-v1", "endpoint-slash"],
)
async def test_azure_endpoint_spellings_are_recorded(
    tmp_path: Path, fake_upstream: FakeUpstream, endpoint: str, path: str
) -> None:
    fake_upstream.clear()
    async with in_process_proxy(
        tmp_path, upstream=azure_root(fake_upstream), upstream_kind="azure"
    ) as proxy:
        await agent_turns(azure_sdk(proxy, endpoint), DEPLOYMENT)
    assert [r["path"] for r in fake_calls(fake_upstream)] == [path, path]
    rows = await exchanges_in(str(proxy.db))
    assert [(row["step"], row["model_requested"]) for row in rows] == [
        (0, DEPLOYMENT),
        (1, DEPLOYMENT),
    ]


async def test_azure_v1_api_and_openai_spellings_reach_azure_v1(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    """Azure's v1 API (`OpenAI(base_url=<proxy>/openai/v1)`), and a plain OpenAI client
    (`<proxy>/v1`) in front of an Azure upstream: both reach `/openai/v1/...` and are recorded."""
    fake_upstream.clear()
    async with in_process_proxy(
        tmp_path, upstream=azure_root(fake_upstream), upstream_kind="azure"
    ) as proxy:
        for base in (ROOT_URL + "/openai/v1", ROOT_URL + "/v1"):
            sdk = openai.AsyncOpenAI(
                base_url=base,
                api_key=AZURE_KEY,
                http_client=proxy.client,
                max_retries=0,
                default_headers={"api-key": AZURE_KEY},
            )
            await agent_turns(sdk, "gpt-4o-mini")
            await sdk.responses.create(model="gpt-4o-mini", input="hi")
        # Not recorded, passed through under /openai: embeddings on a deployment.
        embedded = await azure_sdk(proxy).embeddings.create(model=DEPLOYMENT, input=["a", "b"])
        assert len(embedded.data) == 2
    paths = [r["path"] for r in fake_calls(fake_upstream) if "embeddings" not in r["path"]]
    v1 = ["/openai/v1/chat/completions", "/openai/v1/chat/completions", "/openai/v1/responses"]
    assert paths == v1 + v1
    rows = await exchanges_in(str(proxy.db))
    assert len(rows) == 6
    assert {row["model_requested"] for row in rows} == {"gpt-4o-mini"}
    assert sorted(row["step"] for row in rows if row["kind"] == "chat") == [0, 0, 1, 1]


async def test_proxy_key_goes_to_azure_as_api_key(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.clear()
    proxy_key = "proxy-owned-azure-key-11223344556677889900"
    async with in_process_proxy(
        tmp_path,
        upstream=azure_root(fake_upstream),
        upstream_kind="azure",
        upstream_api_key=proxy_key,
    ) as proxy:
        await azure_sdk(proxy).chat.completions.create(
            model=DEPLOYMENT, messages=[{"role": "user", "content": "hi"}]
        )
    (received,) = fake_calls(fake_upstream)
    assert received["headers"]["api-key"] == proxy_key
    assert "authorization" not in received["headers"]
    assert proxy_key.encode() not in database_bytes(proxy.db)


async def test_azure_paths_need_an_azure_upstream(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.clear()
    async with in_process_proxy(tmp_path, upstream=fake_upstream.base_url) as proxy:
        with pytest.raises(openai.NotFoundError) as caught:
            await azure_sdk(proxy).chat.completions.create(
                model=DEPLOYMENT, messages=[{"role": "user", "content": "hi"}]
            )
        assert "--upstream-kind azure" in caught.value.message
        other = await proxy.client.get("/openai/deployments")
        assert other.status_code == 404 and "not Azure" in other.json()["error"]["message"]
    assert fake_upstream.requests() == []
    assert await exchanges_in(str(proxy.db)) == []


def test_azure_upstream_detected_from_its_host() -> None:
    assert is_azure_upstream("https://res.openai.azure.com", "auto")
    assert is_azure_upstream("https://res.cognitiveservices.azure.com/", "auto")
    assert not is_azure_upstream("https://api.openai.com/v1", "auto")
    assert not is_azure_upstream("https://evil.openai.azure.com.example.org", "auto")
    assert is_azure_upstream("http://127.0.0.1:9", "azure")
    assert not is_azure_upstream("https://res.openai.azure.com", "openai")
    assert Settings(upstream="https://res.openai.azure.com").upstream_is_azure
    assert not Settings().upstream_is_azure


@pytest.mark.parametrize(
    ("raw", "api", "deployment"),
    [
        ("/openai/deployments/d1/chat/completions", "chat", "d1"),
        ("/v1/openai/deployments/d1/chat/completions/", "chat", "d1"),
        ("/openai//deployments/d%201/responses", "responses", "d 1"),
        ("/openai/v1/chat/completions", "chat", None),
        ("/openai/responses", "responses", None),
        ("/openai/deployments/d1/embeddings", None, None),
        ("/openai/deployments/chat/completions", None, None),
        ("/openai/deployments/..%2f..%2fx/chat/completions", None, None),
    ],
)
def test_azure_spellings(raw: str, api: str | None, deployment: str | None) -> None:
    spelling = recorded_spelling(raw)
    assert (spelling.api if spelling else None) == api
    if spelling is not None:
        assert spelling.azure and spelling.deployment == deployment


@pytest.mark.parametrize(
    ("raw", "forwarded"),
    [
        ("/openai/deployments/d1/embeddings", "/openai/deployments/d1/embeddings"),
        ("/v1/openai/files", "/openai/files"),
        ("/v1/models", "/openai/v1/models"),
        ("/openai/deployments/d%201/x", "/openai/deployments/d%201/x"),
    ],
)
def test_azure_upstream_paths_stay_under_openai(raw: str, forwarded: str) -> None:
    assert upstream_path(raw, azure=True) == forwarded


@pytest.mark.parametrize(
    "raw",
    ["/openai/../admin", "/openai/%2e%2e/%2e%2e/x", "/openai/..%2fx", "/admin", "/v1/../../x", "/"],
)
def test_azure_upstream_paths_refuse_escapes(raw: str) -> None:
    with pytest.raises(PathRefused):
        upstream_path(raw, azure=True)
