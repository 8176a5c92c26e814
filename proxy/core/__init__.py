"""Pure logic, no I/O: canonical messages and hashes, SSE assembly, routing decisions,
tool-call promotion, redaction. Imports nothing from the rest of `proxy` but `proxy.config`."""
