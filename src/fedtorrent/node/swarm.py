"""One machine, one swarm: a tracker, N ``fedtorrent peer`` processes, a live view, a summary.

The launcher is plumbing only: it never trains or exchanges parameters itself. Each peer is a
separate process in its own session, so a terminal's Ctrl-C reaches only the launcher, which then
stops the peers in order (SIGTERM, a bounded wait, SIGKILL) before the tracker. Everything the
summary says is read back from the files the peers wrote (``status.json`` while they run,
``metrics.jsonl`` at the end) and from the tracker's per-swarm byte counters, so
:func:`summarize_swarm` gives the same answer for peer folders copied back from other machines.

A run folder::

    <out>/swarm.json              the launch: torrent, info-hash, tracker URL, peer command lines
    <out>/churn.json              with ``SwarmConfig.churn``: the scenario, plan and events
    <out>/peers/peer-00/          peer 0's --out (metrics.jsonl, status.json, summary.json,
                                  checkpoint.*, peer.log) plus console.log (stdout and stderr)
    <out>/server/                 with ``central``: the FedAvg server's --out (the same files)
    <out>/rounds.jsonl, .csv      every peer's per-round records; ``node`` is the node index
    <out>/summary.json            per-peer results, accuracy mean and std, bandwidth comparison
    <out>/plots/                  accuracy.png, bytes.png, bandwidth.png
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from fedtorrent.errors import ConfigError, DataError, TrackerError
from fedtorrent.metrics.records import RecordWriter, iter_records, read_json, write_json
from fedtorrent.node.churn import JOINED_FILE, ChurnDriver, ChurnSpec, churn_summary, plan_churn
from fedtorrent.node.host import write_plan

if TYPE_CHECKING:
    from fedtorrent.net.torrent import Torrent
    from fedtorrent.net.tracker.server import BackgroundTracker
    from fedtorrent.task import Task

PEERS_FOLDER = "peers"
MEMORY_EVERY_S = 2.0
"""How often ``Swarm.wait`` samples the peer processes' memory."""
HOSTS_FOLDER = "hosts"
"""``<out>/hosts/host-NN/``: the plan and console log of a process hosting several peers."""
SERVER_FOLDER = "server"
"""With ``SwarmConfig.central``: the central server's ``--out`` inside the run folder."""
SERVER_INDEX = -1
"""The central server's index among the launcher's processes (peers count from 0)."""
PEER_STATES = ("starting", "running", "done", "failed", "stopped")
"""What ``status.json`` may say; the launcher adds ``exited`` for a peer gone without saying."""
ROUND_FIELDS = (
    "node",
    "peer_id",
    "round",
    "test_accuracy",
    "val_accuracy",
    "train_loss",
    "cohort_size",
    "heard",
    "rejected",
    "bytes_sent",
    "bytes_received",
    "tracker_rtt_s",
    "retries",
    "time_lost_s",
    "duration_s",
)
"""CSV columns of the merged ``rounds.csv`` (the JSON Lines file keeps every key)."""
_CLI = "from fedtorrent.cli import main; main()"
"""How the launcher runs the CLI: the same interpreter, whatever the PATH holds."""
PEER_MARK = "FEDTORRENT_SWARM_PEER"
"""Set to ``1`` in every peer's environment: a peer that imports a task file which launches a
swarm at import (no ``if __name__ == "__main__":`` guard) is refused instead of recursing."""


def absolute_task_spec(spec: str) -> str:
    """``spec`` with a file part made absolute, so a peer started in any folder finds it.

    ``package.module:NAME`` is left as it is (peers import it like the launcher would).
    """
    source, sep, name = spec.rpartition(":")
    if sep and (source.endswith(".py") or "/" in source or os.sep in source):
        return f"{Path(source).expanduser().resolve()}:{name}"
    return spec


_SLOW = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(%?)(?:x(\d+(?:\.\d*)?|\.\d+))?")


@dataclass(frozen=True)
class SlowPeers:
    """A straggler scenario: ``fraction`` of the peers run ``--slowdown factor``.

    The slow ones are the last ``ceil(fraction * peers)`` node indices (:meth:`nodes`), so a
    run is repeatable and a summary names them.
    """

    fraction: float
    factor: float = 4.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise ConfigError(f"the slow fraction must be in (0, 1], got {self.fraction}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ConfigError(f"the slowdown factor must be a number >= 1, got {self.factor}")

    @classmethod
    def parse(cls, spec: str) -> SlowPeers:
        """``FRACTION[xF]``: ``25%``, ``0.25``, ``25%x4`` or ``0.25x8`` (default factor 4).

        Raises:
            ConfigError: one line naming the spec and the expected form.
        """
        match = _SLOW.fullmatch(spec.strip().lower().replace(" ", ""))
        if match is None:
            raise ConfigError(
                f"--slow {spec!r}: expected FRACTION[xF], e.g. 25%x4 or 0.25 (factor 4)"
            )
        value, percent, factor = match.groups()
        fraction = float(value) / (100 if percent else 1)
        try:
            return cls(fraction, float(factor) if factor else 4.0)
        except ConfigError as exc:
            raise ConfigError(f"--slow {spec!r}: {exc}") from None

    def nodes(self, peers: int) -> list[int]:
        """The slow node indices of a swarm of ``peers``: the last ``ceil(fraction * peers)``."""
        count = min(peers, math.ceil(self.fraction * peers - 1e-9))
        return list(range(peers - count, peers))


def peer_folder(out: Path, index: int) -> Path:
    """Where peer ``index`` of a swarm writes (its ``--out``)."""
    return Path(out) / PEERS_FOLDER / f"peer-{index:02d}"


@dataclass(frozen=True)
class SwarmConfig:
    """One launch: which torrent, how many peers, where they write and how they find each other.

    ``tracker`` None starts a tracker in this process on ``host:tracker_port`` (0: a free port);
    an announce URL joins that tracker instead. Peer ``i`` binds ``host:port_base + i``, or a free
    port when ``port_base`` is 0. ``peer_command`` replaces ``python -c <fedtorrent CLI> peer`` (the
    torrent and the per-peer options are appended to it); ``peer_args`` are appended to every peer.
    ``stop_grace`` is how long stopping waits for peers after SIGTERM before it kills them.
    Without ``resume`` an ``out`` that already holds peer records is refused, so two runs never
    mix their records.
    """

    torrent: Path
    out: Path
    peers: int = 6
    data_dir: Path | None = None
    tracker: str | None = None
    host: str = "127.0.0.1"
    tracker_port: int = 0
    port_base: int = 0
    exchange_timeout: float | None = None
    rounds: int | None = None
    peer_args: tuple[str, ...] = ()
    peer_command: tuple[str, ...] = ()
    stop_grace: float = 15.0
    resume: bool = False
    """Continue the peers of an earlier run in ``out`` from their checkpoints (``--resume``)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment variables for every peer."""
    attackers: int = 0
    """The last ``attackers`` peers run ``--attack attack`` (experiments; see adversary.py)."""
    attack: str | None = None
    attack_scale: float | None = None
    attack_from: int = 0
    """The attackers share honestly in rounds ``1..attack_from`` (``--attack-from``)."""
    task: str | Task | None = None
    """The task every peer gets as ``--task`` (a task session): a spec (a file is made absolute),
    or a :class:`~fedtorrent.task.Task` object, replaced by its spec
    (:func:`~fedtorrent.task.task_spec`: define it at module level of a .py file)."""
    device: str = "cpu"
    """The ``--device`` every peer trains on (``fedtorrent.device``); checked here, once."""
    central: bool = False
    """Centralized FL on the same session: start a ``fedtorrent server`` process (its folder
    ``out/server``, the next port after the peers') and run every peer with ``--central``."""
    processes: int | None = None
    """How many processes host the peers (``node.host``: one thread per peer); None picks
    :func:`default_processes`. Equal to ``peers``: one process per peer."""
    solo: frozenset[int] = frozenset()
    """Peers that get a process of their own whatever ``processes`` says (a peer that is to be
    killed or restarted alone)."""
    churn: str | None = None
    """A churn scenario (``node.churn``), e.g. ``join=10%@r5,leave=2@r8,kill=5%@r6,tracker@r4``:
    peers that join late, leave, are killed and resumed, and a tracker restart."""
    slow: str | None = None
    """Stragglers (``--slow``, :meth:`SlowPeers.parse`): these peers run ``--slowdown F``."""
    staleness: int | None = None
    """The asynchronous mode for every peer (``--staleness K``); None: synchronous."""
    dp_max_epsilon: float | None = None
    """Every peer's privacy budget (``--dp-max-epsilon E``, checked by the peer); None: none."""

    @property
    def slow_peers(self) -> SlowPeers | None:
        """The parsed ``slow`` scenario (None without one)."""
        return None if self.slow is None else SlowPeers.parse(self.slow)

    def __post_init__(self) -> None:
        from fedtorrent.device import resolve_device  # noqa: PLC0415

        resolve_device(self.device)  # an absent device is refused before any peer starts
        if self.task is not None and not isinstance(self.task, str):
            from fedtorrent.task.loader import task_spec  # noqa: PLC0415 (loads torch)

            object.__setattr__(self, "task", task_spec(self.task))  # peers import, never unpickle
        if self.task is not None:
            object.__setattr__(self, "task", absolute_task_spec(str(self.task)))
        if self.peers < 1:
            raise ConfigError(f"peers must be >= 1, got {self.peers}")
        if (self.attackers > 0) != (self.attack is not None):
            raise ConfigError("--attackers K and --attack KIND go together")
        if self.attack is not None:
            from fedtorrent.adversary import AttackConfig, attacker_nodes  # noqa: PLC0415

            AttackConfig(self.attack, self.attack_scale, start=self.attack_from)
            attacker_nodes(self.peers, self.attackers)
        elif self.attack_from:
            raise ConfigError("--attack-from needs --attack")
        for label, port in (("tracker_port", self.tracker_port), ("port_base", self.port_base)):
            if not 0 <= port <= 65535:
                raise ConfigError(f"{label} must be in [0, 65535], got {port}")
        _ = self.slow_peers  # a bad spec is one line before anything starts
        if self.staleness is not None and self.staleness < 0:
            raise ConfigError(f"staleness must be >= 0, got {self.staleness}")
        if self.central and self.staleness:
            raise ConfigError("--staleness does not go with --central")
        if self.central and self.resume:
            raise ConfigError("--central does not resume: the server starts from round 1")
        if self.port_base and self.port_base + self.peers - 1 + self.central > 65535:
            raise ConfigError(f"port_base {self.port_base} leaves no port for {self.peers} peers")
        if self.exchange_timeout is not None and not self.exchange_timeout > 0:
            raise ConfigError(f"exchange_timeout must be > 0, got {self.exchange_timeout}")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.processes is not None and not 1 <= self.processes <= self.peers:
            raise ConfigError(f"processes must be in [1, {self.peers}], got {self.processes}")
        if self.processes is not None and self.processes < self.peers and self.peer_command:
            raise ConfigError("a custom peer command runs one peer per process")
        if not self.solo <= set(range(self.peers)):
            raise ConfigError(f"solo peers must be node indices below {self.peers}")
        if not self.stop_grace >= 0:
            raise ConfigError(f"stop_grace must be >= 0, got {self.stop_grace}")
        if self.tracker is not None and not self.tracker.startswith(("http://", "https://")):
            raise ConfigError(f"tracker must be an http(s) announce URL, got {self.tracker!r}")
        if self.churn is not None:
            spec = ChurnSpec.parse(self.churn)
            if self.central or self.resume:
                raise ConfigError(
                    f"--churn does not go with --{'central' if self.central else 'resume'}"
                )
            if self.tracker is not None and any(e.kind == "tracker" for e in spec.events):
                raise ConfigError(
                    "--churn tracker@rN restarts the swarm's own tracker: drop --tracker"
                )


@dataclass(frozen=True)
class PeerView:
    """What the launcher knows about one peer right now (from its process and ``status.json``).

    ``state`` is the peer's own word while it runs; once its process is gone without a final
    word it is ``failed`` (non-zero exit) or ``exited``. ``accuracy`` is None before the first
    evaluated round; bytes are cumulative over the run.
    """

    index: int
    pid: int
    state: str
    round: int
    rounds: int | None
    accuracy: float | None
    bytes_sent: int
    bytes_received: int
    returncode: int | None
    peer_id: str | None = None

    @property
    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.returncode is None


def read_status(folder: Path) -> dict[str, Any] | None:
    """A peer's ``status.json``, or None when it is missing or unreadable (not written yet)."""
    try:
        value = read_json(Path(folder) / "status.json")
    except DataError:
        return None
    return value if isinstance(value, dict) else None


def _number(value: Any, kind: type[int] | type[float]) -> Any:
    """``value`` as ``kind`` when it is a finite number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return kind(value)


def view_of(
    index: int, *, pid: int, returncode: int | None, status: Mapping[str, Any] | None
) -> PeerView:
    """Combine a process's exit status with the peer's last ``status.json`` into one view."""
    status = status or {}
    state = str(status.get("state", "starting"))
    if state not in PEER_STATES:
        state = "starting"
    if returncode is not None and state in ("starting", "running"):
        state = "exited" if returncode == 0 else "failed"
    peer_id = status.get("peer_id")
    return PeerView(
        index=index,
        pid=pid,
        state=state,
        round=_number(status.get("round"), int) or 0,
        rounds=_number(status.get("rounds"), int),
        accuracy=_number(status.get("accuracy"), float),
        bytes_sent=_number(status.get("bytes_sent"), int) or 0,
        bytes_received=_number(status.get("bytes_received"), int) or 0,
        returncode=returncode,
        peer_id=peer_id if isinstance(peer_id, str) else None,
    )


@dataclass
class _Peer:
    index: int
    folder: Path
    command: list[str]
    process: subprocess.Popen[bytes]
    console: IO[bytes]
    """The process's stdout and stderr (shared by the peers of one host process)."""


SOLO_UP_TO = 8
"""Swarms up to this size run one process per peer by default (isolation costs little there)."""
PEERS_PER_PROCESS = 25
"""Beyond ``SOLO_UP_TO``: at least one process per this many peers, and one per core."""


def default_processes(peers: int, cpus: int | None = None) -> int:
    """How many processes host ``peers`` peers when ``--processes`` is not given.

    Up to :data:`SOLO_UP_TO` peers each peer is a process; larger swarms share processes (each
    costs the interpreter, torch and a thread pool once), one per core but at least one per
    :data:`PEERS_PER_PROCESS` peers, measured in ``benchmarks/swarm_scale.py``.
    """
    if peers <= SOLO_UP_TO:
        return peers
    cores = cpus or os.cpu_count() or 1
    return min(peers, max(cores, math.ceil(peers / PEERS_PER_PROCESS)))


def host_groups(peers: int, processes: int, solo: frozenset[int] = frozenset()) -> list[list[int]]:
    """Node indices per process: each ``solo`` peer alone, the others dealt round-robin.

    The solo peers count towards ``processes``; at least one process hosts the rest.
    """
    rest = [i for i in range(peers) if i not in solo]
    shared = max(1, processes - len(solo)) if rest else 0
    groups = [rest[k::shared] for k in range(shared)]
    return [*([i] for i in sorted(solo)), *(g for g in groups if g)]


class Swarm:
    """A swarm on this machine: ``start()`` launches, ``stop()`` ends it, ``close()`` tidies up.

    Use it as a context manager; leaving the block stops every peer and the tracker it started.
    """

    def __init__(self, config: SwarmConfig) -> None:
        self.config = config
        self.torrent: Torrent | None = None
        self.tracker_url: str | None = config.tracker
        """The announce URL the peers use (known after ``start()`` when the swarm owns one)."""
        self._tracker: BackgroundTracker | None = None
        self._peers: list[_Peer] = []
        self._tracker_config: Any = None
        self._served_torrents: list[Path] = []
        """The ``TrackerConfig`` the tracker was started with (its bound port), for a restart."""
        self.churn: ChurnDriver | None = None
        """The churn scenario being carried out (``SwarmConfig.churn``), after ``start()``."""
        self.started_at: float | None = None
        self.tracker_traffic: dict[str, int] | None = None
        """The swarm's tracker bytes in and out, as last read (``close()`` reads it once more)."""
        self.peak_memory: int | None = None
        """The largest total proportional set size (PSS) of the peer processes seen by ``wait``:
        shared pages (torch, the memory-mapped dataset) count once; None where unmeasured."""

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the torrent, start the tracker (unless joining one) and launch every peer.

        Raises:
            TorrentError: the torrent is missing or malformed.
            ConfigError: more peers than the torrent splits its data into.
            OSError: the tracker's address cannot be bound or a peer cannot be spawned.
        """
        from fedtorrent.net.torrent import load_torrent  # noqa: PLC0415

        config = self.config
        if os.environ.get(PEER_MARK) == "1":
            raise ConfigError(
                "a swarm peer started a swarm: the task file launches one when imported; put "
                'the launch under if __name__ == "__main__":'
            )
        torrent = load_torrent(config.torrent)
        num_nodes = torrent.session.data.num_nodes
        if config.peers > num_nodes:
            raise ConfigError(
                f"{config.peers} peers but the torrent splits its data into {num_nodes} shards"
            )
        if not config.resume:
            folders = sorted((config.out / PEERS_FOLDER).glob("peer-*"))
            used = [
                folder.name
                for folder in [*folders, config.out / SERVER_FOLDER]
                if (folder / "metrics.jsonl").exists() or (folder / "status.json").exists()
            ]
            if used:
                raise ConfigError(
                    f"{config.out} already holds the records of {', '.join(used)}; choose "
                    "another run folder or resume that run"
                )
        self.torrent = torrent
        config.out.mkdir(parents=True, exist_ok=True)
        try:
            if config.churn is not None:
                self.churn = ChurnDriver(
                    plan_churn(
                        ChurnSpec.parse(config.churn),
                        peers=config.peers,
                        rounds=config.rounds or torrent.session.rounds,
                        seed=torrent.session.train.seed,
                        exclude=range(config.peers - config.attackers, config.peers),
                    ),
                    out=config.out,
                )
            late = self.churn.plan.joiners if self.churn is not None else frozenset()
            if self.tracker_url is None:
                self.tracker_url = self._start_tracker()
            self._warm_dataset()
            self.started_at = time.time()
            if config.central:  # first, so that it is listed when the clients look for it
                self._spawn(SERVER_INDEX)
            processes = config.processes or default_processes(config.peers)
            churned = self.churn.plan.churned if self.churn is not None else frozenset()
            for group in host_groups(config.peers, processes, config.solo | churned):
                if group[0] in late:  # late joiners start when the churn driver says so
                    continue
                self._spawn(group[0]) if len(group) == 1 else self._spawn_host(group)
            self._write_launch()
        except BaseException:
            self.close()
            raise

    def _warm_dataset(self) -> None:
        """Parse (or download) a built-in session's dataset once, before any peer needs it.

        The peers then memory-map the parsed arrays (``data.datasets``) instead of each parsing
        the files at the same time; a missing dataset is one error here, not one per peer.
        """
        assert self.torrent is not None
        if self.torrent.session.task is not None or self.config.peer_command:
            return
        from fedtorrent.data import load_dataset  # noqa: PLC0415

        load_dataset(self.torrent.session.data.dataset, data_dir=self.config.data_dir)

    def _start_tracker(self) -> str:
        from fedtorrent.config import TrackerConfig  # noqa: PLC0415
        from fedtorrent.net.torrent import state_path_for  # noqa: PLC0415
        from fedtorrent.net.tracker.server import BackgroundTracker  # noqa: PLC0415

        # Serving the torrent lets peers on other machines fetch it and its initial state.
        served = [self.config.torrent] if state_path_for(self.config.torrent).exists() else []
        self._served_torrents = served
        # Every peer runs from this one address: raise the per-address limits by the peer count.
        peers = self.config.peers + self.config.central  # the central server is one more
        limits = TrackerConfig()
        restarts = self.churn is not None and self.churn.plan.restarts_tracker
        tracker_config = TrackerConfig(
            host=self.config.host,
            port=self.config.tracker_port,
            max_peers_per_address=peers,
            rate_limit=limits.rate_limit * peers,
            rate_burst=limits.rate_burst * peers,
            max_connections_per_address=limits.max_connections_per_address + 2 * peers,
            # A tracker that restarts mid-run remembers swarms and keys in its SQLite store.
            db_path=self.config.out / "tracker.sqlite" if restarts else None,
        )
        tracker = BackgroundTracker(tracker_config, torrents=served)
        tracker.start()
        self._tracker = tracker
        bound = tracker.server.port or tracker_config.port  # the port a restart binds again
        self._tracker_config = dataclasses.replace(tracker_config, port=bound)
        return tracker.server.announce_url

    def stop_tracker(self) -> None:
        """Stop the tracker this swarm started (a churn scenario's ``tracker@rN``)."""
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None

    def start_tracker(self) -> None:
        """Start the tracker again on the port and store it had (after :meth:`stop_tracker`).

        Raises:
            OSError: the port was taken meanwhile.
        """
        from fedtorrent.net.tracker.server import BackgroundTracker  # noqa: PLC0415

        if self._tracker is not None or self._tracker_config is None:
            return
        tracker = BackgroundTracker(self._tracker_config, torrents=self._served_torrents)
        tracker.start()
        self._tracker = tracker

    def server_command(self) -> list[str]:
        """The command line that runs the central server (``SwarmConfig.central``)."""
        if self.torrent is None or self.tracker_url is None:
            raise RuntimeError("swarm is not started")
        config = self.config
        port = config.port_base + config.peers if config.port_base else 0
        command = [sys.executable, "-c", _CLI, "server", str(config.torrent)]
        command += ["--out", str(config.out / SERVER_FOLDER), "--clients", str(config.peers)]
        command += ["--host", config.host, "--port", str(port), "--tracker", self.tracker_url]
        if config.exchange_timeout is not None:
            command += ["--exchange-timeout", repr(config.exchange_timeout)]
        if config.rounds is not None:
            command += ["--rounds", str(config.rounds)]
        return command

    def peer_command(self, index: int) -> list[str]:
        """The command line that runs peer ``index`` (``start()`` must have read the torrent)."""
        base = list(self.config.peer_command) or [sys.executable, "-c", _CLI, "peer"]
        return [*base, *self.peer_arguments(index)]

    def peer_arguments(self, index: int) -> list[str]:
        """The ``fedtorrent peer`` arguments of peer ``index`` (after ``peer``)."""
        if self.torrent is None or self.tracker_url is None:
            raise RuntimeError("swarm is not started")
        config = self.config
        port = config.port_base + index if config.port_base else 0
        command = [
            str(config.torrent),
            "--out",
            str(peer_folder(config.out, index)),
            "--node-index",
            str(index),
            "--num-nodes",
            str(self.torrent.session.data.num_nodes),
            "--host",
            config.host,
            "--port",
            str(port),
            "--tracker",
            self.tracker_url,
        ]
        if config.data_dir is not None:
            command += ["--data-dir", str(config.data_dir)]
        if config.exchange_timeout is not None:
            command += ["--exchange-timeout", repr(config.exchange_timeout)]
        if config.rounds is not None:
            command += ["--rounds", str(config.rounds)]
        if config.task is not None:
            command += ["--task", str(config.task)]
        if config.device != "cpu":
            command += ["--device", config.device]
        if config.resume:
            command.append("--resume")
        if config.central:
            command.append("--central")
        if config.staleness:
            command += ["--staleness", str(config.staleness)]
        if config.dp_max_epsilon is not None:
            command += ["--dp-max-epsilon", repr(config.dp_max_epsilon)]
        slow = config.slow_peers
        if slow is not None and index in slow.nodes(config.peers):
            command += ["--slowdown", repr(slow.factor)]
        if config.attack is not None and index >= config.peers - config.attackers:
            command += ["--attack", config.attack]
            if config.attack_scale is not None:
                command += ["--attack-scale", repr(config.attack_scale)]
            if config.attack_from:
                command += ["--attack-from", str(config.attack_from)]
        return [*command, *config.peer_args]

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # P processes on C cores: give each C // P torch threads unless the user chose already.
        processes = self.config.processes or default_processes(self.config.peers)
        threads = str(max(1, (os.cpu_count() or 1) // processes))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(name, threads)
        env.update(self.config.env)
        env[PEER_MARK] = "1"
        return env

    def _spawn(self, index: int, extra: Sequence[str] = ()) -> None:
        """Start peer ``index`` alone in a process, or the central server (``SERVER_INDEX``).

        ``extra`` is appended to the peer's arguments. A peer started again (a churn restart)
        replaces its earlier, exited, process.
        """
        server = index == SERVER_INDEX
        folder = self.config.out / SERVER_FOLDER if server else peer_folder(self.config.out, index)
        command = self.server_command() if server else [*self.peer_command(index), *extra]
        for old in [p for p in self._peers if p.index == index]:
            if old.process.poll() is None:
                raise RuntimeError(f"peer {index} is still running")
            old.console.close()
            self._peers.remove(old)
        process, console = self._popen(command, folder / "console.log", [folder])
        self._peers.append(_Peer(index, folder, command, process, console))

    def _spawn_host(self, indices: Sequence[int]) -> None:
        """Start one ``fedtorrent host`` process that runs the peers ``indices`` on threads."""
        folder = self.config.out / HOSTS_FOLDER / f"host-{indices[0]:02d}"
        folders = [peer_folder(self.config.out, i) for i in indices]
        commands = [self.peer_command(i) for i in indices]
        write_plan(folder / "plan.json", [self.peer_arguments(i) for i in indices])
        host = [sys.executable, "-c", _CLI, "host", str(folder / "plan.json")]
        process, console = self._popen(host, folder / "console.log", folders)
        for index, peer, command in zip(indices, folders, commands, strict=True):
            self._peers.append(_Peer(index, peer, command, process, console))

    def _popen(
        self, command: list[str], log: Path, folders: Sequence[Path]
    ) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "status.json").unlink(missing_ok=True)  # a stale one would read as progress
        log.parent.mkdir(parents=True, exist_ok=True)
        console = log.open("ab")
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                start_new_session=True,  # Ctrl-C in the terminal reaches the launcher only
            )
        except BaseException:
            console.close()
            raise
        return process, console

    def spawn_peer(self, index: int, extra: Sequence[str]) -> None:
        """Start peer ``index`` in a process of its own, with ``extra`` arguments (churn)."""
        self._spawn(index, extra)

    def signal_peer(self, index: int, signum: int) -> bool:
        """Send ``signum`` to peer ``index``; False when it has no running process."""
        for peer in self._peers:
            if peer.index == index and peer.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    peer.process.send_signal(signum)
                    return True
        return False

    def _write_launch(self) -> None:
        assert self.torrent is not None
        write_json(
            self.config.out / "swarm.json",
            {
                "torrent": str(self.config.torrent),
                "info_hash": self.torrent.info_hash,
                "session": self.torrent.session.name,
                "tracker": self.tracker_url,
                "tracker_owned": self._tracker is not None,
                "started": self.started_at,
                "peers": [
                    {"index": p.index, "pid": p.process.pid, "command": p.command}
                    for p in self._peers
                ],
            },
        )

    def processes(self) -> list[subprocess.Popen[bytes]]:
        """Every process this launcher started, once each (a host process runs several peers)."""
        return list({id(p.process): p.process for p in self._peers}.values())

    def stop(self) -> None:
        """SIGTERM every live process, wait up to ``stop_grace`` s, then SIGKILL the rest."""
        processes = self.processes()
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_grace
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        """Stop the peers, read the tracker's byte counters one last time, stop the tracker."""
        self.stop()
        for console in {id(p.console): p.console for p in self._peers}.values():
            console.close()
        if self.torrent is not None and self.tracker_url is not None:
            self.tracker_traffic = self.read_tracker_traffic() or self.tracker_traffic
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None

    def __enter__(self) -> Swarm:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- watching --------------------------------------------------------------------------------

    @property
    def info_hash(self) -> str:
        """The session id (after ``start()``)."""
        if self.torrent is None:
            raise RuntimeError("swarm is not started")
        return self.torrent.info_hash

    def views(self) -> list[PeerView]:
        """Every peer's current view, in node order (the central server first, index -1)."""
        return [
            view_of(
                p.index,
                pid=p.process.pid,
                returncode=p.process.poll(),
                status=read_status(p.folder),
            )
            for p in self._peers
        ]

    def returncodes(self) -> dict[int, int | None]:
        """Exit status per node index (None while running; negative: killed by that signal)."""
        return {p.index: p.process.poll() for p in self._peers}

    def sample_memory(self) -> int | None:
        """The peer processes' total PSS now (Linux ``smaps_rollup``); updates ``peak_memory``."""
        total = 0
        for process in self.processes():
            try:
                text = Path(f"/proc/{process.pid}/smaps_rollup").read_text()
            except OSError:
                continue  # gone, or no /proc here
            pss = next(
                (line.split()[1] for line in text.splitlines() if line.startswith("Pss:")), 0
            )
            total += int(pss) * 1024
        if total:
            self.peak_memory = max(self.peak_memory or 0, total)
        return total or None

    def read_tracker_traffic(self) -> dict[str, int] | None:
        """This swarm's tracker bytes in and out (``/swarms/<info-hash>``); None if unreachable."""
        from fedtorrent.net.tracker.client import TrackerClient  # noqa: PLC0415

        if self.tracker_url is None:
            return None
        try:
            stats = TrackerClient(self.tracker_url, timeout=3.0, retries=0).swarm(self.info_hash)
        except TrackerError:
            return None
        traffic = {
            "bytes_in": _number(stats.get("tracker_bytes_in"), int),
            "bytes_out": _number(stats.get("tracker_bytes_out"), int),
        }
        if None in traffic.values():
            return None
        self.tracker_traffic = traffic
        return traffic

    def wait(
        self,
        *,
        stop: threading.Event | None = None,
        on_update: Callable[[list[PeerView]], None] | None = None,
        interval: float = 0.5,
        timeout: float | None = None,
    ) -> bool:
        """Poll until every peer has exited (True) or ``stop`` is set or ``timeout`` passes (False).

        ``on_update(views)`` is called after each poll, from this thread.
        """
        stop = stop or threading.Event()
        deadline = None if timeout is None else time.monotonic() + timeout
        last_traffic = last_memory = 0.0
        while True:
            views = self.views()
            if self.churn is not None and self.churn.step(self, views):
                views = self.views()
            now = time.monotonic()
            if now - last_traffic >= 5.0:  # the tracker may vanish; keep a recent reading
                self.read_tracker_traffic()
                last_traffic = now
            if now - last_memory >= MEMORY_EVERY_S:
                self.sample_memory()
                last_memory = now
            if on_update is not None:
                on_update(views)
            if all(not v.alive for v in views) and not (self.churn and self.churn.pending):
                return True
            if deadline is not None and now >= deadline:
                return False
            if stop.wait(interval):
                return False


# --- summary -------------------------------------------------------------------------------------


def bandwidth(
    *,
    state_bytes: int,
    peer_rounds: Sequence[int],
    tracker_bytes_in: int | None,
    tracker_bytes_out: int | None,
    p2p_bytes_sent: int,
    p2p_bytes_received: int,
    server_bytes_sent: int | None = None,
    server_bytes_received: int | None = None,
) -> dict[str, Any]:
    """Bytes the swarm moved beside what one central aggregating server would have moved.

    A central server receives every peer's update and sends the aggregate back each round:
    ``2 x state_bytes`` per completed peer-round (``2 x peers x rounds x state`` when all finish);
    payload only, so an underestimate of a real server's traffic: that is the formula,
    ``central_server_bytes``. A run with a real server (``SwarmConfig.central``) adds what its
    transport counted, headers and refused polls included: ``server_bytes_sent`` and
    ``_received`` (None without one). The tracker only lists peers, so its bytes (in + out, HTTP
    headers included) are what the swarm put through any central point besides. Ratios are None
    when a total is unknown or zero.
    """
    central = 2 * state_bytes * sum(peer_rounds)
    server = None
    if server_bytes_sent is not None and server_bytes_received is not None:
        server = server_bytes_sent + server_bytes_received
    tracker = None
    if tracker_bytes_in is not None and tracker_bytes_out is not None:
        tracker = tracker_bytes_in + tracker_bytes_out
    return {
        "state_bytes": state_bytes,
        "peer_rounds": sum(peer_rounds),
        "central_server_bytes": central,
        "tracker_bytes_in": tracker_bytes_in,
        "tracker_bytes_out": tracker_bytes_out,
        "tracker_bytes": tracker,
        "tracker_vs_central": None if tracker is None or not central else tracker / central,
        "p2p_bytes_sent": p2p_bytes_sent,
        "p2p_bytes_received": p2p_bytes_received,
        "p2p_vs_central": p2p_bytes_sent / central if central else None,
        "server_bytes_sent": server_bytes_sent,
        "server_bytes_received": server_bytes_received,
        "server_bytes": server,
        "server_vs_central": None if server is None or not central else server / central,
    }


def _peer_result(
    index: int, folder: Path, records: list[dict[str, Any]], returncode: int | None
) -> dict[str, Any]:
    status = read_status(folder) or {}
    view = view_of(index, pid=0, returncode=returncode, status=status or None)
    accuracies = [r["test_accuracy"] for r in records if _number(r.get("test_accuracy"), float)]
    rounds_done = {int(r["round"]) for r in records if _number(r.get("round"), int) is not None}
    sent = sum(_number(r.get("bytes_sent"), int) or 0 for r in records)
    received = sum(_number(r.get("bytes_received"), int) or 0 for r in records)
    peer_id = view.peer_id or next((r["peer_id"] for r in records if "peer_id" in r), None)
    slowdown = next((_number(r.get("slowdown"), float) for r in reversed(records)), None)
    epsilon = next((_number(r.get("epsilon"), float) for r in reversed(records)), None)
    return {
        "test_metrics": _final_metrics(records),
        "node": index,
        "peer_id": peer_id,
        "state": view.state,
        "exit_code": returncode,
        "rounds_completed": len(rounds_done),
        "last_round": max(rounds_done, default=0),
        "test_accuracy": float(accuracies[-1]) if accuracies else None,
        "slowdown": slowdown or 1.0,
        "epsilon": epsilon,
        "stopped": status.get("stopped") if isinstance(status.get("stopped"), str) else None,
        # status.json counts every byte of the run; the per-round records are the fallback.
        "bytes_sent": max(view.bytes_sent, sent),
        "bytes_received": max(view.bytes_received, received),
    }


_BUILTIN_METRICS = ("accuracy", "loss", "precision", "recall", "f1")
"""The test scores a built-in session's records hold as ``test_<name>`` fields."""


def _final_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The last round's finite test scores: a task's ``test_metrics``, else the built-in fields."""
    for record in reversed(records):
        scores = record.get("test_metrics")
        if not isinstance(scores, dict):
            scores = {name: record.get(f"test_{name}") for name in _BUILTIN_METRICS}
        finite = {str(k): float(v) for k, v in scores.items() if _number(v, float) is not None}
        if finite:
            return finite
    return {}


def metric_spread(peers: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """For every test metric any peer reported: mean and std across peers, and how many had it.

    Sorted by name; the std is the population one (0 for a single peer).
    """
    names = sorted({name for p in peers for name in p.get("test_metrics") or {}})
    spread: dict[str, dict[str, Any]] = {}
    for name in names:
        values = [p["test_metrics"][name] for p in peers if name in (p.get("test_metrics") or {})]
        mean, std = _mean_std(values)
        spread[name] = {"mean": mean, "std": std, "peers": len(values)}
    return spread


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def summarize_swarm(
    out: Path,
    *,
    torrent: Torrent,
    tracker_traffic: Mapping[str, int] | None,
    returncodes: Mapping[int, int | None] | None = None,
    interrupted: bool = False,
    wall_seconds: float | None = None,
    resources: Mapping[str, Any] | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Merge every peer folder under ``out/peers`` into ``rounds.jsonl``, ``summary.json``, plots.

    Args:
        out: the run folder.
        torrent: the session the peers ran (its state size prices the central server).
        tracker_traffic: ``{"bytes_in", "bytes_out"}`` of this swarm at the tracker, if known.
        returncodes: exit status per node index, when the peers were processes of this launcher.
        interrupted: the run was stopped before the peers finished.
        wall_seconds: how long the run took.
        resources: what the launcher measured of its processes (``processes``, ``cpu_seconds``,
            ``peak_memory_bytes``); the summary adds ``memory_per_peer_bytes``.
        plots: draw ``plots/accuracy.png``, ``bytes.png`` and ``bandwidth.png``.

    Returns:
        The summary written to ``out/summary.json``.
    """
    out = Path(out)
    returncodes = dict(returncodes or {})
    folders = sorted((out / PEERS_FOLDER).glob("peer-*"))
    for path in (out / "rounds.jsonl", out / "rounds.csv"):
        path.unlink(missing_ok=True)  # rebuilt from the peer folders each time
    peers = []
    records_of: dict[int, list[dict[str, Any]]] = {}
    with RecordWriter(out, name="rounds", fields=ROUND_FIELDS) as writer:
        for folder in folders:
            index = int(folder.name.removeprefix("peer-"))
            metrics = folder / "metrics.jsonl"
            records = records_of[index] = list(iter_records(metrics)) if metrics.exists() else []
            for record in records:
                writer.write({"node": index, **record})
            peers.append(_peer_result(index, folder, records, returncodes.get(index)))
    finals = [p["test_accuracy"] for p in peers if p["test_accuracy"] is not None]
    mean, std = _mean_std(finals)
    traffic = tracker_traffic or {}
    server = central_server(out / SERVER_FOLDER, returncodes.get(SERVER_INDEX))
    measured = (server or {}).get("traffic") or {}
    summary = {
        "session": torrent.session.name,
        "info_hash": torrent.info_hash,
        "mixing": torrent.session.mixing.rule,
        "rounds": torrent.session.rounds,
        "peers": len(peers),
        "finished": sum(p["state"] == "done" for p in peers),
        "interrupted": interrupted,
        "wall_seconds": wall_seconds,
        "resources": _resources(resources, len(peers)),
        "test_accuracy_mean": mean,
        "test_accuracy_std": std,
        "task": torrent.session.task.label if torrent.session.task is not None else None,
        "test_metrics": metric_spread(peers),
        "bandwidth": bandwidth(
            state_bytes=torrent.session.state_size,
            peer_rounds=[p["rounds_completed"] for p in peers],
            tracker_bytes_in=traffic.get("bytes_in"),
            tracker_bytes_out=traffic.get("bytes_out"),
            p2p_bytes_sent=sum(p["bytes_sent"] for p in peers),
            p2p_bytes_received=sum(p["bytes_received"] for p in peers),
            server_bytes_sent=measured.get("bytes_sent"),
            server_bytes_received=measured.get("bytes_received"),
        ),
        "central": server,
        "per_peer": peers,
        "slow_peers": [p["node"] for p in peers if p["slowdown"] > 1],
        "security": swarm_security(folders, peers),
        "neighbours": swarm_neighbours(folders),
        "faults": swarm_faults(records_of),
        "churn": churn_summary(out, peers, joined=_joined_rounds(folders)),
    }
    write_json(out / "summary.json", summary)
    if plots and folders:
        plot_swarm(out)
    return summary


def _resources(measured: Mapping[str, Any] | None, peers: int) -> dict[str, Any] | None:
    if measured is None:
        return None
    peak = measured.get("peak_memory_bytes")
    per_peer = round(peak / peers) if isinstance(peak, int) and peers else None
    return {**measured, "memory_per_peer_bytes": per_peer}


def _joined_rounds(folders: Sequence[Path]) -> dict[int, int | None]:
    """Per node: the round a ``--join`` peer says it joined at (its ``joined.json``)."""
    rounds: dict[int, int | None] = {}
    for folder in folders:
        try:
            joined = read_json(folder / JOINED_FILE)
        except DataError:
            continue
        value = joined.get("round") if isinstance(joined, dict) else None
        rounds[int(folder.name.removeprefix("peer-"))] = _number(value, int)
    return rounds


def central_server(folder: Path, returncode: int | None = None) -> dict[str, Any] | None:
    """The central server's part of a run summary, from its folder; None when it has none.

    ``traffic``: the bytes its transport counted (``bytes_sent``, ``bytes_received``, and the
    header and payload split of this process); ``heard_per_round``: clients averaged per round.
    """
    status = read_status(folder)
    try:
        own = read_json(folder / "summary.json")
    except DataError:
        own = None
    if status is None and own is None:
        return None

    def part(value: Any, name: str) -> dict[str, Any]:
        inner = value.get(name) if isinstance(value, dict) else None
        return inner if isinstance(inner, dict) else {}

    traffic, server = part(own, "traffic"), part(own, "server")
    return {
        "state": view_of(SERVER_INDEX, pid=0, returncode=returncode, status=status).state,
        "exit_code": returncode,
        "rounds_done": _number(own.get("rounds_done"), int) if isinstance(own, dict) else None,
        "clients": _number(server.get("clients"), int),
        "heard_per_round": server.get("heard_per_round"),
        "traffic": {
            "bytes_sent": _number(traffic.get("bytes_sent"), int),
            "bytes_received": _number(traffic.get("bytes_received"), int),
            "this_process": traffic.get("this_process"),
        },
    }


def swarm_security(folders: Sequence[Path], peers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The run's security metric, from each peer's ``summary.json`` (its ``security`` part).

    ``weight_to_attackers``: the mean, over honest peers, of the mean mixing weight each gave an
    attacker in its cohort (0 for a rejected one), None when no honest peer met one or the rule
    has no weights; ``rejections``: bad messages refused, by reason, summed over peers;
    ``epsilon``: the most any peer spent (None without DP), ``epsilon_per_peer`` each one's (by
    peer id), with the ``delta`` and ``privacy_unit`` they are at; ``budget_stopped``: the peers
    that ended at their ``--dp-max-epsilon``. Attackers are peers whose summary names an attack.
    """
    security: dict[str, dict[str, Any]] = {}
    rejections: dict[str, int] = {}
    budget_stopped: list[str] = []
    for folder, peer in zip(folders, peers, strict=True):
        try:
            own = read_json(folder / "summary.json")
        except DataError:
            continue
        if not isinstance(own, dict):
            continue
        part = own.get("security")
        if isinstance(part, dict) and isinstance(peer.get("peer_id"), str):
            security[peer["peer_id"]] = part
            if own.get("stopped") == "privacy_budget":
                budget_stopped.append(peer["peer_id"])
        for reason, count in (own.get("rejections") or {}).items():
            if isinstance(count, int):
                rejections[str(reason)] = rejections.get(str(reason), 0) + count
    attackers = sorted(p for p, part in security.items() if part.get("attack"))
    given = []
    for peer_id, part in security.items():
        weights = part.get("weight_given") or {}
        if peer_id in attackers or not isinstance(weights, dict):
            continue
        on_attackers = [float(w) for p, w in weights.items() if p in attackers]
        if on_attackers:
            given.append(sum(on_attackers) / len(on_attackers))
    per_peer = {
        peer_id: _number(part.get("epsilon"), float)
        for peer_id, part in sorted(security.items())
        if _number(part.get("epsilon"), float) is not None
    }
    epsilons = list(per_peer.values())
    private = [part for part in security.values() if part.get("privacy_unit") is not None]
    honest = [
        float(p["test_accuracy"])
        for p in peers
        if p.get("peer_id") not in attackers and p.get("test_accuracy") is not None
    ]
    honest_mean, honest_std = _mean_std(honest)
    return {
        "honest_accuracy_mean": honest_mean,
        "honest_accuracy_std": honest_std,
        "attackers": attackers,
        "attack": next((security[p]["attack"] for p in attackers), None),
        "weight_to_attackers": sum(given) / len(given) if given else None,
        "rejections": rejections,
        "rejected": sum(rejections.values()),
        "epsilon": max(epsilons) if epsilons else None,
        "epsilon_per_peer": per_peer,
        "delta": next((part.get("delta") for part in private), None),
        "privacy_unit": next((part.get("privacy_unit") for part in private), None),
        "budget_stopped": sorted(budget_stopped),
    }


def swarm_neighbours(folders: Sequence[Path]) -> dict[str, Any]:
    """Candidate peers skipped and neighbours heard, from each peer's ``summary.json``.

    ``candidates_skipped``: per reason, summed over peers and rounds; ``heard_distinct``: per
    peer id, how many distinct neighbours ever brought it a verified state; ``replaced``: cohort
    members that failed fast and were replaced from the reserve, summed over peers;
    ``bytes_saved``: trust-aware fetching's estimate of the downloads it saved, summed over peers.
    """
    skipped: dict[str, int] = {}
    heard: dict[str, int] = {}
    replaced = saved = 0
    for folder in folders:
        try:
            own = read_json(folder / "summary.json")
        except DataError:
            continue
        part = own.get("neighbours") if isinstance(own, dict) else None
        if not isinstance(part, dict):
            continue
        for reason, count in (part.get("candidates_skipped") or {}).items():
            if isinstance(count, int):
                skipped[str(reason)] = skipped.get(str(reason), 0) + count
        if isinstance(part.get("heard_distinct"), int):
            heard[str(own.get("peer_id"))] = part["heard_distinct"]
        if isinstance(part.get("replaced"), int):
            replaced += part["replaced"]
        if isinstance(part.get("bytes_saved"), int):
            saved += part["bytes_saved"]
    return {
        "candidates_skipped": skipped,
        "skipped": sum(skipped.values()),
        "heard_distinct": heard,
        "replaced": replaced,
        "bytes_saved": saved,
    }


def swarm_faults(records_of: Mapping[int, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """What faults cost the exchanges, from the peers' round records (``Exchange.costs``).

    ``retries``: requests re-sent to a neighbour within a round, summed over peers and rounds;
    ``failed``: {kind: n} requests that brought no state (``timeout``, ``unreachable``,
    ``refused:not_ready``, ...), summed likewise; ``time_lost_s``: seconds the peers' exchanges
    waited on neighbours that in the end brought nothing newer, summed over peers and rounds
    (peer-seconds, not wall time); ``per_peer``: node index -> the same three for that peer, and
    ``worst_round_lost_s``, its largest ``time_lost_s`` of one round. Records without these
    fields (older runs) count as zero.
    """
    per_peer: dict[str, dict[str, Any]] = {}
    failed_all: Counter[str] = Counter()
    for index, records in sorted(records_of.items()):
        failed: Counter[str] = Counter()
        lost = [_number(r.get("time_lost_s"), float) or 0.0 for r in records]
        for record in records:
            kinds = record.get("failed")
            if isinstance(kinds, dict):
                failed.update({str(k): v for k, n in kinds.items() if (v := _number(n, int))})
        failed_all.update(failed)
        per_peer[str(index)] = {
            "retries": sum(_number(r.get("retries"), int) or 0 for r in records),
            "failed": dict(failed),
            "time_lost_s": sum(lost),
            "worst_round_lost_s": max(lost, default=0.0),
        }
    return {
        "retries": sum(p["retries"] for p in per_peer.values()),
        "failed": dict(failed_all),
        "time_lost_s": sum(p["time_lost_s"] for p in per_peer.values()),
        "per_peer": per_peer,
    }


def run_swarm(
    config: SwarmConfig,
    *,
    stop: threading.Event | None = None,
    on_update: Callable[[list[PeerView]], None] | None = None,
    timeout: float | None = None,
    plots: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Launch the swarm, wait for it (or ``stop`` / ``timeout``), stop it and summarize it.

    Args:
        config: the launch.
        stop: set it (from another thread or a signal handler) to stop the peers early.
        on_update: called with every peer's :class:`PeerView` after each poll (twice a second)
            and once at the end, besides the progress bar.
        timeout: seconds to wait at most before stopping the peers (None: until they finish).
        plots: draw ``plots/`` in ``config.out`` at the end.
        progress: show a bar of rounds done across all peers on stderr, in a terminal or a
            notebook only (:func:`fedtorrent.progress.progress_bar`); False shows nothing.

    Returns:
        The summary (also in ``config.out/summary.json``).
    """
    from fedtorrent.progress import progress_bar  # noqa: PLC0415

    started = time.monotonic()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    swarm = Swarm(config)
    with swarm, progress_bar("swarm", total=None, enabled=progress) as advance:
        assert swarm.torrent is not None
        rounds = config.rounds or swarm.torrent.session.rounds

        def update(views: list[PeerView]) -> None:
            done = sum(min(view.round, rounds) for view in views)
            running = sum(view.alive for view in views)
            advance(done, total=rounds * len(views), description=f"swarm: {running} running")
            if on_update is not None:
                on_update(views)

        finished = swarm.wait(stop=stop, on_update=update, timeout=timeout)
    if on_update is not None:
        on_update(swarm.views())
    cpu = [
        (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        for before, after in (
            (children, resource.getrusage(resource.RUSAGE_CHILDREN)),
            (own, resource.getrusage(resource.RUSAGE_SELF)),
        )
    ]
    resources = {
        "processes": len(swarm.processes()),
        "cpu_seconds": round(sum(cpu), 2),
        "peer_cpu_seconds": round(cpu[0], 2),
        "peak_memory_bytes": swarm.peak_memory,
    }
    return summarize_swarm(
        config.out,
        torrent=swarm.torrent,
        tracker_traffic=swarm.tracker_traffic,
        returncodes=swarm.returncodes(),
        interrupted=not finished,
        wall_seconds=time.monotonic() - started,
        resources=resources,
        plots=plots,
    )


# --- plots (matplotlib loaded lazily, drawn from the run folder's files only) --------------------


def plot_swarm(out: Path) -> list[Path]:
    """Draw ``plots/accuracy.png``, ``bytes.png`` and ``bandwidth.png`` from a summarized run."""
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    from fedtorrent.metrics.plots import clamp_ylim, clipped_band  # noqa: PLC0415

    out = Path(out)
    summary = read_json(out / "summary.json")
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    made = []

    by_node: dict[int, dict[int, float]] = {}
    rounds_path = out / "rounds.jsonl"
    for record in iter_records(rounds_path) if rounds_path.exists() else []:
        accuracy = _number(record.get("test_accuracy"), float)
        if accuracy is not None and _number(record.get("round"), int) is not None:
            by_node.setdefault(int(record["node"]), {})[int(record["round"])] = accuracy
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.subplots()
    for node, curve in sorted(by_node.items()):
        xs = sorted(curve)
        axes.plot(xs, [100 * curve[x] for x in xs], linewidth=0.8, alpha=0.6, label=f"peer {node}")
    all_rounds = sorted({r for curve in by_node.values() for r in curve})
    if all_rounds:
        stats = [_mean_std([c[r] for c in by_node.values() if r in c]) for r in all_rounds]
        mean = [100 * (m or 0.0) for m, _ in stats]
        std = [100 * (s or 0.0) for _, s in stats]
        axes.plot(all_rounds, mean, color="black", linewidth=2, label="mean")
        lower, upper = clipped_band(mean, std)
        axes.fill_between(all_rounds, lower, upper, color="black", alpha=0.15, label="± std")
    clamp_ylim(axes)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("round")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(f"{summary.get('session')}: {summary.get('peers')} peers")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    made.append(_save(figure, plots / "accuracy.png"))

    peers = summary.get("per_peer", [])
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.subplots()
    xs = list(range(len(peers)))
    mib = 1 << 20
    axes.bar([x - 0.2 for x in xs], [p["bytes_sent"] / mib for p in peers], 0.4, label="sent")
    axes.bar(
        [x + 0.2 for x in xs], [p["bytes_received"] / mib for p in peers], 0.4, label="received"
    )
    axes.set_xticks(xs, [f"peer {p['node']}" for p in peers])
    axes.set_ylabel("MiB")
    axes.set_title("peer-to-peer bytes per peer")
    axes.legend()
    made.append(_save(figure, plots / "bytes.png"))

    band = summary["bandwidth"]
    bars = {
        "central server\n(formula: 2 x peers\nx rounds x state)": band["central_server_bytes"],
        "peer-to-peer\n(sum of bytes sent)": band["p2p_bytes_sent"],
        "tracker\n(in + out)": band["tracker_bytes"] or 0,
    }
    if band.get("server_bytes") is not None:
        bars["central server\n(measured,\nsent + received)"] = band["server_bytes"]
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.subplots()
    positions = list(range(len(bars)))
    colours = ["grey", "tab:blue", "tab:green", "tab:red"][: len(bars)]
    axes.bar(positions, [max(v, 1) for v in bars.values()], color=colours)
    axes.set_yscale("log")
    axes.set_ylim(bottom=max(1, min(max(v, 1) for v in bars.values()) / 10))
    axes.set_xticks(positions, list(bars), fontsize=8)
    for x, value in zip(positions, bars.values(), strict=True):
        axes.annotate(human_bytes(value), (x, max(value, 1)), ha="center", va="bottom", fontsize=8)
    axes.set_ylabel("bytes (log scale)")
    axes.set_title("bytes moved: one central server vs this swarm")
    made.append(_save(figure, plots / "bandwidth.png"))
    return made


def _save(figure: Any, path: Path) -> Path:
    figure.savefig(path, dpi=120)
    return path


def human_bytes(value: float) -> str:
    """``1536`` -> ``1.5 KiB``: sizes for tables and plot labels."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
