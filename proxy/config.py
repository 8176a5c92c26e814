"""Proxy settings: command-line flags, `UNDERSTUDY_*` environment variables and a config file.

Precedence, highest first: flags given to `python -m proxy`, environment variables, the config
file (`--config FILE` / `UNDERSTUDY_CONFIG`; TOML, YAML or JSON by its suffix), defaults.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from proxy.core.redaction import PII_KINDS

DEFAULT_UPSTREAM = "https://api.openai.com/v1"


class ConfigFileError(ValueError):
    """The config file named by `--config` / `UNDERSTUDY_CONFIG` is missing or unreadable."""


class SettingsError(ValueError):
    """Settings that cannot be loaded; the message is one line naming the flags at fault."""


class RoutingRule(BaseModel):
    """One routing rule (config file key `routing_rules`, a list; the first matching rule decides).

    A rule matches a new trajectory's first request when every condition given holds: `model`
    (a glob on the requested model, e.g. "gpt-4.1*"), `has_tools` (the request offers tools),
    `metadata` (each key equals the request's `metadata` value). `rate` (0..1) is the share of
    matching trajectories the rule takes, decided deterministically from the first request.
    """

    model_config = ConfigDict(extra="forbid")

    route: Literal["teacher", "student", "shadow"]
    model: str | None = None
    has_tools: bool | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    rate: float = Field(1.0, ge=0.0, le=1.0)


class Settings(BaseSettings):
    """Every option of the proxy. Field names map to `--flag-name` and `UNDERSTUDY_FLAG_NAME`."""

    model_config = SettingsConfigDict(env_prefix="UNDERSTUDY_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8787, ge=0, le=65535, description="TCP port to listen on.")
    upstream: str = Field(
        DEFAULT_UPSTREAM,
        description="Base URL of the OpenAI-compatible API that calls are forwarded to "
        "(the part before /chat/completions).",
    )
    upstream_kind: Literal["auto", "openai", "azure"] = Field(
        "auto",
        description="What the upstream is: 'openai' (an OpenAI-compatible base URL, ending in "
        "/v1), 'azure' (an Azure OpenAI resource URL such as https://RESOURCE.openai.azure.com: "
        "Azure paths /openai/... are forwarded as sent, /v1/X goes to /openai/v1/X and the "
        "upstream key is sent as api-key), or 'auto': azure for *.openai.azure.com, "
        "*.cognitiveservices.azure.com and *.services.ai.azure.com hosts, else openai.",
    )
    db: str = Field(
        "./understudy.db",
        description="Database: a SQLite file path, or a sqlite:/// / postgresql:// URL.",
    )
    config: str | None = Field(None, description="Config file (TOML, YAML or JSON).")
    upstream_api_key: SecretStr | None = Field(
        None,
        description="When set, the proxy authenticates upstream with this key and ignores the "
        "client's Authorization; otherwise the client's Authorization is forwarded.",
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="Upstream connect timeout, seconds.")
    read_timeout_s: float = Field(
        600.0, gt=0, description="Upstream read timeout between bytes, seconds."
    )
    flush_interval_ms: int = Field(
        50,
        ge=1,
        le=10_000,
        description="Longest time a recorded exchange waits before its batch is written, ms.",
    )
    record_batch_size: int = Field(
        500, ge=1, description="Most exchanges written in one database transaction."
    )
    record_queue_size: int = Field(
        100_000,
        ge=1,
        description="Most exchanges waiting in memory to be written; beyond it new ones go "
        "straight to the journal file (never dropped while the disk takes them).",
    )
    record_buffer_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="Memory that holds records neither the database nor the journal takes "
        "(disk full), bytes; about a minute at 1,500 calls/s of 3 KB, far longer at usual "
        "rates. Beyond it records are lost (counted); /ready is 503 while any are held.",
    )
    on_record_failure: Literal["serve", "refuse"] = Field(
        "serve",
        description="While recording is impaired (records held in memory, write-ahead log "
        "refused): 'serve' calls anyway, or 'refuse' them with 503 and Retry-After, for teams "
        "that would rather fail calls than lose data.",
    )
    record_writer: Literal["process", "loop"] = Field(
        "process",
        description="Where a SQLite database's batches are written: 'process' (a child "
        "interpreter, so writing never holds up the calls being served) or 'loop' (the serving "
        "event loop: one process, for embedding the app in another program or its tests).",
    )
    write_ahead: bool = Field(
        True,
        description="Append each finished exchange to a write-ahead file before its last "
        "byte goes out, so a crash of the proxy (SIGKILL) loses none.",
    )
    stitch_cache_size: int = Field(
        20_000,
        ge=0,
        description="Recent conversation states kept in memory for stitching (about 0.5 KB "
        "each); older ones are found in the database.",
    )
    teacher_model: str | None = Field(
        None,
        description="litellm model name of the teacher (o3, openai/o4-mini, "
        "anthropic/claude-sonnet-4-5, ...). Without it every call goes to the student.",
    )
    teacher_base_url: str | None = Field(
        None, description="API base of the teacher; default: the upstream for OpenAI models."
    )
    teacher_api_key: SecretStr | None = Field(
        None,
        description="Key for the teacher; default: the upstream key, else (for a teacher on "
        "the upstream itself) the client's own key.",
    )
    teacher_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of new trajectories routed to the teacher (0..1)."
    )
    routing_rules: list[RoutingRule] = Field(
        default_factory=list,
        description="Ordered routing rules (JSON list; see README). The first match decides.",
    )
    promote_tool_calls: float | None = Field(
        None,
        ge=-100,
        le=100,
        description="logit_bias added to the token ' to' for chat-completions requests with "
        "tools (e.g. 5). Not applied to /v1/responses: the Responses API has no logit_bias.",
    )
    promote_drop_sampling: bool = Field(
        False, description="Drop temperature/top_p from requests that get the tool-call bias."
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Token that protects /dashboard and /api/ (login form or Bearer header). "
        "Without it the dashboard is served on loopback addresses only.",
    )
    admin_max_failures: int = Field(
        10,
        ge=1,
        description="Wrong admin tokens one client address may send within "
        "--admin-failure-window-s before /api/ and the login form answer it 429.",
    )
    admin_failure_window_s: float = Field(
        60.0, gt=0, description="The window for --admin-max-failures, seconds."
    )
    journal: str | None = Field(
        None,
        description="Journal file for records the database cannot take "
        "(default: next to a SQLite database, else ./understudy-journal.jsonl).",
    )
    redact_pii: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description='PII masked before storage: any of "email", "phone", "card" '
        "(JSON list, or comma-separated). Key-shaped secrets are always masked.",
    )
    phone_region: str = Field(
        "US", description="Default country for phone numbers without a + prefix (ISO code)."
    )
    max_body_bytes: int = Field(
        50 * 1024 * 1024, ge=1024, description="Largest request body accepted, bytes (else 413)."
    )
    max_inflight_body_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="Request body bytes (by Content-Length) the proxy holds at once; a request "
        "that would exceed it is answered 503 with Retry-After before its body is read.",
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest request header block, bytes (else 431)."
    )
    max_header_count: int = Field(
        100, ge=10, description="Most request headers in one request (else 431)."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Longest time request headers may take to arrive, seconds."
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest silence while a request body arrives, seconds (then the "
        "connection is closed).",
    )
    teacher_retries: int = Field(
        0,
        ge=0,
        le=10,
        description="Retries for failed teacher calls (the student path never retries).",
    )
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text or as JSON objects (one per line)."
    )
    demo: bool = Field(
        False,
        description="The database holds demo data: the dashboard says so on every page "
        "(`python -m proxy demo` sets it).",
    )

    @field_validator("redact_pii", mode="before")
    @classmethod
    def _split_kinds(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.strip().startswith("["):
                return json.loads(value)
            value = [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("redact_pii")
    @classmethod
    def _known_kinds(cls, value: list[str]) -> list[str]:
        kinds = [k.strip().lower() for k in value]
        unknown = sorted(set(kinds) - set(PII_KINDS))
        if unknown:
            raise ValueError(f"unknown kinds {unknown}; choose from {', '.join(PII_KINDS)}")
        return kinds

    @field_validator("upstream")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("upstream must be an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def upstream_is_azure(self) -> bool:
        """The upstream is an Azure OpenAI resource (`upstream_kind`, or its host for 'auto')."""
        return is_azure_upstream(self.upstream, self.upstream_kind)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_kwargs: dict[str, Any] = getattr(init_settings, "init_kwargs", {})
        path = init_kwargs.get("config") or os.environ.get("UNDERSTUDY_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            sources.append(_config_file_source(settings_cls, Path(path)))
        return tuple(sources)


def _config_file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    if not path.is_file():
        raise ConfigFileError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    if suffix == ".json":
        return JsonConfigSettingsSource(settings_cls, json_file=path)
    raise ConfigFileError(f"config file must end in .toml, .yaml, .yml or .json: {path}")


AZURE_HOST_SUFFIXES = (
    ".openai.azure.com",
    ".cognitiveservices.azure.com",
    ".services.ai.azure.com",
)


@functools.lru_cache(maxsize=8)
def is_azure_upstream(upstream: str, kind: str) -> bool:
    """Whether `upstream` (a URL) of `kind` ('auto', 'openai', 'azure') is an Azure OpenAI
    resource; 'auto' decides from the URL's host name."""
    if kind != "auto":
        return kind == "azure"
    from urllib.parse import urlsplit

    host = (urlsplit(upstream).hostname or "").lower()
    return host.endswith(AZURE_HOST_SUFFIXES)


def journal_path(settings: Settings) -> Path:
    """Where the journal lives: `--journal`, else `<sqlite file>.journal.jsonl`, else
    `./understudy-journal.jsonl` (PostgreSQL)."""
    if settings.journal:
        return Path(settings.journal)
    if "://" not in settings.db:
        return Path(settings.db + ".journal.jsonl")
    if settings.db.startswith("sqlite:///"):
        return Path(settings.db.removeprefix("sqlite:///") + ".journal.jsonl")
    return Path("understudy-journal.jsonl")


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings from environment and config file, read once (flags go through `Settings(...)`)."""
    return Settings()


def flag_name(name: str) -> str:
    """The command-line flag of a `Settings` field: `teacher_model` -> `--teacher-model`."""
    return "--" + name.replace("_", "-")


def load_settings(options: Mapping[str, Any]) -> Settings:
    """Settings from explicit values (flags given, by field name) over env vars and config file.

    String values of list or dict fields that look like JSON (`--routing-rules '[...]'`) are
    decoded, as their env vars are. Raises SettingsError (one line) for a bad value, an unknown
    name or a missing config file.
    """
    values = dict(options)
    for name, value in list(values.items()):
        field = Settings.model_fields.get(name)
        if field is None:
            raise SettingsError(f"unknown setting {name!r}")
        if (
            isinstance(value, str)
            and get_origin(field.annotation) in (list, dict)
            and value.lstrip()[:1] in ("[", "{")
        ):
            try:
                values[name] = json.loads(value)
            except ValueError as exc:
                raise SettingsError(f"{flag_name(name)} must be JSON: {exc}") from exc
    try:
        return Settings(**values)
    except ConfigFileError as exc:
        raise SettingsError(str(exc)) from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{flag_name(str(err['loc'][0])) if err['loc'] else 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from exc
