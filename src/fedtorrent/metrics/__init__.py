"""Per-round, per-node records as JSON Lines and CSV (``records``), and plots drawn from them."""
