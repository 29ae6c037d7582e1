"""Latency statistics: a timing loop with warm-up, adaptive repeats and robust summaries.

Shared CPUs are noisy, so we report the median (not the mean), p90 and coefficient of
variation, and keep repeating until the median's distribution-free 95% confidence interval is
narrow enough (or a time cap is hit).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np


@dataclass
class LatencyStats:
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    cv: float
    n: int
    rel_ci: float  # half-width of the median's 95% CI divided by the median
    batch_size: int = 1

    @property
    def throughput(self) -> float:
        """Samples per second at this batch size."""
        return 1000.0 * self.batch_size / self.median_ms

    def to_dict(self) -> dict:
        d = asdict(self)
        d["throughput"] = self.throughput
        return d


def median_rel_ci(samples: np.ndarray, z: float = 1.96) -> float:
    """Relative half-width of the order-statistic CI of the median (no normality assumed)."""
    n = len(samples)
    if n < 5:
        return math.inf
    s = np.sort(samples)
    k = z * math.sqrt(n) / 2.0
    lo = s[max(0, int(math.floor(n / 2 - k)))]
    hi = s[min(n - 1, int(math.ceil(n / 2 + k)))]
    med = float(np.median(s))
    return float((hi - lo) / 2.0 / med) if med > 0 else math.inf


def summarize(samples_s: np.ndarray, batch_size: int = 1) -> LatencyStats:
    ms = np.asarray(samples_s, dtype=np.float64) * 1000.0
    mean = float(ms.mean())
    return LatencyStats(
        median_ms=float(np.median(ms)),
        p90_ms=float(np.percentile(ms, 90)),
        mean_ms=mean,
        min_ms=float(ms.min()),
        cv=float(ms.std() / mean) if mean > 0 else 0.0,
        n=int(ms.size),
        rel_ci=median_rel_ci(ms),
        batch_size=batch_size,
    )


def time_callable(
    fn: Callable[[], object],
    warmup: int = 10,
    repeats: int = 50,
    target_rel_ci: Optional[float] = 0.02,
    max_time_s: float = 5.0,
    batch_size: int = 1,
    timer: Callable[[], float] = time.perf_counter,
) -> LatencyStats:
    """Time ``fn`` (one synchronous inference). ``repeats`` is the minimum sample count; with a
    ``target_rel_ci`` we keep sampling in chunks until the median is stable or time runs out."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    t_start = time.perf_counter()

    def run(k: int) -> None:
        for _ in range(k):
            t0 = timer()
            fn()
            samples.append(timer() - t0)

    run(repeats)
    if target_rel_ci is not None:
        while (
            median_rel_ci(np.asarray(samples)) > target_rel_ci
            and time.perf_counter() - t_start < max_time_s
            and len(samples) < 100 * repeats
        ):
            run(max(10, repeats // 2))
    return summarize(np.asarray(samples), batch_size)
