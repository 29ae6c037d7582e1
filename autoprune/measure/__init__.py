"""Stage 2, measurement on the target: ONNX export, backends, timing statistics, int8
quantization, the architecture cache and lookup table, and the one "measure a candidate" step
(``candidate.measure_model``).
"""

#: The stage's modules (``from autoprune.measure import *`` imports them); each sets its own ``__all__``.
__all__ = ["backends", "bench", "cache", "candidate", "onnx", "onnx_slice", "ov_core", "parity", "predictor", "quantize", "server", "staircase", "stats"]
