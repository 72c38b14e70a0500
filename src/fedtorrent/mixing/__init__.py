"""How a node combines its cohort's parameters: pure ``rules`` and learned ``trust``.

Both work on stacked flat vectors, for one peer ``(M, P)`` (own vector in row 0) or for every node
of the simulator at once; see ``docs/algorithm.md``.
"""
