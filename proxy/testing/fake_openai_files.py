"""A fake OpenAI files + fine-tuning API (a real HTTP server on loopback), for `upload` tests.

Speaks the wire format the official SDK expects: `POST /v1/files` (multipart: `file`, `purpose`)
and `POST /v1/fine_tuning/jobs` (JSON), OpenAI-shaped error bodies, Bearer auth with one valid
key (`VALID_KEY`). It rejects like the real API: 401 for a bad key, 400 for a purpose other than
`fine-tune`, a file that is not JSONL chat or preference records, an unknown training file or a
model that cannot be fine-tuned. `GET /_fake/state` lists what it received.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

VALID_KEY = "sk-fake-valid"
TUNABLE_MODELS = (
    "gpt-4.1-2025-04-14",
    "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano-2025-04-14",
    "gpt-4.1-mini",
)


def _error(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": code,
            }
        },
        status_code=status,
    )


def _unauthorized(request: Request) -> JSONResponse | None:
    header = request.headers.get("authorization", "")
    if header != f"Bearer {VALID_KEY}":
        key = header.removeprefix("Bearer ")
        return _error(401, f"Incorrect API key provided: {key[:6]}****.", "invalid_api_key")
    return None


async def create_file(request: Request) -> Response:
    if (denied := _unauthorized(request)) is not None:
        return denied
    form = await request.form()
    upload = form.get("file")
    purpose = form.get("purpose")
    if purpose != "fine-tune":
        return _error(400, f"'{purpose}' is not one of the supported purposes", param="purpose")
    if upload is None or isinstance(upload, str):
        return _error(400, "file is required", param="file")
    data = await upload.read()
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            return _error(
                400,
                f"Invalid file format for Fine-Tuning API. Line {number} is not valid JSON.",
                "invalid_file_format",
            )
        if not isinstance(record, dict) or not (
            {"messages"} <= set(record) or {"input", "preferred_output"} <= set(record)
        ):
            return _error(
                400,
                f"Invalid file format for Fine-Tuning API. Line {number} has no messages.",
                "invalid_file_format",
            )
    state = request.app.state
    file_id = f"file-fake{next(state.counter)}"
    state.files[file_id] = {
        "filename": upload.filename,
        "bytes": len(data),
        "content": data.decode("utf-8", "replace"),
    }
    return JSONResponse(
        {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": upload.filename,
            "purpose": "fine-tune",
            "status": "processed",
        }
    )


async def create_job(request: Request) -> Response:
    if (denied := _unauthorized(request)) is not None:
        return denied
    body = json.loads(await request.body())
    state = request.app.state
    if body.get("training_file") not in state.files:
        return _error(
            400, f"invalid training_file: {body.get('training_file')}", param="training_file"
        )
    if body.get("validation_file") is not None and body["validation_file"] not in state.files:
        return _error(
            400, f"invalid validation_file: {body.get('validation_file')}", param="validation_file"
        )
    if body.get("model") not in TUNABLE_MODELS:
        return _error(
            400,
            f"Model {body.get('model')} is not available for fine-tuning or does not exist.",
            "model_not_available",
            "model",
        )
    job = {
        "id": f"ftjob-fake{next(state.counter)}",
        "object": "fine_tuning.job",
        "created_at": int(time.time()),
        "model": body["model"],
        "status": "validating_files",
        "training_file": body["training_file"],
        "validation_file": body.get("validation_file"),
        "method": body.get("method"),
        "hyperparameters": {
            "n_epochs": "auto",
            "batch_size": "auto",
            "learning_rate_multiplier": "auto",
        },
        "fine_tuned_model": None,
        "finished_at": None,
        "organization_id": "org-fake",
        "result_files": [],
        "seed": 42,
        "trained_tokens": None,
        "error": None,
        "suffix": body.get("suffix"),
    }
    state.jobs.append(job)
    return JSONResponse(job)


async def fake_state(request: Request) -> Response:
    return JSONResponse({"files": request.app.state.files, "jobs": request.app.state.jobs})


def create_app() -> Starlette:
    app = Starlette(
        routes=[
            Route("/v1/files", create_file, methods=["POST"]),
            Route("/v1/fine_tuning/jobs", create_job, methods=["POST"]),
            Route("/_fake/state", fake_state, methods=["GET"]),
        ]
    )
    app.state.files = {}
    app.state.jobs = []
    app.state.counter = itertools.count(1)
    return app


@contextmanager
def serve_fake_openai(port: int) -> Iterator[Any]:
    """Run the fake API under uvicorn in a thread on 127.0.0.1:`port`; yields the app."""
    app = create_app()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("fake OpenAI server did not start")
        time.sleep(0.02)
    try:
        yield app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
