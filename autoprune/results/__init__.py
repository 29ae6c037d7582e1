"""Stage 4, results: the Pareto front, its files, the HTML report, and re-measurement elsewhere.
"""

