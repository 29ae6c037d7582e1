"""Stage 1 and the fine-tune: data, models (and pre-training), distilled fine-tune, BN recalibration.
"""

