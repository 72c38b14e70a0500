"""MNIST, Fashion-MNIST, CIFAR-10 and scikit-learn's digits: find, verify, download, parse.

Files live under a root folder in their canonical names (``<root>/mnist/*.gz``,
``<root>/fashion-mnist/*.gz``, ``<root>/cifar10/cifar-10-batches-bin/*.bin``). Roots are searched in
order: an explicit ``data_dir``, ``$FEDTORRENT_DATA``, then the cache folder
(``$XDG_CACHE_HOME/fedtorrent`` or ``~/.cache/fedtorrent``). Every file is checked against the
sha256 pinned in :data:`SHA256` before it is parsed, so a parser only ever sees canonical bytes.
Missing files are downloaded from the canonical mirrors into ``data_dir`` (if given and writable)
or the cache folder, never into ``$FEDTORRENT_DATA``, which is often a shared read-only folder.

CIFAR-10 pins the sha256 of ``cifar-10-binary.tar.gz`` that TensorFlow Datasets records
(``c4a38c50...``; the same archive has the published MD5 ``c32a1d4ab5d03f1284b67883e8d87530``) and
the sha256 of each extracted batch as recorded by torchvision-ruby.

Parsing uses numpy only: no pickle, no torchvision. A parsed dataset is kept as uncompressed
``.npy`` arrays under ``<cache>/parsed/<name>-v<N>/`` (:func:`parsed_folder`) and memory-mapped
copy-on-write from then on, so every process that loads it shares one copy in the page cache and a
peer touches only its own shard's rows. Each array is checked against the sha256 its
``manifest.json`` recorded when it was written from the verified source files, and the manifest
names those sources' pinned sha256, so a cache made from other bytes is parsed again. Hashing
the arrays costs more than mapping them (0.15 s for MNIST), so the manifest also keeps each
array's stat stamp (size, mtime, ctime, inode, device) from its last full check: an array whose
stamp is unchanged is not hashed again. Any write to a file changes its ctime, which no user call
can set back, so a changed array is always hashed; what a stamp cannot see is a disk that flips
bits under an unchanged inode.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import math
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from fedtorrent.errors import ChecksumError, DataError, NetworkError, UnknownNameError
from fedtorrent.files import atomic_writer, write_atomic
from fedtorrent.net.download import fetch_to_file

log = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10", "digits")
ENV_VAR = "FEDTORRENT_DATA"
DOWNLOAD_TIMEOUT_S = 900.0
"""Seconds one mirror gets for one whole file (CIFAR-10's 163 MB at 200 kB/s) before the next."""
DOWNLOAD_IDLE_S = 30.0
"""Seconds a mirror may stay silent (connect or read) before the next one is tried."""

_IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_CIFAR_ARCHIVE = "cifar10/cifar-10-binary.tar.gz"
_CIFAR_FOLDER = "cifar-10-batches-bin"
_CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST = "test_batch.bin"
_CIFAR_ROW = 1 + 3 * 32 * 32
_CIFAR_MAX_MEMBER = 10_000 * _CIFAR_ROW
"""Each canonical batch holds exactly 10,000 rows; anything larger is not one."""
_MAX_DOWNLOAD = 512 * 2**20
_MAX_IDX_ELEMENTS = 64 * 2**20
"""The largest canonical IDX payload is 47,040,000 bytes; refuse headers that claim more."""
_CHUNK = 2**20
PARSED_VERSION = 1
"""Bumped whenever parsing changes what the arrays hold, so older caches are parsed again."""
_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
_MANIFEST = "manifest.json"
_MAX_MANIFEST = 64 << 10

SHA256: dict[str, str] = {
    "mnist/train-images-idx3-ubyte.gz": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "mnist/train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "mnist/t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "mnist/t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
    "fashion-mnist/train-images-idx3-ubyte.gz": (
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"
    ),
    "fashion-mnist/train-labels-idx1-ubyte.gz": (
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
    ),
    "fashion-mnist/t10k-images-idx3-ubyte.gz": (
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
    ),
    "fashion-mnist/t10k-labels-idx1-ubyte.gz": (
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
    ),
    _CIFAR_ARCHIVE: "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
    "cifar10/cifar-10-batches-bin/data_batch_1.bin": (
        "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5"
    ),
    "cifar10/cifar-10-batches-bin/data_batch_2.bin": (
        "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed"
    ),
    "cifar10/cifar-10-batches-bin/data_batch_3.bin": (
        "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67"
    ),
    "cifar10/cifar-10-batches-bin/data_batch_4.bin": (
        "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48"
    ),
    "cifar10/cifar-10-batches-bin/data_batch_5.bin": (
        "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add"
    ),
    "cifar10/cifar-10-batches-bin/test_batch.bin": (
        "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b"
    ),
}
"""Pinned sha256 of every file, keyed by its path relative to a data root."""

MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}
"""Base URLs tried in order; a file's URL is the base plus its canonical file name."""

INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "digits": (1, 8, 8),
}
"""One example's shape per dataset, known without loading it (``create`` and size checks)."""

_DIGIT_NAMES = tuple(str(d) for d in range(10))
CLASSES: dict[str, tuple[str, ...]] = {
    "mnist": _DIGIT_NAMES,
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
    "digits": _DIGIT_NAMES,
}


@dataclass(frozen=True, eq=False)  # field-wise == on arrays would raise; compare by identity
class Dataset:
    """A train/test pair of images in [0, 1] and integer labels.

    ``x_*`` are float32 of shape (N, C, H, W); ``y_*`` are int64 of shape (N,), each value an index
    into ``classes``.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """How many labels exist, whether or not every one occurs in the data."""
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One example's (C, H, W)."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = True,
    progress: bool = True,
    mirrors: Sequence[str] | None = None,
) -> Dataset:
    """Find (or download), verify and parse one dataset.

    Args:
        name: one of :data:`DATASET_NAMES`.
        data_dir: searched first and, when writable, where missing files are downloaded to.
        download: fetch missing files; when False a missing file is a ``DataError``.
        progress: show a progress bar on stderr while downloading.
        mirrors: base URLs that replace the canonical mirrors of this dataset.

    Raises:
        UnknownNameError: ``name`` is not a known dataset.
        DataError: ``data_dir`` does not exist, a file is missing and cannot be fetched, or its
            content is malformed.
        ChecksumError: a file on disk or a download differs from its pinned sha256.
    """
    if name not in DATASET_NAMES:
        raise UnknownNameError("dataset", name, DATASET_NAMES)
    explicit = _explicit_dir(data_dir)
    if name == "digits":
        return _load_digits()
    store = _Store(
        roots=_search_roots(explicit),
        writable=_write_candidates(explicit),
        download=download,
        progress=progress,
        mirrors=tuple(mirrors) if mirrors is not None else MIRRORS[name],
    )
    sources = _CIFAR_SOURCES if name == "cifar10" else tuple(f"{name}/{f}" for f in _IDX_FILES)
    cached = _read_parsed(name, store, sources)
    if cached is not None:
        return cached
    dataset = _load_cifar10(store) if name == "cifar10" else _load_idx_dataset(name, store)
    return _write_parsed(dataset, store, sources)


def parsed_folder(root: Path, name: str) -> Path:
    """Where the parsed arrays of dataset ``name`` live under a data root."""
    return root / "parsed" / f"{name}-v{PARSED_VERSION}"


def _read_parsed(name: str, store: _Store, sources: Sequence[str]) -> Dataset | None:
    """The memory-mapped arrays of the first complete, verified parsed copy; None if there is none.

    A copy whose manifest is unreadable or names other sources is ignored (parsed again); an
    array that differs from its recorded sha256 is a ``ChecksumError``, as for any file.
    """
    for root in store.roots:
        folder = parsed_folder(root, name)
        manifest = _manifest(folder / _MANIFEST)
        if manifest is None or manifest.get("sources") != {s: SHA256[s] for s in sources}:
            continue
        stamps = manifest.get("verified", {})
        arrays, checked = {}, False
        for key in _ARRAYS:
            path = folder / f"{key}.npy"
            digest = manifest["arrays"].get(key)
            if not isinstance(digest, str) or not path.is_file():
                break
            if stamps.get(key) != _stamp(path):
                verify_file(path, digest)
                stamps[key], checked = _stamp(path), True
            try:  # copy-on-write: writable views, no copy unless a caller writes into one
                arrays[key] = np.load(path, mmap_mode="c", allow_pickle=False)
            except (OSError, ValueError) as error:
                raise DataError(f"{path}: cannot map ({error}); delete {folder}") from error
        else:
            if checked:
                _write_manifest(folder, {**manifest, "verified": stamps})
            return _checked(name, arrays, folder)
    return None


def _stamp(path: Path) -> list[int]:
    """What changes whenever a file's bytes do (see the module doc)."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def _write_manifest(folder: Path, manifest: dict[str, dict[str, Any]]) -> None:
    """Record fresh stamps where the folder is writable; a read-only copy is hashed each time."""
    try:
        write_atomic(folder / _MANIFEST, json.dumps(manifest, indent=1).encode())
    except OSError as error:
        log.info("cannot record verified stamps in %s (%s)", folder, error)


def _manifest(path: Path) -> dict[str, dict[str, Any]] | None:
    try:
        if path.stat().st_size > _MAX_MANIFEST:
            return None
        document = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(document, dict)
        and all(isinstance(document.get(k, {}), dict) for k in ("sources", "arrays", "verified"))
        and all(k in document for k in ("sources", "arrays"))
    )
    return document if ok else None


def _checked(name: str, arrays: dict[str, np.ndarray], folder: Path) -> Dataset:
    shape = INPUT_SHAPES[name]
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.float32 or x.shape[1:] != shape:
            raise DataError(
                f"{folder}: x_{split} is {x.dtype} {x.shape}, not float32 (N, *{shape})"
            )
        if y.dtype != np.int64 or y.shape != x.shape[:1]:
            raise DataError(f"{folder}: y_{split} is {y.dtype} {y.shape}, not int64 ({len(x)},)")
    return Dataset(name, arrays["x_train"], arrays["y_train"], arrays["x_test"],
                   arrays["y_test"], CLASSES[name])  # fmt: skip


def _write_parsed(dataset: Dataset, store: _Store, sources: Sequence[str]) -> Dataset:
    """Save the parsed arrays (then their manifest) and return them memory-mapped.

    Where no folder is writable the in-memory arrays are returned as they are.
    """
    try:
        folder = parsed_folder(store.target_root(), dataset.name)
        digests = {}
        for key in _ARRAYS:
            path = folder / f"{key}.npy"
            with atomic_writer(path) as handle:
                np.save(handle, getattr(dataset, key), allow_pickle=False)
            digests[key] = _sha256(path)
        manifest = {"sources": {s: SHA256[s] for s in sources}, "arrays": digests}
        write_atomic(folder / _MANIFEST, json.dumps(manifest, indent=1).encode())
    except (OSError, DataError) as error:
        log.info("keeping %s in memory: cannot write its parsed copy (%s)", dataset.name, error)
        return dataset
    mapped = _read_parsed(dataset.name, dataclasses.replace(store, roots=(folder.parent.parent,)),
                          sources)  # fmt: skip
    return dataset if mapped is None else mapped


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fedtorrent``, or ``~/.cache/fedtorrent`` when that is unset."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "fedtorrent"


# --- where files are -------------------------------------------------------------------------


def _explicit_dir(data_dir: str | Path | None) -> Path | None:
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data_dir {str(path)!r} does not exist or is not a folder")
    return path


def _search_roots(explicit: Path | None) -> tuple[Path, ...]:
    roots = [explicit] if explicit is not None else []
    env = os.environ.get(ENV_VAR)
    if env and Path(env).expanduser().is_dir():
        roots.append(Path(env).expanduser())
    roots.append(default_cache_dir())
    return tuple(dict.fromkeys(roots))


def _write_candidates(explicit: Path | None) -> tuple[Path, ...]:
    return (explicit, default_cache_dir()) if explicit is not None else (default_cache_dir(),)


@dataclass(frozen=True)
class _Store:
    """Where one load looks for files, where it may write them, and from where it fetches."""

    roots: tuple[Path, ...]
    writable: tuple[Path, ...]
    download: bool
    progress: bool
    mirrors: tuple[str, ...]

    def find(self, relpath: str) -> Path | None:
        return next((r / relpath for r in self.roots if (r / relpath).is_file()), None)

    def target_root(self) -> Path:
        """The first candidate that exists (or can be made) and is writable."""
        for root in self.writable:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if os.access(root, os.W_OK):
                return root
        raise DataError(f"no writable folder to download into; tried {_listing(self.writable)}")

    def verified(self, relpath: str) -> Path:
        """The path of ``relpath`` checked against its sha256, downloading it if missing."""
        found = self.find(relpath)
        if found is not None:
            verify_file(found, SHA256[relpath])
            return found
        if not self.download:
            raise DataError(
                f"{relpath} not found in {_listing(self.roots)} and download=False; "
                f"place the file there or set ${ENV_VAR}"
            )
        dest = self.target_root() / relpath
        urls = [base.rstrip("/") + "/" + Path(relpath).name for base in self.mirrors]
        download_file(urls, dest, sha256=SHA256[relpath], progress=self.progress)
        return dest


def _listing(paths: Sequence[Path]) -> str:
    return ", ".join(repr(str(p)) for p in paths)


# --- verification and download ---------------------------------------------------------------

_verified_cache: set[tuple[str, int, int, str]] = set()
"""(path, size, mtime_ns, sha256) of files already hashed in this process."""


def verify_file(path: Path, sha256: str) -> None:
    """Raise ``ChecksumError`` unless the file's sha256 is ``sha256``.

    A file that passed once is not hashed again while its size and mtime stay the same.
    """
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, sha256)
    if key in _verified_cache:
        return
    _check_digest(path, sha256, _sha256(path), hint="delete it to download it again")
    _verified_cache.add(key)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_digest(path: Path, expected: str, actual: str, *, hint: str) -> None:
    if actual != expected:
        raise ChecksumError(
            f"{path}: sha256 {actual}, expected {expected} (corrupt or truncated file; {hint})"
        )


def download_file(
    urls: Sequence[str],
    dest: Path,
    *,
    sha256: str,
    progress: bool = True,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    idle: float = DOWNLOAD_IDLE_S,
) -> None:
    """Fetch ``dest`` from the first URL that yields bytes with the given sha256.

    Each mirror gets ``timeout`` seconds for the whole download (connect, headers, every byte)
    and is dropped after ``idle`` seconds of silence; at most 512 MiB are read from any. Bytes go
    to a temporary file beside ``dest``, which is renamed onto ``dest`` only once verified; on
    any failure it is removed, so ``dest`` is either absent or complete.

    Raises:
        ChecksumError: no URL worked and at least one served bytes with the wrong sha256.
        DataError: no URL could be fetched.
    """
    if not urls:
        raise DataError(f"no mirror to download {dest.name} from")
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    checksum_error: ChecksumError | None = None
    for url in urls:
        try:
            _download_one(url, dest, sha256=sha256, progress=progress, timeout=timeout, idle=idle)
            return
        except ChecksumError as error:
            checksum_error = error
            failures.append(f"{url}: {error}")
        except NetworkError as error:
            failures.append(str(error))  # it names the URL
        except (OSError, DataError) as error:
            failures.append(f"{url}: {error}")
    if checksum_error is not None and len(urls) == 1:
        raise checksum_error
    message = f"could not download {dest.name}: " + "; ".join(failures)
    raise ChecksumError(message) if checksum_error is not None else DataError(message)


def _download_one(
    url: str, dest: Path, *, sha256: str, progress: bool, timeout: float, idle: float
) -> None:
    def check(size: int, digest: str) -> None:
        _check_digest(dest, sha256, digest, hint=f"as downloaded from {url}")

    with _progress_bar(dest.name, enabled=progress) as advance:
        fetch_to_file(
            url,
            dest,
            deadline=time.monotonic() + timeout,
            idle=idle,
            limit=_MAX_DOWNLOAD,
            check=check,
            progress=advance,
        )


@contextmanager
def _progress_bar(label: str, *, enabled: bool) -> Iterator[Callable[[int | None, int], None]]:
    """``advance(total, n)``: ``n`` more bytes of ``total`` (None while unknown)."""
    if not enabled:
        yield lambda _total, _n: None
        return
    # rich and sklearn load lazily: importing fedtorrent must stay fast (STYLE principle 12).
    from rich import console, progress  # noqa: PLC0415

    columns = (
        progress.TextColumn("{task.description}"),
        progress.BarColumn(),
        progress.DownloadColumn(),
        progress.TransferSpeedColumn(),
    )
    with progress.Progress(*columns, console=console.Console(stderr=True)) as bar:
        task = bar.add_task(label, total=None)

        def advance(total: int | None, n: int) -> None:
            bar.update(task, total=total, advance=n)

        yield advance


# --- MNIST and Fashion-MNIST -----------------------------------------------------------------


def _load_idx_dataset(name: str, store: _Store) -> Dataset:
    paths = {f: store.verified(f"{name}/{f}") for f in _IDX_FILES}
    splits = []
    for prefix in ("train", "t10k"):
        images_path = paths[f"{prefix}-images-idx3-ubyte.gz"]
        labels_path = paths[f"{prefix}-labels-idx1-ubyte.gz"]
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{images_path} has shape {images.shape} but {labels_path} has {labels.shape}; "
                "expected (N, H, W) images and N labels"
            )
        x = images[:, None].astype(np.float32)
        x /= 255.0
        splits.append((x, _labels(labels, len(CLASSES[name]), labels_path)))
    (x_train, y_train), (x_test, y_test) = splits
    return Dataset(name, x_train, y_train, x_test, y_test, CLASSES[name])


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzip-compressed IDX file of unsigned bytes into a uint8 array.

    The header (magic ``0x0000 08 ndim``, then ``ndim`` big-endian int32 sizes) is checked against
    the decompressed length before the payload is read.

    Raises:
        DataError: not gzip, wrong magic, or sizes that disagree with the payload.
    """
    try:
        with gzip.open(path, "rb") as f:
            return _read_idx_stream(f, path)
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: not a readable gzip file ({error})") from error


def _read_idx_stream(f: gzip.GzipFile, path: Path) -> np.ndarray:
    magic = f.read(4)
    if len(magic) != 4 or magic[:3] != b"\x00\x00\x08" or not 1 <= magic[3] <= 4:
        raise DataError(f"{path}: bad IDX magic {magic.hex()}; expected 000008 then 01..04")
    ndim = magic[3]
    header = f.read(4 * ndim)
    if len(header) != 4 * ndim:
        raise DataError(f"{path}: IDX header ends early")
    dims = tuple(int.from_bytes(header[4 * i : 4 * i + 4], "big") for i in range(ndim))
    count = math.prod(dims)  # Python ints: no overflow on hostile sizes
    if count > _MAX_IDX_ELEMENTS:
        raise DataError(f"{path}: IDX sizes {dims} claim {count} bytes, over the limit")
    payload = f.read(count)
    if len(payload) != count or f.read(1):
        raise DataError(f"{path}: IDX sizes {dims} disagree with the file length")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def _labels(raw: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    if raw.size and int(raw.max()) >= num_classes:
        raise DataError(f"{path}: label {int(raw.max())} is not below {num_classes}")
    return raw.astype(np.int64)


# --- CIFAR-10 --------------------------------------------------------------------------------


def _cifar_relpath(member: str) -> str:
    return f"cifar10/{_CIFAR_FOLDER}/{member}"


_CIFAR_SOURCES = tuple(_cifar_relpath(m) for m in (*_CIFAR_TRAIN, _CIFAR_TEST))


def _load_cifar10(store: _Store) -> Dataset:
    members = (*_CIFAR_TRAIN, _CIFAR_TEST)
    if any(store.find(_cifar_relpath(m)) is None for m in members):
        archive = store.verified(_CIFAR_ARCHIVE)
        extract_cifar_archive(archive, store.target_root() / "cifar10")
    paths = [store.verified(_cifar_relpath(m)) for m in members]
    x_train, y_train = read_cifar_batches(paths[:-1])
    x_test, y_test = read_cifar_batches(paths[-1:])
    return Dataset("cifar10", x_train, y_train, x_test, y_test, CLASSES["cifar10"])


def extract_cifar_archive(archive: Path, dest: Path) -> None:
    """Extract the six batch files of ``cifar-10-binary.tar.gz`` into ``dest/cifar-10-batches-bin``.

    Only regular-file members named ``cifar-10-batches-bin/<batch>.bin`` are read; every output path
    is built from the known batch names, never from the archive, so no member can write elsewhere.
    Each batch is verified against :data:`SHA256` and renamed into place atomically.

    Raises:
        DataError: the archive is unreadable, lacks a batch, or holds a batch that is not a regular
            file or is too large.
        ChecksumError: an extracted batch differs from its pinned sha256.
    """
    wanted = {f"{_CIFAR_FOLDER}/{m}": m for m in (*_CIFAR_TRAIN, _CIFAR_TEST)}
    out_dir = dest / _CIFAR_FOLDER
    out_dir.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                batch = wanted.get(member.name.removeprefix("./"))
                if batch is None or batch in done:
                    continue
                if not member.isreg() or member.size > _CIFAR_MAX_MEMBER:
                    raise DataError(f"{archive}: member {member.name} is not a batch file")
                source = tar.extractfile(member)
                if source is None:
                    raise DataError(f"{archive}: member {member.name} cannot be read")
                _write_verified(source, out_dir / batch, SHA256[_cifar_relpath(batch)])
                done.add(batch)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"{archive}: cannot extract ({error})") from error
    missing = sorted(set(wanted.values()) - done)
    if missing:
        raise DataError(f"{archive}: lacks {', '.join(missing)}")


def _write_verified(source: IO[bytes], dest: Path, sha256: str) -> None:
    with atomic_writer(dest) as tmp:
        digest = hashlib.sha256()
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            tmp.write(chunk)
        _check_digest(dest, sha256, digest.hexdigest(), hint="as extracted from its archive")


def read_cifar_batches(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Parse CIFAR-10 binary batches: rows of 1 label byte then 3072 planar RGB bytes.

    Returns:
        Images as float32 (N, 3, 32, 32) in [0, 1] and labels as int64 (N,), in file order.

    Raises:
        DataError: a file's length is not a positive multiple of 3073, or a label is above 9.
    """
    sizes = [p.stat().st_size for p in paths]
    for path, size in zip(paths, sizes, strict=True):
        if size == 0 or size % _CIFAR_ROW:
            raise DataError(f"{path}: {size} bytes is not a whole number of {_CIFAR_ROW}-byte rows")
    total = sum(sizes) // _CIFAR_ROW
    x = np.empty((total, 3, 32, 32), dtype=np.float32)
    y = np.empty(total, dtype=np.int64)
    start = 0
    for path, size in zip(paths, sizes, strict=True):
        rows = np.fromfile(path, dtype=np.uint8).reshape(size // _CIFAR_ROW, _CIFAR_ROW)
        stop = start + len(rows)
        y[start:stop] = _labels(rows[:, 0], 10, path)
        x[start:stop] = rows[:, 1:].reshape(-1, 3, 32, 32)
        start = stop
    x /= 255.0
    return x, y


# --- digits ----------------------------------------------------------------------------------


def _load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (0..16 scaled to [0, 1]); a stratified 80/20 split."""
    from sklearn.datasets import load_digits  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0
    )
    return Dataset("digits", x_train, y_train, x_test, y_test, CLASSES["digits"])
