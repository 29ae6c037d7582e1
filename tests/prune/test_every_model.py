"""Every architecture a user brings: groups are found, every group prunes, the pruned model runs
and exports, or the model is refused with a clear error, never a raw crash.

GoogLeNet is built with ``aux_logits=False``: its training-mode auxiliary outputs are the
output-adapter work (another branch), not structure analysis.
"""

import copy
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

from autoprune.config import DeviceProfile
from autoprune.errors import ConfigError
from autoprune.measure.backends import ModelArtifact, get
from autoprune.measure.onnx import export_onnx
from autoprune.prune.attention import SlimAttention, prune_heads
from autoprune.prune.plan import PruningPlan, apply_plan, check_prunable, slice_to_widths
from autoprune.prune.structure import analyse, find_groups, probe_structure
from conftest import still_running

slow = pytest.mark.slow


def small_vit() -> nn.Module:
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)


def tv(name: str, **kw):
    return lambda: torchvision.models.get_model(name, num_classes=10, **kw)


# (id, builder, input size); the default subset stays around a minute on two shared cores.
ARCHS = [
    ("vit_small", small_vit, 32),
    ("squeezenet1_1", tv("squeezenet1_1"), 64),
    pytest.param("shufflenet_v2_x1_0", tv("shufflenet_v2_x1_0"), 32, marks=slow),
    pytest.param("resnet50", tv("resnet50"), 32, marks=slow),
    pytest.param("resnext50_32x4d", tv("resnext50_32x4d"), 32, marks=slow),
    pytest.param("mobilenet_v2", tv("mobilenet_v2"), 32, marks=slow),
    pytest.param("mobilenet_v3_large", tv("mobilenet_v3_large"), 32, marks=slow),
    pytest.param("efficientnet_b0", tv("efficientnet_b0"), 32, marks=slow),
    pytest.param("regnet_y_400mf", tv("regnet_y_400mf"), 32, marks=slow),
    pytest.param("densenet121", tv("densenet121"), 32, marks=slow),
    ("mnasnet1_0", tv("mnasnet1_0"), 32),
    pytest.param("convnext_tiny", tv("convnext_tiny"), 32, marks=slow),
    pytest.param("googlenet", tv("googlenet", aux_logits=False, init_weights=False), 64, marks=slow),
]


@pytest.mark.parametrize("name,build,size", ARCHS)
def test_every_group_prunes_runs_and_exports(tmp_path, name, build, size):
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = find_groups(model, x, 10)
        assert groups, f"{name}: no prunable group"
        assert check_prunable(model, x, groups, 10, round_to=4) == {}
        pruned = copy.deepcopy(model)
        widths = apply_plan(pruned, x, PruningPlan({g.name: 0.3 for g in groups}, round_to=4), 10)
    assert any(after < before for before, after in widths.values()), f"{name}: nothing was pruned"
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        ref = pruned(x)
    assert ref.shape == (1, 10)
    # The pruned architecture is rebuilt from its widths (what loading a trial's model.pt does).
    rebuilt = copy.deepcopy(model)
    slice_to_widths(rebuilt, x, widths, 10)
    rebuilt.load_state_dict(pruned.state_dict())
    onnx = export_onnx(pruned, x, tmp_path / "m.onnx", "torchscript")
    got = get("onnxruntime").load(ModelArtifact(onnx), DeviceProfile(name="t", backend="onnxruntime"))(x.numpy())
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-3, atol=1e-4)
    print(f"{name}: {len(groups)} groups, {time.perf_counter() - t0:.1f}s")


@slow
def test_swin_is_refused_with_the_construct_named():
    """torch-pruning's tracing of Swin's shifted windows grows without bound (upstream #525):
    the bounded probe refuses it; the machine keeps its memory."""
    model = torchvision.models.swin_t(num_classes=10).eval()
    with pytest.raises(ConfigError, match=r"SwinTransformer.*ShiftedWindowAttention.*not supported"):
        probe_structure(model, torch.randn(1, 3, 64, 64), 10, memory_mb=2048, timeout_s=60)


class _Hungry(nn.Module):
    """Allocates 1 GiB in its forward: what an exploding trace looks like to the probe."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # tracing (autograd on), not the caller's no_grad check
            torch.ones(2**28)
        return self.fc(self.a(x).mean((2, 3)))


def test_probe_bounds_memory_and_time_and_accepts_small_models():
    probe_structure(small_vit().eval(), torch.randn(1, 3, 32, 32), 10)  # fits: no error
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match=r"_Hungry: torch-pruning's structure analysis (ran out of|failed).*not supported"):
        probe_structure(_Hungry().eval(), x, 10, memory_mb=256)
    with pytest.raises(ConfigError, match=r"took more than 0 s"):
        probe_structure(small_vit().eval(), torch.randn(1, 3, 32, 32), 10, timeout_s=0.001)


def test_vit_heads_and_mlp_are_groups_embedding_only_when_asked():
    m, x = small_vit().eval(), torch.randn(1, 3, 32, 32)
    kinds = {g.name: g.kind for g in find_groups(m, x, 10)}
    assert kinds["encoder.layers.encoder_layer_0.self_attention (heads)"] == "heads"
    assert kinds["encoder.layers.encoder_layer_1.mlp.0"] == "channels"
    assert "embedding" not in kinds.values()
    emb = [g for g in find_groups(m, x, 10, embedding=True) if g.kind == "embedding"]
    assert [g.name for g in emb] == ["conv_proj (embedding)"] and emb[0].ch_groups == 4  # divisible by num_heads


def test_head_pruning_keeps_the_kept_heads_exactly():
    """Removing a head on SlimAttention equals masking that head's output in the original."""
    torch.manual_seed(0)
    m = small_vit().eval()
    mha = m.encoder.layers[0].self_attention
    t = torch.randn(2, 17, 64)
    slim = SlimAttention.from_mha(mha).eval()
    ref = mha(t, t, t, need_weights=False)[0]
    torch.testing.assert_close(slim(t, t, t, need_weights=False)[0], ref, rtol=1e-5, atol=1e-5)
    # head 1 removed == its out_proj columns zeroed in the original
    masked = copy.deepcopy(mha)
    with torch.no_grad():
        masked.out_proj.weight[:, 16:32] = 0
    prune_heads(m, "encoder.layers.encoder_layer_0.self_attention", [1])
    new = m.encoder.layers[0].self_attention
    assert isinstance(new, SlimAttention) and new.num_heads == 3 and new.in_proj_weight.shape == (3 * 48, 64)
    torch.testing.assert_close(new(t, t, t, need_weights=False)[0], masked(t, t, t, need_weights=False)[0], rtol=1e-5, atol=1e-5)
    # state dict keys are nn.MultiheadAttention's: checkpoints keep their names
    assert set(new.state_dict()) == set(mha.state_dict())


def test_pruned_embedding_updates_vit_hidden_dim_and_runs():
    m, x = small_vit().eval(), torch.randn(1, 3, 32, 32)
    groups = find_groups(m, x, 10, embedding=True)
    apply_plan(m, x, PruningPlan({g.name: 0.5 for g in groups}, round_to=4), 10)
    assert m.hidden_dim == m.conv_proj.out_channels == 32
    assert m.encoder.layers[0].num_heads == m.encoder.layers[0].self_attention.num_heads == 2
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_untraceable_construct_is_left_unpruned_with_the_reason():
    """ShuffleNetV2's channel shuffle makes torch-pruning divide by zero; the blocks' inner
    widths stay prunable and the shuffled widths are reported, not raised."""
    m = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    s = analyse(m, torch.randn(1, 3, 32, 32), 10)
    assert "stage2.1.branch2.3" in {g.name for g in s.groups}
    assert "ZeroDivisionError" in s.unprunable["(model)"]


def test_check_prunable_names_the_group_that_breaks_the_model():
    class FixedReshape(nn.Module):
        """Reads a width from a constant: pruning the group feeding it breaks the forward."""

        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.b(self.a(x))
            y = y.reshape(y.shape[0], 16, -1).mean(-1)[..., None, None]  # 16: never updated
            return self.fc(self.c(y).flatten(1))

    m, x = FixedReshape().eval(), torch.randn(1, 3, 8, 8)
    groups = find_groups(m, x, 10)
    bad = check_prunable(m, x, groups, 10, round_to=4)
    assert set(bad) == {"b"} and "RuntimeError" in bad["b"]


def test_groups_command_plain_output_counts_and_image_size(capsys):
    from autoprune.cli import main

    assert main(["groups", "--model", "demo", "--image-size", "24"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = [line.split("\t") for line in out[1:-1]]
    assert out[0].startswith("group\tkind") and all(len(r) == 6 for r in rows)
    assert "layers.0.conv1" in {r[0] for r in rows}
    assert out[-1] == f"{len(rows)} prunable groups of demo at [1, 24, 24]; 0 parts not searched"


_ORPHAN_SCRIPT = """
import sys, time, torch, torch.nn as nn
import autoprune.prune.structure as s
s.analyse = lambda *a, **k: time.sleep(120)  # an analysis that runs long; the fork child inherits it
print("probing", flush=True)
s.probe_structure(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), torch.randn(1, 3, 8, 8), None)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the probe is bounded (forked) on Linux only")
def test_the_probe_dies_with_the_process_that_waits_for_it(tmp_path):
    """A ``--workers`` child SIGKILLed while it probed left its forked probe running on, orphaned."""
    import psutil

    script = tmp_path / "probe.py"
    script.write_text(_ORPHAN_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "probing"
    deadline = time.monotonic() + 60
    while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    probes = psutil.Process(proc.pid).children()
    assert probes, "the probe child never started"
    time.sleep(0.5)  # the child is past its start-up, inside the analysis
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while still_running(probes) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = still_running(probes)
    for p in left:
        p.kill()
    assert not left, f"the probe child {left[0].pid} outlived its parent"
