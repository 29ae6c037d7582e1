import pytest
import torch
import torch.nn as nn

from autoprune.config import LayerRule
from autoprune.errors import ConfigError
from autoprune.prune.structure import apply_rules, find_groups
from autoprune.train.models import DemoResNet, build_model


def _group_of(groups, member):
    hits = [g for g in groups if member in g.members]
    assert len(hits) == 1, f"{member} should be in exactly one group"
    return hits[0]


def test_residual_adds_couple_channels():
    m = DemoResNet()
    groups = find_groups(m, torch.zeros(1, 1, 16, 16), 10)
    # stem output is added to both blocks of stage 0: one group with their conv2s
    g = _group_of(groups, "stem.0")
    assert {"layers.0.conv2", "layers.1.conv2", "stem.1", "layers.0.bn2", "layers.1.bn2"} <= set(g.members)
    # the stage's readers follow: the next block's first convs and the downsampling shortcut
    assert {"layers.0.conv1", "layers.1.conv1", "layers.2.conv1", "layers.2.shortcut.0"} <= set(g.consumers)
    # inner convs are independent groups of their own
    inner = _group_of(groups, "layers.0.conv1")
    assert inner.name == "layers.0.conv1" and set(inner.members) == {"layers.0.conv1", "layers.0.bn1"}
    assert g.channels == 32


def test_output_layer_never_prunable():
    m = DemoResNet()
    groups = find_groups(m, torch.zeros(1, 1, 16, 16), 10)
    assert all(g.name != "fc" for g in groups)
    # fc only appears as a consumer (its input features follow the last stage)
    assert not any("fc" in g.members for g in groups)
    assert sum(1 for g in groups if "fc" in g.consumers) == 1


def test_depthwise_conv_joins_its_producer_group():
    m = build_model("mobilenet_v2", 10)
    groups = find_groups(m, torch.zeros(1, 3, 32, 32), 10)
    g = _group_of(groups, "features.2.conv.1.0")  # depthwise conv
    assert "features.2.conv.0.0" in g.members  # the expansion conv feeding it
    assert all(gg.name != "classifier.1" for gg in groups)


def test_grouped_conv_records_channel_groups():
    class G(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 32, 3, padding=1)
            self.b = nn.Conv2d(32, 32, 3, padding=1, groups=4)
            self.c = nn.Conv2d(32, 16, 1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(self.c(self.b(self.a(x))).mean((2, 3)))

    groups = find_groups(G(), torch.zeros(1, 3, 8, 8), 10)
    assert max(g.ch_groups for g in groups) == 4


def test_rules_first_match_wins_and_skip():
    groups = find_groups(DemoResNet(), torch.zeros(1, 1, 16, 16), 10)
    rules = [LayerRule(pattern="layers.0.conv1", skip=True), LayerRule(pattern="layers.*.conv1", high=0.3), LayerRule(pattern="*", low=0.1)]
    out = apply_rules(groups, 0.0, 0.7, ["l1"], rules)
    names = {g.name for g in out}
    assert "layers.0.conv1" not in names
    g = next(g for g in out if g.name == "layers.1.conv1")
    assert (g.low, g.high) == (0.0, 0.3)
    g = next(g for g in out if g.name == "stem.0" or "stem.0" in g.members)
    assert (g.low, g.high) == (0.1, 0.7)


def test_unknown_pattern_is_an_error_listing_groups():
    groups = find_groups(DemoResNet(), torch.zeros(1, 1, 16, 16), 10)
    with pytest.raises(ConfigError, match=r"layer9\.\*.*match no prunable group.*layers\.0\.conv1"):
        apply_rules(groups, 0.0, 0.5, ["l1"], [LayerRule(pattern="layer9.*", skip=True)], "space.yaml")


def test_group_names_come_from_the_model_not_torch_pruning_privates():
    """Names are the model's own qualified names (``named_modules``/``named_parameters``), not
    torch-pruning's private module-to-name map; a parameter that no module wraps is named by
    its parameter name (``scale``), not ``UnwrappedParameter_0 (torch.Size([1, 8, 1, 1]))``."""
    import warnings

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 8, 3)
            self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
            self.b = nn.Conv2d(8, 8, 3)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.b(self.a(x) * self.scale).mean((2, 3)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning warns about the unwrapped parameter
        groups = {g.name: g for g in find_groups(Scaled(), torch.rand(1, 1, 8, 8), 4)}
    assert set(groups) == {"a", "b"}
    assert groups["a"].members == ["a", "scale"] and groups["a"].consumers == ["b"]
    assert groups["b"].members == ["b"] and groups["b"].consumers == ["fc"]
