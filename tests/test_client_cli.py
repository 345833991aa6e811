"""`deltaserve-client` against the fake in-process server: output, JSON and exit codes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from deltaserve_client import cli
from grpc_health.v1 import health_pb2
from test_client_grpc import GHOST, SLOW, FakeState, serve_fake


@pytest.fixture
def fake():
    with serve_fake() as server:
        yield server


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_text_and_passes_options(fake, capsys):
    code, out, err = run_cli(
        capsys, "--target", fake.target, "generate", "hello there", "--tenant", "acme",
        "--max-new-tokens", "9", "--temperature", "0.5", "--top-p", "0.8", "--top-k", "4",
        "--seed", "7", "--alpha", "0", "--stop", "END", "--stop", "\n",
        "--repetition-penalty", "1.2", "--ignore-eos", "--logprobs", "2",
    )  # fmt: skip
    assert (code, out, err) == (0, "[acme] er\n", "")
    req = fake.state.requests[-1]
    assert req.sampling.max_new_tokens == 9 and req.sampling.seed == 7 and req.sampling.top_k == 4
    assert req.sampling.top_p == pytest.approx(0.8) and req.sampling.temperature == pytest.approx(0.5)
    assert list(req.sampling.stop) == ["END", "\n"]
    assert req.sampling.repetition_penalty == pytest.approx(1.2) and req.sampling.ignore_eos
    assert req.sampling.logprobs == 2
    assert req.HasField("alpha") and req.alpha == 0.0
    code, out, _ = run_cli(capsys, "--target", fake.target, "generate", "abc")
    assert out == "[base] cba\n" and not fake.state.requests[-1].HasField("alpha")


def test_generate_json(fake, capsys):
    code, out, _ = run_cli(capsys, "--target", fake.target, "--json", "generate", "xyz", "--request-id", "r1")
    data = json.loads(out)
    assert code == 0 and data["text"] == "[base] zyx" and data["request_id"] == "r1"
    assert data["finish_reason"] == "stop" and data["usage"]["total_time_seconds"] == 1.0
    assert data["token_ids"] == [ord(c) for c in "[base] zyx"]


def test_stream_prints_tokens_as_they_arrive(fake, capsys):
    code, out, _ = run_cli(capsys, "--target", fake.target, "stream", "streamed words", "--tenant", "t2")
    assert code == 0 and out == "[t2] sdrow demaerts\n"
    code, out, _ = run_cli(capsys, "--target", fake.target, "--json", "stream", "streamed words")
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) > 2 and lines[-1]["finished"] and lines[-1]["finish_reason"] == "stop"
    assert "".join(line["text"] for line in lines) == "[base] sdrow demaerts"


def test_messages_file(fake, capsys, tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}]))
    code, out, _ = run_cli(capsys, "--target", fake.target, "generate", "--messages", str(path))
    assert code == 0 and out == "[base] " + "system:terse | user:hi"[::-1] + "\n"
    assert fake.state.requests[-1].WhichOneof("input") == "messages"

    path.write_text(json.dumps({"role": "user"}))
    code, out, err = run_cli(capsys, "--target", fake.target, "generate", "--messages", str(path))
    assert code == 1 and out == "" and err.startswith("INVALID_ARGUMENT: ") and "JSON list" in err
    code, _, err = run_cli(capsys, "--target", fake.target, "generate")
    assert code == 1 and err.startswith("INVALID_ARGUMENT: give either a prompt")


def test_inline_chat_and_system(fake, capsys):
    code, out, _ = run_cli(capsys, "--target", fake.target, "generate", "--chat", "hi", "--tenant", "acme")
    assert code == 0 and out == "[acme] " + "user:hi"[::-1] + "\n"
    req = fake.state.requests[-1]
    assert req.WhichOneof("input") == "messages"
    assert [(m.role, m.content) for m in req.messages.messages] == [("user", "hi")]
    code, out, _ = run_cli(capsys, "--target", fake.target, "stream", "--system", "terse", "--chat", "yo")
    assert code == 0 and out == "[base] " + "system:terse | user:yo"[::-1] + "\n"
    for argv in (["--chat", "a", "raw"], ["--system", "s", "raw"], ["--chat", "a", "--messages", "f.json"]):
        code, _, err = run_cli(capsys, "--target", fake.target, "generate", *argv)
        assert code == 1 and err.startswith("INVALID_ARGUMENT: "), argv


def test_failures_print_status_code_and_exit_nonzero(fake, capsys):
    code, out, err = run_cli(capsys, "--target", fake.target, "generate", "x", "--tenant", GHOST)
    assert code == 1 and out == ""
    assert err == f"NOT_FOUND: unknown tenant '{GHOST}': load it with LoadDelta first\n"
    code, _, err = run_cli(capsys, "--target", fake.target, "stream", "x", "--tenant", GHOST)
    assert code == 1 and err.startswith("NOT_FOUND: ")
    code, _, err = run_cli(
        capsys, "--target", fake.target, "--timeout", "0.3", "generate", "x", "--tenant", SLOW
    )
    assert code == 1 and err.startswith("DEADLINE_EXCEEDED: ")
    code, _, err = run_cli(capsys, "--target", fake.target, "--timeout", "-1", "info")
    assert code == 1 and err.startswith("INVALID_ARGUMENT: timeout")


def test_unreachable_server_is_unavailable(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = run_cli(capsys, "--target", f"127.0.0.1:{port}", "--timeout", "5", "info")
    assert code == 1 and err.startswith("UNAVAILABLE: ")


def test_api_key_from_flag_or_environment(capsys, monkeypatch):
    monkeypatch.delenv(cli.API_KEY_ENV, raising=False)
    with serve_fake(FakeState(required_key="k1")) as fake:
        code, _, err = run_cli(capsys, "--target", fake.target, "list")
        assert code == 1 and err.startswith("UNAUTHENTICATED: ")
        code, out, _ = run_cli(capsys, "--target", fake.target, "--api-key", "k1", "list")
        assert code == 0 and "zeta" in out
        monkeypatch.setenv(cli.API_KEY_ENV, "k1")
        code, _, _ = run_cli(capsys, "--target", fake.target, "generate", "x")
        assert code == 0 and fake.state.metadata[-1]["authorization"] == "Bearer k1"


def test_admin_commands(fake, capsys):
    t = ("--target", fake.target)
    code, out, _ = run_cli(capsys, *t, "load", "acme", "acme.delta.safetensors", "--pin")
    assert code == 0 and out.startswith("loaded acme v1: device, 3.0 MiB, pinned")
    code, out, _ = run_cli(capsys, *t, "--json", "load", "acme", "--replace")
    assert code == 0 and json.loads(out)["replaced"] and json.loads(out)["delta"]["version"] == 2
    code, _, err = run_cli(capsys, *t, "load", "evil", "../secrets")
    assert code == 1 and err.startswith("INVALID_ARGUMENT: ")

    code, out, _ = run_cli(capsys, *t, "list")
    header, *rows = out.splitlines()
    assert code == 0 and header.split()[:3] == ["TENANT", "TIER", "SIZE"]
    assert [r.split()[0] for r in rows] == ["acme", "zeta"] and rows[1].split()[1] == "host"
    code, out, _ = run_cli(capsys, *t, "--json", "list", "zeta")
    (zeta,) = json.loads(out)
    assert zeta["hits"] == 7 and zeta["last_used"].startswith("2023-11-14T22:13:20")

    code, out, _ = run_cli(capsys, *t, "unload", "acme")
    assert code == 0 and out == "unloaded acme, freed 3.0 MiB\n"
    code, _, err = run_cli(capsys, *t, "unload", "acme")
    assert code == 1 and err.startswith("NOT_FOUND: ")

    code, out, _ = run_cli(capsys, *t, "info")
    assert code == 0 and "LlamaForCausalLM" in out and "new 256 tokens" in out
    code, out, _ = run_cli(capsys, *t, "--json", "info")
    assert json.loads(out)["limits"]["max_prompt_tokens"] == 512


def test_health_exit_code_follows_serving_status(fake, capsys):
    assert run_cli(capsys, "--target", fake.target, "health") == (0, "SERVING\n", "")
    fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run_cli(capsys, "--target", fake.target, "health") == (1, "NOT_SERVING\n", "")
    code, out, _ = run_cli(capsys, "--target", fake.target, "--json", "health")
    assert code == 1 and json.loads(out) == {"service": "", "status": "NOT_SERVING"}
    code, _, err = run_cli(capsys, "--target", fake.target, "health", "--service", "no.such.Service")
    assert code == 1 and err.startswith("NOT_FOUND: ")


def test_loadtest_registered_only_when_its_module_exists():
    parser = cli.build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    assert ("loadtest" in subcommands) == cli._loadtest_available()
    assert {"generate", "stream", "load", "unload", "list", "info", "health"} <= set(subcommands)


def test_console_entry_point_exit_code(fake):
    """The real process exit status (not just main's return value) carries the failure."""
    cmd = [sys.executable, "-m", "deltaserve_client.cli", "--target", fake.target]
    ok = subprocess.run([*cmd, "generate", "ok"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout == "[base] ko\n"
    bad = subprocess.run(
        [*cmd, "generate", "x", "--tenant", GHOST], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and bad.stderr.startswith("NOT_FOUND: ")
