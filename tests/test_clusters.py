"""Clustered splits (label_swap, rotated), the oracle rule and the within-cluster weight share."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedtorrent.cli import app
from fedtorrent.config import DataConfig, MixingConfig, ModelConfig, SimConfig, TrainConfig
from fedtorrent.data.clusters import (
    _rotate_nearest,
    clusters_for,
    label_permutations,
    node_examples,
    rotate_images,
)
from fedtorrent.data.datasets import Dataset
from fedtorrent.data.partition import node_indices, split_nodes
from fedtorrent.errors import ConfigError
from fedtorrent.mixing.round import Cohorts, mix_round
from fedtorrent.models import build_model

_TABULAR = Path(__file__).parents[1] / "examples" / "tabular.py"


def _tiny_dataset(num_train: int = 40, num_test: int = 12, side: int = 5) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(
        name="digits",
        x_train=rng.random((num_train, 1, side, side), dtype=np.float32),
        y_train=np.arange(num_train, dtype=np.int64) % 10,
        x_test=rng.random((num_test, 1, side, side), dtype=np.float32),
        y_test=np.arange(num_test, dtype=np.int64) % 10,
        classes=tuple(str(c) for c in range(10)),
    )


# ---- the transformations ------------------------------------------------------------------


def test_label_permutations_are_fixed_distinct_and_start_with_the_identity() -> None:
    first = label_permutations(10, 4, seed=3)
    assert np.array_equal(first, label_permutations(10, 4, seed=3))  # the same on every machine
    assert np.array_equal(first[0], np.arange(10))
    assert all(np.array_equal(np.sort(row), np.arange(10)) for row in first)  # permutations
    assert len({row.tobytes() for row in first}) == 4  # distinct
    assert not np.array_equal(first, label_permutations(10, 4, seed=4))
    # as many clusters as there are permutations of 3 classes: every one, each once
    every = label_permutations(3, 6, seed=0)
    assert len({row.tobytes() for row in every}) == 6


def test_rotation_by_90_degrees_turns_counter_clockwise() -> None:
    image = np.arange(1, 10, dtype=np.float32).reshape(1, 1, 3, 3)  # rows 1 2 3 / 4 5 6 / 7 8 9
    turned = rotate_images(image, 90.0)[0, 0]
    assert turned.tolist() == [[3, 6, 9], [2, 5, 8], [1, 4, 7]]
    assert np.array_equal(rotate_images(image, 360.0), image)
    assert np.array_equal(rotate_images(rotate_images(image, 180.0), 180.0), image)


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_nearest_rotation_matches_rot90_at_right_angles(turns: int) -> None:
    images = np.random.default_rng(1).random((2, 3, 6, 6)).astype(np.float32)
    assert np.array_equal(_rotate_nearest(images, 90.0 * turns), np.rot90(images, turns, (2, 3)))


def test_rotation_by_120_degrees_moves_a_pixel_where_it_should() -> None:
    image = np.zeros((1, 1, 7, 7), dtype=np.float32)
    image[0, 0, 3, 3] = 1.0  # the centre stays
    image[0, 0, 3, 5] = 2.0  # two right of the centre goes up and to the left
    turned = rotate_images(image, 120.0)[0, 0]
    assert turned[3, 3] == 1.0
    # exact position: (-2 sin 120, 2 cos 120) = (-1.73, -1) from the centre -> row 1, col 2
    assert turned[1, 2] == 2.0
    lit = np.argwhere(turned == 2.0)
    assert np.abs(lit - [1.3, 2.0]).max() <= 1.0  # nearest sampling may repeat it next door
    assert turned[0, 0] == 0.0 and turned.shape == (7, 7)


def test_rotated_refuses_examples_that_are_not_images() -> None:
    with pytest.raises(ConfigError, match="rotated needs images"):
        rotate_images(np.zeros((4, 784), dtype=np.float32), 90.0)


def test_clustered_splits_deal_like_iid_and_assign_nodes_round_robin() -> None:
    labels = np.repeat(np.arange(10), 30)
    iid = node_indices(labels, num_nodes=6, scheme="iid", seed=2)
    for scheme in ("label_swap", "rotated"):
        parts = node_indices(labels, num_nodes=6, scheme=scheme, seed=2)
        assert all(np.array_equal(a, b) for a, b in zip(parts, iid, strict=True))
    clusters = clusters_for(DataConfig(num_nodes=7, split="label_swap", clusters=3), num_classes=10)
    assert clusters is not None
    assert clusters.assignment.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert clusters.members(1).tolist() == [1, 4]
    assert clusters.same_cluster()[0].tolist() == [True, False, False, True, False, False, True]
    assert clusters_for(DataConfig(num_nodes=7), num_classes=10) is None


def test_transform_nodes_relabels_or_rotates_each_clusters_rows_only() -> None:
    data = _tiny_dataset()
    parts = [np.arange(i * 10, (i + 1) * 10) for i in range(4)]
    swap = clusters_for(DataConfig(num_nodes=4, split="label_swap", clusters=2), num_classes=10)
    assert swap is not None
    x, y = swap.transform_nodes(data.x_train, data.y_train, parts)
    assert x is data.x_train  # labels only: the images are not copied
    perm = swap.permutations[1]
    for node, rows in enumerate(parts):
        expected = data.y_train[rows] if node % 2 == 0 else perm[data.y_train[rows]]
        assert np.array_equal(y[rows], expected)
    turn = clusters_for(DataConfig(num_nodes=4, split="rotated", clusters=4), num_classes=10)
    assert turn is not None
    x, y = turn.transform_nodes(data.x_train, data.y_train, parts)
    assert np.array_equal(y, data.y_train)
    for node, rows in enumerate(parts):
        assert np.array_equal(x[rows], np.rot90(data.x_train[rows], node, (2, 3)))


def test_a_nodes_own_test_set_is_the_test_set_under_its_clusters_transformation() -> None:
    data = _tiny_dataset()
    config = DataConfig(num_nodes=4, split="label_swap", clusters=2, val_fraction=0.25)
    splits = split_nodes(data.y_train, config)
    swap = clusters_for(config, num_classes=10)
    assert swap is not None
    for node in range(4):
        train, val, test = node_examples(data, splits[node], config=config, node=node)
        perm = swap.permutations[node % 2]
        assert np.array_equal(test[1], perm[data.y_test]) and test[1].dtype == np.int64
        assert np.array_equal(train[1], perm[data.y_train[splits[node].train]])
        assert np.array_equal(val[0], data.x_train[splits[node].val])
    rotated = replace(config, split="rotated")
    _, _, test = node_examples(data, splits[1], config=rotated, node=1)
    assert np.array_equal(test[0], np.rot90(data.x_test, 2, (2, 3)))  # 2 clusters: 180 degrees
    assert np.array_equal(test[1], data.y_test)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"split": "label_swap"}, r"needs clusters in \[2, num_nodes=6\], got 1"),
        ({"split": "rotated", "clusters": 7}, r"needs clusters in \[2, num_nodes=6\], got 7"),
        ({"clusters": 3}, "clusters=3 needs split label_swap or rotated"),
    ],
)
def test_bad_cluster_counts_are_one_line_errors(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DataConfig(num_nodes=6, **changes)  # type: ignore[arg-type]


def test_more_label_swap_clusters_than_permutations_is_refused() -> None:
    config = DataConfig(num_nodes=8, split="label_swap", clusters=3)
    with pytest.raises(ConfigError, match="2 permutations, fewer than clusters=3"):
        clusters_for(config, num_classes=2)


# ---- the oracle rule ----------------------------------------------------------------------


def test_oracle_mixes_uniformly_within_the_true_cluster_of_each_cohort() -> None:
    shared = torch.arange(5, dtype=torch.float32).unsqueeze(1)
    clusters = torch.tensor([0, 1, 0, 1, 0])
    same = clusters[:, None] == clusters[None, :]
    members = torch.ones(5, 5, dtype=torch.bool)
    members[0, 4] = False  # node 0 did not hear node 4 this round
    cohorts = Cohorts(
        shared=shared, members=members, self_column=torch.arange(5), same_cluster=same
    )
    mixed = mix_round(cohorts, MixingConfig(rule="oracle"))
    assert mixed.weights is not None
    assert mixed.weights[0].tolist() == [0.5, 0.0, 0.5, 0.0, 0.0]
    assert mixed.weights[1].tolist() == [0.0, 0.5, 0.0, 0.5, 0.0]
    assert float(mixed.params[4]) == pytest.approx((0 + 2 + 4) / 3)
    with pytest.raises(ConfigError, match="oracle mixing needs every node's true cluster"):
        mix_round(replace(cohorts, same_cluster=None), MixingConfig(rule="oracle"))


def test_oracle_needs_a_clustered_split_and_stays_out_of_torrents(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="oracle mixing needs a clustered split"):
        SimConfig(mixing=MixingConfig(rule="oracle"))
    result = CliRunner().invoke(
        app,
        ["create", "--output", str(tmp_path / "s.torrent"), "--dataset", "digits",
         "--split", "label_swap", "--clusters", "2", "--mixing", "oracle"],
    )  # fmt: skip
    assert isinstance(result.exception, ConfigError)
    assert "simulator-only" in str(result.exception) and "\n" not in str(result.exception)
    assert not (tmp_path / "s.torrent").exists()


# ---- the simulator and a real peer ---------------------------------------------------------


def _clustered(split: str = "label_swap", clusters: int = 3, **changes: object) -> SimConfig:
    config = SimConfig(
        data=DataConfig(dataset="digits", num_nodes=6, split=split, clusters=clusters),
        model=ModelConfig(name="logreg"),
        train=TrainConfig(batch_size=32, lr=0.1),
        rounds=3,
    )
    return replace(config, **changes)  # type: ignore[arg-type]


def test_simulated_oracle_keeps_all_weight_in_the_cluster_and_fixed_a_kth(tmp_path: Path) -> None:
    from fedtorrent.metrics.records import read_records
    from fedtorrent.sim.run import simulate

    rules = ("oracle", "fixed", "learned", "none", "median")
    configs = [replace(_clustered(), mixing=MixingConfig(rule=rule)) for rule in rules]
    outcomes, summary = simulate(configs, out_dir=tmp_path, plots=False, progress=False)
    by_rule = summary["by_mixing"]
    assert by_rule["oracle"]["cluster_share_mean"] == pytest.approx(1.0)
    assert by_rule["none"]["cluster_share_mean"] == pytest.approx(1.0)
    assert by_rule["fixed"]["cluster_share_mean"] == pytest.approx(1 / 3, abs=1e-6)
    assert 1 / 3 < by_rule["learned"]["cluster_share_mean"] <= 1.0
    assert "cluster_share_mean" not in by_rule["median"]  # a robust rule has no weights
    oracle = outcomes[0]
    assert oracle.weights is not None
    weights = np.array(oracle.weights)
    same = (np.arange(6)[:, None] % 3) == (np.arange(6)[None, :] % 3)
    assert np.all(weights[~same] == 0) and np.allclose(weights[same], 0.5)
    # sharing with the wrong clusters hurts own-distribution accuracy; the right ones help
    assert by_rule["fixed"]["own_accuracy_mean"] < by_rule["oracle"]["own_accuracy_mean"]
    rounds = read_records(tmp_path / "rounds.jsonl")
    assert {r["cluster_share"] for r in rounds if r["mixing"] == "oracle"} == {1.0}
    assert all("cluster_share" not in r for r in rounds if r["mixing"] == "median")
    header = (tmp_path / "final.csv").read_text().splitlines()[0]
    assert "cluster_share" in header.split(",")


def test_own_accuracy_is_accuracy_on_the_clusters_view_of_the_test_set() -> None:
    from fedtorrent.data.datasets import load_dataset
    from fedtorrent.sim.run import run_one

    digits = load_dataset("digits", progress=False)
    for split, clusters in (("label_swap", 3), ("rotated", 4)):
        config = replace(_clustered(split, clusters), rounds=2)
        outcome = run_one(config, dataset=digits, keep_states=True)
        assert outcome.states is not None
        view = clusters_for(config.data, num_classes=10)
        assert view is not None
        for node in range(6):
            x, y = view.transform(node % clusters, digits.x_test, digits.y_test)
            model = build_model("logreg", input_shape=(1, 8, 8), num_classes=10)
            model.load_state_dict(outcome.states[node])
            with torch.no_grad():
                guess = model(torch.from_numpy(np.ascontiguousarray(x))).argmax(dim=1).numpy()
            assert outcome.final[node]["own_accuracy"] == pytest.approx(float((guess == y).mean()))
        assert outcome.final[0]["own_accuracy"] == outcome.final[0]["accuracy"]  # cluster 0


def test_a_peer_holds_its_clusters_view_of_its_shard_and_the_test_set(tmp_path: Path) -> None:
    from fedtorrent.data.datasets import load_dataset
    from fedtorrent.net.create import create_session
    from fedtorrent.net.torrent import Session
    from fedtorrent.node.data import load_peer_data

    data = DataConfig(dataset="digits", num_nodes=4, split="label_swap", clusters=2)
    session, _ = create_session(data=data, rounds=2)
    assert Session.from_info(session.to_info()) == session  # clusters travel in the torrent
    plain, _ = create_session(data=DataConfig(dataset="digits", num_nodes=4), rounds=2)
    assert b"clusters" not in plain.to_info()[b"data"]  # default: old torrents' bytes unchanged
    digits = load_dataset("digits", progress=False)
    perm = label_permutations(10, 2, seed=0)[1]
    peer = load_peer_data(session, node_index=1, num_nodes=4)
    assert np.array_equal(peer.y_test.numpy(), perm[digits.y_test])
    split = split_nodes(digits.y_train, data)[1]
    assert np.array_equal(peer.y_train.numpy(), perm[digits.y_train[split.train]])
    first = load_peer_data(session, node_index=0, num_nodes=4)
    assert np.array_equal(first.y_test.numpy(), digits.y_test)  # cluster 0: the identity


def test_cli_refuses_bad_clusters_and_clustered_tasks_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["simulate", "--dataset", "digits", "--nodes", "4", "--rounds", "1", "--no-plots",
            "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    for extra, message in (
        (["--split", "label_swap", "--clusters", "1"], "needs clusters in [2, num_nodes=4]"),
        (["--split", "rotated", "--clusters", "5"], "needs clusters in [2, num_nodes=4], got 5"),
        (["--clusters", "2"], "clusters=2 needs split label_swap or rotated"),
        (["--split", "rotated", "--clusters", "2", "--task", f"{_TABULAR}:task"], "a task's data"),
    ):
        result = runner.invoke(app, [*base, *extra])
        assert isinstance(result.exception, ConfigError), (extra, result.output)
        assert message in str(result.exception) and "\n" not in str(result.exception)
    help_text = runner.invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"}).output
    assert "--clusters" in help_text and "oracle" in help_text
