"""Stage 4, results: the Pareto front, its files, the HTML report, and re-measurement elsewhere.
"""

#: The stage's modules (``from autoprune.results import *`` imports them); each sets its own ``__all__``.
__all__ = ["artifacts", "dashboard", "front", "remeasure", "report"]
