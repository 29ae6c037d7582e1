"""Pruning methods: every criterion ranks a constructed channel/weight as it must, every
granularity produces exactly the sparsity it promises, and every method runs end to end on the
demo model, ResNet-18 and MobileNetV2 (random weights) and exports to ONNX and OpenVINO."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from autoprune.prune import methods
from autoprune.prune.methods import granularity as gr
from autoprune.prune.plan import PruningPlan, apply_plan, apply_schedule, kept_channels
from autoprune.prune.structure import (
    build_graph,
    find_groups,
    iter_groups,
    output_layers,
)
from autoprune.train.checkpoint import load_model
from autoprune.train.models import DemoResNet

ALL_METHODS = methods.available()
GRANULARITIES = ["structured", "unstructured", "nm:2:4", "hybrid"]


# --------------------------------------------------------------------------- constructed nets
class TwoLayer(nn.Module):
    """x → conv a (1→8, 1×1) → [BN] → ReLU → mean → linear b (8→4). Channel k of ``a`` is the
    only prunable group; we control each channel's weight, gradient and activation."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 1, bias=True)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.bn(self.a(x))).mean((2, 3)))


def _group(net: nn.Module, x: torch.Tensor):
    DG = build_graph(net, x)
    (name, group), = list(iter_groups(DG, output_layers(net, 4)))
    return name, group


def _calib(n: int = 2, bs: int = 16, seed: int = 0, c: int = 1, hw: int = 4, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(bs, c, hw, hw, generator=g) + 0.1, torch.randint(0, classes, (bs,), generator=g)) for _ in range(n)]


def _scores(net: nn.Module, method: str, calib=None) -> torch.Tensor:
    x = torch.rand(1, 1, 4, 4)
    crit = methods.get(method)
    stats = methods.collect(net, calib, crit.needs_grad, crit.needs_activations)
    _, group = _group(net, x)
    return crit(group, stats)


def _net_with_dead_channel() -> TwoLayer:
    """Channel 0 has the LARGEST filter but the next layer ignores it (b's column 0 is zero):
    magnitude keeps it, gradient criteria must find it useless. Channel 1 is killed by ReLU
    (huge negative bias, inputs are positive): activation criteria must find it useless."""
    torch.manual_seed(0)
    net = TwoLayer()
    with torch.no_grad():
        net.a.weight.copy_(torch.linspace(1.0, 2.0, 8).view(8, 1, 1, 1))
        net.a.weight[0] = 10.0
        net.a.bias.fill_(0.1)
        net.a.bias[1] = -100.0
        net.b.weight.normal_(0, 1)
        net.b.weight[:, 0] = 0.0
    return net


@pytest.mark.parametrize("method", ["l1", "l2"])
def test_magnitude_ranks_largest_filter_highest(method: str) -> None:
    net = TwoLayer()
    with torch.no_grad():
        net.a.weight.copy_(torch.tensor([5, 1, 7, 3, 8, 2, 6, 4.0]).view(8, 1, 1, 1))
        net.a.bias.zero_()
        net.b.weight.fill_(1.0)
    s = _scores(net, method)
    assert torch.argsort(s).tolist() == [1, 5, 3, 7, 0, 6, 2, 4]
    apply_plan(net, torch.rand(1, 1, 4, 4), PruningPlan({"a": 0.5}, {"a": method}, round_to=1), 4)
    assert sorted(net.a.weight.flatten().tolist()) == [5, 6, 7, 8]


def test_random_is_random_but_exact_count() -> None:
    kept = set()
    for seed in range(5):
        torch.manual_seed(seed)
        net = TwoLayer()
        with torch.no_grad():
            net.a.weight.copy_(torch.arange(8.0).view(8, 1, 1, 1) + 1)
        apply_plan(net, torch.rand(1, 1, 4, 4), PruningPlan({"a": 0.5}, {"a": "random"}, round_to=1), 4)
        assert net.a.out_channels == 4
        kept.add(tuple(sorted(net.a.weight.flatten().tolist())))
    assert len(kept) > 1  # not always the same channels


@pytest.mark.parametrize("method", ["taylor", "grad_norm", "hessian"])
def test_gradient_criteria_find_channel_without_gradient(method: str) -> None:
    net = _net_with_dead_channel()
    calib = _calib()
    s = _scores(net, method, calib)
    # Channel 1 is a dead ReLU: no gradient reaches a[1] nor b[:, 1] -> score exactly 0.
    assert float(s[1]) == 0.0 and bool((s[torch.arange(8) > 1] > 0).all())
    # Channel 0 is the largest filter (magnitude ranks it first) but b ignores it: w·g = 0 for
    # Taylor/OBD; the pure gradient |g| of b[:, 0] is not zero (the weight could matter).
    assert _scores(net, "l1")[0] == _scores(net, "l1").max()
    if method == "grad_norm":
        assert float(s[0]) > 0
    else:
        assert float(s[0]) == pytest.approx(0.0, abs=1e-12)
    if method == "grad_norm":  # I_i = |∇J(W_i)| / Σ_j |∇J(W_j)|: a distribution over channels
        assert float(s.sum()) == pytest.approx(1.0, rel=1e-5)


def test_taylor_and_hessian_per_weight_formulas() -> None:
    """|w·g| with g summed over batches; ½·w²·mean(g²) with g per batch (empirical Fisher)."""
    net = _net_with_dead_channel()
    calib = _calib(n=3)
    gs = []
    for x, y in calib:
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        gs.append(net.a.weight.grad.clone())
    net.zero_grad(set_to_none=True)
    stats = methods.collect(net, calib, grads=True, activations=False)
    w = net.a.weight.detach()
    torch.testing.assert_close(methods.get("taylor").weights(net.a, stats), (w * sum(gs)).abs())
    fisher = sum(g * g for g in gs) / 3
    torch.testing.assert_close(methods.get("hessian").weights(net.a, stats), 0.5 * fisher * w**2)


@pytest.mark.parametrize("method", ["act_mean", "apoz"])
def test_activation_criteria_find_dead_relu_channel(method: str) -> None:
    net = _net_with_dead_channel()
    s = _scores(net, method, _calib())
    assert int(torch.argmin(s)) == 1
    if method == "apoz":  # channel 1 is zero on 100% of inputs; the others on none
        assert float(s[1]) == 0.0 and torch.all(s[torch.arange(8) != 1] == 1.0)
    net2 = copy.deepcopy(net)
    apply_plan(net2, torch.rand(1, 1, 4, 4), PruningPlan({"a": 0.125}, {"a": method}, round_to=1), 4, _calib())
    assert net2.a.out_channels == 7 and float(net2.a.bias.detach().min()) > -1  # the dead channel went


def test_mean_by_root_averages_scores_per_root_channel() -> None:
    """The group reduction of the activation criteria (torch-pruning's ``mean``, which it only
    has as the private ``_reduce``): scores summed per root channel, divided by the number of
    layers that contributed; layers with unknown root indices are skipped."""
    from autoprune.prune.methods.criteria import mean_by_root

    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([10.0, 20.0])  # scores root channels 3 and 0 only
    got = mean_by_root([a, b, torch.tensor([7.0])], [[0, 1, 2, 3], [3, 0], [None]])
    assert torch.equal(got, torch.tensor([(1 + 20) / 2, 2 / 2, 3 / 2, (4 + 10) / 2]))
    assert got.dtype == torch.float32
    assert mean_by_root([torch.tensor([1.0])], [[None]]) is None  # nothing usable: caller falls back


def test_apoz_orders_by_zero_rate() -> None:
    """Channels active on a larger share of inputs rank higher."""
    net = TwoLayer()
    with torch.no_grad():
        net.a.weight.fill_(1.0)
        net.a.bias.copy_(-torch.linspace(0.0, 0.9, 8))  # inputs ~U(0.1, 1.1): more zeros down the list
    s = _scores(net, "apoz", _calib(n=4, bs=64))
    assert torch.all(s[:-1] >= s[1:]) and s[0] > s[-1]


def test_bn_scale_and_network_slimming() -> None:
    net = TwoLayer(bn=True)
    with torch.no_grad():
        net.bn.weight.copy_(torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 1.0, 0.05, 4.0]))
    s = _scores(net, "bn_scale")
    assert torch.argsort(s).tolist()[:4] == [6, 2, 4, 0]
    before = float(net.bn.weight.detach().abs().sum())
    assert methods.bn_l1_finetune(net, _calib(), lam=0.5, steps=10, lr=0.05) == 10
    assert float(net.bn.weight.detach().abs().sum()) < before  # the L1 term shrinks γ


def test_bn_scale_without_bn_falls_back_to_magnitude() -> None:
    net = TwoLayer(bn=False)
    torch.testing.assert_close(_scores(net, "bn_scale"), _scores(net, "l1"))


# --------------------------------------------------------------------------- granularities
def test_granularity_parse_and_errors() -> None:
    assert gr.parse("nm:2:4") == gr.Granularity("nm", 2, 4)
    assert str(gr.parse("hybrid")) == "hybrid"
    for bad in ["nm:4:2", "nm:0:4", "blocks", "nm:2"]:
        with pytest.raises(ValueError, match="allowed"):
            gr.parse(bad)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_exactly_n_of_every_m(n: int, m: int) -> None:
    torch.manual_seed(0)
    for shape in [(16, 32, 3, 3), (10, 64)]:
        w = torch.randn(shape)
        mask = gr.nm_mask(w, w.abs(), n, m)
        blocks = gr._reduction_layout(mask).view(shape[0], -1, m)
        assert torch.all(blocks.sum(-1) == n)
        kept = gr._reduction_layout(w.abs() * mask).view(shape[0], -1, m)
        dropped = gr._reduction_layout(w.abs() * ~mask).view(shape[0], -1, m)
        assert torch.all(kept.max(-1).values >= dropped.max(-1).values)  # kept the largest ones
        assert torch.all(kept.topk(n, -1).values.min(-1).values >= dropped.max(-1).values)


def test_nm_on_demo_model_every_block_and_ragged_tail() -> None:
    torch.manual_seed(0)
    m = DemoResNet().eval()
    x = torch.randn(1, 1, 16, 16)
    names = [g.name for g in find_groups(m, x, 10)]
    apply_plan(m, x, PruningPlan({}, granularity={g: "nm:2:4" for g in names}), 10)
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Conv2d):
            blocks = gr._reduction_layout(mod.weight != 0)
            full = blocks[:, : blocks.shape[1] // 4 * 4].reshape(blocks.shape[0], -1, 4)
            assert torch.all(full.sum(-1) == 2), name
            assert torch.all(blocks[:, blocks.shape[1] // 4 * 4:].sum(-1) <= 2), name
    assert torch.count_nonzero(m.fc.weight) == m.fc.weight.numel()  # the classifier stays dense


def test_unstructured_exact_ratio_and_hold_zeros_through_training() -> None:
    torch.manual_seed(0)
    m = DemoResNet().eval()
    x = torch.randn(1, 1, 16, 16)
    names = [g.name for g in find_groups(m, x, 10)]
    widths = apply_plan(m, x, PruningPlan({g: 0.6 for g in names}, granularity={g: "unstructured" for g in names}), 10)
    assert all(a == b for a, b in widths.values())  # no channel removed
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    for mod in convs:
        assert int((mod.weight == 0).sum()) == round(0.6 * mod.weight.numel())
    zeros = [mod.weight == 0 for mod in convs]
    opt = None
    with methods.hold_zeros(m) as held:
        assert held == len(convs)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m.train()
        for _ in range(3):
            opt.zero_grad()
            m(torch.randn(4, 1, 16, 16)).sum().backward()
            opt.step()
    for mod, z in zip(convs, zeros):
        assert torch.all(mod.weight[z] == 0)
        assert isinstance(mod.weight, nn.Parameter) and not hasattr(mod, "weight_orig")  # permanent, no hooks


def test_unstructured_keeps_the_largest_weights() -> None:
    w = torch.randn(64, 32)
    mask = gr.unstructured_mask(w, w.abs(), 0.75)
    assert int(mask.sum()) == 512
    assert float(w.abs()[mask].min()) >= float(w.abs()[~mask].max())


def _producer_sparsity(m: nn.Module, x: torch.Tensor, group: str) -> list[float]:
    DG = build_graph(m, x)
    live = dict(iter_groups(DG, output_layers(m, 10)))
    return [float((layer.weight == 0).float().mean()) for layer, _ in methods.producers(live[group])]


def test_hybrid_final_sparsity() -> None:
    torch.manual_seed(0)
    m = DemoResNet().eval()
    x = torch.randn(1, 1, 16, 16)
    groups = {g.name: g.channels for g in find_groups(m, x, 10)}
    plan = PruningPlan({g: 0.5 for g in groups}, granularity={g: "hybrid" for g in groups}, weight_ratios={g: 0.3 for g in groups})
    widths = apply_plan(m, x, plan, 10)
    for g, n in groups.items():
        assert widths[g] == (n, kept_channels(n, 0.5))
        for s in _producer_sparsity(m, x, g):
            assert s == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("mode", ["iterative", "layerwise"])
def test_schedules_reach_the_one_shot_result(mode: str) -> None:
    torch.manual_seed(0)
    base = DemoResNet().eval()
    x = torch.randn(1, 1, 16, 16)
    groups = [g.name for g in find_groups(base, x, 10)]
    gran = {g: ("hybrid" if i % 2 else "unstructured") for i, g in enumerate(groups)}
    plan = PruningPlan({g: 0.45 for g in groups}, granularity=gran, weight_ratios={g: 0.4 for g in groups})
    one = copy.deepcopy(base)
    w1 = apply_plan(one, x, plan, 10)
    rounds = []
    many = copy.deepcopy(base)
    wk = apply_schedule(many, x, plan, 10, steps=3, mode=mode, between=lambda mod: rounds.append(1))
    assert len(rounds) == 2  # fine-tune between rounds, not after the last
    assert wk == w1
    for g in groups:
        target = 0.45 if gran[g] == "unstructured" else 0.4
        for s in _producer_sparsity(many, x, g):
            assert s == pytest.approx(target, abs=0.01)


# --------------------------------------------------------------------------- search space
def test_search_samples_granularity_per_group_and_records_it() -> None:
    import optuna

    from autoprune.config import LayerRule, SearchSpace
    from autoprune.prune.structure import PrunableGroup
    from autoprune.study.space import suggest_granularities

    sp = SearchSpace(
        granularities=["structured", "unstructured", "nm:2:4", "hybrid"], global_granularity=False,
        layers=[LayerRule(pattern="stem*", granularities=["structured"])],
    )
    groups = [PrunableGroup("stem.0", 32), PrunableGroup("layers.0.conv1", 32), PrunableGroup("layers.1.conv1", 32)]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        t = study.ask()
        grans, wr = suggest_granularities(t, sp, groups)
        assert grans["stem.0"] == "structured" and "granularity/stem.0" not in t.params
        assert set(wr) == {g for g, v in grans.items() if v == "hybrid"}
        assert all(0.0 <= v <= 0.8 for v in wr.values())
        seen.add(grans["layers.0.conv1"])
        study.tell(t, 0.0)
    assert seen == {"structured", "unstructured", "nm:2:4", "hybrid"}


def test_config_rejects_unknown_method_and_granularity(tmp_path: Path) -> None:
    from autoprune.config import load_search_space
    from autoprune.errors import ConfigError

    p = tmp_path / "s.yaml"
    p.write_text("methods: [l1, l3]\n")
    with pytest.raises(ConfigError, match=r"s.yaml: .*methods: .*'l3'.*allowed: act_mean"):
        load_search_space(str(p))
    p.write_text("layers: [{pattern: 'x', granularities: [nm:4:2]}]\n")
    with pytest.raises(ConfigError, match="nm:4:2"):
        load_search_space(str(p))


# --------------------------------------------------------------------------- end to end
def _cycle_plan(names: list[str], ratio: float = 0.4, grans: list[str] | None = None) -> PruningPlan:
    """Group i gets method i mod 9 and granularity i mod 4: every method and granularity runs."""
    grans = grans or GRANULARITIES
    meths = {g: ALL_METHODS[i % len(ALL_METHODS)] for i, g in enumerate(names)}
    gran = {g: grans[i % len(grans)] for i, g in enumerate(names)}
    return PruningPlan({g: ratio for g in names}, meths, granularity=gran, weight_ratios={g: 0.5 for g in names})


def _export_and_check(model: nn.Module, x: torch.Tensor, dest: Path) -> None:
    import onnxruntime as ort
    from autoprune.measure.ov_core import shared_core

    from autoprune.measure.onnx import export_onnx, export_openvino

    model.eval()
    onnx_path = export_onnx(model, x, dest / "model.onnx", exporter="torchscript")
    xml = export_openvino(onnx_path, dest / "model.xml")
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
    # f32 pinned: on AMX/AVX512-BF16 CPUs OpenVINO would otherwise run bf16.
    compiled = shared_core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(compiled(x.numpy())[0], ref, rtol=1e-3, atol=1e-4)


def _run_every_method(model: nn.Module, x: torch.Tensor, classes: int, tmp_path: Path, rotations: int = 1) -> None:
    names = [g.name for g in find_groups(model, x, classes)]
    assert len(names) >= len(ALL_METHODS)
    calib = [(torch.randn(4, *x.shape[1:]), torch.randint(0, classes, (4,))) for _ in range(2)]
    for r in range(rotations):  # rotate so each method meets other granularities/groups
        m = copy.deepcopy(model)
        rot = names[r:] + names[:r]
        widths = apply_plan(m, x, _cycle_plan(rot), classes, calib)
        assert any(after < before for before, after in widths.values())
        assert methods.weight_sparsity(m) > 0.05
        _export_and_check(m, x, tmp_path / f"r{r}")


def test_every_method_on_demo_model_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _run_every_method(DemoResNet().eval(), torch.randn(1, 1, 16, 16), 10, tmp_path)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_every_method_on_torchvision_exports(arch: str, tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
    _run_every_method(model, torch.randn(1, 3, 32, 32), 10, tmp_path)


@pytest.mark.slow
def test_full_cross_product_on_demo_model() -> None:
    torch.manual_seed(0)
    base = DemoResNet().eval()
    x = torch.randn(1, 1, 16, 16)
    names = [g.name for g in find_groups(base, x, 10)]
    calib = [(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    for meth, gran in itertools.product(ALL_METHODS, GRANULARITIES):
        m = copy.deepcopy(base)
        plan = PruningPlan({g: 0.5 for g in names}, {g: meth for g in names}, granularity={g: gran for g in names},
                           weight_ratios={g: 0.5 for g in names})
        apply_plan(m, x, plan, 10, calib)
        assert torch.isfinite(m(torch.randn(2, 1, 16, 16))).all(), (meth, gran)


def test_search_records_granularity_and_size_objective(tmp_path: Path, fast_profile: Path) -> None:
    """A 2-trial search over methods × granularities with gzip size as a third objective."""
    from conftest import tiny_run_config, write_yaml

    import autoprune
    from autoprune.config import load_run_config

    space = write_yaml(tmp_path / "space.yaml", {
        "methods": ["l1", "taylor", "apoz"], "global_method": False, "high": 0.6,
        "granularities": ["structured", "unstructured", "nm:2:4", "hybrid"], "global_granularity": False,
        "seed_uniform": [],
    })
    cfg = tiny_run_config(tmp_path / "out", fast_profile, trials=2, search_space=str(space),
                          search={"trials": 2, "seed": 1, "sampler": "random", "size_objective": True})
    res = autoprune.run(load_run_config(str(write_yaml(tmp_path / "run.yaml", cfg))), export=False)
    trials = [t for t in res.study.trials if t.state.name == "COMPLETE"]
    assert len(trials) == 2 and all(len(t.values) == 3 for t in trials)
    grans = {v for t in trials for v in t.user_attrs["granularity"].values()}
    assert len(grans) >= 2 and grans <= {"structured", "unstructured", "nm:2:4", "hybrid"}
    for t in trials:
        assert t.values[2] == t.user_attrs["onnx_gzip_bytes"]
        assert set(t.user_attrs["methods"].values()) <= {"l1", "taylor", "apoz"}
        zeroing = [g for g, v in t.user_attrs["granularity"].items() if v != "structured"]
        assert (t.user_attrs["weight_sparsity"] > 0) == bool(zeroing)
        # the saved (fine-tuned) model kept its zeros: weights were held during the fine-tune
        model = load_model(tmp_path / "out" / "trials" / f"{t.number:05d}" / "model.pt")
        assert methods.weight_sparsity(model) == pytest.approx(t.user_attrs["weight_sparsity"], abs=1e-9)
