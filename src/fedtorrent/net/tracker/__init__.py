"""The HTTP tracker: a directory of the live peers of each session, never their parameters.

``registry`` holds the swarm logic (pure), ``store`` its SQLite persistence, ``server`` the aiohttp
app, ``client`` the peer's side. Import the submodules directly; this package imports nothing so
that a peer's client does not load the server.
"""
