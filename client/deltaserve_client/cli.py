"""`deltaserve-client`: talk to a deltaserve server from the shell.

    deltaserve-client [--target HOST:PORT] [--api-key K] [--timeout S] [--json] COMMAND ...

Commands: generate, stream, load, unload, list, info, health (and loadtest when the
load generator is installed). Every failure exits non-zero and prints
"<STATUS_CODE_NAME>: <message>" on stderr; `health` exits 0 only when the server is
SERVING. The API key may also come from the DELTASERVE_API_KEY environment variable.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import output
from .client import DeltaServeClient
from .config import ClientConfig
from .errors import DeltaServeClientError
from .types import ChatMessage, SamplingOptions

DEFAULT_TARGET = "127.0.0.1:50051"
API_KEY_ENV = "DELTASERVE_API_KEY"
LOADTEST_MODULE = "deltaserve_client.loadtest.cli"
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


def _loadtest_available() -> bool:
    # find_spec of a submodule imports its parent package, so check the parent first.
    parent = LOADTEST_MODULE.rsplit(".", 1)[0]
    return (
        importlib.util.find_spec(parent) is not None and importlib.util.find_spec(LOADTEST_MODULE) is not None
    )


def _delta_weight(text: str) -> tuple[str, float]:
    tenant, _, alpha = text.partition("=")
    try:
        return tenant, float(alpha) if alpha else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TENANT or TENANT=ALPHA, got {text!r}") from None


def _add_generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "prompt", nargs="?", help="raw prompt text, sent as is ('-' reads stdin); or use --chat / --messages"
    )
    p.add_argument(
        "--chat", metavar="TEXT",
        help="send TEXT as one user chat message through the model's chat template "
        "(what chat-tuned tenants expect; '-' reads stdin)",
    )
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message sent before it")
    p.add_argument(
        "--messages", type=Path, metavar="FILE", help="JSON file with a list of {role, content} chat messages"
    )
    p.add_argument("--tenant", default="", help="tenant id (default: the base model)")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate (server default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--repetition-penalty", type=float, help="> 0; 1 = off")
    p.add_argument("--seed", type=int, help="sampling seed (reproducible output)")
    p.add_argument("--alpha", type=float, help="delta strength (default 1: the fine-tune; 0: base)")
    p.add_argument(
        "--delta", action="append", default=[], type=_delta_weight, metavar="TENANT[=ALPHA]", dest="deltas",
        help="compose this tenant's delta (repeat for each, 2-4 tenants; instead of --tenant/--alpha): "
        "the server adds the sum of alpha_i * delta_i at every layer",
    )
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.add_argument(
        "--logprobs",
        type=int,
        default=0,
        metavar="N",
        help="return the N most likely tokens' log-probabilities per token (see --json)",
    )
    p.add_argument("--request-id", help="request id echoed in responses and server logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaserve-client", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"server HOST:PORT (default {DEFAULT_TARGET})"
    )
    parser.add_argument("--api-key", help=f"API key sent as a bearer token (default: ${API_KEY_ENV})")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of each call in seconds")
    parser.add_argument("--json", action="store_true", help="print results as JSON (one object per line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="generate a completion and print its text")
    _add_generation_arguments(p)
    p = sub.add_parser("stream", help="generate and print tokens as they arrive")
    _add_generation_arguments(p)
    p = sub.add_parser("load", help="load (or hot-swap) a tenant's delta from the delta store (admin)")
    p.add_argument("tenant", help="tenant id")
    p.add_argument(
        "path",
        nargs="?",
        default="",
        help="file relative to the delta store (default <tenant>.delta.safetensors)",
    )
    p.add_argument("--pin", action="store_true", help="never evict it from the device")
    p.add_argument("--replace", action="store_true", help="hot-swap a tenant already loaded")
    p = sub.add_parser("unload", help="unload a tenant and free its memory (admin)")
    p.add_argument("tenant", help="tenant id")
    p = sub.add_parser("list", help="list tenants with their cache state (admin)")
    p.add_argument("tenant", nargs="?", default="", help="only this tenant")
    sub.add_parser("info", help="base model, codecs, limits and version (admin)")
    p = sub.add_parser("health", help="grpc.health.v1 check; exit 0 only when SERVING")
    p.add_argument("--service", default="", help="service name (default: the whole server)")
    if _loadtest_available():
        module = importlib.import_module(LOADTEST_MODULE)
        p = sub.add_parser("loadtest", help="generate load and report latency/throughput")
        module.add_arguments(p)
    return parser


def config_from_args(args: argparse.Namespace) -> ClientConfig:
    """ClientConfig from the global options (--target, --api-key or $DELTASERVE_API_KEY, --timeout).

    Raises DeltaServeClientError("INVALID_ARGUMENT", ...) for values ClientConfig refuses.
    """
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    try:
        return ClientConfig(target=args.target, api_key=api_key, timeout=args.timeout)
    except ValueError as error:
        raise DeltaServeClientError("INVALID_ARGUMENT", str(error)) from None


def _read_messages(path: Path) -> list[ChatMessage]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DeltaServeClientError(
            "INVALID_ARGUMENT", f"cannot read messages file {path}: {error}"
        ) from None
    if not isinstance(data, list) or not all(
        isinstance(m, dict)
        and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str)
        and m["role"]
        for m in data
    ):
        raise DeltaServeClientError(
            "INVALID_ARGUMENT", f'{path} must hold a JSON list of {{"role": str, "content": str}} objects'
        )
    return [ChatMessage(role=m["role"], content=m["content"]) for m in data]


def _prompt(args: argparse.Namespace) -> str | list[ChatMessage]:
    given = [args.prompt is not None, args.chat is not None, args.messages is not None]
    if sum(given) != 1:
        raise DeltaServeClientError(
            "INVALID_ARGUMENT", "give either a prompt argument, --chat TEXT or --messages FILE"
        )
    if args.system is not None and args.chat is None:
        raise DeltaServeClientError("INVALID_ARGUMENT", "--system goes with --chat")
    if args.messages is not None:
        return _read_messages(args.messages)
    if args.chat is not None:
        text = sys.stdin.read() if args.chat == "-" else args.chat
        system = [ChatMessage("system", args.system)] if args.system is not None else []
        return [*system, ChatMessage("user", text)]
    return sys.stdin.read() if args.prompt == "-" else args.prompt


def _sampling(args: argparse.Namespace) -> SamplingOptions:
    if args.deltas and (args.tenant or args.alpha is not None):
        raise DeltaServeClientError("INVALID_ARGUMENT", "give --tenant (+ --alpha) or --delta, not both")
    try:
        return SamplingOptions(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop=tuple(args.stop),
            ignore_eos=args.ignore_eos,
            logprobs=args.logprobs,
        )
    except ValueError as error:
        raise DeltaServeClientError("INVALID_ARGUMENT", str(error)) from None


def _generate(client: DeltaServeClient, args: argparse.Namespace) -> int:
    result = client.generate(
        _prompt(args),
        tenant=args.tenant,
        sampling=_sampling(args),
        alpha=args.alpha,
        request_id=args.request_id,
        deltas=args.deltas,
    )
    print(output.to_json(result) if args.json else result.text)
    return 0


def _stream(client: DeltaServeClient, args: argparse.Namespace) -> int:
    chunks = client.generate_stream(
        _prompt(args),
        tenant=args.tenant,
        sampling=_sampling(args),
        alpha=args.alpha,
        request_id=args.request_id,
        deltas=args.deltas,
    )
    for chunk in chunks:
        if args.json:
            print(output.to_json(chunk), flush=True)
        elif chunk.text:
            print(chunk.text, end="", flush=True)
    if not args.json:
        print()
    return 0


def _health(client: DeltaServeClient, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    print(json.dumps({"service": args.service, "status": status}) if args.json else status)
    return 0 if status == "SERVING" else EXIT_FAILURE


def _admin(client: DeltaServeClient, args: argparse.Namespace) -> int:
    if args.command == "load":
        loaded = client.load_delta(args.tenant, args.path, pin=args.pin, replace=args.replace)
        verb = "replaced" if loaded.replaced else "loaded"
        print(output.to_json(loaded) if args.json else f"{verb} {output.delta_line(loaded.delta)}")
    elif args.command == "unload":
        unloaded = client.unload_delta(args.tenant)
        text = f"unloaded {unloaded.tenant}, freed {output.human_bytes(unloaded.freed_bytes)}"
        print(output.to_json(unloaded) if args.json else text)
    elif args.command == "list":
        deltas = client.list_deltas(args.tenant)
        print(output.to_json(deltas) if args.json else output.delta_table(deltas))
    elif args.command == "info":
        info = client.server_info()
        print(output.to_json(info) if args.json else output.server_info_text(info))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; raises DeltaServeClientError on failure."""
    if args.command == "loadtest":
        return int(importlib.import_module(LOADTEST_MODULE).run(args))
    with DeltaServeClient(config_from_args(args)) as client:
        if args.command == "generate":
            return _generate(client, args)
        if args.command == "stream":
            return _stream(client, args)
        if args.command == "health":
            return _health(client, args)
        return _admin(client, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `deltaserve-client`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DeltaServeClientError as error:
        sys.stdout.flush()
        print(str(error), file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("\nCANCELLED: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
