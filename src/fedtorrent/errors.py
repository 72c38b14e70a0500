"""The exception tree: callers catch by category, the CLI turns any of them into one line.

```
FedTorrentError
├── ConfigError          bad settings or arguments (also a ValueError)
│   └── UnknownNameError a registry name that does not exist (lists the valid ones)
├── DataError            a dataset that cannot be found, fetched or parsed
│   └── ChecksumError    a file whose sha256 is not the expected one
├── DecodeError          malformed bytes: state, wire message, torrent (also a ValueError)
│   ├── StateError       a state dict whose keys, shapes, dtypes or values are wrong
│   ├── TorrentError     a torrent file that is malformed or does not verify
│   └── MessageError     a peer message rejected before or after decoding
│       ├── SignatureError  an update whose signature is missing or does not verify
│       └── ReplayError     an update from an old round or with a reused nonce
├── NetworkError         a peer or tracker that cannot be reached in time
│   └── TrackerError     the tracker refused or could not answer
├── PrivacyError         a privacy budget or setting that cannot be honoured
└── LedgerError          a ledger that does not verify
```
"""

from __future__ import annotations


class FedTorrentError(Exception):
    """Base of every error fedtorrent raises on purpose."""


class ConfigError(FedTorrentError, ValueError):
    """A setting or argument is invalid."""


class UnknownNameError(ConfigError, KeyError):
    """A short name is not in a registry; the message lists the valid names."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]) -> None:
        self.kind, self.name, self.valid = kind, name, tuple(sorted(valid))
        super().__init__(f"unknown {kind} {name!r}; choose one of: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DataError(FedTorrentError):
    """A dataset cannot be found, downloaded or parsed."""


class ChecksumError(DataError):
    """A file's sha256 differs from the expected one."""


class DecodeError(FedTorrentError, ValueError):
    """Bytes from outside (a peer, a file, a request) are malformed."""


class StateError(DecodeError):
    """A model state has wrong keys, shapes, dtypes or non-finite values."""


class TorrentError(DecodeError):
    """A torrent file is malformed or does not verify."""


class MessageError(DecodeError):
    """A peer message was rejected; ``reason`` is a short code that peers count rejections by."""

    def __init__(self, message: str, *, reason: str = "rejected") -> None:
        super().__init__(message)
        self.reason = reason


class SignatureError(MessageError):
    """A signed update does not verify against its sender's public key."""


class ReplayError(MessageError):
    """A signed update repeats an old round or a nonce already seen from its sender."""


class NetworkError(FedTorrentError):
    """A peer or the tracker could not be reached in time."""


class TrackerError(NetworkError):
    """The tracker refused a request or gave an unusable answer."""


class PrivacyError(FedTorrentError):
    """A privacy setting or budget cannot be honoured."""


class LedgerError(FedTorrentError):
    """A ledger chain or signature does not verify."""


def printable(text: object) -> str:
    r"""``text`` made safe for a terminal or a log line: each non-printable character escaped.

    Control characters (``\x1b`` escape sequences, ``\r``, ``\n``), Unicode format characters
    (bidi overrides such as ``\u202e``) and the like cannot move the cursor, recolour or reorder
    what is shown, nor split one line into two. Every text that comes from outside (a torrent,
    a server, an error about them) is printed or put into a message through it.
    """
    line = str(text)
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in line)
