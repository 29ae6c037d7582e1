"""Stage 1 and the fine-tune: data, models (and pre-training), distilled fine-tune, BN recalibration.
"""

#: The stage's modules (``from autoprune.train import *`` imports them); each sets its own ``__all__``.
__all__ = ["bn", "checkpoint", "data", "device", "finetune", "models", "task"]
