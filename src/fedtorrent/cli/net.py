"""Commands: net."""

from __future__ import annotations

from fedtorrent.cli import app

_ = app
