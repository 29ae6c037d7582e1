"""Latency statistics: a timing loop with warm-up, adaptive repeats and robust summaries.

Shared CPUs are noisy, so we report the median (not the mean), p90 and coefficient of
variation, and keep repeating until the median's distribution-free 95% confidence interval is
narrow enough (or a time cap is hit). A candidate is timed in rounds interleaved with the dense
model (:func:`time_pair`): its latency relative to dense, with a confidence interval, is what
load on a busy machine cannot move; ``corrected_ms`` turns it back into milliseconds with the
dense model's quiet estimate.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

import numpy as np

#: Quantile of the samples taken as a model's "quiet" time. On a CPU shared with other jobs the
#: slow tail is their interference and the fastest samples are timer and cache luck; the 20th
#: percentile is the model's own cost, steady from run to run.
QUIET_QUANTILE = 20

#: The target width of a ratio's interval when the caller sets none (the noisy flag's threshold).
DEFAULT_RATIO_CI = 0.02

#: Wall-clock length aimed at for one interleaved round: short enough that the load is the same
#: for both halves, long enough that fast models get a block of several inferences per half.
ROUND_S = 0.02

#: Most inferences per model in one round's block.
MAX_BLOCK = 8

#: Fewest rounds before the ratio's interval is judged (an order-statistic 95% interval needs 6).
MIN_ROUNDS = 8


def latency_ms(stats: dict) -> float:
    """The headline latency of a stats dict (:meth:`LatencyStats.to_dict`, possibly stored before
    ``corrected_ms`` existed): ``corrected_ms`` when set, else ``median_ms``."""
    c = stats.get("corrected_ms")
    return float(c) if c is not None else float(stats["median_ms"])


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
    #: Dense time / this model's time, from the interleaved rounds (1 / ``ratio``; >1 = faster).
    speedup: Optional[float] = None
    #: Fast quantile (:data:`QUIET_QUANTILE`) of this model's samples: its own cost with little
    #: of other jobs' interference in it. Of the dense model, the "quiet estimate" that corrects
    #: candidates' ratios into milliseconds.
    quiet_ms: Optional[float] = None
    #: The same fast quantile of the dense reference's samples timed in this session.
    reference_quiet_ms: Optional[float] = None
    #: This model's time / the dense model's, median over interleaved rounds (<1 = faster).
    ratio: Optional[float] = None
    #: 95% confidence interval of ``ratio`` (distribution-free, over rounds; see :func:`time_pair`).
    ratio_ci_low: Optional[float] = None
    ratio_ci_high: Optional[float] = None
    #: Larger relative distance of the interval's ends from ``ratio`` (0.02 = within ±2%).
    ratio_rel_ci: Optional[float] = None
    #: Interleaved rounds timed (each: a block of the candidate and a block of the dense model).
    rounds: Optional[int] = None
    #: True when the time cap ended the rounds before the interval reached the target width.
    noisy: Optional[bool] = None
    #: ``ratio`` × the dense model's quiet estimate: milliseconds in which the load the
    #: measurement ran under cancels (the dense model's own stats: its ``quiet_ms``). The raw
    #: ``median_ms`` etc. are kept beside it.
    corrected_ms: Optional[float] = None
    #: "perf_counter" (host wall clock), "cuda_events" (device-side time of the forward pass) or
    #: "openvino_infer" (OpenVINO's own time of the request's synchronous infer, benchmark_app's clock).
    clock: str = "perf_counter"

    @property
    def latency_ms(self) -> float:
        """The headline latency: ``corrected_ms`` when known, else the raw median."""
        return self.corrected_ms if self.corrected_ms is not None else self.median_ms

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
        quiet_ms=float(np.percentile(ms, QUIET_QUANTILE)),
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


def _median_ci(values: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Distribution-free 95% interval of the median of ``values``: the order statistics at ranks
    n/2 ∓ z·√n/2 (the sign-test interval, normal approximation of the binomial). Widest (the
    range) for few values."""
    s = np.sort(np.asarray(values, dtype=np.float64))
    n = len(s)
    k = z * math.sqrt(n) / 2.0
    return float(s[max(0, int(math.floor(n / 2 - k)))]), float(s[min(n - 1, int(math.ceil(n / 2 + k)))])


def _ratio_interval(ratios: np.ndarray) -> tuple[float, float, float, float]:
    """(median, low, high, relative half-width) of per-round ratios; ``inf`` width under
    :data:`MIN_ROUNDS` rounds."""
    r = np.asarray(ratios, dtype=np.float64)
    med = float(np.median(r))
    lo, hi = _median_ci(r)
    rel = max(hi / med - 1.0, 1.0 - lo / med) if len(r) >= MIN_ROUNDS and med > 0 else math.inf
    return med, lo, hi, rel


def time_pair(
    fn: Callable[[], float],
    ref: Callable[[], float],
    warmup: int = 10,
    repeats: int = 50,
    target_rel_ci: Optional[float] = DEFAULT_RATIO_CI,
    max_time_s: float = 5.0,
    batch_size: int = 1,
    deadline: Optional[float] = None,
    block: Optional[int] = None,
) -> LatencyStats:
    """Time a candidate (``fn``) and the dense reference (``ref``) interleaved, in rounds, and
    report the candidate's time relative to dense with a 95% confidence interval.

    Both callables run one inference and return its duration in seconds. A round times a block
    of ``block`` inferences of each model back to back (the order alternates between rounds:
    A B, B A, ...) and gives one ratio, median(candidate block) / median(dense block). Load on a
    shared CPU drifts on a scale of seconds and a round lasts ~:data:`ROUND_S`, so both halves
    of a round see the same load and it cancels in the ratio; the block median drops the odd
    preempted inference. ``block`` defaults to what fits a round at the warm-up's speed.

    The statistic is the median of the per-round ratios with its distribution-free
    (order-statistic) 95% interval, not a mean with a t-interval: the rounds are independent
    and paired, but interference is one-sided and bursty — a burst that lands on one half of a
    round makes that ratio an outlier in one direction — so the round ratios are heavy-tailed
    and skewed, where a t-interval is both biased and too wide, and a bootstrap is random. The
    median ignores a minority of hit rounds and its interval needs no distribution.

    Stop rule: after ``repeats`` inferences per model (and at least :data:`MIN_ROUNDS` rounds),
    rounds continue until the interval is within ±``target_rel_ci`` of the ratio, or
    ``max_time_s`` (warm-up excluded) or ``deadline`` (a ``time.perf_counter()`` value: also cuts
    the warm-up; at least one pair is timed) is reached; a measurement stopped by the clock
    before its interval was narrow enough is flagged ``noisy``. Returns the candidate's raw
    stats (median, p90, ... of all its samples) with ``ratio``, its interval, ``speedup`` =
    1/ratio, ``reference_median_ms`` and both models' quiet estimates filled in.
    """
    w_a: list[float] = []
    w_b: list[float] = []
    for _ in range(warmup):
        if _past(deadline):
            break
        w_a.append(fn())
        w_b.append(ref())
    if block is None:
        pair = (float(np.median(w_a)) + float(np.median(w_b))) if w_a else 0.0
        block = int(min(MAX_BLOCK, max(1, ROUND_S // pair))) if pair > 0 else 1
    a: list[float] = []
    b: list[float] = []
    ratios: list[float] = []
    t_start = time.perf_counter()

    def one_round(i: int) -> bool:
        """Time round ``i``; False when the deadline cut it short (no ratio from it)."""
        ra: list[float] = []
        rb: list[float] = []
        for side in ((fn, ra), (ref, rb)) if i % 2 == 0 else ((ref, rb), (fn, ra)):
            for _ in range(block):
                if (a or ra) and (b or rb) and _past(deadline):
                    a.extend(ra)
                    b.extend(rb)
                    return False
                side[1].append(side[0]())
        a.extend(ra)
        b.extend(rb)
        ratios.append(float(np.median(ra) / np.median(rb)))
        return True

    def done() -> bool:
        if len(a) < repeats or len(ratios) < MIN_ROUNDS:
            return False
        return target_rel_ci is None or _ratio_interval(np.asarray(ratios))[3] <= target_rel_ci

    i = 0
    while not done():
        if _past(deadline) and a:
            break
        if len(a) >= repeats and len(ratios) >= MIN_ROUNDS and time.perf_counter() - t_start >= max_time_s:
            break
        if len(a) >= 100 * repeats:
            break
        if not one_round(i):
            break
        i += 1
    st = summarize(np.asarray(a), batch_size)
    bms = np.asarray(b) * 1000.0
    st.reference_median_ms = float(np.median(bms))
    st.reference_quiet_ms = float(np.percentile(bms, QUIET_QUANTILE))
    if not ratios:  # cut short inside the first round: the ratio of what was timed
        ratios = [float(np.median(a) / np.median(b))]
    med, lo, hi, rel = _ratio_interval(np.asarray(ratios))
    st.ratio, st.ratio_ci_low, st.ratio_ci_high = med, lo, hi
    st.ratio_rel_ci = rel if math.isfinite(rel) else None  # None: too few rounds for an interval (JSON has no inf)
    st.speedup = 1.0 / med if med > 0 else None
    st.rounds = len(ratios)
    st.noisy = bool(rel > (target_rel_ci if target_rel_ci is not None else DEFAULT_RATIO_CI))
    st.clock = getattr(fn, "clock", "perf_counter")
    return st
