"""One real peer: the composition root that wires torrent, data, model, tracker and transport.

A round ``r`` (1-based) is:

1. **train** the current model on the local shard (``train_local``);
2. **publish** the trained state (through the send hook) with header round ``r``, so peers that
   ask get what the simulator would hand them: the round's trained parameters, before mixing;
3. **announce** to the tracker (round done so far, accuracy, bytes), asking for several times
   the cohort; the neighbour book (``node.neighbours``) picks the cohort and a reserve from its
   sample, preferring neighbours that answered before and skipping backed-off ones, and
   ``node.skipping`` leaves out members learned trust shut out (``skip_below``); when the
   tracker is down the client's cached answer keeps the peer going;
4. **exchange**: pull the cohort's states concurrently until the exchange deadline, waiting (by
   polling with backoff) for neighbours still behind round ``r``; a stale state is used when the
   fresh one does not come in time, a bad one is rejected and counted (no barrier anywhere);
5. **mix** own trained vector (row 0) with what arrived, by the session's rule, with the
   simulator's code (``mixing.rules``, ``mixing.trust``); learned trust is renormalised over the
   peers actually heard from;
6. **evaluate** on the validation split and the test set, **record** one JSON line,
   **checkpoint** atomically and rewrite ``status.json``.

Nothing starts in the constructor: ``start`` loads and binds, ``run`` runs the rounds, ``close``
says goodbye to the tracker and closes the socket. ``request_stop`` (from a signal handler) ends
``run`` at the next phase boundary; the exchange wakes up at once.

Security (``docs/privacy.md``): the peer's persistent identity (``--key-dir``) keys its CurveZMQ
links and signs every state it publishes (once per round); its public key goes to the tracker,
and it dials only peers that announced a key (and, in a closed swarm, whose key the torrent's
allow-list holds), so every link is encrypted and authenticated. Replies are verified against
the sender's announced key and a replay guard (``UpdateVerifier``) before anything else looks at
them. Every state served and every state mixed goes into the peer's signed, hash-chained ledger
(``<out>/<peer>.ledger.sqlite``).

Privacy and attacks: a session with ``privacy`` clips and noises what the peer shares
(:class:`PrivateSender`: once per round, the same state to every receiver, epsilon recorded each
round); the privacy state is checkpointed each round and restored by ``--resume``, and with
``PeerConfig.dp_max_epsilon`` the peer ends (state ``done``, ``stopped == "privacy_budget"``)
before a round that would spend more. ``PeerConfig.attack`` makes the peer an adversary for
experiments (``adversary.py``).
Own row 0 always stays the true state. Further hooks: ``send_hook(state, round)`` returns what to
share (after privacy and attack), ``receive_hook(reply)`` raises ``MessageError`` to reject a reply
after the wire and signature checks passed.

This module keeps the wiring and the round; the parts live beside it: ``node.data`` (the peer's
examples), ``node.exchange`` (cohort selection, pulls with deadlines and verification) and
``node.report`` (records, ledger entries, status and summary files, drawn from
:meth:`Peer.snapshot`). None of them imports this module.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import queue
import secrets
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import torch
from torch import nn

from fedtorrent.adversary import AttackConfig, attack_params, flip_labels
from fedtorrent.config import MixingConfig
from fedtorrent.device import resolve_device
from fedtorrent.errors import (
    ConfigError,
    DataError,
    PrivacyError,
    StateError,
)
from fedtorrent.ledger import Ledger
from fedtorrent.metrics.records import write_json
from fedtorrent.mixing.round import (
    VALIDATED_RULES,
    Cohorts,
    PrivateTrust,
    Trust,
    mix_round,
    validation_rows,
)
from fedtorrent.mixing.trust import (
    Release,
    TrustLearner,
    model_example_loss_fn,
    model_loss_fn,
    planned_trust_releases,
    private_trust,
)
from fedtorrent.models import build_model
from fedtorrent.net.identity import (
    PeerIdentity,
    curve_public_key,
    signed_state,
)
from fedtorrent.net.torrent import Session
from fedtorrent.net.tracker.client import PeerAddress, TrackerAnswer, TrackerClient
from fedtorrent.net.tracker.registry import PEER_ID
from fedtorrent.net.transport import (
    Endpoint,
    Reply,
    ServedEvent,
    Transport,
    TransportConfig,
    ZmqTransport,
    child_thread_name,
)
from fedtorrent.node.catchup import JOIN_SOURCES, catch_up
from fedtorrent.node.central import CENTRAL_ID
from fedtorrent.node.checkpoint import MODEL_FILE, Checkpoint, load_checkpoint, save_checkpoint
from fedtorrent.node.churn import JOINED_FILE
from fedtorrent.node.compressed import CompressedSender, Replicas, encode_updates
from fedtorrent.node.data import PeerData, load_peer_data, load_task_data, read_examples, task_node
from fedtorrent.node.deadline import DeadlinePolicy, DeadlineSettings
from fedtorrent.node.exchange import (
    POLL_FIRST_S,
    POLL_MAX_S,
    Addressing,
    Announcer,
    Exchange,
    Fetcher,
    ReceiveHook,
    Selection,
    TcpAddressing,
    select_cohort,
)
from fedtorrent.node.hello import Introductions, introduce
from fedtorrent.node.joining import join
from fedtorrent.node.neighbours import Candidate, NeighbourBook, TrustChoice
from fedtorrent.node.report import (
    METRIC_FIELDS,
    NeighbourCounts,
    PeerSnapshot,
    last_accuracy,
    log_mixed,
    log_served,
    open_ledger,
    open_records,
    summary,
    traffic_totals,
    weight_given,
    weights_by_peer,
    write_status,
)
from fedtorrent.node.skipping import LowTrustSkipper
from fedtorrent.node.tracking import TrackerLink
from fedtorrent.privacy.dp_sgd import ExamplePrivacy, check_private_model
from fedtorrent.privacy.sender import PrivateSender
from fedtorrent.state import encode_state, flatten, unflatten
from fedtorrent.state.codec import check_state_like
from fedtorrent.state.compress import Compression
from fedtorrent.state.layout import StateLayout, pick
from fedtorrent.state.schema import check_schema, state_schema
from fedtorrent.task import Task, check_task, load_task
from fedtorrent.task.drive import evaluate_task, train_task
from fedtorrent.training import evaluate, round_lr_scale, train_local
from fedtorrent.training.evaluate import Metrics
from fedtorrent.training.seeds import Stream, derive_seed, node_generator

__all__ = [
    "METRIC_FIELDS",
    "Addressing",
    "Announcer",
    "Exchange",
    "Peer",
    "PeerConfig",
    "PeerData",
    "ReceiveHook",
    "SendHook",
    "TcpAddressing",
    "derive_seed",
    "load_peer_data",
    "read_examples",
    "weight_given",
]

log = logging.getLogger(__name__)
Releases = tuple[Release, ...]
"""What a round's private trust fit released (``Mixed.releases`` of this peer)."""
State = dict[str, torch.Tensor]
SendHook = Callable[[State, int], State]
"""``(trained state, round) -> state to share``; privacy noise or signing prepare it here."""

STATES = ("starting", "running", "done", "stopped", "failed")
QUIET_S = 0.5
"""After its last round a peer keeps serving until nobody asked for this long (see _linger)."""


@dataclass(frozen=True)
class PeerConfig:
    """Everything one peer process is told on its command line; validated on construction.

    Data comes either from the session's dataset (``node_index`` of ``num_nodes`` shards, split by
    the torrent's data settings so that every peer computes the same split) or from ``examples``:
    a folder with ``x.npy`` (float32 or uint8, ``N, C, H, W``) and ``y.npy`` (integer labels), and
    optionally ``x_test.npy`` / ``y_test.npy`` (else the dataset's test set is used).

    A task session (``fedtorrent create --task``) needs ``task``, the spec of the user's task
    (``PATH.py:NAME`` or ``package.module:NAME``), or a ``Task`` object given to :class:`Peer`,
    and takes its data from the task's ``data(node_index, num_nodes)``; both may be left out (the
    task gets ``(0, 1)``) by a peer whose ``data`` ignores them. ``examples`` does not go with
    ``task``; a built-in session needs ``node_index`` with ``num_nodes``, or ``examples``.
    """

    torrent: Path
    out_dir: Path
    state_path: Path | None = None
    """The torrent's initial state; default beside the torrent (``state_path_for``)."""
    data_dir: Path | None = None
    node_index: int | None = None
    num_nodes: int | None = None
    examples: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port."""
    advertise_ip: str | None = None
    """The address peers should dial (sent to the tracker); default: what the tracker sees."""
    peer_id: str | None = None
    tracker: str | None = None
    """Tracker URL; default the torrent's ``announce``."""
    resume: bool = False
    join: bool = False
    """Join a swarm already under way: without a checkpoint to resume, start from the state
    neighbours hold now, checked like any update (``node.catchup``), and go on from the round
    after theirs instead of round 1."""
    exchange_timeout: float = 10.0
    """Seconds a round waits for its cohort at most: the cap of the adaptive deadline
    (``node.deadline``), and the deadline of the first rounds."""
    adaptive_deadline: bool = True
    """Derive each round's deadline from measured lags (``node.deadline``); False: always wait
    ``exchange_timeout``."""
    staleness: int | None = None
    """The asynchronous mode: never wait for a neighbour; mix each one's newest state when it is
    at most this many rounds behind (``node.exchange``). None or 0: the synchronous mode."""
    slowdown: float = 1.0
    """Simulate a slow device (experiments): after training, wait ``slowdown - 1`` times the
    shortest training time this peer measured so far (its own speed, without the load of other
    processes) before publishing. 1: no slowdown."""
    seed: int | None = None
    """Seed of batch order and trust batches; default the torrent's ``train.seed``."""
    rounds: int | None = None
    """Override the torrent's round count (the session itself is unchanged)."""
    tracker_timeout: float = 3.0
    tracker_retries: int = 1
    linger: float | None = None
    """Seconds to keep serving the final state for slower neighbours; default ``exchange_timeout``
    (ends early once every peer of the last cohort has fetched it)."""
    key_dir: Path | None = None
    """Where the peer's Ed25519 identity lives (created on first use); default ``<out>/keys``."""
    attack: str | None = None
    """Make this peer an adversary (experiments only): one of ``fedtorrent.adversary.ATTACKS``."""
    attack_scale: float | None = None
    """The attack's scale (default per attack, see ``fedtorrent.adversary``)."""
    attack_from: int = 0
    """``--attack-from R``: share honestly in rounds ``1..R``, attack from round ``R + 1``."""
    task: str | None = None
    """The task spec a task session needs (``PATH.py:NAME`` or ``package.module:NAME``)."""
    device: str = "cpu"
    """Where this peer trains, mixes and evaluates: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or
    ``mps`` (``fedtorrent.device.resolve_device``). This machine's choice, not the session's:
    what is sent, checkpointed and recorded stays on the CPU."""
    central: bool = False
    """Be a client of a central FedAvg server (``fedtorrent server``, ``node.central``): each
    round fetch the server's state of the round and adopt it, instead of a cohort and a mix."""
    dp_max_epsilon: float | None = None
    """This data holder's privacy budget (at the session's delta): refuse to start a session
    without DP, or whose first round alone would spend more; end before any round that would
    take epsilon past it. None: no cap beyond the session's own noise."""

    def __post_init__(self) -> None:
        resolve_device(self.device)  # an absent device is one line before anything starts
        if self.attack is not None:
            AttackConfig(self.attack, self.attack_scale, start=self.attack_from)  # validates all
        elif self.attack_scale is not None or self.attack_from:
            raise ConfigError("an attack scale or first round needs an attack")
        sharded = self.node_index is not None or self.num_nodes is not None
        if self.task is not None and self.examples is not None:
            raise ConfigError(
                "--examples does not go with --task: the task's data gives the examples"
            )
        if sharded and self.examples is not None:  # neither: a task may own its data
            raise ConfigError("give either --node-index with --num-nodes, or --examples")
        if sharded:
            if self.node_index is None or self.num_nodes is None:
                raise ConfigError("--node-index and --num-nodes go together")
            if not 0 <= self.node_index < self.num_nodes:
                raise ConfigError(
                    f"node index must be in [0, {self.num_nodes}), got {self.node_index}"
                )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.advertise_ip is not None:
            try:
                ipaddress.ip_address(self.advertise_ip)
            except ValueError:
                raise ConfigError(f"advertise ip {self.advertise_ip!r} is not an IP") from None
        if self.peer_id is not None and not _is_peer_id(self.peer_id):
            raise ConfigError(
                f"peer id must be 1 to 64 characters from [A-Za-z0-9._-], got {self.peer_id!r}"
            )

        if self.central and self.join:
            raise ConfigError(
                "--join does not go with --central: a client adopts the server's state"
            )
        if self.central and self.peer_id == CENTRAL_ID:
            raise ConfigError(f"peer id {CENTRAL_ID!r} is the central server's")
        if self.staleness is not None and self.staleness < 0:
            raise ConfigError(f"staleness must be >= 0, got {self.staleness}")
        if self.central and self.staleness:
            raise ConfigError("--staleness does not go with --central: a client adopts the "
                              "server's average of its own round")  # fmt: skip
        if not (math.isfinite(self.slowdown) and self.slowdown >= 1):
            raise ConfigError(f"slowdown must be a finite number >= 1, got {self.slowdown}")
        for name in ("exchange_timeout", "tracker_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        if self.linger is not None and not (math.isfinite(self.linger) and self.linger >= 0):
            raise ConfigError(f"linger must be a finite number >= 0, got {self.linger}")
        if self.tracker_retries < 0:
            raise ConfigError(f"tracker retries must be >= 0, got {self.tracker_retries}")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        cap = self.dp_max_epsilon
        if cap is not None and not (math.isfinite(cap) and cap > 0):
            raise ConfigError(f"dp max epsilon must be a finite number > 0, got {cap}")


def _is_peer_id(text: str) -> bool:
    return PEER_ID.fullmatch(text) is not None


class Peer:
    """One peer of a swarm; see the module docstring for a round.

    Args:
        config: the command line.
        transport: builds the transport (not started) from its settings; tests pass one that
            makes a ``MemoryTransport``. Default a ``ZmqTransport`` bound to ``tcp://host:port``.
        tracker: the tracker (tests pass any ``Announcer``); default a ``TrackerClient`` for
            ``config.tracker`` or the torrent's ``announce``.
        addressing: how addresses map to announces and endpoints; default TCP.
        data: the peer's tensors; default :func:`load_peer_data`.
        send_hook: see the module docstring; required when the session asks for privacy.
        receive_hook: see the module docstring.
        task: the user's :class:`~fedtorrent.task.Task` for a task session, used as it is
            (nothing imported); instead of ``config.task``, the spec the command line gives.
    """

    def __init__(
        self,
        config: PeerConfig,
        *,
        transport: Callable[[TransportConfig], Transport] | None = None,
        tracker: Announcer | None = None,
        addressing: Addressing | None = None,
        data: PeerData | None = None,
        send_hook: SendHook | None = None,
        receive_hook: ReceiveHook | None = None,
        task: Task | None = None,
    ) -> None:
        if task is not None and config.task is not None:
            raise ConfigError("give the task once: PeerConfig.task (a spec) or Peer(task=...)")
        self.config = config
        self._task = task
        self._make_transport = transport
        self.tracker = TrackerLink(tracker)
        self.addressing: Addressing = addressing or TcpAddressing()
        self._data = data
        self._send_hook = send_hook
        self._receive_hook = receive_hook
        self._stop = threading.Event()
        self._started = False
        self._closed = False
        self.state = "starting"
        self.round_done = 0
        self.peer_id = ""
        self.records: list[dict[str, Any]] = []
        self._last_cohort: list[str] = []
        self._base_totals: dict[str, Any] = {}
        self._final: dict[str, Any] = {}
        self._formed = config.central  # a --central client waits for the server instead
        self._executor: ThreadPoolExecutor | None = None
        self.error: str | None = None
        self.stopped: str | None = None
        """Why a ``done`` peer ended before its last round: ``"privacy_budget"``; else None."""
        self._fastest_train = math.inf
        """Seconds of the shortest local training so far (``--slowdown`` multiplies it)."""
        self._served: queue.SimpleQueue[ServedEvent] = queue.SimpleQueue()
        self._keys: dict[str, str] = {}
        """Peer id -> the Ed25519 key (hex) it announced, as the tracker last listed it."""
        self._selection = Selection.empty()
        self.book = NeighbourBook()
        self.deadlines = DeadlinePolicy(
            DeadlineSettings(cap_s=config.exchange_timeout, adaptive=config.adaptive_deadline)
        )
        """Each round's exchange deadline from measured lags (``node.deadline``)."""
        self._candidates: dict[str, Candidate] = {}
        """Who answered, failed or lied before; picks each round's cohort (``node.neighbours``)."""
        self.ledger: Ledger | None = None
        self.hellos: Introductions | None = None
        """Peers a BitTorrent tracker listed by address, resolved by hello (``node.hello``)."""
        self._central: list[Endpoint] = []
        """``--central``: the server where it was last listed (empty before)."""

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Load and verify everything, restore a checkpoint if asked, bind, announce ``started``.

        Raises:
            TorrentError: the torrent or its initial state does not verify.
            DataError, ConfigError: the data or the settings do not fit the session.
            StateError: ``--resume`` found a checkpoint of another session or model.
            NetworkError: the port cannot be bound.
        """
        if self._started:
            raise ConfigError("peer already started")
        self._started = True
        self.out_dir = Path(self.config.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException as exc:
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            write_status(self.snapshot())
            raise

    def _start(self) -> None:
        cfg = self.config
        joined = join(
            cfg.torrent, state_path=cfg.state_path, key_dir=cfg.key_dir or self.out_dir / "keys",
            rounds=cfg.rounds, role="this peer's",
        )  # fmt: skip
        self.torrent, self.session = joined.torrent, joined.session
        self.info_hash = self.torrent.info_hash
        self.identity, self.rounds, self.verifier = joined.identity, joined.rounds, joined.verifier
        swarm_size = cfg.num_nodes or self.session.data.num_nodes
        self._expected = max(0, min(self.session.cohort_size, swarm_size - 1))
        self.seed = self.session.train.seed if cfg.seed is None else cfg.seed
        initial = joined.initial
        self.task: Task | None = self._load_task()
        if self.task is None:
            self.data = self._data or load_peer_data(
                self.session,
                node_index=cfg.node_index,
                num_nodes=cfg.num_nodes,
                examples=cfg.examples,
                data_dir=cfg.data_dir,
            )
            self.model = self._build_model()
        else:
            self.model, self.data = self._build_task(self.task)
        self.like = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        schema = self.session.task.schema if self.session.task is not None else None
        self.layout = StateLayout.from_schema(schema or state_schema(self.model))
        """Which keys are mixed, combined exactly, kept local; built-in models: all mixed."""
        try:
            check_state_like(initial, self.like)
        except StateError as exc:
            raise ConfigError(
                f"the torrent's initial state does not fit its model: {exc}"
            ) from None
        self.current: State = initial
        self.initial: State = {k: v.clone() for k, v in initial.items()}
        self.attack = self._make_attack()

        self.device = resolve_device(cfg.device)
        """Where this peer trains and evaluates; what it sends, saves and records is CPU."""
        self.model.to(self.device)
        # The training split once on the device (no copy at all on the CPU).
        self._train_xy = (self.data.x_train.to(self.device), self.data.y_train.to(self.device))
        self.private: PrivateSender | ExamplePrivacy | None = None
        privacy = self.session.privacy
        if privacy is not None and privacy.enabled:
            try:
                if privacy.example_level:  # DP-SGD in training; nothing added to what is shared
                    check_private_model(self.model)
                    self.private = ExamplePrivacy.from_config(
                        privacy,
                        self.session.train,
                        examples=len(self.data.y_train),
                        rounds=self.session.rounds,
                        noise_seed=secrets.randbits(63),  # secret, like the sender's below
                        trust=planned_trust_releases(
                            private_trust(privacy, self.session.mixing),
                            self.session.mixing,
                            count=len(self.data.y_val),
                        ),  # the trust fit reads the validation split: it is charged too
                    )
                else:
                    self.private = PrivateSender(
                        privacy,
                        rounds=self.session.rounds,
                        initial=pick(initial, self.layout.parameters),  # buffers get no noise
                        noise_seed=secrets.randbits(63),  # secret: never the session's seed
                    )
            except PrivacyError as exc:
                raise ConfigError(f"cannot apply the session's privacy settings: {exc}") from None
        self.trust = _make_trust(self.session.mixing)
        self.skipper = (
            LowTrustSkipper() if cfg.central else LowTrustSkipper.from_mixing(self.session.mixing)
        )  # trust-aware fetching (node.skipping)
        checkpoint = self._restore() if cfg.resume else None
        self._check_budget()
        self.sender, self.replicas = self._compression(initial, checkpoint)
        self.peer_id = (
            cfg.peer_id
            or (checkpoint.peer_id if checkpoint is not None else None)
            or (f"peer-{cfg.node_index}" if cfg.node_index is not None else None)
            or f"peer-{secrets.token_hex(4)}"
        )
        self._salt = (
            cfg.node_index if cfg.node_index is not None else zlib.crc32(self.peer_id.encode())
        )
        self._writer, self.records = open_records(
            self.out_dir, resume=cfg.resume, round_done=self.round_done
        )
        self.ledger = open_ledger(
            self.out_dir,
            self.identity,
            peer_id=self.peer_id,
            info_hash=self.info_hash,
            resume=cfg.resume,
        )
        allowed = self.session.allow_keys
        transport_config = TransportConfig(
            info_hash=self.info_hash,
            peer_id=self.peer_id,
            bind=f"tcp://{_bracket(cfg.host)}:{cfg.port}",
            max_payload_bytes=2 * self.session.state_size + (64 << 10),
            max_concurrent_fetches=max(1, min(32, self.session.cohort_size)),
            curve_secret_key=self.identity.curve_secret,
            curve_public_key=self.identity.curve_public,
            curve_allow=frozenset(curve_public_key(k) for k in allowed) if allowed else None,
            serve_older=not cfg.central,  # the server asks for round r: not_ready until then
        )
        if self._make_transport is None:
            self.transport: Transport = ZmqTransport(transport_config)
        else:
            self.transport = self._make_transport(transport_config)
        self.transport.on_served = self._served.put
        if self.tracker.announcer is None:
            self.tracker.announcer = TrackerClient(
                cfg.tracker or self.torrent.announce,
                timeout=cfg.tracker_timeout,
                retries=cfg.tracker_retries,
                backoff=0.2,
                max_backoff=1.0,
                identity=self.identity,  # signs announces, so only this peer can stop or move
            )
        self.transport.start()
        self._executor = ThreadPoolExecutor(
            max(1, min(32, self.session.cohort_size)), thread_name_prefix=child_thread_name("pull")
        )
        self._fetcher = Fetcher(
            transport=self.transport,
            executor=self._executor,
            like=pick(self.like, self.layout.shared),  # local keys never travel
            verifier=self.verifier,
            keys=self._keys,
            stop=self._stop,
            receive_hook=self._receive_hook,
            replicas=self.replicas,
        )
        self.address = self.transport.address
        self.port = self.addressing.port_of(self.address)
        self.hellos = introduce(
            self.transport, self.identity, info_hash=self.info_hash, peer_id=self.peer_id,
            port=self.port,
        )  # fmt: skip
        log.info(
            "peer %s of session %s listening on %s, %d training examples, rounds %d..%d",
            self.peer_id,
            self.info_hash[:16],
            self.address,
            len(self.data.y_train),
            self.round_done + 1,
            self.rounds,
        )
        write_status(self.snapshot())
        answer, _, _ = self._announce(event="started")
        if cfg.join and checkpoint is None:
            self._join(answer)

    def _join(self, answer: TrackerAnswer | None) -> None:
        """``--join``: adopt the swarm's current state and round (``node.catchup``).

        Re-announces with backoff until the tracker lists someone, then pulls up to
        ``JOIN_SOURCES`` of them, all within one exchange timeout. What it adopted goes into
        ``joined.json`` and the ledger (weight ``1/k`` for each of the ``k`` sources).
        """
        deadline = time.monotonic() + self.config.exchange_timeout
        delay = POLL_FIRST_S
        while True:
            listed = answer.peers if answer is not None else ()
            selection = select_cohort(
                listed, peer_id=self.peer_id, cohort_size=JOIN_SOURCES,
                allowed=self.session.allow_keys, addressing=self.addressing, book=self.book,
                round=1,
            )  # fmt: skip
            remaining = deadline - time.monotonic()
            if selection.cohort or remaining <= 0 or self._stop.wait(min(delay, remaining)):
                break
            delay = min(2 * delay, POLL_MAX_S)
            answer, _, _ = self._announce(event="")
        self._keys.update(selection.keys)
        exchange = self._fetcher.exchange(
            selection.cohort, round=0, deadline=deadline, skipped=selection.skipped,
            reserve=selection.reserve,
        )  # fmt: skip
        adopted = catch_up(
            exchange.replies, initial=self.initial, mix=self.layout.mix, exact=self.layout.exact,
            plausibility=self.session.mixing.plausibility,
        )  # fmt: skip
        write_json(
            self.out_dir / JOINED_FILE,
            {
                "round": adopted.round if adopted is not None else 0,
                "sources": adopted.sources if adopted is not None else {},
                "implausible": sorted(adopted.screened) if adopted is not None else [],
                "left_out": adopted.left_out if adopted is not None else {},
                "missing": exchange.missing,
                "rejected": exchange.rejected,
            },
        )
        if adopted is None:
            log.warning("--join: no neighbour's state to start from; starting from round 1")
            return
        for peer_id in adopted.screened:
            self.transport.stats.record_rejection(peer_id, "implausible")
        self.current = {**self.current, **adopted.state}
        self.round_done = adopted.round
        if self._sender is not None:  # the mean of shared (noised) states: public
            self._sender.mixed(pick(self.current, self.layout.parameters))
        if self.sender is not None:  # receivers hold no copy of ours: whole ones until then
            mix = flatten(pick(self.current, self.layout.mix))
            self.sender = CompressedSender(self.sender.spec, mix, min_base=adopted.round + 2)
        sources = list(adopted.sources)
        weights = torch.tensor([0.0, *[1.0 / len(sources)] * len(sources)])
        assert self.ledger is not None
        log_mixed(self.ledger, sources, exchange, weights, screened=adopted.screened)
        log.info("joined the swarm at round %d from %s", adopted.round, adopted.sources)
        write_status(self.snapshot())

    def run(self) -> str:
        """Run rounds until the last one or a stop request; returns the final state name.

        Training failures propagate (after ``state`` becomes ``failed``); network trouble never
        does: it shows up in the records.
        """
        if not self._started or self._closed:
            raise ConfigError("start the peer before running it")
        self.state = "running"
        write_status(self.snapshot())
        try:
            while self.round_done < self.rounds and not self._stop.is_set():
                if self._over_budget():
                    break
                self.run_round(self.round_done + 1)
            if self.round_done >= self.rounds or self.stopped is not None:
                self.state = "done"
                self._announce(event="completed")
                self._linger()
            else:
                self.state = "stopped"
        except BaseException as exc:
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            write_status(self.snapshot())
        return self.state

    def _check_budget(self) -> None:
        """Refuse to start a session ``--dp-max-epsilon`` cannot allow.

        That is a session without DP, or one whose first round alone would exceed the cap; a
        resumed peer already at its budget starts, and ``run`` ends it at once.

        Raises:
            ConfigError: one line naming the cap and what the first round would spend.
        """
        cap = self.config.dp_max_epsilon
        if cap is None:
            return
        if self.private is None:
            raise ConfigError(
                f"--dp-max-epsilon {cap}: this session shares updates without differential "
                "privacy (no dp clip in the torrent), so its epsilon is unbounded"
            )
        if self.private.accountant.rounds == 0 and (first := self.private.next_epsilon()) > cap:
            raise ConfigError(
                f"--dp-max-epsilon {cap}: the session's first round alone spends epsilon "
                f"{first:.4g} (delta {self.private.accountant.delta:g}); not starting"
            )

    def _over_budget(self) -> bool:
        """Whether the next round would take epsilon past ``--dp-max-epsilon``.

        Checked before the round trains, so nothing of it is shared; a yes is noted in
        ``stopped``.
        """
        cap = self.config.dp_max_epsilon
        if cap is None or self.private is None:
            return False
        projected = self.private.next_epsilon()
        if projected <= cap:
            return False
        self.stopped = "privacy_budget"
        log.warning(
            "stopping before round %d: it would spend epsilon %.4f, past --dp-max-epsilon %g "
            "(spent %.4f)", self.round_done + 1, projected, cap, self.private.epsilon,
        )  # fmt: skip
        return True

    def request_stop(self) -> None:
        """Ask ``run`` to return at the next phase boundary (safe from a signal handler).

        The peer is leaving: from now on it answers requests with ``error: gone``, so neighbours
        waiting for its state stop waiting at once (``Transport.leave``).
        """
        self._stop.set()
        transport: Transport | None = getattr(self, "transport", None)
        if transport is not None:
            transport.leave()

    def close(self) -> None:
        """Announce ``stopped``, stop serving, write the summary; safe to call twice."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        self._stop.set()
        if self.state in ("starting", "running"):
            self.state = "stopped"
        if hasattr(self, "transport"):  # start may have failed before any of these existed
            if self.peer_id and hasattr(self, "port"):
                self._announce(event="stopped")
            self.transport.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self.ledger is not None:
            self._log_served()  # serving has stopped: nothing more can arrive
            self.ledger.close()
        if hasattr(self, "_writer"):
            self._writer.close()
            if hasattr(self, "transport"):
                self._write_summary()
        write_status(self.snapshot())

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def _sender(self) -> PrivateSender | None:
        """The update-level DP send hook (None without it, and under example-level DP)."""
        private = getattr(self, "private", None)
        return private if isinstance(private, PrivateSender) else None

    # -- one round --------------------------------------------------------------------------

    def run_round(self, round: int) -> dict[str, Any] | None:
        """Train, publish, announce, exchange, mix, evaluate, record, checkpoint: one round.

        Returns the round's record, or None when a stop request cut the exchange short (the
        round is then abandoned and redone after ``--resume``).
        """
        began = time.perf_counter()
        rejected_before = self.transport.stats.rejections()
        timings: dict[str, float] = {}

        tick = time.perf_counter()
        before = self.current
        self.model.load_state_dict(self.current)
        generator = node_generator(self.seed, Stream.TRAIN, round - 1, self._salt)
        # Rounds count from 1 here and from 0 in the simulator; the schedule spans the session's
        # rounds (not a --rounds override), so every peer of a session uses the same rates.
        scale = round_lr_scale(self.session.round_schedule, round - 1, self.session.rounds)
        train = self.session.train
        lr = train.lr * scale
        x_train, y_train = self._train_xy
        example = self.private if isinstance(self.private, ExamplePrivacy) else None
        dp = None if example is None else example.dp
        noise = None if example is None else example.noise_generator(round - 1)
        if self.task is None:
            train_loss = train_local(
                self.model, x_train, y_train,
                dataclasses.replace(train, lr=lr), generator=generator, dp=dp, noise=noise,
            )  # fmt: skip
        else:
            train_loss = train_task(
                self.task, self.model, x_train, y_train, train,
                generator=generator, round=round - 1, lr_scale=scale,
                step_generator=node_generator(self.seed, Stream.STEP, round - 1, self._salt),
                dp=dp, noise=noise,
            )  # fmt: skip
        # A CPU copy (as the clone it replaces on the CPU): sending, mixing, trust, checkpoints.
        trained = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        train_s = time.perf_counter() - tick
        slowed = time.perf_counter()
        if self.config.slowdown > 1:  # a simulated slow device: its result comes later
            # The shortest training seen is the device's own speed; a longer one also counts
            # the other processes on a shared machine, which a slower device would not multiply.
            self._fastest_train = min(self._fastest_train, train_s)
            self._stop.wait((self.config.slowdown - 1) * self._fastest_train)
        timings["slowdown"] = slowed = time.perf_counter() - slowed
        shared = self._outgoing(trained, before, round)
        variants: dict[int, list[bytes]] = {}
        if self.sender is not None:  # compression: serve the public copy, and its updates
            self.sender.update(
                flatten(pick(shared, self.layout.mix)),
                round,
                generator=node_generator(self.seed, Stream.COMPRESS, round - 1, self._salt),
            )
            exact = pick(shared, self.layout.exact)
            codec = str(self.sender.spec)
            variants = {
                base: self._signed(encode_updates(updates, exact), round, codec=codec, base=base)
                for base, updates in self.sender.updates_from().items()
            }
            shared = {**shared, **unflatten(self.sender.hat, pick(self.like, self.layout.mix))}
        self.transport.publish(self._signed(encode_state(shared), round), variants=variants)
        timings["train"] = time.perf_counter() - tick - slowed

        tick = time.perf_counter()
        # --central: the server alone, waited for twice as long (it waits for its slowest client).
        central = self.config.central
        published = time.monotonic()
        if central:
            deadline_s = 2 * self.config.exchange_timeout
        else:
            deadline_s = self.deadlines.seconds(train_s=train_s)
        deadline = published + deadline_s
        formed = self._formed
        answer, tracker_rtt, tracker_status = self._announce(event="")
        cohort = self._central_server(answer, deadline) if central else self._cohort(answer)
        if not self._formed:
            cohort = self._await_swarm(cohort, deadline)
            self._formed = True
        selection = self._selection
        skip = self.skipper.plan(cohort, selection.reserve)  # low-trust members stay undialled
        cohort = skip.cohort
        exchange = self._fetcher.exchange(
            cohort,
            round=round,
            deadline=deadline,
            skipped={**selection.skipped, **dict.fromkeys(skip.skipped, "low_trust")},
            reserve=skip.reserve,
            first_contact=selection.first_contact,
            first_contact_s=self.book.first_contact_s(),
            refill=None if central else self._more_candidates,  # never another client
            max_staleness=self.config.staleness or None,
        )
        timings["exchange"] = time.perf_counter() - tick
        if self._stop.is_set():
            return None
        lags = {p: t - published for p, t in exchange.arrived.items()}
        if formed:  # the first round's lags hold the swarm's start-up, not its pace
            self.deadlines.observe(lags.values())
        self._final_exchange = exchange
        self._last_cohort = exchange.dialled
        self.book.record(
            round,
            exchange.outcomes(round),
            [self._candidates[p] for p in exchange.dialled if p in self._candidates],
            rtts={p: r.rtt_s for p, r in exchange.replies.items() if r.header.round >= round},
        )

        tick = time.perf_counter()
        heard, weights, excluded, screened, unmixed, released = (
            self._adopt(round, trained, exchange)
            if central
            else self._mix(round, trained, exchange, before=before)
        )
        if example is not None:  # the round's DP-SGD steps and trust fit: its privacy cost
            example.charge_round(released)
        self.model.load_state_dict(self.current)
        self._log_exchange(heard, exchange, weights, screened)
        self.skipper.record(
            skipped=skip.skipped,
            heard=heard,
            weights=weights.tolist() if weights is not None else None,
            payload_bytes={
                p: r.payload.nbytes for p, r in {**exchange.replies, **screened}.items()
            },
        )
        timings["mix"] = time.perf_counter() - tick

        tick = time.perf_counter()
        val = self._score(self.data.x_val, self.data.y_val)
        test = self._score(self.data.x_test, self.data.y_test)
        scores = _score_fields(val, test)
        timings["evaluate"] = time.perf_counter() - tick

        snapshot = self.transport.stats.snapshot()
        flow = snapshot["per_round"].get(str(round), {})
        rejections = self.transport.stats.rejections() - rejected_before
        record: dict[str, Any] = {
            "round": round,
            "peer_id": self.peer_id,
            "train_loss": train_loss,
            "lr": lr,
            **scores,
            "cohort": exchange.dialled,
            "cohort_size": len(exchange.dialled),
            "heard_from": heard,
            "heard": len(heard),
            "staleness": {p: round - exchange.replies[p].header.round for p in heard},
            "max_staleness": self.config.staleness or None,
            "deadline_s": deadline_s,
            "lags": {p: lags[p] for p in heard if p in lags},
            "slowdown": self.config.slowdown,
            "trust_weights": weights_by_peer(weights, heard),
            "self_weight": float(weights[0]) if weights is not None else None,
            "rejected_from": exchange.rejected,
            "excluded": excluded,
            "unmixed": bool(unmixed),
            "missing": exchange.missing,
            **exchange.costs(),  # requests, retries, failed, time_lost_s
            "silent": sorted(exchange.silent),
            "skipped": exchange.skipped,
            "skipped_low_trust": skip.skipped,
            "bytes_saved": skip.bytes_saved,
            "neighbours": {
                "listed": selection.listed,
                "dialled": len(exchange.dialled),
                "replaced": len(exchange.dialled) - len(cohort),
                "skipped": dict(Counter(exchange.skipped.values())),
                "known": len(self.book.entries),
                "heard_ever": self.book.heard(),
            },
            "rejections": dict(rejections),
            "rejected": sum(rejections.values()),
            "epsilon": self.private.epsilon if self.private is not None else None,
            "bytes_sent": flow.get("header_sent", 0) + flow.get("payload_sent", 0),
            "bytes_received": flow.get("header_received", 0) + flow.get("payload_received", 0),
            "header_bytes_sent": flow.get("header_sent", 0),
            "payload_bytes_sent": flow.get("payload_sent", 0),
            "header_bytes_received": flow.get("header_received", 0),
            "payload_bytes_received": flow.get("payload_received", 0),
            "rtts": {p: s for p, runs in snapshot["rtt_s"].items() for r, s in runs if r == round},
            "tracker": tracker_status,
            "tracker_rtt_s": tracker_rtt,
            "timings": timings,
            "duration_s": time.perf_counter() - began,
            "finished_at": time.time(),  # wall clock: time-to-accuracy across peers
        }
        self._last_test = test
        self.round_done = round
        self.records.append(record)
        self._writer.write(record)
        self._checkpoint(record)
        write_status(self.snapshot())
        shown = scores.get("test_accuracy", scores.get("test_loss"))
        log.info(
            "round %d: loss %.4f, test %s %s, heard %d/%d, rejected %d, epsilon %s, %.2fs",
            round,
            train_loss,
            "accuracy" if "test_accuracy" in scores else "loss",
            f"{shown:.4f}" if isinstance(shown, float) else "-",
            len(heard),
            len(cohort),
            record["rejected"],
            f"{record['epsilon']:.3f}" if record["epsilon"] is not None else "-",
            record["duration_s"],
        )
        return record

    def _signed(
        self, payload: bytes, round: int, *, codec: str | None = None, base: int | None = None
    ) -> list[bytes]:
        """``[header, payload]`` of this round's state, signed once for every requester."""
        return signed_state(
            self.identity, payload, info_hash=self.info_hash, sender=self.peer_id, round=round,
            num_examples=len(self.data.y_train), codec=codec, base=base,
        )  # fmt: skip

    def _outgoing(self, trained: State, before: State, round: int) -> State:
        """What this round shares: privacy noise, then an attack (experiments), then the hook.

        Only the schema's shared keys leave (never ``local`` ones); noise and attacks touch the
        parameters only, never buffers.
        """
        keys = self.layout.parameters
        params = pick(trained, keys)
        params = params if self._sender is None else self._sender(params, round)
        attack = self.attack
        if attack is not None and not attack.poisons_data and attack.active(round - 1):
            generator = node_generator(self.seed, Stream.ATTACK, round - 1, self._salt)
            vector = attack_params(
                attack,
                flatten(params),
                reference=flatten(pick(before, keys)),
                initial=flatten(pick(self.initial, keys)),
                generator=generator,
            )
            params = unflatten(vector, pick(self.like, keys))
        shared = {**pick(trained, self.layout.shared), **params}
        return shared if self._send_hook is None else self._send_hook(shared, round)

    def _make_attack(self) -> AttackConfig | None:
        """The configured attack; ``label_flip`` flips this peer's training labels here."""
        if self.config.attack is None:
            return None

        attack = AttackConfig(
            self.config.attack, self.config.attack_scale, start=self.config.attack_from
        )
        if attack.poisons_data:
            self.data = dataclasses.replace(
                self.data, y_train=flip_labels(self.data.y_train, self.data.num_classes)
            )
        log.warning("this peer is an adversary: attack %s from round %d", attack.kind,
                    attack.start + 1)  # fmt: skip
        return attack

    # -- phases -----------------------------------------------------------------------------

    def _cohort(self, answer: TrackerAnswer | None) -> list[Endpoint]:
        """The cohort :func:`select_cohort` picks for the next round; remembers the selection.

        Without an answer (the tracker is down, nothing cached) the cohort is empty.
        """
        if answer is None:
            self._selection, self._candidates = Selection.empty(), {}
            return []
        self._selection = self._select(answer)
        self._keys.update(self._selection.keys)
        self._candidates = dict(self._selection.candidates)
        return self._selection.cohort

    def _select(self, answer: TrackerAnswer) -> Selection:
        """:func:`select_cohort` over a tracker answer, with this peer's book and settings.

        With trust-guided cohorts (``mixing.trust_cohorts``) the choice reads this peer's trust
        logits and draws from its ``COHORT`` generator of the round (the simulator's stream).
        """
        explore = self.session.mixing.trust_cohorts
        by_trust = None
        if explore is not None and self.trust is not None:
            generator = node_generator(self.seed, Stream.COHORT, self.round_done, self._salt)
            by_trust = TrustChoice(self.trust.known(), explore, generator)
        return select_cohort(
            self._listed(answer),
            peer_id=self.peer_id,
            cohort_size=self.session.cohort_size,
            allowed=self.session.allow_keys,
            addressing=self.addressing,
            book=self.book,
            round=self.round_done + 1,
            by_trust=by_trust,
        )

    def _listed(self, answer: TrackerAnswer) -> Sequence[PeerAddress]:
        """The answer's peers with keys: a BitTorrent tracker's addresses resolved by hello."""
        return answer.peers if self.hellos is None else self.hellos.listed(answer)

    def _more_candidates(self, dialled: set[str]) -> tuple[list[Endpoint], frozenset[str]]:
        """Announce again for a fresh sample: the candidates in it not dialled yet this round."""
        answer, _, _ = self._announce(event="")
        if answer is None:
            return [], frozenset()
        more = self._select(answer)
        self._keys.update(more.keys)
        self._candidates.update(more.candidates)
        fresh = self.skipper.keep(more.cohort + more.reserve)  # never a low-trust member
        return [e for e in fresh if e.peer_id not in dialled], more.first_contact

    def _await_swarm(self, cohort: list[Endpoint], deadline: float) -> list[Endpoint]:
        """In this process's first round, re-announce until the tracker lists a full cohort.

        A full cohort is ``min(cohort_size, num_nodes - 1)`` peers. Without this the first peers
        to start would train their first rounds alone. Later rounds take what the tracker lists,
        so a swarm that shrank (a peer left) never waits for it.
        """
        delay = POLL_FIRST_S
        while len(cohort) < self._expected and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return cohort
            self._stop.wait(min(delay, remaining))
            delay = min(2 * delay, POLL_MAX_S)
            answer, _, status = self._announce(event="")
            if status != "ok":
                return cohort
            cohort = self._cohort(answer)
        return cohort

    def _central_server(self, answer: TrackerAnswer | None, deadline: float) -> list[Endpoint]:
        """``--central``: the server (peer id ``CENTRAL_ID``) as the round's only cohort member.

        Found in the tracker's answer (re-announcing with backoff until it is listed or the
        deadline passes), else where it was last listed; empty when it never was. No other
        peer the tracker lists is ever dialled.
        """
        delay = POLL_FIRST_S
        while not self._stop.is_set():
            listed = [p for p in self._listed(answer) if p.peer_id == CENTRAL_ID] if answer else []
            found = select_cohort(
                listed,
                peer_id=self.peer_id,
                cohort_size=1,
                allowed=self.session.allow_keys,
                addressing=self.addressing,
                book=NeighbourBook(),  # no backoff: the server is the only source
                round=self.round_done + 1,
            )
            if found.cohort:
                self._keys.update(found.keys)
                self._candidates = dict(found.candidates)  # the book records the server alone
                self._central = found.cohort
                return found.cohort
            remaining = deadline - time.monotonic()
            if self._central or remaining <= 0:
                break
            self._stop.wait(min(delay, remaining))
            delay = min(2 * delay, POLL_MAX_S)
            answer, _, _ = self._announce(event="")
        return self._central

    def _adopt(
        self, round: int, trained: State, exchange: Exchange
    ) -> tuple[list[str], torch.Tensor | None, list[str], dict[str, Reply], bool, Releases]:
        """``--central``: adopt the server's state of this round (or newer) as the current model.

        Its shared keys replace the trained ones (local keys stay this node's); without it the
        trained state is kept. Returns what :meth:`_mix` does: the server as the one peer heard
        (or nobody), no weights, nothing excluded or screened, never unmixed, nothing released.
        """
        replies = exchange.replies
        heard = [p for p, r in replies.items() if r.state is not None and r.header.round >= round]
        self.current = dict(trained)
        if heard:
            state = replies[heard[0]].state
            assert state is not None
            self.current.update(state)
            if self._sender is not None:
                self._sender.mixed(pick(self.current, self.layout.parameters))
        else:
            log.warning("round %d: no average from the central server; keeping the trained "
                        "state", round)  # fmt: skip
        return heard, None, [], {}, False, ()

    def _mix(
        self, round: int, trained: State, exchange: Exchange, *, before: State
    ) -> tuple[list[str], torch.Tensor | None, list[str], dict[str, Reply], bool, Releases]:
        """Mix ``trained`` with what ``exchange`` brought: ``mixing.round`` with this peer alone.

        ``before`` is the state the round trained from (``fedfomo``'s reference).

        The stack ``[self, *heard]`` is mixed on the peer's device; ``self.current`` becomes the
        mix (local keys stay this peer's own). A state the plausibility screen rejects leaves
        ``exchange.replies`` (recorded in ``exchange.rejected`` and the transport's rejections
        as ``implausible``).

        Returns:
            The heard peers kept, the weights over ``[self, *kept]`` (None for ``none`` and the
            robust rules), the peers trust excluded, the screened replies by peer, whether
            the mix was not finite (the own state was kept), and what the private trust fit
            released about the validation split (``Mixed.releases``; none without one).
        """
        layout, mixing, device = self.layout, self.session.mixing, self.device
        heard = [
            p for p in exchange.dialled
            if p in exchange.replies and exchange.replies[p].state is not None
        ]  # fmt: skip
        received = [exchange.replies[p].state for p in heard]
        states: list[State] = [trained, *(s for s in received if s is not None)]

        def stacked(keys: Sequence[str]) -> torch.Tensor:
            return torch.stack([flatten(pick(state, keys)) for state in states]).to(device)

        shared = stacked(layout.mix)
        own = None
        if self.sender is not None:  # the cohort mixes this peer's public copy
            own = shared[:1].clone()
            shared[0] = self.sender.hat.to(device)
        elif self._sender is not None and self._sender.shared is not None:
            own = shared[:1].clone()  # the true own row; the cohort saw the noised one
            shared[0] = flatten(pick({**trained, **self._sender.shared}, layout.mix)).to(device)
        size = len(states)
        cohorts = Cohorts(
            shared=shared,
            members=torch.ones(1, size, dtype=torch.bool, device=device),
            self_column=torch.zeros(1, dtype=torch.long, device=device),
            own=own,
            exact={
                key: torch.stack([state[key] for state in states]).to(device)
                for key in layout.exact
            },
            sender_degrees=torch.full((size,), float(self.session.cohort_size), device=device),
            start=(
                flatten(pick(before, layout.mix)).unsqueeze(0).to(device)
                if mixing.rule == "fedfomo"
                else None
            ),
        )
        mixed = mix_round(cohorts, mixing, self._trust(round, heard))
        screened: dict[str, Reply] = {}
        for column in mixed.implausible[0].nonzero().flatten().tolist():
            peer_id = heard[column - 1]
            screened[peer_id] = exchange.replies.pop(peer_id)
            exchange.rejected[peer_id] = "implausible"
            self.transport.stats.record_rejection(peer_id, "implausible")
            distance = float(mixed.distances[0, column]) if mixed.distances is not None else 0.0
            log.warning("rejected the state of peer %s: implausible (distance %.3g)",
                        peer_id, distance)  # fmt: skip
        keep = [0, *(1 + i for i, p in enumerate(heard) if p not in screened)]
        kept = [heard[i - 1] for i in keep[1:]]
        excluded = [heard[i - 1] for i in mixed.excluded[0].nonzero().flatten().tolist()]
        if self.trust is not None and mixed.logits is not None:
            self.trust.remember(
                heard,
                mixed.logits[0].cpu(),
                excluded=excluded,
                check=None if mixed.kept is None else bool(mixed.kept[0]),
            )
        unmixed = bool(mixed.unmixed[0])
        if unmixed:
            log.warning("round %d: the mix was not finite; keeping this peer's own state", round)
        mix_like = pick(self.like, layout.mix)
        self.current = {
            **trained,  # local keys (FedBN) stay this node's own
            **unflatten(mixed.params[0].cpu(), mix_like),
            **{key: value[0].cpu() for key, value in mixed.exact.items()},
        }
        if mixed.public is not None and self._sender is not None:
            public = unflatten(mixed.public[0].cpu(), mix_like)
            self._sender.mixed(pick(public, layout.parameters))
        weights = None
        if mixed.weights is not None and mixing.rule != "none":
            weights = mixed.weights[0, keep].cpu()
        return kept, weights, excluded, screened, unmixed, mixed.releases[0]

    def _trust(self, round: int, heard: Sequence[str]) -> Trust | None:
        """Learned trust's logits over ``[self, *heard]``, validation batches and loss.

        Batches come from this peer's ``TRUST`` generator of the round (the simulator's draws for
        the same node); with no validation data or nobody heard the logits are used unfitted
        (``fedfomo``, which has no logits, keeps the own state).
        """
        mixing = self.session.mixing
        if mixing.rule not in VALIDATED_RULES:
            return None
        x_val, y_val = self.data.x_val, self.data.y_val
        count = len(y_val)
        generator = node_generator(self.seed, Stream.TRUST, round - 1, self._salt)
        model, device = self.model, self.device
        task_loss = self.task.loss_fn if self.task is not None else None

        def draw() -> tuple[torch.Tensor, torch.Tensor]:
            if not heard or count == 0:
                raise ConfigError(f"{mixing.rule} needs validation data and a cohort to fit on")
            rows = validation_rows([generator], [count], mixing.trust_batch_size)[0]
            return x_val[rows].unsqueeze(0).to(device), y_val[rows].unsqueeze(0).to(device)

        def losses(mixed: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            model.eval()
            loss = model_loss_fn(model, x[0], y[0], loss=task_loss, keys=self.layout.mix)
            return loss(mixed[0]).unsqueeze(0)

        if self.trust is not None:
            logits = self.trust.logits(heard).unsqueeze(0).to(device)
        else:
            logits = torch.zeros(1, 1 + len(heard), device=device)
        example = self.private if isinstance(self.private, ExamplePrivacy) else None
        dp = None if example is None else private_trust(self.session.privacy, mixing)
        private = None
        if example is not None and dp is not None:  # DP-SGD on the logits, secretly noised

            def take(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                rows = positions[0].cpu()
                return x_val[rows].unsqueeze(0).to(device), y_val[rows].unsqueeze(0).to(device)

            def example_losses(
                mixed: torch.Tensor, x: torch.Tensor, y: torch.Tensor
            ) -> torch.Tensor:
                model.eval()
                loss = model_example_loss_fn(model, x[0], y[0], loss=task_loss,
                                             keys=self.layout.mix)  # fmt: skip
                return loss(mixed[0]).unsqueeze(0)

            private = PrivateTrust(
                dp=dp, generators=[generator], counts=[count], take=take,
                noise=example.noise_generator(round - 1, Stream.TRUST_NOISE),
                example_losses=example_losses,
            )  # fmt: skip
        fit = bool(heard) and count > 0
        return Trust(logits=logits, draw=draw, losses=losses, fit=fit, private=private)

    def _score(self, x: torch.Tensor, y: torch.Tensor) -> Metrics | dict[str, float] | None:
        """The current model's scores on ``(x, y)``; None when there are no examples.

        A built-in session gets :class:`Metrics`; a task session the task's metrics and its
        loss (``evaluate_task``).
        """
        if len(y) == 0:
            return None
        if self.task is not None:
            return evaluate_task(self.task, self.model, x, y)
        return evaluate(self.model, x, y, num_classes=self.data.num_classes)

    def _announce(self, *, event: str) -> tuple[TrackerAnswer | None, float | None, str]:
        """Announce with this peer's round and metrics (see :meth:`TrackerLink.announce`)."""
        totals = traffic_totals(self.snapshot())
        return self.tracker.announce(
            self.info_hash,
            self.peer_id,
            event=event,
            round=self.round_done,
            port=self.port,
            numwant=self.book.numwant(self.session.cohort_size),
            accuracy=last_accuracy(self.records),
            bytes_sent=totals["bytes_sent"],
            bytes_received=totals["bytes_received"],
            pubkey=self.identity.public_key_hex,
            ip=self.config.advertise_ip,
            hello_port=self.transport.hello_port,
        )

    def _linger(self) -> None:
        """Keep serving the final state a while for neighbours that are behind.

        Ends when every peer of the last cohort whose final-round state was not fresh (it was
        behind, or silent) has fetched ours and no request came for ``QUIET_S``, or when nobody
        asked for ``QUIET_S`` and nobody is known to be behind; never later than ``linger``.
        """
        limit = self.config.exchange_timeout if self.config.linger is None else self.config.linger
        final = self.round_done
        exchange = getattr(self, "_final_exchange", Exchange())
        behind = {
            p for p in self._last_cohort
            if self.book.alive(p) and p not in exchange.rejected
            and (p not in exchange.replies or exchange.replies[p].header.round < final)
        }  # fmt: skip
        start = time.monotonic()
        deadline, quiet_since, seen = start + limit, start, -1
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                break
            flows = [f for f in self.transport.stats.snapshot()["per_peer_round"]
                     if f["round"] == final]  # fmt: skip
            requests = sum(f["messages_received"] for f in flows)
            if requests != seen:
                seen, quiet_since = requests, now
            behind -= {f["peer"] for f in flows if f["payload_sent"]}
            self._log_served()
            if not behind and now - quiet_since >= QUIET_S:
                break
            self._stop.wait(min(POLL_MAX_S / 5, max(0.0, deadline - now)))

    # -- ledger ------------------------------------------------------------------------------

    def _log_served(self) -> None:
        assert self.ledger is not None
        log_served(self.ledger, self._served)

    def _log_exchange(
        self,
        heard: Sequence[str],
        exchange: Exchange,
        weights: torch.Tensor | None,
        screened: Mapping[str, Reply],
    ) -> None:
        """Log what was served meanwhile, then every state mixed or screened out."""
        self._log_served()
        assert self.ledger is not None
        log_mixed(self.ledger, heard, exchange, weights, screened=screened)

    # -- state, records and files -----------------------------------------------------------

    def _build_model(self) -> nn.Module:
        try:
            model = build_model(
                self.session.model.name,
                input_shape=self.data.input_shape,
                num_classes=self.data.num_classes,
                max_state_bytes=self.session.state_size,  # refused before it is allocated
                **self.session.model.kwargs,
            )
            with torch.no_grad():
                model.eval()(self.data.x_train[:2])
        except (RuntimeError, ValueError) as exc:
            raise DataError(
                f"examples of shape {self.data.input_shape} do not fit model "
                f"{self.session.model.name!r}: {exc}"
            ) from None
        return model

    def _load_task(self) -> Task | None:
        """The user's task for a task session (``--task``); None for a built-in session.

        Raises:
            ConfigError: a task session without ``--task``, ``--task`` for a built-in session, or
                a spec that cannot be loaded (``load_task``).
        """
        spec = self.config.task
        if self._task is not None:
            check_task_flag(self.session, "Task object")
            return self._task
        check_task_flag(self.session, spec)
        if spec is None:
            return None

        return load_task(spec)

    def _build_task(self, task: Task) -> tuple[nn.Module, PeerData]:
        """The task's model, checked against the torrent's schema, then checked on its data.

        Raises:
            StateError: the model does not match the torrent's state schema (first key named).
            ConfigError, DataError: what ``check_task`` finds wrong with the task on its data.
        """
        assert self.session.task is not None
        model = task.make_model(seed=self.session.train.seed)
        check_schema(self.session.task.schema, model)  # before any data is read
        node, num_nodes = task_node(self.config.node_index, self.config.num_nodes)
        report = check_task(task, node=node, num_nodes=num_nodes, train=self.session.train)
        data = self._data or load_task_data(
            task, node=node, num_nodes=num_nodes, num_classes=report.num_classes
        )
        return model, data

    def _compression(
        self, initial: State, checkpoint: Checkpoint | None
    ) -> tuple[CompressedSender | None, Replicas | None]:
        """The public copy this peer serves and the copies it holds (None: no compression).

        After ``--resume`` the copy is the checkpoint's (or the restored state, from a
        checkpoint without one) and updates are served only from bases past the restored round
        plus one (a round may have been published before the crash but not saved).
        """
        entry = self.session.compression
        if entry is None:
            return None, None

        try:
            spec = Compression.parse(str(entry["codec"]))
        except ConfigError as exc:
            raise ConfigError(f"the torrent's compression: {exc}") from None
        if spec.is_none:
            return None, None
        mix, shared = self.layout.mix, pick(initial, self.layout.shared)
        start = initial if checkpoint is None else self.current
        sender = CompressedSender(
            spec,
            flatten(pick(start, mix)),
            min_base=0 if checkpoint is None else checkpoint.round + 2,
        )
        if checkpoint is not None and checkpoint.public:
            sender.load_state_dict(checkpoint.public)  # the residual survives the restart
        replicas = Replicas(spec, shared, mix=mix, max_bytes=self.session.state_size * 4 + 4096)
        return sender, replicas

    def _restore(self) -> Checkpoint | None:
        """Load ``--resume``'s checkpoint into this peer (None: there is none, round 1 follows).

        A private session's privacy state (accountant, public reference, noise seed) is the
        checkpoint's: epsilon goes on from where it was, and the reference is never rebuilt
        from the true model (that would share the residual of the restored round in the clear).

        Raises:
            StateError: a checkpoint of another session, model or peer, a damaged one, or, in a
                private session, one without privacy state (written before it was saved).
        """
        if not (self.out_dir / MODEL_FILE).exists():
            log.info("--resume: no checkpoint in %s, starting from round 1", self.out_dir)
            return None
        public_like = None
        if self.session.compression is not None:  # the sender's public copy is saved too
            size = sum(self.like[k].numel() for k in self.layout.mix)
            public_like = {"hat": torch.zeros(size)}
        private = self.private
        checkpoint = load_checkpoint(
            self.out_dir, info_hash=self.info_hash, like=self.like, public_like=public_like,
            privacy_like=private.state_dict() if private is not None else None,
        )  # fmt: skip
        if private is not None:
            path = self.out_dir / MODEL_FILE
            if not checkpoint.privacy:
                raise StateError(
                    f"{path} holds no privacy state (written before it was saved): resuming "
                    "would reset epsilon and leak the restored round; start afresh in a new --out"
                )
            try:
                private.load_state_dict(checkpoint.privacy)
            except PrivacyError as exc:
                raise StateError(f"{path}: damaged privacy state: {exc}") from None
        if self.config.peer_id is not None and checkpoint.peer_id != self.config.peer_id:
            raise StateError(
                f"checkpoint belongs to peer {checkpoint.peer_id!r}, not {self.config.peer_id!r}"
            )
        self.current = checkpoint.state
        self.round_done = checkpoint.round
        if self.trust is not None and checkpoint.trust:
            self.trust.load_state_dict(checkpoint.trust)
        self.book.load_state_dict(checkpoint.neighbours)
        self._base_totals = dict(checkpoint.totals)
        log.info("resuming after round %d", checkpoint.round)
        return checkpoint

    def _checkpoint(self, record: Mapping[str, Any]) -> None:
        save_checkpoint(
            self.out_dir,
            Checkpoint(
                info_hash=self.info_hash,
                peer_id=self.peer_id,
                round=self.round_done,
                state=self.current,
                trust=self.trust.state_dict() if self.trust is not None else {},
                metrics={k: v for k, v in record.items() if not isinstance(v, dict | list)},
                seeds={"seed": self.seed, "salt": self._salt},
                totals=traffic_totals(self.snapshot()),
                neighbours=self.book.state_dict(),
                public=self.sender.state_dict() if self.sender is not None else {},
                privacy=self.private.state_dict() if self.private is not None else {},
            ),
        )

    def snapshot(self) -> PeerSnapshot:
        """What reporting reads of this peer now (``node.report``), copied out as plain values.

        Safe at any point of the lifecycle: what ``start`` has not reached yet is None or empty.
        """
        transport: Transport | None = getattr(self, "transport", None)
        identity: PeerIdentity | None = getattr(self, "identity", None)
        attack: AttackConfig | None = getattr(self, "attack", None)
        private: PrivateSender | ExamplePrivacy | None = getattr(self, "private", None)
        data: PeerData | None = getattr(self, "data", None)
        book = self.book
        return PeerSnapshot(
            out_dir=getattr(self, "out_dir", None),
            peer_id=self.peer_id,
            state=self.state,
            error=self.error,
            round_done=self.round_done,
            records=tuple(self.records),
            rounds=getattr(self, "rounds", None),
            address=getattr(self, "address", None),
            traffic=transport.stats.snapshot() if transport is not None else None,
            rejections=transport.stats.rejections() if transport is not None else {},
            base_totals=dict(self._base_totals),
            tracker_online=self.tracker.online,
            tracker_counts=dict(self.tracker.counts),
            tracker_rtts=tuple(self.tracker.rtts),
            info_hash=getattr(self, "info_hash", None),
            session=getattr(self, "session", None),
            public_key=identity.public_key_hex if identity is not None else None,
            ledger=self.ledger.path.name if self.ledger is not None else None,
            attack=attack.kind if attack is not None else None,
            epsilon=private.epsilon if private is not None else None,
            delta=private.accountant.delta if private is not None else None,
            privacy_unit=private.unit if private is not None else None,
            max_epsilon=self.config.dp_max_epsilon,
            stopped=self.stopped,
            noise_multiplier=private.noise_multiplier if private is not None else None,
            train_examples=len(data.y_train) if data is not None else None,
            neighbours=NeighbourCounts(
                heard=book.heard(),
                known=len(book.entries),
                backed_off=book.backed_off(self.round_done + 1),
            ),
        )

    def _write_summary(self) -> None:
        test = getattr(self, "_last_test", None)
        if test is None and self.round_done > 0:
            self.model.load_state_dict(self.current)
            test = self._score(self.data.x_test, self.data.y_test)
        self._final = summary(self.snapshot(), test=test)
        write_json(self.out_dir / "summary.json", self._final)


def check_task_flag(session: Session, spec: str | None) -> None:
    """Refuse a task session without ``--task`` and a built-in session with one, in one line.

    Raises:
        ConfigError: naming the torrent's task label or built-in model.
    """
    if session.task is None and spec is not None:
        raise ConfigError(
            f"--task {spec!r}: this torrent runs the built-in model {session.model.name!r} on "
            f"{session.data.dataset}, not a task; start the peer without --task"
        )
    if session.task is not None and spec is None:
        raise ConfigError(
            f"this torrent was made with --task (task {session.task.label!r}): start the peer "
            "with --task PATH.py:NAME or --task package.module:NAME"
        )


def _score_fields(
    val: Metrics | dict[str, float] | None, test: Metrics | dict[str, float] | None
) -> dict[str, Any]:
    """A round record's scores: built-in sessions' fixed fields, or every metric of a task.

    A task's record holds ``val_<metric>`` and ``test_<metric>`` for every metric it returns,
    ``val_loss`` and ``test_loss``, and ``test_metrics`` (the test scores as one dict).
    """
    if isinstance(val, dict) or isinstance(test, dict):
        fields: dict[str, Any] = {}
        for prefix, scores in (("val", val), ("test", test)):
            assert not isinstance(scores, Metrics)
            fields[f"{prefix}_loss"] = scores["loss"] if scores is not None else None
            fields |= {f"{prefix}_{k}": v for k, v in (scores or {}).items() if k != "loss"}
        return {**fields, "test_metrics": test}
    return {
        "val_accuracy": val.accuracy if val is not None else None,
        "val_loss": val.loss if val is not None else None,
        "test_accuracy": test.accuracy if test is not None else None,
        "test_loss": test.loss if test is not None else None,
        "test_precision": test.precision if test is not None else None,
        "test_recall": test.recall if test is not None else None,
        "test_f1": test.f1 if test is not None else None,
    }


def _make_trust(mixing: MixingConfig) -> TrustLearner | None:
    if mixing.rule != "learned":
        return None

    return TrustLearner(mixing)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
