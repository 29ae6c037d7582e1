"""Latency statistics: a timing loop with warm-up, adaptive repeats and robust summaries.

Shared CPUs are noisy, so we report the median (not the mean), p90 and coefficient of
variation, and keep repeating until the median's distribution-free 95% confidence interval is
narrow enough (or a time cap is hit).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
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
    #: Set when a dense reference was timed in the same session (interleaved with this model).
    reference_median_ms: Optional[float] = None
    #: Median over interleaved pairs of reference time / this model's time (>1 = faster than dense).
    speedup: Optional[float] = None
    #: "perf_counter" (host wall clock), "cuda_events" (device-side time of the forward pass) or
    #: "openvino_infer" (OpenVINO's own time of the request's synchronous infer, benchmark_app's clock).
    clock: str = "perf_counter"

    @property
    def throughput(self) -> float:
        """Samples per second at this batch size."""
        return 1000.0 * self.batch_size / self.median_ms

    def to_dict(self) -> dict:
        d = asdict(self)
        d["throughput"] = self.throughput
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyStats":
        """Inverse of :meth:`to_dict` (the cache and the remote client store stats as JSON)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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


def _stable(samples: list[float], target_rel_ci: Optional[float]) -> bool:
    return target_rel_ci is None or median_rel_ci(np.asarray(samples)) <= target_rel_ci


def _past(deadline: Optional[float]) -> bool:
    return deadline is not None and time.perf_counter() >= deadline


def _host_timed(fn: Callable[[], object], timer: Callable[[], float]) -> Callable[[], float]:
    def one() -> float:
        t0 = timer()
        fn()
        return timer() - t0

    return one


def time_callable(
    fn: Callable[[], object],
    warmup: int = 10,
    repeats: int = 50,
    target_rel_ci: Optional[float] = 0.02,
    max_time_s: float = 5.0,
    batch_size: int = 1,
    timer: Callable[[], float] = time.perf_counter,
    timed: Optional[Callable[[], float]] = None,
    deadline: Optional[float] = None,
) -> LatencyStats:
    """Time ``fn`` (one synchronous inference). ``repeats`` is the minimum sample count; with a
    ``target_rel_ci`` we keep sampling in chunks until the median is stable or ``max_time_s``
    (wall clock, warm-up excluded) runs out.

    ``timed`` replaces ``fn`` + ``timer`` for runtimes that time themselves (CUDA events): it runs
    one inference and returns its duration in seconds.

    ``deadline`` (a ``time.perf_counter()`` value) overrides the counts: warm-up and sampling stop
    there, after at least one sample. The latency server uses it so that a request's warm-up and
    repeats cannot hold the device longer than the server allows, however slow the model.
    """
    one = timed or _host_timed(fn, timer)
    for _ in range(warmup):
        if _past(deadline):
            break
        one()
    samples: list[float] = []
    t_start = time.perf_counter()

    def run(k: int) -> None:
        for _ in range(k):
            if samples and _past(deadline):
                return
            samples.append(one())

    run(repeats)
    while (
        not _stable(samples, target_rel_ci)
        and time.perf_counter() - t_start < max_time_s
        and len(samples) < 100 * repeats
        and not _past(deadline)
    ):
        run(max(10, repeats // 2))
    st = summarize(np.asarray(samples), batch_size)
    if timed is not None:
        st.clock = getattr(timed, "clock", "custom")
    return st


def time_pair(
    fn: Callable[[], float],
    ref: Callable[[], float],
    warmup: int = 10,
    repeats: int = 50,
    target_rel_ci: Optional[float] = 0.02,
    max_time_s: float = 5.0,
    batch_size: int = 1,
    deadline: Optional[float] = None,
) -> LatencyStats:
    """Time a candidate and a dense reference interleaved (A, B, B, A, ...) in one session.

    Both callables run one inference and return its duration in seconds. Load on a shared CPU
    drifts on a scale of seconds, so adjacent A/B samples see the same conditions: the median of
    the per-pair ratios ``ref / candidate`` is far steadier than either absolute median. Sampling
    continues until both medians and the ratio are stable (or time runs out). Returns the
    candidate's stats with ``reference_median_ms`` and ``speedup`` filled in. ``deadline`` as in
    :func:`time_callable` (at least one pair is timed).
    """
    for _ in range(warmup):
        if _past(deadline):
            break
        fn()
        ref()
    a: list[float] = []
    b: list[float] = []
    t_start = time.perf_counter()

    def run(k: int) -> None:
        for i in range(k):
            if a and _past(deadline):
                return
            if i % 2:  # alternate the order so neither model always runs right after the other
                b.append(ref())
                a.append(fn())
            else:
                a.append(fn())
                b.append(ref())

    def ratios() -> np.ndarray:
        return np.asarray(b) / np.asarray(a)

    run(repeats)
    while (
        not (_stable(a, target_rel_ci) and _stable(b, target_rel_ci) and _stable(list(ratios()), target_rel_ci))
        and time.perf_counter() - t_start < max_time_s
        and len(a) < 100 * repeats
        and not _past(deadline)
    ):
        run(max(10, repeats // 2))
    st = summarize(np.asarray(a), batch_size)
    st.reference_median_ms = float(np.median(b) * 1000.0)
    st.speedup = float(np.median(ratios()))
    st.clock = getattr(fn, "clock", "perf_counter")
    return st
