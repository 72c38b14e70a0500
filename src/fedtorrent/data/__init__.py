"""fedtorrent.data."""
