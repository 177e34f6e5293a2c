"""Errors raised by Corolla. Every message says what happened and what to do next."""

from __future__ import annotations

from collections.abc import Sequence


class CorollaError(Exception):
    """Base class of every error Corolla raises on purpose."""


def install_hint(extra: str) -> str:
    """The command that installs one of Corolla's extras, as the README installs them."""
    return f'pip install -c constraints.txt -e ".[{extra}]"'


def missing_extra(what: str, extra: str, missing: str | None) -> str:
    """One line for a missing optional dependency: ``WHAT needs the EXTRA extra: pip install ... (X is missing)``."""
    package = missing.split(".")[0] if missing else "a dependency"  # langchain_core, not langchain_core.prompts
    return f"{what} needs the {extra} extra: {install_hint(extra)} ({package} is missing)"


def format_blocks(blocks: Sequence[int]) -> str:
    """Render block indices as compact ranges: ``[0, 1, 2, 5]`` → ``"0:3, 5"`` (end-exclusive)."""
    spans: list[str] = []
    ordered = sorted(set(blocks))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        spans.append(f"{ordered[i]}:{ordered[j] + 1}" if j > i else str(ordered[i]))
        i = j + 1
    return ", ".join(spans)


class MissingBlocksError(CorollaError):
    """No server in the swarm currently hosts some blocks of the model.

    Attributes:
        model: The name the swarm knows the model by (its DHT prefix).
        blocks: The missing block indices, sorted.
        source: The folder or repo id the client was built from (what the hint tells to serve), if known.
    """

    def __init__(self, model: str, blocks: Sequence[int], source: str | None = None) -> None:
        self.model = model
        self.blocks = sorted(set(blocks))
        self.source = source
        ranges = format_blocks(self.blocks)
        first = self.blocks[0]
        last = self.blocks[-1] + 1
        super().__init__(
            f"No server in the swarm hosts block(s) {ranges} of {model}. "
            f"Serve them with `corolla server {source or model} --blocks {first}:{last} --initial-peers ...`, "
            "or wait for a volunteer to come back and try again."
        )

    def with_source(self, source: str | None) -> MissingBlocksError:
        """The same error whose hint names ``source`` (the model path the user gave)."""
        return MissingBlocksError(self.model, self.blocks, source or self.source)

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return type(self), (self.model, self.blocks, self.source)


def short_peer(peer_id: str) -> str:
    """A peer id as people read it in logs and messages: ``…`` and its last six characters."""
    return "…" + peer_id[-6:] if len(peer_id) > 12 else peer_id


class NoRouteError(MissingBlocksError):
    """Servers announce the blocks, but every one of them is being avoided after failing.

    ``blocks`` are the blocks no usable server covers and ``avoided`` the full peer ids of the servers
    that announce them. A subclass of :class:`MissingBlocksError`, so ``except MissingBlocksError``
    also catches "no usable server right now".
    """

    def __init__(self, model: str, blocks: Sequence[int], avoided: Sequence[str], source: str | None = None) -> None:
        self.model = model
        self.blocks = sorted(set(blocks))
        self.avoided = tuple(sorted(set(avoided)))
        self.source = source
        CorollaError.__init__(
            self,
            f"Every server of block(s) {format_blocks(self.blocks)} of {model} failed recently "
            f"({', '.join(short_peer(p) for p in self.avoided)}). Try again in a minute, or serve them with "
            f"`corolla server {source or model} --blocks {self.blocks[0]}:{self.blocks[-1] + 1} --initial-peers ...`.",
        )

    def with_source(self, source: str | None) -> NoRouteError:
        """The same error whose hint names ``source`` (the model path the user gave)."""
        return NoRouteError(self.model, self.blocks, self.avoided, source or self.source)

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return type(self), (self.model, self.blocks, self.avoided, self.source)


class PeerError(CorollaError):
    """An error that concerns one peer. ``peer_id`` holds its full id (None when raised by the server
    itself, before a client knows which peer it was): code that must find the culprit reads this field,
    never the message."""

    def __init__(self, message: str = "", *, peer_id: str | None = None) -> None:
        self.peer_id = peer_id
        super().__init__(message)


class PeerUnavailableError(PeerError):
    """A server did not answer in time or closed the connection."""

    def __init__(self, peer_id: str, reason: str) -> None:
        self.reason = reason
        super().__init__(f"Server {short_peer(peer_id)} is unavailable: {reason}", peer_id=peer_id)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.peer_id or "", self.reason)


class CacheFullError(PeerError):
    """A server has no room left in its attention-cache budget for a new session."""


class ProtocolError(PeerError):
    """A peer sent a message that does not follow the protocol (bad bytes, shapes, dtypes, sizes)."""


class SessionClosedError(PeerError):
    """An inference session was used after it was closed, or its server forgot it."""


class PrivateSwarmError(PeerError):
    """The swarm (or a server) is private and this peer does not hold its swarm key, or its proof failed."""


class OutputRetracted(CorollaError):
    """An audit caught a server lying: the session's outputs from ``position`` on were untrue and are dropped.

    The session has already rewound to ``position`` (every earlier position is audited) and moved off the
    liar. Whoever sampled tokens from outputs at ``position`` or later must drop them and feed the session
    again from there (the token loop of ``generate`` and ``stream_text`` does).
    """

    def __init__(self, position: int, liars: tuple[str, ...]) -> None:
        super().__init__(
            f"an audit caught {', '.join(short_peer(p) for p in liars) or 'a server'} lying: outputs from position "
            f"{position} on were dropped; the session has rewound there, feed it again from that position"
        )
        self.position = position
        self.liars = liars


class InitialPeerError(CorollaError):
    """An initial peer address is malformed, or no initial peer could be reached.

    Attributes:
        peers: The addresses concerned, as given.
    """

    def __init__(self, message: str, peers: Sequence[str]) -> None:
        self.peers = tuple(peers)
        super().__init__(message)


class HubAccessError(CorollaError):
    """The Hugging Face Hub refused or could not serve a model's files."""


class NotLoggedInError(HubAccessError):
    """The repo needs a Hugging Face token and none was given (HTTP 401)."""


class AccessNotGrantedError(HubAccessError):
    """A token was given but its account has not been granted access to a gated repo (HTTP 403)."""


class ModelNotFoundError(HubAccessError):
    """No such repo on the Hub, or it is private and the token cannot see it (HTTP 404)."""


class OfflineNotCachedError(HubAccessError):
    """Offline mode (HF_HUB_OFFLINE=1) is on and the model is not in the local cache."""
