"""Stage 5, deployment: ``pick`` a model for a budget, write its self-contained ``bundle``, and
``replay`` any trial (``autoprune export --trial N``).
"""

#: The stage's modules (``from autoprune.deploy import *`` imports them); each sets its own ``__all__``.
__all__ = ["bundle", "pick", "replay"]
