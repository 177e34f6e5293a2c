"""``corolla`` command line: server, demo, health. Server options are generated from ServerConfig."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from corolla.engine.config import (
    LIMITS,
    ClientConfig,
    ServerConfig,
    as_tuple,
    format_size,
    from_env,
    is_size_field,
    parse_size,
)
from corolla.engine.errors import CorollaError
from corolla.engine.logs import configure_logging
from corolla.engine.version import __version__

_SKIP = {"model", "extra", "token"}
_ALIASES = {"swarm_key_file": ("--swarm-key",)}  # shorter spellings of generated options
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
T = TypeVar("T")


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)} (any case)")
    return level


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line that says what to do (exit 2, as argparse)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _number(convert: Callable[[str], T], name: str) -> Callable[[str], T]:
    """An argparse type: ``convert`` the text, then check it against the bounds of option ``name`` (LIMITS)."""

    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError as e:
            kind = "a size" if convert is parse_size else "an integer" if convert is int else "a number"
            raise argparse.ArgumentTypeError(
                str(e) if convert is parse_size else f"expected {kind}, got {text!r}"
            ) from e
        limit = LIMITS.get(name)
        problem = limit.problem(value) if limit is not None else None  # type: ignore[arg-type]
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _not_blank(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"is empty: {what}")
        return text

    return parse


def _default_text(f: dataclasses.Field[Any]) -> str:
    """`` (default: X)`` for a field whose default says something; empty for None, False and ()."""
    default = f.default
    if default is dataclasses.MISSING or default is None or default is False or default == ():
        return ""
    shown = format_size(default) if is_size_field(f.name) and isinstance(default, int) else default
    return f" (default: {shown})"


def _field_help(cls: type) -> dict[str, str]:
    """The trailing comment of each field line of a config class is its help text."""
    helps: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            helps[m.group(1)] = m.group(2).strip()
    return helps


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: set[str]) -> None:
    """Add one ``--option`` per config field (bools become flags, tuples take several values)."""
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        flags = [flag, *_ALIASES.get(f.name, ())]
        kind = str(f.type)
        help_text = helps.get(f.name, "") + _default_text(f)
        if "bool" in kind:
            parser.add_argument(*flags, action="store_true", default=None, help=help_text)
        elif "tuple" in kind:
            metavar = "PATH" if f.name == "adapters" else "MADDR"
            parser.add_argument(*flags, nargs="*", default=None, metavar=metavar, help=help_text)
        elif is_size_field(f.name):
            size = _number(parse_size, f.name)
            parser.add_argument(*flags, type=size, default=None, metavar="SIZE", help=help_text + "; e.g. 1GB, 512MiB")
        elif "int" in kind and "float" not in kind:
            parser.add_argument(*flags, type=_number(int, f.name), default=None, help=help_text)
        elif "float" in kind:
            parser.add_argument(*flags, type=_number(float, f.name), default=None, help=help_text)
        else:
            parser.add_argument(*flags, type=str, default=None, help=help_text)


def _config_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names - _SKIP and v is not None}


def _refuse_token(value: str) -> str:
    raise argparse.ArgumentTypeError(
        "a token on the command line is visible to every user of this machine (ps, shell history); "
        "put it in a file and pass --token-file PATH, or set HF_TOKEN (or COROLLA_TOKEN)"
    )


def _token_file(path: str) -> str:
    from corolla.engine.hub import read_token_file

    try:
        return read_token_file(path)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _model_source(text: str) -> str:
    """The model argument, checked (a checkpoint folder with config.json, or a repo id) before anything starts."""
    from corolla.engine.models.source import check_model_source

    try:
        check_model_source(text)
    except CorollaError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def _cmd_server(args: argparse.Namespace) -> int:
    from corolla.engine.server.server import Server

    overrides = _config_overrides(args, ServerConfig)
    try:
        cfg = from_env(ServerConfig, model=args.model, token=args.token, **overrides)
    except ValueError as e:  # a bad COROLLA_* value
        raise CorollaError(str(e)) from e
    if not cfg.new_swarm and not cfg.initial_peers:
        sys.stderr.write("corolla server: give --initial-peers MADDR... to join a swarm, or --new-swarm\n")
        return 2
    Server(cfg).run()
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from corolla.engine.apps.demo import run_demo

    return run_demo(prompt=args.prompt, max_new_tokens=args.max_new_tokens, num_servers=args.servers, serve=args.serve)


def _cmd_health(args: argparse.Namespace) -> int:
    from corolla.engine.apps.health import run_health

    try:
        peers = as_tuple(args.initial_peers) or from_env(ClientConfig).initial_peers  # COROLLA_INITIAL_PEERS
    except ValueError as e:  # a bad COROLLA_* value
        raise CorollaError(str(e)) from e
    if not peers:
        sys.stderr.write("corolla health: give --initial-peers MADDR... or set COROLLA_INITIAL_PEERS\n")
        return 2
    from corolla.engine.dht.swarm_key import keys_from_option

    keys = keys_from_option(args.swarm_key)
    return run_health(args.model, peers, as_json=args.json, num_blocks=args.num_blocks, swarm_keys=keys)


_SWARM_KEY_HELP = "key file of a private swarm (default: COROLLA_SWARM_KEY_FILE; none: a public swarm)"


def _cmd_swarm_key(args: argparse.Namespace) -> int:
    from corolla.engine.dht.swarm_key import new_key

    sys.stdout.write(
        "# Corolla swarm key: whoever holds it can join, read and use your swarm. Keep it secret.\n"
        f"{new_key().text()}\n"
    )
    return 0


def _common_options(top_level: bool) -> _Parser:
    """Options accepted before and after the subcommand (a subcommand's copy keeps the value given before it)."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--log-level",
        type=_log_level,
        default=None if top_level else argparse.SUPPRESS,
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR, any case (default: INFO, or COROLLA_LOG_LEVEL)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The full ``corolla`` argument parser."""
    parser = _Parser(
        prog="corolla",
        description="Run large language models across many machines.",
        parents=[_common_options(top_level=True)],
        epilog="Every server option can also be set as COROLLA_<OPTION> in the environment "
        "(e.g. COROLLA_INITIAL_PEERS, COROLLA_CACHE_BYTES=1GB).",
    )
    parser.add_argument("--version", action="version", version=f"corolla {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = [_common_options(top_level=False)]

    server = sub.add_parser("server", help="host a span of a model's blocks for the swarm", parents=common)
    server.add_argument("model", type=_model_source, help="local checkpoint folder or Hugging Face repo id")
    server.add_argument("--token", type=_refuse_token, default=None, help=argparse.SUPPRESS)  # refused: shows in ps
    server.add_argument(
        "--token-file",
        dest="token",
        type=_token_file,
        metavar="PATH",
        help="file holding a Hugging Face token for gated repos (default: HF_TOKEN, COROLLA_TOKEN or `hf auth login`)",
    )
    add_config_arguments(server, ServerConfig, _SKIP)
    server.set_defaults(func=_cmd_server)

    demo = sub.add_parser("demo", help="start a local swarm on SmolLM2-135M-Instruct and chat with it", parents=common)
    prompt = _not_blank("give a question, or leave --prompt out to chat")
    demo.add_argument(
        "--prompt", type=prompt, default=None, help="answer this prompt and exit (default: interactive chat)"
    )
    demo.add_argument(
        "--max-new-tokens", type=_number(int, "max_new_tokens"), default=64, help="tokens to generate per answer"
    )
    demo.add_argument(
        "--servers", type=_number(int, "servers"), default=2, help="server processes to split the blocks over"
    )
    demo.add_argument("--serve", action="store_true", help="keep the swarm running for other programs (Ctrl-C stops)")
    demo.set_defaults(func=_cmd_demo)

    health = sub.add_parser("health", help="show which servers cover which blocks of a model", parents=common)
    health.add_argument("model", nargs="?", default=None, help="model name as announced (default: all known)")
    health.add_argument(
        "--initial-peers", nargs="+", default=None, metavar="MADDR", help="swarm peers (default: COROLLA_INITIAL_PEERS)"
    )
    health.add_argument(
        "--num-blocks",
        type=_number(int, "num_blocks"),
        default=None,
        help="blocks of the model (default: from records)",
    )
    health.add_argument("--json", action="store_true", help="print JSON instead of a table")
    health.add_argument("--swarm-key", default=None, metavar="FILE", help=_SWARM_KEY_HELP)
    health.set_defaults(func=_cmd_health)
    swarm_key = sub.add_parser("swarm-key", help="make the key of a private swarm", parents=common)
    swarm_key_sub = swarm_key.add_subparsers(dest="action", required=True)
    swarm_key_new = swarm_key_sub.add_parser("new", help="print a new random key: corolla swarm-key new > team.key")
    swarm_key_new.set_defaults(func=_cmd_swarm_key)
    add_web_commands(sub)
    return parser


def add_web_commands(sub: Any) -> None:
    """``corolla api`` and ``corolla monitor``: web faces whose dependencies come with the ``api`` extra."""
    api = sub.add_parser("api", help="serve a swarm model over an OpenAI-compatible HTTP API")
    api.add_argument(
        "model", type=_model_source, help="local checkpoint folder or Hugging Face repo id (as the servers use it)"
    )
    peers_help = "swarm peers (default: COROLLA_INITIAL_PEERS)"
    api.add_argument("--initial-peers", nargs="+", default=(), metavar="MADDR", help=peers_help)
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    api.add_argument("--port", type=_number(int, "web_port"), default=8000, help="TCP port (default 8000)")
    api.add_argument("--api-key", default=None, help="key clients must send (default: COROLLA_API_KEY, or none)")
    api.add_argument(
        "--model-name",
        type=_not_blank("give the model id clients should ask for, or leave --model-name out"),
        default=None,
        help="model id clients ask for (default: the repo id, or the folder's name; the path works too)",
    )
    api.add_argument(
        "--request-timeout",
        type=_number(float, "request_timeout"),
        default=600.0,
        help="seconds per request before 504",
    )
    api.add_argument(
        "--default-max-tokens",
        type=_number(int, "default_max_tokens"),
        default=512,
        help="tokens when a request sets no max",
    )
    api.add_argument(
        "--max-sessions",
        type=_number(int, "max_sessions"),
        default=8,
        help="generations at once; more wait their turn (default 8)",
    )
    api.add_argument(
        "--max-queue",
        type=_number(int, "max_queue"),
        default=64,
        help="requests that may wait for a generation, in arrival order; more get 429 (default 64)",
    )
    api.add_argument(
        "--max-body-bytes",
        type=_number(parse_size, "max_body_bytes"),
        default=4 * 1024 * 1024,
        metavar="SIZE",
        help="largest request body; larger ones get 413 unread (default 4MiB; e.g. 1MB, 16MiB)",
    )
    api.add_argument("--swarm-key", default=None, metavar="FILE", help=_SWARM_KEY_HELP)

    def run_api(args: argparse.Namespace) -> int:
        from corolla.engine.apps.api.serve import run_api

        return run_api(
            args.model,
            args.initial_peers,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            model_id=args.model_name,
            request_timeout=args.request_timeout,
            default_max_tokens=args.default_max_tokens,
            max_sessions=args.max_sessions,
            max_queue=args.max_queue,
            max_body_bytes=args.max_body_bytes,
            swarm_key_file=args.swarm_key,
        )

    api.set_defaults(func=run_api)

    monitor = sub.add_parser("monitor", help="serve a live web page of the swarm's blocks and servers")
    monitor.add_argument("--initial-peers", nargs="+", default=(), metavar="MADDR", help=peers_help)
    monitor.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    monitor.add_argument("--port", type=_number(int, "web_port"), default=8080, help="TCP port (default 8080)")
    monitor.add_argument(
        "--refresh", type=_number(float, "refresh"), default=5.0, help="seconds between DHT reads (default 5)"
    )
    monitor.add_argument("--swarm-key", default=None, metavar="FILE", help=_SWARM_KEY_HELP)

    def run_monitor(args: argparse.Namespace) -> int:
        from corolla.engine.apps.monitor.serve import run_monitor
        from corolla.engine.dht.swarm_key import keys_from_option

        keys = keys_from_option(args.swarm_key)
        return run_monitor(args.initial_peers, host=args.host, port=args.port, refresh=args.refresh, swarm_keys=keys)

    monitor.set_defaults(func=run_monitor)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``corolla`` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        result: int = args.func(args)
    except CorollaError as e:  # expected failures get their message, not a traceback
        sys.stderr.write(f"corolla {args.command}: {e}\n")
        return 2
    except KeyboardInterrupt:  # Ctrl-C: everything was stopped on the way out; no traceback
        sys.stderr.write("\n")
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
