import pytest
import torch
import torch.nn as nn

from autoprune.prune.plan import PruningPlan, apply_plan, kept_channels
from autoprune.prune.structure import find_groups
from autoprune.train.models import DemoResNet, build_model, count_params


@pytest.mark.parametrize(
    "n,ratio,round_to,groups,expected",
    [(64, 0.5, 8, 1, 32), (64, 0.3, 8, 1, 48), (64, 0.0, 8, 1, 64), (64, 0.99, 8, 1, 8), (10, 0.5, 8, 1, 8), (6, 0.5, 8, 1, 6),
     (100, 0.5, 1, 1, 50), (96, 0.5, 8, 3, 48), (128, 0.55, 16, 1, 64)],
)
def test_kept_channels_rounds_to_multiple(n, ratio, round_to, groups, expected):
    assert kept_channels(n, ratio, round_to, groups) == expected


def test_ratio_out_of_range_rejected():
    with pytest.raises(ValueError, match="outside"):
        kept_channels(64, 1.0)


def _widths(model, x):
    return {g.name: g.channels for g in find_groups(model, x, 10)}


@pytest.mark.parametrize("name,x", [("demo", torch.randn(2, 1, 16, 16)), ("resnet18", torch.randn(2, 3, 32, 32)), ("mobilenet_v2", torch.randn(2, 3, 32, 32))])
def test_pruned_widths_match_plan_and_model_runs(name, x):
    torch.manual_seed(0)
    model = build_model(name, 10, in_channels=x.shape[1]).eval()
    before = _widths(model, x[:1])
    ratios = {g: [0.25, 0.5, 0.7][i % 3] for i, g in enumerate(before)}
    plan = PruningPlan(ratios, round_to=8)
    p0 = count_params(model)
    widths = apply_plan(model, x[:1], plan, 10)
    after = _widths(model, x[:1])
    for g, n in before.items():
        assert widths[g] == (n, kept_channels(n, ratios[g], 8))
        assert after[g] == kept_channels(n, ratios[g], 8)
        assert after[g] % 8 == 0 or after[g] == n
    assert count_params(model) < p0
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_l1_keeps_the_largest_filters():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 16, 1, bias=False)
            self.b = nn.Conv2d(16, 4, 1, bias=False)

        def forward(self, x):
            return self.b(self.a(x)).mean((2, 3))

    net = Net()
    with torch.no_grad():
        scale = torch.arange(1, 17, dtype=torch.float32)
        net.a.weight.copy_(scale.view(16, 1, 1, 1))
        net.b.weight.fill_(1.0)
    apply_plan(net, torch.zeros(1, 1, 2, 2), PruningPlan({"a": 0.5}, round_to=1, default_method="l1"), 4)
    assert net.a.out_channels == 8 and net.b.in_channels == 8
    assert sorted(net.a.weight.flatten().tolist()) == list(range(9, 17))


def test_zero_ratio_leaves_model_identical():
    torch.manual_seed(0)
    m = DemoResNet().eval()
    x = torch.randn(3, 1, 16, 16)
    ref = m(x)
    apply_plan(m, x[:1], PruningPlan({}), 10)
    assert torch.equal(m(x), ref)


def test_gradient_method_needs_calibration():
    m = DemoResNet().eval()
    x = torch.randn(1, 1, 16, 16)
    g, n = next(iter(_widths(m, x).items()))
    with pytest.raises(ValueError, match="calibration"):
        apply_plan(m, x, PruningPlan({g: 0.5}, default_method="taylor"), 10)
    calib = [(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))]
    apply_plan(m, x, PruningPlan({g: 0.5}, default_method="taylor"), 10, calib)
    assert _widths(m, x)[g] == kept_channels(n, 0.5) < n
