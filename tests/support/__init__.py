"""Shared test support: what tests import instead of each other (or conftest).

- `inprocess`: the proxy app and the exporter CLI driven in the test process (the default layer).
- `processes`: real proxy and fake-upstream processes (signals, journal, replicas, SDK runs).
- `records`: reading what a proxy recorded in its SQLite file.
- `scripted`: an in-process upstream with scripted faults.
- `exporter`: recorded rows written through the storage API, the CLI as a subprocess, samples.
- `postgres`: the PostgreSQL test server.
Server helpers (free ports, waiting for HTTP) are the package's own: `proxy.testing.servers`.
"""
