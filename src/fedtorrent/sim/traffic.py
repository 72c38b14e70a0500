"""What a simulated round would move on the wire: the bytes real peers exchange for it.

Every round each node fetches every member of its cohort once. What it is sent follows the wire
(``net.transport``, ``node.compressed``): without compression, the member's whole state; with
compression, the member's compressed updates since the copy of it the node holds (the updates of
``lag`` rounds when the node last synced ``lag <= HISTORY`` rounds ago; everyone holds the initial
state as round 0), else the member's whole public copy. Headers are the real encoded sizes of a
signed state and of a request. Privacy noise and attacks change values, not sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtorrent.net import wire
from fedtorrent.node.compressed import HISTORY
from fedtorrent.state.compress import Compression, packet_bytes

Tensor = torch.Tensor


def state_header_bytes(*, codec: str | None, num_nodes: int) -> int:
    """The encoded size of a signed state header (a sender id of ``peer-<N-1>``)."""
    # Lazy: the identity module's signing and ZeroMQ imports cost the simulator 50 ms.
    from fedtorrent.net.identity import NONCE_BYTES  # noqa: PLC0415

    frames = wire.encode_message(
        b"",
        info_hash="0" * 64,
        sender=f"peer-{num_nodes - 1}",
        round=1,
        num_examples=2**20,
        sig=bytes(64),
        nonce=bytes(NONCE_BYTES),
        pubkey=bytes(32),
        codec=codec,
        base=0 if codec is not None else None,
    )
    return len(frames[0])


def request_bytes(*, num_nodes: int, base: bool) -> int:
    """The encoded size of a request (with a base when compressed)."""
    frames = wire.encode_request(
        info_hash="0" * 64, sender=f"peer-{num_nodes - 1}", round=1, base=0 if base else None
    )
    return len(frames[0])


@dataclass
class Traffic:
    """Bytes received per node, summed over rounds, for a run's cohorts.

    Args:
        num_nodes: N.
        num_values: P, the length of a shared vector.
        full_bytes: the size of one whole encoded state (``len(encode_state(...))``).
        compression: the session's codec.
    """

    num_nodes: int
    num_values: int
    full_bytes: int
    compression: Compression

    def __post_init__(self) -> None:
        n = self.num_nodes
        codec = None if self.compression.is_none else str(self.compression)
        self._full = self.full_bytes + state_header_bytes(codec=None, num_nodes=n)
        self._update = packet_bytes(self.compression, self.num_values) if codec is not None else 0
        self._update_header = state_header_bytes(codec=codec, num_nodes=n) if codec else 0
        self._request = request_bytes(num_nodes=n, base=codec is not None)
        self.holds = torch.zeros(n, n, dtype=torch.long)
        """``holds[i, j]``: the round of j's public copy node i holds (0: the initial state)."""
        self.received = torch.zeros(n, dtype=torch.long)
        """Bytes each node received (headers included), all rounds."""
        self.sent = torch.zeros(n, dtype=torch.long)
        """Bytes each node sent (its states and its requests), all rounds."""
        self.received_per_round: list[int] = []
        """Bytes all nodes received in each recorded round (headers and requests included)."""
        self.fetches = 0
        self.full_fetches = 0

    def record(self, cohorts: Tensor, round_index: int) -> None:
        """Count round ``round_index`` (0-based): node i fetched every j with ``cohorts[i, j]``."""
        n = self.num_nodes
        edges = cohorts.to(torch.bool) & ~torch.eye(n, dtype=torch.bool)
        rows, cols = edges.nonzero().unbind(1)
        current = round_index + 1
        if self._update:
            lag = current - self.holds[rows, cols]
            chained = (lag >= 1) & (lag <= HISTORY)
            size = torch.where(chained, lag * self._update + self._update_header, self._full)
            self.full_fetches += int((~chained).sum())
        else:
            size = torch.full_like(rows, self._full)
            self.full_fetches += int(rows.numel())
        self.fetches += int(rows.numel())
        self.holds[rows, cols] = current
        self.received.index_add_(0, rows, size)
        self.sent.index_add_(0, cols, size)
        self.received.index_add_(0, cols, torch.full_like(cols, self._request))
        self.sent.index_add_(0, rows, torch.full_like(rows, self._request))
        self.received_per_round.append(int(size.sum()) + int(rows.numel()) * self._request)

    def summary(self, rounds: int) -> dict[str, float | int | str | list[int]]:
        """Totals and per peer-round means (bytes), JSON-ready.

        ``received_per_round`` lists what all nodes received round by round (it sums to
        ``p2p_bytes``): the byte axis of an accuracy-against-bytes curve.
        """
        peer_rounds = max(1, self.num_nodes * rounds)
        return {
            "compression": str(self.compression),
            "p2p_bytes": int(self.received.sum()),
            "bytes_received_per_peer_round": float(self.received.sum()) / peer_rounds,
            "full_state_bytes": self._full,
            "update_bytes": self._update + self._update_header if self._update else 0,
            "fetches": self.fetches,
            "full_fetches": self.full_fetches,
            "central_server_bytes": 2 * self.num_nodes * rounds * self._full,
            "received_per_round": list(self.received_per_round),
        }
