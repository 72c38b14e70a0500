"""fedtorrent.node."""
