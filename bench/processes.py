"""Process helpers the benchmarks share: free loopback ports, the servers' environment, stopping.

Imported by the scripts in bench/ (run as `python bench/NAME.py`, so this directory is on the path).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, on `host`."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def child_env() -> dict[str, str]:
    """The servers' environment: no UNDERSTUDY_* from outside, litellm offline, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNDERSTUDY_")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stop_process(process: subprocess.Popen[bytes], timeout: float = 60.0) -> tuple[float, str]:
    """SIGTERM, wait for a clean exit (the proxy's recorder drains; SIGKILL after `timeout` s);
    return (seconds it took to exit, its output when it was captured)."""
    started = time.perf_counter()
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    took = time.perf_counter() - started
    output = process.stdout.read().decode(errors="replace") if process.stdout else ""
    return took, output
