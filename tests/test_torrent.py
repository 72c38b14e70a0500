"""The session torrent: round trips, the info-hash, strict reading, the initial state, the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import fastbencode
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedtorrent.cli import app
from fedtorrent.config import DataConfig, MixingConfig, ModelConfig, PrivacyConfig, TrainConfig
from fedtorrent.errors import ConfigError, TorrentError
from fedtorrent.models import build_model
from fedtorrent.net.torrent import (
    FORMAT_VERSION,
    MAX_INITIAL_STATE_BYTES,
    MAX_TORRENT_BYTES,
    Session,
    Torrent,
    load_initial_state,
    load_torrent,
    save_torrent,
    state_path_for,
)
from fedtorrent.state import encode_state
from fedtorrent.state.codec import MAX_STATE_BYTES


def make_session(**changes: Any) -> Session:
    base: dict[str, Any] = {
        "name": "mnist-mlp",
        "model": ModelConfig("mlp", {"hidden": 32, "dropout": 0.25}),
        "data": DataConfig(dataset="mnist", num_nodes=8, split="noniid", alpha=0.3),
        "train": TrainConfig(epochs=2, lr=1e-5, batch_size=32),
        "mixing": MixingConfig(rule="learned", trust_lr=2.5),
        "rounds": 12,
        "cohort_size": 3,
        "state_sha256": "ab" * 32,
        "state_size": 1234,
    }
    base.update(changes)
    return Session(**base)


def make_torrent(**changes: Any) -> Torrent:
    return Torrent(
        announce="http://127.0.0.1:6969/announce",
        session=make_session(**changes),
        announce_list=(("http://127.0.0.1:6969/announce", "https://backup.example/announce"),),
        creation_date=1_700_000_000,
        created_by="fedtorrent",
        comment="a test session",
    )


def raw(torrent: Torrent) -> dict[bytes, Any]:
    return fastbencode.bdecode(torrent.to_bytes())


def encode(meta: dict[bytes, Any]) -> bytes:
    return fastbencode.bencode(meta)


def test_round_trip_keeps_every_field_and_the_info_hash() -> None:
    torrent = make_torrent(privacy=PrivacyConfig(clip=1.0, noise_multiplier=0.8, unit="example"))
    again = Torrent.from_bytes(torrent.to_bytes())
    assert again == torrent
    assert again.info_hash == torrent.info_hash
    assert again.to_bytes() == torrent.to_bytes()


def test_info_hash_is_sha256_of_the_bencoded_info_dict() -> None:
    torrent = make_torrent()
    info = raw(torrent)[b"info"]
    assert torrent.info_hash == hashlib.sha256(encode(info)).hexdigest()
    assert len(torrent.info_hash) == 64


def test_info_hash_follows_the_session_not_the_tracker() -> None:
    torrent = make_torrent()
    moved = dataclasses.replace(torrent, announce="http://elsewhere:1/announce", comment="x")
    assert moved.info_hash == torrent.info_hash
    changed = make_torrent(train=TrainConfig(epochs=2, lr=2e-5, batch_size=32))
    assert changed.info_hash != torrent.info_hash


def test_floats_are_canonical_decimal_strings_and_data_dir_never_leaks() -> None:
    info = raw(make_torrent())[b"info"]
    assert info[b"train"][b"lr"] == b"1e-05"
    assert info[b"mixing"][b"trust_lr"] == b"2.5"
    assert info[b"model"][b"kwargs"] == b'{"dropout":0.25,"hidden":32}'
    assert b"data_dir" not in info[b"data"]
    assert info[b"version"] == FORMAT_VERSION
    assert b"steps" not in info[b"train"]  # None fields are left out


def test_a_session_refuses_a_local_data_dir() -> None:
    with pytest.raises(ConfigError, match="data_dir"):
        make_session(data=DataConfig(data_dir=Path("/data")))


def test_state_size_limit_matches_the_state_codec() -> None:
    assert MAX_INITIAL_STATE_BYTES == MAX_STATE_BYTES


def _set(meta: dict[bytes, Any], path: tuple[bytes, ...], value: Any) -> None:
    node = meta
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ((b"info", b"rounds"), b"12", "info.rounds"),
        ((b"info", b"train", b"lr"), 1, "info.train.lr"),
        ((b"info", b"train", b"lr"), b"0.10", "info.train.lr"),
        ((b"info", b"train", b"lr"), b"nan", "info.train.lr"),
        ((b"info", b"train", b"lr"), b"1_0.0", "info.train.lr"),
        ((b"info", b"train", b"lr"), _DELETE, "info.train.lr"),
        ((b"info", b"train", b"lr"), b"-1.0", "info.train"),
        ((b"info", b"data", b"data_dir"), b"/home/me/data", "info.data.data_dir"),
        ((b"info", b"extra"), 1, "info.extra"),
        ((b"info", b"name"), b"\xff\xfe", "info.name"),
        ((b"info", b"version"), 2, "info.version"),
        ((b"info", b"state"), _DELETE, "info.state"),
        ((b"info", b"state", b"size"), -5, "info"),
        ((b"info", b"model", b"kwargs"), b'{"hidden": 32}', "info.model.kwargs"),
        ((b"info", b"model", b"kwargs"), b"[1]", "info.model.kwargs"),
        ((b"info", b"privacy", b"dp_sgd"), 0, "info.privacy.dp_sgd: a torrent of an older"),
        ((b"info", b"privacy", b"unit"), b"batch", "info.privacy: dp unit must be one of"),
        ((b"info", b"privacy", b"unit"), _DELETE, "info.privacy.unit"),
        ((b"info", b"privacy", b"clip"), b"inf", "info.privacy.clip"),
        ((b"info", b"data"), [], "info.data"),
        ((b"announce",), b"ftp://x/announce", "torrent"),
        ((b"announce",), _DELETE, "torrent.announce"),
        ((b"nodes",), [], "torrent.nodes"),
        ((b"announce-list",), [b"http://x/announce"], "announce-list[0]"),
    ],
)
def test_strict_reading_names_the_bad_field(
    path: tuple[bytes, ...], value: Any, field: str
) -> None:
    meta = raw(make_torrent(privacy=PrivacyConfig(clip=1.0, noise_multiplier=1.0)))
    _set(meta, path, value)
    with pytest.raises(TorrentError, match=field.replace("[", r"\[").replace("]", r"\]")):
        Torrent.from_bytes(encode(meta))


def test_unsupported_version_says_so() -> None:
    meta = raw(make_torrent())
    meta[b"info"][b"version"] = FORMAT_VERSION + 1
    with pytest.raises(TorrentError, match="unsupported format version"):
        Torrent.from_bytes(encode(meta))


@pytest.mark.parametrize(
    "payload",
    [b"", b"not bencode", b"d8:announce1:xe junk", b"i1e", b"l" * 10 + b"e" * 10],
)
def test_garbage_is_a_torrent_error(payload: bytes) -> None:
    with pytest.raises(TorrentError):
        Torrent.from_bytes(payload)


def test_oversized_torrents_are_refused_before_decoding(tmp_path: Path) -> None:
    big = b"x" * (MAX_TORRENT_BYTES + 1)
    with pytest.raises(TorrentError, match="exceeds"):
        Torrent.from_bytes(big)
    path = tmp_path / "big.torrent"
    path.write_bytes(big)
    with pytest.raises(TorrentError, match="exceeds"):
        load_torrent(path)


@settings(max_examples=60, deadline=None)
@given(
    lr=st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False),
    alpha=st.floats(min_value=1e-9, max_value=1e3),
)
def test_any_finite_float_round_trips_exactly(lr: float, alpha: float) -> None:
    torrent = make_torrent(
        train=TrainConfig(lr=lr), data=DataConfig(alpha=alpha), model=ModelConfig("mlp")
    )
    again = Torrent.from_bytes(torrent.to_bytes())
    assert again.session.train.lr == lr
    assert again.session.data.alpha == alpha
    assert again.info_hash == torrent.info_hash


def test_save_and_load_from_a_path(tmp_path: Path) -> None:
    torrent = make_torrent(compression={"codec": "topk:0.1,int8"})
    path = save_torrent(torrent, tmp_path / "s.torrent")
    assert load_torrent(path) == torrent
    assert load_torrent(str(path)).session.compression == {"codec": "topk:0.1,int8"}
    assert state_path_for(path) == tmp_path / "s.state"
    with pytest.raises(TorrentError, match="cannot read"):
        load_torrent(tmp_path / "missing.torrent")


def test_initial_state_is_verified_by_size_and_hash(tmp_path: Path) -> None:
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(2)}
    payload = encode_state(state)
    torrent = make_torrent(
        state_sha256=hashlib.sha256(payload).hexdigest(), state_size=len(payload)
    )
    path = tmp_path / "s.state"
    path.write_bytes(payload)
    loaded = load_initial_state(torrent, path)
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])

    tampered = bytearray(payload)
    tampered[-1] ^= 0x01
    path.write_bytes(bytes(tampered))
    with pytest.raises(TorrentError, match=r"info\.state\.sha256"):
        load_initial_state(torrent, path)
    path.write_bytes(payload + b"\0")
    with pytest.raises(TorrentError, match=r"info\.state\.size"):
        load_initial_state(torrent, path)
    with pytest.raises(TorrentError, match="cannot read"):
        load_initial_state(torrent, tmp_path / "nope.state")


def test_cli_create_writes_a_torrent_whose_state_verifies(tmp_path: Path) -> None:
    runner = CliRunner()
    output = tmp_path / "digits.torrent"
    args = ["create", "--dataset", "digits", "--model", "mlp", "--model-arg", "hidden=16"]
    args += ["--nodes", "4", "--split", "shards", "--rounds", "5", "--cohort", "2"]
    args += ["--lr", "0.05", "--tracker", "http://tracker.example:6969/announce", "-o", str(output)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    torrent = load_torrent(output)
    session = torrent.session
    assert (session.model.name, session.model.kwargs) == ("mlp", {"hidden": 16})
    assert (session.data.dataset, session.data.num_nodes, session.data.split) == (
        "digits",
        4,
        "shards",
    )
    assert (session.rounds, session.cohort_size, session.train.lr) == (5, 2, 0.05)
    assert torrent.announce == "http://tracker.example:6969/announce"
    state = load_initial_state(torrent, state_path_for(output))
    from fedtorrent.training.seeds import Stream, derive_seed

    torch.manual_seed(derive_seed(0, Stream.INIT))  # the default --seed, as the simulator seeds
    expected = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=16).state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    assert torrent.info_hash in result.output

    # Same settings and seed give the same initial weights and so the same info-hash.
    again = tmp_path / "again.torrent"
    result = runner.invoke(app, [*args[:-1], str(again)])
    assert result.exit_code == 0, result.output
    assert state_path_for(again).read_bytes() == state_path_for(output).read_bytes()


def test_cli_show_prints_the_info_hash_and_settings(tmp_path: Path) -> None:
    parameters = 4 * ((784 + 1) * 32 + (32 + 1) * 10)  # mlp 784 -> 32 -> 10, float32
    torrent = make_torrent(
        privacy=PrivacyConfig(clip=2.0, noise_multiplier=1.0),
        model=ModelConfig("mlp", {"hidden": 32}),
        state_size=parameters + 200,
    )
    path = save_torrent(torrent, tmp_path / "s.torrent")
    runner = CliRunner()
    result = runner.invoke(app, ["show", str(path)])
    assert result.exit_code == 0, result.output
    assert torrent.info_hash in result.output
    assert "mnist-mlp" in result.output and "noise_multiplier" in result.output
    assert f"model size    {parameters} bytes" in result.output
    result = runner.invoke(app, ["show", str(path), "--json"])
    document = json.loads(result.output)
    assert document["info_hash"] == torrent.info_hash
    assert document["session"]["train"]["lr"] == 1e-5
    assert "data_dir" not in document["session"]["data"]


def test_cli_create_rejects_an_unknown_dataset(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["create", "--dataset", "imagenet", "-o", str(tmp_path / "x.torrent")]
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)


# -- closed swarms --------------------------------------------------------------------------------


def test_an_allow_list_round_trips_and_an_open_torrent_keeps_its_hash() -> None:
    keys = tuple(sorted(("1f" * 32, "0a" * 32)))
    closed = make_torrent(allow_keys=keys)
    again = Torrent.from_bytes(closed.to_bytes())
    assert again.session.allow_keys == keys and again.session.closed
    assert again.info_hash == closed.info_hash != make_torrent().info_hash
    assert b"allow_keys" not in raw(make_torrent())[b"info"]  # open: the key is absent
    assert not make_torrent().session.closed
    for bad in (keys[::-1], (keys[0], keys[0]), ("AB" * 32,), ("ab" * 31,)):
        with pytest.raises(ConfigError, match="allow_keys"):
            make_session(allow_keys=bad)
    meta = raw(closed)
    meta[b"info"][b"allow_keys"] = []
    with pytest.raises(TorrentError, match=r"info\.allow_keys"):
        Torrent.from_bytes(encode(meta))


def test_cli_create_closes_a_swarm_with_allowed_keys(tmp_path: Path) -> None:
    from fedtorrent.net.identity import load_or_create_identity

    alice, bob = (load_or_create_identity(tmp_path / name) for name in ("alice", "bob"))
    output = tmp_path / "closed.torrent"
    args = ["create", "--output", str(output), "--dataset", "digits", "--nodes", "2"]
    keys = ["--allow-key", alice.public_key_hex.upper(), "--allow-keys-file"]
    runner = CliRunner()
    result = runner.invoke(app, [*args, *keys, str(tmp_path / "bob" / "ed25519.pub")])
    assert result.exit_code == 0, result.output
    assert "closed swarm: 2 allowed keys" in result.output
    allowed = load_torrent(output).session.allow_keys
    assert allowed == tuple(sorted((alice.public_key_hex, bob.public_key_hex)))
    shown = runner.invoke(app, ["show", str(output)])
    assert "closed, 2 allowed keys" in shown.output and bob.public_key_hex in shown.output
    bad = runner.invoke(app, [*args, "--allow-key", "00" * 31])
    assert bad.exit_code != 0 and not bad.output.count("wrote")


def test_skip_settings_are_written_only_off_their_defaults_so_old_torrents_keep_their_hash() -> (
    None
):
    # The torrent at the default settings: no skip keys, and exactly the bytes of a torrent
    # written before they existed (its info dict, with the keys left out, re-encodes the same).
    default = make_torrent()
    mixing = raw(default)[b"info"][b"mixing"]
    assert b"skip_below" not in mixing and b"skip_after" not in mixing
    old = raw(default)
    assert Torrent.from_bytes(encode(old)).to_bytes() == default.to_bytes() == encode(old)
    # Pinned before the skip settings existed: the default session's identity is unchanged.
    assert default.info_hash == "7fe7466ebbac43c883a55685b0ae6e82252ba985ca47dae42aa91d4ef9ae5b5a"
    assert Torrent.from_bytes(encode(old)).session.mixing == MixingConfig(
        rule="learned", trust_lr=2.5
    )

    skipping = make_torrent(mixing=MixingConfig(rule="learned", trust_lr=2.5, skip_below=0.05))
    written = raw(skipping)[b"info"][b"mixing"]
    assert written[b"skip_below"] == b"0.05" and b"skip_after" not in written
    again = Torrent.from_bytes(skipping.to_bytes())
    assert again.session.mixing.skip_below == 0.05 and again.session.mixing.skip_after == 3
    assert again.info_hash == skipping.info_hash != default.info_hash
    later = make_torrent(mixing=MixingConfig(rule="learned", skip_below=0.05, skip_after=5))
    assert Torrent.from_bytes(later.to_bytes()).session.mixing.skip_after == 5

    # One encoding per session: spelling out a default is not canonical.
    old[b"info"][b"mixing"][b"skip_after"] = 3
    with pytest.raises(TorrentError, match="canonical"):
        Torrent.from_bytes(encode(old))
    old[b"info"][b"mixing"][b"skip_after"] = 0
    with pytest.raises(TorrentError, match="skip_after"):
        Torrent.from_bytes(encode(old))


def test_cli_create_writes_the_skip_settings(tmp_path: Path) -> None:
    output = tmp_path / "skip.torrent"
    args = ["create", "--output", str(output), "--dataset", "digits", "--nodes", "2"]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--skip-below", "0.05", "--skip-after", "2"])
    assert result.exit_code == 0, result.output
    mixing = load_torrent(output).session.mixing
    assert (mixing.skip_below, mixing.skip_after) == (0.05, 2)
    plain = tmp_path / "plain.torrent"
    assert runner.invoke(app, ["create", "--output", str(plain), *args[3:]]).exit_code == 0
    assert b"skip_" not in plain.read_bytes()
    refused = runner.invoke(app, [*args, "--mixing", "median", "--skip-below", "0.05"])
    assert refused.exit_code != 0 and "wrote" not in refused.output
    assert "--skip-below" in runner.invoke(app, ["create", "--help"]).output


# -- the learning-rate schedule across rounds -----------------------------------------------------


def test_a_round_schedule_round_trips_and_an_old_torrent_reads_as_constant() -> None:
    cosine = make_torrent(round_schedule="cosine")
    again = Torrent.from_bytes(cosine.to_bytes())
    assert again.session.round_schedule == "cosine"
    assert again.info_hash == cosine.info_hash != make_torrent().info_hash
    assert raw(cosine)[b"info"][b"round_schedule"] == b"cosine"

    # A torrent written before the key existed: no round_schedule in info. It reads as constant
    # and re-encodes to the same bytes, so its info-hash is unchanged.
    old = raw(make_torrent())
    assert b"round_schedule" not in old[b"info"]
    payload = encode(old)
    session = Torrent.from_bytes(payload).session
    assert session.round_schedule == "constant"
    assert Torrent.from_bytes(payload).to_bytes() == payload

    # One encoding per session: spelling out the default is not canonical.
    old[b"info"][b"round_schedule"] = b"constant"
    with pytest.raises(TorrentError, match="canonical"):
        Torrent.from_bytes(encode(old))
    old[b"info"][b"round_schedule"] = b"linear"
    with pytest.raises(TorrentError, match="round_schedule"):
        Torrent.from_bytes(encode(old))
    old[b"info"][b"round_schedule"] = 1
    with pytest.raises(TorrentError, match=r"info\.round_schedule"):
        Torrent.from_bytes(encode(old))
    with pytest.raises(ConfigError, match="round_schedule"):
        make_session(round_schedule="step")


def test_cli_create_defaults_match_the_simulator_and_take_a_round_schedule(
    tmp_path: Path,
) -> None:
    from fedtorrent.config import SimConfig

    sim = SimConfig()
    runner = CliRunner()
    output = tmp_path / "default.torrent"
    result = runner.invoke(app, ["create", "--dataset", "digits", "-o", str(output)])
    assert result.exit_code == 0, result.output
    session = load_torrent(output).session
    assert session.rounds == sim.rounds
    assert session.round_schedule == sim.round_schedule == "cosine"
    train = (session.train.lr, session.train.epochs, session.train.batch_size)
    assert train == (sim.train.lr, sim.train.epochs, sim.train.batch_size)
    assert session.train.optimizer == sim.train.optimizer
    assert "cosine lr across rounds" in runner.invoke(app, ["show", str(output)]).output

    constant = tmp_path / "constant.torrent"
    args = ["create", "--dataset", "digits", "--round-schedule", "constant", "-o", str(constant)]
    assert runner.invoke(app, args).exit_code == 0
    assert load_torrent(constant).session.round_schedule == "constant"
    bad = runner.invoke(app, [*args[:3], "--round-schedule", "step", "-o", str(constant)])
    assert bad.exit_code != 0 and isinstance(bad.exception, ConfigError)


# -- hostile fields: every number, depth and size is bounded before use --------------------------


@pytest.mark.parametrize(
    ("text", "depth"),
    [("{}", 1), ('{"a":[1,{"b":[]}]}', 4), ('{"a":"[[[[{{{{"}', 1), ('{"a":"\\"[["}', 1)],
)
def test_json_depth_ignores_brackets_inside_strings(text: str, depth: int) -> None:
    from fedtorrent.net.torrent import json_depth

    assert json_depth(text) == depth


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ((b"creation date",), 10**30, "creation date: an integer of 100 bits"),
        ((b"info", b"rounds"), 10**7, "info.rounds: 10000000 is not in [0, 1000000]"),
        ((b"info", b"data", b"num_nodes"), 2**62, "info.data.num_nodes"),
        ((b"info", b"train", b"seed"), 2**63, "info.train.seed"),
        ((b"info", b"train", b"seed"), -1, "info.train.seed: -1 is not in"),
        ((b"info", b"model", b"kwargs"), b'{"a":' + b"[" * 30_000 + b"]" * 30_000 + b"}", "16"),
    ],
)
def test_hostile_numbers_and_depths_are_torrent_errors(
    where: tuple[bytes, ...], value: object, message: str
) -> None:
    meta = raw(make_torrent())
    target = meta
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    with pytest.raises(TorrentError) as info:
        Torrent.from_bytes(encode(meta))
    assert message in str(info.value)


def test_a_seed_up_to_2_63_round_trips() -> None:
    torrent = make_torrent(train=TrainConfig(seed=2**63 - 1))
    assert Torrent.from_bytes(torrent.to_bytes()) == torrent


def test_the_model_must_fit_its_pinned_state_before_anything_is_built() -> None:
    from fedtorrent.net.torrent import check_model_size

    exact = 4 * ((784 + 1) * 32 + (32 + 1) * 10)
    fits = make_session(model=ModelConfig("mlp", {"hidden": 32}), state_size=exact + 100)
    assert check_model_size(fits) == exact
    for session in (
        make_session(model=ModelConfig("mlp", {"hidden": [3_300_000]}), state_size=exact),
        make_session(model=ModelConfig("mlp", {"hidden": 32}), state_size=exact - 1),
        make_session(model=ModelConfig("mlp", {"hidden": 32}), state_size=exact + 2**21),
        make_session(model=ModelConfig("mlp", {"hidden": [1] * 65}), state_size=exact),
        make_session(model=ModelConfig("mlp", {"width": 3}), state_size=exact),
    ):
        with pytest.raises(TorrentError, match=r"^info\.model: "):
            check_model_size(session)
    unknown = make_session(data=DataConfig(dataset="somewhere-else"))
    assert check_model_size(unknown) is None


def test_save_session_writes_the_state_first_and_never_leaves_half(tmp_path: Path) -> None:
    from fedtorrent.net.torrent import save_session

    state = encode_state(build_model("logreg", input_shape=(1, 8, 8), num_classes=10).state_dict())
    torrent = make_torrent(
        model=ModelConfig("logreg", {}),
        data=DataConfig(dataset="digits"),
        state_sha256=hashlib.sha256(state).hexdigest(),
        state_size=len(state),
    )
    paths = save_session(torrent, tmp_path / "new" / "deep" / "s.torrent", state)
    assert paths == (tmp_path / "new/deep/s.torrent", tmp_path / "new/deep/s.state")
    assert load_torrent(paths[0]) == torrent and paths[1].read_bytes() == state
    with pytest.raises(TorrentError, match=r"info\.state\.size"):
        save_session(torrent, tmp_path / "bad" / "s.torrent", state + b"x")
    assert not (tmp_path / "bad").exists()
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "s.torrent").mkdir()  # the torrent cannot be renamed onto a folder
    with pytest.raises(OSError):
        save_session(torrent, tmp_path / "blocked" / "s.torrent", state)
    assert sorted(p.name for p in (tmp_path / "blocked").iterdir()) == ["s.torrent"]
