"""A peer's compressed updates: its public copy as a sender, and the copies it holds of others.

With ``compression`` in the torrent (``state.compress``), what a peer shares is its **public
copy** ``hat`` (CHOCO-SGD's, Koloskova et al. 2019): every round it compresses the change of what
it would share against ``hat``, adds the decoded change to ``hat`` and serves, signed:

- to a requester holding its copy of round ``b`` (the request's ``base``; everyone holds round 0,
  the torrent's initial state), the updates of rounds ``b + 1 .. r`` (at most :data:`HISTORY`),
  a small container (:func:`encode_updates`);
- to anyone else, ``hat`` itself as a whole state (a plain reply, no ``codec``).

A receiver keeps one copy per sender (:class:`Replicas`), applies the updates in order and mixes
that copy; the error the compression made stays in the sender's residual ``x - hat`` and is sent
in later rounds, so nothing is lost over rounds. The copy is saved in the peer's checkpoint, so
the residual survives ``--resume``; after a restart a sender still offers updates only from bases
it published after it, since a round may have been published before the crash but not saved.
Integer (exact) keys travel whole in every reply.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from fedtorrent.errors import StateError
from fedtorrent.net import wire
from fedtorrent.state.codec import check_state_like, encode_state
from fedtorrent.state.compress import Compression, PublicCopy, decode_packet, encode_packet
from fedtorrent.state.flat import flatten, unflatten
from fedtorrent.state.layout import pick

if TYPE_CHECKING:
    from fedtorrent.net.transport import Reply

Tensor = torch.Tensor
State = dict[str, Tensor]

HISTORY = 4
"""Rounds of updates a sender keeps for requesters holding an older copy (the simulator's too)."""
_PACKETS, _LENGTHS = "__packets__", "__lengths__"
"""Container keys: the updates' bytes back to back, and each one's length."""


def encode_updates(updates: Sequence[bytes], exact: Mapping[str, Tensor]) -> bytes:
    """One reply's payload: the encoded updates in order and the integer keys, as safetensors."""
    joined = b"".join(updates)
    packets = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else None
    return encode_state(
        {
            **exact,
            _PACKETS: torch.zeros(0, dtype=torch.uint8) if packets is None else packets,
            _LENGTHS: torch.tensor([len(u) for u in updates], dtype=torch.int64),
        }
    )


class CompressedSender:
    """A peer's public copy and its last :data:`HISTORY` encoded updates.

    Args:
        spec: the session's compression.
        initial: ``(P,)`` the initial mix vector (what every receiver holds as round 0).
        min_base: the oldest base round updates may be served from (after a restart: past any
            round published before it).
    """

    def __init__(self, spec: Compression, initial: Tensor, *, min_base: int = 0) -> None:
        self.spec, self.min_base = spec, min_base
        self.copy = PublicCopy(initial.detach().to(torch.float32))
        self._history: list[tuple[int, bytes]] = []

    @property
    def hat(self) -> Tensor:
        """The public copy after the last :meth:`update` (read only)."""
        return self.copy.hat

    def state_dict(self) -> State:
        """For a checkpoint: the public copy (the residual is what it lacks of the model)."""
        return self.copy.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (StateError when it does not fit)."""
        self.copy.load_state_dict(dict(state))

    def update(self, x: Tensor, round: int, *, generator: torch.Generator) -> None:
        """Round ``round``'s update of the copy towards ``x`` (kept for :meth:`updates_from`)."""
        packet = self.copy.update(x.detach().to(torch.float32), self.spec, generator=generator)
        self._history = [*self._history, (round, encode_packet(packet))][-HISTORY:]

    def updates_from(self) -> dict[int, list[bytes]]:
        """By base round ``b``: the encoded updates of rounds ``b + 1 ..`` the last one.

        The last round itself maps to no updates: a requester polling for a newer round while
        holding this copy gets a reply of a few bytes, not the copy again.
        """
        out: dict[int, list[bytes]] = {}
        if self._history and self._history[-1][0] >= self.min_base:
            out[self._history[-1][0]] = []
        for start in range(len(self._history)):
            base = self._history[start][0] - 1
            consecutive = all(r == base + 1 + i for i, (r, _) in enumerate(self._history[start:]))
            if base >= self.min_base and consecutive:
                out[base] = [data for _, data in self._history[start:]]
        return out


class Replicas:
    """The copies of other peers' public copies this peer holds, by peer id (thread-safe).

    Args:
        spec: the session's compression.
        initial: the initial state's shared keys: every sender's copy at round 0.
        mix: the keys that travel in the compressed vector (sorted, ``state.flatten`` order);
            the others (integer keys) travel whole.
        max_bytes: the most one update may take (a received payload's limit).
    """

    def __init__(
        self,
        spec: Compression,
        initial: Mapping[str, Tensor],
        *,
        mix: Sequence[str],
        max_bytes: int,
    ) -> None:
        self.spec, self.max_bytes = spec, max_bytes
        self.like = {k: v.detach().clone() for k, v in initial.items()}
        self.mix = tuple(mix)
        self._initial = flatten(pick(self.like, self.mix)).to(torch.float32)
        self._held: dict[str, tuple[int, PublicCopy]] = {}
        self._lock = threading.Lock()

    def base(self, peer_id: str) -> int:
        """The round of ``peer_id``'s copy held (0: the initial state)."""
        with self._lock:
            held = self._held.get(peer_id)
        return 0 if held is None else held[0]

    def hold(self, peer_id: str, round: int, vector: Tensor) -> None:
        """A whole public copy arrived (a plain reply): hold it as round ``round``'s."""
        with self._lock:
            self._held[peer_id] = (round, PublicCopy(vector.detach().to(torch.float32)))

    def receive(self, peer_id: str, reply: Reply) -> State:
        """The state a reply stands for, with its integer keys.

        A whole copy (a plain reply) is held from now on; compressed updates are applied to the
        copy held.

        Raises:
            MessageError: see :meth:`apply`; ``bad_shape`` for integer keys that do not fit.
        """
        if reply.header.codec is None:
            if reply.state is None:
                raise wire.reject("bad_payload", "a whole copy arrived undecoded")
            self.hold(peer_id, reply.header.round, flatten(pick(reply.state, self.mix)))
            return reply.state
        hat, exact = self.apply(peer_id, reply.header, reply.payload)
        state = {**exact, **unflatten(hat, pick(self.like, self.mix))}
        try:
            check_state_like(state, self.like)
        except StateError as exc:
            raise wire.reject("bad_shape", str(exc)) from None
        return state

    def apply(self, peer_id: str, header: wire.Header, payload: memoryview) -> tuple[Tensor, State]:
        """Apply a compressed reply; return the copy (a clone) and the reply's integer keys.

        Updates the held copy already has (a base older than the copy held) are skipped.

        Raises:
            MessageError: ``bad_compressed`` (not the session's codec, a gap before the base,
                a bad container or update), ``oversized`` or ``non_finite``.
        """
        if header.codec != str(self.spec) or header.base is None:
            raise wire.reject("bad_compressed", f"codec {header.codec!r} is not the session's")
        tensors = wire.decode_payload(payload, like_state=None)
        packets, lengths = tensors.pop(_PACKETS, None), tensors.pop(_LENGTHS, None)
        if (
            packets is None
            or lengths is None
            or packets.dtype != torch.uint8
            or lengths.dtype != torch.int64
            or packets.ndim != 1
            or lengths.ndim != 1
            or int(lengths.numel()) != header.round - header.base
            or bool((lengths <= 0).any())
            or int(lengths.sum()) != int(packets.numel())
        ):
            raise wire.reject("bad_compressed", "the updates' container does not add up")
        with self._lock:
            held_round, copy = self._held.get(peer_id, (0, PublicCopy(self._initial)))
        if header.base > held_round:
            raise wire.reject(
                "bad_compressed", f"updates from round {header.base}, held {held_round}"
            )
        raw = packets.numpy().tobytes()
        updated = PublicCopy(copy.hat.clone())
        offset, round = 0, header.base
        for length in lengths.tolist():
            chunk, offset, round = raw[offset : offset + length], offset + length, round + 1
            if round <= held_round:
                continue
            updated.apply(
                decode_packet(
                    chunk, spec=self.spec, num_values=int(self._initial.numel()),
                    max_bytes=self.max_bytes,
                )
            )  # fmt: skip
        with self._lock:
            self._held[peer_id] = (header.round, updated)
        return updated.hat.clone(), tensors
