"""Numbered schema migrations and their runner; each is applied once, in order, and never edited.

Each migration is a list of DDL statements written in the SQL that SQLite and PostgreSQL share
(`tests/test_postgres.py` applies them to both), and may add statements for SQLite alone (009:
the byte-level shape of keys, which PostgreSQL does not need). Applied names are kept in `understudy_migrations`;
on PostgreSQL the runner holds an advisory lock, so replicas that start at once apply each
migration exactly once. To change the schema, append a migration
(and update `schema.py` to describe the result); never edit one that has shipped.

A migration that must also rewrite existing rows (003, 008) does it apart from its DDL, batch by
batch and resumable (`proxy.storage.conversion`, `proxy.storage.packing`): DDL is quick,
rewriting a large database is not.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Final

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from proxy.storage.engine import utc_now
from proxy.storage.schema import migrations_table

MIGRATION_LOCK_KEY: Final = zlib.crc32(b"understudy_migrations")
"""The PostgreSQL advisory lock (a bigint key) that serializes migrations across processes."""


@dataclass(frozen=True)
class Migration:
    """One schema change: `name` (`NNN_words`, the order), `why` it was made, its DDL statements
    (both dialects), then `sqlite_statements`, run on SQLite only (a byte-level shape that
    PostgreSQL does not need), in the same transaction."""

    name: str
    why: str
    statements: tuple[str, ...]
    sqlite_statements: tuple[str, ...] = ()


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        name="001_initial",
        why="Exchanges (one proxied request and its answer) grouped into trajectories, with the "
        "state hashes that stitching looks up, routes, shadows and curation labels.",
        statements=(
            """CREATE TABLE trajectories (
                id TEXT PRIMARY KEY,
                created_utc TEXT NOT NULL,
                updated_utc TEXT NOT NULL,
                id_source TEXT NOT NULL,
                route TEXT NOT NULL,
                shadow BOOLEAN NOT NULL DEFAULT FALSE,
                exchange_count INTEGER NOT NULL DEFAULT 0,
                error_count INTEGER NOT NULL DEFAULT 0,
                tool_call_count INTEGER NOT NULL DEFAULT 0,
                prompt_tokens BIGINT NOT NULL DEFAULT 0,
                completion_tokens BIGINT NOT NULL DEFAULT 0,
                label TEXT,
                tags_json TEXT,
                note TEXT,
                labeled_utc TEXT
            )""",
            "CREATE INDEX ix_trajectories_updated_utc ON trajectories (updated_utc)",
            "CREATE INDEX ix_trajectories_label ON trajectories (label)",
            """CREATE TABLE exchanges (
                id TEXT PRIMARY KEY,
                trajectory_id TEXT NOT NULL REFERENCES trajectories (id),
                parent_id TEXT,
                step INTEGER NOT NULL,
                started_utc TEXT NOT NULL,
                duration_ms DOUBLE PRECISION,
                ttft_ms DOUBLE PRECISION,
                path TEXT NOT NULL,
                stream BOOLEAN NOT NULL,
                status_code INTEGER,
                outcome TEXT NOT NULL,
                route TEXT NOT NULL,
                model_requested TEXT,
                model_answered TEXT,
                request_json TEXT NOT NULL,
                response_json TEXT,
                error_json TEXT,
                request_headers_json TEXT,
                upstream_request_id TEXT,
                end_user TEXT,
                metadata_json TEXT,
                prompt_tokens INTEGER,
                completion_tokens INTEGER,
                total_tokens INTEGER,
                usage_json TEXT,
                finish_reason TEXT,
                tool_call_count INTEGER NOT NULL DEFAULT 0,
                request_hash TEXT NOT NULL,
                state_hash TEXT,
                injected_logit_bias_json TEXT,
                shadow_model TEXT,
                shadow_response_json TEXT,
                shadow_error_json TEXT,
                shadow_duration_ms DOUBLE PRECISION
            )""",
            "CREATE INDEX ix_exchanges_state_hash ON exchanges (state_hash)",
            "CREATE INDEX ix_exchanges_trajectory_step ON exchanges (trajectory_id, step)",
            "CREATE INDEX ix_exchanges_parent_id ON exchanges (parent_id)",
            "CREATE INDEX ix_exchanges_started_utc ON exchanges (started_utc)",
        ),
    ),
    Migration(
        name="002_conversation_states",
        why="Replicas on one database (PostgreSQL) must find a conversation's latest state "
        "before its exchange row is written: the recorder batches, and the next step can reach "
        "another replica milliseconds later. The stitcher writes each answered state here on "
        "the request path; the recorder deletes it in the transaction that inserts the "
        "exchange row, so this table holds only states not yet flushed (a few rows).",
        statements=(
            """CREATE TABLE conversation_states (
                state_hash TEXT NOT NULL,
                trajectory_id TEXT NOT NULL,
                exchange_id TEXT NOT NULL,
                step INTEGER NOT NULL,
                route TEXT NOT NULL,
                shadow BOOLEAN NOT NULL DEFAULT FALSE,
                remembered_utc TEXT NOT NULL,
                PRIMARY KEY (state_hash, trajectory_id)
            )""",
        ),
    ),
    Migration(
        name="003_content_addressed",
        why="Every request re-sends the whole conversation, so storing whole request bodies made a "
        "trajectory's bytes grow with the square of its steps (31.2 MB of SQLite for a 3.4 MB "
        "export). Each distinct message/item and tool list is now stored once in `blobs`, keyed "
        "by a hash of its JSON text; an exchange keeps its own options in `request_json` (the "
        "array and tools replaced by null) and references in `request_refs_json`, and names in "
        "`request_base_id` the exchange whose items are a prefix of its own (its parent), so "
        "references grow linearly too. Existing rows are converted in place afterwards "
        "(`proxy.storage.conversion`); the partial index finds the rows still to convert.",
        statements=(
            """CREATE TABLE blobs (
                hash TEXT PRIMARY KEY,
                body_json TEXT NOT NULL
            )""",
            "ALTER TABLE exchanges ADD COLUMN request_base_id TEXT",
            "ALTER TABLE exchanges ADD COLUMN request_refs_json TEXT",
            "CREATE INDEX ix_exchanges_unconverted ON exchanges (started_utc, id) "
            "WHERE request_refs_json IS NULL",
        ),
    ),
    Migration(
        name="004_responses",
        why="The Responses API (POST /v1/responses) is recorded beside chat completions: each "
        "exchange says which API it spoke (`kind`, 'chat' for every earlier row), and a "
        "Responses exchange keeps the id of the response it produced (`response_id`), which "
        "a later request names as `previous_response_id`: the explicit parent link that "
        "stitching looks up by this index.",
        statements=(
            "ALTER TABLE exchanges ADD COLUMN kind TEXT NOT NULL DEFAULT 'chat'",
            "ALTER TABLE exchanges ADD COLUMN response_id TEXT",
            "CREATE INDEX ix_exchanges_response_id ON exchanges (response_id)",
        ),
    ),
    Migration(
        name="005_evaluations",
        why="Replay evaluation (`understudy-export eval`) stores each run and every step's "
        "result as it comes, so a run that crashes resumes without asking the candidate again "
        "what it already answered, and the dashboard shows runs, per-tool rates and the steps "
        "where the candidate disagreed. The candidate's API key is never stored.",
        statements=(
            """CREATE TABLE eval_runs (
                id TEXT PRIMARY KEY,
                created_utc TEXT NOT NULL,
                updated_utc TEXT NOT NULL,
                finished_utc TEXT,
                status TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                base_url TEXT NOT NULL,
                model TEXT NOT NULL,
                split TEXT NOT NULL,
                reference TEXT NOT NULL,
                options_json TEXT NOT NULL,
                trajectory_count INTEGER NOT NULL DEFAULT 0,
                step_count INTEGER NOT NULL DEFAULT 0,
                report_json TEXT
            )""",
            "CREATE INDEX ix_eval_runs_fingerprint ON eval_runs (fingerprint, created_utc)",
            "CREATE INDEX ix_eval_runs_created_utc ON eval_runs (created_utc)",
            """CREATE TABLE eval_steps (
                run_id TEXT NOT NULL REFERENCES eval_runs (id),
                exchange_id TEXT NOT NULL,
                trajectory_id TEXT NOT NULL,
                step INTEGER NOT NULL,
                answered_utc TEXT NOT NULL,
                outcome TEXT NOT NULL,
                error_type TEXT,
                agrees BOOLEAN,
                comparison_json TEXT,
                reference_message_json TEXT,
                candidate_response_json TEXT,
                error_json TEXT,
                latency_ms DOUBLE PRECISION,
                prompt_tokens INTEGER,
                completion_tokens INTEGER,
                reference_model TEXT,
                reference_latency_ms DOUBLE PRECISION,
                reference_prompt_tokens INTEGER,
                reference_completion_tokens INTEGER,
                PRIMARY KEY (run_id, exchange_id)
            )""",
        ),
    ),
    Migration(
        name="006_choice_states",
        why="A request with `n > 1` gets several answers (choices); the app continues one of "
        "them, not always the first. Every choice is a conversation state: choice 0 stays in "
        "`exchanges.state_hash`, each later choice gets a row here, and stitching looks both up "
        "by index in one statement, so continuing choice k links to its exchange instead of "
        "starting an unlinked trajectory.",
        statements=(
            """CREATE TABLE choice_states (
                exchange_id TEXT NOT NULL,
                choice_index INTEGER NOT NULL,
                state_hash TEXT NOT NULL,
                PRIMARY KEY (exchange_id, choice_index)
            )""",
            "CREATE INDEX ix_choice_states_state_hash ON choice_states (state_hash)",
        ),
    ),
    Migration(
        name="007_conversations",
        why="Responses created with `conversation` carry only their new items: the conversation "
        "lives on the upstream's servers. The proxy mirrors what it sees of each conversation "
        "(created through it, items added or listed through it, the input and output of each "
        "response in it) so that stitching, the teacher, the dashboard and the exporter know the "
        "whole conversation. `position` orders a conversation's items (unique: replicas that "
        "append at once retry); `exchange_id` names the exchange whose request and answer "
        "added an item, so the history an exchange saw is the items before its own. "
        "`background_responses` holds a background response's exchange until its answer is "
        "retrieved, on whichever replica that happens.",
        statements=(
            """CREATE TABLE conversations (
                id TEXT PRIMARY KEY,
                created_utc TEXT NOT NULL,
                source TEXT NOT NULL
            )""",
            """CREATE TABLE conversation_items (
                conversation_id TEXT NOT NULL,
                position INTEGER NOT NULL,
                item_id TEXT,
                item_json TEXT NOT NULL,
                exchange_id TEXT,
                response_id TEXT,
                added_utc TEXT NOT NULL,
                PRIMARY KEY (conversation_id, position)
            )""",
            "CREATE INDEX ix_conversation_items_exchange_id ON conversation_items (exchange_id)",
            # Background responses (`background: true`) whose answer is still to come, held in
            # the shared database so whichever replica retrieves the answer records the
            # exchange (claimed once: DELETE ... RETURNING).
            """CREATE TABLE background_responses (
                response_id TEXT PRIMARY KEY,
                record_json TEXT NOT NULL,
                held_utc TEXT NOT NULL
            )""",
        ),
    ),
    Migration(
        name="008_packed_texts",
        why="Once request bodies were content-addressed (003), an exchange row was mostly "
        "boilerplate that every answer repeats: the `chat.completion` envelope as the API sends "
        "it (pretty-printed), `usage` and its token details (twice: in the answer and in "
        "`usage_json`), the request's options; a 30-step conversation's database was 4.5x its "
        "export. On SQLite the row's JSON texts (`proxy.storage.bodies.PACKED_COLUMNS`) are now "
        "stored packed: a zstd frame against a dictionary of those shapes built into the code "
        "(`proxy.core.packing`), the exact text back, a 1.2 KB answer in about 200 bytes. "
        "PostgreSQL keeps them as text (it compresses large values itself, and its search runs "
        "in SQL). Rows written before are packed in place afterwards, resumably "
        "(`proxy.storage.packing`); `understudy_conversions` keeps where such a pass got to. "
        "The `response_id` index holds only the rows that have one (Responses exchanges): a "
        "lookup by value never needs the others.",
        statements=(
            """CREATE TABLE understudy_conversions (
                name TEXT PRIMARY KEY,
                after_id TEXT,
                finished_utc TEXT
            )""",
            # A database with no exchanges yet has nothing to pack.
            "INSERT INTO understudy_conversions (name, after_id, finished_utc) "
            "SELECT '008_packed_texts', NULL, CAST(CURRENT_TIMESTAMP AS TEXT) "
            "WHERE NOT EXISTS (SELECT 1 FROM exchanges)",
            "DROP INDEX ix_exchanges_response_id",
            "CREATE INDEX ix_exchanges_response_id ON exchanges (response_id) "
            "WHERE response_id IS NOT NULL",
        ),
    ),
    Migration(
        name="009_compact_keys",
        why="Once texts were packed (008) the keys were most of what each added step cost: a "
        "60-step conversation's database grew by 2.1x what its export grew per step, so the "
        "ratio passed 2x near 250 steps. On SQLite the hashes looked up by value are now stored "
        "as the bytes their hex spells (`schema.HashKey`): `exchanges.state_hash` and "
        "`choice_states.state_hash` in 32 bytes instead of 64, `blobs.hash` in 16 instead of "
        "32, in the row and in the index (`blobs` keeps the order its parts were written in, "
        "its key a unique index; a WITHOUT ROWID `blobs`, storing its key once, was measured "
        "and dropped: each part's insert took twice the time). Rows written since "
        "also store their request references in binary (`proxy.core.packing.pack_refs`) and "
        "a base that is the parent as '' (`proxy.storage.bodies.BASE_ID`; old rows' bases are "
        "rewritten so here, their references read as they are). Existing keys are converted "
        "here, before the proxy serves (stitching must find every state), in one "
        "transaction: interrupted, it is rolled back and runs again. The file keeps its size "
        "(the pages freed are reused; VACUUM returns them). PostgreSQL keeps its texts.",
        statements=(),
        sqlite_statements=(
            # A write first: the driver opens the transaction at the first write, so every
            # statement after it commits or rolls back with the migration's record.
            "UPDATE choice_states SET state_hash = understudy_key(state_hash) "
            "WHERE typeof(state_hash) = 'text'",
            # The index rebuilt once rather than updated row by row.
            "DROP INDEX ix_exchanges_state_hash",
            # Every row is rewritten once: its base, when it is the parent, as '' too.
            "UPDATE exchanges SET state_hash = understudy_key(state_hash), "
            "request_base_id = CASE WHEN request_base_id = parent_id THEN '' "
            "ELSE request_base_id END",
            "CREATE INDEX ix_exchanges_state_hash ON exchanges (state_hash)",
            # A copy in the order the parts were written (those of one conversation stay near
            # each other, as readers want them), then the key's unique index built by one sort
            # (its pages full), rather than an UPDATE of every key in place.
            """CREATE TABLE blobs_009 (
                hash BLOB NOT NULL,
                body_json TEXT NOT NULL
            )""",
            "INSERT INTO blobs_009 (hash, body_json) "
            "SELECT understudy_key(hash), body_json FROM blobs ORDER BY rowid",
            "DROP TABLE blobs",
            "ALTER TABLE blobs_009 RENAME TO blobs",
            "CREATE UNIQUE INDEX ix_blobs_hash ON blobs (hash)",
        ),
    ),
)


# -- the runner ----------------------------------------------------------------------------------


async def applied_migrations(conn: AsyncConnection) -> set[str]:
    """Names recorded in `understudy_migrations` (empty when the table does not exist)."""
    if not await has_migrations_table(conn):
        return set()
    rows = await conn.execute(select(migrations_table.c.name))
    return {row[0] for row in rows}


async def has_migrations_table(conn: AsyncConnection) -> bool:
    """Whether `understudy_migrations` exists (an Understudy database has it)."""
    return bool(
        await conn.run_sync(lambda sync: sync.dialect.has_table(sync, migrations_table.name))
    )


async def lock_migrations(conn: AsyncConnection) -> None:
    """On PostgreSQL, wait for the migration lock; it is released when `conn`'s transaction ends.

    Replicas that start at once then apply each migration exactly once: the first holds the
    lock while it migrates; the others, once they get it, see the migration recorded (each
    statement of a READ COMMITTED transaction sees what committed before it began).
    """
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})


async def pending_migrations(engine: AsyncEngine) -> list[str]:
    """Names of the migrations not yet applied, in order."""
    async with engine.connect() as conn:
        applied = await applied_migrations(conn)
    return [m.name for m in MIGRATIONS if m.name not in applied]


async def migrate(engine: AsyncEngine) -> list[str]:
    """Apply pending migrations, each in its own transaction; return the names applied.

    Safe to run from several processes at once on PostgreSQL (advisory lock, see
    `lock_migrations`): each migration is applied by exactly one of them.
    """
    done: list[str] = []
    async with engine.begin() as conn:
        await lock_migrations(conn)
        await conn.execute(
            text(
                "CREATE TABLE IF NOT EXISTS understudy_migrations "
                "(name TEXT PRIMARY KEY, applied_utc TEXT NOT NULL)"
            )
        )
    for migration in MIGRATIONS:
        async with engine.begin() as conn:
            await lock_migrations(conn)
            if migration.name in await applied_migrations(conn):
                continue
            for statement in migration.statements:
                await conn.execute(text(statement))
            if conn.dialect.name == "sqlite":
                for statement in migration.sqlite_statements:
                    await conn.execute(text(statement))
            await conn.execute(
                migrations_table.insert().values(name=migration.name, applied_utc=utc_now())
            )
            done.append(migration.name)
    return done
