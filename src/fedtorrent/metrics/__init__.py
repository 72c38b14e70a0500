"""fedtorrent.metrics."""
