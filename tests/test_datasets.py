"""Datasets: real MNIST/Fashion files, digits offline, and the download path on a local server."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedtorrent.data import datasets
from fedtorrent.data.datasets import (
    DATASET_NAMES,
    PARSED_VERSION,
    SHA256,
    Dataset,
    download_file,
    extract_cifar_archive,
    load_dataset,
    parsed_folder,
    read_cifar_batches,
    read_idx,
    verify_file,
)
from fedtorrent.errors import ChecksumError, ConfigError, DataError, UnknownNameError

IDX_FILES = datasets._IDX_FILES
CIFAR_BATCHES = (*datasets._CIFAR_TRAIN, datasets._CIFAR_TEST)

# Per-class counts 0..9 from /work/shared/data/README.md.
REAL_COUNTS = {
    "mnist": (
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    ),
    "fashion-mnist": ([6000] * 10, [1000] * 10),
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def idx_gz(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def tiny_mnist(seed: int, n_train: int = 20, n_test: int = 10) -> dict[str, bytes]:
    """The four canonical IDX files, but tiny and random."""
    rng = np.random.default_rng(seed)
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files[f"{prefix}-images-idx3-ubyte.gz"] = idx_gz(rng.integers(0, 256, (n, 28, 28)))
        files[f"{prefix}-labels-idx1-ubyte.gz"] = idx_gz(np.arange(n) % 10)
    return files


def random_bytes(n: int) -> bytes:
    return np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()


def pin(monkeypatch: pytest.MonkeyPatch, folder: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        monkeypatch.setitem(datasets.SHA256, f"{folder}/{name}", sha(data))


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def all_files(root: Path, under: str = "") -> list[str]:
    """Every file below ``root`` (or below ``root / under``), relative to ``root``."""
    files = (p for p in (root / under).rglob("*") if p.is_file())
    return sorted(str(p.relative_to(root)) for p in files)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $FEDTORRENT_DATA and a private cache folder; returns the cache folder."""
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "fedtorrent"


# --- a local HTTP server ---------------------------------------------------------------------


class FileServer:
    """Serves ``routes[path] = (body, declared_length)`` on 127.0.0.1 and records each request."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, int | None]] = {}
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append(self.path)
                if self.path not in owner.routes:
                    self.send_error(404)
                    return
                body, declared = owner.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) if declared is None else declared))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, path: str, body: bytes, *, declared: int | None = None) -> None:
        self.routes[path] = (body, declared)


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    thread = threading.Thread(target=srv.httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        thread.join(timeout=5)


def dead_url() -> str:
    """A URL on a 127.0.0.1 port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# --- real datasets ---------------------------------------------------------------------------


def _network_available() -> bool:
    try:
        socket.create_connection(("ossci-datasets.s3.amazonaws.com", 443), timeout=3).close()
    except OSError:
        return False
    return True


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_dataset_loads_with_canonical_shapes_and_counts(name: str) -> None:
    if not os.environ.get(datasets.ENV_VAR) and not _network_available():
        pytest.skip(f"${datasets.ENV_VAR} is unset and the canonical mirrors are unreachable")
    ds = load_dataset(name, progress=False)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    train_counts, test_counts = REAL_COUNTS[name]
    assert np.bincount(ds.y_train).tolist() == train_counts
    assert np.bincount(ds.y_test).tolist() == test_counts


def test_digits_load_offline_with_a_deterministic_stratified_split(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("digits must not touch the network")

    monkeypatch.setattr(datasets, "fetch_to_file", no_network)
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    both = np.bincount(np.concatenate([ds.y_train, ds.y_test]))
    assert np.all(np.abs(np.bincount(ds.y_test) - 0.2 * both) <= 1)
    again = load_dataset("digits")
    assert np.array_equal(ds.x_train, again.x_train) and np.array_equal(ds.y_test, again.y_test)


# --- names, folders, lookup order ------------------------------------------------------------


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        load_dataset("imagenet")
    assert isinstance(info.value, ConfigError)
    assert all(n in str(info.value) for n in DATASET_NAMES)


def test_missing_data_dir_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope"):
        load_dataset("mnist", data_dir=missing)


def test_missing_files_without_download_is_a_clear_error(clean_env: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"mnist/train-images-idx3-ubyte\.gz.*download=False"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_lookup_order_is_data_dir_then_env_then_cache(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path
) -> None:
    # One root holds each file, so each root's copy must pass its own pinned sha: pin per file
    # the copy that root should win with, and give the other roots different bytes.
    roots = {"explicit": tmp_path / "explicit", "env": tmp_path / "env", "cache": clean_env}
    contents = {key: tiny_mnist(seed) for seed, key in enumerate(roots)}
    for key, root in roots.items():
        write_files(root / "mnist", contents[key])
    monkeypatch.setenv(datasets.ENV_VAR, str(roots["env"]))

    def loaded_from(key: str, **kwargs: object) -> None:
        pin(monkeypatch, "mnist", contents[key])
        ds = load_dataset("mnist", download=False, **kwargs)
        raw = read_idx(roots[key] / "mnist" / "t10k-images-idx3-ubyte.gz")
        assert np.array_equal(ds.x_test[:, 0], raw / np.float32(255))

    loaded_from("explicit", data_dir=roots["explicit"])
    loaded_from("env")
    monkeypatch.delenv(datasets.ENV_VAR)
    loaded_from("cache")


# --- checksums and parsing of files on disk --------------------------------------------------


def test_corrupt_or_truncated_file_on_disk_names_file_and_both_checksums(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path
) -> None:
    files = tiny_mnist(0)
    pin(monkeypatch, "mnist", files)
    good = files["train-images-idx3-ubyte.gz"]
    for bad in (good[:-7], good[:100] + bytes([good[100] ^ 1]) + good[101:]):
        write_files(tmp_path / "mnist", {**files, "train-images-idx3-ubyte.gz": bad})
        with pytest.raises(ChecksumError) as info:
            load_dataset("mnist", data_dir=tmp_path, download=False)
        message = str(info.value)
        assert "train-images-idx3-ubyte.gz" in message
        assert sha(good) in message and sha(bad) in message


def test_verification_is_redone_when_a_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 10)
    verify_file(path, sha(b"a" * 10))
    verify_file(path, sha(b"a" * 10))  # cached
    path.write_bytes(b"b" * 10)
    os.utime(path, ns=(1, 1))
    with pytest.raises(ChecksumError):
        verify_file(path, sha(b"a" * 10))


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"\x00\x00\x09\x01" + (3).to_bytes(4, "big") + b"abc", "magic"),
        (b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + b"abc", "disagree"),
        (b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"abc", "disagree"),
        (b"\x00\x00\x08\x03" + (10**6).to_bytes(4, "big") * 3, "limit"),
        (b"\x00\x00\x08", "magic"),
    ],
)
def test_bad_idx_content_is_a_data_error(raw: bytes, problem: str, tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match=problem):
        read_idx(path)


def test_not_gzip_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(b"plain bytes")
    with pytest.raises(DataError, match="gzip"):
        read_idx(path)


def test_images_and_labels_that_disagree_are_a_data_error(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path
) -> None:
    files = tiny_mnist(0)
    files["t10k-labels-idx1-ubyte.gz"] = idx_gz(np.arange(9) % 10)  # 10 images, 9 labels
    pin(monkeypatch, "mnist", files)
    write_files(tmp_path / "mnist", files)
    with pytest.raises(DataError, match="t10k-labels"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


# --- CIFAR-10 binary format ------------------------------------------------------------------


def cifar_batch(seed: int, rows: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A batch in the real format: each row is 1 label byte then R, G, B planes of 32x32."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, rows, dtype=np.uint8)
    pixels = rng.integers(0, 256, (rows, 3, 32, 32), dtype=np.uint8)
    data = b"".join(bytes([labels[i]]) + pixels[i].tobytes(order="C") for i in range(rows))
    return data, pixels, labels


def test_cifar_parser_reads_planar_rgb_rows(tmp_path: Path) -> None:
    paths, pixels, labels = [], [], []
    for seed, rows in enumerate((3, 2)):
        data, px, lb = cifar_batch(seed, rows)
        path = tmp_path / f"b{seed}.bin"
        path.write_bytes(data)
        paths.append(path)
        pixels.append(px)
        labels.append(lb)
    x, y = read_cifar_batches(paths)
    assert x.shape == (5, 3, 32, 32) and x.dtype == np.float32
    assert y.dtype == np.int64 and y.tolist() == np.concatenate(labels).tolist()
    assert np.array_equal(x, np.concatenate(pixels) / np.float32(255))
    # Byte 1 + c*1024 + h*32 + w of a row is channel c, row h, column w.
    raw = paths[0].read_bytes()
    assert x[0, 2, 5, 7] == raw[1 + 2 * 1024 + 5 * 32 + 7] / np.float32(255)


@pytest.mark.parametrize("data", [b"", b"\x01" * 3072, bytes([10]) + b"\x00" * 3072])
def test_cifar_parser_rejects_bad_batches(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    with pytest.raises(DataError, match=r"bad\.bin"):
        read_cifar_batches([path])


def cifar_tar(batches: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
        for name, data in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tiny_cifar(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    batches = {name: cifar_batch(i, 2 + i)[0] for i, name in enumerate(CIFAR_BATCHES)}
    pin(monkeypatch, "cifar10/cifar-10-batches-bin", batches)
    return batches


def evil_members() -> list[tarfile.TarInfo]:
    members = []
    for name in ("../escape.bin", "/tmp/fedtorrent-absolute.bin", "cifar-10-batches-bin/readme"):
        info = tarfile.TarInfo(name)
        info.size = 4
        members.append(info)
    link = tarfile.TarInfo("cifar-10-batches-bin/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    members.append(link)
    return members


def test_cifar_archive_extracts_only_the_verified_batches(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    batches = tiny_cifar(monkeypatch)
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(cifar_tar(batches, evil_members()))
    dest = tmp_path / "out" / "cifar10"
    extract_cifar_archive(archive, dest)
    assert all_files(tmp_path / "out") == sorted(
        f"cifar10/cifar-10-batches-bin/{b}" for b in batches
    )
    assert not (tmp_path / "out" / "escape.bin").exists()
    assert not Path("/tmp/fedtorrent-absolute.bin").exists()


@pytest.mark.parametrize("problem", ["symlink", "missing", "corrupt"])
def test_cifar_archive_problems_leave_no_partial_batch(
    problem: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    batches = tiny_cifar(monkeypatch)
    extra: list[tarfile.TarInfo] = []
    if problem == "symlink":
        link = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        extra.append(link)
    elif problem == "missing":
        del batches["test_batch.bin"]
    else:
        batches["data_batch_1.bin"] = batches["data_batch_1.bin"][:-1] + b"\xff"
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(cifar_tar(batches, extra))
    expected = ChecksumError if problem == "corrupt" else DataError
    with pytest.raises(expected):
        extract_cifar_archive(archive, tmp_path / "out")
    left = all_files(tmp_path / "out")
    assert not any(name.endswith(".part") for name in left)
    assert "cifar-10-batches-bin/data_batch_1.bin" not in left or problem == "missing"


# --- the download path, against a local HTTP server -------------------------------------------


@pytest.mark.network
@pytest.mark.timeout(30)
def test_download_then_load_offline(
    server: FileServer, monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path
) -> None:
    files = tiny_mnist(1)
    pin(monkeypatch, "mnist", files)
    for name, data in files.items():
        server.serve(f"/mnist/{name}", data)
    ds = load_dataset("mnist", data_dir=tmp_path, mirrors=[server.url + "/mnist/"], progress=True)
    assert isinstance(ds, Dataset) and ds.x_train.shape == (20, 1, 28, 28)
    assert ds.y_test.tolist() == list(range(10))
    parsed = [f"parsed/mnist-v{PARSED_VERSION}/{n}.npy" for n in ARRAYS]
    expected = [*(f"mnist/{name}" for name in files), *parsed]
    assert all_files(tmp_path) == sorted(
        [*expected, f"parsed/mnist-v{PARSED_VERSION}/manifest.json"]
    )
    assert not clean_env.exists() or all_files(clean_env) == []
    offline = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert np.array_equal(offline.x_train, ds.x_train)


# --- the parsed, memory-mapped copy -------------------------------------------------------------


ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _parsed_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Dataset, Path]:
    files = tiny_mnist(1)
    pin(monkeypatch, "mnist", files)
    for name, data in files.items():
        (tmp_path / "mnist").mkdir(exist_ok=True)
        (tmp_path / "mnist" / name).write_bytes(data)
    return load_dataset("mnist", data_dir=tmp_path), parsed_folder(tmp_path, "mnist")


def test_a_parsed_copy_is_memory_mapped_and_needs_no_sources(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path
) -> None:
    first, folder = _parsed_copy(monkeypatch, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*(f"{n}.npy" for n in ARRAYS), "manifest.json"]
    )
    for path in (tmp_path / "mnist").iterdir():
        path.unlink()  # the arrays alone suffice from now on
    again = load_dataset("mnist", data_dir=tmp_path, download=False)
    for name in ARRAYS:
        array = getattr(again, name)
        assert isinstance(array, np.memmap) and array.flags.writeable  # copy-on-write
        assert np.array_equal(array, getattr(first, name))
    again.x_train[0] = 7.0  # a caller's write stays in its own pages, never in the file
    assert np.array_equal(load_dataset("mnist", data_dir=tmp_path).x_train, first.x_train)


def test_a_corrupt_parsed_array_is_a_checksum_error(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path
) -> None:
    _, folder = _parsed_copy(monkeypatch, tmp_path)
    path = folder / "x_test.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"x_test\.npy"):
        load_dataset("mnist", data_dir=tmp_path)


def test_an_unchanged_parsed_array_is_not_hashed_again_but_a_changed_one_always_is(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path
) -> None:
    _, folder = _parsed_copy(monkeypatch, tmp_path)
    hashed: list[str] = []
    real = datasets._sha256

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(datasets, "_sha256", counting)
    monkeypatch.setattr(datasets, "_verified_cache", set())  # as a fresh process starts
    load_dataset("mnist", data_dir=tmp_path)
    assert hashed == []  # the stamps recorded at the first check still hold
    path = folder / "x_test.npy"
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size and mtime
    with pytest.raises(ChecksumError, match=r"x_test\.npy"):
        load_dataset("mnist", data_dir=tmp_path)
    assert hashed == ["x_test.npy"]


@pytest.mark.parametrize("damage", ["other_sources", "garbage_manifest", "missing_array"])
def test_a_stale_or_partial_parsed_copy_is_parsed_again(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path, damage: str
) -> None:
    first, folder = _parsed_copy(monkeypatch, tmp_path)
    manifest = folder / "manifest.json"
    if damage == "other_sources":
        document = json.loads(manifest.read_text())
        document["sources"] = {k: "0" * 64 for k in document["sources"]}
        manifest.write_text(json.dumps(document))
    elif damage == "garbage_manifest":
        manifest.write_bytes(b"\x00not json")
    else:
        (folder / "y_train.npy").unlink()
    again = load_dataset("mnist", data_dir=tmp_path)
    assert np.array_equal(again.x_train, first.x_train)
    assert json.loads(manifest.read_text())["sources"] == {
        f"mnist/{n}": SHA256[f"mnist/{n}"] for n in tiny_mnist(1)
    }


@pytest.mark.network
@pytest.mark.timeout(30)
def test_downloads_go_to_the_cache_not_to_env_folder(
    server: FileServer, monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path
) -> None:
    files = tiny_mnist(2)
    pin(monkeypatch, "mnist", files)
    for name, data in files.items():
        server.serve(f"/{name}", data)
    env_root = tmp_path / "shared"
    env_root.mkdir()
    monkeypatch.setenv(datasets.ENV_VAR, str(env_root))
    load_dataset("mnist", mirrors=[server.url], progress=False)
    assert all_files(env_root) == []
    assert all_files(clean_env, "mnist") == sorted(f"mnist/{name}" for name in files)


@pytest.mark.network
@pytest.mark.timeout(30)
@pytest.mark.parametrize("fault", ["corrupt", "truncated"])
def test_bad_download_is_a_checksum_error_and_leaves_nothing(
    fault: str, server: FileServer, tmp_path: Path
) -> None:
    good = random_bytes(5000)
    flipped = good[:-9] + bytes([good[-9] ^ 1]) + good[-8:]
    bad = good[: len(good) // 2] if fault == "truncated" else flipped
    server.serve("/f.gz", bad)
    dest = tmp_path / "mnist" / "f.gz"
    with pytest.raises(ChecksumError) as info:
        download_file([server.url + "/f.gz"], dest, sha256=sha(good), progress=False)
    assert "f.gz" in str(info.value) and sha(good) in str(info.value)
    assert sha(bad) in str(info.value)
    assert all_files(tmp_path) == []


@pytest.mark.network
@pytest.mark.timeout(30)
def test_connection_cut_short_is_a_data_error_and_leaves_nothing(
    server: FileServer, tmp_path: Path
) -> None:
    good = random_bytes(5000)
    server.serve("/f.gz", good[:1000], declared=len(good))
    with pytest.raises(DataError) as info:
        download_file([server.url + "/f.gz"], tmp_path / "f.gz", sha256=sha(good), progress=False)
    assert not isinstance(info.value, ChecksumError)
    assert all_files(tmp_path) == []


@pytest.mark.network
@pytest.mark.timeout(30)
def test_next_mirror_is_tried_after_a_failure(server: FileServer, tmp_path: Path) -> None:
    good = random_bytes(300)
    server.serve("/corrupt/f.gz", good[::-1])
    server.serve("/good/f.gz", good)
    bases = [dead_url(), server.url + "/missing/", server.url + "/corrupt/", server.url + "/good/"]
    dest = tmp_path / "f.gz"
    download_file([b + "f.gz" for b in bases], dest, sha256=sha(good), progress=False)
    assert dest.read_bytes() == good
    assert server.requests == ["/missing/f.gz", "/corrupt/f.gz", "/good/f.gz"]
    assert all_files(tmp_path) == ["f.gz"]


@pytest.mark.network
@pytest.mark.timeout(30)
def test_all_mirrors_failing_lists_each(server: FileServer, tmp_path: Path) -> None:
    urls = [dead_url() + "f.gz", server.url + "/missing/f.gz"]
    with pytest.raises(DataError) as info:
        download_file(urls, tmp_path / "f.gz", sha256="0" * 64, progress=False)
    assert all(url in str(info.value) for url in urls)
    assert all_files(tmp_path) == []


@pytest.mark.network
@pytest.mark.timeout(30)
def test_cifar_downloads_verifies_and_extracts(
    server: FileServer, monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path
) -> None:
    batches = tiny_cifar(monkeypatch)
    archive = cifar_tar(batches, evil_members())
    monkeypatch.setitem(datasets.SHA256, "cifar10/cifar-10-binary.tar.gz", sha(archive))
    server.serve("/kriz/cifar-10-binary.tar.gz", archive)
    ds = load_dataset("cifar10", data_dir=tmp_path, mirrors=[server.url + "/kriz/"], progress=False)
    assert ds.x_train.shape == (2 + 3 + 4 + 5 + 6, 3, 32, 32) and ds.x_test.shape == (7, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32) and ds.classes[0] == "airplane"
    x_test, y_test = read_cifar_batches([tmp_path / "cifar10/cifar-10-batches-bin/test_batch.bin"])
    assert np.array_equal(ds.x_test, x_test) and np.array_equal(ds.y_test, y_test)
    expected = ["cifar10/cifar-10-binary.tar.gz"]
    expected += [f"cifar10/cifar-10-batches-bin/{b}" for b in batches]
    assert all_files(tmp_path, "cifar10") == sorted(expected)
    assert not (tmp_path / "escape.bin").exists()
