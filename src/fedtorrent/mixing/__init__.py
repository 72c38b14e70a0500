"""fedtorrent.mixing."""
