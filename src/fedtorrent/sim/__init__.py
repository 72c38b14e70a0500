"""Many virtual nodes in one process: topologies, the vectorized engine, run folders, reproduce.

``engine`` holds every node's parameters in one tensor and trains and mixes them with batched
operations; ``run`` turns a ``SimConfig`` into a run folder; ``reproduce`` runs the seed paper's
experiments. See ``docs/simulator.md``.
"""
