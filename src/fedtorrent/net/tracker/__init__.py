"""fedtorrent.net.tracker."""
