"""Moving wire messages between peers: one small contract, a ZeroMQ implementation, a twin."""

from fedtorrent.net.transport.base import (
    Endpoint,
    FetchResult,
    FetchTimeoutError,
    PeerRefusedError,
    Reply,
    ServedEvent,
    TrafficStats,
    Transport,
    TransportConfig,
    child_thread_name,
)
from fedtorrent.net.transport.memory import MemoryNetwork, MemoryTransport
from fedtorrent.net.transport.zmq import ZmqTransport

__all__ = [
    "Endpoint",
    "FetchResult",
    "FetchTimeoutError",
    "MemoryNetwork",
    "MemoryTransport",
    "PeerRefusedError",
    "Reply",
    "ServedEvent",
    "TrafficStats",
    "Transport",
    "TransportConfig",
    "ZmqTransport",
    "child_thread_name",
]
