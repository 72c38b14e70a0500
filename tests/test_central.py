"""The central FedAvg server: its averaging step, and ``swarm --central`` end to end.

The end-to-end test runs a real tracker, a real ``fedtorrent server`` process and three real
``fedtorrent peer --central`` processes over ZeroMQ, then checks what the bandwidth study relies
on: every client ends on the server's final state, no client exchanged a byte with another
client, and the server's measured bytes are the FedAvg formula's payloads plus headers.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedtorrent.errors import ConfigError
from fedtorrent.metrics.records import read_json, read_records
from fedtorrent.net import wire
from fedtorrent.node.central import CENTRAL_ID, ServerConfig, fedavg, server_layout
from fedtorrent.node.swarm import SERVER_FOLDER, SwarmConfig, peer_folder, run_swarm
from fedtorrent.state.layout import StateLayout

DATA = Path(os.environ.get("FEDTORRENT_DATA", "/work/shared/data"))
LAYOUT = StateLayout(mix=("b", "w"), exact=("n",), local=(), parameters=("b", "w"))


def client_state(value: float, count: int) -> dict[str, torch.Tensor]:
    return {
        "w": torch.full((2, 3), value),
        "b": torch.tensor([value, -value]),
        "n": torch.tensor(count, dtype=torch.int64),
    }


def test_fedavg_weights_every_client_by_its_examples() -> None:
    states = [client_state(1.0, 10), client_state(2.0, 11), client_state(4.0, 13)]
    average, weights = fedavg(states, [1, 1, 2], LAYOUT)
    assert weights.tolist() == pytest.approx([0.25, 0.25, 0.5])
    assert torch.allclose(average["w"], torch.full((2, 3), 2.75))
    assert torch.allclose(average["b"], torch.tensor([2.75, -2.75]))
    # Integer keys are combined exactly: the weighted mean 11.75, rounded, in the key's dtype.
    assert average["n"].dtype == torch.int64 and int(average["n"]) == 12
    assert set(average) == {"w", "b", "n"}


def test_fedavg_is_uniform_when_no_client_counts_examples_and_refuses_bad_counts() -> None:
    states = [client_state(1.0, 1), client_state(3.0, 1)]
    average, weights = fedavg(states, [0, 0], LAYOUT)
    assert weights.tolist() == [0.5, 0.5]
    assert torch.allclose(average["w"], torch.full((2, 3), 2.0))
    with pytest.raises(ConfigError):
        fedavg(states, [1], LAYOUT)
    with pytest.raises(ConfigError):
        fedavg(states, [1, -1], LAYOUT)
    with pytest.raises(ConfigError):
        fedavg([], [], LAYOUT)


def test_a_built_in_session_mixes_floating_keys_and_combines_integer_keys_exactly(
    tmp_path: Path,
) -> None:
    from fedtorrent.cli.net import create
    from fedtorrent.net.torrent import load_torrent

    create(output=tmp_path / "d.torrent", dataset="digits", model="logreg", nodes=3, rounds=1)
    session = load_torrent(tmp_path / "d.torrent").session
    layout = server_layout(session, client_state(0.0, 0))
    assert (layout.mix, layout.exact, layout.local) == (("b", "w"), ("n",), ())


def test_server_and_swarm_settings_are_checked() -> None:
    for bad in ({"clients": 0}, {"exchange_timeout": 0.0}, {"join_timeout": float("nan")}):
        with pytest.raises(ConfigError):
            ServerConfig(**{"torrent": Path("t"), "out_dir": Path("o"), "clients": 3, **bad})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="resume"):
        SwarmConfig(torrent=Path("t"), out=Path("o"), central=True, resume=True)
    from fedtorrent.node.peer import PeerConfig

    with pytest.raises(ConfigError, match="central server"):
        PeerConfig(torrent=Path("t"), out_dir=Path("o"), peer_id=CENTRAL_ID, central=True)


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_swarm_central_runs_fedavg_and_measures_the_server_bytes(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from fedtorrent.cli.net import create

    clients, rounds = 3, 3
    torrent = tmp_path / "digits.torrent"
    create(output=torrent, dataset="digits", model="logreg", nodes=clients, rounds=rounds)
    summary = run_swarm(
        SwarmConfig(
            torrent=torrent,
            out=tmp_path / "run",
            peers=clients,
            data_dir=DATA,
            central=True,
            exchange_timeout=30.0,
        ),
        timeout=200,
        plots=False,
        progress=False,
    )
    server = summary["central"]
    assert summary["finished"] == clients and not summary["interrupted"]
    assert server["state"] == "done" and server["heard_per_round"] == [clients] * rounds

    # Every client ends on the server's final average: the same tensors, the same accuracy.
    finals = [load_file(peer_folder(tmp_path / "run", i) / "checkpoint.safetensors")
              for i in range(clients)]  # fmt: skip
    for state in finals[1:]:
        assert state.keys() == finals[0].keys()
        assert all(torch.equal(state[k], finals[0][k]) for k in state)
    accuracies = {p["test_accuracy"] for p in summary["per_peer"]}
    assert len(accuracies) == 1 and accuracies.pop() > 0.5

    # A client dials the server only, and nobody but the server ever talks to a client.
    for index in range(clients):
        folder = peer_folder(tmp_path / "run", index)
        assert all(r["cohort"] == [CENTRAL_ID] for r in read_records(folder / "metrics.jsonl"))
        assert list(read_json(folder / "summary.json")["traffic"]["per_peer"]) == [CENTRAL_ID]

    # The server's bytes, counted by its transport: the clients count the same bytes at their
    # end, every payload is one FedAvg upload or download (no stale state is ever served), and
    # what the formula leaves out is headers (state replies, requests and not_ready refusals).
    band = summary["bandwidth"]
    assert band["server_bytes_sent"] == band["p2p_bytes_received"]
    assert band["server_bytes_received"] == band["p2p_bytes_sent"]
    moved = read_json(tmp_path / "run" / SERVER_FOLDER / "summary.json")["traffic"]["this_process"]
    state_bytes = band["state_bytes"]
    assert moved["payload_sent"] == moved["payload_received"] == clients * rounds * state_bytes
    formula = band["central_server_bytes"]
    assert formula == 2 * clients * rounds * state_bytes
    messages = moved["messages_sent"] + moved["messages_received"]
    headers = moved["header_sent"] + moved["header_received"]
    assert band["server_bytes"] == formula + headers
    assert headers <= messages * 512 < messages * wire.MAX_HEADER_BYTES
    # A state each way and polls while a round is not ready: they back off to 0.5 s, so their
    # number follows how long training takes (the machine's load), never the payload bytes.
    assert messages <= 2 * clients * rounds * 60
