"""Stage 2, measurement on the target: ONNX export, backends, timing statistics, int8
quantization, the architecture cache and lookup table, and the one "measure a candidate" step
(``candidate.measure_model``).
"""

