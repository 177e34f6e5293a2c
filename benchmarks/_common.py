"""What the benchmarks share: the thread environment, the prompt, the llama-250m and llama-small checkpoints, a
token clock, a local swarm behind delaying relays, and the test suite's helper modules (tests/support, put on
``sys.path`` as pytest's ``pythonpath`` does).

Import it first, as ``import _common``, before torch: importing it sets the environment that OpenMP reads
when torch loads (no busy-waiting threads on a shared CPU; no progress bars). Ruff's import order keeps
``import _common`` ahead of ``import torch`` (a bare import of a third-party-looking name sorts first).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

if "torch" in sys.modules:  # pragma: no cover - a mistake in a script's imports
    print("benchmarks/_common.py imported after torch: OMP_WAIT_POLICY may not apply", file=sys.stderr)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("COROLLA_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars too
# The attack servers and other helpers the tests and benchmarks share live in tests/support, outside the package.
SUPPORT = Path(__file__).resolve().parents[1] / "tests" / "support"
if str(SUPPORT) not in sys.path:
    sys.path.append(str(SUPPORT))

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]

# A 16-block Llama of about 250M parameters, 1.08 GB in float32 (random weights; the character tokenizer of
# the test models).
LLAMA_250M: dict[str, Any] = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
    max_position_embeddings=2048,
)

# A small random Llama (12 blocks of hidden 512): compute stays small next to the link delays.
LLAMA_SMALL: dict[str, Any] = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=12,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=2048,
)

# A random Qwen3-Next of about 170M parameters: Gated DeltaNet blocks 0-2 and 4-6, full attention on 3 and 7.
QWEN3_NEXT_SMALL: dict[str, Any] = dict(
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=32000,
    max_position_embeddings=2048,
    full_attention_interval=4,
    linear_num_key_heads=4,
    linear_num_value_heads=8,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    num_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=256,
    shared_expert_intermediate_size=512,
)


def random_checkpoint(name: str, family: str = "llama", **config: Any) -> Path:
    """A random checkpoint of ``family`` with ``config`` (the test models' character tokenizer), saved once under
    the temp folder as ``corolla-bench-NAME``."""
    from corolla.engine.apps.tiny_models import make_tiny_checkpoint

    path = Path(tempfile.gettempdir()) / f"corolla-bench-{name}"
    if not (path / "model.safetensors").exists():
        make_tiny_checkpoint(path, family, seed=0, **config)
    return path


def llama_250m() -> Path:
    """The random llama-250m checkpoint, saved once under the temp folder."""
    return random_checkpoint("llama-250m", **LLAMA_250M)


def llama_small() -> Path:
    """The random llama-small checkpoint, saved once under the temp folder."""
    return random_checkpoint("llama-small", **LLAMA_SMALL)


def qwen3_next_small() -> Path:
    """The random qwen3-next-small checkpoint, saved once under the temp folder."""
    return random_checkpoint("qwen3-next-small", "qwen3_next", **QWEN3_NEXT_SMALL)


def prompt_ids(path: str | Path) -> Any:
    """The benchmark prompt, chat-templated by the checkpoint's tokenizer: a [1, length] tensor of ids."""
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(path)
    encoded = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return encoded["input_ids"]


class TokenClock:
    """A transformers-style streamer that timestamps (and keeps) every generated token.

    ``on_token`` runs after each token is stamped (the offloading benchmark evicts files from the page
    cache there); its time counts towards the next token.
    """

    def __init__(self, on_token: Callable[[], None] | None = None) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False
        self._on_token = on_token

    def put(self, ids: Any) -> None:
        if not self._prompt_seen:  # generate() streams the prompt first
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens.extend(int(t) for t in ids.reshape(-1).tolist())
        if self._on_token is not None:
            self._on_token()

    def end(self) -> None:
        pass

    @property
    def ttft(self) -> float:
        """Seconds from the start to the first token."""
        return self.times[0] - self.start

    @property
    def decode_tps(self) -> float:
        """Tokens per second after the first."""
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    def steps(self) -> list[float]:
        """Seconds between consecutive tokens."""
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def cpu_seconds(pid: int, skip: Sequence[int] = ()) -> float:
    """User + system CPU seconds of a process and its living children (a server's DHT process and daemon),
    leaving out the process trees rooted at ``skip`` (this process's servers, counted on their own)."""
    import psutil

    proc = psutil.Process(pid)
    skipped: set[int] = set()
    for root in skip:
        with contextlib.suppress(psutil.Error):
            skipped |= {root, *(p.pid for p in psutil.Process(root).children(recursive=True))}
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        if p.pid in skipped:
            continue
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages and its core count, for the report."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so ``with`` blocks stop the servers they started on either."""

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, raise_interrupt)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def swarm_behind_relays(
    path: Path, spans: Sequence[str], delay_ms: float, threads: int, relayed: dict[str, int] | None = None
) -> Iterator[tuple[Any, subprocess.Popen[str]]]:
    """A local swarm, one server per span, each behind a userspace relay (_relay.py) that delays every chunk by
    ``delay_ms`` in each direction; servers announce only their relay's port, so every link to a server, from
    the client or from another server, crosses one relay. Yields ``(swarm, relay process)``: SIGUSR1 to the
    relay turns the delay off, SIGUSR2 back on. On exit ``relayed`` (if given) gets the bytes per relay port.
    """
    from corolla.engine.apps.local_swarm import Swarm

    ports = [(free_port(), free_port()) for _ in spans]  # (server, relay)
    relay = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_relay.py")), "--delay-ms", str(delay_ms)]
        + [f"{r}:{s}" for s, r in ports],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert relay.stdout is not None
        if relay.stdout.readline().strip() != "ready":
            raise SystemExit("the relay did not start")
        with Swarm(path, spans=[], threads=threads) as swarm:
            for span, (server_port, relay_port) in zip(spans, ports, strict=True):
                announce = ["--port", str(server_port), "--announce-host", "127.0.0.1"]
                swarm.add_server(span, wait=False, extra_args=[*announce, "--announce-port", str(relay_port)])
            swarm.wait_ready()
            yield swarm, relay
    finally:
        relay.terminate()
        out, _ = relay.communicate(timeout=10)
        if relayed is not None and out.strip():
            relayed.update(json.loads(out.strip().splitlines()[-1]))
