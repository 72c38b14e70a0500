"""fedtorrent.privacy."""
