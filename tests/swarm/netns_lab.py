"""Network namespaces made by a test: public hosts on one bridge, hosts behind a masquerading NAT router.

``Lab`` owns everything it makes: namespaces (named with this process's id), the veth pairs and bridge in
them, and every process it starts (``ip netns exec NS ...``, each in a session of its own). ``close()``
stops the processes by process group and deletes the namespaces, whatever state the test left.

Addresses exist only inside these namespaces: the "public" network is 11.26.0.0/24 (a public range, so
libp2p treats these hosts as dialable from anywhere and their relay circuits as usable; no packet ever
leaves the namespaces), the home networks are 192.168.X.0/24 behind a router that masquerades with nft
and forwards no port.

``Lab(wan_delay_ms=25)`` adds a one-way delay to every packet between hosts of the public network (every WAN
leg; not the home LANs): the public namespace then routes instead of bridging, through a TUN device whose
packets a userspace process (wan_delay.py) holds for the delay, so every host still sees its peers' real
addresses (this kernel has no netem). :meth:`Lab.set_wan_delay` changes it while the lab runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WAN = "11.26.0"  # the public network's /24
DELAYER = str(Path(__file__).with_name("wan_delay.py"))
ROUTED = "100"  # the public namespace's routing table for packets the delayer gives back


def why_no_namespaces() -> str | None:
    """Why this machine cannot run the lab (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    probe = f"cprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Lab:
    """Namespaces, links and processes of one test module (see the module docstring)."""

    made = 0

    def __init__(self, wan_delay_ms: float | None = None) -> None:
        Lab.made += 1  # two labs of one process get different names
        self.tag = f"c{os.getpid() % 100000}{Lab.made % 10}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.hosts = 0
        self.homes = 0
        self.routers: dict[str, tuple[str, str, str]] = {}  # home host's namespace → (router's, its WAN port, host ip)
        self.wan = self._namespace("w")
        self.delayer: subprocess.Popen[str] | None = None
        if wan_delay_ms is None:
            self._ip("-n", self.wan, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.wan, "link", "set", "br0", "up")
        else:
            self._start_delayer(wan_delay_ms)

    # ---- topology ---------------------------------------------------------------------------------------
    def _ip(self, *args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def _in(self, ns: str, *args: str, stdin: str | None = None) -> None:
        done = subprocess.run(["ip", "netns", "exec", ns, *args], input=stdin, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} in {ns}: {done.stderr.strip()}")

    def _namespace(self, name: str) -> str:
        ns = f"{self.tag}{name}"
        self._ip("netns", "add", ns)
        self.namespaces.append(ns)
        self._ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def _sysctl(self, ns: str, key: str, value: str) -> None:
        self._in(ns, "sh", "-c", f"echo {value} > /proc/sys/{key.replace('.', '/')}")

    def _start_delayer(self, delay_ms: float) -> None:
        """Route the public network through a delaying TUN device (see the module docstring)."""
        tun = f"{self.tag}d"
        self._sysctl(self.wan, "net.ipv4.ip_forward", "1")
        for conf in ("all", "default"):
            self._sysctl(self.wan, f"net.ipv4.conf.{conf}.rp_filter", "0")
        self.delayer = self.popen(
            self.wan,
            [sys.executable, DELAYER, tun, str(delay_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.delayer.stdout is not None
        if self.delayer.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the WAN delayer did not start (exit code {self.delayer.poll()})")
        self._ip("-n", self.wan, "addr", "add", f"{WAN}.254/32", "dev", "lo")  # a source for its ARP queries
        self._ip("-n", self.wan, "link", "set", tun, "up")
        self._ip("-n", self.wan, "route", "add", f"{WAN}.0/24", "dev", tun)  # every packet between hosts
        self._ip("-n", self.wan, "rule", "add", "iif", tun, "lookup", ROUTED)  # ... then on to its host

    def set_wan_delay(self, delay_ms: float) -> None:
        """Change the one-way WAN delay (a lab made with one) for packets sent from now on."""
        if self.delayer is None or self.delayer.stdin is None:
            raise RuntimeError("this lab was made without a WAN delay: Lab(wan_delay_ms=...)")
        self.delayer.stdin.write(f"{delay_ms}\n")
        self.delayer.stdin.flush()

    def _wan_port(self, ns: str, short: str, ip: str) -> str:
        """A veth from ``ns`` to the public network for ``ip``; returns its name inside ``ns`` (no address yet)."""
        outer, inner = f"{self.tag}{short}o", f"{self.tag}{short}i"
        self._ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        self._ip("link", "set", outer, "netns", self.wan)
        self._ip("link", "set", inner, "netns", ns)
        if self.delayer is None:
            self._ip("-n", self.wan, "link", "set", outer, "master", "br0", "up")
        else:  # routed: answer the host's ARP queries for the others, and bring their packets to it
            self._sysctl(self.wan, f"net.ipv4.conf.{outer}.proxy_arp", "1")
            self._sysctl(self.wan, f"net.ipv4.conf.{outer}.rp_filter", "0")
            self._ip("-n", self.wan, "link", "set", outer, "up")
            self._ip("-n", self.wan, "route", "add", f"{ip}/32", "dev", outer, "table", ROUTED)
        self._ip("-n", ns, "link", "set", inner, "up")
        return inner

    def add_public(self, name: str) -> tuple[str, str]:
        """A host with a public address on the bridge: ``(namespace, ip)``."""
        self.hosts += 1
        ip = f"{WAN}.{self.hosts}"
        ns = self._namespace(name)
        self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", self._wan_port(ns, name, ip))
        return ns, ip

    def add_home(self, name: str) -> tuple[str, str, str]:
        """A host behind its own masquerading router, no port forwarded: ``(namespace, lan ip, router's public ip)``."""
        self.homes += 1
        self.hosts += 1
        router_ip = f"{WAN}.{self.hosts}"
        router = self._namespace(f"{name}r")
        wan_dev = self._wan_port(router, f"{name}r", router_ip)
        self._ip("-n", router, "addr", "add", f"{router_ip}/24", "dev", wan_dev)
        host = self._namespace(name)
        lan_router, lan_host = f"{self.tag}{name}l", f"{self.tag}{name}h"
        self._ip("link", "add", lan_router, "type", "veth", "peer", "name", lan_host)
        self._ip("link", "set", lan_router, "netns", router)
        self._ip("link", "set", lan_host, "netns", host)
        lan = f"192.168.{self.homes}"
        self._ip("-n", router, "addr", "add", f"{lan}.1/24", "dev", lan_router)
        self._ip("-n", router, "link", "set", lan_router, "up")
        self._ip("-n", host, "addr", "add", f"{lan}.2/24", "dev", lan_host)
        self._ip("-n", host, "link", "set", lan_host, "up")
        self._ip("-n", host, "route", "add", "default", "via", f"{lan}.1")
        self._in(router, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
        rules = (
            "table ip corolla_nat {\n"
            "  chain postrouting { type nat hook postrouting priority srcnat; "
            f'oifname "{wan_dev}" masquerade; }}\n'
            "}\n"
        )
        self._in(router, "nft", "-f", "-", stdin=rules)
        self.routers[host] = (router, wan_dev, f"{lan}.2")
        return host, f"{lan}.2", router_ip

    def forward_port(self, host: str, port: int) -> None:
        """Forward TCP ``port`` of home host ``host``'s router to it, as a volunteer opening a port would."""
        router, wan_dev, lan_ip = self.routers[host]
        rules = (
            "table ip corolla_nat {\n"
            "  chain prerouting { type nat hook prerouting priority dstnat; "
            f'iifname "{wan_dev}" tcp dport {port} dnat to {lan_ip}:{port}; }}\n'
            "}\n"
        )
        self._in(router, "nft", "-f", "-", stdin=rules)

    # ---- processes --------------------------------------------------------------------------------------
    def launcher(self, ns: str) -> list[str]:
        """The command prefix that runs a program inside ``ns``."""
        return ["ip", "netns", "exec", ns]

    def popen(self, ns: str, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``args`` inside ``ns`` in a session of its own; stopped by :meth:`close`."""
        proc = subprocess.Popen([*self.launcher(ns), *args], start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def adopt(self, proc: subprocess.Popen[Any]) -> None:
        """Stop ``proc`` (started elsewhere, in its own session) with the lab's own."""
        self.procs.append(proc)

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL to its group) and delete every namespace."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()


def read_json_line(proc: subprocess.Popen[Any], timeout: float) -> dict[str, Any]:
    """The next JSON line a process prints (other lines skipped); raises TimeoutError or EOFError."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no JSON line from process {proc.pid} in {timeout:.0f} s")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            raise EOFError(f"process {proc.pid} ended (exit code {proc.poll()}) without the expected line")
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
