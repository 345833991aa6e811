"""The demo's server: `deltaserve serve` in a subprocess on loopback, stopped with SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from deltaserve.errors import UnavailableError


class ServerProcess:
    """Start with `start()`; `target` is "127.0.0.1:PORT"; `stop()` drains and waits (kills after a grace)."""

    def __init__(
        self, base: Path, store: Path, log_file: Path, max_new_tokens: int = 64,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """extra_args: more `deltaserve serve` flags (they follow the defaults, so they win)."""
        self.base = base
        self.extra_args = extra_args
        self.metrics_port: int | None = None
        self.store = store
        self.log_file = log_file
        self.max_new_tokens = max_new_tokens
        self.proc: subprocess.Popen | None = None
        self.target = ""
        self.fingerprint = ""

    def start(self, timeout: float = 600.0) -> str:
        """Launch and wait for the start-up line and a SERVING health check; returns the target."""
        from deltaserve_client import ClientConfig, DeltaServeClient

        cmd = [
            sys.executable,
            "-m",
            "deltaserve.cli.main",
            "serve",
            "--base",
            str(self.base),
            "--deltas",
            str(self.store),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--json",
            "--drain-grace",
            "5",
            *(self.extra_args or ("--no-metrics",)),
        ]
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_file.open("w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise UnavailableError(
                f"the server exited during start-up (exit {self.proc.returncode}); see {self.log_file}"
            )
        info = json.loads(line)
        self.target, self.fingerprint = info["target"], info["fingerprint"]
        self.metrics_port = info.get("metrics_port")
        deadline = time.monotonic() + timeout
        with DeltaServeClient(ClientConfig(target=self.target, timeout=10)) as client:
            while client.health() != "SERVING":
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise UnavailableError(f"the server did not become SERVING; see {self.log_file}")
                time.sleep(0.5)
        return self.target

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM (the server drains), wait up to `grace` s, then kill; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
