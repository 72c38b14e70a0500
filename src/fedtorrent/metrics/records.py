"""Structured records (one per node per round, or per node at the end) as JSON Lines and CSV.

The simulator and real peers write the same records; plots and tables are drawn from these files
only, never from objects in memory. JSON Lines is the source of truth (it keeps nested values such
as confusion matrices); the CSV beside it holds the scalar columns for spreadsheets. Non-finite
floats are written as ``null`` (JSON) or an empty cell (CSV).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from fedtorrent.errors import ConfigError, DataError
from fedtorrent.files import write_atomic

ROUND_FIELDS = (
    "mixing",
    "seed",
    "round",
    "node",
    "test_accuracy",
    "test_loss",
    "own_accuracy",
    "self_weight",
    "cluster_share",
)
"""Columns of the per-round, per-node records the simulator writes."""
FINAL_FIELDS = (
    "mixing",
    "seed",
    "node",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "loss",
    "own_accuracy",
    "cluster_share",
    "train_examples",
)
"""Scalar columns of the final per-node records (the JSON Lines file adds ``confusion``)."""


def clean(value: Any) -> Any:
    """``value`` made JSON-safe: NaN and infinities become None, containers are walked."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


class RecordWriter:
    """Appends records to ``<name>.jsonl`` and ``<name>.csv`` in ``directory``.

    Open it with ``with RecordWriter(...) as w:`` (or :meth:`open` / :meth:`close`). Each record
    is flushed as it is written, so a crash loses at most the record being written. CSV cells are
    the ``fields`` (missing keys are empty); the JSON line keeps every key.
    """

    def __init__(self, directory: Path, *, name: str, fields: Sequence[str]) -> None:
        if not fields:
            raise ConfigError("a record writer needs at least one CSV field")
        self.jsonl_path = Path(directory) / f"{name}.jsonl"
        self.csv_path = Path(directory) / f"{name}.csv"
        self.fields = tuple(fields)
        self._jsonl: IO[str] | None = None
        self._csv_file: IO[str] | None = None
        self._csv: csv.DictWriter[str] | None = None

    def open(self) -> RecordWriter:
        """Create the folder and open both files for appending (CSV header when new)."""
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        new_csv = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        self._csv_file = self.csv_path.open("a", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=self.fields, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()
        return self

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record to both files."""
        if self._jsonl is None or self._csv is None or self._csv_file is None:
            raise ConfigError("record writer is not open")
        safe = clean(dict(record))
        self._jsonl.write(json.dumps(safe, allow_nan=False) + "\n")
        self._jsonl.flush()
        self._csv.writerow({k: ("" if safe.get(k) is None else safe[k]) for k in self.fields})
        self._csv_file.flush()

    def close(self) -> None:
        """Close both files; safe to call twice."""
        for handle in (self._jsonl, self._csv_file):
            if handle is not None:
                handle.close()
        self._jsonl = self._csv_file = None
        self._csv = None

    def __enter__(self) -> RecordWriter:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON Lines file, one dict per non-blank line.

    Raises:
        DataError: the file is missing or a line is not a JSON object.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read records {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: a record must be a JSON object")
        yield record


def read_records(path: Path) -> list[dict[str, Any]]:
    """All records of a JSON Lines file."""
    return list(iter_records(path))


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON atomically (temp file, then rename)."""
    text = json.dumps(clean(value), indent=2, allow_nan=False) + "\n"
    write_atomic(path, text.encode("utf-8"))


def read_json(path: Path) -> Any:
    """Parse a JSON file; DataError when it is missing or malformed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read JSON {path}: {exc}") from exc
