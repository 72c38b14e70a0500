"""fedtorrent."""
