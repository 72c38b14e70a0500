"""fedtorrent.net.transport."""
