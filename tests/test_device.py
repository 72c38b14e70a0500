"""--device: resolving a spec to a device, and refusing an absent one in one line (exit 2).

The CUDA and MPS probes are monkeypatched only to test the resolution logic on this CPU machine;
every run below really runs, on the CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fedtorrent.cli import main
from fedtorrent.device import available_devices, resolve_device
from fedtorrent.errors import ConfigError


def _machine(monkeypatch: pytest.MonkeyPatch, *, gpus: int, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(
    ("gpus", "mps", "spec", "expected"),
    [
        (0, False, "auto", "cpu"),
        (0, True, "auto", "mps"),
        (2, True, "auto", "cuda:0"),
        (0, False, "cpu", "cpu"),
        (2, False, "cpu", "cpu"),
        (1, False, "cuda", "cuda:0"),
        (2, False, "cuda:1", "cuda:1"),
        (2, False, " CUDA:1 ", "cuda:1"),
        (0, True, "mps", "mps"),
    ],
)
def test_resolve_device_picks_what_exists(
    monkeypatch: pytest.MonkeyPatch, gpus: int, mps: bool, spec: str, expected: str
) -> None:
    _machine(monkeypatch, gpus=gpus, mps=mps)
    assert resolve_device(spec) == torch.device(expected)


@pytest.mark.parametrize(
    ("gpus", "mps", "spec", "words"),
    [
        (0, False, "cuda", ["'cuda'", "CUDA is not available", "available: cpu"]),
        (1, False, "cuda:3", ["'cuda:3'", "1 CUDA device", "available: cpu, cuda:0"]),
        (0, False, "mps", ["'mps'", "MPS is not available", "available: cpu"]),
        (1, False, "gpu", ["unknown device 'gpu'", "auto, cpu, cuda, cuda:N, mps"]),
        (1, False, "cuda:-1", ["unknown device"]),
        (1, False, "", ["unknown device ''"]),
    ],
)
def test_resolve_device_refuses_an_absent_device_in_one_line(
    monkeypatch: pytest.MonkeyPatch, gpus: int, mps: bool, spec: str, words: list[str]
) -> None:
    _machine(monkeypatch, gpus=gpus, mps=mps)
    with pytest.raises(ConfigError) as caught:
        resolve_device(spec)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_available_devices_lists_cpu_first(monkeypatch: pytest.MonkeyPatch) -> None:
    _machine(monkeypatch, gpus=2, mps=False)
    assert available_devices() == ["cpu", "cuda:0", "cuda:1"]


def _run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """Run ``fedtorrent ARGS`` in this process; return (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["fedtorrent", *args])
    monkeypatch.setenv("COLUMNS", "200")
    threads = torch.get_num_threads()
    try:
        main()
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    finally:
        torch.set_num_threads(threads)  # ``simulate`` sets it for the process
    out, err = capsys.readouterr()
    return status, out, err


SIMULATE = ("simulate", "--dataset", "digits", "--nodes", "3", "--rounds", "2", "--mixing",
            "learned", "--no-plots", "--no-progress")  # fmt: skip


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_simulate_on_an_absent_device_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, out, err = _run(monkeypatch, capsys, *SIMULATE, "--out", str(tmp_path / "run"),
                            "--device", "cuda")  # fmt: skip
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert status == 2
    assert len(lines) == 1 and "CUDA is not available" in lines[0], lines
    assert not (tmp_path / "run").exists()  # refused before any data was loaded


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(),
                    reason="auto is the CPU only on a machine without a GPU")  # fmt: skip
def test_simulate_device_cpu_and_auto_give_the_summary_of_no_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    summaries = {}
    for name, flag in (("plain", ()), ("cpu", ("--device", "cpu")), ("auto", ("--device", "auto"))):
        folder = tmp_path / name
        status, out, err = _run(monkeypatch, capsys, *SIMULATE, "--out", str(folder), *flag)
        assert status == 0, out + err
        by_mixing = json.loads((folder / "summary.json").read_text())["by_mixing"]
        summaries[name] = {  # every number but the clock's
            rule: {k: v for k, v in row.items() if k not in {"wall_seconds", "timings"}}
            for rule, row in by_mixing.items()
        }
    assert summaries["cpu"] == summaries["plain"]
    assert summaries["auto"] == summaries["plain"]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_peer_on_an_absent_device_is_one_line_exit_2_before_training(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from fedtorrent.cli.net import create

    torrent = tmp_path / "session.torrent"
    create(output=torrent, tracker="http://127.0.0.1:9/announce", dataset="digits", nodes=2,
           cohort=1, rounds=2)  # fmt: skip
    capsys.readouterr()
    out_dir = tmp_path / "peer"
    args = ("peer", str(torrent), "--out", str(out_dir), "--node-index", "0", "--num-nodes", "2")
    status, out, err = _run(monkeypatch, capsys, *args, "--device", "cuda:0")
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert status == 2
    assert len(lines) == 1 and "'cuda:0'" in lines[0], lines
    assert not (out_dir / "peer.log").exists() and not (out_dir / "metrics.jsonl").exists()


def test_swarm_passes_the_device_to_every_peer(tmp_path: Path) -> None:
    from fedtorrent.cli.net import create
    from fedtorrent.net.torrent import load_torrent
    from fedtorrent.node.swarm import Swarm, SwarmConfig

    torrent = tmp_path / "session.torrent"
    url = "http://127.0.0.1:9/announce"
    create(output=torrent, tracker=url, dataset="digits", nodes=2, cohort=1, rounds=2)

    def command(**device: str) -> list[str]:
        swarm = Swarm(SwarmConfig(torrent=torrent, out=tmp_path / "run", tracker=url, **device))
        swarm.torrent = load_torrent(torrent)  # what start() reads first; nothing is started
        return swarm.peer_command(0)

    assert "--device" not in command()  # the default keeps today's peer command lines
    auto = command(device="auto")
    assert auto[auto.index("--device") + 1] == "auto"
    with pytest.raises(ConfigError, match="'mps'"):
        SwarmConfig(torrent=torrent, out=tmp_path / "run", device="mps")
