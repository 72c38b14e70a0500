"""Frozen, validated settings for every part of fedtorrent; passed down explicitly, never global.

Each dataclass checks itself in ``__post_init__`` and raises ``ConfigError`` naming the field, so a
bad value fails where it is written, not deep inside a training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedtorrent.errors import ConfigError

SPLITS = ("iid", "noniid", "shards", "unbalanced", "label_swap", "rotated")
"""iid balanced; label skew by Dirichlet(alpha); label skew by k classes per node; quantity skew;
clustered (``CLUSTERED_SPLITS``)."""
CLUSTERED_SPLITS = ("label_swap", "rotated")
"""Splits into ``clusters`` groups of nodes (node i in group i mod K) whose examples, dealt iid,
differ by a fixed transformation per group: its own label permutation, or a rotation by
``c * 360 / K`` degrees (``fedtorrent.data.clusters``)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where its files are, and how it is split across nodes."""

    dataset: str = "mnist"
    data_dir: Path | None = None
    num_nodes: int = 6
    split: str = "iid"
    alpha: float = 0.5
    """Dirichlet concentration: label skew for ``noniid``, size skew for ``unbalanced``."""
    classes_per_node: int = 2
    """For ``shards``: how many classes each node sees."""
    min_per_node: int = 10
    """For ``unbalanced``: the fewest examples any node gets."""
    val_fraction: float = 0.2
    seed: int = 0
    clusters: int = 1
    """For ``label_swap`` and ``rotated``: how many groups (2 to ``num_nodes``); else 1."""

    def __post_init__(self) -> None:
        _require(self.num_nodes >= 1, f"num_nodes must be >= 1, got {self.num_nodes}")
        if self.split in CLUSTERED_SPLITS:
            _require(
                2 <= self.clusters <= self.num_nodes,
                f"split {self.split} needs clusters in [2, num_nodes={self.num_nodes}], "
                f"got {self.clusters}",
            )
        else:
            _require(
                self.clusters == 1,
                f"clusters={self.clusters} needs split label_swap or rotated, not {self.split!r}",
            )
        _require(
            self.split in SPLITS, f"split must be one of {', '.join(SPLITS)}; got {self.split!r}"
        )
        _require(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _require(
            self.classes_per_node >= 1,
            f"classes_per_node must be >= 1, got {self.classes_per_node}",
        )
        _require(self.min_per_node >= 1, f"min_per_node must be >= 1, got {self.min_per_node}")
        _require(
            0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}"
        )


@dataclass(frozen=True)
class ModelConfig:
    """A registry name plus keyword arguments for its factory."""

    name: str = "logreg"
    kwargs: dict[str, Any] = field(default_factory=dict)


OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine")
"""``cosine`` decays the rate from ``lr`` to 0 over the batches of one training call."""


@dataclass(frozen=True)
class TrainConfig:
    """Local training: ``epochs`` passes over the node's data, or exactly ``steps`` batches."""

    epochs: int = 1
    steps: int | None = None
    batch_size: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        _require(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        _require(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _require(
            self.optimizer in OPTIMIZERS,
            f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}",
        )
        _require(self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(
            self.lr_schedule in LR_SCHEDULES,
            f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_schedule!r}",
        )


BASELINE_TRAIN = TrainConfig(
    epochs=10, batch_size=64, lr=0.005, optimizer="adam", lr_schedule="cosine"
)
"""The centralized baseline (``fedtorrent train``): logreg gets ~92.8% on MNIST, ~84.8% Fashion."""


ATTACKS = (
    "noise",
    "sign_flip",
    "scale",
    "label_flip",
    "free_rider",
    "nan",
    "extreme",
    "extreme_mixed",
)
"""Poisoning attacks (``fedtorrent.adversary``)."""
MIXING_RULES = (
    "none",
    "fixed",
    "metropolis",
    "learned",
    "fedfomo",
    "median",
    "trimmed_mean",
    "krum",
)
SIM_ONLY_RULES = ("oracle",)
"""Reference rules that read what a real peer cannot know, so only the simulator runs them:
``oracle`` mixes uniformly over the cohort members in the node's true cluster."""
TOPOLOGIES = ("complete", "ring", "regular", "erdos_renyi", "random_cohort")


@dataclass(frozen=True)
class MixingConfig:
    """How a node combines its cohort's parameters (DeGroot mixing) and how trust is learned."""

    rule: str = "learned"
    trust_lr: float = 5.0
    """Step size of plain SGD on the trust logits (much larger than the model's, on purpose)."""
    trust_steps: int = 10
    trust_batch_size: int = 256
    """Validation examples per trust step, and in the one batch ``fedfomo`` scores models on
    (drawn with replacement from the node's val split)."""
    weight_floor: float = 0.0
    """Lowest weight any cohort member may get; keeps learned trust closer to uniform."""
    entropy_penalty: float = 0.0
    trust_margin: float = 0.0
    """If > 0, learned weights are used in a round only when, on a fresh validation batch, they
    lower the mixed model's loss by this fraction below uniform weights' (else that round mixes
    uniformly; the logits keep learning). 0 (default) turns the check off: always learned. Off by
    default: it did not lift iid accuracy and it lets harmless-looking attackers back in."""
    trim_ratio: float = 0.2
    """For ``trimmed_mean``: fraction cut from each end per coordinate."""
    byzantine: int = 1
    """For ``krum``: how many attackers to tolerate."""
    plausibility: float = 10.0
    """Plausibility screen (``mixing.screen``), before any rule mixes: a received state farther
    from the node's own trained vector than this multiple of the lower median of ``[own norm,
    every received distance]`` is rejected as ``implausible``. 0 turns the screen off."""
    skip_below: float = 0.0
    """Trust-aware fetching (``rule="learned"`` only; ``node.skipping``): a real peer does not
    download a cohort member whose weight in its mix stayed below this for its last
    ``skip_after`` mixed rounds, and probes it again after ``skip_after`` skipped rounds. 0 (the
    default) turns it off. The simulator does not model it."""
    skip_after: int = 3
    """Rounds (mixed below ``skip_below``, then skipped) before a member is skipped, then probed."""
    trust_cohorts: float | None = None
    """Trust-guided cohorts (``rule="learned"`` only; ``mixing.cohort``): the exploration share
    ``e`` in ``[0, 1]``. A node picks ``round(k (1 - e))`` of its ``k`` cohort members among its
    candidates (the tracker's answer; in the simulator a sample of ``CANDIDATE_FACTOR k`` nodes)
    by highest trust logit, the rest at random. None (the default) keeps the plain choice: the
    neighbour book's order in a peer, uniform random cohorts in the simulator."""
    trust_decay: float = 0.0
    """Each round a peer is not heard, its trust logit moves this fraction of the way back to the
    prior (0, where every logit starts): ``a <- (1 - d) a``. 0 (the default) turns it off."""

    def __post_init__(self) -> None:
        rules = (*MIXING_RULES, *SIM_ONLY_RULES)
        _require(
            self.rule in rules, f"mixing rule must be one of {', '.join(rules)}; got {self.rule!r}"
        )
        _require(self.trust_lr > 0, f"trust_lr must be > 0, got {self.trust_lr}")
        _require(self.trust_steps >= 0, f"trust_steps must be >= 0, got {self.trust_steps}")
        _require(
            self.trust_batch_size >= 1,
            f"trust_batch_size must be >= 1, got {self.trust_batch_size}",
        )
        _require(
            0 <= self.weight_floor < 1, f"weight_floor must be in [0, 1), got {self.weight_floor}"
        )
        _require(
            self.entropy_penalty >= 0, f"entropy_penalty must be >= 0, got {self.entropy_penalty}"
        )
        _require(
            0 <= self.trust_margin < 1, f"trust_margin must be in [0, 1), got {self.trust_margin}"
        )
        _require(
            0 <= self.trim_ratio < 0.5, f"trim_ratio must be in [0, 0.5), got {self.trim_ratio}"
        )
        _require(self.byzantine >= 0, f"byzantine must be >= 0, got {self.byzantine}")
        _require(
            self.plausibility == 0 or 1 < self.plausibility < float("inf"),
            f"plausibility must be 0 (off) or a finite multiple > 1, got {self.plausibility}",
        )
        _require(0 <= self.skip_below < 1, f"skip_below must be in [0, 1), got {self.skip_below}")
        _require(self.skip_after >= 1, f"skip_after must be >= 1, got {self.skip_after}")
        _require(
            self.trust_cohorts is None or 0 <= self.trust_cohorts <= 1,
            f"trust_cohorts (exploration share) must be in [0, 1], got {self.trust_cohorts}",
        )
        _require(
            0 <= self.trust_decay < 1, f"trust_decay must be in [0, 1), got {self.trust_decay}"
        )
        if self.trust_cohorts is not None or self.trust_decay > 0:
            _require(
                self.rule == "learned",
                f"trust_cohorts and trust_decay need the learned mixing rule (they read trust "
                f"logits), not {self.rule!r}",
            )
        if self.skip_below > 0:
            _require(
                self.rule == "learned",
                f"skip_below needs the learned mixing rule (it reads trust weights), "
                f"not {self.rule!r}",
            )
            _require(
                self.skip_below > self.weight_floor,
                f"skip_below ({self.skip_below}) must exceed weight_floor ({self.weight_floor}): "
                "no weight falls below the floor",
            )


@dataclass(frozen=True)
class TopologyConfig:
    """Who a node may mix with each round."""

    kind: str = "complete"
    degree: int = 2
    """Neighbours per node for ``regular`` and cohort size for ``random_cohort``."""
    edge_prob: float = 0.5
    """For ``erdos_renyi``."""

    def __post_init__(self) -> None:
        _require(
            self.kind in TOPOLOGIES,
            f"topology must be one of {', '.join(TOPOLOGIES)}; got {self.kind!r}",
        )
        _require(self.degree >= 1, f"degree must be >= 1, got {self.degree}")
        _require(0 < self.edge_prob <= 1, f"edge_prob must be in (0, 1], got {self.edge_prob}")


def _sim_train() -> TrainConfig:
    # With ``SimConfig.round_schedule="cosine"`` these reproduce the seed paper's tables.
    return TrainConfig(epochs=1, batch_size=64, lr=0.3)


@dataclass(frozen=True)
class SimConfig:
    """One simulated run: N nodes on one machine, ``rounds`` rounds of train-then-mix.

    ``seed`` drives the model's initial weights, batch order, trust batches and random cohorts;
    :meth:`with_seed` also moves the data split's and training's seeds, which is what "another
    seed" means in tables.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=_sim_train)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    rounds: int = 50
    round_schedule: str = "cosine"
    """How the local learning rate moves across rounds: ``constant``, or ``cosine`` from
    ``train.lr`` in the first round towards 0 in the last. Decaying it is what keeps label-skewed
    nodes from drifting apart late in a run."""
    seed: int = 0
    eval_every: int = 1
    """Score every node on the test set every this many rounds (and always after the last)."""
    eval_examples: int | None = None
    """Test examples used for the per-round curves (None: all); final scores use all of them."""
    privacy: PrivacyConfig | None = None
    """Differential privacy: update-level (``unit="node"``) on what every node shares, or
    example-level DP-SGD (``unit="example"``) in every node's local training."""
    attack: str | None = None
    """Poisoning attack of the last ``attackers`` nodes: one of ``ATTACKS``."""
    attackers: int = 0
    attack_scale: float | None = None
    """The attack's scale (default per attack; see ``fedtorrent.adversary``)."""
    attack_from: int = 0
    """The attackers behave honestly in rounds ``0 .. attack_from - 1`` and attack from round
    ``attack_from`` (0-based; 0: from the start). Not for ``label_flip`` (its poison is the
    training data, fixed at the start)."""
    compression: str = "none"
    """What nodes send each other, as on the wire (``state.compress``): ``none``, ``fp16``,
    ``bf16``, ``int8``, ``topk:F`` or ``topk:F,int8`` ...: public copies with error feedback."""

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        _require(
            (self.attack is None) == (self.attackers == 0),
            "an attack needs attackers >= 1, and attackers need an attack",
        )
        _require(
            self.attack is None or self.attack in ATTACKS,
            f"attack must be one of {', '.join(ATTACKS)}; got {self.attack!r}",
        )
        _require(
            0 <= self.attackers < self.data.num_nodes,
            f"attackers must be in [0, {self.data.num_nodes}), got {self.attackers}",
        )
        _require(self.attack_from >= 0, f"attack_from must be >= 0, got {self.attack_from}")
        _require(
            self.attack_from == 0 or (self.attack is not None and self.attack != "label_flip"),
            "attack_from needs an attack on what is shared (label_flip poisons the data from "
            "the start)",
        )
        _require(
            self.mixing.trust_cohorts is None or self.topology.kind == "random_cohort",
            "trust_cohorts choose random cohorts: they need the random_cohort topology",
        )
        _require(
            self.round_schedule in LR_SCHEDULES,
            f"round_schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.round_schedule!r}",
        )
        _require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _require(
            self.mixing.rule != "oracle" or self.data.split in CLUSTERED_SPLITS,
            "oracle mixing needs a clustered split (label_swap or rotated) to know the clusters",
        )
        _require(self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}")
        _require(
            self.eval_examples is None or self.eval_examples >= 1,
            f"eval_examples must be >= 1, got {self.eval_examples}",
        )
        if self.privacy is not None and self.privacy.example_level:
            check_private_mixing(self.mixing)

    def with_seed(self, seed: int) -> SimConfig:
        """The same run with ``seed`` for the run, the data split and local training."""
        return replace(
            self,
            seed=seed,
            data=replace(self.data, seed=seed),
            train=replace(self.train, seed=seed),
        )


IP_OVERRIDES = ("never", "private", "any")
"""Whose ``ip`` announce parameter the tracker believes: nobody's, private senders', anyone's."""


@dataclass(frozen=True)
class TrackerConfig:
    """The HTTP tracker: where it listens, how long peers live, and its limits on hostile input."""

    host: str = "127.0.0.1"
    port: int = 6969
    """0 picks a free port (tests)."""
    db_path: Path | None = None
    """SQLite file (WAL) that outlives restarts; None keeps swarms in memory only."""
    interval: int = 30
    """Seconds between a peer's announces; a peer silent for two intervals drops out."""
    numwant: int = 20
    max_numwant: int = 200
    max_peers_per_swarm: int = 50_000
    max_swarms: int = 1_000
    allow: frozenset[str] | None = None
    """Closed tracker: only these info-hashes (64 hex); None is open to any well-formed one."""
    rate_limit: float = 20.0
    """Requests per second per client address (token bucket); 0 turns the limit off. A peer
    announces a few times per round, so 20/s is far above what a handful of peers behind one
    address need, and far below a flood (which then gets 429 with ``Retry-After``)."""
    rate_burst: int = 100
    """Tokens a quiet address starts with: what it may send back-to-back before 429s."""
    max_peers_per_address: int = 8
    """Distinct live peer ids one source address may list in one swarm (0: no cap). Keeps one
    host from filling every cohort with sybils; a launcher that runs N peers on one address
    (``fedtorrent swarm``) sets it to N."""
    signature_window: float = 300.0
    """Seconds a signed announce's ``ts`` may differ from the tracker's clock (clock skew)."""
    header_timeout: float = 10.0
    """Seconds from a request's first byte until its head (request line and headers) must be
    complete; a slower client is cut off and counted."""
    idle_timeout: float = 15.0
    """Seconds a connection may sit without a request (after opening, or after an answer)."""
    max_connections_per_address: int = 32
    """Open connections one source address may hold (0: no cap); more are answered 503."""
    history_rounds: int = 500
    """Rounds of accuracy and traffic the dashboard's plots keep per peer."""
    history_peers: int = 256
    """Peers, over all swarms, whose history is kept: the most recently announced ones (so the
    plots cost at most ``history_peers * history_rounds`` points of memory)."""
    flush_interval: float = 0.5
    """Seconds between write-behind flushes to SQLite: the most announce state a crash loses."""
    ip_override: str = "private"
    max_url_bytes: int = 2048

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        _require(self.interval >= 1, f"interval must be >= 1, got {self.interval}")
        _require(
            0 <= self.numwant <= self.max_numwant,
            f"numwant must be in [0, max_numwant={self.max_numwant}], got {self.numwant}",
        )
        _require(
            self.max_peers_per_swarm >= 1,
            f"max_peers_per_swarm must be >= 1, got {self.max_peers_per_swarm}",
        )
        _require(self.max_swarms >= 1, f"max_swarms must be >= 1, got {self.max_swarms}")
        _require(self.rate_limit >= 0, f"rate_limit must be >= 0, got {self.rate_limit}")
        _require(self.rate_burst >= 1, f"rate_burst must be >= 1, got {self.rate_burst}")
        _require(self.flush_interval > 0, f"flush_interval must be > 0, got {self.flush_interval}")
        for name in ("max_peers_per_address", "max_connections_per_address"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("signature_window", "header_timeout", "idle_timeout"):
            value = getattr(self, name)
            _require(0 < value <= 86_400, f"{name} must be in (0, 86400] seconds, got {value}")
        for name in ("history_rounds", "history_peers"):
            value = getattr(self, name)
            _require(1 <= value <= 100_000, f"{name} must be in [1, 100000], got {value}")
        _require(
            self.ip_override in IP_OVERRIDES,
            f"ip_override must be one of {', '.join(IP_OVERRIDES)}; got {self.ip_override!r}",
        )
        _require(
            256 <= self.max_url_bytes <= 8190,
            f"max_url_bytes must be in [256, 8190], got {self.max_url_bytes}",
        )
        for info_hash in self.allow or ():
            _require(
                len(info_hash) == 64 and all(c in "0123456789abcdef" for c in info_hash),
                f"allow holds {info_hash!r}, not 64 lowercase hex characters",
            )


DP_ACCOUNTANTS = ("rdp", "prv")
DP_UNITS = ("node", "example")
"""What one differential-privacy guarantee protects: a node's whole dataset, or one example."""
_INF = float("inf")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy on what a peer shares; off unless ``clip`` is set.

    ``unit="node"`` (update-level DP): each round's update (the change since the peer last mixed)
    is clipped to L2 norm ``clip`` and noised with std ``noise_multiplier * clip``: the guarantee
    covers a peer's whole local dataset. ``unit="example"`` (DP-SGD): the same two numbers clip
    and noise every example's gradient in local training instead, on Poisson-sampled batches, and
    nothing is added to what the peer shares (a guarantee per training example; see
    :mod:`fedtorrent.privacy.dp_sgd`). Give either ``noise_multiplier`` or ``target_epsilon`` (the
    noise is then derived for the planned rounds).
    """

    clip: float | None = None
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    unit: str = "node"
    """One of ``DP_UNITS``: ``node`` (update-level DP) or ``example`` (DP-SGD)."""
    trust_clip: float = 0.1
    """``unit="example"`` with learned trust: L2 bound on each validation example's gradient of
    the trust logits (``mixing.trust.TrustDP``). Honest examples' are about 0.001 on MNIST, a
    sign-flipper's about 2.5: a small clip still shuts it out."""
    trust_noise: float = 30.0
    """``unit="example"`` with learned trust: the trust fit's noise multiplier (noise std over
    ``trust_clip``); its releases are charged to the same accountant as training's."""

    @property
    def enabled(self) -> bool:
        """Whether anything is clipped and noised at all."""
        return self.clip is not None

    @property
    def update_level(self) -> bool:
        """Whether each shared update is clipped and noised (``unit="node"``, enabled)."""
        return self.enabled and self.unit == "node"

    @property
    def example_level(self) -> bool:
        """Whether local training runs DP-SGD (``unit="example"``, enabled)."""
        return self.enabled and self.unit == "example"

    def __post_init__(self) -> None:
        noise, target = self.noise_multiplier, self.target_epsilon
        _require(
            self.clip is None or 0 < self.clip < _INF, f"dp clip must be finite > 0: {self.clip}"
        )
        _require(
            noise is None or 0 < noise < _INF, f"dp noise_multiplier must be finite > 0: {noise}"
        )
        _require(
            target is None or 0 < target < _INF, f"dp target_epsilon must be finite > 0: {target}"
        )
        _require(
            noise is None or target is None,
            "give either a dp noise_multiplier or a dp target_epsilon, not both",
        )
        _require(
            self.unit in DP_UNITS,
            f"dp unit must be one of {', '.join(DP_UNITS)}; got {self.unit!r}",
        )
        if self.clip is None:
            _require(
                noise is None and target is None and self.unit == "node",
                "dp noise, a target epsilon and dp unit 'example' need a dp clip norm",
            )
        else:
            _require(
                noise is not None or target is not None,
                "dp clip needs a dp noise_multiplier or a dp target_epsilon",
            )
        _require(0 < self.delta < 1, f"dp delta must be in (0, 1), got {self.delta}")
        for name in ("trust_clip", "trust_noise"):
            value = getattr(self, name)
            _require(0 < value < _INF, f"dp {name} must be finite > 0: {value}")
        _require(
            self.accountant in DP_ACCOUNTANTS,
            f"dp accountant must be one of {', '.join(DP_ACCOUNTANTS)}; got {self.accountant!r}",
        )


def check_private_mixing(config: MixingConfig) -> None:
    """Refuse mixing settings that read private validation data outside the DP accounting.

    Under example-level DP learned trust is fitted with ``mixing.trust.TrustDP``; ``fedfomo``
    (weights from validation losses) and learned trust's held-out check (``trust_margin > 0``,
    one more comparison of validation losses) have no private version. Called by every
    :class:`SimConfig` and session with example-level privacy, and by the round itself.

    Raises:
        ConfigError: one line naming the setting.
    """
    if config.rule == "fedfomo":
        raise ConfigError(
            "fedfomo scores models on private validation data without DP: under example-level "
            "DP use learned (fitted privately), fixed or metropolis mixing"
        )
    if config.rule == "learned" and config.trust_margin > 0:
        raise ConfigError(
            "trust_margin's held-out check compares validation losses without DP: set "
            "trust_margin 0 under example-level DP"
        )
