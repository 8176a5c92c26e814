"""The app factory: `create_app(settings)` builds the FastAPI app and opens its resources in the lifespan."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from proxy.config import Settings, get_settings, journal_path
from proxy.core.redaction import Redactor, loggable_error
from proxy.dashboard import mount_dashboard
from proxy.http.chat import chat_completions
from proxy.http.conversations import conversations_call
from proxy.http.errors import error_response
from proxy.http.metrics import Metrics
from proxy.http.passthrough import passthrough
from proxy.http.paths import AZURE_ROOT, RECORDED_APIS, recorded_spelling_of
from proxy.http.responses import create_response, drain_background, retrieve_response
from proxy.http.responses_ws import responses_websocket
from proxy.http.state import ProxyState
from proxy.http.teacher import Teacher
from proxy.http.upstream import create_client
from proxy.recording.journal import Journal
from proxy.recording.recorder import Recorder
from proxy.recording.stitching import Stitcher
from proxy.storage import Database
from proxy.storage.database import display_target
from proxy.storage.recovery import ping

log = logging.getLogger("understudy")


class FastPath:
    """ASGI entry point used by `python -m proxy`: a POST to a recorded API (`/v1/chat/completions`,
    `/v1/responses`, however spelled: `proxy.http.paths`) goes straight to its handler, skipping
    the framework's middleware stack (it cost ~1/5 of the proxy's CPU per call under load); lifespan and every other path go to the FastAPI app, where the same route is
    also registered (so `create_app()` alone serves everything too)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            spelling = recorded_spelling_of(scope)
            if spelling is not None and not spelling.azure:  # Azure: the app checks the upstream
                scope["app"] = self.app
                response = await RECORDED_HANDLERS[spelling.api](Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# The handler of each recorded API named in `proxy.http.paths.RECORDED_APIS`.
RECORDED_HANDLERS: dict[str, Callable[[Request], Awaitable[Response]]] = {
    "chat": chat_completions,
    "responses": create_response,
}


def _not_azure(request: Request) -> Response:
    return error_response(
        404,
        f"{request.url.path} is an Azure OpenAI path, but this proxy's upstream is not Azure: "
        "start it with --upstream https://RESOURCE.openai.azure.com (or --upstream-kind azure)",
        code="unknown_url",
    )


async def v1_request(request: Request) -> Response:
    """Any `/v1/*` or `/openai/*` request: a POST to a recorded API however spelled
    (`/v1/chat/completions/`, `/v1//chat/completions`, Azure's
    `/openai/deployments/{d}/chat/completions`, ...) goes to its handler, everything else to the
    pass-through. Azure OpenAI paths need an Azure upstream (`Settings.upstream_is_azure`):
    otherwise a recorded one, or any path under `/openai`, is answered 404 saying so."""
    azure = request.app.state.proxy.settings.upstream_is_azure
    if request.method == "POST":
        spelling = recorded_spelling_of(request.scope)
        if spelling is not None:
            if spelling.azure and not azure:
                return _not_azure(request)
            return await RECORDED_HANDLERS[spelling.api](request)
    if not azure and request.url.path.startswith(f"/{AZURE_ROOT}/"):
        return _not_azure(request)
    return await passthrough(request)


async def _stop_recorder(recorder: Recorder) -> None:
    """Shutdown: write what the recorder holds (see `Recorder.stop`), then log its counters."""
    await recorder.stop()
    log.info("recorder: %s", dict(recorder.stats))


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the proxy app. Resources (database, recorder, upstream client) open in its lifespan."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Each resource's close is pushed as soon as it is open: at shutdown they run in reverse
        # order, and one that raises does not keep the others (the recorder's drain) from running.
        async with contextlib.AsyncExitStack() as resources:
            db = await Database.open(settings.db, convert_in_background=True)
            resources.push_async_callback(db.close)
            recorder = Recorder(
                db,
                journal=Journal(journal_path(settings)),
                redactor=Redactor(settings.redact_pii, settings.phone_region),
                flush_interval_s=settings.flush_interval_ms / 1000,
                batch_size=settings.record_batch_size,
                queue_size=settings.record_queue_size,
                buffer_bytes=settings.record_buffer_bytes,
                write_ahead=settings.write_ahead,
                writer=settings.record_writer,
            )
            await recorder.start()
            resources.push_async_callback(_stop_recorder, recorder)
            client = create_client(settings)
            resources.push_async_callback(client.close)
            stitcher = Stitcher(db, settings.stitch_cache_size)
            proxy = ProxyState(
                settings=settings,
                db=db,
                recorder=recorder,
                stitcher=stitcher,
                client=client,
                metrics=Metrics(recorder, stitcher),
                teacher=Teacher(settings) if settings.teacher_model else None,
            )
            # Background responses never retrieved are recorded as they are, once the shadow
            # calls (which may still submit records) are done.
            resources.push_async_callback(drain_background, proxy)
            resources.push_async_callback(proxy.drain_background, settings.read_timeout_s)
            app.state.proxy = proxy
            # What start-up allocated (modules, litellm, SQLAlchemy) lives forever: keep it out
            # of every later collection, so a full collection does not walk it (it took ~300 ms).
            gc.collect()
            gc.freeze()
            log.info(
                "understudy proxy: upstream %s, database %s (%s stitching)",
                settings.upstream,
                display_target(settings.db),
                proxy.stitcher.mode,
            )
            if proxy.teacher is not None:
                log.info(
                    "teacher %s: rate %.2f, %d routing rules",
                    settings.teacher_model,
                    settings.teacher_rate,
                    len(settings.routing_rules),
                )
            yield

    app = FastAPI(title="Understudy proxy", lifespan=lifespan, docs_url=None, redoc_url=None)
    # Hot paths are plain Starlette routes: the body is forwarded as bytes, never re-modelled.
    for path, api in RECORDED_APIS.items():  # also without /v1, as some clients send them
        for spelling in (path, path + "/"):
            app.router.add_route(spelling, RECORDED_HANDLERS[api], methods=["POST"])
    app.router.add_route("/v1/responses/{response_id}", retrieve_response, methods=["GET"])
    app.router.add_websocket_route("/v1/responses", responses_websocket)
    app.router.add_route("/v1/conversations", conversations_call, methods=["POST"])
    app.router.add_route(
        "/v1/conversations/{conversation_id}/items", conversations_call, methods=["GET", "POST"]
    )
    for root in ("/v1/{path:path}", f"/{AZURE_ROOT}/{{path:path}}"):
        app.router.add_route(
            root, v1_request, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
        )

    mount_dashboard(app, settings)

    @app.get("/health")
    async def health(request: Request) -> Response:
        """Liveness: the process answers. Includes the recorder's counters."""
        proxy: ProxyState = request.app.state.proxy
        return JSONResponse(
            {
                "status": "ok",
                "record_queue_depth": proxy.recorder.queue_depth,
                "journal_bytes": proxy.recorder.journal.size_bytes,
                "journal_rejected_bytes": proxy.recorder.journal.rejected_bytes,
                "record_buffer_bytes": proxy.recorder.held_bytes,
                "recording_impaired": proxy.recorder.impaired,
                "record_writer": proxy.recorder.writer,
                "recorder": dict(proxy.recorder.stats),
            }
        )

    @app.get("/ready")
    async def ready(request: Request) -> Response:
        """Readiness: the database answers and the recorder runs (503 otherwise).

        Calls are still served when not ready (records go to the journal); a load balancer may
        prefer replicas that are ready.
        """
        proxy: ProxyState = request.app.state.proxy
        problems = []
        if not proxy.recorder.running:
            problems.append("recorder not running")
        if proxy.recorder.impaired:
            problems.append(f"recording impaired: {proxy.recorder.impaired}")
        try:
            await ping(proxy.db)
        except Exception as exc:
            problems.append(f"database: {loggable_error(exc)}")
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus metrics (see proxy.http.metrics)."""
        proxy: ProxyState = request.app.state.proxy
        return Response(proxy.metrics.render(), media_type=CONTENT_TYPE_LATEST)

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
