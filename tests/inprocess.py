"""The proxy app driven in-process: `httpx.AsyncClient` over `httpx.ASGITransport`, the app's
lifespan run around it (database, recorder and upstream client opened and closed as in a
server), through `FastPath` as `python -m proxy` serves it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import httpx
from fastapi import FastAPI

from proxy.app import FastPath, create_app
from proxy.config import Settings


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """Run the app's lifespan; yield `client(address="127.0.0.1")`, which makes an
    `httpx.AsyncClient` whose requests come from `address` (close it, or use `async with`)."""
    app: FastAPI = create_app(settings)
    entry = FastPath(app)
    async with app.router.lifespan_context(app):

        def client(address: str = "127.0.0.1") -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app=entry, client=(address, 50_000))
            return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1")

        yield client
