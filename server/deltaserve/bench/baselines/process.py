"""A benchmark server in a child process (see launch.py): start, find its port, read its peak memory, stop."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from deltaserve.bench.baselines.launch import LaunchConfig
from deltaserve.errors import UnavailableError


def _vm_hwm(pid: int) -> int | None:
    """Peak resident set size (bytes) of a live process, from /proc (Linux); None elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class ServerProcess:
    """Context manager: `with ServerProcess(cfg) as srv: srv.target` (127.0.0.1:port)."""

    def __init__(self, cfg: LaunchConfig, log: Path, start_timeout: float = 600.0) -> None:
        self.cfg = cfg
        self.log = log
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.peak_rss_bytes: int | None = None
        self.counters: dict = {}
        self.start_seconds = 0.0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        c = self.cfg
        cmd = [
            sys.executable,
            "-m",
            "deltaserve.bench.baselines.launch",
            "--mode",
            c.mode,
            "--base",
            str(c.base),
            "--deltas",
            str(c.deltas),
            "--merged",
            str(c.merged),
            "--tenants",
            ",".join(c.tenants),
            "--dtype",
            c.dtype,
            "--max-running",
            str(c.max_running),
            "--max-model-len",
            str(c.max_model_len),
        ]
        if not c.warm:
            cmd.append("--no-warm")
        if c.lut_table_bits is not None:
            cmd += ["--lut-table-bits", str(c.lut_table_bits)]
        t0 = time.monotonic()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._err = open(self.log, "w")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until the server prints its port or dies
        if not line:
            self.proc.wait(timeout=30)
            self._err.close()
            tail = self.log.read_text()[-2000:]
            raise UnavailableError(f"{c.mode} server failed to start (log {self.log}):\n{tail}")
        self.port = int(json.loads(line)["port"])
        self.start_seconds = time.monotonic() - t0
        return self

    def __exit__(self, *exc) -> None:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.peak_rss_bytes = _vm_hwm(self.proc.pid)
        self.proc.stdin.close()
        try:
            rest = self.proc.stdout.read()
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest = ""
        self._err.close()
        for line in rest.splitlines():
            if line.startswith("{"):
                self.counters = json.loads(line)
