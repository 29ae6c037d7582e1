"""Latency staircases: how the whole model's latency moves as one group's kept width changes.

On dense CPU kernels latency does not follow FLOPs: it moves in steps (vector widths, blocking of
the GEMM/convolution kernels) and is not even monotonic (an odd width can be slower than the
dense model). So a fixed ``round_to: 8`` for every backend and layer is a guess. A *staircase*
is measured on the target itself: for each prunable group, the model with only that group cut
to a few kept widths (the rest dense) is timed interleaved with the dense model, and the median
ratio (candidate / dense, 1.0 at the full width) is recorded per width. Interleaving makes the
ratio robust to the load drift of a shared machine; absolute times are not kept.

:func:`allowed_widths` turns a staircase into the group's *learned channel granularity*: only the
lower edge of each step (the most channels for the time) is allowed. The search still samples
ratios; ``prune/plan.py::kept_channels`` snaps each kept width to the nearest allowed width.

Staircases are stored per *device fingerprint* (CPU model, runtime and version, threads,
precision, batch, input shape, model architecture hash) in ``<run>/staircases/<key>.json``, so a
resumed run or a second worker on the same kind of machine reuses them, and a file measured on a
remote target can be given to a device profile (``staircases: path``). A different fingerprint
is never reused: it describes another device or another model.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from autoprune.config import DeviceProfile
from autoprune.errors import ConfigError
from autoprune.measure import backends
from autoprune.measure.onnx import export_onnx
from autoprune.measure.stats import time_pair
from autoprune.prune.plan import narrowing
from autoprune.prune.structure import PrunableGroup
from autoprune.files import atomic_write_text, file_lock

#: Fingerprint fields that describe the machine and runtime (not checkable from another machine).
DEVICE_FIELDS = ("cpu", "runtime_version")


# --------------------------------------------------------------------------- fingerprint
def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _runtime(profile: DeviceProfile) -> tuple[str, str]:
    """(runtime, version) that times on this profile: a new runtime may step differently."""
    name = profile.remote_backend if profile.backend == "remote" else profile.backend
    if profile.backend == "remote":
        return name, "remote"  # the target's version is not knowable from here
    try:
        return name, str(__import__(name).__version__)
    except Exception:  # noqa: BLE001  (a missing runtime fails later, where it is loaded)
        return name, "unknown"


def architecture_hash(model: nn.Module) -> str:
    """Hash of a model's architecture (module types, their settings, parameter shapes), not its
    weights: a staircase depends on shapes only, so trained and untrained weights share one."""
    parts = [(n, type(m).__name__, m.extra_repr()) for n, m in model.named_modules()]
    parts += [(n, list(p.shape)) for n, p in model.named_parameters()]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def fingerprint(profile: DeviceProfile, model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """Everything a staircase depends on. ``example`` is at the profile's batch size."""
    runtime, version = _runtime(profile)
    pinning = {"cpu_pinning": profile.cpu_pinning} if runtime == "openvino" else {}
    return {
        **pinning,
        "cpu": f"remote:{profile.url}" if profile.backend == "remote" else _cpu_model(),
        "backend": profile.backend,
        "device": profile.device,
        "runtime": runtime,
        "runtime_version": version,
        "providers": profile.providers,
        "threads": profile.threads,
        "precision": profile.precision,
        "mode": profile.mode,
        "batch": int(example.shape[0]),
        "input_shape": [int(s) for s in example.shape[1:]],
        "model": architecture_hash(model),
    }


def fingerprint_key(fp: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(fp), sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- widths
def probe_widths(n: int, high: float, ch_groups: int = 1, max_widths: int = 8) -> list[int]:
    """The kept widths to time for a group of ``n`` channels searched up to ``high`` (descending).

    Dense near the full width and on multiples of 8/16/32, where steps are, in priority order:
    the full width, one unit below it (an odd width, often *slower* than dense), the narrowest
    width the search can ask for, the largest multiples of 32, 16 and 8 below ``n``, then
    multiples of 8 at ``n`` − 8·2^k (farthest first, so the range is covered before the top is
    refined); remaining slots split the widest gaps. Widths are multiples of ``ch_groups``
    (grouped convolutions drop the same channels in every group).
    """
    g = max(1, ch_groups)
    lo = max(g, math.ceil(n * (1.0 - high)))
    unit = math.lcm(8 if n >= 32 else max(1, n // 4), g)

    def down(w: int, u: int) -> int:
        return (w // u) * u

    lo_unit = math.ceil(lo / unit) * unit
    order: list[int] = [n, n - g, lo_unit if lo_unit < n else lo] + [down(n - 1, math.lcm(u, g)) for u in (32, 16, 8)]
    steps = []
    k = unit
    while n - k >= lo:
        steps.append(down(n - k, unit))
        k *= 2
    order += steps[::-1]  # widest reach first: coverage of the range before density at the top
    out: list[int] = []
    for w in order:
        if lo <= w <= n and w % g == 0 and w not in out:
            out.append(w)
    while len(out) < max_widths:  # split the widest gap between probed multiples of the unit
        s = sorted(out)
        gaps = [(b - a, a, b) for a, b in itertools.pairwise(s)]
        new = [down((a + b) // 2, unit) for d, a, b in sorted(gaps, reverse=True) if d > unit]
        new = [w for w in new if w not in out and lo <= w <= n and w % g == 0]
        if not new:
            break
        out.append(new[0])
    return sorted(out[:max_widths], reverse=True)


def allowed_widths(points: Mapping[int, float], full: int, tolerance: float = 0.03) -> list[int]:
    """The lower edge of each step of a staircase: the kept widths worth allowing (ascending).

    ``points`` maps kept width → latency relative to dense. Walking from the full width down, a
    width is allowed only if it is faster than the last allowed (wider) width by more than
    ``tolerance`` (relative): widths within the tolerance are on the same step, and the widest of
    them keeps the most channels for the time; widths slower than a wider one (non-monotonic
    points, e.g. odd widths) are dropped, since fewer channels for no time is never worth it.
    The full width is always allowed (ratio 0 must stay the dense group).
    """
    pts = {int(w): float(t) for w, t in points.items() if 0 < int(w) <= full}
    pts.setdefault(full, 1.0)
    keep = [full]
    level = pts[full]
    for w in sorted(pts, reverse=True):
        if w == full:
            continue
        if pts[w] * (1.0 + tolerance) < level:
            keep.append(w)
            level = pts[w]
    return sorted(keep)


# --------------------------------------------------------------------------- storage
@dataclass
class StaircaseStore:
    """Staircases of one fingerprint, as JSON: ``{"fingerprint": {...}, "groups": {name:
    {"channels": n, "points": {width: ratio}}}}``. Saved read-merge-write under a lock, so two
    workers measuring different groups (or widths) both keep theirs."""

    path: Path
    fp: dict[str, Any]
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, fp: dict[str, Any]) -> "StaircaseStore":
        st = cls(Path(path), dict(fp))
        d = st._read()
        if d is not None and d.get("fingerprint") == st.fp:
            st.groups = d.get("groups", {})
        return st

    def _read(self) -> Optional[dict[str, Any]]:
        return json.loads(self.path.read_text()) if self.path.is_file() else None

    def points(self, group: str, channels: int) -> dict[int, float]:
        """The stored points of ``group`` (none when its width differs: another model)."""
        d = self.groups.get(group)
        if not d or int(d.get("channels", -1)) != channels:
            return {}
        return {int(w): float(t) for w, t in d.get("points", {}).items()}

    def add(self, group: str, channels: int, points: Mapping[int, float]) -> None:
        d = self.groups.setdefault(group, {"channels": channels, "points": {}})
        d["points"].update({str(int(w)): float(t) for w, t in points.items()})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            d = self._read()
            merged: dict[str, dict[str, Any]] = {}
            if d is not None and d.get("fingerprint") == self.fp:
                merged = d.get("groups", {})
            for name, g in self.groups.items():
                m = merged.setdefault(name, {"channels": g["channels"], "points": {}})
                m["points"] = {**g["points"], **m["points"]}  # first writer wins: workers agree
            atomic_write_text(self.path, json.dumps({"fingerprint": self.fp, "groups": merged}, indent=1, sort_keys=True))
        self.groups = merged


def _check_given(path: Path, fp: Mapping[str, Any], profile: DeviceProfile) -> dict[str, Any]:
    """The staircase file a device profile names (``staircases: path``), refused when it was
    measured for another model or settings. On a local backend the device fields (CPU, runtime
    version) must match too: they describe this machine. On ``remote`` they cannot be checked
    here, so the file (measured on the target) is trusted for them."""
    where = f"device profile {profile.name}: key 'staircases'"
    if not path.is_file():
        raise ConfigError(f"{where}: {path} not found; give a staircases/<fingerprint>.json of a run folder, or remove the key")
    try:
        d = json.loads(path.read_text())
        theirs = dict(d["fingerprint"])
        d["groups"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{where}: {path} is not a staircase file (needs 'fingerprint' and 'groups')") from None
    skip = DEVICE_FIELDS + ("cpu", "backend") if profile.backend == "remote" else ()
    diff = [k for k in sorted(set(fp) | set(theirs)) if k not in skip and fp.get(k) != theirs.get(k)]
    if diff:
        shown = ", ".join(f"{k}={theirs.get(k)!r} (here {fp.get(k)!r})" for k in diff)
        raise ConfigError(f"{where}: {path} was measured for another device or model: {shown}; "
                          "measure staircases for this one (remove the key) or give the matching file")
    return theirs


# --------------------------------------------------------------------------- measuring
def export_widths(base: nn.Module, example: torch.Tensor, num_classes: Optional[int],
                  todo: Mapping[str, tuple[int, Sequence[int]]], folder: Path, exporter: str = "torchscript", *,
                  dense: Optional[Path] = None,
                  models: Optional[dict[tuple[str, int], nn.Module]] = None) -> dict[tuple[str, int], Path]:
    """ONNX files of ``base`` with one group cut to each width (the rest dense), and the dense
    model itself under ``("", 0)`` (``dense``: already exported there). ``todo`` is ``{group:
    (channels, widths)}``. Which channels go does not matter for latency, so no criterion is
    scored (``plan.narrowing``: one dependency graph per group, the widths cut one after the
    other). ``models``, when given, receives each cut PyTorch module (the torch backend times
    modules, not files)."""
    ex1 = example[:1]
    out = {("", 0): dense if dense is not None else export_onnx(copy.deepcopy(base), example, folder / "dense.onnx", exporter)}
    if models is not None:
        models[("", 0)] = base
    for name, (n, widths) in todo.items():
        gi = hashlib.sha256(name.encode()).hexdigest()[:10]
        m = copy.deepcopy(base)
        for w in narrowing(m, ex1, name, [w for w in widths if w < n], num_classes):
            out[(name, w)] = export_onnx(m, example, folder / f"g{gi}_{w}.onnx", exporter)
            if models is not None:
                models[(name, w)] = copy.deepcopy(m)
    return out


def _timing_profile(profile: DeviceProfile) -> DeviceProfile:
    """Shorter timing than a trial's: a staircase needs many points, each the median of paired
    ratios to dense (steady without waiting for a narrow CI on a busy machine: fixed count)."""
    return profile.model_copy(update={"warmup": min(profile.warmup, 5), "repeats": max(10, min(profile.repeats, 30)),
                                      "target_rel_ci": None, "max_time_s": min(profile.max_time_s, 1.0),
                                      "measure_reference": False})


def time_ratios(files: Mapping[tuple[str, int], Path], profile: DeviceProfile, x: np.ndarray,
                models: Optional[Mapping[tuple[str, int], nn.Module]] = None) -> dict[tuple[str, int], float]:
    """Latency of each file relative to the dense one (``files[("", 0)]``), each timed interleaved
    with the dense model in one session (:func:`~autoprune.measure.stats.time_pair`): the median of
    per-pair ratios. The dense model is loaded once; remote backends time each pair remotely."""
    prof = _timing_profile(profile)
    models = models or {}
    ref_art = backends.ensure_precision(backends.ModelArtifact(files[("", 0)], models.get(("", 0))), prof)
    keys = [k for k in files if k != ("", 0)]
    out: dict[tuple[str, int], float] = {}
    backend = backends.get(prof.backend)
    if getattr(backend, "measure", None) is not None:
        for k in keys:
            st = backends.measure(backends.ModelArtifact(files[k], models.get(k)), prof, x, reference=ref_art)
            out[k] = float(st.ratio) if st.ratio else st.median_ms / float(st.reference_median_ms or st.median_ms)
        return out
    kw: dict[str, Any] = {"warmup": prof.warmup, "repeats": prof.repeats, "target_rel_ci": prof.target_rel_ci,
                          "max_time_s": prof.max_time_s, "batch_size": int(x.shape[0])}
    with backend.session(prof):
        ref = backends.one_inference_timer(backend.load(ref_art, prof), x, prof.clock)
        for k in keys:
            art = backends.ensure_precision(backends.ModelArtifact(files[k], models.get(k)), prof)
            one = backends.one_inference_timer(backend.load(art, prof), x, prof.clock)
            out[k] = float(time_pair(one, ref, **kw).ratio or 1.0)
    return out


def measure_staircases(base: nn.Module, groups: Sequence[PrunableGroup], example: torch.Tensor, profile: DeviceProfile,
                       num_classes: Optional[int], widths: Mapping[str, Sequence[int]],
                       exporter: str = "torchscript") -> dict[str, dict[int, float]]:
    """``{group: {width: latency / dense}}`` for the requested widths, timed on ``profile``."""
    chans = {g.name: g.channels for g in groups}
    todo = {name: (chans[name], list(ws)) for name, ws in widths.items() if ws}
    out: dict[str, dict[int, float]] = {name: {} for name in todo}
    with tempfile.TemporaryDirectory(prefix="autoprune-staircase-") as d:
        dense = export_onnx(copy.deepcopy(base), example, Path(d) / "dense.onnx", exporter)
        for name, job in todo.items():  # one group at a time: its files (and modules) only
            mods: Optional[dict[tuple[str, int], nn.Module]] = {} if profile.backend == "torch" else None
            files = export_widths(base, example, num_classes, {name: job}, Path(d), exporter, dense=dense, models=mods)
            for (_, w), r in time_ratios(files, profile, example.numpy(), mods).items():
                out[name][w] = r
            for k, f in files.items():
                if k != ("", 0):
                    f.unlink(missing_ok=True)
    return out


def load_or_measure(path: Path, base: nn.Module, groups: Sequence[PrunableGroup], example: torch.Tensor,
                    profile: DeviceProfile, num_classes: Optional[int], *, max_widths: int = 8,
                    exporter: str = "torchscript", say: Callable[[str], None] = lambda s: None) -> dict[str, dict[int, float]]:
    """Each group's staircase over its search range: from ``path`` (``<run>/staircases/<key>.json``)
    where its fingerprint matches, from the profile's ``staircases`` file when one is given (never
    measured then), else measured now (only the missing widths) and merged into ``path``."""
    fp = fingerprint(profile, base, example)
    if profile.staircases:
        given = Path(profile.staircases)
        theirs = _check_given(given, fp, profile)
        store = StaircaseStore.open(given, theirs)
        say(f"latency staircases from {given} (measured on {theirs.get('cpu')}, {theirs.get('runtime')} {theirs.get('runtime_version')})")
        return {g.name: store.points(g.name, g.channels) for g in groups}
    store = StaircaseStore.open(path, fp)
    want = {g.name: probe_widths(g.channels, g.high, g.ch_groups, max_widths) for g in groups}
    missing = {name: [w for w in ws if w < chans and w not in store.points(name, chans)]
               for (name, ws), chans in zip(want.items(), (g.channels for g in groups))}
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        n = sum(len(v) for v in missing.values())
        say(f"measuring latency staircases: {n} widths of {len(missing)} groups on {profile.name} ({fp['cpu']})")
        for name, pts in measure_staircases(base, groups, example, profile, num_classes, missing, exporter).items():
            store.add(name, next(g.channels for g in groups if g.name == name), pts)
        store.save()
    return {g.name: store.points(g.name, g.channels) for g in groups}


def learned_widths(staircases: Mapping[str, Mapping[int, float]], groups: Sequence[PrunableGroup],
                   tolerance: float = 0.03) -> dict[str, list[int]]:
    """Allowed widths per group (:func:`allowed_widths`); groups without points are left out
    (they keep ``round_to``)."""
    return {g.name: allowed_widths(staircases[g.name], g.channels, tolerance)
            for g in groups if staircases.get(g.name)}
