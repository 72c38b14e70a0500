"""fedtorrent.net."""
