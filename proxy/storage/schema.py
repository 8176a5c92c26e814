"""The current shape of the database, as SQLAlchemy Core tables (the query layer for both dialects).

The tables are created and changed only by `proxy.storage.migrations`; this module describes the
result so queries are written once for SQLite and PostgreSQL. Column names carry units
(`*_ms`, `*_utc`, `*_json`). Timestamps are ISO-8601 UTC strings with milliseconds
(`2026-11-21T18:04:06.123+00:00`), which sort and compare as text in both dialects.

On SQLite the `exchanges` JSON texts named in `proxy.storage.bodies.PACKED_COLUMNS` and
`blobs.body_json` hold packed values (bytes, `proxy.core.packing`) since migration 008: read them
through `proxy.storage.bodies.unpack_row` / `rebuild_requests`, and in SQL through `stored_text`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import BigInteger, Boolean, Column, Float, Integer, MetaData, Table, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from proxy.core.packing import key_text, stored_key


class HashKey(TypeDecorator[str]):
    """A hash looked up by value (`exchanges.state_hash`, `choice_states.state_hash`,
    `blobs.hash`): hex text to Python and in PostgreSQL; on SQLite since migration 009 the bytes
    the hex spells (`proxy.core.packing.stored_key`: half the bytes in the row and in its index).
    Bound values and results are converted here, so queries compare hex strings as before; SQL
    that binds keys another way (a JSON array) converts them with `understudy_key(...)`."""

    impl = Text
    cache_ok = True

    # The processors themselves, not process_bind_param: no wrapper call per value (the
    # recorder binds a few keys per exchange), nothing at all on PostgreSQL.
    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        return stored_key if dialect.name == "sqlite" else None

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        return key_text if dialect.name == "sqlite" else None


metadata = MetaData()

trajectories = Table(
    "trajectories",
    metadata,
    Column("id", Text, primary_key=True),
    Column("created_utc", Text, nullable=False),
    Column("updated_utc", Text, nullable=False),
    # How the trajectory was identified: 'hash' (stitched), 'header' or 'metadata' (explicit id).
    Column("id_source", Text, nullable=False),
    # 'student' or 'teacher': decided for the first exchange, kept for every later one.
    Column("route", Text, nullable=False),
    # A teacher also answers every request of this trajectory in the background (never returned).
    Column("shadow", Boolean, nullable=False),
    Column("exchange_count", Integer, nullable=False),
    Column("error_count", Integer, nullable=False),
    Column("tool_call_count", Integer, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    # Curation from the dashboard: 'approved' | 'rejected' | NULL, free tags and a note.
    Column("label", Text),
    Column("tags_json", Text),
    Column("note", Text),
    Column("labeled_utc", Text),
)

exchanges = Table(
    "exchanges",
    metadata,
    Column("id", Text, primary_key=True),
    Column("trajectory_id", Text, nullable=False),
    # The exchange this one continues (its state is this request's longest assistant-ended prefix).
    Column("parent_id", Text),
    # 0 for a trajectory's first exchange, parent's step + 1 after that.
    Column("step", Integer, nullable=False),
    Column("started_utc", Text, nullable=False),
    Column("duration_ms", Float),
    Column("ttft_ms", Float),
    Column("path", Text, nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("status_code", Integer),
    # 'ok' (2xx answer), 'error' (upstream or proxy error) or 'cancelled' (client went away).
    Column("outcome", Text, nullable=False),
    Column("route", Text, nullable=False),
    Column("model_requested", Text),
    Column("model_answered", Text),
    # The request body's options: the body with its item array (`messages` / `input`) and its
    # `tools` list replaced by null, those being stored once each in `blobs` (see
    # `proxy.storage.bodies`; read bodies through `rebuild_requests`, never this column alone).
    # The whole body when `request_refs_json` is NULL (a row from before 003 not converted yet).
    Column("request_json", Text, nullable=False),
    # The answer as a `chat.completion` object (assembled from the chunks for a stream).
    Column("response_json", Text),
    Column("error_json", Text),
    # The client's X-Understudy-* request headers, lower-cased names.
    Column("request_headers_json", Text),
    Column("upstream_request_id", Text),
    Column("end_user", Text),
    Column("metadata_json", Text),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("total_tokens", Integer),
    Column("usage_json", Text),
    Column("finish_reason", Text),
    Column("tool_call_count", Integer, nullable=False),
    # Rolling hash of the request messages, and of request messages + response message.
    Column("request_hash", Text, nullable=False),
    # Stored as bytes on SQLite (`HashKey`, migration 009).
    Column("state_hash", HashKey),
    # logit_bias entries the proxy added to the request (tool-call promotion), if any.
    Column("injected_logit_bias_json", Text),
    # A teacher's answer to the same request, recorded beside the student's, never returned.
    Column("shadow_model", Text),
    Column("shadow_response_json", Text),
    Column("shadow_error_json", Text),
    Column("shadow_duration_ms", Float),
    # Which API the exchange spoke: 'chat' (Chat Completions) or 'responses' (Responses API).
    Column("kind", Text, nullable=False, server_default="chat"),
    # Responses API: the id of the response this exchange produced (`previous_response_id` of
    # the next step names it).
    Column("response_id", Text),
    # The exchange whose request items are the first items of this one's: `request_refs_json`
    # then lists only the items after them. '' (written since 009) means the parent
    # (`parent_id`): read it through `proxy.storage.bodies.BASE_ID`, never this column alone.
    Column("request_base_id", Text),
    # `{"at": offset, "items": [hash, ...], "tools_at": offset, "tools": hash}` (the keys of what
    # was cut), `{}` when nothing was (request_json is the whole body), NULL before conversion.
    Column("request_refs_json", Text),
)

# Each distinct request item (a message, a Responses input item) and each distinct tool list, once:
# `hash` is BLAKE2b-128 (hex) of `body_json`, the compact JSON text (`proxy.core.bodies`; packed on
# SQLite, the hash is still that of the text). On SQLite since 009 the hash is stored as its 16
# bytes (`HashKey`), in the row and in its unique index `ix_blobs_hash` (the key, as the primary
# key is on PostgreSQL; inserts of a known part are ignored through either).
blobs = Table(
    "blobs",
    metadata,
    Column("hash", HashKey, primary_key=True),
    Column("body_json", Text, nullable=False),
)

# States answered but not yet flushed by their replica's recorder (shared databases only): the
# stitcher writes one on the request path, the recorder deletes it with the exchange row's insert.
conversation_states = Table(
    "conversation_states",
    metadata,
    Column("state_hash", Text, primary_key=True),
    Column("trajectory_id", Text, primary_key=True),
    Column("exchange_id", Text, nullable=False),
    Column("step", Integer, nullable=False),
    Column("route", Text, nullable=False),
    Column("shadow", Boolean, nullable=False),
    Column("remembered_utc", Text, nullable=False),
)

# The states of an exchange's later choices (`n > 1`: choice 1, 2, ...; choice 0's state is
# `exchanges.state_hash`), found by `state_hash` like it (migration 006).
choice_states = Table(
    "choice_states",
    metadata,
    Column("exchange_id", Text, primary_key=True),
    Column("choice_index", Integer, primary_key=True),
    Column("state_hash", HashKey, nullable=False),  # indexed: ix_choice_states_state_hash
)

migrations_table = Table(
    "understudy_migrations",
    metadata,
    Column("name", Text, primary_key=True),
    Column("applied_utc", Text, nullable=False),
)

# Rewrites of old rows that run after a migration, batch by batch (migration 008): where each got
# to (`after_id`: the last exchange id done, in id order) and when it finished.
conversions = Table(
    "understudy_conversions",
    metadata,
    Column("name", Text, primary_key=True),
    Column("after_id", Text),
    Column("finished_utc", Text),
)

# Replay evaluation runs (`understudy-export eval`): one row per run; never the candidate's key.
eval_runs = Table(
    "eval_runs",
    metadata,
    Column("id", Text, primary_key=True),
    Column("created_utc", Text, nullable=False),
    Column("updated_utc", Text, nullable=False),
    Column("finished_utc", Text),
    # 'running' (or crashed: rerun the command to resume), 'finished', 'incomplete' (some steps
    # were not answered; a rerun asks only those again).
    Column("status", Text, nullable=False),
    # Hash of what selects and asks (base URL, model, split, reference, filters): a rerun of the
    # same command resumes the latest unfinished run with the same fingerprint.
    Column("fingerprint", Text, nullable=False),
    # The candidate's base URL without user info, query or fragment.
    Column("base_url", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("split", Text, nullable=False),
    Column("reference", Text, nullable=False),
    Column("options_json", Text, nullable=False),
    Column("trajectory_count", Integer, nullable=False),
    Column("step_count", Integer, nullable=False),
    # The report (`exporter.evaluation.metrics.summarize`) as of the last finish.
    Column("report_json", Text),
)

# One replayed step of a run, written as soon as the candidate answered (or finally failed).
eval_steps = Table(
    "eval_steps",
    metadata,
    Column("run_id", Text, primary_key=True),
    Column("exchange_id", Text, primary_key=True),
    Column("trajectory_id", Text, nullable=False),
    Column("step", Integer, nullable=False),
    Column("answered_utc", Text, nullable=False),
    # 'answered' or 'error' (after retries; asked again when the run resumes).
    Column("outcome", Text, nullable=False),
    Column("error_type", Text),
    # Decision and (on tool-call steps) names and canonical arguments all agree.
    Column("agrees", Boolean),
    Column("comparison_json", Text),
    Column("reference_message_json", Text),
    Column("candidate_response_json", Text),
    Column("error_json", Text),
    Column("latency_ms", Float),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("reference_model", Text),
    Column("reference_latency_ms", Float),
    Column("reference_prompt_tokens", Integer),
    Column("reference_completion_tokens", Integer),
)

# A conversation (`/v1/conversations`) the proxy has seen begin: created through it ('create') or
# listed whole through it ('list'). Items of a conversation without this row were seen only in
# part (it began before the proxy): its histories read as truncated.
conversations = Table(
    "conversations",
    metadata,
    Column("id", Text, primary_key=True),
    Column("created_utc", Text, nullable=False),
    Column("source", Text, nullable=False),
)

# The proxy's mirror of a conversation's items, in order (`proxy.storage.conversations`).
conversation_items = Table(
    "conversation_items",
    metadata,
    Column("conversation_id", Text, primary_key=True),
    # 0, 1, 2, ... within the conversation.
    Column("position", Integer, primary_key=True),
    # The upstream's id of the item (`msg_...`, `fc_...`) when known.
    Column("item_id", Text),
    # The item as JSON, raw (as the client sent it or the upstream answered it).
    Column("item_json", Text, nullable=False),
    # The exchange (a response created with `conversation`) whose input or output this item is;
    # NULL for items added through `/v1/conversations` itself.
    Column("exchange_id", Text),
    Column("response_id", Text),
    Column("added_utc", Text, nullable=False),
)

# A background response's exchange (`background: true`, answered `queued`) held until its answer
# is retrieved, on whichever replica (shared databases only): the redacted in-flight record as
# JSON (`proxy.storage.background`). The replica that claims the row records the exchange.
background_responses = Table(
    "background_responses",
    metadata,
    Column("response_id", Text, primary_key=True),
    Column("record_json", Text, nullable=False),
    Column("held_utc", Text, nullable=False),
)
