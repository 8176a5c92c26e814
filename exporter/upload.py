"""Upload training files to OpenAI (or a compatible API) and start a fine-tuning job.

Uses the official `openai` SDK: `files.create(purpose="fine-tune")`, then, when a base model is
given, `fine_tuning.jobs.create` with `method` `supervised` (chat files) or `dpo` (preference
files, detected from the first record). The key comes from `OPENAI_API_KEY` (or `api_key`), the
endpoint from `base_url` / `OPENAI_BASE_URL`. SDK errors become `UploadError` with one line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from exporter.validate import guess_format


class UploadError(RuntimeError):
    """The upload or the job creation failed (one-line message for users)."""


@dataclass(frozen=True)
class UploadResult:
    """Ids the API returned: `training_file_id`, `validation_file_id` (or None), `job_id` and
    `job_status` (None when no job was created), and the fine-tuning `method`."""

    training_file_id: str
    validation_file_id: str | None
    job_id: str | None
    job_status: str | None
    method: str

    def as_dict(self) -> dict[str, Any]:
        """The ids as a JSON-ready dict (what `upload --json` prints)."""
        return asdict(self)


def detect_method(path: Path) -> str:
    """'dpo' when the file's first record is a preference record, else 'supervised'."""
    with path.open(encoding="utf-8") as fh:
        first = fh.readline()
    try:
        return "dpo" if guess_format(json.loads(first)) == "dpo" else "supervised"
    except ValueError:
        return "supervised"


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _translate(exc: Exception, action: str, base_url: str) -> UploadError:
    import openai

    if isinstance(exc, openai.AuthenticationError):
        return UploadError(
            f"{action}: authentication failed (401): {_message(exc)}; set OPENAI_API_KEY to a valid key"
        )
    if isinstance(exc, openai.PermissionDeniedError):
        return UploadError(f"{action}: permission denied (403): {_message(exc)}")
    if isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
        return UploadError(f"{action}: rejected by the API ({exc.status_code}): {_message(exc)}")
    if isinstance(exc, openai.NotFoundError):
        return UploadError(f"{action}: not found (404): {_message(exc)}")
    if isinstance(exc, openai.RateLimitError):
        return UploadError(f"{action}: rate limited (429): {_message(exc)}")
    if isinstance(exc, openai.APIStatusError):
        return UploadError(f"{action}: API error ({exc.status_code}): {_message(exc)}")
    if isinstance(exc, openai.APIConnectionError):
        return UploadError(f"{action}: cannot reach {base_url}: {_message(exc)}")
    return UploadError(f"{action}: {type(exc).__name__}: {_message(exc)}")


def upload(
    path: Path,
    *,
    validation_path: Path | None = None,
    model: str | None = None,
    suffix: str | None = None,
    epochs: int | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    method: str | None = None,
    max_retries: int = 2,
) -> UploadResult:
    """Upload `path` (and `validation_path`) with purpose `fine-tune`; create a job when `model`.

    method: 'supervised' or 'dpo' (None: detected from the file). epochs: `n_epochs`
    hyperparameter (None: the API's `auto`). Raises UploadError.
    """
    import openai

    try:
        client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries)
    except openai.OpenAIError as exc:
        raise UploadError(f"no API key: set OPENAI_API_KEY ({_message(exc)})") from exc
    endpoint = str(client.base_url)
    method = method or detect_method(path)
    ids: list[str | None] = []
    for file_path in (path, validation_path):
        if file_path is None:
            ids.append(None)
            continue
        try:
            with file_path.open("rb") as fh:
                created = client.files.create(file=fh, purpose="fine-tune")
        except OSError as exc:
            raise UploadError(f"cannot read {file_path}: {exc.strerror or exc}") from exc
        except openai.OpenAIError as exc:
            raise _translate(exc, f"uploading {file_path.name}", endpoint) from exc
        ids.append(created.id)
    training_id, validation_id = ids[0], ids[1]
    assert training_id is not None
    if model is None:
        return UploadResult(training_id, validation_id, None, None, method)
    hyperparameters: dict[str, Any] = {"n_epochs": epochs} if epochs else {}
    method_body: dict[str, Any] = {"type": method, method: {"hyperparameters": hyperparameters}}
    try:
        job = client.fine_tuning.jobs.create(
            model=model,
            training_file=training_id,
            validation_file=validation_id if validation_id is not None else openai.omit,
            suffix=suffix if suffix is not None else openai.omit,
            method=method_body,  # type: ignore[arg-type]
        )
    except openai.OpenAIError as exc:
        raise _translate(exc, "creating the fine-tuning job", endpoint) from exc
    return UploadResult(training_id, validation_id, job.id, job.status, method)
