"""`deltaserve serve` as users run it: a subprocess, the client CLI against it, /metrics, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
from deltaserve_client.cli import main as client_main
from test_service_support import PROMPTS, models

__all__ = ["models"]  # fixture


@pytest.mark.slow
def test_serve_command_client_cli_metrics_and_sigterm(models, tmp_path, capsys):
    config = tmp_path / "serve.toml"
    config.write_text(
        f'base = "{models.base}"\n[cache]\nhost_cache_bytes = "64MiB"\n[limits]\nmax_queue = 8\n'
    )
    cmd = [
        sys.executable,
        "-m",
        "deltaserve.cli.main",
        "serve",
        "--config",
        str(config),
        "--deltas",
        str(models.store),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--json",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the server is SERVING
        assert line, proc.stderr.read()
        info = json.loads(line)
        assert info["tenants"] == ["alice", "bob", "carol"]
        target = info["target"]
        assert target.startswith("127.0.0.1:")  # no keys file: loopback

        assert (
            client_main(
                [
                    "--target",
                    target,
                    "generate",
                    "--tenant",
                    "alice",
                    "--max-new-tokens",
                    "4",
                    "--ignore-eos",
                    PROMPTS[0],
                ]
            )
            == 0
        )
        text = capsys.readouterr().out.strip()
        assert len(text.split()) == 4
        assert client_main(["--target", target, "generate", "--tenant", "nobody", PROMPTS[0]]) != 0
        assert "NOT_FOUND" in capsys.readouterr().err
        assert client_main(["--target", target, "--json", "info"]) == 0
        assert json.loads(capsys.readouterr().out)["limits"]["max_queued_requests"] == 8
        assert client_main(["--target", target, "health"]) == 0

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{info['metrics_port']}/metrics", timeout=5).read()
        text = metrics.decode()
        for name in (
            'deltaserve:delta_cache_bytes{tier="device"}',
            "deltaserve:time_to_first_token_seconds",
            "deltaserve:e2e_request_latency_seconds",
            "deltaserve:requests_total",
        ):
            assert name in text, name

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert "bound to loopback" in err and "draining" in err and "stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
