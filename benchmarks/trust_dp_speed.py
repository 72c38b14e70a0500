"""Time of learned trust's fit per round: plain against private (``TrustDP``, DP-SGD on the logits).

MNIST, iid, 6 nodes (complete graph), the default trust settings (10 steps, batch 256); the
engine first trains and mixes ``--warm`` rounds without DP so the models are realistic. Then the
same ``mixing.round.mix_round`` call, all nodes at once as the engine makes it, is timed with a
plain ``Trust`` (fixed-size batches with replacement, one mean loss) and with a ``PrivateTrust``
(Poisson-sampled batches, per-example logit gradients, clipping, noise). Also one round's local
training, for scale.

    FEDTORRENT_DATA=../shared/data .venv/bin/python benchmarks/trust_dp_speed.py [--model cnn]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F  # noqa: N812

from fedtorrent.config import DataConfig, MixingConfig, TopologyConfig, TrainConfig
from fedtorrent.data.datasets import load_dataset
from fedtorrent.data.partition import split_nodes
from fedtorrent.mixing.round import Cohorts, PrivateTrust, Trust, mix_round, validation_rows
from fedtorrent.mixing.trust import TrustDP
from fedtorrent.models import build_model
from fedtorrent.sim.engine import (
    Backend,
    Engine,
    FunctionalBackend,
    LinearBackend,
    make_backend,
    node_data,
)
from fedtorrent.sim.topology import Topology
from fedtorrent.state import flatten
from fedtorrent.training.seeds import Stream, node_generator


def build(model: str, nodes: int) -> Engine:
    dataset = load_dataset("mnist")
    splits = split_nodes(dataset.y_train, DataConfig(num_nodes=nodes, split="iid"))
    data = node_data(
        x_train=dataset.x_train,
        y_train=dataset.y_train,
        x_test=dataset.x_test[:1000],
        y_test=dataset.y_test[:1000],
        splits=[(s.train, s.val) for s in splits],
        num_classes=dataset.num_classes,
    )
    torch.manual_seed(0)
    net = build_model(model, input_shape=dataset.input_shape, num_classes=dataset.num_classes)
    return Engine(
        backend=make_backend(net, input_shape=dataset.input_shape),
        data=data,
        train=TrainConfig(epochs=1, batch_size=64, lr=0.1),
        mixing=MixingConfig(rule="learned"),
        topology=Topology(TopologyConfig(kind="complete"), num_nodes=nodes, seed=0),
        init=flatten(net.state_dict()),
        seed=0,
    )


def example_losses_of(
    backend: Backend,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(R, B)`` per-example losses of the engine's backend (what ``Backend.example_losses``
    would be; the engine's backends hold them inside ``losses``, which returns their mean)."""
    if isinstance(backend, LinearBackend):
        return lambda params, x, y: F.cross_entropy(
            backend._logits_t(params, x), y, reduction="none"
        )
    assert isinstance(backend, FunctionalBackend)

    def per_example(params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        backend.model.eval()
        return backend._row_losses(backend._views(params, params.detach()), x, y)

    return per_example


def trusts(engine: Engine, round_index: int, dp: TrustDP) -> tuple[Trust, Trust]:
    """The plain and the private Trust of one round, built as the engine builds its own."""
    data, backend, mixing = engine.data, engine.backend, engine.mixing
    x_all = backend.prepare(data.x_train)
    counts = data.val_count.tolist()

    def generators() -> list[torch.Generator]:
        return [
            node_generator(engine.seed, Stream.TRUST, round_index, node)
            for node in range(engine.num_nodes)
        ]

    def take(pick: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = data.val_index.gather(1, pick)
        flat = index.reshape(-1)
        x = x_all.index_select(0, flat).view(*index.shape, *x_all.shape[1:])
        return x, data.y_train.index_select(0, flat).view(index.shape)

    plain_generators = generators()

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        return take(validation_rows(plain_generators, counts, mixing.trust_batch_size))

    logits = engine.trust_logits
    plain = Trust(logits=logits, draw=draw, losses=backend.losses)
    private = Trust(
        logits=logits,
        draw=draw,
        losses=backend.losses,
        private=PrivateTrust(
            dp=dp,
            generators=generators(),
            counts=counts,
            take=take,
            noise=torch.Generator().manual_seed(round_index),
            example_losses=example_losses_of(backend),
        ),
    )
    return plain, private


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="logreg")
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-train", action="store_true", help="time the trust fits only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = build(args.model, args.nodes)
    for r in range(args.warm):
        engine.run_round(r)
    n = engine.num_nodes
    cohorts = Cohorts(
        shared=engine.params[:, : engine.mixed_width],
        members=torch.ones(n, n, dtype=torch.bool),
        self_column=torch.arange(n),
    )
    dp = TrustDP(clip=1.0, noise_multiplier=1.0)
    times: dict[str, list[float]] = {"plain": [], "private": [], "train": []}
    for repeat in range(args.repeats):
        plain, private = trusts(engine, args.warm + repeat, dp)
        for name, trust in (("plain", plain), ("private", private)):
            start = time.perf_counter()
            mix_round(cohorts, engine.mixing, trust)
            times[name].append(time.perf_counter() - start)
        if not args.no_train:
            start = time.perf_counter()
            engine.train_round(args.warm + repeat)
            times["train"].append(time.perf_counter() - start)
    print(f"MNIST {args.model}, {n} nodes, trust_steps 10, trust_batch_size 256, 1 thread")
    for name, values in times.items():
        if not values:
            continue
        label = {"plain": "trust fit, plain", "private": "trust fit, TrustDP", "train": "train"}
        best, median = min(values), statistics.median(values)
        print(f"  {label[name]:20s} best {best:.3f} s  median {median:.3f} s")
    ratio = min(times["private"]) / min(times["plain"])
    print(f"  private / plain: {ratio:.1f}x")


if __name__ == "__main__":
    main()
