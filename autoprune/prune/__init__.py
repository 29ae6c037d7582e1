"""Stage 1, pruning: the model's coupled channel groups (``structure``), how a plan removes
channels or zeroes weights (``plan``), and the importance criteria and granularities
(``methods``).
"""

