"""Stage 1, pruning: the model's coupled channel groups (``structure``), how a plan removes
channels or zeroes weights (``plan``), and the importance criteria and granularities
(``methods``).
"""

#: The stage's modules (``from autoprune.prune import *`` imports them); each sets its own ``__all__``.
__all__ = ["attention", "methods", "plan", "structure"]
