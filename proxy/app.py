"""The app factory: `create_app(settings)` builds the FastAPI app and opens its resources in the lifespan."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.chat import chat_completions
from proxy.config import Settings, get_settings
from proxy.dashboard import mount_dashboard
from proxy.errors import error_response
from proxy.passthrough import passthrough
from proxy.recorder import Recorder
from proxy.state import ProxyState
from proxy.stitching import Stitcher
from proxy.storage import Database
from proxy.teacher import Teacher
from proxy.upstream import create_client

log = logging.getLogger("understudy")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the proxy app. Resources (database, recorder, upstream client) open in its lifespan."""
    settings = settings or get_settings()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = await Database.open(settings.db)
        recorder = Recorder(
            db,
            flush_interval_s=settings.flush_interval_ms / 1000,
            batch_size=settings.record_batch_size,
            queue_size=settings.record_queue_size,
        )
        await recorder.start()
        client = create_client(settings)
        proxy = ProxyState(
            settings=settings,
            db=db,
            recorder=recorder,
            stitcher=Stitcher(db, settings.stitch_cache_size),
            client=client,
            teacher=Teacher(settings) if settings.teacher_model else None,
        )
        app.state.proxy = proxy
        log.info("understudy proxy: upstream %s, database %s", settings.upstream, settings.db)
        if proxy.teacher is not None:
            log.info(
                "teacher %s: rate %.2f, %d routing rules",
                settings.teacher_model,
                settings.teacher_rate,
                len(settings.routing_rules),
            )
        try:
            yield
        finally:
            await proxy.drain_background(settings.read_timeout_s)
            await client.aclose()
            await recorder.stop()
            await db.close()
            log.info("recorder: %s", dict(recorder.stats))

    app = FastAPI(title="Understudy proxy", lifespan=lifespan, docs_url=None, redoc_url=None)
    # Hot paths are plain Starlette routes: the body is forwarded as bytes, never re-modelled.
    app.router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.router.add_route(
        "/v1/{path:path}",
        passthrough,
        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
    )

    mount_dashboard(app, settings)

    @app.get("/health")
    async def health(request: Request) -> Response:
        """Liveness and recorder counters."""
        proxy: ProxyState = request.app.state.proxy
        return JSONResponse(
            {
                "status": "ok",
                "record_queue_depth": proxy.recorder.queue_depth,
                "recorder": dict(proxy.recorder.stats),
            }
        )

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(404, f"unknown path {request.url.path}", code="unknown_url")

    @app.exception_handler(405)
    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return error_response(
            405,
            f"method {request.method} not allowed on {request.url.path}",
            code="method_not_allowed",
        )

    return app
