"""Stage 5, deployment: ``pick`` a model for a budget, write its self-contained ``bundle``, and
``replay`` any trial (``autoprune export --trial N``).
"""

