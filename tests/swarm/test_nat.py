"""Across real network boundaries: volunteers on public addresses and one behind a home router's NAT.

Namespaces made by the test (netns_lab.py): public hosts a, b, c and the user's u on one bridge; n behind a
masquerading router with no port forwarded. Servers run inside them (``ip netns exec``) on a tiny random
checkpoint; the user's generation (nat_user.py, in u) must equal local transformers' greedy tokens.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from netns_lab import Lab, read_json_line, why_no_namespaces
from swarm_helpers import hf_greedy, hf_model, random_ids, track

from corolla.engine.apps.local_swarm import ServerProcess

REASON = why_no_namespaces()
pytestmark = [
    pytest.mark.swarm,
    pytest.mark.timeout(300),
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
]

PORT = 31337  # every host has its own address, so one port for all
NEW_TOKENS = 8
USER = str(Path(__file__).with_name("nat_user.py"))
FAST = ["--throughput", "1000", "--announce-period", "2", "--record-ttl", "20", "--num-threads", "1"]


@dataclass
class World:
    lab: Lab
    checkpoint: Path
    log_dir: Path
    user_ns: str = ""
    servers: dict[str, ServerProcess] = field(default_factory=dict)
    addrs: dict[str, str] = field(default_factory=dict)  # name → full multiaddr

    def start(
        self, name: str, ns: str, ip: str, blocks: str, peers: list[str], *extra: str, wait: bool = True
    ) -> ServerProcess:
        server = ServerProcess(
            str(self.checkpoint),
            blocks,
            [self.addrs[p] for p in peers],
            self.log_dir / f"{name}.log",
            extra_args=[*FAST, "--host", "0.0.0.0", *extra] + (["--port", str(PORT)] if ip else []),
            launcher=[*self.lab.launcher(ns), sys.executable, "-m", "corolla.engine.apps.cli"],
        )
        self.servers[name] = server
        track(server)
        if wait:
            self.ready(name, ip)
        return server

    def ready(self, name: str, ip: str = "") -> None:
        server = self.servers[name]
        wait_online(server)
        track(server)
        if ip:
            self.addrs[name] = f"/ip4/{ip}/tcp/{PORT}/p2p/{server.peer_id}"

    def name_of(self, peer_id: str) -> str:
        return next(name for name, s in self.servers.items() if s.peer_id == peer_id)

    def user(self, prompt: torch.Tensor, peers: list[str], pause_at: int = -1) -> subprocess.Popen[str]:
        args = [sys.executable, USER, str(self.checkpoint), ",".join(map(str, prompt[0].tolist()))]
        args += [str(NEW_TOKENS), str(pause_at), *(self.addrs[p] for p in peers)]
        log = open(self.log_dir / "user.log", "a")  # noqa: SIM115 - the lab stops the process; the OS closes it
        return self.lab.popen(
            self.user_ns, args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=Path.cwd()
        )


def wait_online(server: ServerProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not server.ready():
        if not server.alive() or time.monotonic() > deadline:
            raise AssertionError(f"server did not come online:\n{server.log_tail()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def world(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    lab = Lab()
    try:
        w = World(lab, tiny_checkpoint("llama"), tmp_path_factory.mktemp("nat"))
        a_ns, a_ip = lab.add_public("a")
        b_ns, b_ip = lab.add_public("b")
        c_ns, c_ip = lab.add_public("c")
        w.user_ns, _ = lab.add_public("u")
        n_ns, _, n_router_ip = lab.add_home("n")
        w.start("a", a_ns, a_ip, "0:3", [], "--new-swarm")
        w.start("b", b_ns, b_ip, "3:6", ["a"], wait=False)  # b and c start together
        w.start("c", c_ns, c_ip, "0:3", ["a"], wait=False)
        w.ready("b", b_ip)
        w.ready("c", c_ip)
        w.addrs["n_ns"] = n_ns  # where the home volunteer will run
        w.addrs["n_router_ip"] = n_router_ip
        yield w
    finally:
        for server in w.servers.values() if "w" in locals() else ():
            server.stop(grace=5)
        lab.close()


@pytest.fixture(scope="module")
def reference(world: World) -> tuple[torch.Tensor, list[int]]:
    prompt = random_ids(1, 10, seed=26)
    expected = hf_greedy(hf_model(world.checkpoint), prompt, NEW_TOKENS, eos=False)
    return prompt, expected[0].tolist()


def finish(proc: subprocess.Popen[str], timeout: float = 120.0) -> dict:
    result = read_json_line(proc, timeout)
    assert "tokens" in result, result
    return result


ECHO = """
import socket, sys
with socket.create_server(("0.0.0.0", int(sys.argv[1]))) as server:
    print("ready", flush=True)
    conn, (ip, _) = server.accept()
    conn.sendall(conn.recv(16) + ip.encode())
"""
ASK = """
import socket, sys, time
began = time.perf_counter()
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as conn:
    conn.sendall(b"hi ")
    answer = conn.recv(64).decode()
print(answer, round(1000 * (time.perf_counter() - began)))
"""


def test_the_wan_delay_holds_packets_and_keeps_addresses() -> None:
    lab = Lab(wan_delay_ms=40)  # the instrument of benchmarks/relay.py
    try:
        x_ns, x_ip = lab.add_public("x")
        y_ns, y_ip = lab.add_public("y")
        server = lab.popen(x_ns, [sys.executable, "-c", ECHO, str(PORT)], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        asked = subprocess.run(
            [*lab.launcher(y_ns), sys.executable, "-c", ASK, x_ip, str(PORT)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        hello, ip, ms = asked.stdout.split()
        assert (hello, ip) == ("hi", y_ip), asked  # x saw y's own address: whole packets, not a proxy
        assert int(ms) >= 4 * 40  # a handshake and a request: two round trips of two delayed legs
    finally:
        lab.close()


def test_public_volunteers_serve_a_user_in_another_namespace(world: World, reference) -> None:
    prompt, expected = reference
    result = finish(world.user(prompt, ["a"]))
    assert result["tokens"] == expected
    assert world.name_of(result["hops"][-1]) == "b"
    for name in ("b", "c"):  # checked by a, which dialled them back through the bridge
        assert "reachable directly at /ip4/11.26.0." in world.servers[name].log_path.read_text()


def test_volunteer_behind_nat_serves_through_a_relay(world: World, reference) -> None:
    prompt, expected = reference
    # A fixed port (the last test forwards it) and a short re-check period (that test waits for one).
    extra = ["--port", str(PORT), "--reachability-period", "4"]
    n = world.start("n", world.addrs["n_ns"], "", "3:6", ["a", "b", "c"], *extra)
    log = n.log_path.read_text()
    assert "not reachable from outside: serving through relay" in log, log[-3000:]
    status = n.status()
    assert status["relayed"] and status["relays"], status
    assert all("/p2p-circuit" in m for m in status["maddrs"])  # never its undialable 192.168 address
    world.servers["b"].stop()  # the only other server of 3:6 leaves: the user must reach n
    result = finish(world.user(prompt, ["a", "c"]))
    assert result["tokens"] == expected
    assert world.name_of(result["hops"][-1]) == "n"


def test_relay_death_moves_the_volunteer_and_the_session_fails_over(world: World, reference) -> None:
    prompt, expected = reference
    n = world.servers["n"]
    proc = world.user(prompt, ["a", "c"], pause_at=3)
    paused = read_json_line(proc, 120)
    assert world.name_of(paused["hops"][-1]) == "n"
    # The relay to kill: the first hop's server (a or c, both relays of n: b has left), so the session surely
    # fails over there, and n's circuit through it (if the user's connection to n took it) breaks too.
    relay = world.name_of(paused["hops"][0])
    before = n.status()["relays"]
    assert world.servers[relay].peer_id in before, (relay, before)
    world.servers[relay].kill()
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    result = finish(proc)
    assert result["tokens"] == expected
    assert result["failovers"] >= 1
    assert world.name_of(result["hops"][-1]) == "n"
    dead = world.servers[relay].peer_id
    seen: list[list[str]] = []

    def moved() -> bool:
        seen.append(n.status().get("relays") or [])
        return bool(seen[-1]) and dead not in seen[-1]

    deadline = time.monotonic() + 45
    while not moved() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert moved(), (n.status().get("relays"), n.log_tail())
    if len(before) > 1:  # another relay held a slot all along: n announced it without a gap
        assert all(seen), seen
    assert n.log_path.read_text().count("not reachable from outside: serving through relay") >= 2  # it said so


def test_volunteer_serves_directly_once_its_port_is_forwarded(world: World, reference) -> None:
    prompt, expected = reference
    n = world.servers["n"]
    world.lab.forward_port(world.addrs["n_ns"], PORT)  # the volunteer opens its port: the next re-check sees it

    def direct() -> bool:
        status = n.status()
        return status.get("state") == "online" and status.get("relayed") is False

    deadline = time.monotonic() + 90
    while not direct() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert direct(), (n.status(), n.log_tail())
    status = n.status()
    assert not status["relays"]
    assert any(f"/ip4/{world.addrs['n_router_ip']}/tcp/{PORT}/" in m for m in status["maddrs"]), status["maddrs"]
    assert "peers can dial this server directly now" in n.log_path.read_text()  # said, without a restart
    assert n.alive()
    alive = [name for name in ("a", "c") if world.servers[name].alive()]
    result = finish(world.user(prompt, alive))
    assert result["tokens"] == expected
    assert world.name_of(result["hops"][-1]) == "n"


def test_a_volunteer_whose_port_is_forwarded_before_it_starts_announces_the_router(world: World) -> None:
    m_ns, _, m_router_ip = world.lab.add_home("m")
    world.lab.forward_port(m_ns, PORT)  # opened before the server starts: its first check finds it
    peers = [name for name in ("a", "b", "c") if world.servers[name].alive()]
    m = world.start("m", m_ns, "", "3:6", peers, "--port", str(PORT))
    status = m.status()
    assert status.get("relayed") is False, (status, m.log_tail())
    assert any(f"/ip4/{m_router_ip}/tcp/{PORT}/" in maddr for maddr in status["maddrs"]), status["maddrs"]
    assert "which it did not announce: restarting its p2p daemon" in m.log_path.read_text()
