"""Which torch device a run uses: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

The device is the machine's own choice, never a session setting: a torrent does not name one,
and peers of one swarm may train on different devices. Everything sent, saved or recorded stays
on the CPU; only training, mixing, trust and evaluation move.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from fedtorrent.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
"""The spellings :func:`resolve_device` accepts (``N`` a GPU index)."""
DEFAULT_DEVICE = "cpu"
"""The default of every ``--device`` option: today's behaviour; ``auto`` is one flag away."""

DEVICE_HELP = (
    "Where to compute: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps; an absent "
    "device is refused. The simulator and a peer train, mix, fit trust and evaluate there."
)
"""The ``--help`` text of every ``--device`` option."""

_CUDA = re.compile(r"cuda(?::(\d+))?")


def _mps_available() -> bool:
    import torch  # noqa: PLC0415

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The devices this machine has, as ``resolve_device`` spells them (``cpu`` first)."""
    import torch  # noqa: PLC0415

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def resolve_device(spec: str) -> torch.device:
    """The torch device ``spec`` names, checked to exist on this machine.

    ``auto`` is the first GPU (``cuda:0``) when CUDA is available, else ``mps`` when Apple's
    Metal backend is, else ``cpu``. ``cuda`` means ``cuda:0``.

    Raises:
        ConfigError: one line naming the spec asked for and the devices that exist (an unknown
            spelling, CUDA or MPS absent, a GPU index past the last GPU).
    """
    import torch  # noqa: PLC0415  (importing this module stays free of torch, for the CLI)

    text = spec.strip().lower() if isinstance(spec, str) else ""
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(text)
    if match is not None:
        index = int(match.group(1) or 0)
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            return torch.device("cuda", index)
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {spec!r} asked for, but CUDA is not available here; {_have()}"
            )
        raise ConfigError(
            f"device {spec!r} asked for, but this machine has {torch.cuda.device_count()} "
            f"CUDA device(s); {_have()}"
        )
    if text == "mps":
        if _mps_available():
            return torch.device("mps")
        raise ConfigError(f"device {spec!r} asked for, but MPS is not available here; {_have()}")
    raise ConfigError(f"unknown device {spec!r}; choose one of: {', '.join(DEVICE_CHOICES)}")


def _have() -> str:
    return f"available: {', '.join(available_devices())}"
