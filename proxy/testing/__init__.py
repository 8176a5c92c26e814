"""The testing kit shipped with the package (as httpx ships MockTransport): fake upstreams that
speak the providers' real wire formats, server helpers, an agent loop. Used by the demo, the
tests and `bench/`."""
