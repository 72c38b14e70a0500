"""What a peer and the central server both do first: open the session they take part in."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedtorrent.net import torrent as torrents
from fedtorrent.net.identity import PeerIdentity, UpdateVerifier, load_or_create_identity
from fedtorrent.net.torrent import Session, Torrent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Joined:
    """A verified torrent, its initial state, this process's identity and update checks."""

    torrent: Torrent
    identity: PeerIdentity
    rounds: int
    """Rounds to run: the override, else the session's."""
    verifier: UpdateVerifier
    initial: dict[str, torch.Tensor] = field(repr=False)

    @property
    def session(self) -> Session:
        """The torrent's session."""
        return self.torrent.session


def join(
    torrent: Path | str,
    *,
    state_path: Path | None,
    key_dir: Path,
    rounds: int | None,
    role: str,
) -> Joined:
    """Load and verify ``torrent`` and its initial state; load or create the identity.

    ``role`` names this process in the warning given when its key is not in a closed swarm's
    allow-list (``"this peer's"``, ``"the server's"``).

    Raises:
        TorrentError: the torrent or its initial state does not verify.
    """
    loaded = torrents.load_torrent(torrent)
    session = loaded.session
    identity = load_or_create_identity(key_dir)
    if session.allow_keys and identity.public_key_hex not in session.allow_keys:
        log.warning("%s key %s is not in the closed swarm's allow-list: the others will refuse it",
                    role, identity.public_key_hex)  # fmt: skip
    total = rounds or session.rounds
    initial = torrents.load_initial_state(loaded, state_path or torrents.state_path_for(torrent))
    return Joined(
        torrent=loaded,
        identity=identity,
        rounds=total,
        verifier=UpdateVerifier(info_hash=loaded.info_hash, last_round=max(total, session.rounds)),
        initial=initial,
    )
