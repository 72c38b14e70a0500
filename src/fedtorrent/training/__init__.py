"""fedtorrent.training."""
