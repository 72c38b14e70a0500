"""fedtorrent.sim."""
