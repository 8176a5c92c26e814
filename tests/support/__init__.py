"""Shared test support: what tests import instead of each other (or conftest).

- `inprocess`: the proxy app and the exporter CLI driven in the test process (the default layer).
- `processes`: real proxy and fake-upstream processes (signals, journal, replicas, SDK runs).
- `records`: reading what a proxy recorded in its SQLite file.
- `scripted`: an in-process upstream with scripted faults.
- `exporter`: recorded rows written through the storage API, an SDK agent loop, expected samples.
- `evaluation`: the replay-evaluation scenario (trajectories, the candidate's script, the report).
- `trainer_data`: varied trajectories for the open-trainer tests, chat templates rendered as
  transformers does; `trl_smoke`: the TRL training run (`python -m tests.support.trl_smoke`).
- `postgres`: the PostgreSQL test server.
Also `agents`, `bodies`, `browser`, `dashboard`, `replicas`, `responses`, `shapes`, `spellings`
(each says what it holds). `tests/conftest.py` holds fixtures only.
Server helpers (free ports, waiting for HTTP) are the package's own: `proxy.testing.servers`.
"""
